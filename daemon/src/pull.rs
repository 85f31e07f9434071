//! Pulling model files from the Hugging Face Hub into its standard cache
//! (`$HF_HOME/hub`, shared with every other Hugging Face tool): resumable,
//! checked against the Hub's sha256, with progress, and usable offline.
//!
//! The transfer is `hf-hub`'s (sync API): a `.part` file in `blobs/` grows
//! with `Range` requests, so an interrupted pull continues where it stopped.
//! Around it we add what it leaves out: `HF_TOKEN` and `HF_HUB_OFFLINE`,
//! errors that say what to do (gated repository, missing file, no network),
//! a sha256 check against the LFS etag, and a `.part` that is already whole
//! (the Hub answers 416 to its resume request) is started over.

use std::io::Read;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use sha2::{Digest, Sha256};

use crate::registry::{self, HubFile};

pub use hf_hub::api::Progress;

/// Where and how to reach the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// `https://huggingface.co` or a mirror (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The hub cache directory (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// `HF_TOKEN`, else the token file `huggingface-cli login` writes.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE=1`: use the cache only.
    pub offline: bool,
}

impl HubConfig {
    /// The configuration the Hugging Face tools read from the environment.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            base.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(home.join("token"))
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
        });
        // huggingface_hub's truthy values.
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
        });
        Self {
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_owned())
                .unwrap_or_else(|| "https://huggingface.co".into()),
            cache_dir,
            token,
            offline,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(
        "{repo} does not exist, or is gated or private and no Hugging Face token is set: check \
         the name, accept its licence at {endpoint}/{repo}, then set HF_TOKEN (or run \
         `huggingface-cli login`)"
    )]
    NeedsToken { repo: String, endpoint: String },
    #[error(
        "your Hugging Face token has no access to {repo}: check the name, and accept its licence \
         at {endpoint}/{repo} with the account the token belongs to"
    )]
    Forbidden { repo: String, endpoint: String },
    #[error("{file} is not in {repo} (revision {revision}): check the name at {endpoint}/{repo}")]
    NotFound {
        repo: String,
        file: String,
        revision: String,
        endpoint: String,
    },
    #[error(
        "{repo}/{file} is not in the local cache ({cache}) and HF_HUB_OFFLINE is set: \
         unset it to download, or name a local file with --model / PARAPHYM_MODEL"
    )]
    NotCached {
        repo: String,
        file: String,
        cache: String,
    },
    #[error(
        "cannot reach {endpoint} to fetch {repo}/{file}: {reason}. Check the network (or \
         HF_ENDPOINT), or name a local file with --model / PARAPHYM_MODEL"
    )]
    Unreachable {
        repo: String,
        file: String,
        endpoint: String,
        reason: String,
    },
    #[error(
        "{file} from {repo} failed its checksum (sha256 {actual}, the Hub says {expected}); \
         the download was deleted, pull again"
    )]
    Corrupt {
        repo: String,
        file: String,
        expected: String,
        actual: String,
    },
    #[error("pulling {repo}/{file}: {reason}")]
    Other {
        repo: String,
        file: String,
        reason: String,
    },
}

/// A handle on the Hub and its cache.
#[derive(Debug)]
pub struct Hub {
    config: HubConfig,
    api: Api,
}

