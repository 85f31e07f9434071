//! Loaded models and their workers. Each worker is a dedicated thread that
//! owns an `Engine` and runs one generation at a time, synchronously, as
//! Candle's examples do; jobs reach it through the model's flume queue.
//! Connection threads submit and never wait on a worker.

pub mod scaler;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use paraphym_protocol::message::{
    ErrorKind, Event, ModelInfo, ModelStatus, Response, StatusReport, WireError, WorkerSnapshot,
    WorkerState,
};

use crate::config::{self, DaemonConfig, FOREVER};
use crate::engine::{Engine, GenEvent, LoadOptions};
use crate::events::Events;
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
    /// Waiting for the first worker: these `Load` requests are answered then;
    /// `remaining` workers are still loading.
    Loading {
        waiters: Vec<Reply>,
        remaining: usize,
    },
    Ready,
    Failed(String),
}

#[derive(Debug)]
struct WorkerCell {
    snapshot: Mutex<WorkerSnapshot>,
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
    keep_alive: Mutex<Duration>,
    last_used: Mutex<Instant>,
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
                .any(|w| lock(&w.snapshot).state == WorkerState::Busy)
    }

    fn is_ready(&self) -> bool {
        matches!(*lock(&self.load), LoadState::Ready)
    }

    fn status(&self) -> ModelStatus {
        ModelStatus {
            reference: self.reference.clone(),
            workers: lock(&self.workers)
                .iter()
                .map(|w| lock(&w.snapshot).clone())
                .collect(),
            queued: self.rx.len() as u32,
        }
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

    /// Stop taking jobs; workers finish the queue, then exit.
    fn close(&self) -> Vec<JoinHandle<()>> {
        lock(&self.tx).take();
        std::mem::take(&mut *lock(&self.handles))
    }
}

/// Settings every pool shares.
#[derive(Debug, Clone)]
struct Settings {
    workers: usize,
    max_queue: usize,
    keep_alive: Duration,
    load: LoadOptions,
}

