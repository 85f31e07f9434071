//! Markdown as terminal lines, for text that may still be streaming: fenced
//! code blocks, headings, lists, quotes, `inline code` and **bold**, wrapped
//! to a width with hanging indents. Line-based on purpose: a half-received
//! answer renders the same way as when it is complete.

use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use unicode_width::UnicodeWidthStr;

pub const CODE: Style = Style::new().fg(Color::LightYellow);
const CODE_BAR: Style = Style::new().fg(Color::DarkGray);
const INLINE_CODE: Style = Style::new().fg(Color::LightYellow);

/// Word-wrap styled runs to `width` columns: the first line starts with
/// `first`, the others with `rest` (a hanging indent).
pub fn wrap(
    runs: &[(String, Style)],
    width: usize,
    first: Vec<Span<'static>>,
    rest: Vec<Span<'static>>,
) -> Vec<Line<'static>> {
    let prefix_w = |p: &[Span]| p.iter().map(|s| s.content.width()).sum::<usize>();
    let mut lines = Vec::new();
    let mut cur: Vec<Span<'static>> = first.clone();
    let mut used = prefix_w(&first);
    let mut empty = true;
    let rest_w = prefix_w(&rest);
    let avail_rest = width.saturating_sub(rest_w).max(1);
    for (text, style) in runs {
        for token in tokens(text) {
            let w = token.width();
            let space = token.chars().all(char::is_whitespace);
            if space {
                if !empty && used + w <= width {
                    cur.push(Span::styled(token.to_owned(), *style));
                    used += w;
                }
                continue;
            }
            if used + w > width && !empty {
                lines.push(Line::from(std::mem::replace(&mut cur, rest.clone())));
                used = rest_w;
                empty = true;
                // Trailing spaces of the broken line are harmless; leading
                // ones of the next are never added (see above).
            }
            if w > width.saturating_sub(used) {
                // A word longer than a line: break it by characters.
                let mut chunk = String::new();
                let mut cw = 0;
                for ch in token.chars() {
                    let chw = UnicodeWidthStr::width(ch.encode_utf8(&mut [0; 4]) as &str);
                    if used + cw + chw > width && (cw > 0 || !empty) {
                        cur.push(Span::styled(std::mem::take(&mut chunk), *style));
                        lines.push(Line::from(std::mem::replace(&mut cur, rest.clone())));
                        used = rest_w;
                        cw = 0;
                        empty = true;
                        if avail_rest == 0 {
                            break;
                        }
                    }
                    chunk.push(ch);
                    cw += chw;
                }
                if !chunk.is_empty() {
                    cur.push(Span::styled(chunk, *style));
                    used += cw;
                    empty = false;
                }
                continue;
            }
            cur.push(Span::styled(token.to_owned(), *style));
            used += w;
            empty = false;
        }
    }
    lines.push(Line::from(cur));
    lines
}

/// Words and runs of whitespace, in order.
fn tokens(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_space = None;
    for (i, c) in text.char_indices() {
        let s = c.is_whitespace();
        if in_space.is_some_and(|prev| prev != s) {
            out.push(&text[start..i]);
            start = i;
        }
        in_space = Some(s);
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

/// `code` and **bold** inside a line, as styled runs.
pub fn inline(text: &str, base: Style) -> Vec<(String, Style)> {
    let mut runs = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let tick = rest.find('`');
        let star = rest.find("**");
        let next = match (tick, star) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(at) = next else {
            runs.push((rest.to_owned(), base));
            break;
        };
        let (marker, style) = if rest[at..].starts_with("**") {
            ("**", base.add_modifier(Modifier::BOLD))
        } else {
            ("`", INLINE_CODE)
        };
        let inner_start = at + marker.len();
        match rest[inner_start..].find(marker) {
            Some(len) if len > 0 => {
                if at > 0 {
                    runs.push((rest[..at].to_owned(), base));
                }
                runs.push((rest[inner_start..inner_start + len].to_owned(), style));
                rest = &rest[inner_start + len + marker.len()..];
            }
            _ => {
                // Unclosed (still streaming, or literal): as is.
                runs.push((rest[..inner_start].to_owned(), base));
                rest = &rest[inner_start..];
            }
        }
    }
    runs
}

/// Render `text` as Markdown lines of at most `width` columns, each starting
/// with `indent`.
pub fn render(text: &str, width: usize, base: Style, indent: &str) -> Vec<Line<'static>> {
    let mut out = Vec::new();
    let mut in_code = false;
    let pad = || Span::raw(indent.to_owned());
    for line in text.split('\n') {
        let t = line.trim_start();
        if t.starts_with("```") {
            in_code = !in_code;
            if in_code {
                let lang = t.trim_start_matches('`').trim();
                let label = if lang.is_empty() {
                    "code".to_owned()
                } else {
                    lang.to_owned()
                };
                out.push(Line::from(vec![
                    pad(),
                    Span::styled(format!("╭─ {label}"), CODE_BAR),
                ]));
            } else {
                out.push(Line::from(vec![pad(), Span::styled("╰─", CODE_BAR)]));
            }
            continue;
        }
        if in_code {
            // Code keeps its spacing: broken by characters, never by words.
            let runs = [(line.replace('\t', "    "), CODE)];
            let bar = || vec![pad(), Span::styled("│ ", CODE_BAR)];
            out.extend(wrap_chars(&runs[0].0, CODE, width, bar()));
            continue;
        }
        if t.is_empty() {
            out.push(Line::from(pad()));
            continue;
        }
        let lead = line.len() - t.len();
        let nest = " ".repeat(lead.min(8));
        if let Some(h) = heading(t) {
            let style = base.add_modifier(Modifier::BOLD);
            out.extend(wrap(&inline(h, style), width, vec![pad()], vec![pad()]));
        } else if let Some(item) = t
            .strip_prefix("- ")
            .or_else(|| t.strip_prefix("* "))
            .or_else(|| t.strip_prefix("+ "))
        {
            let first = vec![pad(), Span::raw(nest.clone()), Span::styled("• ", base)];
            let rest = vec![pad(), Span::raw(format!("{nest}  "))];
            out.extend(wrap(&inline(item, base), width, first, rest));
        } else if let Some((num, item)) = numbered(t) {
            let label = format!("{num}. ");
            let rest = vec![
                pad(),
                Span::raw(format!("{nest}{}", " ".repeat(label.len()))),
            ];
            let first = vec![pad(), Span::raw(nest.clone()), Span::styled(label, base)];
            out.extend(wrap(&inline(item, base), width, first, rest));
        } else if let Some(q) = t.strip_prefix('>') {
            let style = base.add_modifier(Modifier::ITALIC);
            let bar = || vec![pad(), Span::styled("▎ ", CODE_BAR)];
            out.extend(wrap(&inline(q.trim_start(), style), width, bar(), bar()));
        } else {
            out.extend(wrap(&inline(line, base), width, vec![pad()], vec![pad()]));
        }
    }
    out
}

