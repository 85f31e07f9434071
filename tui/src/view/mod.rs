//! Rendering: a pure function of [`App`]. Layout: status bar, a banner while
//! the daemon is away, the transcript with the engine view beside it (wide
//! terminals) or below it, the input, and one line for the reply's phase,
//! notices or key hints.

pub mod chat;
pub mod engine;
pub mod markdown;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, List, ListItem, ListState, Paragraph, Wrap};
use ratatui::Frame;
use unicode_width::UnicodeWidthStr;

use crate::app::{App, Link, Mode, Overlay, Picker};
use crate::state::engine::short_name;

/// Below this the layout can't hold; a message says so.
pub const MIN_WIDTH: u16 = 60;
pub const MIN_HEIGHT: u16 = 16;
/// From this width the engine view sits beside the chat.
pub const SIDE_BY_SIDE: u16 = 110;
const ENGINE_COLUMN: u16 = 46;
const ENGINE_ROWS: u16 = 8;

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn render(app: &App, f: &mut Frame) {
    let area = f.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        let msg = format!(
            "paraphym needs at least {MIN_WIDTH}×{MIN_HEIGHT} (this terminal is {}×{})",
            area.width, area.height
        );
        f.render_widget(
            Paragraph::new(msg)
                .wrap(Wrap { trim: true })
                .centered()
                .yellow(),
            area,
        );
        return;
    }
    let banner_h = u16::from(!app.connected());
    let [status, banner, body] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(banner_h),
        Constraint::Min(0),
    ])
    .areas(area);
    status_bar(app, f, status);
    if banner_h > 0 {
        link_banner(app, f, banner);
    }
    match app.mode {
        Mode::Watch => {
            let [engine_area, hints] =
                Layout::vertical([Constraint::Min(0), Constraint::Length(1)]).areas(body);
            engine::render(app, f, engine_area, true);
            f.render_widget(Paragraph::new("q: quit · ?: keys".dark_gray()), hints);
        }
        Mode::Chat => chat_screen(app, f, body),
    }
    if let Some(o) = &app.overlay {
        overlay(app, o, f, area);
    }
}

fn chat_screen(app: &App, f: &mut Frame, body: Rect) {
    let input_h = input_height(app, body.width) + 2;
    let [main, input, footer] = Layout::vertical([
        Constraint::Min(3),
        Constraint::Length(input_h),
        Constraint::Length(1),
    ])
    .areas(body);
    let chat_area = if !app.show_engine {
        main
    } else if main.width >= SIDE_BY_SIDE {
        let [c, e] =
            Layout::horizontal([Constraint::Min(0), Constraint::Length(ENGINE_COLUMN)]).areas(main);
        engine::render(app, f, e, false);
        c
    } else {
        let rows = ENGINE_ROWS.min(main.height.saturating_sub(4));
        let [c, e] = Layout::vertical([Constraint::Min(0), Constraint::Length(rows)]).areas(main);
        engine::render(app, f, e, false);
        c
    };
    let inner = Rect {
        x: chat_area.x + 1,
        width: chat_area.width.saturating_sub(1),
        ..chat_area
    };
    chat::render(app, f, inner);
    input_box(app, f, input);
    footer_line(app, f, footer);
}

fn status_bar(app: &App, f: &mut Frame, area: Rect) {
    let model = app
        .conv
        .model
        .as_deref()
        .map_or("default model", short_name);
    let (dot, link) = match &app.link {
        Link::Connected { version } => (
            Span::styled("●", Style::new().fg(Color::Green)),
            format!(" paraphymd {version}"),
        ),
        Link::Connecting => (
            Span::styled("●", Style::new().fg(Color::Yellow)),
            " connecting".into(),
        ),
        Link::Down { .. } => (
            Span::styled("●", Style::new().fg(Color::Red)),
            " offline".into(),
        ),
    };
    let mut spans = vec![
        Span::styled(
            " paraphym ",
            Style::new()
                .fg(Color::Black)
                .bg(Color::LightGreen)
                .add_modifier(Modifier::BOLD),
        ),
        Span::raw(" "),
        dot,
        Span::raw(link),
    ];
    if app.mode == Mode::Chat {
        spans.push(Span::raw(" │ "));
        spans.push(Span::styled(model.to_owned(), Style::new().bold()));
        spans.push(Span::raw(" │ "));
        spans.push(Span::raw(app.conv.title()));
        let settings = app.settings().summary();
        if !settings.is_empty() {
            spans.push(Span::styled(
                format!(" │ {settings}"),
                Style::new().fg(Color::DarkGray),
            ));
        }
    } else {
        spans.push(Span::raw(" │ engine"));
    }
    f.render_widget(
        Paragraph::new(Line::from(spans)).style(Style::new().bg(Color::Black)),
        area,
    );
}

