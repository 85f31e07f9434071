//! What a model's workers measure: the tokens per second the model's
//! workers decode together while `busy` of them are busy with `rows`
//! sequences each. Both scaling dials are read off these figures:
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
//! A figure is the pool's throughput over stretches of time, not a sum of
//! what each worker saw of its own passes: every decode pass of any worker
//! reports when it ends, and the tokens of the passes that end while the
//! state (rows, busy) holds, over the time from the stretch's first pass
//! end to its last, are the measure. One worker's stretch is the sum of
//! its pass-to-pass cycles. Workers' own pass times summed to far more
//! than came out on a GPU (three replicas: 950 tok/s by their passes, 635
//! by the tokens delivered): a busy worker is not always decoding, and what
//! workers on one device wait for each other hides partly outside a pass.
//!
//! Where nothing is measured yet both dials are optimistic (batches fill to
//! `--batch`, workers are added up to `--max-workers`): that is how the
//! figures get made. Figures older than [`STALE`] are forgotten, so a
//! worker measures again what it stopped doing. Pure: the pool feeds it
//! pass ends and asks.

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
/// The longest stretch measured as one: a figure grows at least this often
/// while a state lasts.
const STRETCH: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
struct Figure {
    /// Tokens of all busy workers together.
    tokens: f64,
    secs: f64,
    passes: u32,
    at: Instant,
}

/// The stretch being measured: passes of `rows` rows with `busy` workers
/// busy, since the end of the pass that opened it.
#[derive(Debug, Clone, Copy)]
struct Stretch {
    rows: usize,
    busy: usize,
    from: Instant,
    last: Instant,
    tokens: usize,
    passes: u32,
}

#[derive(Debug, Default)]
pub struct Rates {
    figures: HashMap<(usize, usize), Figure>,
    stretch: Option<Stretch>,
}

impl Rates {
    /// A decode pass of some worker ended at `now`: `rows` tokens, while
    /// `busy` workers (that one included) were busy from its start to its
    /// end. A pass that measures nothing (it prefilled, or the busy count
    /// changed while it ran) or a worker going idle is [`Rates::break_off`].
    pub fn pass_ended(&mut self, rows: usize, busy: usize, now: Instant) {
        let busy = busy.max(1);
        if rows == 0 {
            return self.break_off(now);
        }
        match &mut self.stretch {
            Some(s) if (s.rows, s.busy) == (rows, busy) => {
                s.tokens += rows;
                s.passes += 1;
                s.last = now;
                if now.saturating_duration_since(s.from) >= STRETCH {
                    self.break_off(now);
                    self.open(rows, busy, now);
                }
            }
            _ => {
                self.break_off(now);
                self.open(rows, busy, now);
            }
        }
    }

    /// The state measured ends at `now`: what the stretch holds (up to its
    /// last pass end) becomes part of its figure.
    pub fn break_off(&mut self, now: Instant) {
        if let Some(s) = self.stretch.take() {
            let secs = s.last.saturating_duration_since(s.from);
            if s.passes > 0 && !secs.is_zero() {
                self.record(s.rows, s.busy, s.tokens, s.passes, secs, now);
            }
        }
    }

    fn open(&mut self, rows: usize, busy: usize, now: Instant) {
        self.stretch = Some(Stretch {
            rows,
            busy,
            from: now,
            last: now,
            tokens: 0,
            passes: 0,
        });
    }

    /// `tokens` of all `busy` workers with `rows` rows each, in `passes`
    /// passes over `elapsed`.
    fn record(
        &mut self,
        rows: usize,
        busy: usize,
        tokens: usize,
        passes: u32,
        elapsed: Duration,
        now: Instant,
    ) {
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
        f.tokens += tokens as f64;
        f.secs += elapsed.as_secs_f64();
        f.passes = f.passes.saturating_add(passes);
        f.at = now;
    }

