//! Loaded models and their workers. Each worker is a dedicated thread that
//! owns an `Engine` and runs one generation at a time, synchronously, as
//! Candle's examples do; jobs reach it through the model's flume queue.
//! Connection threads submit and never wait on a worker.
//!
//! A model's first worker loads the weights; every other worker is a replica
//! sharing them (`Engine::replica`: its own KV cache only). A cold model
//! starts `prewarm` workers; the scaler adds replicas while requests queue
//! (up to `max_workers`) and retires workers idle for `idle_period` (down to
//! `min_workers`); the housekeeping thread unloads a model idle past its
//! keep-alive.

pub mod rates;
pub mod scaler;

use std::collections::HashMap;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use paraphym_protocol::message::{
    ErrorKind, Event, ModelInfo, ModelStatus, Response, Stage, StatusReport, TokenLogprob,
    WireError, WorkerSnapshot, WorkerState,
};

use crate::breaker::{self, Breaker};
use crate::config::{self, DaemonConfig, FOREVER};
use crate::engine::models::decoder::StaticDecoder;
use crate::engine::{Decoding, Engine, Feed, FinishReason, GenEvent, LoadOptions};
use crate::events::Events;
use crate::governor::{self, Cost, Plan, Resident};
use crate::pull::Hub;
use crate::registry;
use crate::server::convert::{self, GenRequest};
use crate::server::{CancelReason, Daemon, JobControl, Reply};

/// One generation on its way to a worker.
#[derive(Debug)]
pub struct Job {
    pub request: GenRequest,
    pub control: Arc<JobControl>,
    pub reply: Reply,
    /// When the daemon read the request (time to first token counts from here).
    pub received: Instant,
    /// The half-open breaker's trial: its outcome decides.
    pub trial: bool,
    /// Its place in the pool's waiting list (set on submit).
    pub seq: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unknown(message: String) -> WireError {
    WireError {
        kind: ErrorKind::UnknownModel,
        message,
    }
}

#[derive(Debug)]
enum LoadState {
    /// Waiting for the loader: these `Load` requests are answered then.
    Loading {
        waiters: Vec<Reply>,
    },
    /// Loaded: replicas are made from this engine (which never generates).
    Ready(Arc<Engine>),
    Failed(String),
}

#[derive(Debug)]
struct WorkerCell {
    snapshot: Mutex<WorkerSnapshot>,
    /// When its state last changed.
    since: Mutex<Instant>,
    /// Set by the scaler: stop once idle.
    retire: AtomicBool,
    /// Last sign of life while busy (a prefill chunk or a token).
    progress: Mutex<Instant>,
    /// The jobs it runs, for the supervisor to answer if it gets stuck.
    current: Mutex<Vec<(Arc<JobControl>, Reply)>>,
    /// Places in its batch it offers the queue (its share of `Pool::room`,
    /// changed under that lock), and sequences past its first reserved with
    /// the governor (its share of `Pool::extra`): kept here so that whoever
    /// gives up on the worker (the supervisor, a panic) can take them back.
    offered: AtomicUsize,
    reserved: AtomicUsize,
    /// Tokens generated, ever, and at the last metrics sample.
    tokens: AtomicU64,
    sampled: AtomicU64,
}

impl WorkerCell {
    fn state(&self) -> WorkerState {
        lock(&self.snapshot).state
    }
}

type Map = Mutex<HashMap<PathBuf, Arc<Pool>>>;

/// Circuit breakers by model file; they outlive pools (a failed load
/// forgets its pool, not its failures).
type Breakers = Mutex<HashMap<PathBuf, Breaker>>;

/// How a request or load ended, for the breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure(String),
    /// No verdict (the client's fault, or cancelled): a trial may run again.
    Neutral,
}

/// One loaded (or loading) model.
#[derive(Debug)]
pub struct Pool {
    reference: String,
    path: PathBuf,
    architecture: Mutex<String>,
    size_bytes: u64,
    tx: Mutex<Option<flume::Sender<Job>>>,
    rx: flume::Receiver<Job>,
    workers: Mutex<Vec<Arc<WorkerCell>>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    load: Mutex<LoadState>,
    /// Signalled when `load` leaves `Loading` (replicas wait on it).
    loaded: Condvar,
    next_worker: AtomicU32,
    keep_alive: Mutex<Duration>,
    last_used: Mutex<Instant>,
    settings: Settings,
    events: Arc<Events>,
    map: Weak<Map>,
    breakers: Arc<Breakers>,
    /// Jobs in the queue, in order, for their `Stage::Queued` positions.
    waiting: Mutex<VecDeque<(u64, Reply)>>,
    next_seq: AtomicU64,
    /// Load progress, for requests that arrive while loading.
    load_percent: AtomicU8,
    /// The memory governor's estimate for this model (it grows with the
    /// context).
    cost: Mutex<Cost>,
    /// Positions served now: the daemon's `--context` (capped at the
    /// model's trained context), more once a request asked for more. Never
    /// shrinks while loaded.
    context: AtomicUsize,
    created: Instant,
    /// Engines not running a job, and their conversation caches.
    parked: Mutex<Parked>,
    /// Sequences workers run beyond their first (each reserved with the
    /// governor as a worker's KV cache is).
    extra: AtomicUsize,
    /// Free places in busy workers' batches: while there are any, idle
    /// workers leave the queue to them (one batched pass decodes several
    /// sequences for little more than one; another worker on the same
    /// device only shares its time).
    room: Mutex<usize>,
    room_changed: Condvar,
    /// What its workers' passes measured: both scaling dials read it.
    rates: Mutex<rates::Rates>,
    /// The scaler is holding back a worker the queue would call for (said
    /// once per stretch in the log).
    held: AtomicBool,
    /// One rebalance at a time: two submits at once must not both see room
    /// under `--max-workers` and both add workers.
    scaling: Mutex<()>,
}

/// A model's engines that are not running a job. A worker takes the one
/// whose cache is its job's conversation (the longest cached prefix of the
/// prompt, or the same session), so a conversation finds its cache on
/// whichever worker is free. There are at most as many engines as live
/// workers plus `conversation_caches`; the memory governor counts every
/// parked cache and drops the least recently used first under pressure.
#[derive(Debug, Default)]
struct Parked {
    /// Least recently used first.
    idle: Vec<IdleEngine>,
    /// Engines running a job now.
    out: usize,
    next_id: u64,
}

#[derive(Debug)]
struct IdleEngine {
    engine: Engine,
    /// The governor's name for its cache.
    id: u64,
    /// The session of the conversation its cache holds.
    session: Option<String>,
    /// Its KV buffers (they do not change while parked).
    bytes: u64,
    /// When it was parked (the governor's clock).
    used: u64,
}

/// Tokens at the end of a cached prompt that its next turn may tokenize
/// differently and still be the same conversation.
const SEAM: usize = 4;

/// The engine a job runs on.
enum Choice {
    Parked(usize),
    Fresh,
}

impl Pool {
    fn touch(&self, keep_alive: Option<Duration>) {
        if let Some(k) = keep_alive {
            *lock(&self.keep_alive) = k;
        }
        *lock(&self.last_used) = Instant::now();
    }

    fn busy(&self) -> bool {
        !self.rx.is_empty()
            || lock(&self.workers)
                .iter()
                .any(|w| w.state() == WorkerState::Busy || !lock(&w.current).is_empty())
    }

    fn is_ready(&self) -> bool {
        matches!(*lock(&self.load), LoadState::Ready(_))
    }

    fn is_closing(&self) -> bool {
        lock(&self.tx).is_none()
    }

