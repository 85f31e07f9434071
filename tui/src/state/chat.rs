//! A conversation: its messages, the reply being streamed, its settings, and
//! the per-message statistics. Saved as JSON under the user's data directory.

use paraphym_protocol::message::{
    ChatMessage, GenStats, Options, Overflow, Prompt, Stage, StopReason,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    User,
    Assistant,
}

/// What a finished reply measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub ttft_ms: f64,
    pub tokens_per_s: f32,
    pub tokens: u32,
    pub prompt_tokens: u32,
    pub stop: String,
    /// Prompt tokens the daemon's cache already held (earlier turns).
    #[serde(default)]
    pub cached_tokens: u32,
    /// Earlier messages left out to fit the context.
    #[serde(default)]
    pub dropped_messages: u32,
}

impl Stats {
    pub fn from_gen(s: &GenStats) -> Self {
        Self {
            ttft_ms: s.time_to_first_token_us as f64 / 1e3,
            tokens_per_s: s.decode_tokens_per_s,
            tokens: s.generated_tokens,
            prompt_tokens: s.prompt_tokens,
            cached_tokens: s.cached_tokens,
            dropped_messages: s.dropped_messages,
            stop: match s.stop {
                StopReason::EndOfGeneration => "end".into(),
                StopReason::MaxTokens => "max tokens".into(),
                StopReason::StopString(i) => format!("stop string {i}"),
                StopReason::ContextFull => "context full".into(),
                StopReason::Cancelled => "stopped".into(),
            },
        }
    }
}

/// Where a reply is before it finishes.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Sent; no answer yet.
    Sent,
    Stage(Stage),
    Streaming,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// The model that wrote it (assistant messages).
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub stats: Option<Stats>,
    /// Why it ended early, if it did (an error, a stop).
    #[serde(default)]
    pub error: Option<String>,
}

impl Message {
    pub fn user(text: &str) -> Self {
        Self {
            role: Role::User,
            content: text.to_owned(),
            model: None,
            stats: None,
            error: None,
        }
    }

    /// (reasoning, answer): Qwen3 writes `<think>…</think>` before its
    /// answer; an unclosed block is all reasoning so far.
    pub fn split_reasoning(&self) -> (Option<&str>, &str) {
        split_reasoning(&self.content)
    }
}

pub fn split_reasoning(text: &str) -> (Option<&str>, &str) {
    let t = text.trim_start();
    match t.strip_prefix("<think>") {
        Some(rest) => match rest.find("</think>") {
            Some(end) => (
                Some(rest[..end].trim()),
                rest[end + "</think>".len()..].trim_start(),
            ),
            None => (Some(rest.trim()), ""),
        },
        None => (None, text),
    }
}

/// Sampling and prompt settings of one chat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Settings {
    pub system: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    pub max_tokens: Option<u32>,
    /// Qwen3's thinking switch (`None`: the template's default).
    pub think: Option<bool>,
    /// Completion, not chat: the last message is sent as raw text for the
    /// model to continue (base models, which have no chat template).
    #[serde(default)]
    pub raw: bool,
}

impl Settings {
    pub fn options(&self) -> Options {
        Options {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            max_tokens: self.max_tokens,
            // A long chat keeps going: its oldest turns make room, and the
            // reply's statistics say how many were left out.
            overflow: Overflow::DropOldest,
            ..Options::default()
        }
    }

    /// Apply `name value` (from `/set`); an error says what is accepted.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let off = matches!(value, "" | "default" | "off" | "none");
        fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, String> {
            v.parse().map_err(|_| format!("{name}: not a number: {v}"))
        }
        match name {
            "temperature" | "temp" => {
                self.temperature = (!off).then(|| num(name, value)).transpose()?
            }
            "top_p" => self.top_p = (!off).then(|| num(name, value)).transpose()?,
            "top_k" => self.top_k = (!off).then(|| num(name, value)).transpose()?,
            "seed" => self.seed = (!off).then(|| num(name, value)).transpose()?,
            "max_tokens" => self.max_tokens = (!off).then(|| num(name, value)).transpose()?,
            "raw" => {
                self.raw = match value {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" | "default" | "" => false,
                    v => return Err(format!("raw: on or off, not {v}")),
                }
            }
            "think" => {
                self.think = match value {
                    "on" | "true" | "yes" => Some(true),
                    "off" | "false" | "no" => Some(false),
                    "default" | "" => None,
                    v => return Err(format!("think: on, off or default, not {v}")),
                }
            }
            other => {
                return Err(format!(
                "unknown setting {other}: temperature, top_p, top_k, seed, max_tokens, think, raw"
            ))
            }
        }
        Ok(())
    }

    /// A short summary for the status line.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = self.temperature {
            parts.push(format!("temp {t}"));
        }
        if let Some(p) = self.top_p {
            parts.push(format!("top_p {p}"));
        }
        if let Some(k) = self.top_k {
            parts.push(format!("top_k {k}"));
        }
        if let Some(s) = self.seed {
            parts.push(format!("seed {s}"));
        }
        if let Some(m) = self.max_tokens {
            parts.push(format!("max {m}"));
        }
        if let Some(t) = self.think {
            parts.push(format!("think {}", if t { "on" } else { "off" }));
        }
        if self.system.is_some() {
            parts.push("system prompt".into());
        }
        if self.raw {
            parts.push("raw".into());
        }
        parts.join(" · ")
    }
}

