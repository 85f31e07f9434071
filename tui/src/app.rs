//! The terminal UI's state and its one update function: every input (a key,
//! a daemon event, a streamed token) is a [`Msg`]; `update` changes the state
//! and returns the [`Effect`]s the run loop performs (sending, saving,
//! copying). Nothing here does I/O or reads a clock, so every screen can be
//! built in a test by feeding messages.

use paraphym_protocol::client::Piece;
use paraphym_protocol::message::{ErrorKind, Event, Generate, ModelInfo, StatusReport};
use ratatui::crossterm::event::{
    KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseEvent, MouseEventKind,
};

use crate::state::chat::{Conversation, Message, Phase, Role, Settings, Stats};
use crate::state::editor::Editor;
use crate::state::engine::EngineState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Chat, with the engine view beside or below (toggle).
    Chat,
    /// `paraphym watch`: the engine view alone.
    Watch,
}

/// The link to the daemon, as the connection thread reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    Connecting,
    Connected {
        version: String,
    },
    /// Lost or never reached; retrying.
    Down {
        reason: String,
        attempt: u32,
    },
}

/// A list to choose from (models, saved chats).
#[derive(Debug, Clone, PartialEq)]
pub struct Picker {
    pub title: String,
    /// (label, value)
    pub items: Vec<(String, String)>,
    pub selected: usize,
    pub loading: bool,
}

impl Picker {
    /// An empty list waiting for its items.
    fn loading(title: &str) -> Self {
        Self {
            title: title.into(),
            items: Vec::new(),
            selected: 0,
            loading: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Overlay {
    Help,
    Models(Picker),
    Chats(Picker),
}

/// The reply being streamed: its request number and phase.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub req: u64,
    pub phase: Phase,
    pub stopping: bool,
}

#[derive(Debug)]
pub enum Msg {
    Key(KeyEvent),
    Paste(String),
    Mouse(MouseEvent),
    Connected {
        version: String,
        status: StatusReport,
    },
    Down {
        reason: String,
        attempt: u32,
    },
    Event(Event),
    Piece {
        req: u64,
        piece: Piece,
    },
    Failed {
        req: u64,
        kind: Option<ErrorKind>,
        message: String,
    },
    Models(Vec<ModelInfo>),
    /// Saved chats: (id, title), newest first.
    Chats(Vec<(String, String)>),
    Opened(Conversation),
    /// A line for the status bar (an effect's outcome).
    Notice {
        text: String,
        error: bool,
    },
    /// Nothing changed but the screen (a resize): draw again.
    Redraw,
    /// Leave (a signal), as Ctrl+Q.
    Quit,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Generate {
        req: u64,
        request: Generate,
    },
    Cancel {
        req: u64,
    },
    ListModels,
    /// Warm the chat's model up before the first message (as `ollama run`).
    Load(String),
    ListChats,
    OpenChat(String),
    Save(Conversation),
    Export(Conversation),
    /// Put text on the clipboard (OSC 52).
    Copy(String),
}

/// A one-line notice under the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub text: String,
    pub error: bool,
}

#[derive(Debug)]
pub struct App {
    pub mode: Mode,
    /// The socket, as shown in the banner.
    pub socket: String,
    pub link: Link,
    pub conv: Conversation,
    pub reply: Option<Reply>,
    pub editor: Editor,
    /// Editing the user message at this index: sending replaces it and
    /// everything after it.
    pub editing: Option<usize>,
    pub engine: EngineState,
    pub show_engine: bool,
    /// Reasoning blocks shown in full (else one dimmed line each).
    pub show_reasoning: bool,
    /// The transcript's first shown line while scrolled back (`None`:
    /// follow the bottom). Fixed to a line, so a streaming reply doesn't
    /// move what is being read.
    pub scroll: Option<usize>,
    /// (lines, visible rows) of the transcript as last drawn: the layout
    /// that scrolling by keys is measured against (set by the view).
    pub transcript: std::cell::Cell<(usize, usize)>,
    pub overlay: Option<Overlay>,
    pub notice: Option<Notice>,
    next_req: u64,
    /// Where new chat ids come from (the clock; a counter in tests).
    new_id: fn() -> String,
    pub quit: bool,
}

impl App {
    pub fn new(mode: Mode, socket: String, conv: Conversation, new_id: fn() -> String) -> Self {
        Self {
            mode,
            socket,
            link: Link::Connecting,
            conv,
            reply: None,
            editor: Editor::default(),
            editing: None,
            engine: EngineState::default(),
            show_engine: true,
            show_reasoning: false,
            scroll: None,
            transcript: std::cell::Cell::new((0, 0)),
            overlay: None,
            notice: None,
            next_req: 1,
            new_id,
            quit: false,
        }
    }

