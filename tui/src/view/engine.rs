//! The engine view: every worker of every loaded model in its state's
//! colour, queues, breakers, a memory gauge against the governor's budget,
//! throughput over the last two minutes per model, and our own time to
//! first token.

use paraphym_protocol::message::{BreakerState, WorkerState};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::symbols;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, LineGauge, Paragraph, Sparkline};
use ratatui::Frame;

use super::human_bytes;
use crate::app::App;
use crate::state::engine::{EngineState, WINDOW_S};

/// A worker state's name as users read it (`Stopping` is draining).
pub fn state_name(s: WorkerState) -> &'static str {
    match s {
        WorkerState::Spawning => "spawning",
        WorkerState::Loading => "loading",
        WorkerState::Idle => "idle",
        WorkerState::Busy => "busy",
        WorkerState::Stopping => "draining",
        WorkerState::Stopped => "stopped",
        WorkerState::Unhealthy => "unhealthy",
        WorkerState::Failed => "failed",
    }
}

pub fn state_color(s: WorkerState) -> Color {
    match s {
        WorkerState::Idle => Color::Green,
        WorkerState::Busy => Color::Yellow,
        WorkerState::Spawning | WorkerState::Loading => Color::Cyan,
        WorkerState::Stopping => Color::Magenta,
        WorkerState::Stopped => Color::DarkGray,
        WorkerState::Unhealthy | WorkerState::Failed => Color::Red,
    }
}

fn breaker(b: BreakerState) -> Span<'static> {
    match b {
        BreakerState::Closed => Span::styled("breaker closed", Style::new().fg(Color::DarkGray)),
        BreakerState::Open => Span::styled("breaker OPEN", Style::new().fg(Color::Red).bold()),
        BreakerState::HalfOpen => Span::styled("breaker half-open", Style::new().fg(Color::Yellow)),
    }
}

/// Colours the models' series take, in order.
const SERIES: [Color; 6] = [
    Color::LightGreen,
    Color::LightBlue,
    Color::LightMagenta,
    Color::LightYellow,
    Color::LightCyan,
    Color::LightRed,
];

/// The text part: per model a header line and its workers as chips,
/// wrapped to the width; then recent notes.
pub fn text_lines(e: &EngineState, width: usize) -> Vec<Line<'static>> {
    let mut out = Vec::new();
    if e.models.is_empty() {
        out.push(Line::from("no model loaded".dark_gray()));
    }
    for (i, m) in e.models.iter().enumerate() {
        let color = SERIES[i % SERIES.len()];
        out.push(Line::from(vec![
            Span::styled(
                m.name().to_owned(),
                Style::new().fg(color).add_modifier(Modifier::BOLD),
            ),
            Span::raw(format!(
                "  {:.1} tok/s  queue {}  ",
                m.tokens_per_s, m.queued
            )),
            breaker(m.breaker),
        ]));
        let mut line: Vec<Span<'static>> = vec![Span::raw(" ")];
        let mut used = 1;
        for w in &m.workers {
            // The two scaling dials: the chips are the workers; a busy one
            // shows the requests in its batch, of the most it takes.
            let speed = if w.state == WorkerState::Busy {
                format!(" {}/{} {:.0}", w.sequences, w.batch, w.tokens_per_s)
            } else {
                String::new()
            };
            let chip = format!("#{} {}{speed}", w.id, state_name(w.state));
            let cw = chip.chars().count() + 2;
            if used + cw > width && used > 1 {
                out.push(Line::from(std::mem::replace(
                    &mut line,
                    vec![Span::raw(" ")],
                )));
                used = 1;
            }
            line.push(Span::styled(
                format!("[{chip}]"),
                Style::new().fg(state_color(w.state)),
            ));
            line.push(Span::raw(" "));
            used += cw + 1;
        }
        if m.workers.is_empty() {
            line.push(Span::styled("no workers", Style::new().fg(Color::DarkGray)));
        }
        out.push(Line::from(line));
    }
    for n in e.notes.iter().rev().take(2) {
        out.push(Line::from(Span::styled(
            format!("· {n}"),
            Style::new().fg(Color::DarkGray),
        )));
    }
    out
}

fn memory_gauge(e: &EngineState) -> LineGauge<'static> {
    let (ratio, label) = if e.memory_budget > 0 {
        let r = (e.memory_used as f64 / e.memory_budget as f64).clamp(0.0, 1.0);
        (
            r,
            format!(
                "mem {} / {} (accounted {})",
                human_bytes(e.memory_used),
                human_bytes(e.memory_budget),
                human_bytes(e.memory_estimated)
            ),
        )
    } else {
        (
            0.0,
            format!("mem {} (no budget)", human_bytes(e.memory_used)),
        )
    };
    let color = if ratio > 0.9 {
        Color::Red
    } else if ratio > 0.7 {
        Color::Yellow
    } else {
        Color::Green
    };
    LineGauge::default()
        .ratio(ratio)
        .label(label)
        .filled_style(Style::new().fg(color))
        .unfilled_style(Style::new().fg(Color::DarkGray))
}