impl Hub {
    pub fn new(config: HubConfig) -> Result<Self, PullError> {
        let api = ApiBuilder::from_cache(Cache::new(config.cache_dir.clone()))
            .with_endpoint(config.endpoint.clone())
            .with_token(config.token.clone())
            .with_progress(false)
            .build()
            .map_err(|e| PullError::Other {
                repo: String::new(),
                file: String::new(),
                reason: e.to_string(),
            })?;
        Ok(Self { config, api })
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    fn repo(f: &HubFile) -> Repo {
        Repo::with_revision(f.repo.clone(), RepoType::Model, f.revision.clone())
    }

    /// The file's path in the cache, if a complete copy is there. No network.
    pub fn cached(&self, f: &HubFile) -> Option<PathBuf> {
        Cache::new(self.config.cache_dir.clone())
            .repo(Self::repo(f))
            .get(&f.file)
    }

    /// The local path of `f`: from the cache when present, else downloaded
    /// (resuming a partial download), verified, and cached.
    pub fn pull(&self, f: &HubFile, progress: impl Progress + Clone) -> Result<PathBuf, PullError> {
        if let Some(p) = self.cached(f) {
            return Ok(p);
        }
        if self.config.offline {
            return Err(PullError::NotCached {
                repo: f.repo.clone(),
                file: f.file.clone(),
                cache: self.config.cache_dir.display().to_string(),
            });
        }
        let api_repo = self.api.repo(Self::repo(f));
        let path = match api_repo.download_with_progress(&f.file, progress.clone()) {
            // A `.part` that is already whole: the Hub answers 416 to the
            // resume request. Start that one over, once.
            Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::StatusCode(416)) => {
                self.discard_parts(f);
                api_repo.download_with_progress(&f.file, progress)
            }
            other => other,
        }
        .map_err(|e| self.classify(f, e))?;
        // The blob is named by the etag hf-hub downloaded: for LFS files
        // (every GGUF) the content's sha256.
        let expected = std::fs::canonicalize(&path)
            .ok()
            .and_then(|b| b.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        if is_sha256(&expected) {
            let actual = sha256_file(&path).map_err(|e| PullError::Other {
                repo: f.repo.clone(),
                file: f.file.clone(),
                reason: e.to_string(),
            })?;
            if actual != expected {
                let blob = std::fs::canonicalize(&path).ok();
                let _ = std::fs::remove_file(&path);
                if let Some(b) = blob {
                    let _ = std::fs::remove_file(b);
                }
                return Err(PullError::Corrupt {
                    repo: f.repo.clone(),
                    file: f.file.clone(),
                    expected,
                    actual,
                });
            }
        }
        Ok(path)
    }

    /// Remove the repository's unfinished downloads.
    fn discard_parts(&self, f: &HubFile) {
        let blobs = self
            .config
            .cache_dir
            .join(format!("models--{}", f.repo.replace('/', "--")))
            .join("blobs");
        for entry in std::fs::read_dir(blobs).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|e| e == "part") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn classify(&self, f: &HubFile, e: ApiError) -> PullError {
        let endpoint = self.config.endpoint.clone();
        let repo = f.repo.clone();
        match &e {
            ApiError::RequestError(inner) => match inner.as_ref() {
                ureq::Error::StatusCode(401) if self.config.token.is_none() => {
                    PullError::NeedsToken { repo, endpoint }
                }
                ureq::Error::StatusCode(401 | 403) => PullError::Forbidden { repo, endpoint },
                ureq::Error::StatusCode(404) => PullError::NotFound {
                    repo,
                    file: f.file.clone(),
                    revision: f.revision.clone(),
                    endpoint,
                },
                ureq::Error::StatusCode(_) => PullError::Other {
                    repo,
                    file: f.file.clone(),
                    reason: e.to_string(),
                },
                other => PullError::Unreachable {
                    repo,
                    file: f.file.clone(),
                    endpoint,
                    reason: other.to_string(),
                },
            },
            ApiError::IoError(_) | ApiError::TooManyRetries(_) => PullError::Other {
                repo,
                file: f.file.clone(),
                reason: format!("{e} (the partial download is kept; pulling again resumes it)"),
            },
            _ => PullError::Other {
                repo,
                file: f.file.clone(),
                reason: e.to_string(),
            },
        }
    }
}

/// The local file a parsed reference names: a path as is, a Hub file from the
/// cache or pulled into it.
pub fn locate(
    model: &registry::Model,
    hub: &Hub,
    progress: impl Progress + Clone,
) -> Result<PathBuf, PullError> {
    match model {
        registry::Model::Path(p) => Ok(p.clone()),
        registry::Model::Hub(f) => hub.pull(f, progress),
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A one-line progress bar on stderr: bytes, percentage, rate, time left.
#[derive(Debug, Default, Clone)]
pub struct TermProgress {
    name: String,
    total: usize,
    done: usize,
    resumed_at: usize,
    start: Option<std::time::Instant>,
    last_draw: Option<std::time::Instant>,
}

impl Progress for TermProgress {
    fn init(&mut self, size: usize, filename: &str) {
        // hf-hub calls init again on each attempt, then reports the bytes
        // already present: start counting afresh.
        *self = Self {
            name: filename.to_owned(),
            total: size,
            start: Some(std::time::Instant::now()),
            ..Self::default()
        };
    }

    fn update(&mut self, size: usize) {
        if self.done == 0 && self.resumed_at == 0 && size > 0 && self.last_draw.is_none() {
            self.resumed_at = size;
        }
        self.done += size;
        let now = std::time::Instant::now();
        if self
            .last_draw
            .is_none_or(|t| now.duration_since(t).as_millis() >= 200)
        {
            self.last_draw = Some(now);
            self.draw(false);
        }
    }

    fn finish(&mut self) {
        self.draw(true);
    }
}

impl TermProgress {
    fn draw(&self, last: bool) {
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        let pct = if self.total > 0 {
            100.0 * self.done as f64 / self.total as f64
        } else {
            100.0
        };
        let secs = self
            .start
            .map_or(0.0, |s| s.elapsed().as_secs_f64())
            .max(1e-3);
        let rate = mib(self.done.saturating_sub(self.resumed_at)) / secs;
        let left = if rate > 0.0 {
            mib(self.total.saturating_sub(self.done)) / rate
        } else {
            0.0
        };
        eprint!(
            "\r{} {:>6.1}% {:.1}/{:.1} MiB {:.1} MiB/s {:>4.0} s left ",
            self.name,
            pct,
            mib(self.done),
            mib(self.total),
            rate,
            left
        );
        if last {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_text() {
        let dir = std::env::temp_dir().join(format!("paraphym-sha-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::remove_dir_all(dir).unwrap();
        assert!(is_sha256(
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        ));
        assert!(!is_sha256("a9993e364706816aba3e25717850c26c9cd0d89d"));
    }
}
