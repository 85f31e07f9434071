//! The transcript: messages as wrapped lines, the reply streaming at the
//! bottom, reasoning collapsed or shown, per-message statistics.

use paraphym_protocol::message::Stage;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Scrollbar, ScrollbarOrientation, ScrollbarState};
use ratatui::Frame;

use super::markdown;
use crate::app::App;
use crate::state::chat::{Message, Phase, Role};
use crate::state::engine::short_name;

pub const YOU: Style = Style::new()
    .fg(Color::LightBlue)
    .add_modifier(Modifier::BOLD);
pub const ASSISTANT: Style = Style::new()
    .fg(Color::LightGreen)
    .add_modifier(Modifier::BOLD);
const DIM: Style = Style::new().fg(Color::DarkGray);
const REASONING: Style = Style::new()
    .fg(Color::DarkGray)
    .add_modifier(Modifier::ITALIC);

/// What the reply is doing before its first token, in words.
pub fn phase_text(phase: &Phase) -> String {
    match phase {
        Phase::Sent => "waiting for the daemon…".into(),
        Phase::Stage(Stage::Queued { position }) => format!("queued: position {position}"),
        Phase::Stage(Stage::Loading { percent }) => format!("loading the model: {percent}%"),
        Phase::Stage(Stage::Prefill { done, total }) => {
            format!("reading the prompt: {done}/{total} tokens")
        }
        Phase::Stage(Stage::Generating) | Phase::Streaming => "generating…".into(),
    }
}

/// Every line of the transcript at `width` columns.
pub fn lines(app: &App, width: usize) -> Vec<Line<'static>> {
    let mut out = Vec::new();
    let n = app.conv.messages.len();
    for (i, m) in app.conv.messages.iter().enumerate() {
        let streaming = app.reply.is_some() && i + 1 == n && m.role == Role::Assistant;
        message(&mut out, app, m, i, streaming, width);
        out.push(Line::default());
    }
    out
}

fn message(
    out: &mut Vec<Line<'static>>,
    app: &App,
    m: &Message,
    i: usize,
    streaming: bool,
    width: usize,
) {
    match m.role {
        Role::User => {
            let mut head = vec![Span::styled("You", YOU)];
            if app.editing == Some(i) {
                head.push(Span::styled("  (editing)", Style::new().fg(Color::Yellow)));
            }
            out.push(Line::from(head));
            for l in m.content.split('\n') {
                out.extend(markdown::wrap(
                    &[(l.to_owned(), Style::new())],
                    width,
                    vec![Span::raw("  ")],
                    vec![Span::raw("  ")],
                ));
            }
        }
        Role::Assistant => {
            let mut head = vec![Span::styled("Assistant", ASSISTANT)];
            if let Some(model) = &m.model {
                head.push(Span::styled(format!(" · {}", short_name(model)), DIM));
            }
            out.push(Line::from(head));
            let (reasoning, answer) = m.split_reasoning();
            if let Some(r) = reasoning {
                let thinking = streaming && answer.is_empty();
                if app.show_reasoning {
                    out.push(Line::from(Span::styled(
                        "  ▾ reasoning (Ctrl+X hides)",
                        REASONING,
                    )));
                    for l in r.split('\n') {
                        out.extend(markdown::wrap(
                            &[(l.to_owned(), REASONING)],
                            width,
                            vec![Span::styled("  ┊ ", DIM)],
                            vec![Span::styled("  ┊ ", DIM)],
                        ));
                    }
                } else {
                    let words = r.split_whitespace().count();
                    let what = if thinking { "thinking" } else { "reasoning" };
                    out.push(Line::from(Span::styled(
                        format!("  ▸ {what} · {words} words (Ctrl+X shows)"),
                        REASONING,
                    )));
                }
            }
            if !answer.is_empty() {
                out.extend(markdown::render(answer, width, Style::new(), "  "));
            }
            if streaming {
                let phase = app.reply.as_ref().map(|r| &r.phase);
                match phase {
                    Some(p @ (Phase::Sent | Phase::Stage(_))) if m.content.is_empty() => {
                        out.push(Line::from(Span::styled(
                            format!("  ⋯ {}", phase_text(p)),
                            Style::new().fg(Color::Cyan),
                        )));
                    }
                    _ => {
                        // The cursor of the stream, after the last text.
                        let cursor = Span::styled("▌", Style::new().fg(Color::LightGreen));
                        match out.last_mut() {
                            Some(l) if !answer.is_empty() => l.spans.push(cursor),
                            _ => out.push(Line::from(vec![Span::raw("  "), cursor])),
                        }
                    }
                }
            }
            if let Some(e) = &m.error {
                out.extend(markdown::wrap(
                    &[(format!("✗ {e}"), Style::new().fg(Color::LightRed))],
                    width,
                    vec![Span::raw("  ")],
                    vec![Span::raw("    ")],
                ));
            }
            if let Some(s) = &m.stats {
                let mut line = format!(
                    "  {} tokens · {:.1} tok/s · first token {:.0} ms · {}",
                    s.tokens, s.tokens_per_s, s.ttft_ms, s.stop
                );
                if s.cached_tokens > 0 {
                    line += &format!(" · {} prompt tokens cached", s.cached_tokens);
                }
                if s.dropped_messages > 0 {
                    line += &format!(
                        " · {} earlier messages left out to fit the context",
                        s.dropped_messages
                    );
                }
                out.push(Line::from(Span::styled(line, DIM)));
            }
        }
    }
}

pub fn render(app: &App, f: &mut Frame, area: Rect) {
    if app.conv.messages.is_empty() {
        return welcome(app, f, area);
    }
    let width = area.width.saturating_sub(1) as usize; // the scrollbar's column
    let all = lines(app, width.max(1));
    let height = area.height as usize;
    let max_scroll = all.len().saturating_sub(height);
    let top = app.scroll.map_or(max_scroll, |t| t.min(max_scroll));
    app.transcript.set((all.len(), height));
    let shown: Vec<Line> = all.iter().skip(top).take(height).cloned().collect();
    f.render_widget(Paragraph::new(shown), area);
    if max_scroll > 0 {
        let mut state = ScrollbarState::new(max_scroll).position(top);
        f.render_stateful_widget(
            Scrollbar::new(ScrollbarOrientation::VerticalRight)
                .begin_symbol(None)
                .end_symbol(None),
            area,
            &mut state,
        );
    }
}

fn welcome(app: &App, f: &mut Frame, area: Rect) {
    let model = app
        .conv
        .model
        .as_deref()
        .map_or("the daemon's default model".to_owned(), |m| {
            short_name(m).to_owned()
        });
    let text = vec![
        Line::default(),
        Line::from(vec![
            "paraphym".bold(),
            Span::raw(format!(" — chat with {model}")),
        ]),
        Line::default(),
        Line::from("Type a message and press Enter.".dark_gray()),
        Line::from("Alt+Enter: new line · Ctrl+P: pick a model · F1: keys".dark_gray()),
    ];
    f.render_widget(Paragraph::new(text).centered(), area);
}