/// Each model's history as points relative to now.
fn series(e: &EngineState) -> Vec<Vec<(f64, f64)>> {
    e.models
        .iter()
        .map(|m| m.history.iter().map(|&(t, v)| (t - e.now_s, v)).collect())
        .collect()
}

fn chart<'a>(e: &EngineState, series: &'a [Vec<(f64, f64)>]) -> Chart<'a> {
    let mut top: f64 = 1.0;
    let datasets: Vec<Dataset<'a>> = e
        .models
        .iter()
        .zip(series)
        .enumerate()
        .map(|(i, (m, points))| {
            top = points.iter().map(|p| p.1).fold(top, f64::max);
            Dataset::default()
                .name(format!("{} {:.1}", m.name(), m.tokens_per_s))
                .marker(symbols::Marker::Braille)
                .graph_type(GraphType::Line)
                .style(Style::new().fg(SERIES[i % SERIES.len()]))
                .data(points)
        })
        .collect();
    // A y-axis that scales with what it shows, in round steps.
    let step = if top > 100.0 {
        50.0
    } else if top > 20.0 {
        10.0
    } else {
        5.0
    };
    let ymax = (top * 1.1 / step).ceil() * step;
    Chart::new(datasets)
        .x_axis(
            Axis::default()
                .bounds([-WINDOW_S, 0.0])
                .labels(["-2m", "-1m", "now"])
                .style(Style::new().fg(Color::DarkGray)),
        )
        .y_axis(
            Axis::default()
                .bounds([0.0, ymax])
                .labels(["0".to_string(), format!("{ymax:.0}")])
                .style(Style::new().fg(Color::DarkGray)),
        )
        .legend_position(Some(ratatui::widgets::LegendPosition::TopLeft))
}

fn sparkline<'a>(values: &'a [u64], color: Color) -> Sparkline<'a> {
    // An explicit floor: with all values 0 the automatic maximum is 0 and
    // every bar would be drawn full.
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    Sparkline::default()
        .data(values)
        .max(max)
        .style(Style::new().fg(color))
}

/// The engine panel in `area`, with a border; `full` for `paraphym watch`.
pub fn render(app: &App, f: &mut Frame, area: Rect, full: bool) {
    let e = &app.engine;
    let title = Line::from(vec![
        " Engine ".bold(),
        Span::raw(format!(
            "{:.1} tok/s · queue {} ",
            e.total_tokens_per_s(),
            e.queued()
        )),
    ]);
    let mut block = Block::bordered()
        .title(title)
        .border_style(Style::new().fg(Color::DarkGray));
    if !full {
        block = block.title(Line::from(" Ctrl+T hides ".dark_gray()).right_aligned());
    }
    let inner = block.inner(area);
    f.render_widget(block, area);
    if inner.height == 0 || inner.width < 10 {
        return;
    }
    let text = text_lines(e, inner.width as usize);
    let text_h = (text.len() as u16).min(inner.height.saturating_sub(1));
    let [gauge, body, rest] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(text_h),
        Constraint::Min(0),
    ])
    .areas(inner);
    f.render_widget(memory_gauge(e), gauge);
    f.render_widget(Paragraph::new(text), body);
    let ttft: Vec<u64> = e.ttft_ms.iter().copied().collect();
    let last_ttft = e
        .ttft_ms
        .back()
        .map_or("–".to_string(), |v| format!("{v} ms"));
    if rest.height >= 8 {
        let [chart_area, label, spark] = Layout::vertical([
            Constraint::Min(5),
            Constraint::Length(1),
            Constraint::Length(2),
        ])
        .areas(rest);
        let points = series(e);
        f.render_widget(chart(e, &points), chart_area);
        f.render_widget(
            Paragraph::new(format!("time to first token (this client): {last_ttft}").dark_gray()),
            label,
        );
        f.render_widget(sparkline(&ttft, Color::LightCyan), spark);
    } else if rest.height >= 2 {
        // Too short for a chart: the total throughput as a sparkline.
        let total: Vec<u64> = total_series(e);
        let [label, spark] =
            Layout::vertical([Constraint::Length(1), Constraint::Min(1)]).areas(rest);
        f.render_widget(
            Paragraph::new(format!("tok/s, last 2 min · first token {last_ttft}").dark_gray()),
            label,
        );
        f.render_widget(sparkline(&total, Color::LightGreen), spark);
    }
}

/// All models' throughput summed per sample time, oldest first.
fn total_series(e: &EngineState) -> Vec<u64> {
    let mut times: Vec<f64> = e
        .models
        .iter()
        .flat_map(|m| m.history.iter().map(|p| p.0))
        .collect();
    times.sort_by(f64::total_cmp);
    times.dedup();
    times
        .iter()
        .map(|t| {
            e.models
                .iter()
                .filter_map(|m| m.history.iter().find(|p| p.0 == *t).map(|p| p.1))
                .sum::<f64>()
                .round() as u64
        })
        .collect()
}
