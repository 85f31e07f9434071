//! The socket side of the daemon: the listener, one reader and one writer
//! thread per connection (`server/connection.rs`), and what they share.
//! Connection threads never touch tensors; workers never touch sockets:
//! they meet in a connection's [`Outbox`].

pub mod connection;
pub mod convert;
pub mod outbox;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use interprocess::local_socket::{prelude::*, GenericFilePath, ListenerOptions, Stream};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use paraphym_protocol::message::{DaemonMsg, ErrorKind, RequestId, Response, WireError};
use paraphym_protocol::{codec, frame};

use crate::config::DaemonConfig;
use crate::events::Events;
use crate::pool::Pools;
pub use outbox::Outbox;

/// Why a job was cancelled; decides its last frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CancelReason {
    /// The client asked: `Done` with stop reason `Cancelled`.
    Client = 1,
    /// The client is gone: nothing to send.
    Disconnected = 2,
    /// The daemon is stopping: `Error(ShuttingDown)`.
    Shutdown = 3,
    /// The client stopped reading; its connection is being closed.
    SlowClient = 4,
    /// The worker stopped making progress: the request was answered with an
    /// error and the worker replaced.
    Stuck = 5,
}

/// Shared between a connection (which may cancel) and the worker running
/// the job (which checks the flag before every token).
#[derive(Debug, Default)]
pub struct JobControl {
    pub flag: AtomicBool,
    reason: AtomicU8,
    /// Whoever sets this owns the job's final answer: the worker that starts
    /// it, or the connection that cancels it while it is still queued.
    claimed: AtomicBool,
    /// Set by whoever sends the final frame (the worker, or the supervisor
    /// that gave up on a stuck worker).
    finished: AtomicBool,
}

impl JobControl {
    pub fn cancel(&self, reason: CancelReason) {
        // The first reason wins.
        let _ = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        self.flag.store(true, Ordering::Release);
    }

    /// Take the job's final answer; `false` if someone already has.
    pub fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::AcqRel)
    }

    /// Take the right to send the final frame; `false` if it was sent.
    pub fn finish_once(&self) -> bool {
        !self.finished.swap(true, Ordering::AcqRel)
    }

    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> Option<CancelReason> {
        match self.reason.load(Ordering::Acquire) {
            1 => Some(CancelReason::Client),
            2 => Some(CancelReason::Disconnected),
            3 => Some(CancelReason::Shutdown),
            4 => Some(CancelReason::SlowClient),
            5 => Some(CancelReason::Stuck),
            _ => None,
        }
    }
}

/// Where the answers to one request go.
#[derive(Debug, Clone)]
pub struct Reply {
    pub id: RequestId,
    pub conn: Arc<Conn>,
}

impl Reply {
    /// Queue a message, waiting while the client's outbox is full; `false`
    /// once the connection is closing.
    pub fn send(&self, response: Response) -> bool {
        match encode(self.id, response) {
            Some(f) => self.conn.outbox.push(f).is_ok(),
            None => false,
        }
    }

    /// Queue a message only if there is room now; `false` once the
    /// connection is closing (a full outbox just skips this message).
    pub fn offer(&self, response: Response) -> bool {
        match encode(self.id, response) {
            Some(f) => !matches!(
                self.conn.outbox.try_push(f),
                Err(outbox::TryPushError::Closed)
            ),
            None => false,
        }
    }

    /// Queue a final answer without waiting for room (a worker or the
    /// housekeeping thread answering someone else's request must not wait
    /// on that client).
    pub fn post(&self, response: Response) -> bool {
        match encode(self.id, response) {
            Some(f) => self.conn.outbox.force_push(f).is_ok(),
            None => false,
        }
    }

    pub fn error(&self, kind: ErrorKind, message: impl Into<String>) -> bool {
        self.send(Response::Error(WireError {
            kind,
            message: message.into(),
        }))
    }

    /// The job is over: forget its cancel handle.
    pub fn finish(&self) {
        self.conn.lock_jobs().remove(&self.id);
    }
}

/// A framed, encoded daemon message.
fn encode(id: RequestId, response: Response) -> Option<Vec<u8>> {
    let payload = match codec::encode(&DaemonMsg { id, response }) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("encoding a reply failed: {e}");
            return None;
        }
    };
    let mut framed = Vec::with_capacity(4 + payload.len());
    frame::write_frame(&mut framed, &payload).ok()?;
    Some(framed)
}

/// One client connection, as the rest of the daemon sees it.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub outbox: Outbox,
    jobs: Mutex<HashMap<RequestId, Arc<JobControl>>>,
    /// A handle on the socket, to shut it down from any thread.
    socket: Stream,
}