    pub fn connected(&self) -> bool {
        matches!(self.link, Link::Connected { .. })
    }

    fn say(&mut self, text: impl Into<String>, error: bool) {
        self.notice = Some(Notice {
            text: text.into(),
            error,
        });
    }

    pub fn update(&mut self, msg: Msg) -> Vec<Effect> {
        match msg {
            Msg::Key(k) if k.kind != KeyEventKind::Release => return self.key(k),
            Msg::Key(_) => {}
            Msg::Paste(s) => {
                if self.overlay.is_none() && self.mode == Mode::Chat {
                    self.editor.insert_str(&s);
                }
            }
            Msg::Mouse(m) => match m.kind {
                MouseEventKind::ScrollUp => self.scroll_by(-3),
                MouseEventKind::ScrollDown => self.scroll_by(3),
                _ => {}
            },
            Msg::Connected { version, status } => {
                self.link = Link::Connected { version };
                self.engine.apply_status(&status);
                // Load the chat's model now, so the first answer doesn't
                // wait for it (a loaded one just has its keep-alive renewed).
                if self.mode == Mode::Chat {
                    if let Some(m) = &self.conv.model {
                        return vec![Effect::Load(m.clone())];
                    }
                }
            }
            Msg::Down { reason, attempt } => {
                self.link = Link::Down { reason, attempt };
            }
            Msg::Event(e) => self.engine.apply(&e),
            Msg::Piece { req, piece } => return self.piece(req, piece),
            Msg::Failed { req, kind, message } => return self.failed(req, kind, message),
            Msg::Models(list) => {
                if let Some(Overlay::Models(p)) = &mut self.overlay {
                    p.loading = false;
                    p.items = list
                        .iter()
                        .map(|m| {
                            let label = format!(
                                "{}{}  {}  {}",
                                if m.loaded { "● " } else { "  " },
                                m.reference,
                                m.architecture,
                                crate::view::human_bytes(m.size_bytes)
                            );
                            (label, m.reference.clone())
                        })
                        .collect();
                }
            }
            Msg::Chats(list) => {
                if let Some(Overlay::Chats(p)) = &mut self.overlay {
                    p.loading = false;
                    p.items = list.into_iter().map(|(id, title)| (title, id)).collect();
                }
            }
            Msg::Opened(c) => {
                if self.reply.is_some() {
                    self.say("a reply is streaming: Esc stops it", true);
                } else {
                    self.say(format!("opened “{}”", c.title()), false);
                    self.conv = c;
                    self.scroll = None;
                    self.editing = None;
                }
            }
            Msg::Notice { text, error } => self.say(text, error),
            Msg::Redraw => {}
            Msg::Quit => self.quit = true,
        }
        Vec::new()
    }

