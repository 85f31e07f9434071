//! The TUI's run loop: one channel of [`Msg`]s fed by the keyboard thread,
//! the daemon link thread and one thread per streamed reply; the loop
//! applies them to the [`App`], performs the effects, and draws once per
//! batch of messages (never once per token).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paraphym_protocol::client::{Client, ClientError, Handle};
use paraphym_protocol::message::{Request, Response, StatusReport};
use ratatui::crossterm::event::{self, Event as TermEvent};

use crate::app::{App, Effect, Mode, Msg};
use crate::cli::CliError;
use crate::conn;
use crate::state::chat::{Conversation, Settings};
use crate::store;
use crate::term::{self, Term};

pub struct Options {
    pub mode: Mode,
    pub socket: PathBuf,
    pub explicit_socket: bool,
    pub model: Option<String>,
    pub settings: Settings,
}

/// At most this many frames a second while tokens stream.
const FRAME: Duration = Duration::from_millis(16);

type Slot = Arc<Mutex<Option<Arc<Client>>>>;
/// The replies in flight (their connection and request id, for cancel), and
/// cancels asked for before their request was sent.
#[derive(Default)]
struct Flight {
    streams: HashMap<u64, (Handle, u64)>,
    early_cancels: std::collections::HashSet<u64>,
}

type Streams = Arc<Mutex<Flight>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn run(o: Options) -> Result<ExitCode, CliError> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(
            "the terminal UI needs a terminal; for scripts see `paraphym run --help`".into(),
        ));
    }
    // Start the daemon (chat) before the screen switches, so what that says
    // is readable; `watch` only watches.
    if o.mode == Mode::Chat {
        let c = conn::connect_or_start(&o.socket, o.explicit_socket)?;
        conn::check_version(&c);
    }
    let mut conv = Conversation::new(store::now_id(), o.model.clone());
    conv.settings = o.settings;
    let mut app = App::new(o.mode, o.socket.display().to_string(), conv, store::now_id);

    let (tx, rx) = flume::unbounded::<Msg>();
    let slot: Slot = Arc::default();
    let streams: Streams = Arc::default();
    {
        let (tx, slot, socket) = (tx.clone(), slot.clone(), o.socket.clone());
        std::thread::Builder::new()
            .name("link".into())
            .spawn(move || link(&socket, &tx, &slot))
            .map_err(|e| CliError::Other(e.to_string()))?;
    }
    {
        // SIGTERM/SIGHUP (a closed terminal): leave as Ctrl+Q does, so the
        // terminal is restored and the chat saved.
        let tx = tx.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ])
        .map_err(|e| CliError::Other(e.to_string()))?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    let _ = tx.send(Msg::Quit);
                }
            })
            .map_err(|e| CliError::Other(e.to_string()))?;
    }
    let mut term = Term::start().map_err(|e| CliError::Other(format!("terminal: {e}")))?;
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("input".into())
            .spawn(move || input(&tx))
            .map_err(|e| CliError::Other(e.to_string()))?;
    }
    let chats = store::chats_dir();
    let ctx = Ctx {
        tx: tx.clone(),
        slot,
        streams,
        chats,
    };
    let mut last_draw = Instant::now() - FRAME;
    loop {
        std::thread::sleep(FRAME.saturating_sub(last_draw.elapsed()));
        term.terminal
            .draw(|f| crate::view::render(&app, f))
            .map_err(|e| CliError::Other(format!("terminal: {e}")))?;
        last_draw = Instant::now();
        let first = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(m) => Some(m),
            Err(flume::RecvTimeoutError::Timeout) => None,
            Err(flume::RecvTimeoutError::Disconnected) => break,
        };
        for msg in first.into_iter().chain(rx.try_iter()) {
            for effect in app.update(msg) {
                ctx.perform(effect);
            }
        }
        if app.quit {
            break;
        }
    }
    // Leaving mid-reply: stop it and keep what came.
    if let Some(r) = &app.reply {
        ctx.perform(Effect::Cancel { req: r.req });
    }
    ctx.perform(Effect::Save(app.conv.clone()));
    drop(term);
    Ok(ExitCode::SUCCESS)
}

struct Ctx {
    tx: flume::Sender<Msg>,
    slot: Slot,
    streams: Streams,
    chats: Option<PathBuf>,
}

impl Ctx {
    fn client(&self) -> Option<Arc<Client>> {
        lock(&self.slot).clone()
    }

    fn notice(&self, text: String, error: bool) {
        let _ = self.tx.send(Msg::Notice { text, error });
    }

