//! Durations as people type them (`300ms`, `30s`, `5m`, `1h`, `0`,
//! `forever`/`-1`), for keep-alives and timeouts on command lines.

use std::time::Duration;

/// Keep-alive on the wire: milliseconds, `u64::MAX` for forever.
pub const FOREVER_MS: u64 = u64::MAX;

/// Parse a duration; `None` for `forever` (also `-1`, `inf`).
pub fn parse(s: &str) -> Result<Option<Duration>, String> {
    let t = s.trim().to_ascii_lowercase();
    if matches!(t.as_str(), "forever" | "-1" | "inf" | "never") {
        return Ok(None);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 300ms, 30s, 5m, 1h, forever)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("unknown unit {u:?} in {s:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs)
        .map(Some)
        .map_err(|_| format!("{s:?} is out of range"))
}

/// A parsed duration as wire milliseconds.
pub fn to_wire_ms(d: Option<Duration>) -> u64 {
    d.map_or(FOREVER_MS, |d| {
        d.as_millis().min(u128::from(FOREVER_MS - 1)) as u64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_forever() {
        assert_eq!(parse("300ms"), Ok(Some(Duration::from_millis(300))));
        assert_eq!(parse("30s"), Ok(Some(Duration::from_secs(30))));
        assert_eq!(parse("30"), Ok(Some(Duration::from_secs(30))));
        assert_eq!(parse("5m"), Ok(Some(Duration::from_secs(300))));
        assert_eq!(parse("1.5h"), Ok(Some(Duration::from_secs(5400))));
        assert_eq!(parse("0"), Ok(Some(Duration::ZERO)));
        assert_eq!(parse("forever"), Ok(None));
        assert_eq!(parse("-1"), Ok(None));
        assert!(parse("5 parsecs").is_err());
        assert!(parse("").is_err());
        assert_eq!(to_wire_ms(None), FOREVER_MS);
        assert_eq!(to_wire_ms(Some(Duration::from_secs(2))), 2000);
    }
}
