//! Model references: what a user types to name a model, and which file it means.
//!
//! A reference is, in this order of interpretation:
//! 1. a path to an existing file;
//! 2. `hf:owner/name/path/to/file.gguf` (optionally `@revision` at the end);
//! 3. an alias from [`ALIASES`] in Ollama's `family:size` style (`qwen3:1.7b`),
//!    or a bare family name meaning its default size (`qwen3`).
//!
//! Which reference applies is decided by [`choose`]: `--model`, then
//! `PARAPHYM_MODEL`, then `default_model` in the config file, then
//! [`DEFAULT_MODEL`]. Everything here is pure; fetching is [`crate::pull`]'s.

use std::path::{Path, PathBuf};

/// The model used when nothing names one.
pub const DEFAULT_MODEL: &str = "qwen3:1.7b";

/// A short name for a file on the Hugging Face Hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alias {
    pub name: &'static str,
    pub repo: &'static str,
    pub file: &'static str,
    pub quant: &'static str,
    /// What a bare family name (`qwen3`) means.
    pub family_default: bool,
}

const fn alias(
    name: &'static str,
    repo: &'static str,
    file: &'static str,
    quant: &'static str,
    family_default: bool,
) -> Alias {
    Alias {
        name,
        repo,
        file,
        quant,
        family_default,
    }
}

/// The alias table (docs/MODELS.md shows it to users; keep the two in step). Repositories are
/// ungated community conversions; Phi-4's is converted as `llama`.
pub const ALIASES: &[Alias] = &[
    alias(
        "qwen3:0.6b",
        "unsloth/Qwen3-0.6B-GGUF",
        "Qwen3-0.6B-Q4_K_M.gguf",
        "Q4_K_M",
        false,
    ),
    alias(
        "qwen3:1.7b",
        "unsloth/Qwen3-1.7B-GGUF",
        "Qwen3-1.7B-Q4_K_M.gguf",
        "Q4_K_M",
        true,
    ),
    alias(
        "qwen3:4b",
        "unsloth/Qwen3-4B-GGUF",
        "Qwen3-4B-Q4_K_M.gguf",
        "Q4_K_M",
        false,
    ),
    alias(
        "qwen3:8b",
        "unsloth/Qwen3-8B-GGUF",
        "Qwen3-8B-Q4_K_M.gguf",
        "Q4_K_M",
        false,
    ),
    alias(
        "phi4",
        "unsloth/phi-4-GGUF",
        "phi-4-Q4_K_M.gguf",
        "Q4_K_M",
        true,
    ),
    alias(
        "phi4-mini",
        "unsloth/Phi-4-mini-instruct-GGUF",
        "Phi-4-mini-instruct-Q4_K_M.gguf",
        "Q4_K_M",
        true,
    ),
    alias(
        "gemma3:270m",
        "unsloth/gemma-3-270m-it-GGUF",
        "gemma-3-270m-it-Q4_K_M.gguf",
        "Q4_K_M",
        false,
    ),
    alias(
        "gemma3:1b",
        "unsloth/gemma-3-1b-it-GGUF",
        "gemma-3-1b-it-Q4_K_M.gguf",
        "Q4_K_M",
        true,
    ),
    alias(
        "gemma3:4b",
        "unsloth/gemma-3-4b-it-GGUF",
        "gemma-3-4b-it-Q4_K_M.gguf",
        "Q4_K_M",
        false,
    ),
    alias(
        "llama3.2:1b",
        "unsloth/Llama-3.2-1B-Instruct-GGUF",
        "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        "Q4_K_M",
        false,
    ),
    alias(
        "llama3.2:3b",
        "unsloth/Llama-3.2-3B-Instruct-GGUF",
        "Llama-3.2-3B-Instruct-Q4_K_M.gguf",
        "Q4_K_M",
        true,
    ),
];

/// A file on the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    /// `owner/name`.
    pub repo: String,
    /// Path of the file inside the repository.
    pub file: String,
    /// Branch, tag or commit (`main` when not given).
    pub revision: String,
}

