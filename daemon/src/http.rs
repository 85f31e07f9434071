//! The opt-in HTTP bridge (`paraphymd --http 127.0.0.1:PORT`): OpenAI- and
//! Ollama-compatible APIs, `/health` and Prometheus `/metrics`, for the tools
//! people already point at local models.
//!
//! The bridge is another client of the daemon. Each generation opens its own
//! connection to the daemon's socket on a relay thread, so HTTP requests get
//! the same queueing, limits, breakers, cancellation and errors as native
//! ones, and tokens never pass through async code: workers produce them on
//! their threads, the relay thread forwards them to the HTTP connection's
//! task. hyper (HTTP/1.1) runs on a current-thread tokio runtime of its own
//! thread; it parses requests, enforces the header-read timeout (slow
//! clients), and the handlers bound bodies in size and time.
//!
//! A streamed response whose client goes away cancels its generation: the
//! relay notices the closed channel within [`RELAY_POLL`] (or at the next
//! token) and drops its connection, which cancels the job in the daemon.

mod metrics;
mod ollama;
mod openai;
mod tools;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use paraphym_protocol::client::{Client, ClientError, Piece};
use paraphym_protocol::message::{ErrorKind, GenStats, Generate, WireError};
use tokio::sync::mpsc;

use crate::server::Daemon;

/// The bridge's settings (`paraphymd --http*`).
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    /// A request's headers must arrive within this (slowloris).
    pub header_timeout: Duration,
    /// A request's body must arrive within this.
    pub body_timeout: Duration,
    /// Larger bodies get 413.
    pub max_body: usize,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl HttpConfig {
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_BODY: usize = 8 << 20;

    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            header_timeout: Self::DEFAULT_HEADER_TIMEOUT,
            body_timeout: Self::DEFAULT_BODY_TIMEOUT,
            max_body: Self::DEFAULT_MAX_BODY,
            max_connections: 256,
        }
    }
}

/// `PORT` (loopback) or `ADDR:PORT`; any address other than loopback must be
/// given explicitly.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("--http {s:?}: give PORT or ADDRESS:PORT (127.0.0.1:11435)"))
}

struct Ctx {
    daemon: Arc<Daemon>,
    socket: PathBuf,
    cfg: HttpConfig,
}

/// Bind and serve on a thread of its own; the bound address (port 0 picks one).
pub fn start(daemon: Arc<Daemon>, socket: PathBuf, cfg: HttpConfig) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(cfg.addr)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the HTTP bridge listens beyond this machine; it has no authentication");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let ctx = Arc::new(Ctx {
        daemon,
        socket,
        cfg,
    });
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || runtime.block_on(serve(listener, ctx)))?;
    tracing::info!(%addr, "HTTP bridge listening");
    Ok(addr)
}

async fn serve(listener: std::net::TcpListener, ctx: Arc<Ctx>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("HTTP bridge: {e}");
            return;
        }
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(ctx.cfg.max_connections.max(1)));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, typically: wait rather than spin.
                tracing::warn!("HTTP accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(|req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(route(ctx, req).await) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(ctx.cfg.header_timeout)
                .max_buf_size(64 << 10);
            if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, "HTTP connection: {e}");
            }
        });
    }
}

async fn route(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Out> {
    let path = req.uri().path().to_owned();
    let method = req.method().as_str().to_owned();
    let res = match (method.as_str(), path.as_str()) {
        ("GET" | "HEAD", "/") => text(StatusCode::OK, "paraphym is running"),
        ("GET", "/health") => health(&ctx),
        ("GET", "/metrics") => metrics::render(&ctx.daemon),
        ("GET", "/v1/models") => openai::models(&ctx),
        ("POST", "/v1/chat/completions") => openai::chat(ctx, req).await,
        ("POST", "/v1/completions") => openai::completions(ctx, req).await,
        ("POST", "/api/generate") => ollama::generate(ctx, req).await,
        ("POST", "/api/chat") => ollama::chat(ctx, req).await,
        ("GET", "/api/tags") => ollama::tags(&ctx),
        ("GET", "/api/ps") => ollama::ps(&ctx),
        ("GET", "/api/version") => ollama::version(),
        ("POST", "/api/show") => ollama::show(ctx, req).await,
        ("DELETE", "/api/delete") => ollama::delete(ctx, req).await,
        (
            _,
            "/health"
            | "/metrics"
            | "/v1/models"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/api/generate"
            | "/api/chat"
            | "/api/tags"
            | "/api/ps"
            | "/api/version"
            | "/api/show"
            | "/api/delete",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    };
    tracing::debug!(method, path, status = res.status().as_u16(), "HTTP");
    res
}

fn health(ctx: &Ctx) -> Response<Out> {
    let models = ctx.daemon.pools.health();
    let ok = models.iter().all(|m| m.ok) && !ctx.daemon.is_shutting_down();
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "unhealthy" },
        "uptime_ms": ctx.daemon.started.elapsed().as_millis() as u64,
        "version": env!("CARGO_PKG_VERSION"),
        "models": models.iter().map(|m| serde_json::json!({
            "model": m.model,
            "ok": m.ok,
            "breaker": format!("{:?}", m.breaker).to_lowercase(),
            "problem": m.problem,
        })).collect::<Vec<_>>(),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &body)
}

