//! Chat templates: the model's own `tokenizer.chat_template` (Jinja) rendered
//! with minijinja the way Hugging Face's `apply_chat_template` renders it, with
//! a per-family fallback for files that carry none.
//!
//! Hugging Face compiles templates with `trim_blocks` and `lstrip_blocks`, and
//! templates call Python string methods (`content.startswith(..)`,
//! `.split(..)`, `.strip(..)`) that minijinja-contrib's pycompat layer supplies;
//! `raise_exception` and `strftime_now` are the two globals it adds.

use std::sync::Arc;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

use super::error::EngineError;
use super::gguf::GgufFile;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may accept others, e.g. `tool`).
    pub role: String,
    pub content: String,
    /// The calls an assistant turn made, as templates read them:
    /// `{"type": "function", "function": {"name": …, "arguments": {…}}}`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<serde_json::Value>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
        }
    }
}

/// How to render a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatOptions {
    /// End with the header of the assistant's turn, for the model to continue.
    pub add_generation_prompt: bool,
    /// Qwen3's switch: `Some(false)` asks for an empty think block. `None`
    /// leaves the variable undefined, as Hugging Face does by default.
    pub enable_thinking: Option<bool>,
    /// Functions the model may call, as OpenAI describes them
    /// (`{"type": "function", "function": {"name", "description",
    /// "parameters"}}`): the template's `tools`.
    pub tools: Arc<Vec<serde_json::Value>>,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            add_generation_prompt: true,
            enable_thinking: None,
            tools: Arc::default(),
        }
    }
}

/// Where a template came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateSource {
    /// `tokenizer.chat_template` in the GGUF file.
    File,
    /// Our fallback for the architecture (the file has none).
    Fallback(&'static str),
}

/// A compiled chat template with the special-token texts it refers to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    source: TemplateSource,
    /// The template reads `tools` (tool use is offered only then).
    takes_tools: bool,
}

const NAME: &str = "chat";

/// ChatML with Qwen3's think switch (Qwen 2/3 files without a template).
const CHATML: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}\
{%- if enable_thinking is defined and enable_thinking is false %}\
{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}";

/// Llama 3 instruct.
const LLAMA3: &str = "{{- bos_token }}{%- for message in messages %}\
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";

/// Gemma 3 instruct: the system prompt joins the first user turn.
const GEMMA: &str = "{{- bos_token }}\
{%- if messages[0].role == 'system' %}{%- set prefix = messages[0].content + '\\n\\n' %}\
{%- set loop_messages = messages[1:] %}{%- else %}{%- set prefix = '' %}\
{%- set loop_messages = messages %}{%- endif %}\
{%- for message in loop_messages %}\
{{- '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\\n' + (prefix if loop.first else '') + message.content | trim + '<end_of_turn>\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}";

/// Phi-4: ChatML with `<|im_sep|>` after the role.
const PHI4: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message.role + '<|im_sep|>' + message.content + '<|im_end|>' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_sep|>' }}{%- endif %}";

/// Phi-3, Phi-3.5 and Phi-4-mini.
const PHI3: &str = "{%- for message in messages %}\
{{- '<|' + message.role + '|>' + message.content + '<|end|>' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- else %}{{- eos_token }}{%- endif %}";

impl ChatTemplate {
    /// The template of the model in `gguf`, or a fallback chosen by the chat
    /// tokens its vocabulary has (`has_token`), else by architecture.
    /// `bos`/`eos` are the texts of the model's BOS and EOS tokens.
    pub fn from_gguf(
        gguf: &GgufFile,
        bos: &str,
        eos: &str,
        has_token: impl Fn(&str) -> bool,
    ) -> Result<Self, EngineError> {
        if let Ok(source) = gguf.get_str("tokenizer.chat_template") {
            match Self::new(source, bos, eos, TemplateSource::File) {
                Ok(t) => return Ok(t),
                // llama.cpp also falls back when a file's template is unusable.
                Err(e) => tracing::warn!("{e}; using the family's fallback template"),
            }
        }
        let (name, source) = Self::fallback(gguf, has_token)?;
        Self::new(source, bos, eos, TemplateSource::Fallback(name))
    }

    /// The template for a file without a usable one: the vocabulary says
    /// which format the model was trained on (Phi-4 is often converted as
    /// `llama`; Phi-3.5 and Phi-4-mini share `phi3`), else the architecture.
    fn fallback(
        gguf: &GgufFile,
        has_token: impl Fn(&str) -> bool,
    ) -> Result<(&'static str, &'static str), EngineError> {
        let found = if has_token("<|im_sep|>") {
            ("phi4", PHI4)
        } else if has_token("<|end|>") && has_token("<|assistant|>") {
            ("phi3", PHI3)
        } else if has_token("<|start_header_id|>") {
            ("llama3", LLAMA3)
        } else if has_token("<start_of_turn>") {
            ("gemma", GEMMA)
        } else {
            match gguf.architecture()? {
                "gemma3" => ("gemma", GEMMA),
                "llama" => ("llama3", LLAMA3),
                _ => ("chatml", CHATML),
            }
        };
        Ok(found)
    }

    /// The template a model is served with, read from its file alone: the
    /// file's own (if it compiles), else the fallback, named.
    pub fn source_of(gguf: &GgufFile) -> Result<(String, TemplateSource), EngineError> {
        if let Ok(source) = gguf.get_str("tokenizer.chat_template") {
            if Self::new(source, "", "", TemplateSource::File).is_ok() {
                return Ok((source.to_owned(), TemplateSource::File));
            }
        }
        let tokens: std::collections::HashSet<&str> = gguf
            .get_array("tokenizer.ggml.tokens")
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let (name, source) = Self::fallback(gguf, |t| tokens.contains(t))?;
        Ok((source.to_owned(), TemplateSource::Fallback(name)))
    }

