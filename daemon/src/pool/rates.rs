//! What a model's workers measure: the tokens per second one worker decodes
//! with `rows` sequences in its batch while `busy` workers of the model are
//! busy. Both scaling dials are read off these figures:
//!
//! - sequences per worker ([`Rates::batch_cap`]): a batch grows while a
//!   sequence more still raises the worker's throughput; where the figures
//!   show the rows past some size adding (almost) nothing, the batch stops
//!   there and further requests go to another worker or wait;
//! - workers per model ([`Rates::replica_gain`]): another worker is worth
//!   starting only if the figures don't show the workers already slowing
//!   each other down by as much as it adds (on one GPU they do: replicas
//!   only share the device's time).
//!
//! Where nothing is measured yet both dials are optimistic (batches fill to
//! `--batch`, workers are added up to `--max-workers`): that is how the
//! figures get made. Figures older than [`STALE`] are forgotten, so a
//! worker measures again what it stopped doing. Pure: the pool feeds it
//! pass timings and asks.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A row (or a worker) must add at least this share of what each row (or
/// worker) already delivers on average to be worth its place.
pub const MIN_GAIN: f64 = 0.05;
/// Passes a figure needs before a dial trusts it.
pub const MIN_PASSES: u32 = 16;
/// Figures not refreshed for this long are forgotten.
pub const STALE: Duration = Duration::from_secs(600);
/// The time a figure averages over: older passes weigh half as much after
/// each such stretch of measured time.
const HORIZON: f64 = 4.0;

#[derive(Debug, Clone, Copy)]
struct Figure {
    tokens: f64,
    secs: f64,
    passes: u32,
    at: Instant,
}

#[derive(Debug, Default)]
pub struct Rates {
    figures: HashMap<(usize, usize), Figure>,
}

impl Rates {
    /// A decode pass of one worker: `rows` tokens in `elapsed`, while
    /// `busy` workers (this one included) were busy.
    pub fn record(&mut self, rows: usize, busy: usize, elapsed: Duration, now: Instant) {
        if rows == 0 || elapsed.is_zero() {
            return;
        }
        let busy = busy.max(1);
        let f = self.figures.entry((rows, busy)).or_insert(Figure {
            tokens: 0.0,
            secs: 0.0,
            passes: 0,
            at: now,
        });
        if now.duration_since(f.at) > STALE {
            *f = Figure {
                tokens: 0.0,
                secs: 0.0,
                passes: 0,
                at: now,
            };
        }
        if f.secs > HORIZON {
            f.tokens /= 2.0;
            f.secs /= 2.0;
        }
        f.tokens += rows as f64;
        f.secs += elapsed.as_secs_f64();
        f.passes = f.passes.saturating_add(1);
        f.at = now;
    }

    /// One worker's tokens/s at `rows` with `busy` workers busy, once
    /// measured enough and recently.
    pub fn rate(&self, rows: usize, busy: usize, now: Instant) -> Option<f64> {
        let f = self.figures.get(&(rows, busy.max(1)))?;
        let fresh = now.saturating_duration_since(f.at) <= STALE;
        (fresh && f.passes >= MIN_PASSES && f.secs > 0.0).then(|| f.tokens / f.secs)
    }

    /// The measured batch sizes with `busy` workers busy, ascending.
    fn column(&self, busy: usize, now: Instant) -> Vec<(usize, f64)> {
        let mut col: Vec<(usize, f64)> = self
            .figures
            .keys()
            .filter(|(_, b)| *b == busy.max(1))
            .filter_map(|&(rows, b)| self.rate(rows, b, now).map(|r| (rows, r)))
            .collect();
        col.sort_by_key(|c| c.0);
        col
    }

    /// The most sequences a worker should decode together while `busy`
    /// workers are busy, `most` at the outside: the first measured size
    /// past which the next measured size (a quarter more rows at least, so
    /// that noise between neighbours decides nothing) adds less than
    /// [`MIN_GAIN`] of a row's average per added row.
    pub fn batch_cap(&self, busy: usize, most: usize, now: Instant) -> usize {
        let most = most.max(1);
        let col = self.column(busy, now);
        for (i, &(m, rm)) in col.iter().enumerate() {
            if m >= most {
                break;
            }
            let Some(&(n, rn)) = col[i + 1..]
                .iter()
                .find(|(n, _)| *n >= m + (m / 4).max(1) && *n <= most)
            else {
                continue;
            };
            let per_added = (rn - rm) / (n - m) as f64;
            if per_added < MIN_GAIN * rm / m as f64 {
                return m;
            }
        }
        most
    }

