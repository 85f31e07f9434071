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

/// An idle engine's KV cache, kept between a conversation's turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cache {
    /// The pool's name for it.
    pub id: u64,
    pub bytes: u64,
    /// Larger is more recent (on the same clock as `Resident::last_used`).
    pub last_used: u64,
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
    /// Parked conversation caches. They count on top of the workers'
    /// reservations (a worker may start a new conversation on a fresh engine
    /// while a cache waits for its next turn), and they are what goes first
    /// under pressure, busy model or not.
    pub caches: Vec<Cache>,
}

impl<K> Resident<K> {
    pub fn cache_bytes(&self) -> u64 {
        self.caches.iter().map(|c| c.bytes).sum()
    }

    /// Everything this model is accounted for.
    pub fn total(&self) -> u64 {
        self.cost.with_workers(self.workers) + self.cache_bytes()
    }
}

/// What to free to make room: caches first (least recently used, any
/// model), then idle models (least recently used).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Freeing<K> {
    /// (model, cache id).
    pub caches: Vec<(K, u64)>,
    pub models: Vec<K>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan<K> {
    /// Fits as things are.
    Fits,
    /// Fits once these caches are dropped and these idle models unloaded.
    Free(Freeing<K>),
    /// Can never fit: the model alone is over the budget.
    TooBig { need: u64, budget: u64 },
    /// Does not fit now, and freeing every cache and idle model would not be
    /// enough.
    NoRoom { need: u64, free: u64 },
}

fn used<K>(resident: &[Resident<K>]) -> u64 {
    resident.iter().map(Resident::total).sum()
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
    make_room(budget, resident, need, true)
}

/// May the loaded model `key` serve a longer context, its cost becoming
/// `cost` (every live worker reserves the longer KV cache)? Caches are
/// dropped and other idle models unloaded as for a load; the model itself
/// never is. A model not in `resident` plans as a load of one worker.
pub fn plan_grow<K: Clone + PartialEq>(
    budget: u64,
    resident: &[Resident<K>],
    key: &K,
    cost: Cost,
) -> Plan<K> {
    let Some(r) = resident.iter().find(|r| &r.key == key) else {
        return plan_load(budget, resident, cost, 1);
    };
    let workers = r.workers.max(1);
    let whole = cost.with_workers(workers) + r.cache_bytes();
    if whole > budget {
        return Plan::TooBig {
            need: whole,
            budget,
        };
    }
    let need = cost
        .with_workers(workers)
        .saturating_sub(r.cost.with_workers(workers));
    let others: Vec<Resident<K>> = resident
        .iter()
        .map(|x| Resident {
            idle: x.idle && &x.key != key,
            ..x.clone()
        })
        .collect();
    make_room(budget, &others, need, true)
}

/// May a model already loaded add a worker, dropping caches if need be?
/// `Some` with the caches to drop (possibly none), `None` if there is no
/// room. Never unloads another model to scale: scaling is an
/// optimisation, loading is a request.
pub fn plan_worker<K: Clone + PartialEq>(
    budget: u64,
    resident: &[Resident<K>],
    key: &K,
) -> Option<Vec<(K, u64)>> {
    let r = resident.iter().find(|r| &r.key == key)?;
    match make_room(budget, resident, r.cost.per_worker, false) {
        Plan::Fits => Some(Vec::new()),
        Plan::Free(f) => Some(f.caches),
        _ => None,
    }
}

/// The caches to drop (least recently used first) to get back within the
/// budget, e.g. after one more was parked.
pub fn over_budget<K: Clone>(budget: u64, resident: &[Resident<K>]) -> Vec<(K, u64)> {
    let mut over = used(resident).saturating_sub(budget);
    let caches = caches_lru(resident);
    let mut drop = Vec::new();
    for (k, c) in caches {
        if over == 0 {
            break;
        }
        over = over.saturating_sub(c.bytes);
        drop.push((k.clone(), c.id));
    }
    drop
}

/// Every model's caches, least recently used first.
fn caches_lru<K>(resident: &[Resident<K>]) -> Vec<(&K, &Cache)> {
    let mut caches: Vec<(&K, &Cache)> = resident
        .iter()
        .flat_map(|r| r.caches.iter().map(move |c| (&r.key, c)))
        .collect();
    caches.sort_by_key(|(_, c)| c.last_used);
    caches
}