/// What a reference names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Model {
    Path(PathBuf),
    Hub(HubFile),
}

/// Where the reference in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Env,
    Config,
    Default,
}

impl Origin {
    pub fn describe(self) -> &'static str {
        match self {
            Origin::Flag => "--model",
            Origin::Env => "PARAPHYM_MODEL",
            Origin::Config => "default_model in the config file",
            Origin::Default => "the built-in default",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    #[error(
        "`{0}` is not a model paraphym knows: not an existing file, not an alias \
         ({aliases}), and not `hf:owner/name/file.gguf`",
        aliases = alias_names()
    )]
    Unknown(String),
    #[error(
        "`{0}` is not a valid Hub reference: write hf:owner/name/path/to/file.gguf[@revision]"
    )]
    BadHubRef(String),
    #[error("`{0}` looks like a path, but there is no file there")]
    MissingFile(String),
    #[error("config file {path}: {reason}")]
    Config { path: String, reason: String },
}

fn alias_names() -> String {
    ALIASES
        .iter()
        .map(|a| a.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The reference to use, and where it came from: `--model`, then
/// `PARAPHYM_MODEL`, then the config file's `default_model`, then the default.
/// Empty strings count as unset.
pub fn choose<'a>(
    flag: Option<&'a str>,
    env: Option<&'a str>,
    config: Option<&'a str>,
) -> (&'a str, Origin) {
    let set = |s: Option<&'a str>| s.filter(|s| !s.trim().is_empty());
    if let Some(s) = set(flag) {
        (s, Origin::Flag)
    } else if let Some(s) = set(env) {
        (s, Origin::Env)
    } else if let Some(s) = set(config) {
        (s, Origin::Config)
    } else {
        (DEFAULT_MODEL, Origin::Default)
    }
}

/// Interpret `reference`; `exists` says whether a path names a file (injected
/// so that this stays pure).
pub fn parse(reference: &str, exists: impl Fn(&Path) -> bool) -> Result<Model, RefError> {
    let r = reference.trim();
    if exists(Path::new(r)) {
        return Ok(Model::Path(PathBuf::from(r)));
    }
    if let Some(rest) = r.strip_prefix("hf:") {
        return parse_hub(rest).ok_or_else(|| RefError::BadHubRef(r.to_owned()));
    }
    let lower = r.to_ascii_lowercase();
    if let Some(a) = ALIASES.iter().find(|a| a.name == lower) {
        return Ok(Model::Hub(hub(a)));
    }
    if let Some(a) = ALIASES.iter().find(|a| {
        a.family_default && a.name.split(':').next() == Some(lower.as_str()) && !lower.contains(':')
    }) {
        return Ok(Model::Hub(hub(a)));
    }
    let looks_like_path = r.contains('/') || r.ends_with(".gguf") || r.starts_with('.');
    if looks_like_path {
        return Err(RefError::MissingFile(r.to_owned()));
    }
    Err(RefError::Unknown(r.to_owned()))
}

fn hub(a: &Alias) -> HubFile {
    HubFile {
        repo: a.repo.to_owned(),
        file: a.file.to_owned(),
        revision: "main".to_owned(),
    }
}

fn parse_hub(rest: &str) -> Option<Model> {
    // Names, and revisions (branches, tags, commits), as the Hub spells them.
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !s.starts_with('.')
    };
    let (path, revision) = match rest.rsplit_once('@') {
        Some((p, rev)) if ok(rev) => (p, rev),
        Some(_) => return None,
        None => (rest, "main"),
    };
    let mut parts = path.splitn(3, '/');
    let (owner, name, file) = (parts.next()?, parts.next()?, parts.next()?);
    let file_ok = file
        .split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if !ok(owner) || !ok(name) || !file_ok || !file.ends_with(".gguf") {
        return None;
    }
    Some(Model::Hub(HubFile {
        repo: format!("{owner}/{name}"),
        file: file.to_owned(),
        revision: revision.to_owned(),
    }))
}

/// paraphym's config file: `$XDG_CONFIG_HOME/paraphym/config.toml`, else
/// `~/.config/paraphym/config.toml`.
pub fn config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("paraphym").join("config.toml"))
}