    fn key(&mut self, k: KeyEvent) -> Vec<Effect> {
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        let alt = k.modifiers.contains(KeyModifiers::ALT);
        // Keys that work everywhere.
        match k.code {
            KeyCode::Char('c') if ctrl => {
                if let Some(r) = &mut self.reply {
                    r.stopping = true;
                    return vec![Effect::Cancel { req: r.req }];
                }
                self.quit = true;
                return Vec::new();
            }
            KeyCode::Char('q') if ctrl => {
                self.quit = true;
                return Vec::new();
            }
            KeyCode::F(1) => {
                self.overlay = match self.overlay {
                    Some(Overlay::Help) => None,
                    _ => Some(Overlay::Help),
                };
                return Vec::new();
            }
            _ => {}
        }
        if let Some(overlay) = &mut self.overlay {
            return match overlay {
                Overlay::Help => {
                    self.overlay = None;
                    Vec::new()
                }
                Overlay::Models(p) | Overlay::Chats(p) => {
                    match k.code {
                        KeyCode::Esc => self.overlay = None,
                        KeyCode::Up => p.selected = p.selected.saturating_sub(1),
                        KeyCode::Down => {
                            p.selected = (p.selected + 1).min(p.items.len().saturating_sub(1))
                        }
                        KeyCode::Enter => {
                            let chosen = p.items.get(p.selected).map(|(_, v)| v.clone());
                            let models = matches!(overlay, Overlay::Models(_));
                            self.overlay = None;
                            if let Some(v) = chosen {
                                if models {
                                    self.say(format!("model: {v}"), false);
                                    self.conv.model = Some(v.clone());
                                    return vec![Effect::Load(v)];
                                } else {
                                    return vec![Effect::OpenChat(v)];
                                }
                            }
                        }
                        _ => {}
                    }
                    Vec::new()
                }
            };
        }
        if self.mode == Mode::Watch {
            match k.code {
                KeyCode::Char('q') | KeyCode::Esc => self.quit = true,
                KeyCode::Char('?') => self.overlay = Some(Overlay::Help),
                _ => {}
            }
            return Vec::new();
        }
        match k.code {
            KeyCode::Esc => {
                if self.reply.as_ref().is_some_and(|r| r.stopping) {
                    // Asked twice and the daemon hasn't ended it: let go
                    // here (late pieces of it are ignored).
                    return self.abandon();
                }
                if let Some(r) = &mut self.reply {
                    r.stopping = true;
                    return vec![Effect::Cancel { req: r.req }];
                }
                if self.editing.take().is_some() {
                    self.editor.take();
                    self.say("edit abandoned", false);
                }
            }
            KeyCode::Enter if alt || k.modifiers.contains(KeyModifiers::SHIFT) => {
                self.editor.newline()
            }
            KeyCode::Char('j') if ctrl => self.editor.newline(),
            KeyCode::Enter => return self.submit(),
            KeyCode::Char('t') if ctrl => self.show_engine = !self.show_engine,
            KeyCode::Char('x') if ctrl => self.show_reasoning = !self.show_reasoning,
            KeyCode::Char('r') if ctrl => return self.regenerate(),
            KeyCode::Char('n') if ctrl => return self.new_chat(),
            KeyCode::Char('p') if ctrl => return self.open_models(),
            KeyCode::Char('o') if ctrl => {
                self.overlay = Some(Overlay::Chats(Picker::loading("Saved chats (Enter: open)")));
                return vec![Effect::ListChats];
            }
            KeyCode::Char('y') if ctrl => return self.copy_answer(),
            KeyCode::Char('y') if alt => return self.copy_code(),
            KeyCode::Char('e') if ctrl => return vec![Effect::Export(self.conv.clone())],
            KeyCode::Char('w') if ctrl => self.editor.delete_word(),
            KeyCode::Char('u') if ctrl => {
                self.editor.take();
            }
            KeyCode::Char('a') if ctrl => self.editor.home(),
            KeyCode::Char('?') if self.editor.is_empty() => self.overlay = Some(Overlay::Help),
            KeyCode::Char(c) if !ctrl => self.editor.insert(c),
            KeyCode::Tab => self.editor.insert_str("    "),
            KeyCode::Backspace => self.editor.backspace(),
            KeyCode::Delete => self.editor.delete(),
            KeyCode::Left => self.editor.left(),
            KeyCode::Right => self.editor.right(),
            KeyCode::Home => self.editor.home(),
            KeyCode::End => self.editor.end(),
            KeyCode::Up => {
                let moved = self.editor.up();
                if !moved && (self.editor.is_empty() || self.editing.is_some()) {
                    self.edit_previous();
                }
            }
            KeyCode::Down => {
                self.editor.down();
            }
            KeyCode::PageUp => self.scroll_by(-10),
            KeyCode::PageDown => self.scroll_by(10),
            _ => {}
        }
        Vec::new()
    }

    fn open_models(&mut self) -> Vec<Effect> {
        self.overlay = Some(Overlay::Models(Picker::loading(
            "Models (Enter: use for this chat)",
        )));
        vec![Effect::ListModels]
    }

    /// Put the previous user message (before the one being edited) into the
    /// editor; sending replaces it and what follows.
    fn edit_previous(&mut self) {
        if self.reply.is_some() {
            return;
        }
        let before = self.editing.unwrap_or(self.conv.messages.len());
        let Some(i) = self.conv.messages[..before]
            .iter()
            .rposition(|m| m.role == Role::User)
        else {
            return;
        };
        self.editing = Some(i);
        self.editor.set_text(&self.conv.messages[i].content);
        self.say(
            "editing an earlier message: Enter resends from there, Esc abandons",
            false,
        );
    }