fn heading(t: &str) -> Option<&str> {
    let hashes = t.bytes().take_while(|&b| b == b'#').count();
    (1..=6)
        .contains(&hashes)
        .then(|| t[hashes..].strip_prefix(' '))
        .flatten()
}

fn numbered(t: &str) -> Option<(&str, &str)> {
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 3 {
        return None;
    }
    t[digits..]
        .strip_prefix(". ")
        .map(|rest| (&t[..digits], rest))
}

/// Break `text` by characters (code: spacing kept).
fn wrap_chars(
    text: &str,
    style: Style,
    width: usize,
    prefix: Vec<Span<'static>>,
) -> Vec<Line<'static>> {
    let pw: usize = prefix.iter().map(|s| s.content.width()).sum();
    let avail = width.saturating_sub(pw).max(1);
    let mut lines = Vec::new();
    let mut chunk = String::new();
    let mut w = 0;
    for ch in text.chars() {
        let cw = UnicodeWidthStr::width(ch.encode_utf8(&mut [0; 4]) as &str);
        if w + cw > avail && w > 0 {
            let mut spans = prefix.clone();
            spans.push(Span::styled(std::mem::take(&mut chunk), style));
            lines.push(Line::from(spans));
            w = 0;
        }
        chunk.push(ch);
        w += cw;
    }
    let mut spans = prefix;
    spans.push(Span::styled(chunk, style));
    lines.push(Line::from(spans));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(lines: &[Line]) -> Vec<String> {
        lines
            .iter()
            .map(|l| {
                l.spans
                    .iter()
                    .map(|s| s.content.as_ref())
                    .collect::<String>()
            })
            .collect()
    }

    #[test]
    fn words_wrap_with_a_hanging_indent() {
        let lines = render("- one two three four five six", 14, Style::new(), "");
        assert_eq!(plain(&lines), ["• one two ", "  three four ", "  five six"]);
        for l in plain(&lines) {
            assert!(l.width() <= 14, "{l:?}");
        }
    }

    #[test]
    fn code_blocks_keep_spacing_and_style_even_unclosed() {
        let lines = render("Look:\n```rust\nfn  main() {}\n", 40, Style::new(), "  ");
        let text = plain(&lines);
        assert_eq!(text[1], "  ╭─ rust");
        assert_eq!(text[2], "  │ fn  main() {}");
        let code = lines[2].spans.last().unwrap();
        assert_eq!(code.style, CODE);
    }

    #[test]
    fn inline_code_and_bold_are_styled_and_unclosed_markers_stay() {
        let runs = inline("use `cargo` **now** or *", Style::new());
        let texts: Vec<_> = runs.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(texts, ["use ", "cargo", " ", "now", " or *"]);
        assert_eq!(runs[1].1, INLINE_CODE);
        assert!(runs[3].1.add_modifier.contains(Modifier::BOLD));
        let open = inline("a `b", Style::new());
        assert_eq!(
            open.iter().map(|(t, _)| t.as_str()).collect::<String>(),
            "a `b"
        );
    }

    #[test]
    fn long_words_break_and_wide_characters_count_double() {
        let lines = wrap(&[("abcdefghij".into(), Style::new())], 4, vec![], vec![]);
        assert_eq!(plain(&lines), ["abcd", "efgh", "ij"]);
        let lines = wrap(&[("日本語です".into(), Style::new())], 4, vec![], vec![]);
        assert_eq!(plain(&lines), ["日本", "語で", "す"]);
    }
}
