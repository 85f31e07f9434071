//! The blocking client the TUI, the CLI and the tests use.
//!
//! One connection carries any number of requests at once: a reader thread
//! routes each daemon message to the request it answers (by id), writes go
//! through a shared handle that any thread may use (to cancel from a signal
//! handler's thread, say). No async runtime.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use interprocess::local_socket::{prelude::*, GenericFilePath, Stream};
use interprocess::TryClone;

use crate::codec::{self, CodecError};
use crate::frame::{self, FrameError};
use crate::handshake::{self, HandshakeError};
use crate::message::{
    ClientMsg, DaemonMsg, ErrorKind, Event, GenStats, Generate, Request, RequestId, Response,
    WireError,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("no daemon is running on {}", path.display())]
    NotRunning { path: PathBuf },
    #[error("no socket path: set PARAPHYM_SOCKET, XDG_RUNTIME_DIR or HOME")]
    NoSocketPath,
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The daemon answered with an error.
    #[error("{}", .0.message)]
    Daemon(WireError),
    /// The connection closed before the answer was complete.
    #[error("the daemon closed the connection")]
    Disconnected,
    #[error("unexpected answer from the daemon: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// The daemon's error kind, if the daemon sent one.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Daemon(e) => Some(e.kind),
            _ => None,
        }
    }
}

type Routes = Arc<Mutex<RouteTable>>;

#[derive(Default)]
struct RouteTable {
    routes: HashMap<RequestId, Sender<Response>>,
    /// Set once the reader thread has stopped: no answer will come.
    closed: bool,
    /// An error the daemon sent about the whole connection (id 0), kept for
    /// requests made after it arrived.
    conn_error: Option<WireError>,
}

/// The sending side of a connection; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Handle {
    writer: Arc<Mutex<Stream>>,
    next_id: Arc<AtomicU64>,
    routes: Routes,
}

impl Handle {
    fn send(&self, id: RequestId, request: Request) -> Result<(), ClientError> {
        let payload = codec::encode(&ClientMsg { id, request })?;
        let sent = {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            frame::write_frame(&mut *w, &payload)
        };
        match sent {
            Ok(()) => Ok(()),
            // The daemon may have said why before closing (id-0 error):
            // give the reader a moment to hand it over.
            Err(e) => Err(self.why_closed().unwrap_or(ClientError::Frame(e))),
        }
    }