    /// Move the transcript `lines` down (negative: back); reaching the
    /// bottom follows it again.
    fn scroll_by(&mut self, lines: isize) {
        let (total, rows) = self.transcript.get();
        let bottom = total.saturating_sub(rows);
        let top = self.scroll.unwrap_or(bottom).min(bottom);
        let next = top.saturating_add_signed(lines).min(bottom);
        self.scroll = (next < bottom).then_some(next);
    }

    /// Whether a new reply may start now; if not, the notice says why.
    fn can_send(&mut self) -> bool {
        if self.reply.is_some() {
            self.say("a reply is streaming: Esc stops it", true);
            false
        } else if !self.connected() {
            self.say("the daemon is not reachable; waiting to reconnect", true);
            false
        } else {
            true
        }
    }

    fn submit(&mut self) -> Vec<Effect> {
        if self.editor.is_empty() {
            return Vec::new();
        }
        let text = self.editor.text();
        if let Some(cmd) = text.trim().strip_prefix('/') {
            self.editor.take();
            return self.command(cmd);
        }
        if !self.can_send() {
            return Vec::new();
        }
        self.editor.take();
        if let Some(i) = self.editing.take() {
            self.conv.messages.truncate(i);
        }
        self.conv.messages.push(Message::user(&text));
        self.start_reply()
    }

    fn start_reply(&mut self) -> Vec<Effect> {
        let req = self.next_req;
        self.next_req += 1;
        let request = Generate {
            model: self.conv.model.clone(),
            prompt: self.conv.request_prompt(),
            options: self.conv.settings.options(),
            keep_alive_ms: None,
            // The chat's id: the daemon prefers the cache of its last turn.
            session: Some(self.conv.id.clone()),
        };
        self.conv.messages.push(Message {
            role: Role::Assistant,
            content: String::new(),
            model: self.conv.model.clone(),
            stats: None,
            error: None,
        });
        self.reply = Some(Reply {
            req,
            phase: Phase::Sent,
            stopping: false,
        });
        self.scroll = None;
        self.notice = None;
        vec![Effect::Generate { req, request }]
    }

    fn regenerate(&mut self) -> Vec<Effect> {
        if !self.can_send() {
            return Vec::new();
        }
        match self.conv.messages.last() {
            Some(m) if m.role == Role::Assistant => {
                self.conv.messages.pop();
                self.start_reply()
            }
            Some(_) => self.start_reply(),
            None => {
                self.say("nothing to regenerate", true);
                Vec::new()
            }
        }
    }

    fn new_chat(&mut self) -> Vec<Effect> {
        if self.reply.is_some() {
            self.say("a reply is streaming: Esc stops it", true);
            return Vec::new();
        }
        let id = (self.new_id)();
        let settings = self.conv.settings.clone();
        let model = self.conv.model.clone();
        self.conv = Conversation::new(id, model);
        self.conv.settings = settings;
        self.editing = None;
        self.scroll = None;
        self.say("new chat", false);
        Vec::new()
    }

    /// The answer to copy: while an earlier message is selected (↑), the
    /// answer to it; else the last one.
    fn chosen_answer(&self) -> Option<&str> {
        let answer = |m: &&Message| m.role == Role::Assistant && !m.content.is_empty();
        let msgs = &self.conv.messages;
        match self.editing {
            Some(i) => msgs[i..].iter().find(answer),
            None => msgs.iter().rev().find(answer),
        }
        .map(|m| m.split_reasoning().1)
    }

    fn copy_answer(&mut self) -> Vec<Effect> {
        match self.chosen_answer().map(str::to_owned) {
            Some(a) => {
                let which = if self.editing.is_some() {
                    "that"
                } else {
                    "the last"
                };
                self.say(format!("copied {which} answer"), false);
                vec![Effect::Copy(a)]
            }
            None => {
                self.say("no answer to copy yet", true);
                Vec::new()
            }
        }
    }