/// A response body: all at once, or a stream of chunks from a channel.
enum Out {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for Out {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Out::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Out::Stream(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Out::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Out::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Out::Full(None) => SizeHint::with_exact(0),
            Out::Stream(_) => SizeHint::default(),
        }
    }
}

fn response(status: StatusCode, content_type: &str, body: Out) -> Response<Out> {
    let mut res = Response::new(body);
    *res.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        res.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    res
}

fn text(status: StatusCode, body: &str) -> Response<Out> {
    response(
        status,
        "text/plain; charset=utf-8",
        Out::Full(Some(Bytes::from(body.to_owned()))),
    )
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Out> {
    response(
        status,
        "application/json",
        Out::Full(Some(Bytes::from(value.to_string()))),
    )
}

/// A streamed response: `first` (already received), then what `rest` maps
/// each later event to. The mapping task ends, and with it the relay, as soon
/// as the client is gone.
fn stream(
    content_type: &str,
    first: Vec<Bytes>,
    mut events: mpsc::Receiver<Relayed>,
    mut map: impl FnMut(Relayed) -> Vec<Bytes> + Send + 'static,
) -> Response<Out> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        for b in first {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        let mut closed = std::pin::pin!(tx.closed());
        loop {
            // The next event, unless the client leaves first.
            let next = std::future::poll_fn(|cx| {
                if let Poll::Ready(ev) = events.poll_recv(cx) {
                    return Poll::Ready(ev);
                }
                closed.as_mut().poll(cx).map(|()| None)
            })
            .await;
            let Some(ev) = next else { return };
            let end = matches!(ev, Relayed::Done(_) | Relayed::Error(_));
            for b in map(ev) {
                if tx.send(b).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
        }
    });
    let mut res = response(StatusCode::OK, content_type, Out::Stream(rx));
    res.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    res
}