    /// The daemon's connection-level error, once the reader has seen the end.
    fn why_closed(&self) -> Option<ClientError> {
        for _ in 0..50 {
            {
                let table = self.routes.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(e) = &table.conn_error {
                    return Some(ClientError::Daemon(e.clone()));
                }
                if table.closed {
                    return None;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Register a new request id and the channel its answers arrive on.
    fn open(&self) -> Result<(RequestId, Receiver<Response>), ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let mut table = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = &table.conn_error {
            return Err(ClientError::Daemon(e.clone()));
        }
        if table.closed {
            return Err(ClientError::Disconnected);
        }
        table.routes.insert(id, tx);
        Ok((id, rx))
    }

    fn close(&self, id: RequestId) {
        let mut table = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        table.routes.remove(&id);
    }

    /// Ask the daemon to stop generation `target`; it then ends with `Done`
    /// (stop reason `Cancelled`).
    pub fn cancel(&self, target: RequestId) -> Result<(), ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.send(id, Request::Cancel { target })
    }
}

/// A connection to the daemon.
pub struct Client {
    handle: Handle,
    path: PathBuf,
    /// Shuts the socket down on drop so the reader thread ends.
    shutdown: Stream,
}

impl Client {
    /// Connect to the default socket ([`crate::paths::default_socket`]).
    pub fn connect_default() -> Result<Self, ClientError> {
        let path = crate::paths::default_socket().ok_or(ClientError::NoSocketPath)?;
        Self::connect(&path)
    }

    /// Connect and shake hands.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let name = path.to_fs_name::<GenericFilePath>()?;
        let mut stream = Stream::connect(name).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
                path: path.to_owned(),
            },
            _ => ClientError::Io(e),
        })?;
        // A daemon that accepts but never answers must not hang the client.
        stream.set_recv_timeout(Some(Duration::from_secs(10)))?;
        handshake::client(&mut stream)?;
        stream.set_recv_timeout(None)?;
        let reader = stream.try_clone()?;
        let shutdown = stream.try_clone()?;
        let routes: Routes = Arc::default();
        let table = routes.clone();
        std::thread::Builder::new()
            .name("paraphym-client-reader".into())
            .spawn(move || read_loop(reader, table))?;
        Ok(Self {
            handle: Handle {
                writer: Arc::new(Mutex::new(stream)),
                next_id: Arc::new(AtomicU64::new(1)),
                routes,
            },
            path: path.to_owned(),
            shutdown,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A sending handle for other threads (cancel from a Ctrl-C handler).
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Send a request that has one answer and wait for it. Error answers
    /// become [`ClientError::Daemon`].
    pub fn call(&self, request: Request) -> Result<Response, ClientError> {
        match request {
            Request::Generate(_) | Request::Subscribe | Request::Pull { .. } => {
                return Err(ClientError::Unexpected(
                    "call() takes one-answer requests: use generate(), subscribe() or stream()"
                        .into(),
                ))
            }
            Request::Cancel { target } => {
                // No answer comes for a cancel.
                self.handle.cancel(target)?;
                return Ok(Response::Done(crate::message::GenStats::cancelled()));
            }
            _ => {}
        }
        let (id, rx) = self.handle.open()?;
        let sent = self.handle.send(id, request);
        let answer = sent.and_then(|()| rx.recv().map_err(|_| ClientError::Disconnected));
        self.handle.close(id);
        match answer? {
            Response::Error(e) => Err(ClientError::Daemon(e)),
            r => Ok(r),
        }
    }

    /// Start a generation; iterate the result for its pieces.
    pub fn generate(&self, request: Generate) -> Result<TokenStream, ClientError> {
        let (id, rx) = self.handle.open()?;
        if let Err(e) = self.handle.send(id, Request::Generate(request)) {
            self.handle.close(id);
            return Err(e);
        }
        Ok(TokenStream {
            id,
            rx,
            handle: self.handle.clone(),
            done: false,
        })
    }

    /// Send a request with several answers (`Pull`) and receive them raw.
    pub fn stream(&self, request: Request) -> Result<Replies, ClientError> {
        let (id, rx) = self.handle.open()?;
        if let Err(e) = self.handle.send(id, request) {
            self.handle.close(id);
            return Err(e);
        }
        Ok(Replies {
            id,
            rx,
            handle: self.handle.clone(),
        })
    }

    /// Subscribe to the daemon's events (worker states, throughput).
    pub fn subscribe(&self) -> Result<Subscription, ClientError> {
        self.stream(Request::Subscribe).map(Subscription)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            let Stream::UdSocket(s) = &self.shutdown;
            let _ = s.inner().shutdown(std::net::Shutdown::Both);
        }
    }
}

/// One piece of a generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Progress before the first token (queued, loading, prefill).
    Stage(crate::message::Stage),
    Token(String),
    /// Log-probabilities of the tokens the next `Token` carries (when asked).
    Logprobs(Vec<crate::message::TokenLogprob>),
    /// The last item: the generation's statistics.
    Done(GenStats),
}

/// The answers to one `Generate`, in order. Dropping it early does not
/// cancel the generation: call [`TokenStream::cancel`].
pub struct TokenStream {
    id: RequestId,
    rx: Receiver<Response>,
    handle: Handle,
    done: bool,
}

impl TokenStream {
    /// The request id (for [`Handle::cancel`]).
    pub fn id(&self) -> RequestId {
        self.id
    }

    pub fn cancel(&self) -> Result<(), ClientError> {
        self.handle.cancel(self.id)
    }