    /// Compile `source`.
    pub fn new(
        source: &str,
        bos: &str,
        eos: &str,
        origin: TemplateSource,
    ) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| {
                EngineError::Template(format!("the chat template does not compile: {e:#}"))
            })?;
        Ok(Self {
            env,
            bos: bos.to_owned(),
            eos: eos.to_owned(),
            source: origin,
            takes_tools: source.contains("tools"),
        })
    }

    pub fn source(&self) -> TemplateSource {
        self.source
    }

    /// The prompt text for `messages`.
    pub fn render(&self, messages: &[Message], opts: &ChatOptions) -> Result<String, EngineError> {
        if messages.is_empty() {
            return Err(EngineError::InvalidParams(
                "a chat needs at least one message".into(),
            ));
        }
        let template = self.env.get_template(NAME).expect("added at construction");
        let mut ctx = vec![
            ("messages", Value::from_serialize(messages)),
            (
                "add_generation_prompt",
                Value::from(opts.add_generation_prompt),
            ),
            ("bos_token", Value::from(self.bos.as_str())),
            ("eos_token", Value::from(self.eos.as_str())),
        ];
        if let Some(t) = opts.enable_thinking {
            ctx.push(("enable_thinking", Value::from(t)));
        }
        if !opts.tools.is_empty() {
            if !self.takes_tools {
                return Err(EngineError::InvalidParams(
                    "this model's chat template does not take tools".into(),
                ));
            }
            ctx.push(("tools", Value::from_serialize(&*opts.tools)));
        }
        let ctx: Value = ctx.into_iter().collect();
        template
            .render(ctx)
            .map_err(|e| EngineError::Template(format!("rendering the chat template: {e:#}")))
    }
}

/// `tojson` as transformers defines it for templates: Python's
/// `json.dumps` (", " and ": " separators, or `indent`), keys in their
/// order, non-ASCII as is; not jinja2's HTML-safe, key-sorting one.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn py_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let open = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                open(out, level + 1);
                py_json(item, indent, level + 1, out);
            }
            open(out, level);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                open(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                py_json(item, indent, level + 1, out);
            }
            open(out, level);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

/// The time now in UTC (Hugging Face uses the local time; a daemon's clock
/// is usually UTC), formatted with the strftime subset templates use.
fn strftime_now(format: &str) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?
        .as_secs() as i64;
    Ok(strftime(format, secs))
}

/// Format `secs` since the epoch (UTC) with `%d %m %Y %y %b %B %a %A %H %M %S %j %%`.
pub fn strftime(format: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let mname = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&mname[..3]),
            Some('B') => out.push_str(mname),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallbacks_follow_the_vocabulary_then_the_architecture() {
        use crate::engine::gguf::{self, Value};
        let dir = std::env::temp_dir().join(format!("paraphym-tmpl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |arch: &str| {
            let p = dir.join(format!("{arch}.gguf"));
            let md = vec![(
                "general.architecture".to_owned(),
                Value::String(arch.into()),
            )];
            let mut w = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
            gguf::write(&mut w, &md, &[]).unwrap();
            drop(w);
            GgufFile::open(&p).unwrap()
        };
        let pick = |arch: &str, tokens: &[&str]| {
            let g = file(arch);
            ChatTemplate::from_gguf(&g, "", "", |t| tokens.contains(&t))
                .unwrap()
                .source()
        };
        use TemplateSource::Fallback;
        // Phi-4 converted as llama still gets Phi-4's format.
        assert_eq!(
            pick("llama", &["<|im_start|>", "<|im_sep|>"]),
            Fallback("phi4")
        );
        assert_eq!(
            pick("phi3", &["<|end|>", "<|assistant|>"]),
            Fallback("phi3")
        );
        assert_eq!(pick("llama", &["<|start_header_id|>"]), Fallback("llama3"));
        assert_eq!(pick("gemma3", &["<start_of_turn>"]), Fallback("gemma"));
        assert_eq!(pick("qwen3", &["<|im_start|>"]), Fallback("chatml"));
        assert_eq!(pick("gemma3", &[]), Fallback("gemma"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn strftime_matches_known_dates() {
        // 2024-07-26 13:25:09 UTC, a Friday.
        assert_eq!(strftime("%d %b %Y", 1_722_000_309), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %d %H:%M:%S %j %y %%", 1_722_000_309),
            "Friday July 26 13:25:09 208 24 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
    }

    #[test]
    fn fallbacks_render_and_raise_exception_is_an_error() {
        let msgs = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
        ];
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>", TemplateSource::File).unwrap();
        let opts = ChatOptions {
            add_generation_prompt: true,
            enable_thinking: Some(false),
            ..ChatOptions::default()
        };
        assert_eq!(
            t.render(&msgs, &opts).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
        let g = ChatTemplate::new(GEMMA, "<bos>", "<eos>", TemplateSource::File).unwrap();
        assert_eq!(
            g.render(&msgs, &ChatOptions::default()).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
        let bad = ChatTemplate::new(
            "{{ raise_exception('roles must alternate') }}",
            "",
            "",
            TemplateSource::File,
        )
        .unwrap();
        let err = bad.render(&msgs, &ChatOptions::default()).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
        assert!(t.render(&[], &ChatOptions::default()).is_err());
    }
}