/// A request body as JSON, within the size and time limits; an error
/// response (413, 408, 400) made by `err` otherwise.
async fn read_json<T: serde::de::DeserializeOwned>(
    ctx: &Ctx,
    req: Request<Incoming>,
    err: fn(StatusCode, &str) -> Response<Out>,
) -> Result<T, Response<Out>> {
    let max = ctx.cfg.max_body;
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(err(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the request body is over {max} bytes"),
        ));
    }
    let body = http_body_util::Limited::new(req.into_body(), max);
    let bytes = match tokio::time::timeout(ctx.cfg.body_timeout, body.collect()).await {
        Err(_) => {
            return Err(err(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            ))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(err(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the request body is over {max} bytes"),
            ))
        }
        Ok(Err(e)) => {
            return Err(err(
                StatusCode::BAD_REQUEST,
                &format!("reading the body: {e}"),
            ))
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| err(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")))
}

/// What a generation sends back through the bridge.
#[derive(Debug)]
enum Relayed {
    /// Of the tokens the next `Token` carries.
    Logprobs(Vec<paraphym_protocol::message::TokenLogprob>),
    Token(String),
    Done(GenStats),
    Error(WireError),
}

/// How often a relay waiting for the daemon looks whether its HTTP client
/// is still there.
pub const RELAY_POLL: Duration = Duration::from_millis(50);

/// Run `gen` on the daemon from a relay thread; its pieces arrive on the
/// returned channel, and dropping the channel cancels the generation.
fn relay(ctx: &Ctx, gen: Generate) -> mpsc::Receiver<Relayed> {
    let (tx, rx) = mpsc::channel(256);
    let socket = ctx.socket.clone();
    let spawned = std::thread::Builder::new()
        .name("http-relay".into())
        .spawn({
            let tx = tx.clone();
            move || run_relay(&socket, gen, &tx)
        });
    if let Err(e) = spawned {
        let _ = tx.try_send(Relayed::Error(WireError {
            kind: ErrorKind::Busy,
            message: format!("cannot start a relay thread: {e}"),
        }));
    }
    rx
}

fn run_relay(socket: &std::path::Path, gen: Generate, tx: &mpsc::Sender<Relayed>) {
    let fail = |e: ClientError| {
        let _ = tx.blocking_send(Relayed::Error(client_error(e)));
    };
    let client = match Client::connect(socket) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let mut stream = match client.generate(gen) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    loop {
        let piece = match stream.next_timeout(RELAY_POLL) {
            Ok(Some(p)) => p,
            Ok(None) if tx.is_closed() => {
                // The HTTP client left: dropping the connection cancels too,
                // this says so first.
                let _ = stream.cancel();
                return;
            }
            Ok(None) => continue,
            Err(e) => return fail(e),
        };
        let ev = match piece {
            Piece::Stage(_) => continue,
            Piece::Logprobs(l) => Relayed::Logprobs(l),
            Piece::Token(t) => Relayed::Token(t),
            Piece::Done(s) => Relayed::Done(s),
        };
        let end = matches!(ev, Relayed::Done(_));
        if tx.blocking_send(ev).is_err() {
            let _ = stream.cancel();
            return;
        }
        if end {
            return;
        }
    }
}

fn client_error(e: ClientError) -> WireError {
    match e {
        ClientError::Daemon(w) => w,
        other => WireError {
            kind: ErrorKind::Internal,
            message: format!("the daemon's socket: {other}"),
        },
    }
}

/// A one-answer request to the daemon (Load, Unload) from a relay thread.
async fn call(
    ctx: &Ctx,
    request: paraphym_protocol::message::Request,
) -> Result<paraphym_protocol::message::Response, WireError> {
    let socket = ctx.socket.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("http-call".into())
        .spawn(move || {
            let answer = Client::connect(&socket)
                .and_then(|c| c.call(request))
                .map_err(client_error)
                .and_then(|r| match r {
                    paraphym_protocol::message::Response::Error(w) => Err(w),
                    r => Ok(r),
                });
            let _ = tx.send(answer);
        });
    if let Err(e) = spawned {
        return Err(WireError {
            kind: ErrorKind::Busy,
            message: format!("cannot start a thread: {e}"),
        });
    }
    rx.await.unwrap_or_else(|_| {
        Err(WireError {
            kind: ErrorKind::Internal,
            message: "the request was lost".into(),
        })
    })
}

/// The HTTP status for a daemon error.
fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest | ErrorKind::ContextOverflow => StatusCode::BAD_REQUEST,
        ErrorKind::UnknownModel => StatusCode::NOT_FOUND,
        ErrorKind::AccessDenied => StatusCode::FORBIDDEN,
        ErrorKind::Busy | ErrorKind::ShuttingDown | ErrorKind::Offline | ErrorKind::OutOfMemory => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorKind::ModelFailed | ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// RFC 3339 in UTC with nanoseconds, as Ollama writes times.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    format!(
        "{}.{:09}Z",
        crate::engine::template::strftime("%Y-%m-%dT%H:%M:%S", secs),
        d.subsec_nanos()
    )
}

/// A stream's text on its way out: log-probabilities wait for the text
/// their tokens complete, and with tools offered, calls are held back from
/// the content until the end.
struct Outgoing {
    logprobs: Vec<paraphym_protocol::message::TokenLogprob>,
    hold: Option<tools::Holdback>,
}

/// Text to send, with the log-probabilities of the tokens it completes.
type TextOut = (String, Vec<paraphym_protocol::message::TokenLogprob>);

impl Outgoing {
    fn new(with_tools: bool) -> Self {
        Self {
            logprobs: Vec::new(),
            hold: with_tools.then(tools::Holdback::default),
        }
    }

    fn logprobs(&mut self, l: Vec<paraphym_protocol::message::TokenLogprob>) {
        self.logprobs.extend(l);
    }

    /// What goes out now for `text`, if anything.
    fn text(&mut self, text: String) -> Option<TextOut> {
        let text = match &mut self.hold {
            Some(h) => h.push(&text),
            None => text,
        };
        (!text.is_empty()).then(|| (text, std::mem::take(&mut self.logprobs)))
    }

    /// At the end: the text held back (if any) and the tool calls; then the
    /// log-probabilities of tokens without text, for the last chunk.
    fn finish(&mut self) -> (Option<TextOut>, Vec<tools::Call>) {
        let (rest, calls) = match self.hold.take() {
            Some(h) => h.finish(),
            None => (String::new(), Vec::new()),
        };
        let piece = (!rest.is_empty()).then(|| (rest, std::mem::take(&mut self.logprobs)));
        (piece, calls)
    }

    /// Log-probabilities not sent yet.
    fn rest(&mut self) -> Vec<paraphym_protocol::message::TokenLogprob> {
        std::mem::take(&mut self.logprobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.000000005Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(rfc3339(leap).starts_with("2000-02-29T00:00:00"));
    }

    #[test]
    fn addresses_default_to_loopback() {
        assert_eq!(parse_addr("11435").unwrap().to_string(), "127.0.0.1:11435");
        assert_eq!(parse_addr("0.0.0.0:80").unwrap().to_string(), "0.0.0.0:80");
        assert!(parse_addr("localhost").is_err());
    }
}