fn link_banner(app: &App, f: &mut Frame, area: Rect) {
    let text = match &app.link {
        Link::Connecting => format!(" connecting to the daemon at {}…", app.socket),
        Link::Down { reason, attempt } => format!(
            " ✗ daemon unreachable ({reason}) — reconnecting (attempt {attempt}) · {}",
            app.socket
        ),
        Link::Connected { .. } => String::new(),
    };
    let style = match app.link {
        Link::Connecting => Style::new().fg(Color::Black).bg(Color::Yellow),
        _ => Style::new()
            .fg(Color::White)
            .bg(Color::Red)
            .add_modifier(Modifier::BOLD),
    };
    f.render_widget(Paragraph::new(text).style(style), area);
}

/// The editor's lines broken by display width to the box's inner width:
/// the rows, and the cursor's (row, column in cells).
fn input_rows(app: &App, width: u16) -> (Vec<String>, (usize, usize)) {
    let w = width.saturating_sub(2).max(2) as usize;
    let (crow, ccol) = app.editor.cursor();
    let mut rows = Vec::new();
    let mut cursor = (0, 0);
    for (i, line) in app.editor.lines().enumerate() {
        let mut row = String::new();
        let mut used = 0;
        for (n, ch) in line.chars().enumerate() {
            let cw = ch.to_string().width();
            if used + cw > w {
                rows.push(std::mem::take(&mut row));
                used = 0;
            }
            if i == crow && n == ccol {
                cursor = (rows.len(), used);
            }
            row.push(ch);
            used += cw;
        }
        if i == crow && ccol >= line.chars().count() {
            // At the end of the line; past the edge it starts the next row.
            if used >= w {
                rows.push(std::mem::take(&mut row));
                used = 0;
            }
            cursor = (rows.len(), used);
        }
        rows.push(row);
    }
    (rows, cursor)
}

fn input_height(app: &App, width: u16) -> u16 {
    (input_rows(app, width).0.len() as u16).clamp(1, 6)
}

fn input_box(app: &App, f: &mut Frame, area: Rect) {
    let title = match app.editing {
        Some(_) => " Editing an earlier message (Enter resends, Esc abandons) ",
        None => " Message ",
    };
    let border = if app.reply.is_some() {
        Color::DarkGray
    } else {
        Color::Gray
    };
    let block = Block::bordered()
        .title(title)
        .border_style(Style::new().fg(border));
    let inner = block.inner(area);
    f.render_widget(block, area);
    if app.editor.is_empty() {
        f.render_widget(
            Paragraph::new(
                "Type a message · Enter sends · Alt+Enter new line · F1 keys".dark_gray(),
            ),
            inner,
        );
        if app.overlay.is_none() {
            f.set_cursor_position((inner.x, inner.y));
        }
        return;
    }
    let (rows, (cr, cc)) = input_rows(app, area.width);
    let h = inner.height as usize;
    let first = (cr + 1).saturating_sub(h);
    let shown: Vec<Line> = rows
        .iter()
        .skip(first)
        .take(h)
        .map(|r| Line::raw(r.clone()))
        .collect();
    f.render_widget(Paragraph::new(shown), inner);
    if app.overlay.is_none() {
        f.set_cursor_position((inner.x + cc as u16, inner.y + (cr - first) as u16));
    }
}

