//! Snapshots of the main screens (ratatui's TestBackend) and checks of the
//! cells that matter: state names and their colours, the banner, the phase.

use paraphym_protocol::client::Piece;
use paraphym_protocol::message::{
    BreakerState, Event, Metrics, ModelMetrics, Stage, WorkerMetrics, WorkerSnapshot, WorkerState,
};
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::style::Color;
use ratatui::Terminal;

use crate::app::tests::{connected, ctrl, send, stats};
use crate::app::{App, Mode, Msg};

fn draw(app: &App, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| super::render(app, f)).unwrap();
    t
}

fn text(buf: &Buffer) -> String {
    let mut s = String::new();
    for y in 0..buf.area.height {
        for x in 0..buf.area.width {
            s.push_str(buf[(x, y)].symbol());
        }
        s.push('\n');
    }
    s
}

/// The position of the first cell of `needle` on screen.
fn find(buf: &Buffer, needle: &str) -> Option<(u16, u16)> {
    let n: Vec<char> = needle.chars().collect();
    for y in 0..buf.area.height {
        let row: Vec<String> = (0..buf.area.width)
            .map(|x| buf[(x, y)].symbol().to_owned())
            .collect();
        for x in 0..row.len() {
            if n.iter()
                .enumerate()
                .all(|(i, c)| row.get(x + i).is_some_and(|s| s == &c.to_string()))
            {
                return Some((x as u16, y));
            }
        }
    }
    None
}

fn fg_at(buf: &Buffer, needle: &str) -> Color {
    let (x, y) =
        find(buf, needle).unwrap_or_else(|| panic!("{needle:?} not on screen:\n{}", text(buf)));
    buf[(x, y)].fg
}

const MODEL: &str = "/models/qwen3-1.7b.gguf";

fn metrics(at_s: u64, workers: &[(u32, WorkerState, f32)]) -> Msg {
    let tps: f32 = workers.iter().map(|w| w.2).sum();
    Msg::Event(Event::Metrics(Metrics {
        at_ms: at_s * 1000,
        memory_used_bytes: 3 << 30,
        memory_estimated_bytes: 2 << 30,
        models: vec![ModelMetrics {
            reference: MODEL.into(),
            queued: 0,
            tokens_per_s: tps,
            breaker: BreakerState::Closed,
            workers: workers
                .iter()
                .map(|&(id, state, t)| WorkerMetrics {
                    id,
                    state,
                    tokens_per_s: t,
                    sequences: u32::from(state == WorkerState::Busy),
                    batch: 8,
                })
                .collect(),
        }],
    }))
}

fn with_budget(app: &mut App) {
    app.engine.memory_budget = 16 << 30;
}

fn worker(app: &mut App, id: u32, state: WorkerState) {
    app.update(Msg::Event(Event::Worker {
        model: MODEL.into(),
        worker: WorkerSnapshot {
            id,
            state,
            requests_served: 0,
            tokens_per_s: 0.0,
            sequences: u32::from(state == WorkerState::Busy),
            batch: 8,
        },
    }));
}

#[test]
fn empty_chat() {
    let mut app = connected();
    with_budget(&mut app);
    app.update(metrics(
        10,
        &[(1, WorkerState::Idle, 0.0), (2, WorkerState::Idle, 0.0)],
    ));
    let t = draw(&app, 80, 24);
    insta::assert_snapshot!(t.backend());
    let buf = t.backend().buffer();
    assert_eq!(fg_at(buf, "#1 idle"), Color::Green);
    assert_eq!(fg_at(buf, "●"), Color::Green, "connected");
    assert!(find(buf, "Type a message").is_some());
}

#[test]
fn streaming_mid_answer() {
    let mut app = connected();
    with_budget(&mut app);
    let (req, _) = send(&mut app, "Write a list and some code.");
    app.update(Msg::Piece {
        req,
        piece: Piece::Stage(Stage::Prefill {
            done: 256,
            total: 512,
        }),
    });
    let t = draw(&app, 80, 24);
    assert!(find(t.backend().buffer(), "reading the prompt: 256/512 tokens").is_some());
    for piece in [
        "Sure:\n\n- first **item**\n- second `item`\n\n```rust\nfn main() {",
        "\n    println!(\"hi\");",
    ] {
        app.update(Msg::Piece {
            req,
            piece: Piece::Token(piece.into()),
        });
    }
    for s in 1..=30 {
        app.update(metrics(
            s,
            &[
                (1, WorkerState::Busy, 20.0 + s as f32),
                (2, WorkerState::Idle, 0.0),
            ],
        ));
    }
    let t = draw(&app, 80, 24);
    insta::assert_snapshot!(t.backend());
    let buf = t.backend().buffer();
    assert_eq!(fg_at(buf, "#1 busy"), Color::Yellow);
    assert_eq!(fg_at(buf, "▌"), Color::LightGreen, "the stream's cursor");
    assert!(find(buf, "generating…").is_some());
}

fn reasoning_app() -> App {
    let mut app = connected();
    let (req, _) = send(&mut app, "Capital of France?");
    app.update(Msg::Piece {
        req,
        piece: Piece::Token(
            "<think>\nThe user asks for the capital of France. That is Paris.\n</think>\n\nParis."
                .into(),
        ),
    });
    app.update(Msg::Piece {
        req,
        piece: Piece::Done(stats(20)),
    });
    app.update(ctrl('t'));
    app
}