fn make_room<K: Clone>(
    budget: u64,
    resident: &[Resident<K>],
    need: u64,
    evict_models: bool,
) -> Plan<K> {
    let in_use = used(resident);
    if in_use + need <= budget {
        return Plan::Fits;
    }
    let fits = |freed: u64| in_use - freed + need <= budget;
    let caches = caches_lru(resident);
    let mut freed = 0;
    let mut free = Freeing {
        caches: Vec::new(),
        models: Vec::new(),
    };
    for (k, c) in caches {
        freed += c.bytes;
        free.caches.push((k.clone(), c.id));
        if fits(freed) {
            return Plan::Free(free);
        }
    }
    if evict_models {
        let mut idle: Vec<&Resident<K>> = resident.iter().filter(|r| r.idle).collect();
        idle.sort_by_key(|r| r.last_used);
        for r in idle {
            // Its caches are counted already.
            freed += r.cost.with_workers(r.workers);
            free.models.push(r.key.clone());
            if fits(freed) {
                return Plan::Free(free);
            }
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
            caches: Vec::new(),
        }
    }

    fn cache(id: u64, bytes: u64, last_used: u64) -> Cache {
        Cache {
            id,
            bytes,
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
        let models = |m: Vec<&'static str>| {
            Plan::Free(Freeing {
                caches: Vec::new(),
                models: m,
            })
        };
        assert_eq!(plan_load(300, &res, c, 1), models(vec!["a"]));
        assert_eq!(plan_load(300, &res, c, 10), models(vec!["a", "b"]));
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
        assert_eq!(plan_worker(130, &res, &"a"), Some(vec![]));
        assert_eq!(plan_worker(129, &res, &"a"), None);
        assert_eq!(plan_worker(1000, &res, &"zzz"), None);
        // Caches make way for a worker; models do not.
        let mut a = r("a", 100, 2, false, 1);
        a.caches = vec![cache(7, 15, 3), cache(8, 15, 2)];
        let res = [a, r("b", 50, 1, true, 0)];
        // In use: a 120 + caches 30, b 60 = 210.
        assert_eq!(plan_worker(220, &res, &"a"), Some(vec![]));
        assert_eq!(plan_worker(210, &res, &"a"), Some(vec![("a", 8)]));
        assert_eq!(plan_worker(195, &res, &"a"), Some(vec![("a", 8), ("a", 7)]));
        assert_eq!(plan_worker(189, &res, &"a"), None);
    }

    #[test]
    fn caches_go_first_least_recently_used_across_models_then_idle_models() {
        let c = Cost {
            weights: 100,
            per_worker: 10,
        };
        // a: busy, 110 + caches 30 (ids 1 @5, 2 @1); b: idle, 110 + cache 20 (id 3 @3).
        let mut a = r("a", 100, 1, false, 9);
        a.caches = vec![cache(1, 30, 5), cache(2, 30, 1)];
        let mut b = r("b", 100, 1, true, 2);
        b.caches = vec![cache(3, 20, 3)];
        let res = [a, b];
        assert_eq!(res[0].total(), 170);
        // In use 300; loading 110 into 400 needs 10 freed: the oldest cache.
        assert_eq!(
            plan_load(400, &res, c, 1),
            Plan::Free(Freeing {
                caches: vec![("a", 2)],
                models: vec![],
            })
        );
        // 70 freed: all three caches, still no model.
        assert_eq!(
            plan_load(340, &res, c, 1),
            Plan::Free(Freeing {
                caches: vec![("a", 2), ("b", 3), ("a", 1)],
                models: vec![],
            })
        );
        // More: every cache, then the idle model b (busy a stays).
        assert_eq!(
            plan_load(320, &res, c, 1),
            Plan::Free(Freeing {
                caches: vec![("a", 2), ("b", 3), ("a", 1)],
                models: vec!["b"],
            })
        );
        assert_eq!(
            plan_load(200, &res, c, 1),
            Plan::NoRoom { need: 110, free: 0 }
        );
        // Back within a budget after a park: oldest caches only, never models.
        assert_eq!(over_budget(300, &res), Vec::<(&str, u64)>::new());
        assert_eq!(over_budget(280, &res), vec![("a", 2)]);
        assert_eq!(over_budget(250, &res), vec![("a", 2), ("b", 3)]);
        // Still over without any cache: all of them go (workers stay).
        assert_eq!(over_budget(100, &res).len(), 3);
    }

    #[test]
    fn a_longer_context_counts_every_worker_and_never_unloads_its_own_model() {
        let grown = Cost {
            weights: 100,
            per_worker: 30,
        };
        // a: 100 + 2 x 10, idle; b: 100 + 10, idle and older.
        let a = r("a", 100, 2, true, 5);
        let b = r("b", 100, 1, true, 1);
        let res = [a.clone(), b.clone()];
        // 40 more for a's two workers: fits in 270, not in 260.
        assert_eq!(plan_grow(270, &res, &"a", grown), Plan::Fits);
        assert_eq!(
            plan_grow(260, &res, &"a", grown),
            Plan::Free(Freeing {
                caches: vec![],
                models: vec!["b"],
            })
        );
        // a alone at its new size is 160; without b there is no one to unload.
        assert_eq!(
            plan_grow(150, &res, &"a", grown),
            Plan::TooBig {
                need: 160,
                budget: 150
            }
        );
        assert_eq!(
            plan_grow(170, std::slice::from_ref(&a), &"a", grown),
            Plan::Fits
        );
        let mut busy_b = b;
        busy_b.idle = false;
        assert_eq!(
            plan_grow(260, &[a, busy_b], &"a", grown),
            Plan::NoRoom { need: 40, free: 30 }
        );
    }
}