    /// Wait at most `timeout` for the next piece (`Ok(None)`: nothing yet).
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Piece>, ClientError> {
        if self.done {
            return Err(ClientError::Disconnected);
        }
        match self.rx.recv_timeout(timeout) {
            Ok(r) => self.piece(r).map(Some),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.done = true;
                Err(ClientError::Disconnected)
            }
        }
    }

    fn piece(&mut self, r: Response) -> Result<Piece, ClientError> {
        match r {
            Response::Token { text } => Ok(Piece::Token(text)),
            Response::Stage(s) => Ok(Piece::Stage(s)),
            Response::Logprobs(l) => Ok(Piece::Logprobs(l)),
            Response::Done(stats) => {
                self.done = true;
                Ok(Piece::Done(stats))
            }
            Response::Error(e) => {
                self.done = true;
                Err(ClientError::Daemon(e))
            }
            other => {
                self.done = true;
                Err(ClientError::Unexpected(format!("{other:?}")))
            }
        }
    }

    /// Collect the whole text and the statistics.
    pub fn collect_text(self) -> Result<(String, GenStats), ClientError> {
        let mut text = String::new();
        for piece in self {
            match piece? {
                Piece::Token(t) => text.push_str(&t),
                Piece::Stage(_) | Piece::Logprobs(_) => {}
                Piece::Done(stats) => return Ok((text, stats)),
            }
        }
        Err(ClientError::Disconnected)
    }
}

impl Iterator for TokenStream {
    type Item = Result<Piece, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.rx.recv() {
            Ok(r) => Some(self.piece(r)),
            Err(_) => {
                self.done = true;
                Some(Err(ClientError::Disconnected))
            }
        }
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        self.handle.close(self.id);
    }
}

/// The raw answers to one request.
pub struct Replies {
    id: RequestId,
    rx: Receiver<Response>,
    handle: Handle,
}

impl Replies {
    pub fn id(&self) -> RequestId {
        self.id
    }

    pub fn recv(&self) -> Result<Response, ClientError> {
        self.rx.recv().map_err(|_| ClientError::Disconnected)
    }

    /// `Ok(None)`: nothing within `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Response>, ClientError> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => Ok(Some(r)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ClientError::Disconnected),
        }
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        self.handle.close(self.id);
    }
}

/// The event stream of a `Subscribe`: its replies, read as events.
pub struct Subscription(Replies);

impl Subscription {
    fn event(r: Response) -> Result<Event, ClientError> {
        match r {
            Response::Event(e) => Ok(e),
            Response::Error(e) => Err(ClientError::Daemon(e)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Wait at most `timeout` for the next event (`Ok(None)`: nothing yet).
    pub fn next_timeout(&self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        self.0.recv_timeout(timeout)?.map(Self::event).transpose()
    }
}

impl Iterator for Subscription {
    type Item = Result<Event, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.recv().ok().map(Self::event)
    }
}

fn read_loop(mut stream: Stream, routes: Routes) {
    loop {
        let msg = frame::read_frame(&mut stream)
            .map_err(ClientError::from)
            .and_then(|p| codec::decode::<DaemonMsg>(&p).map_err(ClientError::from));
        let Ok(msg) = msg else { break };
        let mut table = routes.lock().unwrap_or_else(|e| e.into_inner());
        if msg.id == 0 {
            // About the connection (limit reached, bad frame): every open
            // request gets it, and so does any made later.
            if let Response::Error(e) = &msg.response {
                table.conn_error = Some(e.clone());
                for tx in table.routes.values() {
                    let _ = tx.send(msg.response.clone());
                }
            }
        } else if let Some(tx) = table.routes.get(&msg.id) {
            let _ = tx.send(msg.response);
        }
    }
    // Dropping the senders wakes every waiting request with `Disconnected`
    // (or the connection's error, if the daemon sent one).
    let mut table = routes.lock().unwrap_or_else(|e| e.into_inner());
    table.closed = true;
    if let Some(e) = table.conn_error.clone() {
        for tx in table.routes.values() {
            let _ = tx.send(Response::Error(e.clone()));
        }
    }
    table.routes.clear();
}