/// The settings the config file may hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub default_model: Option<String>,
    /// Ollama's models folder, served in place as `ollama:name:tag`.
    pub ollama_models: Option<PathBuf>,
    /// LM Studio's models folder, served in place as `lmstudio:…`.
    pub lmstudio_models: Option<PathBuf>,
}

impl Config {
    /// Parse the config file's text.
    pub fn parse(text: &str, path: &Path) -> Result<Self, RefError> {
        toml::from_str(text).map_err(|e| RefError::Config {
            path: path.display().to_string(),
            reason: e.message().to_owned(),
        })
    }

    /// Read the config file; a missing file is an empty config.
    pub fn load() -> Result<Self, RefError> {
        let Some(path) = config_path() else {
            return Ok(Self::default());
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(RefError::Config {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &Path) -> bool {
        false
    }

    #[test]
    fn resolution_order_is_flag_env_config_default() {
        assert_eq!(choose(Some("a"), Some("b"), Some("c")), ("a", Origin::Flag));
        assert_eq!(choose(None, Some("b"), Some("c")), ("b", Origin::Env));
        assert_eq!(
            choose(Some(" "), Some(""), Some("c")),
            ("c", Origin::Config)
        );
        assert_eq!(choose(None, None, None), (DEFAULT_MODEL, Origin::Default));
    }

    #[test]
    fn references_parse() {
        let hubfile = |repo: &str, file: &str, rev: &str| {
            Model::Hub(HubFile {
                repo: repo.into(),
                file: file.into(),
                revision: rev.into(),
            })
        };
        assert_eq!(
            parse("qwen3:1.7b", none).unwrap(),
            hubfile("unsloth/Qwen3-1.7B-GGUF", "Qwen3-1.7B-Q4_K_M.gguf", "main")
        );
        assert_eq!(
            parse("Qwen3", none).unwrap(),
            parse("qwen3:1.7b", none).unwrap()
        );
        assert_eq!(
            parse("phi4-mini", none).unwrap(),
            hubfile(
                "unsloth/Phi-4-mini-instruct-GGUF",
                "Phi-4-mini-instruct-Q4_K_M.gguf",
                "main"
            )
        );
        assert_eq!(
            parse("hf:org/repo-GGUF/sub/dir/m.Q4_K_M.gguf@v1.2", none).unwrap(),
            hubfile("org/repo-GGUF", "sub/dir/m.Q4_K_M.gguf", "v1.2")
        );
        for bad in [
            "hf:org/repo",
            "hf:org//m.gguf",
            "hf:org/repo/m.bin",
            "hf:o/r/../m.gguf",
            "hf:o/r/m.gguf@",
            "hf:o/r/m.gguf@..",
            "hf:o/r/m.gguf@a#b",
        ] {
            assert_eq!(
                parse(bad, none),
                Err(RefError::BadHubRef(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            parse("./missing.gguf", none),
            Err(RefError::MissingFile("./missing.gguf".into()))
        );
        let err = parse("qwen9:1b", none).unwrap_err();
        assert!(err.to_string().contains("qwen3:1.7b"), "{err}");
        // An existing file wins, even if it is named like an alias.
        assert_eq!(parse("phi4", |_| true).unwrap(), Model::Path("phi4".into()));
        // Every alias is distinct and parses to itself.
        for a in ALIASES {
            assert!(matches!(parse(a.name, none), Ok(Model::Hub(h)) if h.file == a.file));
        }
    }

    #[test]
    fn config_file_parses_and_rejects_unknown_keys() {
        let p = Path::new("config.toml");
        assert_eq!(
            Config::parse("default_model = \"phi4\"\n", p)
                .unwrap()
                .default_model
                .as_deref(),
            Some("phi4")
        );
        assert_eq!(Config::parse("", p).unwrap(), Config::default());
        let err = Config::parse("default_modle = \"x\"", p).unwrap_err();
        assert!(err.to_string().contains("config.toml"), "{err}");
    }
}
