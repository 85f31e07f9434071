//! Tool calls in generated text. Templates that take tools (Qwen3's, and
//! the Hermes format it follows) ask the model to answer a call as
//! `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`; the bridge
//! turns those blocks into OpenAI's `tool_calls` and Ollama's, and keeps them
//! out of the streamed content.

use serde_json::Value;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// A parsed call: the function's name and its arguments (a JSON object).
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: Value,
}

/// The text without its tool-call blocks (trimmed), and the calls. A block
/// whose JSON is not a call stays in the text; an unclosed last block (cut
/// by `max_tokens`) is parsed if its JSON is whole.
pub fn parse(text: &str) -> (String, Vec<Call>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        content.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let (body, next) = match after.find(CLOSE) {
            Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
            None => (after, ""),
        };
        match call(body) {
            Some(c) => calls.push(c),
            None => content.push_str(&rest[start..rest.len() - next.len()]),
        }
        rest = next;
    }
    content.push_str(rest);
    (content.trim().to_owned(), calls)
}

fn call(body: &str) -> Option<Call> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_owned();
    let arguments = match v.get("arguments") {
        // Some models write the arguments as a JSON string.
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
        Some(a) => a.clone(),
        None => Value::Object(Default::default()),
    };
    Some(Call { name, arguments })
}

/// Streamed text with tool calls held back: content goes out as it comes,
/// except from the first `<tool_call>` on (and any tail that may be the start
/// of one), which waits for the end.
#[derive(Debug, Default)]
pub struct Holdback {
    text: String,
    /// Bytes of `text` already sent as content.
    sent: usize,
    /// A call has begun: nothing more is content until the end.
    in_call: bool,
}

impl Holdback {
    /// Add `piece`; the content that can go out now.
    pub fn push(&mut self, piece: &str) -> String {
        self.text.push_str(piece);
        if self.in_call {
            return String::new();
        }
        let pending = &self.text[self.sent..];
        let upto = match pending.find(OPEN) {
            Some(i) => {
                self.in_call = true;
                i
            }
            // Keep back a tail that could still become `<tool_call>`.
            None => (1..OPEN.len())
                .rev()
                .filter(|&n| n <= pending.len() && pending.is_char_boundary(pending.len() - n))
                .find(|&n| OPEN.starts_with(&pending[pending.len() - n..]))
                .map_or(pending.len(), |n| pending.len() - n),
        };
        let out = pending[..upto].to_owned();
        self.sent += upto;
        out
    }

    /// At the end: the content still held back, and the calls.
    pub fn finish(self) -> (String, Vec<Call>) {
        let (_, calls) = parse(&self.text);
        if calls.is_empty() {
            // No call after all: everything held back is content.
            return (self.text[self.sent..].to_owned(), calls);
        }
        let (content, _) = parse(&self.text[self.sent..]);
        (content, calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn blocks_become_calls_and_leave_the_rest_as_content() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": \"{}\"}\n</tool_call>";
        let (content, calls) = parse(text);
        assert_eq!(content, "Let me check.");
        assert_eq!(
            calls,
            vec![
                Call {
                    name: "get_weather".into(),
                    arguments: json!({"city": "Oslo"})
                },
                Call {
                    name: "now".into(),
                    arguments: json!({})
                },
            ]
        );
        // Not a call: stays text. Cut before the close: parsed if whole.
        let (content, calls) = parse("<tool_call>not json</tool_call> ok");
        assert_eq!(
            (content.as_str(), calls.len()),
            ("<tool_call>not json</tool_call> ok", 0)
        );
        let (_, calls) = parse("<tool_call>\n{\"name\": \"x\", \"arguments\": {}}");
        assert_eq!(calls.len(), 1);
        assert_eq!(parse("plain"), ("plain".into(), vec![]));
    }

    #[test]
    fn streaming_holds_back_only_what_may_be_a_call() {
        let mut h = Holdback::default();
        let mut out = String::new();
        for piece in [
            "Sure",
            ", one moment",
            ".\n<tool",
            "_call>\n{\"name\": \"f\", ",
            "\"arguments\": {\"a\": 1}}\n</tool_call>",
        ] {
            out += &h.push(piece);
        }
        assert_eq!(out, "Sure, one moment.\n");
        let (rest, calls) = h.finish();
        assert_eq!(rest, "");
        assert_eq!(calls[0].name, "f");
        // A `<` that is not a call goes out once it is clear.
        let mut h = Holdback::default();
        assert_eq!(h.push("a <"), "a ");
        assert_eq!(h.push("b"), "<b");
        assert_eq!(h.push(" <tool"), " ");
        let (rest, calls) = h.finish();
        assert_eq!((rest.as_str(), calls.len()), ("<tool", 0));
    }
}