    /// Start a worker: the loader (a cold model's first), or a replica that
    /// waits for the loader's weights. `false` if no thread could start.
    fn spawn_worker(self: &Arc<Self>, loader: bool) -> bool {
        let id = self.next_worker.fetch_add(1, Ordering::Relaxed);
        let cell = Arc::new(WorkerCell {
            snapshot: Mutex::new(WorkerSnapshot {
                id,
                state: if loader {
                    WorkerState::Loading
                } else {
                    WorkerState::Spawning
                },
                requests_served: 0,
                tokens_per_s: 0.0,
                sequences: 0,
                batch: self.settings.batch as u32,
            }),
            since: Mutex::new(Instant::now()),
            retire: AtomicBool::new(false),
            progress: Mutex::new(Instant::now()),
            current: Mutex::default(),
            offered: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            tokens: AtomicU64::new(0),
            sampled: AtomicU64::new(0),
        });
        lock(&self.workers).push(cell.clone());
        let worker = Worker {
            pool: self.clone(),
            cell: cell.clone(),
            loader,
        };
        worker.publish();
        let spawned = std::thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || worker.main());
        match spawned {
            Ok(h) => {
                lock(&self.handles).push(h);
                true
            }
            Err(e) => {
                tracing::error!("cannot start a worker thread: {e}");
                lock(&self.workers).retain(|w| !Arc::ptr_eq(w, &cell));
                if loader {
                    self.fail(&format!("cannot start a worker: {e}"));
                }
                false
            }
        }
    }

    /// Apply the scaler: more workers while requests queue, fewer after idle.
    fn rebalance(self: &Arc<Self>) {
        if !self.is_ready() || self.is_closing() {
            return;
        }
        let _one_at_a_time = lock(&self.scaling);
        let view = {
            let workers = lock(&self.workers);
            let mut v = scaler::View {
                queued: self.rx.len(),
                room: *lock(&self.room),
                ..scaler::View::default()
            };
            for w in workers.iter() {
                match w.state() {
                    WorkerState::Loading | WorkerState::Spawning => v.starting += 1,
                    WorkerState::Busy => v.busy += 1,
                    WorkerState::Idle if !w.retire.load(Ordering::Relaxed) => v
                        .idle
                        .push((lock(&w.snapshot).id, lock(&w.since).elapsed())),
                    _ => {}
                }
            }
            // A queue past the batches' room keeps every idle and starting
            // worker busy too: more workers would join all of them.
            let running = v.busy + v.idle.len() + v.starting;
            let rates = lock(&self.rates);
            v.replica_gain = rates.replica_gain(running, Instant::now());
            v.workers_worth = rates.workers_worth(running, Instant::now());
            v
        };
        let decision = scaler::decide(&view, &self.settings.limits);
        let held = matches!(decision, scaler::Decision::Held(_));
        if let (false, scaler::Decision::Held(gain)) =
            (self.held.swap(held, Ordering::Relaxed), &decision)
        {
            tracing::info!(
                model = self.reference,
                queued = view.queued,
                busy = view.busy,
                "scale-up held: more workers were measured to add {:.0} % throughput; \
                 the queue waits for room in the batches",
                gain * 100.0
            );
        }
        match decision {
            scaler::Decision::Hold | scaler::Decision::Held(_) => {}
            scaler::Decision::Spawn(n) => {
                for _ in 0..n {
                    if !self.may_add_worker() {
                        tracing::info!(
                            model = self.reference,
                            queued = view.queued,
                            "scale-up refused: the memory budget has no room for another worker"
                        );
                        break;
                    }
                    tracing::info!(
                        model = self.reference,
                        queued = view.queued,
                        measured_gain = ?view.replica_gain,
                        "scaling up"
                    );
                    self.spawn_worker(false);
                }
            }
            scaler::Decision::Retire(ids) => {
                tracing::info!(model = self.reference, ?ids, "retiring idle workers");
                for w in lock(&self.workers).iter() {
                    if ids.contains(&lock(&w.snapshot).id) {
                        w.retire.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Workers running a batch now.
    fn busy_workers(&self) -> usize {
        lock(&self.workers)
            .iter()
            .filter(|w| w.state() == WorkerState::Busy)
            .count()
    }

    /// Workers that hold (or will hold) memory.
    fn live_workers(&self) -> usize {
        lock(&self.workers)
            .iter()
            .filter(|w| !matches!(w.state(), WorkerState::Stopped | WorkerState::Failed))
            .count()
    }

    /// Sequences the memory governor reserves for: one per live worker,
    /// and each further sequence a worker's batch holds.
    fn slots(&self) -> usize {
        self.live_workers() + self.extra.load(Ordering::Acquire)
    }

    /// The governor's clock: milliseconds since the daemon started.
    fn clock(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.created).as_millis() as u64
    }

    /// This pool as the memory governor sees it.
    fn resident(&self) -> Resident<PathBuf> {
        let caches = lock(&self.parked)
            .idle
            .iter()
            .filter(|e| e.bytes > 0)
            .map(|e| governor::Cache {
                id: e.id,
                bytes: e.bytes,
                last_used: e.used,
            })
            .collect();
        Resident {
            key: self.path.clone(),
            cost: *lock(&self.cost),
            workers: self.slots(),
            idle: !self.busy() && self.is_ready(),
            last_used: self.clock(*lock(&self.last_used)),
            caches,
        }
    }

    /// Room in the budget for one more worker of this model? Conversation
    /// caches (of any model) are dropped to make it; loaded models are not.
    fn may_add_worker(&self) -> bool {
        let budget = self.settings.memory_budget;
        if budget == 0 {
            return true;
        }
        let Some(map) = self.map.upgrade() else {
            return false;
        };
        let (plan, pools) = {
            let map = lock(&map);
            let resident: Vec<Resident<PathBuf>> = map.values().map(|p| p.resident()).collect();
            let plan = governor::plan_worker(budget, &resident, &self.path);
            (plan, map.clone())
        };
        match plan {
            Some(caches) => {
                drop_caches(&pools, &caches, "to add a worker");
                true
            }
            None => false,
        }
    }

    /// Back within the memory budget after a cache grew: drop the least
    /// recently used caches (of any model).
    fn shed_caches(&self) {
        let budget = self.settings.memory_budget;
        let Some(map) = self.map.upgrade().filter(|_| budget > 0) else {
            return;
        };
        let (caches, pools) = {
            let map = lock(&map);
            let resident: Vec<Resident<PathBuf>> = map.values().map(|p| p.resident()).collect();
            (governor::over_budget(budget, &resident), map.clone())
        };
        drop_caches(&pools, &caches, "over the memory budget");
    }

    /// Drop the KV cache `id` if it is still parked (a worker may have taken
    /// it since; then its worker's reservation covers it).
    fn drop_cache(&self, id: u64, why: &str) {
        let mut parked = lock(&self.parked);
        if let Some(e) = parked.idle.iter_mut().find(|e| e.id == id) {
            tracing::info!(
                model = self.reference,
                mib = e.bytes >> 20,
                tokens = e.engine.cached_tokens().len(),
                "dropped a conversation cache ({why})"
            );
            e.engine.clear_cache();
            e.bytes = 0;
            e.session = None;
            RELEASED.store(true, Ordering::Relaxed);
        }
    }

    /// The tokens a job runs and the chat messages left out to fit them
    /// (tokenized once: the choice of engine and the generation share them).
    fn prepare(
        &self,
        request: &GenRequest,
        proto: &Engine,
    ) -> Result<(Vec<u32>, usize), crate::engine::EngineError> {
        proto.fit_prompt(
            request.prompt.as_prompt(),
            request.params.max_tokens,
            request.drop_oldest,
            request.params.context,
        )
    }

    /// The engine replicas are made from, serving the pool's context: when
    /// a request made the pool serve more, its RoPE tables grow here, once;
    /// every engine then shares them (`Engine::share_context`).
    fn proto(&self) -> Result<Arc<Engine>, crate::engine::EngineError> {
        let target = self.context.load(Ordering::Acquire);
        let mut state = lock(&self.load);
        let LoadState::Ready(proto) = &mut *state else {
            return Err(crate::engine::EngineError::InvalidParams(
                "the model is not loaded".into(),
            ));
        };
        if proto.model().context() < target {
            let mut grown = proto.replica();
            grown.set_context(target)?;
            tracing::info!(
                model = self.reference,
                context = grown.model().context(),
                "serving a longer context"
            );
            *proto = Arc::new(grown);
        }
        Ok(proto.clone())
    }

    /// A job left the queue: tell those behind it their new positions.
    fn dequeued(&self, seq: u64) {
        let mut waiting = lock(&self.waiting);
        let Some(i) = waiting.iter().position(|(s, _)| *s == seq) else {
            return;
        };
        waiting.remove(i);
        for (pos, (_, reply)) in waiting.iter().enumerate().skip(i) {
            reply.post(Response::Stage(Stage::Queued {
                position: pos as u32 + 1,
            }));
        }
    }

    /// Loading progress to everyone waiting (when the percentage moves).
    fn loading(&self, fraction: f32) {
        let percent = (fraction.clamp(0.0, 1.0) * 100.0) as u8;
        if self.load_percent.swap(percent, Ordering::Relaxed) == percent {
            return;
        }
        for (_, reply) in lock(&self.waiting).iter() {
            reply.post(Response::Stage(Stage::Loading { percent }));
        }
    }

    /// Tell the model's breaker how a request (or the load) ended.
    fn record(&self, outcome: Outcome) {
        record(
            &self.breakers,
            &self.events,
            &self.path,
            &self.settings,
            outcome,
        );
    }

    /// Give up on stuck workers: answer their requests, replace them.
    fn supervise(self: &Arc<Self>) {
        // Any worker with jobs and no progress: a busy one, or one draining
        // its batch before it leaves (retired, or replaced after a panic).
        let stuck: Vec<Arc<WorkerCell>> = lock(&self.workers)
            .iter()
            .filter(|w| {
                !lock(&w.current).is_empty()
                    && lock(&w.progress).elapsed() >= self.settings.stuck_timeout
            })
            .cloned()
            .collect();
        for w in stuck {
            let id = lock(&w.snapshot).id;
            tracing::error!(
                model = self.reference,
                worker = id,
                "no progress for {:?}: abandoning its request and replacing it",
                self.settings.stuck_timeout
            );
            let replaced = w.retire.swap(true, Ordering::Relaxed);
            {
                let mut snap = lock(&w.snapshot);
                snap.state = WorkerState::Unhealthy;
            }
            self.events.publish(Event::Worker {
                model: self.reference.clone(),
                worker: lock(&w.snapshot).clone(),
            });
            self.record(Outcome::Failure("a worker got stuck".into()));
            // Its batch takes no one else (it keeps its reservations: its
            // engines still hold that memory).
            self.withdraw_offer(&w);
            self.abandon(
                &w,
                CancelReason::Stuck,
                &format!(
                    "the worker made no progress for {} s; it was replaced, try again",
                    self.settings.stuck_timeout.as_secs()
                ),
            );
            if !replaced {
                self.spawn_worker(false);
            }
        }
    }

    /// Answer every job of `w` with an internal error.
    fn abandon(&self, w: &WorkerCell, reason: CancelReason, message: &str) {
        for (control, reply) in std::mem::take(&mut *lock(&w.current)) {
            control.cancel(reason);
            if control.finish_once() {
                reply.finish();
                reply.post(Response::Error(WireError {
                    kind: ErrorKind::Internal,
                    message: message.to_owned(),
                }));
            }
        }
    }

    /// Take `w`'s offered batch places out of the room idle workers defer to.
    fn withdraw_offer(&self, w: &WorkerCell) {
        let mut room = lock(&self.room);
        *room -= w.offered.swap(0, Ordering::AcqRel);
        drop(room);
        self.room_changed.notify_all();
    }

    /// Give back `w`'s reservations beyond `keep`.
    fn release_reserved(&self, w: &WorkerCell, keep: usize) {
        let held = w.reserved.load(Ordering::Acquire);
        if held > keep {
            w.reserved.store(keep, Ordering::Release);
            self.extra.fetch_sub(held - keep, Ordering::AcqRel);
            // Fewer slots: fewer engines may stay parked.
            self.trim();
        }
    }

    /// The load failed: answer everyone waiting, forget the pool.
    fn fail(&self, message: &str) {
        // Queue lock first (as `try_submit`): no job gets in after this.
        let waiters = {
            let mut tx = lock(&self.tx);
            let mut state = lock(&self.load);
            tx.take();
            let old = std::mem::replace(&mut *state, LoadState::Failed(message.to_owned()));
            self.loaded.notify_all();
            match old {
                LoadState::Loading { waiters } => waiters,
                _ => Vec::new(),
            }
        };
        let err = failed(&self.reference, message);
        self.record(Outcome::Failure(err.message.clone()));
        for w in waiters {
            w.post(Response::Error(err.clone()));
        }
        if let Some(map) = self.map.upgrade() {
            forget(&map, self);
        }
        while let Ok(job) = self.rx.try_recv() {
            if job.control.claim() {
                job.reply.finish();
                job.reply.post(Response::Error(err.clone()));
            }
        }
        lock(&self.waiting).clear();
    }

    fn status(&self) -> ModelStatus {
        let (caches, cache_bytes) = {
            let parked = lock(&self.parked);
            let held = parked.idle.iter().filter(|e| e.bytes > 0);
            (held.clone().count() as u32, held.map(|e| e.bytes).sum())
        };
        let workers: Vec<WorkerSnapshot> = lock(&self.workers)
            .iter()
            .map(|w| lock(&w.snapshot).clone())
            .collect();
        ModelStatus {
            reference: self.reference.clone(),
            workers,
            queued: self.rx.len() as u32,
            memory_bytes: lock(&self.cost).with_workers(self.slots()) + cache_bytes,
            caches,
            cache_bytes,
            expires_in_ms: self.expires_in_ms(),
            context: self.context.load(Ordering::Relaxed) as u32,
        }
    }

    /// Until the keep-alive unloads this model if nothing else comes.
    fn expires_in_ms(&self) -> u64 {
        let keep_alive = *lock(&self.keep_alive);
        if keep_alive == FOREVER {
            return u64::MAX;
        }
        let idle_for = if self.busy() {
            Duration::ZERO
        } else {
            lock(&self.last_used).elapsed()
        };
        keep_alive.saturating_sub(idle_for).as_millis() as u64
    }

    fn info(&self) -> ModelInfo {
        ModelInfo {
            reference: self.reference.clone(),
            path: self.path.display().to_string(),
            architecture: lock(&self.architecture).clone(),
            size_bytes: self.size_bytes,
            loaded: true,
        }
    }

    /// The engine to run `tokens` on: the parked one whose cache is this
    /// conversation's (same session, or a prompt that extends the cached
    /// prompt; the longest shared prefix wins), else an empty one,
    /// else a fresh one while the model has room for another cache, else the
    /// least recently used. It serves `proto`'s context.
    fn take_engine(&self, tokens: &[u32], session: Option<&str>, proto: &Engine) -> Engine {
        let cap = self.slots() + self.settings.conversation_caches;
        let mut engine = {
            let mut parked = lock(&self.parked);
            let theirs = parked
                .idle
                .iter()
                .enumerate()
                .filter_map(|(i, e)| {
                    let shared = e.engine.shared_prefix(tokens);
                    let same = session.is_some() && e.session.as_deref() == session;
                    // The last prompt, give or take the tokens where the reply
                    // joins it (text re-tokenizes differently at the seam).
                    let extends = shared + SEAM >= e.engine.cached_prompt_len();
                    (shared > 0 && (same || extends)).then_some((i, (shared, same)))
                })
                .max_by_key(|(_, key)| *key)
                .map(|(i, _)| i);
            let empty = || parked.idle.iter().position(|e| e.bytes == 0);
            let choice = match theirs.or_else(empty) {
                Some(i) => Choice::Parked(i),
                None if parked.idle.len() + parked.out < cap || parked.idle.is_empty() => {
                    Choice::Fresh
                }
                None => Choice::Parked(0),
            };
            parked.out += 1;
            match choice {
                Choice::Parked(i) => parked.idle.remove(i).engine,
                Choice::Fresh => {
                    drop(parked);
                    return proto.replica();
                }
            }
        };
        engine.share_context(proto);
        engine
    }

    /// An engine back from a job (or a new worker's), with the session its
    /// cache now holds; then back within the cache count and the budget.
    fn park(&self, engine: Engine, session: Option<String>, from_job: bool) {
        let bytes = engine.kv_bytes();
        let used = self.clock(Instant::now());
        {
            let mut parked = lock(&self.parked);
            if from_job {
                parked.out = parked.out.saturating_sub(1);
            }
            let id = parked.next_id;
            parked.next_id += 1;
            parked.idle.push(IdleEngine {
                engine,
                id,
                session: if bytes > 0 { session } else { None },
                bytes,
                used,
            });
        }
        self.trim();
        if bytes > 0 {
            self.shed_caches();
        }
    }

    /// An engine a panic may have left broken: dropped, not parked.
    fn discard(&self, engine: Engine) {
        drop(engine);
        let mut parked = lock(&self.parked);
        parked.out = parked.out.saturating_sub(1);
    }

    /// At most one engine per live worker plus `conversation_caches`: empty
    /// engines go first, then the least recently used caches.
    fn trim(&self) {
        let cap = self.slots() + self.settings.conversation_caches;
        let mut parked = lock(&self.parked);
        while parked.idle.len() + parked.out > cap && !parked.idle.is_empty() {
            let i = parked.idle.iter().position(|e| e.bytes == 0).unwrap_or(0);
            parked.idle.remove(i);
            RELEASED.store(true, Ordering::Relaxed);
        }
    }

    /// Stop taking jobs; workers finish the queue, then exit.
    fn close(&self) -> Vec<JoinHandle<()>> {
        lock(&self.tx).take();
        std::mem::take(&mut *lock(&self.handles))
    }
}

/// Settings every pool shares.
#[derive(Debug, Clone)]
struct Settings {
    hooks: crate::hooks::Hooks,
    memory_budget: u64,
    prefill_chunk: usize,
    /// Sequences a worker decodes together at most.
    batch: usize,
    /// Workers decode through a fixed-shape step (`StaticDecoder`).
    fixed_step: bool,
    breaker_failures: u32,
    breaker_cooldown: Duration,
    stuck_timeout: Duration,
    prewarm: usize,
    limits: scaler::Limits,
    max_queue: usize,
    keep_alive: Duration,
    load: LoadOptions,
    conversation_caches: usize,
}

#[derive(Debug)]
pub struct Pools {
    map: Arc<Map>,
    breakers: Arc<Breakers>,
    /// Set at shutdown: no pool starts after it.
    closed: std::sync::atomic::AtomicBool,
    /// Worker threads of unloaded models, joined at shutdown.
    retired: Mutex<Vec<JoinHandle<()>>>,
    settings: Settings,
    events: Arc<Events>,
    hub: Option<Hub>,
    hub_config: crate::pull::HubConfig,
    default_model: String,
    memory_budget: u64,
    created: Instant,
    /// Other tools' model folders, served in place.
    library: crate::library::Folders,
}

impl Pools {
    pub fn new(config: &DaemonConfig, events: Arc<Events>) -> Self {
        let hub = match Hub::new(config.hub.clone()) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("Hugging Face cache unavailable ({e}); only file paths resolve");
                None
            }
        };
        Self {
            map: Arc::default(),
            breakers: Arc::default(),
            closed: Default::default(),
            retired: Mutex::default(),
            settings: Settings {
                hooks: config.hooks.clone(),
                memory_budget: config.memory_budget_bytes,
                prefill_chunk: config.prefill_chunk.max(1),
                batch: config.batch.max(1),
                fixed_step: config.decode_step.fixed_on(&config.device),
                breaker_failures: config.breaker_failures,
                breaker_cooldown: config.breaker_cooldown,
                stuck_timeout: config.stuck_timeout,
                prewarm: config.prewarm.max(1),
                limits: scaler::Limits {
                    min: config.min_workers,
                    max: config.max_workers.max(1),
                    idle_period: config.idle_period,
                },
                max_queue: config.max_queue.max(1),
                keep_alive: config.keep_alive,
                conversation_caches: config.conversation_caches,
                load: LoadOptions {
                    context: config.context,
                    device: config.device.clone(),
                    turns: config.gpu_turns.clone(),
                    ..LoadOptions::default()
                },
            },
            events,
            hub,
            hub_config: config.hub.clone(),
            default_model: config.default_model.clone(),
            memory_budget: config.memory_budget_bytes,
            created: Instant::now(),
            library: config.library.clone(),
        }
    }

    /// A reference (or the default) to a local file. The daemon never
    /// downloads: Hub references must be in the cache (`paraphym pull`).
    pub fn resolve(&self, model: Option<&str>) -> Result<(String, PathBuf), WireError> {
        let reference = model
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .unwrap_or(&self.default_model);
        if let Some(found) = self.library.resolve(reference) {
            let path = found.map_err(unknown)?;
            return Ok((reference.to_owned(), path));
        }
        let path = match registry::parse(reference, |p| p.is_file()) {
            Ok(registry::Model::Path(p)) => p,
            Ok(registry::Model::Hub(f)) => match self.hub.as_ref().and_then(|h| h.cached(&f)) {
                Some(p) => p,
                None => {
                    return Err(unknown(format!(
                        "model {reference} is not downloaded; run `paraphym pull {reference}`"
                    )))
                }
            },
            Err(e) => return Err(unknown(e.to_string())),
        };
        let path = path.canonicalize().unwrap_or(path);
        Ok((reference.to_owned(), path))
    }

    /// The pool of `path`, started (loading) if there is none; a new one
    /// serves at least `context` positions.
    pub(crate) fn get_or_start(
        &self,
        reference: &str,
        path: &Path,
        context: Option<usize>,
    ) -> Result<Arc<Pool>, WireError> {
        let mut map = lock(&self.map);
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(WireError {
                kind: ErrorKind::ShuttingDown,
                message: "the daemon is shutting down".into(),
            });
        }
        if let Some(p) = map.get(path) {
            return Ok(p.clone());
        }
        let default = self
            .settings
            .load
            .context
            .unwrap_or(crate::engine::DEFAULT_CONTEXT);
        let (cost, served, prewarm) =
            self.make_room(&mut map, reference, path, default.max(context.unwrap_or(0)))?;
        let (tx, rx) = flume::bounded(self.settings.max_queue);
        let pool = Arc::new(Pool {
            reference: reference.to_owned(),
            path: path.to_owned(),
            architecture: Mutex::new(String::new()),
            size_bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
            tx: Mutex::new(Some(tx)),
            rx,
            workers: Mutex::default(),
            handles: Mutex::default(),
            load: Mutex::new(LoadState::Loading {
                waiters: Vec::new(),
            }),
            loaded: Condvar::new(),
            next_worker: AtomicU32::new(0),
            keep_alive: Mutex::new(self.settings.keep_alive),
            last_used: Mutex::new(Instant::now()),
            settings: self.settings.clone(),
            events: self.events.clone(),
            map: Arc::downgrade(&self.map),
            breakers: self.breakers.clone(),
            waiting: Mutex::default(),
            next_seq: AtomicU64::new(1),
            load_percent: AtomicU8::new(0),
            parked: Mutex::default(),
            cost: Mutex::new(cost),
            context: AtomicUsize::new(served),
            created: self.created,
            extra: AtomicUsize::new(0),
            room: Mutex::new(0),
            room_changed: Condvar::new(),
            rates: Mutex::new(rates::Rates::default()),
            held: AtomicBool::new(false),
            scaling: Mutex::new(()),
        });
        tracing::info!(model = reference, path = %path.display(), prewarm, "loading");
        if !pool.spawn_worker(true) {
            return Err(failed(reference, "no worker could be started"));
        }
        for _ in 1..prewarm {
            pool.spawn_worker(false);
        }
        map.insert(path.to_owned(), pool.clone());
        Ok(pool)
    }

    /// Ask the model's breaker; `Ok(true)` for the half-open trial.
    fn admit(&self, reference: &str, path: &Path) -> Result<bool, WireError> {
        let mut breakers = lock(&self.breakers);
        let Some(b) = breakers.get_mut(path) else {
            return Ok(false);
        };
        match b.admit(Instant::now()) {
            breaker::Admission::Allow => Ok(false),
            breaker::Admission::Trial => {
                tracing::info!(model = reference, "breaker half-open: trial request");
                Ok(true)
            }
            breaker::Admission::Reject { retry_in } => Err(WireError {
                kind: ErrorKind::ModelFailed,
                message: format!(
                    "{reference} failed {} times in a row (last: {}); requests fail fast for {} s more",
                    b.consecutive_failures(),
                    b.last_error().unwrap_or("unknown"),
                    retry_in.as_secs_f64().ceil() as u64
                ),
            }),
        }
    }

    /// The governor's estimate for `path` served with `context` positions,
    /// and the positions it would serve (capped at its trained context).
    fn estimate(&self, path: &Path, context: usize) -> (Cost, usize) {
        crate::engine::memory_estimate(
            path,
            Some(context),
            self.settings.prefill_chunk,
            &self.settings.load.device,
        )
        .map(|e| {
            let cost = Cost {
                weights: e.weights,
                per_worker: e.per_worker,
            };
            (cost, e.context)
        })
        // An unreadable file fails its load with the reason; count its size.
        .unwrap_or((
            Cost {
                weights: std::fs::metadata(path).map_or(0, |m| m.len()),
                per_worker: 0,
            },
            context,
        ))
    }

    /// The memory governor before a load with `context` positions: the
    /// model's estimated cost, the positions it will serve and how many
    /// workers to pre-warm, after unloading idle models (least recently used
    /// first) if that makes room; an error if nothing does.
    fn make_room(
        &self,
        map: &mut HashMap<PathBuf, Arc<Pool>>,
        reference: &str,
        path: &Path,
        context: usize,
    ) -> Result<(Cost, usize, usize), WireError> {
        let (cost, served) = self.estimate(path, context);
        let mut prewarm = self
            .settings
            .prewarm
            .clamp(1, self.settings.limits.max.max(1));
        let budget = self.memory_budget;
        if budget == 0 {
            return Ok((cost, served, prewarm));
        }
        let resident: Vec<Resident<PathBuf>> = map.values().map(|p| p.resident()).collect();
        let mut plan = governor::plan_load(budget, &resident, cost, prewarm);
        if !matches!(plan, Plan::Fits) && prewarm > 1 {
            // Pre-warm fewer rather than unload anyone (or fail).
            let one = governor::plan_load(budget, &resident, cost, 1);
            if !matches!(one, Plan::TooBig { .. } | Plan::NoRoom { .. }) {
                prewarm = 1;
                plan = one;
            }
        }
        self.carry_out(map, plan, reference, "")?;
        Ok((cost, served, prewarm))
    }

    /// Do what the governor planned for `reference` (drop caches, unload
    /// idle models), or say why there is no room; `what` qualifies its need
    /// (" with 32768 positions").
    fn carry_out(
        &self,
        map: &mut HashMap<PathBuf, Arc<Pool>>,
        plan: Plan<PathBuf>,
        reference: &str,
        what: &str,
    ) -> Result<(), WireError> {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        match plan {
            Plan::Fits => Ok(()),
            Plan::Free(free) => {
                drop_caches(map, &free.caches, &format!("to load {reference}"));
                for k in free.models {
                    if let Some(victim) = map.remove(&k) {
                        let reason =
                            format!("unloaded to make room for {reference} (memory budget)");
                        tracing::info!(model = victim.reference, "{reason}");
                        self.events.publish(Event::ModelUnloaded {
                            model: victim.reference.clone(),
                            reason,
                        });
                        let handles = victim.close();
                        lock(&self.retired).extend(handles);
                    }
                }
                Ok(())
            }
            Plan::TooBig { need, budget } => Err(WireError {
                kind: ErrorKind::OutOfMemory,
                message: format!(
                    "{reference}{what} needs about {:.2} GiB and the memory budget is {:.2} GiB; \
                     raise it (paraphymd --memory-budget) or use a smaller model or context",
                    gib(need),
                    gib(budget)
                ),
            }),
            Plan::NoRoom { need, free } => Err(WireError {
                kind: ErrorKind::OutOfMemory,
                message: format!(
                    "{reference}{what} needs about {:.2} GiB{}; {:.2} GiB of the budget is free \
                     and the other models are busy; try again when they are idle",
                    gib(need),
                    // A loaded model's growth needs its increase only.
                    if what.is_empty() { "" } else { " more" },
                    gib(free)
                ),
            }),
        }
    }

    /// Serve `context` positions on `pool` from now on, if it serves fewer
    /// and the model was trained for more: the governor counts every worker's
    /// longer KV reservation first (dropping caches or unloading idle models
    /// as for a load); an error if the budget has no room. The workers' RoPE
    /// tables grow when they next take a job (`Pool::proto`); nothing is
    /// reloaded and conversation caches stay valid.
    fn grow(&self, pool: &Arc<Pool>, context: usize) -> Result<(), WireError> {
        if pool.context.load(Ordering::Acquire) >= context {
            return Ok(());
        }
        let mut map = lock(&self.map);
        let now = pool.context.load(Ordering::Acquire);
        let (cost, served) = self.estimate(&pool.path, context);
        if served <= now {
            // The model was trained for no more than it serves.
            return Ok(());
        }
        if self.memory_budget > 0 {
            let resident: Vec<Resident<PathBuf>> = map.values().map(|p| p.resident()).collect();
            let plan = governor::plan_grow(self.memory_budget, &resident, &pool.path, cost);
            let what = format!(" with {served} positions");
            self.carry_out(&mut map, plan, &pool.reference, &what)?;
        }
        *lock(&pool.cost) = cost;
        pool.context.store(served, Ordering::Release);
        tracing::info!(
            model = pool.reference,
            from = now,
            to = served,
            "a request asked for a longer context"
        );
        Ok(())
    }

    /// Forget `pool` if it is still the one registered for its path.
    fn forget(&self, pool: &Arc<Pool>) {
        forget(&self.map, pool);
    }

    /// Queue a generation on its model's pool, loading the model if needed;
    /// a refusal is answered on the job's reply.
    pub fn submit(&self, model: Option<&str>, keep_alive_ms: Option<u64>, job: Job) {
        if let Err((job, e)) = self.try_submit(model, keep_alive_ms, job) {
            if job.trial {
                // Granted the trial but never ran: let the next request try.
                if let Ok((_, path)) = self.resolve(model) {
                    record(
                        &self.breakers,
                        &self.events,
                        &path,
                        &self.settings,
                        Outcome::Neutral,
                    );
                }
            }
            if job.control.claim() {
                job.reply.finish();
                job.reply.post(Response::Error(e));
            }
        }
    }

    #[allow(clippy::result_large_err)] // the job goes back to its caller
    fn try_submit(
        &self,
        model: Option<&str>,
        keep_alive_ms: Option<u64>,
        job: Job,
    ) -> Result<(), (Job, WireError)> {
        let (reference, path) = match self.resolve(model) {
            Ok(r) => r,
            Err(e) => return Err((job, e)),
        };
        let mut job = job;
        match self.admit(&reference, &path) {
            Ok(trial) => job.trial = trial,
            Err(e) => return Err((job, e)),
        }
        let context = job.request.params.context;
        // Twice: the pool may be closing (idle eviction) as we submit.
        for _ in 0..2 {
            let pool = match self.get_or_start(&reference, &path, context) {
                Ok(p) => p,
                Err(e) => return Err((job, e)),
            };
            if let Some(c) = context {
                if let Err(e) = self.grow(&pool, c) {
                    return Err((job, e));
                }
            }
            pool.touch(keep_alive_ms.map(keep_alive));
            // Under the queue's lock: a failing load closes the queue under
            // it too, so a job is either refused here or drained there.
            let tx_guard = lock(&pool.tx);
            if let LoadState::Failed(m) = &*lock(&pool.load) {
                return Err((job, failed(&reference, m)));
            }
            let Some(tx) = tx_guard.as_ref() else {
                drop(tx_guard);
                self.forget(&pool);
                continue;
            };
            // In the waiting list before the queue, so a worker that takes
            // it at once finds it there to remove.
            job.seq = pool.next_seq.fetch_add(1, Ordering::Relaxed);
            let (seq, reply) = (job.seq, job.reply.clone());
            lock(&pool.waiting).push_back((seq, reply.clone()));
            let unlist = |pool: &Pool| lock(&pool.waiting).retain(|(s, _)| *s != seq);
            match tx.try_send(job) {
                Ok(()) => {
                    drop(tx_guard);
                    let position = lock(&pool.waiting).iter().position(|(s, _)| *s == seq);
                    if let Some(p) = position {
                        reply.post(Response::Stage(Stage::Queued {
                            position: p as u32 + 1,
                        }));
                        if !pool.is_ready() {
                            let percent = pool.load_percent.load(Ordering::Relaxed);
                            reply.post(Response::Stage(Stage::Loading { percent }));
                        }
                    }
                    pool.rebalance();
                    return Ok(());
                }
                Err(flume::TrySendError::Full(j)) => {
                    unlist(&pool);
                    return Err((
                        j,
                        WireError {
                            kind: ErrorKind::Busy,
                            message: format!(
                                "{reference} has {} requests waiting; try again later",
                                self.settings.max_queue
                            ),
                        },
                    ));
                }
                Err(flume::TrySendError::Disconnected(j)) => {
                    unlist(&pool);
                    job = j;
                    drop(tx_guard);
                    self.forget(&pool);
                }
            }
        }
        Err((
            job,
            WireError {
                kind: ErrorKind::Busy,
                message: format!("{reference} is being unloaded; try again"),
            },
        ))
    }

    /// `Load`: answered with `Loaded` once a worker is ready; served with at
    /// least `context` positions.
    pub fn load(
        &self,
        model: &str,
        keep_alive_ms: Option<u64>,
        context: Option<usize>,
        reply: Reply,
    ) {
        let (reference, path) = match self.resolve(Some(model)) {
            Ok(r) => r,
            Err(e) => {
                reply.send(Response::Error(e));
                return;
            }
        };
        let loaded = lock(&self.map).get(&path).is_some_and(|p| p.is_ready());
        if !loaded {
            if let Err(e) = self.admit(&reference, &path) {
                reply.post(Response::Error(e));
                return;
            }
        }
        let pool = match self
            .get_or_start(&reference, &path, context)
            .and_then(|p| match context {
                Some(c) => self.grow(&p, c).map(|()| p),
                None => Ok(p),
            }) {
            Ok(p) => p,
            Err(e) => {
                reply.post(Response::Error(e));
                return;
            }
        };
        pool.touch(keep_alive_ms.map(keep_alive));
        // Never send while holding the lock.
        let answer = {
            let mut state = lock(&pool.load);
            match &mut *state {
                LoadState::Loading { waiters } => {
                    waiters.push(reply.clone());
                    None
                }
                LoadState::Ready(_) => Some(Response::Loaded { model: reference }),
                LoadState::Failed(m) => Some(Response::Error(failed(&reference, m))),
            }
        };
        if let Some(a) = answer {
            reply.post(a);
        }
    }

    /// `Unload`: the model's queue is finished, its workers exit, then
    /// `Unloaded` is sent.
    pub fn unload(&self, model: &str, reply: Reply) {
        let path = self.resolve(Some(model)).ok().map(|(_, p)| p);
        let found = {
            let mut map = lock(&self.map);
            // By its file, else by the reference it was loaded under (the
            // file may be gone).
            let key = path.filter(|p| map.contains_key(p)).or_else(|| {
                map.iter()
                    .find(|(_, p)| p.reference == model)
                    .map(|(k, _)| k.clone())
            });
            key.and_then(|k| map.remove(&k))
        };
        let Some(pool) = found else {
            reply.error(ErrorKind::UnknownModel, format!("{model} is not loaded"));
            return;
        };
        let handles = pool.close();
        let reference = pool.reference.clone();
        let spawned = std::thread::Builder::new()
            .name("unload".into())
            .spawn(move || {
                for h in handles {
                    let _ = h.join();
                }
                tracing::info!(model = reference, "unloaded");
                reply.send(Response::Unloaded { model: reference });
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start an unload thread: {e}");
        }
    }

    /// `Pull`: download into the Hub cache on a thread of its own (network
    /// I/O, never a worker), streaming `Progress`, then `Pulled`.
    pub fn pull(&self, model: &str, reply: Reply) {
        let parsed = match registry::parse(model, |p| p.is_file()) {
            Ok(m) => m,
            Err(e) => {
                reply.error(ErrorKind::UnknownModel, e.to_string());
                return;
            }
        };
        let hub = match &parsed {
            registry::Model::Path(p) => {
                reply.send(Response::Pulled {
                    model: model.to_owned(),
                    path: p.display().to_string(),
                });
                return;
            }
            registry::Model::Hub(_) => match Hub::new(self.hub_config.clone()) {
                Ok(h) => h,
                Err(e) => {
                    reply.send(Response::Error(pull_error(&e)));
                    return;
                }
            },
        };
        let model = model.to_owned();
        let spawned = std::thread::Builder::new()
            .name("pull".into())
            .spawn(move || {
                let progress = WireProgress {
                    reply: reply.clone(),
                    total: 0,
                    done: 0,
                    last: None,
                };
                match crate::pull::locate(&parsed, &hub, progress) {
                    Ok(path) => {
                        tracing::info!(model, path = %path.display(), "pulled");
                        reply.send(Response::Pulled {
                            model,
                            path: path.display().to_string(),
                        });
                    }
                    Err(e) => {
                        tracing::warn!(model, "pull failed: {e}");
                        reply.send(Response::Error(pull_error(&e)));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start a pull thread: {e}");
        }
    }

    pub fn status(&self) -> StatusReport {
        let mut models: Vec<ModelStatus> = lock(&self.map).values().map(|p| p.status()).collect();
        models.sort_by(|a, b| a.reference.cmp(&b.reference));
        let now = Instant::now();
        let mut faults: Vec<paraphym_protocol::message::ModelFault> = lock(&self.breakers)
            .iter()
            .filter(|(_, b)| b.state(now) != breaker::State::Closed)
            .map(|(path, b)| paraphym_protocol::message::ModelFault {
                model: path.display().to_string(),
                breaker: wire_breaker(b.state(now)),
                consecutive_failures: b.consecutive_failures(),
                last_error: b.last_error().unwrap_or_default().to_owned(),
                retry_in_ms: match b.admit_preview(now) {
                    Some(d) => d.as_millis() as u64,
                    None => 0,
                },
            })
            .collect();
        faults.sort_by(|a, b| a.model.cmp(&b.model));
        StatusReport {
            memory_estimated_bytes: models.iter().map(|m| m.memory_bytes).sum(),
            models,
            memory_used_bytes: config::resident_bytes(),
            memory_budget_bytes: self.memory_budget,
            faults,
        }
    }

    /// Loaded models, then the aliases whose files are in the local cache.
    pub fn list_models(&self) -> Vec<ModelInfo> {
        let mut out: Vec<ModelInfo> = lock(&self.map).values().map(|p| p.info()).collect();
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        if let Some(hub) = &self.hub {
            for a in registry::ALIASES {
                let f = registry::HubFile {
                    repo: a.repo.to_owned(),
                    file: a.file.to_owned(),
                    revision: "main".to_owned(),
                };
                let Some(path) = hub.cached(&f) else { continue };
                let path = path.canonicalize().unwrap_or(path);
                let shown = path.display().to_string();
                if out.iter().any(|m| m.path == shown) {
                    continue;
                }
                out.push(ModelInfo {
                    reference: a.name.to_owned(),
                    architecture: crate::engine::gguf::GgufFile::open(&path)
                        .ok()
                        .and_then(|g| g.architecture().ok().map(str::to_owned))
                        .unwrap_or_default(),
                    size_bytes: std::fs::metadata(&path).map_or(0, |m| m.len()),
                    path: shown,
                    loaded: false,
                });
            }
        }
        for f in self.library.scan() {
            let shown = f.path.display().to_string();
            if out
                .iter()
                .any(|m| m.path == shown || m.reference == f.reference)
            {
                continue;
            }
            out.push(ModelInfo {
                reference: f.reference,
                architecture: crate::engine::gguf::GgufFile::open(&f.path)
                    .ok()
                    .and_then(|g| g.architecture().ok().map(str::to_owned))
                    .unwrap_or_default(),
                size_bytes: std::fs::metadata(&f.path).map_or(0, |m| m.len()),
                path: shown,
                loaded: false,
            });
        }
        out
    }

    /// `Show`: what a model is, from its file's metadata.
    pub fn show(&self, model: &str) -> Result<paraphym_protocol::message::ModelDetails, WireError> {
        let (reference, path) = self.resolve(Some(model))?;
        let facts = crate::engine::file_facts(&path).map_err(|e| WireError {
            kind: ErrorKind::ModelFailed,
            message: format!("{reference}: {e}"),
        })?;
        // As loaded, else as a load now would serve it.
        let loaded = lock(&self.map)
            .get(&path)
            .map(|p| p.context.load(Ordering::Acquire));
        let default = self
            .settings
            .load
            .context
            .unwrap_or(crate::engine::DEFAULT_CONTEXT);
        let (cost, served) = self.estimate(&path, loaded.unwrap_or(default));
        Ok(paraphym_protocol::message::ModelDetails {
            reference,
            loaded: loaded.is_some(),
            path: path.display().to_string(),
            size_bytes: std::fs::metadata(&path).map_or(0, |m| m.len()),
            context: served as u64,
            memory_bytes: cost.with_workers(1),
            architecture: facts.architecture,
            quantization: facts.quantization,
            parameters: facts.parameters,
            context_length: facts.context_length,
            chat_template: facts.chat_template,
            template_origin: facts.template_origin,
        })
    }

    /// `Remove`: delete a download from the Hub cache, unloading it first.
    /// Files the daemon did not download (paths, Ollama's and LM Studio's
    /// folders) are refused.
    pub fn remove(&self, model: &str, reply: Reply) {
        let not_ours = |what: &str| {
            let _ = reply.error(
                ErrorKind::BadRequest,
                format!("{model} is {what}: paraphym only removes what it downloaded (delete the file yourself)"),
            );
        };
        if self.library.resolve(model).is_some() {
            return not_ours("in another tool's folder");
        }
        let file = match registry::parse(model, |p| p.is_file()) {
            Ok(registry::Model::Hub(f)) => f,
            Ok(registry::Model::Path(_)) => return not_ours("a file path"),
            Err(e) => {
                reply.error(ErrorKind::UnknownModel, e.to_string());
                return;
            }
        };
        let Some(link) = self.hub.as_ref().and_then(|h| h.cached(&file)) else {
            reply.error(
                ErrorKind::UnknownModel,
                format!("{model} is not downloaded"),
            );
            return;
        };
        let blob = link.canonicalize().unwrap_or_else(|_| link.clone());
        // Unload it first: its workers read the file.
        if let Some(pool) = lock(&self.map).remove(&blob) {
            let handles = pool.close();
            lock(&self.retired).extend(handles);
            self.events.publish(Event::ModelUnloaded {
                model: pool.reference.clone(),
                reason: "removed".into(),
            });
        }
        let removed = std::fs::remove_file(&link).and_then(|()| {
            if blob != link {
                std::fs::remove_file(&blob)
            } else {
                Ok(())
            }
        });
        match removed {
            Ok(()) => {
                tracing::info!(model, path = %blob.display(), "removed");
                reply.send(Response::Removed {
                    model: model.to_owned(),
                    path: blob.display().to_string(),
                });
            }
            Err(e) => {
                reply.error(
                    ErrorKind::Internal,
                    format!("removing {}: {e}", blob.display()),
                );
            }
        }
    }

    /// Each loaded model's health, and failing models that are not loaded:
    /// ok means no unhealthy worker and a closed breaker.
    pub fn health(&self) -> Vec<paraphym_protocol::message::ModelHealth> {
        use paraphym_protocol::message::{BreakerState, ModelHealth};
        let now = Instant::now();
        let pools: Vec<Arc<Pool>> = lock(&self.map).values().cloned().collect();
        let breakers: Vec<(PathBuf, breaker::State, String)> = lock(&self.breakers)
            .iter()
            .map(|(p, b)| {
                (
                    p.clone(),
                    b.state(now),
                    b.last_error().unwrap_or("").to_owned(),
                )
            })
            .collect();
        let breaker_of = |path: &Path| {
            breakers
                .iter()
                .find(|(p, _, _)| p == path)
                .map_or((BreakerState::Closed, String::new()), |(_, s, e)| {
                    (wire_breaker(*s), e.clone())
                })
        };
        let mut out: Vec<ModelHealth> = pools
            .iter()
            .map(|p| {
                let states: Vec<WorkerState> = lock(&p.workers).iter().map(|w| w.state()).collect();
                let mut workers: Vec<(WorkerState, u32)> = Vec::new();
                for s in states {
                    match workers.iter_mut().find(|(k, _)| *k == s) {
                        Some((_, n)) => *n += 1,
                        None => workers.push((s, 1)),
                    }
                }
                let (breaker, last) = breaker_of(&p.path);
                let stuck = workers
                    .iter()
                    .find(|(s, _)| *s == WorkerState::Unhealthy)
                    .map(|(_, n)| *n);
                let problem = match (breaker, stuck) {
                    (BreakerState::Closed, None) => String::new(),
                    (BreakerState::Closed, Some(n)) => {
                        format!("{n} worker(s) stuck or failed, replaced")
                    }
                    (_, _) => format!("circuit breaker {breaker:?}: {last}"),
                };
                ModelHealth {
                    model: p.reference.clone(),
                    ok: problem.is_empty(),
                    breaker,
                    workers,
                    problem,
                }
            })
            .collect();
        for (path, state, last) in &breakers {
            if *state != breaker::State::Closed && !pools.iter().any(|p| &p.path == path) {
                out.push(ModelHealth {
                    model: path.display().to_string(),
                    ok: false,
                    breaker: wire_breaker(*state),
                    workers: Vec::new(),
                    problem: format!("circuit breaker {:?}: {last}", wire_breaker(*state)),
                });
            }
        }
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }

    /// The periodic metrics sample: per worker and model tokens/s since the
    /// last sample (`secs` ago), queues, breakers, memory.
    fn metrics(&self, at_ms: u64, secs: f64) -> paraphym_protocol::message::Metrics {
        use paraphym_protocol::message::{ModelMetrics, WorkerMetrics};
        let now = Instant::now();
        let pools: Vec<Arc<Pool>> = lock(&self.map).values().cloned().collect();
        let breakers = lock(&self.breakers);
        let mut models: Vec<ModelMetrics> = pools
            .iter()
            .map(|p| {
                let workers: Vec<WorkerMetrics> = lock(&p.workers)
                    .iter()
                    .map(|w| {
                        let total = w.tokens.load(Ordering::Relaxed);
                        let before = w.sampled.swap(total, Ordering::Relaxed);
                        // One lock, released before anything else is taken.
                        let (id, state, sequences, batch) = {
                            let s = lock(&w.snapshot);
                            (s.id, s.state, s.sequences, s.batch)
                        };
                        WorkerMetrics {
                            id,
                            state,
                            tokens_per_s: (total - before) as f32 / secs.max(1e-3) as f32,
                            sequences,
                            batch,
                        }
                    })
                    .collect();
                ModelMetrics {
                    reference: p.reference.clone(),
                    queued: p.rx.len() as u32,
                    tokens_per_s: workers.iter().map(|w| w.tokens_per_s).sum(),
                    breaker: breakers
                        .get(&p.path)
                        .map_or(paraphym_protocol::message::BreakerState::Closed, |b| {
                            wire_breaker(b.state(now))
                        }),
                    workers,
                }
            })
            .collect();
        drop(breakers);
        models.sort_by(|a, b| a.reference.cmp(&b.reference));
        paraphym_protocol::message::Metrics {
            at_ms,
            memory_used_bytes: config::resident_bytes(),
            memory_estimated_bytes: pools.iter().map(|p| p.resident().total()).sum(),
            models,
        }
    }

    /// Supervise and scale every pool (housekeeping).
    /// Is any model running or queueing a request?
    fn busy(&self) -> bool {
        let pools: Vec<Arc<Pool>> = lock(&self.map).values().cloned().collect();
        pools.iter().any(|p| p.busy())
    }

    fn rebalance_all(&self) {
        let pools: Vec<Arc<Pool>> = lock(&self.map).values().cloned().collect();
        for p in pools {
            p.supervise();
            p.rebalance();
        }
    }

    /// Unload models idle past their keep-alive.
    fn evict_idle(&self) {
        let now = Instant::now();
        let idle: Vec<Arc<Pool>> = {
            let mut map = lock(&self.map);
            let keys: Vec<PathBuf> = map
                .iter()
                .filter(|(_, p)| {
                    let k = *lock(&p.keep_alive);
                    k != FOREVER
                        && p.is_ready()
                        && !p.busy()
                        && now.duration_since(*lock(&p.last_used)) >= k
                })
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        for pool in idle {
            tracing::info!(
                model = pool.reference,
                "idle past its keep-alive: unloading"
            );
            self.events.publish(Event::ModelUnloaded {
                model: pool.reference.clone(),
                reason: "idle past its keep-alive".into(),
            });
            let handles = pool.close();
            lock(&self.retired).extend(handles);
        }
        lock(&self.retired).retain(|h| !h.is_finished());
    }

    /// Close every pool, answer whoever waits on one with
    /// `Error(ShuttingDown)`, and wait for the workers until `deadline`.
    pub fn stop_all(&self, deadline: Instant) {
        let pools: Vec<Arc<Pool>> = {
            let mut map = lock(&self.map);
            self.closed
                .store(true, std::sync::atomic::Ordering::Release);
            map.drain().map(|(_, p)| p).collect()
        };
        let mut handles: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.retired));
        let bye = || {
            Response::Error(WireError {
                kind: ErrorKind::ShuttingDown,
                message: "the daemon is shutting down".into(),
            })
        };
        for p in &pools {
            handles.extend(p.close());
            let waiters = match &mut *lock(&p.load) {
                LoadState::Loading { waiters } => std::mem::take(waiters),
                _ => Vec::new(),
            };
            for w in waiters {
                w.post(bye());
            }
            // Queued jobs (workers still loading may never take them).
            while let Ok(job) = p.rx.try_recv() {
                if job.control.claim() {
                    job.reply.finish();
                    job.reply.post(bye());
                }
            }
            lock(&p.waiting).clear();
        }
        for h in handles {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

fn pull_error(e: &crate::pull::PullError) -> WireError {
    use crate::pull::PullError as P;
    let kind = match e {
        P::NeedsToken { .. } | P::Forbidden { .. } => ErrorKind::AccessDenied,
        P::NotFound { .. } => ErrorKind::UnknownModel,
        P::NotCached { .. } | P::Unreachable { .. } => ErrorKind::Offline,
        P::Corrupt { .. } | P::Other { .. } => ErrorKind::Internal,
    };
    WireError {
        kind,
        message: e.to_string(),
    }
}

/// Download progress as `Progress` frames, at most ten a second.
#[derive(Clone)]
struct WireProgress {
    reply: Reply,
    total: u64,
    done: u64,
    last: Option<Instant>,
}

impl crate::pull::Progress for WireProgress {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size as u64;
        self.reply.send(Response::Progress {
            done: self.done,
            total: self.total,
        });
    }

    fn update(&mut self, size: usize) {
        self.done += size as u64;
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(100))
        {
            self.last = Some(Instant::now());
            self.reply.send(Response::Progress {
                done: self.done,
                total: self.total,
            });
        }
    }

    fn finish(&mut self) {
        self.reply.send(Response::Progress {
            done: self.total.max(self.done),
            total: self.total,
        });
    }
}

fn wire_breaker(s: breaker::State) -> paraphym_protocol::message::BreakerState {
    use paraphym_protocol::message::BreakerState as W;
    match s {
        breaker::State::Closed => W::Closed,
        breaker::State::Open => W::Open,
        breaker::State::HalfOpen => W::HalfOpen,
    }
}

/// Feed an outcome to the breaker of `path`, publishing state changes.
fn record(
    breakers: &Breakers,
    events: &Events,
    path: &Path,
    settings: &Settings,
    outcome: Outcome,
) {
    let now = Instant::now();
    let change = {
        let mut all = lock(breakers);
        let b = all
            .entry(path.to_owned())
            .or_insert_with(|| Breaker::new(settings.breaker_failures, settings.breaker_cooldown));
        let before = b.state(now);
        let message = match &outcome {
            Outcome::Success => {
                b.success();
                String::new()
            }
            Outcome::Failure(m) => {
                b.failure(now, m);
                m.clone()
            }
            Outcome::Neutral => {
                b.release_trial();
                String::new()
            }
        };
        let after = b.state(now);
        if after == breaker::State::Closed && b.consecutive_failures() == 0 {
            all.remove(path);
        }
        // A failed trial re-opens an open breaker: report it as a change.
        let reopened = matches!(outcome, Outcome::Failure(_)) && before == breaker::State::HalfOpen;
        (before != after || reopened).then_some((after, message))
    };
    if let Some((state, message)) = change {
        tracing::warn!(model = %path.display(), ?state, message, "circuit breaker");
        events.publish(Event::Breaker {
            model: path.display().to_string(),
            state: wire_breaker(state),
            message,
        });
    }
}

/// A wire keep-alive: `u64::MAX` milliseconds means forever.
fn keep_alive(ms: u64) -> Duration {
    if ms == u64::MAX {
        FOREVER
    } else {
        Duration::from_millis(ms)
    }
}

fn failed(reference: &str, message: &str) -> WireError {
    WireError {
        kind: ErrorKind::ModelFailed,
        message: format!("{reference} failed to load: {message}"),
    }
}

struct Worker {
    pool: Arc<Pool>,
    cell: Arc<WorkerCell>,
    /// The model's first worker: loads the weights the others share.
    loader: bool,
}

/// How often an idle worker looks at its retire flag.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// Where a job's frames go, and what they wait for.
struct Sink {
    control: Arc<JobControl>,
    reply: Reply,
    last_token: Option<Instant>,
    /// Log-probabilities wait for the text frame their tokens complete.
    logprobs: Vec<TokenLogprob>,
    /// Test hook: hang at the first token.
    stall: bool,
}

/// A job's bookkeeping for its last frame.
struct Meta {
    /// When the daemon read the request, and when this worker took it.
    received: Instant,
    started: Instant,
    trial: bool,
    session: Option<String>,
    /// Chat messages left out to fit the context.
    dropped: usize,
}

/// A job in a worker's batch.
struct Running {
    sink: Sink,
    meta: Meta,
    engine: Engine,
    d: Decoding,
    /// What it runs in the next pass.
    feed: Feed,
    /// Its slot in the worker's fixed decoder (`UNSLOTTED` until a pass).
    slot: usize,
}

const UNSLOTTED: usize = usize::MAX;

/// How long an idle worker keeps a GPU decoder's slots and graphs.
const DECODER_GRACE: Duration = Duration::from_secs(30);

/// How a job ended.
enum End {
    Done(crate::engine::Generation),
    Error(WireError),
    /// A panic went through its engine (what it said).
    Crash(String),
}

impl Worker {
    fn publish(&self) {
        let snap = lock(&self.cell.snapshot).clone();
        self.pool.events.publish(Event::Worker {
            model: self.pool.reference.clone(),
            worker: snap,
        });
    }

    fn set_state(&self, state: WorkerState) {
        lock(&self.cell.snapshot).state = state;
        *lock(&self.cell.since) = Instant::now();
        self.publish();
    }

    fn retiring(&self) -> bool {
        self.cell.retire.load(Ordering::Relaxed)
    }

    fn main(self) {
        let engine = if self.loader {
            self.load()
        } else {
            self.replicate()
        };
        if let Some(engine) = engine {
            self.pool.park(engine, None, false);
            if !self.loader {
                self.set_state(WorkerState::Idle);
            }
            let served = std::panic::catch_unwind(AssertUnwindSafe(|| self.serve()));
            if let Err(panic) = served {
                // Past the per-job guards: its batch is lost.
                let what = panic_text(&*panic).to_owned();
                self.pool.abandon(
                    &self.cell,
                    CancelReason::Stuck,
                    &format!("the worker failed ({what}); it was replaced"),
                );
                let lost = lock(&self.cell.snapshot).sequences as usize;
                {
                    let mut parked = lock(&self.pool.parked);
                    parked.out = parked.out.saturating_sub(lost);
                }
                self.pool
                    .record(Outcome::Failure(format!("a worker panicked: {what}")));
                self.replace();
            }
            self.pool.withdraw_offer(&self.cell);
            self.pool.release_reserved(&self.cell, 0);
            self.set_state(WorkerState::Stopping);
        }
        self.set_state(WorkerState::Stopped);
        lock(&self.pool.workers).retain(|w| !Arc::ptr_eq(w, &self.cell));
        // One worker fewer: one engine fewer may stay parked.
        self.pool.trim();
    }

    /// Take jobs and run them together, up to the batch size, one batched
    /// pass at a time: each pass decodes a token of every generation whose
    /// prompt is in and prefills the next chunk of newcomers' prompts.
    /// Between passes the worker takes what the queue holds, while its
    /// batch and the memory budget have room. It returns when the queue is
    /// closed or it is retired, once its batch is done.
    fn serve(&self) {
        let mut batch: Vec<Running> = Vec::new();
        // The fixed-shape decoder (its buffers and graphs), when the pool
        // decodes that way: made at the first pass, grown with the batch.
        let mut fixed: Option<StaticDecoder> = None;
        // The budget refused a sequence at this batch size: wait until one
        // leaves before asking again.
        let mut refused_at = usize::MAX;
        let mut open = true;
        // Since when the batch has been empty.
        let mut idle_since: Option<Instant> = None;
        loop {
            let most = self.most(refused_at);
            if batch.is_empty() {
                if !open || self.retiring() {
                    break;
                }
                match self.wait_for_job() {
                    Ok(Some(job)) => {
                        // Progress first: the supervisor must not judge the
                        // idle time before this job.
                        *lock(&self.cell.progress) = Instant::now();
                        self.set_state(WorkerState::Busy);
                        batch.extend(self.admit(job));
                        if batch.is_empty() && !self.retiring() {
                            self.set_state(WorkerState::Idle);
                        }
                    }
                    Ok(None) => {}
                    Err(()) => open = false,
                }
            } else {
                while open && !self.retiring() && batch.len() < most && !self.pool.rx.is_empty() {
                    if self.cell.reserved.load(Ordering::Acquire) < batch.len() {
                        if !self.pool.may_add_worker() {
                            refused_at = batch.len();
                            break;
                        }
                        self.pool.extra.fetch_add(1, Ordering::AcqRel);
                        self.cell.reserved.fetch_add(1, Ordering::AcqRel);
                    }
                    match self.pool.rx.try_recv() {
                        Ok(job) => batch.extend(self.admit(job)),
                        Err(flume::TryRecvError::Empty) => break,
                        Err(flume::TryRecvError::Disconnected) => open = false,
                    }
                }
            }
            if !batch.is_empty() {
                self.show_batch(batch.len(), most.min(refused_at));
                // A pass that only decodes is a measurement of this batch
                // size (prefill chunks would blur it).
                let decoding = batch
                    .iter()
                    .filter(|r| matches!(r.feed, Feed::Token(_)))
                    .count();
                let prompts = batch.len() - decoding;
                let busy = self.pool.busy_workers();
                let started = Instant::now();
                let device = (self.pool.settings.hooks.pass_ms_per_row)
                    .map(|ms| (ms, crate::hooks::shared_device(), Instant::now()));
                self.pass(&mut batch, &mut fixed);
                if let Some((ms, _, locked)) = &device {
                    let rows = decoding * decoding * self.pool.busy_workers().max(1);
                    let want = Duration::from_millis(ms * rows as u64);
                    std::thread::sleep(want.saturating_sub(locked.elapsed()));
                }
                drop(device);
                let took = started.elapsed();
                tracing::trace!(rows = decoding, prompts, busy, ?took, "pass");
                // The pool's throughput in this state (`rates`): a pass
                // that prefilled, or that saw the busy count change, ends
                // the stretch measured; so does a batch that empties (it
                // waits for work).
                if !self.pool.settings.hooks.unmeasured {
                    let held = self.pool.busy_workers() == busy;
                    let rows = if prompts == 0 && held { decoding } else { 0 };
                    let mut rates = lock(&self.pool.rates);
                    let now = Instant::now();
                    rates.pass_ended(rows, busy, now);
                    if batch.is_empty() {
                        rates.break_off(now);
                    }
                }
                if batch.is_empty() {
                    self.pool.touch(None);
                    // The batch's KV buffers went back to this thread's
                    // arena: worth a trim once everyone is idle.
                    RELEASED.store(true, Ordering::Relaxed);
                    // Its batch is empty before it says Idle: one event.
                    lock(&self.cell.snapshot).sequences = 0;
                    if !self.retiring() {
                        self.set_state(WorkerState::Idle);
                    }
                }
            }
            let idle = if batch.is_empty() {
                idle_since.get_or_insert_with(Instant::now).elapsed()
            } else {
                idle_since = None;
                Duration::ZERO
            };
            // Idle, a worker keeps one slot: what its own KV covers. A GPU
            // decoder's graphs (a capture per batch size, milliseconds
            // each) outlive a short pause, its slots still reserved: the
            // next burst replays them.
            let keep = |f: &StaticDecoder| {
                f.uses_graphs() && idle < DECODER_GRACE && open && !self.retiring()
            };
            if batch.is_empty() && fixed.as_ref().is_some_and(|f| f.slots() > 1 && !keep(f)) {
                fixed = None;
            }
            // Sequences that left give back their reservations; a fixed
            // decoder's slots hold their buffers (and reservations) until
            // the batch empties.
            let held = fixed
                .as_ref()
                .map_or(0, StaticDecoder::slots)
                .max(batch.len());
            self.pool
                .release_reserved(&self.cell, held.saturating_sub(1));
            if batch.len() < refused_at {
                refused_at = usize::MAX;
            }
            let most = self.most(refused_at);
            self.show_batch(batch.len(), most);
            let offer = if batch.is_empty() || !open || self.retiring() {
                0
            } else {
                most.saturating_sub(batch.len())
            };
            self.offer(offer);
        }
        self.offer(0);
    }

    /// The most sequences its batch takes now: `--batch`, unless the
    /// memory budget refused a sequence at a smaller size or the measured
    /// rates show the rows past a smaller size adding nothing
    /// ([`rates::Rates::batch_cap`]).
    fn most(&self, refused_at: usize) -> usize {
        let busy = self.pool.busy_workers();
        lock(&self.pool.rates)
            .batch_cap(busy, self.pool.settings.batch, Instant::now())
            .min(refused_at)
    }

    /// Its batch as the status and events show it (published on change).
    fn show_batch(&self, sequences: usize, most: usize) {
        {
            let mut snap = lock(&self.cell.snapshot);
            let now = (sequences as u32, most as u32);
            if (snap.sequences, snap.batch) == now {
                return;
            }
            (snap.sequences, snap.batch) = now;
        }
        self.publish();
    }

    /// Change this worker's share of the pool's free batch places (none
    /// once it has been given up on).
    fn offer(&self, now: usize) {
        let now = if self.retiring() { 0 } else { now };
        let mut room = lock(&self.pool.room);
        let before = self.cell.offered.swap(now, Ordering::AcqRel);
        if before == now {
            return;
        }
        *room = *room + now - before;
        drop(room);
        self.pool.room_changed.notify_all();
    }

    /// An idle worker's wait: jobs go to busy workers' batches while they
    /// have room; otherwise the next job in the queue. `Err` once the queue
    /// is closed.
    fn wait_for_job(&self) -> Result<Option<Job>, ()> {
        {
            let room = lock(&self.pool.room);
            let (room, _) = self
                .pool
                .room_changed
                .wait_timeout_while(room, IDLE_POLL, |r| *r > 0)
                .unwrap_or_else(|e| e.into_inner());
            if *room > 0 {
                return Ok(None);
            }
        }
        match self.pool.rx.recv_timeout(IDLE_POLL) {
            Ok(job) => Ok(Some(job)),
            Err(flume::RecvTimeoutError::Timeout) => Ok(None),
            Err(flume::RecvTimeoutError::Disconnected) => Err(()),
        }
    }

    /// The loader: read the weights, publish the prototype, answer `Load`s.
    fn load(&self) -> Option<Engine> {
        let pool = &self.pool;
        // A panic while loading must still answer everyone waiting.
        let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let opts = LoadOptions {
                context: Some(pool.context.load(Ordering::Acquire)),
                ..pool.settings.load.clone()
            };
            Engine::load_with_progress(&pool.path, &opts, &mut |f| pool.loading(f))
                .map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|p| Err(format!("the loader panicked: {}", panic_text(&*p))));
        let engine = match loaded {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(model = pool.reference, "load failed: {e}");
                self.set_state(WorkerState::Failed);
                pool.fail(&e);
                return None;
            }
        };
        let mut engine = engine;
        if pool.settings.fixed_step && pool.settings.load.device.is_cpu() {
            // The fixed step takes tensor KV caches over; replicas keep the kind.
            engine.model_mut().use_tensor_attention();
        }
        *lock(&pool.architecture) = engine.model().architecture().to_owned();
        let waiters = {
            let mut state = lock(&pool.load);
            let w = match &mut *state {
                LoadState::Loading { waiters } => std::mem::take(waiters),
                _ => Vec::new(),
            };
            *state = LoadState::Ready(Arc::new(engine.replica()));
            pool.loaded.notify_all();
            w
        };
        // Idle before anyone hears "loaded", so a `Status` right after agrees.
        self.set_state(WorkerState::Idle);
        for w in waiters {
            w.post(Response::Loaded {
                model: pool.reference.clone(),
            });
        }
        Some(engine)
    }

    /// A later worker: wait for the loader, then share its weights.
    fn replicate(&self) -> Option<Engine> {
        let pool = &self.pool;
        let mut state = lock(&pool.load);
        loop {
            match &*state {
                LoadState::Ready(proto) => {
                    let engine = proto.replica();
                    drop(state);
                    if let Some(d) = pool.settings.hooks.replica_delay {
                        std::thread::sleep(d);
                    }
                    return Some(engine);
                }
                LoadState::Failed(_) => return None,
                LoadState::Loading { .. } => {
                    state = pool.loaded.wait(state).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Start a job: its tokens, an engine (the one holding its
    /// conversation, if free) and its generation, prefilled by the passes
    /// to come. `None` when it ended here (cancelled while queued, an
    /// error, a panic), answered.
    fn admit(&self, job: Job) -> Option<Running> {
        let Job {
            mut request,
            control,
            reply,
            received,
            trial,
            seq,
        } = job;
        self.pool.dequeued(seq);
        request.params.prefill_chunk = self.pool.settings.prefill_chunk;
        if !control.claim() {
            // Answered already (cancelled while queued).
            if trial {
                self.pool.record(Outcome::Neutral);
            }
            return None;
        }
        if control.is_cancelled() {
            // Cancelled while queued (a disconnect, or shutdown).
            reply.finish();
            if control.finish_once() {
                final_frame(&reply, &control, None);
            }
            if trial {
                self.pool.record(Outcome::Neutral);
            }
            return None;
        }
        let started = Instant::now();
        tracing::trace!(queued = ?started.saturating_duration_since(received), "admitted");
        *lock(&self.cell.progress) = started;
        lock(&self.cell.current).push((control.clone(), reply.clone()));
        let hooks = &self.pool.settings.hooks;
        let text = request.prompt.text_for_hooks();
        let sink = Sink {
            control,
            reply,
            last_token: None,
            logprobs: Vec::new(),
            stall: crate::hooks::Hooks::matches(&hooks.stall_prompt, &text),
        };
        let mut meta = Meta {
            received,
            started,
            trial,
            session: request.session.clone(),
            dropped: 0,
        };
        let mut engine = None;
        let begun = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let proto = self.pool.proto()?;
            let (tokens, left_out) = self.pool.prepare(&request, &proto)?;
            meta.dropped = left_out;
            let engine = engine.insert(self.pool.take_engine(
                &tokens,
                request.session.as_deref(),
                &proto,
            ));
            drop(proto);
            if crate::hooks::Hooks::matches(&hooks.fail_prompt, &text) {
                return Err(crate::engine::EngineError::Candle(candle_core::Error::Msg(
                    "injected failure (test hook)".into(),
                )));
            }
            if crate::hooks::Hooks::matches(&hooks.panic_prompt, &text) {
                panic!("injected panic (test hook)");
            }
            engine.begin(tokens, &request.params, started)
        }));
        match begun {
            Ok(Ok(d)) => Some(Running {
                sink,
                meta,
                engine: engine.expect("taken before begin"),
                d,
                feed: Feed::Prompt,
                slot: UNSLOTTED,
            }),
            Ok(Err(e)) => {
                self.close(
                    sink,
                    meta,
                    engine,
                    End::Error(convert::engine_error(&e)),
                    true,
                );
                None
            }
            Err(panic) => {
                let what = panic_text(&*panic).to_owned();
                self.close(sink, meta, engine, End::Crash(what), true);
                self.replace();
                None
            }
        }
    }

    /// One batched pass over the batch, then each generation's next token:
    /// those that end are answered and leave the batch.
    fn pass(&self, batch: &mut Vec<Running>, fixed: &mut Option<StaticDecoder>) {
        // Cancelled while prefilling: ends before the pass (a decoding
        // generation sees its cancel when it chooses).
        for r in std::mem::take(batch) {
            if r.feed == Feed::Prompt && r.sink.control.is_cancelled() {
                let Running {
                    mut sink,
                    meta,
                    mut engine,
                    d,
                    slot,
                    ..
                } = r;
                let slotted = fixed.as_mut().map(|f| (f, slot));
                let end = self.generation_end(
                    &mut engine,
                    d,
                    slotted,
                    FinishReason::Cancelled,
                    &mut sink,
                );
                self.close(sink, meta, Some(engine), end, true);
            } else {
                batch.push(r);
            }
        }
        if batch.is_empty() {
            return;
        }
        // Every decoding generation runs; prompts share one chunk's worth of
        // tokens per pass (the oldest always gets its chunk), so a long
        // prompt holds the others up by one chunk a pass.
        let budget = self.pool.settings.prefill_chunk;
        let mut prompt_tokens = 0;
        let runs: Vec<bool> = batch
            .iter()
            .map(|r| match r.feed {
                Feed::Token(_) => true,
                Feed::Prompt => {
                    let (done, total) = r.d.prefill_progress(&r.engine);
                    let n = (total - done).min(budget);
                    let fits = prompt_tokens == 0 || prompt_tokens + n <= budget;
                    if fits {
                        prompt_tokens += n;
                    }
                    fits
                }
            })
            .collect();
        let turns = batch[0].engine.turns().cloned();
        let turn = turns.as_ref().map(crate::engine::Turns::take);
        // The fixed step may capture a graph: no other worker's work may
        // reach the stream meanwhile, so its turn covers the whole step.
        let whole_step =
            turns.as_ref().is_some_and(|t| t.whole_step) || self.pool.settings.fixed_step;
        let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| {
            if self.pool.settings.fixed_step {
                self.fixed_pass(batch, &runs, fixed)
            } else {
                let mut items: Vec<(&mut Engine, &mut Decoding, Feed)> = batch
                    .iter_mut()
                    .zip(&runs)
                    .filter(|(_, run)| **run)
                    .map(|(r, _)| (&mut r.engine, &mut r.d, r.feed))
                    .collect();
                crate::engine::step_batch(&mut items)
            }
        }));
        // The turn covers the launches; with `whole_step`, the tokens' copies
        // to the host too.
        let turn = turn.filter(|_| whole_step);
        let failure = match stepped {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(End::Error(convert::engine_error(&e))),
            Err(panic) => Some(End::Crash(panic_text(&*panic).to_owned())),
        };
        if let Some(end) = failure {
            // The pass failed every generation in it: one fault, one verdict.
            // Those that did not run (prompts waiting for room) go on.
            let crashed = matches!(end, End::Crash(_));
            let mut first = true;
            for (r, ran) in std::mem::take(batch).into_iter().zip(&runs) {
                if !ran {
                    batch.push(r);
                    continue;
                }
                let end = match &end {
                    End::Crash(what) => End::Crash(what.clone()),
                    End::Error(e) => End::Error(e.clone()),
                    End::Done(_) => unreachable!(),
                };
                let trial = r.meta.trial;
                self.close(r.sink, r.meta, Some(r.engine), end, first || trial);
                first = false;
            }
            drop(turn);
            if crashed {
                self.replace();
            }
            return;
        }
        *lock(&self.cell.progress) = Instant::now();
        let mut crashed = false;
        for (r, ran) in std::mem::take(batch).into_iter().zip(runs) {
            let Running {
                mut sink,
                meta,
                mut engine,
                mut d,
                feed,
                slot,
            } = r;
            if ran && feed == Feed::Prompt {
                let (mut done, total) = d.prefill_progress(&engine);
                if d.prefilled() {
                    // A fixed decoder's slot may hold the prompt now.
                    done = total;
                }
                let stage = |s| sink.reply.send(Response::Stage(s));
                stage(Stage::Prefill {
                    done: done as u32,
                    total: total as u32,
                });
                if d.prefilled() {
                    stage(Stage::Generating);
                }
            }
            // Not run, still prefilling, or its token is in the step
            // launched ahead (its result comes with the next pass).
            if !ran || !d.prefilled() || d.logits.is_none() {
                batch.push(Running {
                    sink,
                    meta,
                    engine,
                    d,
                    feed,
                    slot,
                });
                continue;
            }
            // The token, and the generation's end if it ends: a panic in
            // either fails this job alone.
            let chosen = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let control = sink.control.clone();
                let step = {
                    let mut on = |ev: GenEvent<'_>| self.event(&mut sink, ev);
                    engine.choose(&mut d, &control.flag, &mut on)
                };
                match step {
                    Ok(crate::engine::Step::Feed(t)) => Ok((t, d)),
                    Ok(crate::engine::Step::Done(f)) => {
                        let slotted = fixed.as_mut().map(|x| (x, slot));
                        Err(self.generation_end(&mut engine, d, slotted, f, &mut sink))
                    }
                    Err(e) => Err(End::Error(convert::engine_error(&e))),
                }
            }));
            match chosen {
                Ok(Ok((t, d))) => batch.push(Running {
                    sink,
                    meta,
                    engine,
                    d,
                    feed: Feed::Token(t),
                    slot,
                }),
                Ok(Err(end)) => self.close(sink, meta, Some(engine), end, true),
                Err(panic) => {
                    let end = End::Crash(panic_text(&*panic).to_owned());
                    self.close(sink, meta, Some(engine), end, true);
                    crashed = true;
                }
            }
        }
        drop(turn);
        if crashed {
            self.replace();
        }
    }

    /// The pass through the worker's fixed decoder: every job that has
    /// none gets the lowest free slot, the decoder grows to the batch (and
    /// to a longer context), then `engine::step_fixed`.
    fn fixed_pass(
        &self,
        batch: &mut [Running],
        runs: &[bool],
        fixed: &mut Option<StaticDecoder>,
    ) -> Result<(), crate::engine::EngineError> {
        for i in 0..batch.len() {
            if batch[i].slot == UNSLOTTED {
                let free = (0..)
                    .find(|s| batch.iter().all(|r| r.slot != *s))
                    .expect("a free slot");
                batch[i].slot = free;
            }
        }
        let slots = batch.iter().map(|r| r.slot + 1).max().unwrap_or(1);
        // The longest context in the batch (the model may have been asked
        // to serve more since some of its engines were taken).
        let model = batch
            .iter()
            .map(|r| r.engine.model())
            .max_by_key(|m| m.context())
            .expect("a job");
        if fixed.is_none() {
            // A capture must have the device's stream to itself: workers
            // sharing a GPU take turns (held for the whole step in fixed
            // mode), or there is one worker.
            let settings = &self.pool.settings;
            let graphs = !settings.load.device.is_cpu()
                && (settings.load.turns.is_some() || settings.limits.max <= 1);
            *fixed = Some(StaticDecoder::new(model, model.context(), slots, graphs)?);
        }
        let decoder = fixed.as_mut().expect("made");
        decoder.grow(model, slots, model.context())?;
        // Slots of jobs that left (answered after an error, say) are free.
        for s in 0..decoder.slots() {
            if batch.iter().all(|r| r.slot != s) {
                decoder.free(s)?;
            }
        }
        let mut items: Vec<(&mut Engine, &mut Decoding, Feed, usize)> = batch
            .iter_mut()
            .zip(runs)
            .filter(|(_, run)| **run)
            .map(|(r, _)| (&mut r.engine, &mut r.d, r.feed, r.slot))
            .collect();
        // On a GPU the step runs ahead of the host's reporting (a CPU step
        // computes as it is called: nothing to overlap).
        let settings = &self.pool.settings;
        let ahead = !settings.load.device.is_cpu() || settings.hooks.run_ahead;
        crate::engine::step_fixed(decoder, &mut items, ahead)
    }

    /// A generation's end (its held-back text, its statistics); a fixed
    /// decoder's slot hands its positions back to the engine first.
    fn generation_end(
        &self,
        engine: &mut Engine,
        mut d: Decoding,
        slotted: Option<(&mut StaticDecoder, usize)>,
        finish: FinishReason,
        sink: &mut Sink,
    ) -> End {
        if let Some((f, slot)) = slotted.filter(|(_, s)| *s != UNSLOTTED) {
            if let Err(e) = engine.reclaim(&mut d, f, slot) {
                return End::Error(convert::engine_error(&e));
            }
        }
        let mut on = |ev: GenEvent<'_>| self.event(sink, ev);
        match engine.finish(d, finish, &mut on) {
            Ok(g) => End::Done(g),
            Err(e) => End::Error(convert::engine_error(&e)),
        }
    }

    /// A generation's event, to its client.
    fn event(&self, sink: &mut Sink, ev: GenEvent<'_>) {
        let hooks = &self.pool.settings.hooks;
        *lock(&self.cell.progress) = Instant::now();
        match ev {
            GenEvent::Token(_) => {
                self.pool.events.count_token();
                let now = Instant::now();
                if let Some(t) = sink.last_token.replace(now) {
                    self.pool.events.inter_token.observe(now - t);
                }
                self.cell.tokens.fetch_add(1, Ordering::Relaxed);
                if sink.stall {
                    // A hung kernel: no progress, no end.
                    std::thread::sleep(Duration::from_secs(3600));
                }
                if let Some(d) = hooks.token_delay {
                    std::thread::sleep(d);
                }
            }
            GenEvent::Text(t) => {
                if !sink.logprobs.is_empty() {
                    sink.reply
                        .send(Response::Logprobs(std::mem::take(&mut sink.logprobs)));
                }
                if !sink.reply.send(Response::Token { text: t.to_owned() }) {
                    sink.control.cancel(CancelReason::Disconnected);
                }
            }
            GenEvent::Logprobs(lp) => sink.logprobs.push(convert::logprobs(lp)),
            GenEvent::Prefilled { .. } => {}
        }
    }

    /// A panic went through this worker: a fresh replica takes its place,
    /// and this one leaves once the rest of its batch is done.
    fn replace(&self) {
        tracing::error!(model = self.pool.reference, "worker panicked; replacing it");
        // The replacement is counted (spawning) before this one stops
        // counting (unhealthy): the scaler, seeing the failed request's
        // retry queued in between, must not start a second one past
        // `--max-workers`.
        if !self.cell.retire.swap(true, Ordering::Relaxed) {
            self.pool.spawn_worker(false);
        }
        self.set_state(WorkerState::Unhealthy);
    }

    /// Answer a job that ended and park its engine again before the client
    /// hears the end (its next turn must find this cache); an engine a
    /// panic went through is dropped instead. The breaker hears the outcome
    /// when `record` (a failed pass counts once however many it failed).
    fn close(&self, sink: Sink, meta: Meta, engine: Option<Engine>, end: End, record: bool) {
        let Sink {
            control,
            reply,
            logprobs,
            ..
        } = sink;
        if !logprobs.is_empty() {
            // Tokens whose text never came (withheld by a stop string, or
            // an incomplete character at the end).
            reply.send(Response::Logprobs(logprobs));
        }
        lock(&self.cell.current).retain(|(c, _)| !Arc::ptr_eq(c, &control));
        // Forget the job before its last frame, so the client may reuse its
        // id as soon as it sees that frame.
        reply.finish();
        // The breaker hears the outcome before the client sees the end, so
        // the client's next request is judged with it.
        enum Last {
            Done(paraphym_protocol::message::GenStats),
            Error(WireError),
            Crash(WireError),
        }
        let (outcome, last) = match end {
            End::Done(g) => {
                let ttft = meta.started.duration_since(meta.received) + g.time_to_first_token;
                let stats = convert::stats(&g, ttft.as_micros() as u64, meta.dropped);
                if !g.tokens.is_empty() {
                    self.pool.events.time_to_first_token.observe(ttft);
                }
                // Counted before the client can see the end and ask `Status`.
                {
                    let mut s = lock(&self.cell.snapshot);
                    s.requests_served += 1;
                    if g.tokens.len() > 1 {
                        s.tokens_per_s = g.decode_tps() as f32;
                    }
                }
                let outcome = if g.finish == FinishReason::Cancelled {
                    Outcome::Neutral
                } else {
                    Outcome::Success
                };
                (outcome, Last::Done(stats))
            }
            End::Error(wire) => {
                let outcome = match wire.kind {
                    ErrorKind::Internal | ErrorKind::ModelFailed => {
                        Outcome::Failure(wire.message.clone())
                    }
                    _ => Outcome::Neutral,
                };
                (outcome, Last::Error(wire))
            }
            End::Crash(what) => {
                tracing::error!(model = self.pool.reference, "worker panicked: {what}");
                let wire = WireError {
                    kind: ErrorKind::Internal,
                    message: format!("the worker failed ({what}); it was replaced"),
                };
                (
                    Outcome::Failure(format!("a worker panicked: {what}")),
                    Last::Crash(wire),
                )
            }
        };
        if record && (meta.trial || outcome != Outcome::Neutral) {
            self.pool.record(outcome);
        }
        if let Some(engine) = engine {
            // Nothing of it may still run on the device when another
            // worker takes it over.
            if matches!(last, Last::Crash(_)) || engine.settle().is_err() {
                self.pool.discard(engine);
            } else {
                self.pool.park(engine, meta.session, true);
            }
        }
        if control.finish_once() {
            match last {
                Last::Done(stats) => final_frame(&reply, &control, Some(stats)),
                Last::Error(e) => {
                    reply.send(Response::Error(e));
                }
                Last::Crash(e) => {
                    reply.post(Response::Error(e));
                }
            }
        }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| p.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
}