#[test]
fn reasoning_collapsed() {
    let app = reasoning_app();
    let t = draw(&app, 80, 24);
    insta::assert_snapshot!(t.backend());
    let buf = t.backend().buffer();
    assert_eq!(fg_at(buf, "▸ reasoning · 11 words"), Color::DarkGray);
    assert!(find(buf, "That is Paris").is_none());
    assert!(find(buf, "20 tokens · 31.5 tok/s · first token 84 ms").is_some());
}

#[test]
fn reasoning_expanded() {
    let mut app = reasoning_app();
    app.update(ctrl('x'));
    let t = draw(&app, 80, 24);
    insta::assert_snapshot!(t.backend());
    assert!(find(t.backend().buffer(), "That is Paris.").is_some());
}

fn engine_app(mode: Mode) -> App {
    let mut app = connected();
    app.mode = mode;
    with_budget(&mut app);
    for s in 0..=90u64 {
        let t = (s % 30) as f32;
        app.update(metrics(
            s,
            &[(1, WorkerState::Busy, t), (2, WorkerState::Busy, 30.0 - t)],
        ));
    }
    worker(&mut app, 2, WorkerState::Idle);
    worker(&mut app, 3, WorkerState::Spawning);
    worker(&mut app, 4, WorkerState::Loading);
    worker(&mut app, 5, WorkerState::Stopping);
    worker(&mut app, 6, WorkerState::Failed);
    app.update(Msg::Event(Event::Breaker {
        model: "/models/broken.gguf".into(),
        state: BreakerState::Open,
        message: "load failed: bad magic".into(),
    }));
    for ms in [84.0, 120.0, 95.0, 300.0, 88.0] {
        app.engine.record_ttft(ms);
    }
    app
}

#[test]
fn engine_view_with_workers_in_several_states() {
    let app = engine_app(Mode::Watch);
    let t = draw(&app, 100, 30);
    insta::assert_snapshot!(t.backend());
    let buf = t.backend().buffer();
    for (label, color) in [
        ("#1 busy", Color::Yellow),
        ("#2 idle", Color::Green),
        ("#3 spawning", Color::Cyan),
        ("#4 loading", Color::Cyan),
        ("#5 draining", Color::Magenta),
        ("#6 failed", Color::Red),
        ("breaker OPEN", Color::Red),
    ] {
        assert_eq!(fg_at(buf, label), color, "{label}");
    }
    assert!(find(buf, "mem 3.0 GiB / 16.0 GiB").is_some());
    assert!(find(buf, "-2m").is_some(), "the chart's time axis");
}

#[test]
fn wide_terminal_puts_the_engine_beside_the_chat() {
    let app = engine_app(Mode::Chat);
    let t = draw(&app, 140, 30);
    insta::assert_snapshot!(t.backend());
    let buf = t.backend().buffer();
    let (x, _) = find(buf, " Engine ").unwrap();
    assert!(x > 80, "beside, not below: {x}");
}

#[test]
fn tiny_terminal() {
    let app = connected();
    let t = draw(&app, 50, 12);
    insta::assert_snapshot!(t.backend());
    assert!(find(t.backend().buffer(), "needs at least 60×16").is_some());
}

#[test]
fn daemon_gone_shows_the_banner() {
    let mut app = connected();
    app.update(Msg::Down {
        reason: "connection lost".into(),
        attempt: 3,
    });
    let t = draw(&app, 80, 24);
    insta::assert_snapshot!(t.backend());
    let buf = t.backend().buffer();
    let (x, y) = find(buf, "daemon unreachable").unwrap();
    assert_eq!(buf[(x, y)].bg, Color::Red);
    assert_eq!(fg_at(buf, "●"), Color::Red);
}

#[test]
fn help_lists_the_keys() {
    let mut app = connected();
    app.update(Msg::Key(ratatui::crossterm::event::KeyEvent::from(
        ratatui::crossterm::event::KeyCode::F(1),
    )));
    let t = draw(&app, 80, 30);
    insta::assert_snapshot!(t.backend());
    assert!(find(t.backend().buffer(), "regenerate the last answer").is_some());
}

#[test]
fn the_input_wraps_by_display_width_and_the_cursor_follows() {
    let mut app = connected();
    app.update(Msg::Paste("日本語".repeat(12)));
    let t = draw(&app, 60, 20);
    let buf = t.backend().buffer();
    // 36 double-width characters in a 58-cell box: 29 per row, 7 left.
    let (rows, cursor) = super::input_rows(&app, 60);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].chars().count(), 29);
    assert_eq!(cursor, (1, 14));
    for y in 0..20 {
        assert!(text_row(buf, y).chars().count() <= 60);
    }
    let mut t = t;
    let pos = t.get_cursor_position().unwrap();
    // The box is rows 15-18 (two text rows, borders), above the footer;
    // its text starts at column 1.
    assert_eq!((pos.x, pos.y), (1 + 14, 17));
}

fn text_row(buf: &Buffer, y: u16) -> String {
    (0..buf.area.width)
        .map(|x| buf[(x, y)].symbol().to_owned())
        .collect()
}
