//! Durations and sizes as people type them on command lines: `300ms`,
//! `30s`, `5m`, `1h`, `0`, `forever`/`-1`; `8GiB`, `512MiB`, `1000`.

use std::time::Duration;

/// Keep-alive on the wire: milliseconds, `u64::MAX` for forever.
pub const FOREVER_MS: u64 = u64::MAX;

/// A number and the unit after it (`"1.5h"` → `(1.5, "h")`), units lowercased.
fn split(s: &str) -> Result<(f64, String), String> {
    let t = s.trim().to_ascii_lowercase();
    let at = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(at);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a number with a unit"))?;
    Ok((n, unit.trim().to_owned()))
}

/// Parse a duration; `None` for `forever` (also `-1`, `inf`).
pub fn parse_duration(s: &str) -> Result<Option<Duration>, String> {
    let t = s.trim().to_ascii_lowercase();
    if matches!(t.as_str(), "forever" | "-1" | "inf" | "never") {
        return Ok(None);
    }
    let (n, unit) = split(s)
        .map_err(|_| format!("{s:?} is not a duration (examples: 300ms, 30s, 5m, 1h, forever)"))?;
    let secs = match unit.as_str() {
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

/// Parse a size in bytes (`8GiB`, `512MiB`, `1.5G`, `1000`; powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (n, unit) =
        split(s).map_err(|_| format!("{s:?} is not a size (examples: 8GiB, 512MiB)"))?;
    let mult: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0f64.powi(3),
        "t" | "tb" | "tib" => 1024.0f64.powi(4),
        u => return Err(format!("unknown unit {u:?} in {s:?}")),
    };
    Ok((n * mult) as u64)
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
        assert_eq!(
            parse_duration("300ms"),
            Ok(Some(Duration::from_millis(300)))
        );
        assert_eq!(parse_duration("30s"), Ok(Some(Duration::from_secs(30))));
        assert_eq!(parse_duration("30"), Ok(Some(Duration::from_secs(30))));
        assert_eq!(parse_duration("5m"), Ok(Some(Duration::from_secs(300))));
        assert_eq!(parse_duration("1.5h"), Ok(Some(Duration::from_secs(5400))));
        assert_eq!(parse_duration("0"), Ok(Some(Duration::ZERO)));
        assert_eq!(parse_duration("forever"), Ok(None));
        assert_eq!(parse_duration("-1"), Ok(None));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(to_wire_ms(None), FOREVER_MS);
        assert_eq!(to_wire_ms(Some(Duration::from_secs(2))), 2000);
        assert_eq!(parse_bytes("8GiB"), Ok(8 << 30));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("lots").is_err());
    }
}