/// The last frame of a generation, by how it ended.
fn final_frame(
    reply: &Reply,
    control: &JobControl,
    stats: Option<paraphym_protocol::message::GenStats>,
) {
    let cancelled = control.is_cancelled()
        && stats
            .as_ref()
            .is_none_or(|s| s.stop == paraphym_protocol::message::StopReason::Cancelled);
    match (cancelled, control.reason()) {
        (true, Some(CancelReason::Shutdown)) => {
            reply.error(ErrorKind::ShuttingDown, "the daemon is shutting down");
        }
        (true, Some(CancelReason::Disconnected | CancelReason::SlowClient)) => {}
        _ => {
            reply.send(Response::Done(stats.unwrap_or_else(cancelled_stats)));
        }
    }
}

/// The statistics of a generation cancelled before it started.
pub fn cancelled_stats() -> paraphym_protocol::message::GenStats {
    paraphym_protocol::message::GenStats::cancelled()
}

/// Drop these conversation caches (model, cache id) of `pools`.
fn drop_caches(pools: &HashMap<PathBuf, Arc<Pool>>, caches: &[(PathBuf, u64)], why: &str) {
    for (key, id) in caches {
        if let Some(p) = pools.get(key) {
            p.drop_cache(*id, why);
        }
    }
}

/// Remove `pool` from `map` if it is still the one registered for its path
/// (a newer pool for the same file is left alone).
fn forget(map: &Map, pool: &Pool) {
    let mut map = lock(map);
    if map
        .get(&pool.path)
        .is_some_and(|p| std::ptr::eq(Arc::as_ptr(p), pool))
    {
        map.remove(&pool.path);
    }
}