    /// What more workers add to the model's throughput, as a share of what
    /// the `busy` workers deliver now (`None`: not measured). Compares one
    /// worker's rate at one batch size (the largest measured in both) with
    /// `busy` workers busy and with the next count measured above it (the
    /// scaler may add several workers at once, so `busy + 1` itself may
    /// never have run).
    pub fn replica_gain(&self, busy: usize, now: Instant) -> Option<f64> {
        if busy == 0 {
            return None;
        }
        let here = self.column(busy, now);
        let mut above: Vec<usize> = self
            .figures
            .keys()
            .map(|&(_, b)| b)
            .filter(|b| *b > busy)
            .collect();
        above.sort_unstable();
        above.dedup();
        above.into_iter().find_map(|more| {
            let there = self.column(more, now);
            here.iter().rev().find_map(|&(rows, alone)| {
                there
                    .iter()
                    .find(|(n, _)| *n == rows)
                    .map(|&(_, with)| (more as f64 * with) / (busy as f64 * alone) - 1.0)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `passes` passes of `rows` rows at `tok_s` per worker.
    fn feed(r: &mut Rates, rows: usize, busy: usize, tok_s: f64, passes: u32, now: Instant) {
        let pass = Duration::from_secs_f64(rows as f64 / tok_s);
        for _ in 0..passes {
            r.record(rows, busy, pass, now);
        }
    }

    #[test]
    fn nothing_measured_means_the_configured_limits() {
        let r = Rates::default();
        let now = Instant::now();
        assert_eq!(r.batch_cap(1, 8, now), 8);
        assert_eq!(r.replica_gain(1, now), None);
        let mut r = Rates::default();
        feed(&mut r, 1, 1, 30.0, MIN_PASSES - 1, now);
        feed(&mut r, 4, 1, 30.0, MIN_PASSES - 1, now);
        assert_eq!(r.rate(1, 1, now), None, "too few passes to trust");
        assert_eq!(r.batch_cap(1, 8, now), 8);
    }

    #[test]
    fn a_batch_grows_while_rows_add_throughput_and_stops_where_they_stop() {
        let now = Instant::now();
        // The CPU's Gemma figures (batched aggregate tok/s at 1, 2, 4, 8
        // sequences): each size still adds.
        let mut r = Rates::default();
        for (rows, rate) in [(1, 34.3), (2, 52.1), (4, 70.0), (8, 77.5)] {
            feed(&mut r, rows, 1, rate, 40, now);
        }
        assert_eq!(r.batch_cap(1, 16, now), 16, "nothing flat measured yet");
        // Sixteen add nothing over eight: the batch stops at eight.
        feed(&mut r, 16, 1, 77.9, 40, now);
        assert_eq!(r.batch_cap(1, 16, now), 8);
        assert_eq!(r.batch_cap(1, 6, now), 6, "the configured limit first");
        // A GPU's: every doubling pays.
        let mut g = Rates::default();
        for (rows, rate) in [
            (1, 586.0),
            (2, 988.0),
            (4, 1471.0),
            (7, 2100.0),
            (8, 2428.0),
        ] {
            feed(&mut g, rows, 1, rate, 40, now);
        }
        feed(&mut g, 16, 1, 3997.0, 40, now);
        assert_eq!(g.batch_cap(1, 32, now), 32);
        // Flat from the start (a device already saturated by one row).
        let mut f = Rates::default();
        feed(&mut f, 1, 1, 100.0, 40, now);
        feed(&mut f, 3, 1, 102.0, 40, now);
        assert_eq!(f.batch_cap(1, 8, now), 1);
        // Another column (two workers busy) has figures of its own.
        assert_eq!(f.batch_cap(2, 8, now), 8);
    }

    #[test]
    fn neighbours_do_not_decide_alone() {
        // 8 and 9 rows within noise of each other: a quarter more rows is
        // the nearest comparison, and 8 → 10 still gains.
        let now = Instant::now();
        let mut r = Rates::default();
        feed(&mut r, 8, 1, 200.0, 40, now);
        feed(&mut r, 9, 1, 199.0, 40, now);
        feed(&mut r, 10, 1, 240.0, 40, now);
        assert_eq!(r.batch_cap(1, 12, now), 12);
    }

    #[test]
    fn a_replica_is_worth_it_only_if_the_workers_do_not_slow_each_other_down() {
        let now = Instant::now();
        let mut r = Rates::default();
        feed(&mut r, 1, 1, 580.0, 40, now);
        assert_eq!(r.replica_gain(1, now), None, "two workers never measured");
        // One device: two busy workers each run at half speed.
        feed(&mut r, 1, 2, 291.0, 40, now);
        let g = r.replica_gain(1, now).unwrap();
        assert!(g.abs() < MIN_GAIN, "{g}");
        // Cores to spare: the second worker adds 80 %.
        let mut c = Rates::default();
        feed(&mut c, 2, 1, 40.0, 40, now);
        feed(&mut c, 2, 2, 36.0, 40, now);
        let g = c.replica_gain(1, now).unwrap();
        assert!((g - 0.8).abs() < 1e-6, "{g}");
        // Compared at the largest batch size both counts ran.
        feed(&mut c, 4, 1, 60.0, 40, now);
        feed(&mut c, 4, 2, 30.0, 40, now);
        assert!(c.replica_gain(1, now).unwrap().abs() < 1e-6);
        // Two workers were added at once: one busy against three busy (the
        // GPU's figures with --batch 1: three replicas, 537 tok/s in all).
        let mut g = Rates::default();
        feed(&mut g, 1, 1, 586.0, 40, now);
        feed(&mut g, 1, 2, 300.0, 3, now);
        feed(&mut g, 1, 3, 179.0, 40, now);
        let gain = g.replica_gain(1, now).unwrap();
        assert!((gain - (3.0 * 179.0 / 586.0 - 1.0)).abs() < 1e-6, "{gain}");
        assert!(gain < 0.0);
        assert_eq!(g.replica_gain(3, now), None, "four never ran");
    }

    #[test]
    fn old_figures_are_forgotten_and_recent_passes_weigh_more() {
        let then = Instant::now();
        let mut r = Rates::default();
        feed(&mut r, 1, 1, 100.0, 40, then);
        feed(&mut r, 2, 1, 100.0, 40, then);
        assert_eq!(r.batch_cap(1, 8, then), 1);
        let later = then + STALE + Duration::from_secs(1);
        assert_eq!(r.rate(1, 1, later), None);
        assert_eq!(r.batch_cap(1, 8, later), 8, "measured again");
        // A figure follows a change of speed within a few horizons: 0.4 s
        // at 100 tok/s, then 10 s at 200.
        let mut d = Rates::default();
        feed(&mut d, 1, 1, 100.0, 40, then);
        feed(&mut d, 1, 1, 200.0, 2_000, then);
        let rate = d.rate(1, 1, then).unwrap();
        assert!(rate > 195.0 && rate < 200.0, "{rate}");
    }
}
