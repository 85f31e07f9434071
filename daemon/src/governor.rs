//! Memory governance: decide, from estimates, whether a model may load or a
//! worker may start within the budget, and which idle models to unload
//! first (least recently used). Pure: no I/O, no clock; the pools act.

/// What one model costs in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Shared by every worker of the model (weights, repacked layouts,
    /// tokenizer).
    pub weights: u64,
    /// Each worker's own (KV cache at full context, activation buffers).
    pub per_worker: u64,
}

impl Cost {
    pub fn with_workers(&self, workers: usize) -> u64 {
        self.weights + self.per_worker * workers as u64
    }
}

/// A loaded model as the governor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident<K> {
    pub key: K,
    pub cost: Cost,
    pub workers: usize,
    /// No request running or queued: may be evicted.
    pub idle: bool,
    /// Larger is more recent (any monotonic counter or timestamp).
    pub last_used: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan<K> {
    /// Fits as things are.
    Fits,
    /// Fits once these idle models are unloaded (least recently used first).
    Evict(Vec<K>),
    /// Can never fit: the model alone is over the budget.
    TooBig { need: u64, budget: u64 },
    /// Does not fit now, and evicting every idle model would not be enough.
    NoRoom { need: u64, free: u64 },
}

fn used<K>(resident: &[Resident<K>]) -> u64 {
    resident
        .iter()
        .map(|r| r.cost.with_workers(r.workers))
        .sum()
}

/// May a model costing `cost` load with `workers` workers?
pub fn plan_load<K: Clone>(
    budget: u64,
    resident: &[Resident<K>],
    cost: Cost,
    workers: usize,
) -> Plan<K> {
    let need = cost.with_workers(workers.max(1));
    if need > budget {
        return Plan::TooBig { need, budget };
    }
    make_room(budget, resident, need)
}

/// May a model already loaded add a worker? (Never evicts another model to
/// scale: scaling is an optimisation, loading is a request.)
pub fn can_add_worker<K: PartialEq>(budget: u64, resident: &[Resident<K>], key: &K) -> bool {
    let Some(r) = resident.iter().find(|r| &r.key == key) else {
        return false;
    };
    used(resident) + r.cost.per_worker <= budget
}

fn make_room<K: Clone>(budget: u64, resident: &[Resident<K>], need: u64) -> Plan<K> {
    let in_use = used(resident);
    if in_use + need <= budget {
        return Plan::Fits;
    }
    let mut idle: Vec<&Resident<K>> = resident.iter().filter(|r| r.idle).collect();
    idle.sort_by_key(|r| r.last_used);
    let mut freed = 0;
    let mut evict = Vec::new();
    for r in idle {
        freed += r.cost.with_workers(r.workers);
        evict.push(r.key.clone());
        if in_use - freed + need <= budget {
            return Plan::Evict(evict);
        }
    }
    Plan::NoRoom {
        need,
        free: budget.saturating_sub(in_use),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(
        key: &'static str,
        weights: u64,
        workers: usize,
        idle: bool,
        last_used: u64,
    ) -> Resident<&'static str> {
        Resident {
            key,
            cost: Cost {
                weights,
                per_worker: 10,
            },
            workers,
            idle,
            last_used,
        }
    }

    #[test]
    fn loads_that_fit_evict_lru_idle_or_are_refused() {
        let c = Cost {
            weights: 100,
            per_worker: 10,
        };
        assert_eq!(plan_load::<&str>(1000, &[], c, 2), Plan::Fits);
        assert_eq!(
            plan_load::<&str>(100, &[], c, 1),
            Plan::TooBig {
                need: 110,
                budget: 100
            }
        );
        // 300 budget: a (110, idle, older) + b (110, idle, newer) in use.
        let res = [r("b", 100, 1, true, 5), r("a", 100, 1, true, 1)];
        assert_eq!(plan_load(300, &res, c, 1), Plan::Evict(vec!["a"]));
        assert_eq!(plan_load(300, &res, c, 10), Plan::Evict(vec!["a", "b"]));
        // A busy model is never evicted.
        let res = [r("b", 100, 1, false, 5), r("a", 100, 1, true, 1)];
        assert_eq!(
            plan_load(300, &res, c, 10),
            Plan::NoRoom {
                need: 200,
                free: 80
            }
        );
    }

    #[test]
    fn scaling_needs_room_for_one_more_worker() {
        let res = [r("a", 100, 2, false, 1)];
        assert!(can_add_worker(130, &res, &"a"));
        assert!(!can_add_worker(129, &res, &"a"));
        assert!(!can_add_worker(1000, &res, &"zzz"));
    }
}
