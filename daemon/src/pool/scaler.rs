//! How many workers a model should have: more while requests queue that no
//! busy worker's batch has room for (up to `max`), unless the measured rates
//! show another worker adding too little (the workers share a device that
//! is already busy); fewer after workers sit idle (down to `min`). Batches
//! fill first, as far as the measured rates say rows still pay (see
//! `rates`): on one device another worker only shares the time a batched
//! pass would use better. Pure: the caller passes what it sees, the memory
//! governor has the last word on spawning.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub min: usize,
    pub max: usize,
    /// A worker idle this long may be retired (above `min`).
    pub idle_period: Duration,
}

/// A pool as the scaler sees it.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Jobs waiting for a worker.
    pub queued: usize,
    /// Workers being created (not yet taking jobs).
    pub starting: usize,
    pub busy: usize,
    /// Free places in busy workers' batches (they take queued jobs between
    /// passes).
    pub room: usize,
    /// Idle workers: (id, how long idle).
    pub idle: Vec<(u32, Duration)>,
    /// What more workers were measured to add, as a share of what the
    /// ones there (busy, idle and starting: a queue keeps them all busy)
    /// deliver (`None`: not measured).
    pub replica_gain: Option<f64>,
    /// The most workers the measured figures show paying their way, from
    /// those there upwards (`None`: no figure says where to stop; see
    /// `Rates::workers_worth`).
    pub workers_worth: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Hold,
    Spawn(usize),
    /// Jobs queue past the batches' room, but more workers were measured
    /// to add only this share of throughput: they wait for room instead.
    Held(f64),
    /// Retire these idle workers, longest idle first.
    Retire(Vec<u32>),
}

pub fn decide(v: &View, l: &Limits) -> Decision {
    let max = l.max.max(1);
    let min = l.min.min(max);
    let total = v.starting + v.busy + v.idle.len();
    if total < min {
        return Decision::Spawn(min - total);
    }
    // Jobs that neither a batch with room, an idle worker nor one on its
    // way will take.
    let uncovered = v.queued.saturating_sub(v.room + v.idle.len() + v.starting);
    if uncovered > 0 && total < max {
        let worth = v.workers_worth.unwrap_or(max).min(max);
        if total >= worth {
            return Decision::Held(v.replica_gain.unwrap_or(0.0));
        }
        return Decision::Spawn(uncovered.min(worth - total));
    }
    if v.queued == 0 && total > min {
        let mut idle: Vec<(u32, Duration)> = v
            .idle
            .iter()
            .copied()
            .filter(|(_, d)| *d >= l.idle_period)
            .collect();
        idle.sort_by_key(|w| std::cmp::Reverse(w.1));
        idle.truncate(total - min);
        if !idle.is_empty() {
            return Decision::Retire(idle.into_iter().map(|(id, _)| id).collect());
        }
    }
    Decision::Hold
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        min: 1,
        max: 4,
        idle_period: Duration::from_secs(60),
    };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn spawns_for_uncovered_queue_up_to_max() {
        let v = View {
            queued: 3,
            busy: 2,
            ..View::default()
        };
        assert_eq!(decide(&v, &L), Decision::Spawn(2), "capped at max 4");
        let v = View {
            queued: 3,
            busy: 1,
            starting: 1,
            idle: vec![(0, secs(1))],
            room: 0,
            replica_gain: None,
            workers_worth: None,
        };
        assert_eq!(decide(&v, &L), Decision::Spawn(1));
        let v = View {
            queued: 1,
            busy: 4,
            ..View::default()
        };
        assert_eq!(decide(&v, &L), Decision::Hold, "at max: the job waits");
        let v = View {
            queued: 3,
            busy: 1,
            room: 2,
            ..View::default()
        };
        assert_eq!(
            decide(&v, &L),
            Decision::Spawn(1),
            "the batch takes two, a worker the third"
        );
        assert_eq!(
            decide(&View::default(), &L),
            Decision::Spawn(1),
            "below min"
        );
    }

    #[test]
    fn holds_when_another_worker_was_measured_to_add_nothing() {
        let v = View {
            queued: 3,
            busy: 1,
            replica_gain: Some(0.01),
            workers_worth: Some(1),
            ..View::default()
        };
        assert_eq!(decide(&v, &L), Decision::Held(0.01));
        let v = View {
            replica_gain: Some(0.6),
            workers_worth: None,
            ..v
        };
        assert_eq!(decide(&v, &L), Decision::Spawn(3), "measured to pay");
        let v = View {
            replica_gain: None,
            ..v
        };
        assert_eq!(decide(&v, &L), Decision::Spawn(3), "not measured: try");
        // A second worker measured to pay, a third not: one more, not three.
        let v = View {
            replica_gain: Some(0.3),
            workers_worth: Some(2),
            ..v
        };
        assert_eq!(decide(&v, &L), Decision::Spawn(1), "as far as it pays");
        let v = View {
            queued: 1,
            replica_gain: Some(0.0),
            workers_worth: Some(1),
            ..View::default()
        };
        assert_eq!(decide(&v, &L), Decision::Spawn(1), "min comes first");
    }

    #[test]
    fn retires_long_idle_workers_down_to_min() {
        let v = View {
            idle: vec![(1, secs(61)), (2, secs(120)), (3, secs(5))],
            ..View::default()
        };
        assert_eq!(decide(&v, &L), Decision::Retire(vec![2, 1]));
        let v = View {
            idle: vec![(1, secs(61)), (2, secs(120))],
            ..View::default()
        };
        assert_eq!(decide(&v, &L), Decision::Retire(vec![2]), "keeps min");
        let v = View {
            queued: 1,
            busy: 1,
            idle: vec![(1, secs(100))],
            ..View::default()
        };
        assert_eq!(decide(&v, &L), Decision::Hold, "never retire with a queue");
    }
}