    fn perform(&self, effect: Effect) {
        match effect {
            Effect::Generate { req, request } => {
                let Some(client) = self.client() else {
                    let _ = self.tx.send(Msg::Failed {
                        req,
                        kind: None,
                        message: "the daemon is not reachable".into(),
                    });
                    return;
                };
                let (tx, streams) = (self.tx.clone(), self.streams.clone());
                std::thread::spawn(move || {
                    let fail = |e: ClientError| Msg::Failed {
                        req,
                        kind: e.kind(),
                        message: e.to_string(),
                    };
                    let stream = match client.generate(request) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(fail(e));
                            return;
                        }
                    };
                    let cancel_now = {
                        let mut f = lock(&streams);
                        f.streams.insert(req, (client.handle(), stream.id()));
                        f.early_cancels.remove(&req)
                    };
                    if cancel_now {
                        let _ = stream.cancel();
                    }
                    for piece in stream {
                        let msg = match piece {
                            Ok(piece) => Msg::Piece { req, piece },
                            Err(e) => fail(e),
                        };
                        if tx.send(msg).is_err() {
                            break;
                        }
                    }
                    lock(&streams).streams.remove(&req);
                });
            }
            Effect::Cancel { req } => {
                // Cancel outside the lock: it writes to the socket.
                let target = {
                    let mut f = lock(&self.streams);
                    let t = f.streams.get(&req).cloned();
                    if t.is_none() {
                        f.early_cancels.insert(req);
                    }
                    t
                };
                if let Some((handle, id)) = target {
                    let _ = handle.cancel(id);
                }
            }
            Effect::ListModels => {
                let Some(client) = self.client() else {
                    return self.notice("the daemon is not reachable".into(), true);
                };
                let tx = self.tx.clone();
                std::thread::spawn(move || {
                    let msg = match client.call(Request::ListModels) {
                        Ok(Response::Models(list)) => Msg::Models(list),
                        Ok(other) => Msg::Notice {
                            text: format!("unexpected answer: {other:?}"),
                            error: true,
                        },
                        Err(e) => Msg::Notice {
                            text: e.to_string(),
                            error: true,
                        },
                    };
                    let _ = tx.send(msg);
                });
            }
            Effect::Load(model) => {
                let Some(client) = self.client() else { return };
                let tx = self.tx.clone();
                std::thread::spawn(move || {
                    let request = Request::Load {
                        model: model.clone(),
                        keep_alive_ms: None,
                        context: None,
                    };
                    if let Err(e) = client.call(request) {
                        let _ = tx.send(Msg::Notice {
                            text: format!("can't load {model}: {e}"),
                            error: true,
                        });
                    }
                });
            }
            Effect::ListChats => {
                let list = self.chats.as_deref().map(store::list).unwrap_or_default();
                let _ = self.tx.send(Msg::Chats(list));
            }
            Effect::OpenChat(id) => {
                let Some(dir) = &self.chats else { return };
                match store::load(dir, &id) {
                    Ok(c) => {
                        let _ = self.tx.send(Msg::Opened(c));
                    }
                    Err(e) => self.notice(format!("can't open chat {id}: {e}"), true),
                }
            }
            Effect::Save(c) => {
                if let Some(dir) = &self.chats {
                    if let Err(e) = store::save(dir, &c) {
                        self.notice(format!("can't save the chat: {e}"), true);
                    }
                }
            }
            Effect::Export(c) => {
                let here = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
                match store::export(&here, &c) {
                    Ok(p) => self.notice(format!("exported to {}", p.display()), false),
                    Err(e) => self.notice(format!("export failed: {e}"), true),
                }
            }
            Effect::Copy(text) => {
                if let Err(e) = term::copy(&text) {
                    self.notice(format!("copy failed: {e}"), true);
                }
            }
        }
    }
}

/// Keys, mouse, paste and resizes, as messages.
fn input(tx: &flume::Sender<Msg>) {
    loop {
        let msg = match event::read() {
            Ok(TermEvent::Key(k)) => Msg::Key(k),
            Ok(TermEvent::Mouse(m)) => Msg::Mouse(m),
            Ok(TermEvent::Paste(s)) => Msg::Paste(s),
            Ok(TermEvent::Resize(..)) => Msg::Redraw,
            Ok(_) => continue,
            Err(_) => return,
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

/// The daemon link: connect, report, forward events until the connection
/// ends, then retry with backoff (250 ms doubling to 2 s), forever. It never
/// starts a daemon: one that went away is waited for.
fn link(socket: &std::path::Path, tx: &flume::Sender<Msg>, slot: &Slot) {
    let mut attempt = 0u32;
    loop {
        let reason = match Client::connect(socket) {
            Ok(c) => {
                let version = match c.call(Request::Health) {
                    Ok(Response::Health(h)) => h.version,
                    _ => "?".into(),
                };
                let status = match c.call(Request::Status) {
                    Ok(Response::Status(s)) => s,
                    _ => StatusReport::default(),
                };
                match c.subscribe() {
                    Ok(sub) => {
                        let c = Arc::new(c);
                        *lock(slot) = Some(c.clone());
                        attempt = 0;
                        if tx.send(Msg::Connected { version, status }).is_err() {
                            return;
                        }
                        for e in sub {
                            let Ok(e) = e else { break };
                            if tx.send(Msg::Event(e)).is_err() {
                                return;
                            }
                        }
                        lock(slot).take();
                        "connection lost".to_string()
                    }
                    // Without events the view would be blind: not connected.
                    Err(e) => format!("subscribe: {e}"),
                }
            }
            Err(ClientError::NotRunning { .. }) => "not running".into(),
            Err(e) => e.to_string(),
        };
        attempt += 1;
        if tx.send(Msg::Down { reason, attempt }).is_err() {
            return;
        }
        let backoff = Duration::from_millis(250 << attempt.min(3)).min(Duration::from_secs(2));
        std::thread::sleep(backoff);
    }
}