#[derive(Debug)]
pub struct Pools {
    map: Arc<Mutex<HashMap<PathBuf, Arc<Pool>>>>,
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
            closed: Default::default(),
            retired: Mutex::default(),
            settings: Settings {
                workers: config.workers.max(1),
                max_queue: config.max_queue.max(1),
                keep_alive: config.keep_alive,
                load: LoadOptions {
                    context: config.context,
                    device: config.device.clone(),
                    ..LoadOptions::default()
                },
            },
            events,
            hub,
            hub_config: config.hub.clone(),
            default_model: config.default_model.clone(),
            memory_budget: config.memory_budget_bytes,
        }
    }

    /// A reference (or the default) to a local file. The daemon never
    /// downloads: Hub references must be in the cache (`paraphym pull`).
    pub fn resolve(&self, model: Option<&str>) -> Result<(String, PathBuf), WireError> {
        let reference = model
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .unwrap_or(&self.default_model);
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

    pub(crate) fn get_or_start(
        &self,
        reference: &str,
        path: &Path,
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
                remaining: self.settings.workers,
            }),
            keep_alive: Mutex::new(self.settings.keep_alive),
            last_used: Mutex::new(Instant::now()),
        });
        tracing::info!(model = reference, path = %path.display(), workers = self.settings.workers, "loading");
        for n in 0..self.settings.workers {
            let cell = Arc::new(WorkerCell {
                snapshot: Mutex::new(WorkerSnapshot {
                    id: n as u32,
                    state: WorkerState::Loading,
                    requests_served: 0,
                    tokens_per_s: 0.0,
                }),
            });
            lock(&pool.workers).push(cell.clone());
            let worker = Worker {
                pool: pool.clone(),
                cell,
                events: self.events.clone(),
                map: self.map.clone(),
                load: self.settings.load.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("worker-{n}"))
                .spawn(move || worker.main());
            match spawned {
                Ok(h) => lock(&pool.handles).push(h),
                Err(e) => {
                    // Counts as a failed load, so nobody waits for it.
                    tracing::error!("cannot start a worker thread: {e}");
                    lock(&pool.workers).pop();
                    let mut state = lock(&pool.load);
                    if let LoadState::Loading { remaining, .. } = &mut *state {
                        *remaining -= 1;
                        if *remaining == 0 {
                            *state = LoadState::Failed(format!("cannot start a worker: {e}"));
                        }
                    }
                }
            }
        }
        if matches!(*lock(&pool.load), LoadState::Failed(_)) {
            return Err(failed(reference, "no worker could be started"));
        }
        map.insert(path.to_owned(), pool.clone());
        Ok(pool)
    }

    /// Forget `pool` if it is still the one registered for its path.
    fn forget(&self, pool: &Arc<Pool>) {
        forget(&self.map, pool);
    }

    /// Queue a generation on its model's pool, loading the model if needed;
    /// a refusal is answered on the job's reply.
    pub fn submit(&self, model: Option<&str>, keep_alive_ms: Option<u64>, job: Job) {
        if let Err((job, e)) = self.try_submit(model, keep_alive_ms, job) {
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
        // Twice: the pool may be closing (idle eviction) as we submit.
        for _ in 0..2 {
            let pool = match self.get_or_start(&reference, &path) {
                Ok(p) => p,
                Err(e) => return Err((job, e)),
            };
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
            match tx.try_send(job) {
                Ok(()) => return Ok(()),
                Err(flume::TrySendError::Full(j)) => {
                    return Err((
                        j,
                        WireError {
                            kind: ErrorKind::Busy,
                            message: format!(
                                "{reference} has {} requests waiting; try again later",
                                self.settings.max_queue
                            ),
                        },
                    ))
                }
                Err(flume::TrySendError::Disconnected(j)) => {
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

    /// `Load`: answered with `Loaded` once a worker is ready.
    pub fn load(&self, model: &str, keep_alive_ms: Option<u64>, reply: Reply) {
        let (reference, path) = match self.resolve(Some(model)) {
            Ok(r) => r,
            Err(e) => {
                reply.send(Response::Error(e));
                return;
            }
        };
        let pool = match self.get_or_start(&reference, &path) {
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
                LoadState::Loading { waiters, .. } => {
                    waiters.push(reply.clone());
                    None
                }
                LoadState::Ready => Some(Response::Loaded { model: reference }),
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
        StatusReport {
            models,
            memory_used_bytes: config::resident_bytes(),
            memory_budget_bytes: self.memory_budget,
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
        out
    }

    /// No worker is unhealthy.
    pub fn healthy(&self) -> bool {
        lock(&self.map).values().all(|p| {
            lock(&p.workers)
                .iter()
                .all(|w| lock(&w.snapshot).state != WorkerState::Unhealthy)
        })
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
                LoadState::Loading { waiters, .. } => std::mem::take(waiters),
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
    events: Arc<Events>,
    map: Arc<Mutex<HashMap<PathBuf, Arc<Pool>>>>,
    load: LoadOptions,
}

impl Worker {
    fn set_state(&self, state: WorkerState) {
        let snap = {
            let mut s = lock(&self.cell.snapshot);
            s.state = state;
            s.clone()
        };
        self.events.publish(Event::Worker {
            model: self.pool.reference.clone(),
            worker: snap,
        });
    }

    fn main(self) {
        let name = std::thread::current().name().unwrap_or("worker").to_owned();
        tracing::debug!(model = self.pool.reference, name, "worker starting");
        // A panic while loading must still answer everyone waiting.
        let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| {
            Engine::load(&self.pool.path, &self.load).map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|p| Err(format!("the loader panicked: {}", panic_text(&*p))));
        let mut engine = match loaded {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(model = self.pool.reference, "load failed: {e}");
                self.set_state(WorkerState::Unhealthy);
                // The last worker to fail, with none ready, fails the pool.
                let last = {
                    let mut state = lock(&self.pool.load);
                    match &mut *state {
                        LoadState::Loading { remaining, .. } => {
                            *remaining -= 1;
                            *remaining == 0
                        }
                        _ => false,
                    }
                };
                if last {
                    self.fail(&e);
                }
                lock(&self.pool.workers).retain(|w| !Arc::ptr_eq(w, &self.cell));
                return;
            }
        };
        *lock(&self.pool.architecture) = engine.model().architecture().to_owned();
        let waiters = {
            let mut state = lock(&self.pool.load);
            match &mut *state {
                LoadState::Loading { waiters, .. } => {
                    let w = std::mem::take(waiters);
                    *state = LoadState::Ready;
                    w
                }
                _ => Vec::new(),
            }
        };
        self.set_state(WorkerState::Idle);
        for w in waiters {
            w.post(Response::Loaded {
                model: self.pool.reference.clone(),
            });
        }
        while let Ok(job) = self.pool.rx.recv() {
            self.run(&mut engine, job);
            self.pool.touch(None);
        }
        self.set_state(WorkerState::Stopping);
        drop(engine);
        lock(&self.pool.workers).retain(|w| !Arc::ptr_eq(w, &self.cell));
    }

    /// Every worker failed to load: answer everyone waiting, forget the pool.
    fn fail(&self, message: &str) {
        // Queue lock first (as `try_submit`): no job gets in after this.
        let waiters = {
            let mut tx = lock(&self.pool.tx);
            let mut state = lock(&self.pool.load);
            tx.take();
            match std::mem::replace(&mut *state, LoadState::Failed(message.to_owned())) {
                LoadState::Loading { waiters, .. } => waiters,
                _ => Vec::new(),
            }
        };
        let err = failed(&self.pool.reference, message);
        for w in waiters {
            w.post(Response::Error(err.clone()));
        }
        forget(&self.map, &self.pool);
        while let Ok(job) = self.pool.rx.try_recv() {
            if job.control.claim() {
                job.reply.finish();
                job.reply.post(Response::Error(err.clone()));
            }
        }
    }

    fn run(&self, engine: &mut Engine, job: Job) {
        let Job {
            request,
            control,
            reply,
            received,
        } = job;
        if !control.claim() {
            // Answered already (cancelled while queued).
            return;
        }
        if control.is_cancelled() {
            // Cancelled while queued (a disconnect, or shutdown).
            reply.finish();
            final_frame(&reply, &control, None);
            return;
        }
        self.set_state(WorkerState::Busy);
        let started = Instant::now();
        let events = &self.events;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            engine.generate(
                request.prompt.as_prompt(),
                &request.params,
                &control.flag,
                |ev| match ev {
                    GenEvent::Token(_) => events.count_token(),
                    GenEvent::Text(t) => {
                        if !reply.send(Response::Token { text: t.to_owned() }) {
                            control.cancel(CancelReason::Disconnected);
                        }
                    }
                    GenEvent::Prefilled { .. } => {}
                },
            )
        }));
        // Forget the job before its last frame, so the client may reuse its
        // id as soon as it sees that frame.
        reply.finish();
        match result {
            Ok(Ok(g)) => {
                let ttft = started.duration_since(received) + g.time_to_first_token;
                let stats = convert::stats(&g, ttft.as_micros() as u64);
                // Counted before the client can see the end and ask `Status`.
                {
                    let mut s = lock(&self.cell.snapshot);
                    s.requests_served += 1;
                    if g.tokens.len() > 1 {
                        s.tokens_per_s = g.decode_tps() as f32;
                    }
                }
                final_frame(&reply, &control, Some(stats));
            }
            Ok(Err(e)) => {
                reply.send(Response::Error(convert::engine_error(&e)));
            }
            Err(panic) => {
                let what = panic_text(&*panic);
                tracing::error!(model = self.pool.reference, "worker panicked: {what}");
                reply.error(ErrorKind::Internal, format!("the worker failed: {what}"));
                // Weights are never written; the KV cache is the only state,
                // and it is cleared here and at the start of every generation.
                engine.model_mut().clear_kv();
            }
        }
        self.set_state(WorkerState::Idle);
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
    paraphym_protocol::message::GenStats {
        prompt_tokens: 0,
        generated_tokens: 0,
        time_to_first_token_us: 0,
        prefill_tokens_per_s: 0.0,
        decode_tokens_per_s: 0.0,
        stop: paraphym_protocol::message::StopReason::Cancelled,
    }
}

/// Remove `pool` from `map` if it is still the one registered for its path
/// (a newer pool for the same file is left alone).
fn forget(map: &Mutex<HashMap<PathBuf, Arc<Pool>>>, pool: &Arc<Pool>) {
    let mut map = lock(map);
    if map.get(&pool.path).is_some_and(|p| Arc::ptr_eq(p, pool)) {
        map.remove(&pool.path);
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
                let now = Instant::now();
                if now.duration_since(last.0) >= SAMPLE_EVERY {
                    let total = daemon.events.tokens_total();
                    let rate = (total - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                    last = (now, total);
                    if daemon.events.has_subscribers() {
                        daemon.events.publish(Event::Throughput {
                            at_ms: daemon.events.uptime_ms(),
                            tokens_per_s: rate as f32,
                        });
                    }
                }
            }
        })
        .expect("spawn the housekeeping thread");
    Housekeeping { stop, handle }
}