    fn copy_code(&mut self) -> Vec<Effect> {
        let code = self.conv.messages.iter().rev().find_map(|m| {
            (m.role == Role::Assistant)
                .then(|| last_code_block(m.split_reasoning().1))
                .flatten()
        });
        match code {
            Some(c) => {
                self.say("copied the last code block", false);
                vec![Effect::Copy(c)]
            }
            None => {
                self.say("no code block to copy", true);
                Vec::new()
            }
        }
    }

    /// Slash commands: settings and actions typed into the input.
    fn command(&mut self, cmd: &str) -> Vec<Effect> {
        let (name, rest) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
        let rest = rest.trim();
        match name {
            "new" => return self.new_chat(),
            "system" => {
                self.conv.settings.system = (!rest.is_empty()).then(|| rest.to_owned());
                let what = if rest.is_empty() { "cleared" } else { "set" };
                self.say(format!("system prompt {what} for this chat"), false);
            }
            "set" => {
                let (k, v) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                match self.conv.settings.set(k, v.trim()) {
                    Ok(()) => {
                        let s = self.conv.settings.summary();
                        self.say(if s.is_empty() { "defaults".into() } else { s }, false);
                    }
                    Err(e) => self.say(e, true),
                }
            }
            "model" if !rest.is_empty() => {
                self.conv.model = Some(rest.to_owned());
                self.say(format!("model: {rest}"), false);
                return vec![Effect::Load(rest.to_owned())];
            }
            "model" | "models" => return self.open_models(),
            "export" => return vec![Effect::Export(self.conv.clone())],
            "copy" => return self.copy_answer(),
            "code" => return self.copy_code(),
            "regen" | "regenerate" => return self.regenerate(),
            "help" => self.overlay = Some(Overlay::Help),
            "quit" | "exit" => self.quit = true,
            other => self.say(
                format!("unknown command /{other}: /new /system /set /model /export /copy /code /regen /help /quit"),
                true,
            ),
        }
        Vec::new()
    }

    /// End the reply here without waiting for the daemon.
    fn abandon(&mut self) -> Vec<Effect> {
        let Some(r) = self.reply.take() else {
            return Vec::new();
        };
        if let Some(m) = self.conv.messages.last_mut() {
            m.error = Some("stopped (the daemon did not confirm)".into());
        }
        self.say("stopped", false);
        vec![
            Effect::Cancel { req: r.req },
            Effect::Save(self.conv.clone()),
        ]
    }

    fn current(&mut self, req: u64) -> Option<&mut Message> {
        if self.reply.as_ref().map(|r| r.req) != Some(req) {
            return None;
        }
        self.conv
            .messages
            .last_mut()
            .filter(|m| m.role == Role::Assistant)
    }

    fn piece(&mut self, req: u64, piece: Piece) -> Vec<Effect> {
        if self.current(req).is_none() {
            return Vec::new();
        }
        match piece {
            Piece::Stage(s) => {
                if let Some(r) = &mut self.reply {
                    r.phase = Phase::Stage(s);
                }
            }
            // The TUI never asks for them.
            Piece::Logprobs(_) => {}
            Piece::Token(t) => {
                if let Some(m) = self.current(req) {
                    m.content.push_str(&t);
                }
                if let Some(r) = &mut self.reply {
                    r.phase = Phase::Streaming;
                }
            }
            Piece::Done(stats) => {
                let st = Stats::from_gen(&stats);
                self.engine.record_ttft(st.ttft_ms);
                if let Some(m) = self.current(req) {
                    m.stats = Some(st);
                }
                self.reply = None;
                return vec![Effect::Save(self.conv.clone())];
            }
        }
        Vec::new()
    }

    fn failed(&mut self, req: u64, kind: Option<ErrorKind>, message: String) -> Vec<Effect> {
        let Some(m) = self.current(req) else {
            return Vec::new();
        };
        m.error = Some(message.clone());
        self.reply = None;
        let hint = match kind {
            Some(ErrorKind::UnknownModel) => " (Ctrl+P picks a model)",
            Some(ErrorKind::ContextOverflow) => " (Ctrl+N starts a new chat)",
            _ => "",
        };
        self.say(format!("{message}{hint}"), true);
        vec![Effect::Save(self.conv.clone())]
    }