    /// One worker's share of the tokens/s at `rows` with `busy` workers
    /// busy, once measured enough and recently.
    pub fn rate(&self, rows: usize, busy: usize, now: Instant) -> Option<f64> {
        let busy = busy.max(1);
        let f = self.figures.get(&(rows, busy))?;
        let fresh = now.saturating_duration_since(f.at) <= STALE;
        (fresh && f.passes >= MIN_PASSES && f.secs > 0.0).then(|| f.tokens / f.secs / busy as f64)
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
    /// the `busy` workers deliver now (`None`: not measured). Compares the
    /// pool's rate at one batch size (the largest measured in both) with
    /// `busy` workers busy and with the next count measured above it (the
    /// scaler may add several workers at once, so `busy + 1` itself may
    /// never have run).
    pub fn replica_gain(&self, busy: usize, now: Instant) -> Option<f64> {
        self.gain_above(busy, now).map(|(_, g)| g)
    }

    /// The most workers worth running, from `running` upwards, as far as
    /// the figures tell: each count's gain over the next one measured
    /// above it is climbed while it is at least [`MIN_GAIN`]; the first
    /// count whose next adds less is the answer. `None`: no figure says
    /// where to stop (unmeasured counts are worth a try).
    pub fn workers_worth(&self, running: usize, now: Instant) -> Option<usize> {
        let mut k = running.max(1);
        loop {
            match self.gain_above(k, now) {
                Some((_, g)) if g < MIN_GAIN => return Some(k),
                Some((more, _)) => k = more,
                None => return None,
            }
        }
    }

    /// The next worker count measured above `busy` that shares a batch
    /// size with it, and what it adds.
    fn gain_above(&self, busy: usize, now: Instant) -> Option<(usize, f64)> {
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
                    .map(|&(_, with)| (more, (more as f64 * with) / (busy as f64 * alone) - 1.0))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `passes` passes of `rows` rows at `tok_s` per worker, for each of
    /// `busy` workers.
    fn feed(r: &mut Rates, rows: usize, busy: usize, tok_s: f64, passes: u32, now: Instant) {
        let pass = Duration::from_secs_f64(rows as f64 / tok_s);
        for _ in 0..passes {
            r.record(rows, busy, rows * busy, busy as u32, pass, now);
        }
    }

    /// Pass ends every `gap` ms from `t`, each of `rows` rows with `busy`
    /// busy; the time after the last.
    fn ends(r: &mut Rates, t: Instant, n: u32, gap: u64, rows: &[usize], busy: usize) -> Instant {
        let mut at = t;
        for i in 0..n as usize {
            at += Duration::from_millis(gap);
            r.pass_ended(rows[i % rows.len()], busy, at);
        }
        at
    }

    #[test]
    fn the_pool_is_measured_by_what_comes_out_over_time() {
        let t = Instant::now();
        // One worker, a pass of two rows every 10 ms: 200 tok/s.
        let mut r = Rates::default();
        let t1 = ends(&mut r, t, 60, 10, &[2], 1);
        // (Measured in stretches of at most half a second.)
        let rate = r.rate(2, 1, t1).unwrap();
        assert!((rate - 200.0).abs() < 1e-6, "{rate}");
        // A prefill (a pass that measures nothing) and a second of waiting
        // are not part of the stretch: the rate holds.
        r.pass_ended(0, 1, t1 + Duration::from_millis(5));
        let t2 = ends(&mut r, t1 + Duration::from_secs(1), 40, 10, &[2], 1);
        r.break_off(t2);
        let rate = r.rate(2, 1, t2).unwrap();
        assert!((rate - 200.0).abs() < 1e-6, "{rate}");

        // Two workers taking turns on one device, a row each: a pass ends
        // every 4 ms whoever's it is. 250 tok/s in all, 125 each, whatever
        // each worker would have timed of its own pass.
        let mut r = Rates::default();
        let t1 = ends(&mut r, t, 40, 4, &[1], 1);
        let t2 = ends(&mut r, t1, 80, 4, &[1], 2);
        r.break_off(t2);
        let one = r.rate(1, 1, t2).unwrap();
        let each = r.rate(1, 2, t2).unwrap();
        assert!(
            (one - 250.0).abs() < 1e-6 && (each - 125.0).abs() < 1e-6,
            "{one} {each}"
        );
        assert!(r.replica_gain(1, t2).unwrap().abs() < 1e-9);

        // Workers with batches of different sizes: no state holds for
        // two pass ends, nothing is measured.
        let mut r = Rates::default();
        let t1 = ends(&mut r, t, 100, 3, &[2, 3], 2);
        r.break_off(t1);
        assert_eq!(r.rate(2, 2, t1), None);
        assert_eq!(r.rate(3, 2, t1), None);
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
        assert_eq!(g.workers_worth(1, now), Some(1));
        // Batched workers on a GPU (8 rows each): a second adds 32 %, a
        // third takes 13 % away. Two are worth it, whatever runs now.
        let mut b = Rates::default();
        feed(&mut b, 8, 1, 2843.0, 40, now);
        feed(&mut b, 8, 2, 3749.0 / 2.0, 40, now);
        feed(&mut b, 8, 3, 3253.0 / 3.0, 40, now);
        assert_eq!(b.workers_worth(1, now), Some(2));
        assert_eq!(b.workers_worth(2, now), Some(2));
        assert_eq!(b.workers_worth(3, now), None, "four never ran");
        assert_eq!(Rates::default().workers_worth(1, now), None);
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