impl Conn {
    fn lock_jobs(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Arc<JobControl>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cancel every job of this connection.
    pub fn cancel_all(&self, reason: CancelReason) {
        for job in self.lock_jobs().values() {
            job.cancel(reason);
        }
    }

    pub fn open_jobs(&self) -> usize {
        self.lock_jobs().len()
    }

    /// Wake both of the connection's threads: reads end, writes fail.
    pub fn shutdown_socket(&self) {
        let Stream::UdSocket(s) = &self.socket;
        let _ = s.inner().shutdown(std::net::Shutdown::Both);
    }
}

/// Everything the daemon's threads share.
#[derive(Debug)]
pub struct Daemon {
    pub config: DaemonConfig,
    pub pools: Pools,
    pub events: Arc<Events>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_conn: AtomicU64,
    shutting_down: AtomicBool,
    stop_tx: flume::Sender<()>,
    stop_rx: flume::Receiver<()>,
    pub started: Instant,
}

impl Daemon {
    pub fn new(config: DaemonConfig) -> Arc<Self> {
        let started = Instant::now();
        let events = Arc::new(Events::new(started));
        let (stop_tx, stop_rx) = flume::bounded(1);
        Arc::new(Self {
            pools: Pools::new(&config, events.clone()),
            config,
            events,
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            stop_tx,
            stop_rx,
            started,
        })
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Ask the daemon to stop (a signal, or the `Shutdown` request).
    pub fn request_stop(&self) {
        let _ = self.stop_tx.try_send(());
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start loading a model now (`--preload`).
    pub fn preload(&self, model: &str) {
        match self.pools.resolve(Some(model)) {
            Ok((reference, path)) => {
                if let Err(e) = self.pools.get_or_start(&reference, &path, None) {
                    tracing::error!("--preload {model}: {}", e.message);
                }
            }
            Err(e) => tracing::error!("--preload {model}: {}", e.message),
        }
    }

    pub fn connections(&self) -> usize {
        self.lock_conns().len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("a daemon is already running on {}", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("socket {}: {source}", path.display())]
    Socket { path: PathBuf, source: io::Error },
}

/// A bound socket: the lock that makes this daemon the only one on the
/// path, and the listener. Dropping it removes the socket file.
pub struct Bound {
    listener: Option<interprocess::local_socket::Listener>,
    path: PathBuf,
    _lock: File,
}

impl Drop for Bound {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Bound {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Take the socket path: create its folder (0700), hold the lock file, and
/// replace a stale socket file left by a dead daemon. A live daemon is never
/// displaced.
pub fn bind(path: &Path, owns_dir: bool) -> Result<Bound, ServeError> {
    let err = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    } else if owns_dir {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    // Two daemons starting at once: exactly one gets the lock.
    let mut lock_name = path.as_os_str().to_owned();
    lock_name.push(".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(PathBuf::from(lock_name))
        .map_err(err)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(ServeError::AlreadyRunning(path.to_owned()))
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
    }
    if path.exists() {
        // Holding the lock, a socket file that still answers belongs to a
        // daemon that predates locking; one that refuses is stale.
        let name = path.to_fs_name::<GenericFilePath>().map_err(err)?;
        if Stream::connect(name).is_ok() {
            return Err(ServeError::AlreadyRunning(path.to_owned()));
        }
        tracing::info!(path = %path.display(), "replacing a stale socket file");
        std::fs::remove_file(path).map_err(err)?;
    }
    let name = path.to_fs_name::<GenericFilePath>().map_err(err)?;
    let listener = ListenerOptions::new()
        .name(name)
        .mode(0o600)
        .reclaim_name(false)
        .create_sync()
        .map_err(err)?;
    // The mode is applied at creation; make sure whatever the umask did.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(Bound {
        listener: Some(listener),
        path: path.to_owned(),
        _lock: lock,
    })
}

/// Serve until a signal or a `Shutdown` request, then stop cleanly:
/// in-flight requests get a final `Error(ShuttingDown)`, connections are
/// closed once their outboxes are written, the socket file is removed.
pub fn serve(daemon: Arc<Daemon>, mut bound: Bound) {
    let accept = {
        let daemon = daemon.clone();
        let listener = bound.listener.take().expect("a bound listener");
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if daemon.is_shutting_down() {
                        break;
                    }
                    match stream {
                        Ok(s) => {
                            let d = daemon.clone();
                            let spawned = std::thread::Builder::new()
                                .name("conn".into())
                                .spawn(move || connection::serve(s, d));
                            if let Err(e) = spawned {
                                tracing::error!("cannot start a connection thread: {e}");
                            }
                        }
                        Err(e) => {
                            tracing::warn!("accept: {e}");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })
            .expect("spawn the accept thread")
    };
    let housekeeping = crate::pool::start_housekeeping(daemon.clone());
    tracing::info!(
        socket = %bound.path.display(),
        version = env!("CARGO_PKG_VERSION"),
        protocol = paraphym_protocol::PROTOCOL_VERSION,
        "paraphymd ready"
    );
    let _ = daemon.stop_rx.recv();
    tracing::info!("shutting down");
    daemon.shutting_down.store(true, Ordering::Release);
    // Wake the accept thread with a connection of our own.
    if let Ok(name) = bound.path.as_path().to_fs_name::<GenericFilePath>() {
        let _ = Stream::connect(name);
    }
    let woke = Instant::now();
    while !accept.is_finished() && woke.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
    }
    if accept.is_finished() {
        let _ = accept.join();
    }

    // In-flight and queued jobs end with Error(ShuttingDown) (workers send it).
    let conns: Vec<Arc<Conn>> = daemon.lock_conns().values().cloned().collect();
    for c in &conns {
        c.cancel_all(CancelReason::Shutdown);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    daemon.pools.stop_all(deadline);
    // Writers deliver the last frames, then close their connections.
    for c in &conns {
        c.outbox.drain();
    }
    let deadline = deadline.max(Instant::now() + Duration::from_secs(1));
    while Instant::now() < deadline && daemon.connections() > 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    for c in daemon.lock_conns().values() {
        c.outbox.close();
        c.shutdown_socket();
    }
    housekeeping.stop();
    drop(bound);
    tracing::info!("stopped");
}