    /// Settings shown in the status bar.
    pub fn settings(&self) -> &Settings {
        &self.conv.settings
    }
}

/// The contents of the last fenced code block in `text`.
pub fn last_code_block(text: &str) -> Option<String> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            match current.take() {
                Some(b) => blocks.push(b.join("\n")),
                None => current = Some(Vec::new()),
            }
        } else if let Some(b) = &mut current {
            b.push(line);
        }
    }
    // An unclosed block (still streaming) counts too.
    if let Some(b) = current {
        blocks.push(b.join("\n"));
    }
    blocks.pop()
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use paraphym_protocol::message::{GenStats, Prompt, Stage, StopReason};

    pub fn test_id() -> String {
        "2".into()
    }

    pub fn key(code: KeyCode) -> Msg {
        Msg::Key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    pub fn ctrl(c: char) -> Msg {
        Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL))
    }

    pub fn typed(app: &mut App, text: &str) {
        for c in text.chars() {
            app.update(key(KeyCode::Char(c)));
        }
    }

    pub fn connected() -> App {
        let mut app = App::new(
            Mode::Chat,
            "/run/user/1000/paraphym-v1/paraphymd.sock".into(),
            Conversation::new("1".into(), Some("/models/qwen3-1.7b.gguf".into())),
            test_id,
        );
        app.update(Msg::Connected {
            version: "0.1.0".into(),
            status: StatusReport::default(),
        });
        app
    }

    pub fn stats(tokens: u32) -> GenStats {
        GenStats {
            prompt_tokens: 12,
            generated_tokens: tokens,
            time_to_first_token_us: 84_000,
            prefill_tokens_per_s: 900.0,
            decode_tokens_per_s: 31.5,
            stop: StopReason::EndOfGeneration,
            cached_tokens: 0,
            dropped_messages: 0,
        }
    }

    /// Send `text` and return the request number and the request.
    pub fn send(app: &mut App, text: &str) -> (u64, Generate) {
        typed(app, text);
        match app.update(key(KeyCode::Enter)).as_slice() {
            [Effect::Generate { req, request }] => (*req, request.clone()),
            other => panic!("{other:?}"),
        }
    }

    fn token(app: &mut App, req: u64, t: &str) {
        app.update(Msg::Piece {
            req,
            piece: Piece::Token(t.into()),
        });
    }

    #[test]
    fn sending_streams_the_reply_and_saves_when_done() {
        let mut app = connected();
        app.conv.settings.set("temperature", "0.2").unwrap();
        let (req, g) = send(&mut app, "Capital of France?");
        assert!(app.editor.is_empty());
        assert_eq!(g.model.as_deref(), Some("/models/qwen3-1.7b.gguf"));
        assert_eq!(g.options.temperature, Some(0.2));
        match &g.prompt {
            Prompt::Chat { messages, .. } => {
                assert_eq!(messages.len(), 1);
                assert_eq!(messages[0].content, "Capital of France?");
            }
            other => panic!("{other:?}"),
        }
        app.update(Msg::Piece {
            req,
            piece: Piece::Stage(Stage::Queued { position: 2 }),
        });
        assert_eq!(
            app.reply.as_ref().unwrap().phase,
            Phase::Stage(Stage::Queued { position: 2 })
        );
        token(&mut app, req, "Paris");
        token(&mut app, req, ".");
        // A stale request's pieces change nothing.
        token(&mut app, req + 7, "junk");
        assert_eq!(app.conv.messages[1].content, "Paris.");
        assert_eq!(app.reply.as_ref().unwrap().phase, Phase::Streaming);
        let fx = app.update(Msg::Piece {
            req,
            piece: Piece::Done(stats(2)),
        });
        assert!(app.reply.is_none());
        assert_eq!(app.conv.messages[1].stats.as_ref().unwrap().tokens, 2);
        assert_eq!(app.engine.ttft_ms.back(), Some(&84));
        assert!(matches!(fx.as_slice(), [Effect::Save(c)] if c.messages.len() == 2));
    }

    #[test]
    fn connecting_loads_the_chats_model_and_raw_mode_sends_the_last_message() {
        let mut app = App::new(
            Mode::Chat,
            "s".into(),
            Conversation::new("1".into(), Some("m".into())),
            test_id,
        );
        let fx = app.update(Msg::Connected {
            version: "0.1.0".into(),
            status: StatusReport::default(),
        });
        assert_eq!(fx, [Effect::Load("m".into())]);
        typed(&mut app, "/set raw on");
        app.update(key(KeyCode::Enter));
        let (_, g) = send(&mut app, "Paris is the capital of");
        assert_eq!(g.prompt, Prompt::Raw("Paris is the capital of".into()));
    }

    #[test]
    fn escape_stops_a_reply_and_nothing_is_sent_while_one_streams() {
        let mut app = connected();
        let (req, _) = send(&mut app, "Hi");
        typed(&mut app, "again");
        assert!(app.update(key(KeyCode::Enter)).is_empty());
        assert!(app.notice.as_ref().unwrap().error);
        assert_eq!(app.editor.text(), "again", "the text waits in the editor");
        assert_eq!(app.update(key(KeyCode::Esc)), [Effect::Cancel { req }]);
        assert!(app.reply.as_ref().unwrap().stopping);
        {
            // A second Esc with no answer from the daemon lets go locally.
            let mut stuck = connected();
            let (r2, _) = send(&mut stuck, "Hi");
            stuck.update(key(KeyCode::Esc));
            let fx = stuck.update(key(KeyCode::Esc));
            assert!(
                matches!(fx.as_slice(), [Effect::Cancel { req }, Effect::Save(_)] if *req == r2)
            );
            assert!(stuck.reply.is_none());
            token(&mut stuck, r2, "late");
            assert!(
                stuck.conv.messages[1].content.is_empty(),
                "late pieces are ignored"
            );
        }
        let mut done = stats(0);
        done.stop = StopReason::Cancelled;
        app.update(Msg::Piece {
            req,
            piece: Piece::Done(done),
        });
        assert_eq!(app.conv.messages[1].stats.as_ref().unwrap().stop, "stopped");
    }

    #[test]
    fn regenerate_replaces_the_last_answer() {
        let mut app = connected();
        let (req, _) = send(&mut app, "Hi");
        token(&mut app, req, "Hello!");
        app.update(Msg::Piece {
            req,
            piece: Piece::Done(stats(1)),
        });
        let fx = app.update(ctrl('r'));
        let [Effect::Generate {
            req: again,
            request,
        }] = fx.as_slice()
        else {
            panic!("{fx:?}")
        };
        assert_ne!(*again, req);
        let Prompt::Chat { messages, .. } = &request.prompt else {
            panic!()
        };
        assert_eq!(messages.len(), 1, "the old answer is not sent back");
        assert_eq!(app.conv.messages.len(), 2);
        assert!(app.conv.messages[1].content.is_empty());
    }

    #[test]
    fn editing_an_earlier_message_resends_from_there() {
        let mut app = connected();
        for q in ["one", "two"] {
            let (req, _) = send(&mut app, q);
            token(&mut app, req, "answer");
            app.update(Msg::Piece {
                req,
                piece: Piece::Done(stats(1)),
            });
        }
        app.update(key(KeyCode::Up));
        assert_eq!(app.editing, Some(2));
        app.update(key(KeyCode::Up));
        assert_eq!(app.editing, Some(0));
        assert_eq!(app.editor.text(), "one");
        app.update(key(KeyCode::End));
        typed(&mut app, " more");
        let fx = app.update(key(KeyCode::Enter));
        assert!(matches!(fx.as_slice(), [Effect::Generate { .. }]));
        let texts: Vec<_> = app
            .conv
            .messages
            .iter()
            .map(|m| m.content.as_str())
            .collect();
        assert_eq!(texts, ["one more", ""]);
        assert_eq!(app.editing, None);
    }

    #[test]
    fn slash_commands_change_settings_and_unknown_ones_say_so() {
        let mut app = connected();
        typed(&mut app, "/system Be brief.");
        app.update(key(KeyCode::Enter));
        typed(&mut app, "/set seed 9");
        app.update(key(KeyCode::Enter));
        assert_eq!(app.conv.settings.system.as_deref(), Some("Be brief."));
        assert_eq!(app.conv.settings.seed, Some(9));
        let (_, g) = send(&mut app, "Hi");
        let Prompt::Chat { messages, .. } = &g.prompt else {
            panic!()
        };
        assert_eq!(messages[0].role, "system");
        assert_eq!(g.options.seed, Some(9));
        let mut app = connected();
        typed(&mut app, "/frobnicate");
        assert!(app.update(key(KeyCode::Enter)).is_empty());
        assert!(app
            .notice
            .as_ref()
            .unwrap()
            .text
            .contains("unknown command"));
    }

    #[test]
    fn offline_sends_are_refused_and_failures_are_shown() {
        let mut app = connected();
        app.update(Msg::Down {
            reason: "not running".into(),
            attempt: 1,
        });
        typed(&mut app, "Hi");
        assert!(app.update(key(KeyCode::Enter)).is_empty());
        assert_eq!(app.editor.text(), "Hi");
        app.update(Msg::Connected {
            version: "0.1.0".into(),
            status: StatusReport::default(),
        });
        let fx = app.update(key(KeyCode::Enter));
        let [Effect::Generate { req, .. }] = fx.as_slice() else {
            panic!()
        };
        let fx = app.update(Msg::Failed {
            req: *req,
            kind: Some(ErrorKind::UnknownModel),
            message: "unknown model x".into(),
        });
        assert!(matches!(fx.as_slice(), [Effect::Save(_)]));
        assert_eq!(
            app.conv.messages[1].error.as_deref(),
            Some("unknown model x")
        );
        assert!(app.notice.as_ref().unwrap().text.contains("Ctrl+P"));
    }

    #[test]
    fn pickers_choose_a_model_and_open_a_chat() {
        let mut app = connected();
        assert_eq!(app.update(ctrl('p')), [Effect::ListModels]);
        app.update(Msg::Models(vec![
            ModelInfo {
                reference: "qwen3".into(),
                path: "/m/q.gguf".into(),
                architecture: "qwen3".into(),
                size_bytes: 1 << 30,
                loaded: true,
            },
            ModelInfo {
                reference: "gemma3".into(),
                path: "/m/g.gguf".into(),
                architecture: "gemma3".into(),
                size_bytes: 1 << 28,
                loaded: false,
            },
        ]));
        app.update(key(KeyCode::Down));
        assert_eq!(
            app.update(key(KeyCode::Enter)),
            [Effect::Load("gemma3".into())]
        );
        assert_eq!(app.conv.model.as_deref(), Some("gemma3"));
        assert!(app.overlay.is_none());
        assert_eq!(app.update(ctrl('o')), [Effect::ListChats]);
        app.update(Msg::Chats(vec![("77".into(), "older chat".into())]));
        assert_eq!(
            app.update(key(KeyCode::Enter)),
            [Effect::OpenChat("77".into())]
        );
    }

    #[test]
    fn copy_takes_the_answer_without_reasoning_or_its_last_code_block() {
        let mut app = connected();
        let (req, _) = send(&mut app, "code?");
        token(
            &mut app,
            req,
            "<think>hm</think>Here:\n```sh\nls -la\n```\n",
        );
        app.update(Msg::Piece {
            req,
            piece: Piece::Done(stats(9)),
        });
        let fx = app.update(ctrl('y'));
        assert_eq!(fx, [Effect::Copy("Here:\n```sh\nls -la\n```\n".into())]);
        let fx = app.update(Msg::Key(KeyEvent::new(
            KeyCode::Char('y'),
            KeyModifiers::ALT,
        )));
        assert_eq!(fx, [Effect::Copy("ls -la".into())]);
    }

    #[test]
    fn scrolling_back_holds_a_line_and_the_bottom_follows_again() {
        let mut app = connected();
        app.transcript.set((100, 20));
        app.update(key(KeyCode::PageUp));
        assert_eq!(app.scroll, Some(70));
        for _ in 0..20 {
            app.update(key(KeyCode::PageUp));
        }
        assert_eq!(app.scroll, Some(0), "clamped at the top");
        app.update(key(KeyCode::PageDown));
        assert_eq!(app.scroll, Some(10));
        // More text arrives: the shown line stays; reaching the end follows.
        app.transcript.set((150, 20));
        for _ in 0..13 {
            app.update(key(KeyCode::PageDown));
        }
        assert_eq!(app.scroll, None);
    }

    #[test]
    fn new_chat_keeps_settings_and_model() {
        let mut app = connected();
        app.conv.settings.seed = Some(3);
        send(&mut app, "Hi");
        assert!(app.update(ctrl('n')).is_empty(), "not while streaming");
        app.reply = None;
        app.update(ctrl('n'));
        assert!(app.conv.messages.is_empty());
        assert_eq!(app.conv.id, "2");
        assert_eq!(app.conv.settings.seed, Some(3));
        assert!(app.conv.model.is_some());
    }
}