fn footer_line(app: &App, f: &mut Frame, area: Rect) {
    let line = if let Some(r) = &app.reply {
        let what = if r.stopping {
            "stopping…".to_string()
        } else {
            chat::phase_text(&r.phase)
        };
        Line::from(vec![
            Span::styled(format!(" ⋯ {what}"), Style::new().fg(Color::Cyan)),
            Span::styled(" · Esc stops", Style::new().fg(Color::DarkGray)),
        ])
    } else if let Some(n) = &app.notice {
        let color = if n.error {
            Color::LightRed
        } else {
            Color::Gray
        };
        Line::from(Span::styled(format!(" {}", n.text), Style::new().fg(color)))
    } else {
        Line::from(" Enter send · Ctrl+R regenerate · ↑ edit · Ctrl+T engine · F1 keys".dark_gray())
    };
    f.render_widget(Paragraph::new(line), area);
}

/// A box of `w`×`h` centred in `area` (clamped to it).
fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

pub const KEYS: &[(&str, &str)] = &[
    ("Enter", "send"),
    ("Alt+Enter, Ctrl+J", "new line"),
    ("Esc, Ctrl+C", "stop the reply"),
    ("Ctrl+R", "regenerate the last answer"),
    ("↑ (empty input)", "edit an earlier message"),
    ("Ctrl+N", "new chat"),
    ("Ctrl+O", "open a saved chat"),
    ("Ctrl+P", "pick a model"),
    ("Ctrl+T", "show/hide the engine view"),
    ("Ctrl+X", "show/hide reasoning"),
    (
        "Ctrl+Y / Alt+Y",
        "copy the answer (↑: an earlier one) / code block",
    ),
    ("Ctrl+E", "export the chat to Markdown"),
    ("PgUp/PgDn, wheel", "scroll"),
    ("Ctrl+Q, Ctrl+C", "quit"),
];

pub const COMMANDS: &[(&str, &str)] = &[
    ("/system TEXT", "this chat's system prompt"),
    (
        "/set NAME VALUE",
        "temperature top_p top_k seed max_tokens think",
    ),
    ("/model NAME", "the model for this chat"),
    ("/new /export /copy /code /regen /quit", ""),
];

fn overlay(app: &App, o: &Overlay, f: &mut Frame, area: Rect) {
    match o {
        Overlay::Help => {
            let mut lines = vec![Line::from("Keys".bold())];
            let table: &[(&str, &str)] = if app.mode == Mode::Watch {
                &[("q, Esc", "quit"), ("F1, ?", "this help")]
            } else {
                KEYS
            };
            for (k, v) in table {
                lines.push(Line::from(vec![
                    Span::styled(format!("{k:>20}  "), Style::new().fg(Color::LightYellow)),
                    Span::raw(*v),
                ]));
            }
            if app.mode == Mode::Chat {
                lines.push(Line::default());
                lines.push(Line::from("Commands".bold()));
                for (k, v) in COMMANDS {
                    lines.push(Line::from(vec![
                        Span::styled(format!("  {k}  "), Style::new().fg(Color::LightYellow)),
                        Span::raw(*v),
                    ]));
                }
            }
            let r = centered(area, 76, lines.len() as u16 + 2);
            f.render_widget(Clear, r);
            f.render_widget(
                Paragraph::new(lines).block(Block::bordered().title(" Help (any key closes) ")),
                r,
            );
        }
        Overlay::Models(p) | Overlay::Chats(p) => picker(p, f, area),
    }
}

fn picker(p: &Picker, f: &mut Frame, area: Rect) {
    let r = centered(
        area,
        area.width.saturating_sub(8).min(90),
        (p.items.len() as u16 + 2).clamp(5, 16),
    );
    f.render_widget(Clear, r);
    let block = Block::bordered().title(format!(" {} ", p.title));
    if p.loading || p.items.is_empty() {
        let text = if p.loading {
            "loading…"
        } else {
            "nothing here yet"
        };
        f.render_widget(Paragraph::new(text.dark_gray()).block(block), r);
        return;
    }
    let items: Vec<ListItem> = p
        .items
        .iter()
        .map(|(l, _)| ListItem::new(l.clone()))
        .collect();
    let list = List::new(items)
        .block(block)
        .highlight_style(
            Style::new()
                .bg(Color::DarkGray)
                .add_modifier(Modifier::BOLD),
        )
        .highlight_symbol("▶ ");
    let mut state = ListState::default().with_selected(Some(p.selected));
    f.render_stateful_widget(list, r, &mut state);
}

#[cfg(test)]
mod tests;