/// One conversation, as saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Conversation {
    /// File name stem: creation time, sortable.
    pub id: String,
    pub model: Option<String>,
    pub settings: Settings,
    pub messages: Vec<Message>,
}

impl Conversation {
    pub fn new(id: String, model: Option<String>) -> Self {
        Self {
            id,
            model,
            ..Self::default()
        }
    }

    /// The first user message's first line, shortened.
    pub fn title(&self) -> String {
        let first = self
            .messages
            .iter()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.lines().next().unwrap_or("").trim().to_owned())
            .unwrap_or_default();
        if first.is_empty() {
            return "new chat".into();
        }
        let mut t: String = first.chars().take(40).collect();
        if first.chars().count() > 40 {
            t.push('…');
        }
        t
    }

    /// The messages sent for the next reply: the system prompt, then every
    /// finished message (reasoning is not sent back, as the templates expect).
    pub fn prompt(&self) -> Vec<ChatMessage> {
        let mut out = Vec::new();
        if let Some(s) = &self.settings.system {
            out.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
                tool_calls: Vec::new(),
            });
        }
        for m in &self.messages {
            let (role, content) = match m.role {
                Role::User => ("user", m.content.as_str()),
                Role::Assistant => ("assistant", m.split_reasoning().1),
            };
            out.push(ChatMessage {
                role: role.into(),
                content: content.to_owned(),
                tool_calls: Vec::new(),
            });
        }
        out
    }

    /// The prompt for the next reply: the conversation through the model's
    /// chat template, or (raw) the last user message as text to continue.
    pub fn request_prompt(&self) -> Prompt {
        if self.settings.raw {
            let last = self
                .messages
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map_or(String::new(), |m| m.content.clone());
            return Prompt::Raw(last);
        }
        Prompt::Chat {
            messages: self.prompt(),
            think: self.settings.think,
        }
    }

    /// The conversation as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut s = format!("# {}\n\n", self.title());
        if let Some(m) = &self.model {
            s.push_str(&format!("Model: `{m}`\n\n"));
        }
        if let Some(sys) = &self.settings.system {
            s.push_str(&format!("**System:** {sys}\n\n"));
        }
        for m in &self.messages {
            match m.role {
                Role::User => s.push_str("## You\n\n"),
                Role::Assistant => s.push_str("## Assistant\n\n"),
            }
            let (reasoning, answer) = m.split_reasoning();
            if let Some(r) = reasoning.filter(|r| !r.is_empty()) {
                s.push_str("<details><summary>Reasoning</summary>\n\n");
                s.push_str(r);
                s.push_str("\n\n</details>\n\n");
            }
            s.push_str(answer.trim_end());
            s.push_str("\n\n");
            if let Some(st) = &m.stats {
                s.push_str(&format!(
                    "_{} tokens · {:.1} tok/s · first token {:.0} ms_\n\n",
                    st.tokens, st.tokens_per_s, st.ttft_ms
                ));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_is_split_from_the_answer_while_streaming_and_after() {
        assert_eq!(split_reasoning("<think>\nhmm"), (Some("hmm"), ""));
        assert_eq!(
            split_reasoning("<think>\nhmm\n</think>\n\nParis."),
            (Some("hmm"), "Paris.")
        );
        assert_eq!(split_reasoning("Paris."), (None, "Paris."));
    }

    #[test]
    fn settings_parse_and_reset() {
        let mut s = Settings::default();
        s.set("temperature", "0.5").unwrap();
        s.set("seed", "7").unwrap();
        s.set("think", "off").unwrap();
        assert_eq!(s.options().temperature, Some(0.5));
        assert_eq!(s.options().seed, Some(7));
        assert_eq!(s.summary(), "temp 0.5 · seed 7 · think off");
        s.set("raw", "on").unwrap();
        assert!(s.raw);
        s.set("temperature", "default").unwrap();
        assert_eq!(s.temperature, None);
        assert!(s.set("temperature", "hot").is_err());
        assert!(s.set("colour", "1").is_err());
    }

    #[test]
    fn the_prompt_drops_reasoning_and_starts_with_the_system_prompt() {
        let mut c = Conversation::new("1".into(), None);
        c.settings.system = Some("Be brief.".into());
        c.messages.push(Message::user("Capital of France?"));
        c.messages.push(Message {
            role: Role::Assistant,
            content: "<think>easy</think>Paris.".into(),
            ..Message::user("")
        });
        let p = c.prompt();
        let roles: Vec<_> = p.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
        assert_eq!(p[2].content, "Paris.");
        assert_eq!(c.title(), "Capital of France?");
        let md = c.to_markdown();
        assert!(md.contains("## Assistant\n\n<details>"), "{md}");
        assert!(md.contains("Paris."));
    }
}