/// Engines or caches were dropped since the allocator was last asked to
/// give memory back.
static RELEASED: AtomicBool = AtomicBool::new(false);

/// Give freed memory back to the system once the daemon is idle. A batch
/// of many sequences leaves, after a burst, KV buffers freed in the middle
/// of the worker threads' malloc arenas, where glibc keeps them (resident)
/// until asked; the budget counts what is in use, and so should the RSS.
fn release_memory(pools: &Pools) {
    if pools.busy() || !RELEASED.swap(false, Ordering::Relaxed) {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Large buffers (KV caches, logits, prefill activations) always come
/// from their own mappings, given back when freed. glibc's default raises
/// its mmap threshold to the size of each large buffer freed, so after a
/// burst the next ones come from the worker threads' arenas, where freed
/// KV buffers stay resident and fragment them: an idle daemon's memory
/// then depends on how the last bursts fell. Linux/glibc only.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc's allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

/// The daemon's housekeeping thread: idle eviction and throughput samples.
pub struct Housekeeping {
    stop: flume::Sender<()>,
    handle: JoinHandle<()>,
}

impl Housekeeping {
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.handle.join();
    }
}

/// How often throughput is sampled for subscribers.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

pub fn start_housekeeping(daemon: Arc<Daemon>) -> Housekeeping {
    let (stop, stopped) = flume::bounded::<()>(1);
    let handle = std::thread::Builder::new()
        .name("housekeeping".into())
        .spawn(move || {
            let mut last = (Instant::now(), daemon.events.tokens_total());
            while let Err(flume::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_millis(250))
            {
                daemon.pools.evict_idle();
                daemon.pools.rebalance_all();
                release_memory(&daemon.pools);
                let now = Instant::now();
                if now.duration_since(last.0) >= SAMPLE_EVERY {
                    let total = daemon.events.tokens_total();
                    let secs = now.duration_since(last.0).as_secs_f64();
                    let rate = (total - last.1) as f64 / secs;
                    last = (now, total);
                    daemon.events.set_rate(rate);
                    if daemon.events.has_subscribers() {
                        let at_ms = daemon.events.uptime_ms();
                        daemon.events.publish(Event::Throughput {
                            at_ms,
                            tokens_per_s: rate as f32,
                        });
                        let m = daemon.pools.metrics(at_ms, secs);
                        daemon.events.publish(Event::Metrics(m));
                    }
                }
            }
        })
        .expect("spawn the housekeeping thread");
    Housekeeping { stop, handle }
}
