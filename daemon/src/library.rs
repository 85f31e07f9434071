//! GGUF files other tools already downloaded, served in place when the user
//! points the daemon at their folders (`--ollama-models`, `--lmstudio-models`,
//! or the config file): nothing is copied, nothing there is ever deleted.
//!
//! - Ollama: `DIR/manifests/<host>/<namespace>/<model>/<tag>` are JSON
//!   manifests; the layer of media type `application/vnd.ollama.image.model`
//!   names the GGUF blob, `DIR/blobs/sha256-<hex>`. Referenced as
//!   `ollama:<model>:<tag>` (`ollama:<namespace>/<model>:<tag>` outside the
//!   `library` namespace).
//! - LM Studio: `DIR/<publisher>/<repository>/<file>.gguf`, referenced as
//!   `lmstudio:<publisher>/<repository>/<file>.gguf`.

use std::path::{Path, PathBuf};

/// Where other tools keep their models.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Folders {
    pub ollama: Option<PathBuf>,
    pub lmstudio: Option<PathBuf>,
}

/// One model found in those folders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// `ollama:…` or `lmstudio:…`.
    pub reference: String,
    pub path: PathBuf,
}

const OLLAMA_MODEL_LAYER: &str = "application/vnd.ollama.image.model";
const OLLAMA_HOST: &str = "registry.ollama.ai";

impl Folders {
    pub fn is_empty(&self) -> bool {
        self.ollama.is_none() && self.lmstudio.is_none()
    }

    /// Every model in the folders, sorted by reference; unreadable entries
    /// are skipped.
    pub fn scan(&self) -> Vec<Found> {
        let mut out = Vec::new();
        if let Some(dir) = &self.ollama {
            out.extend(ollama_models(dir));
        }
        if let Some(dir) = &self.lmstudio {
            out.extend(lmstudio_models(dir));
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        out
    }

    /// The file `reference` (`ollama:…`, `lmstudio:…`) names, if the
    /// folders hold it. `None` for references of other kinds.
    pub fn resolve(&self, reference: &str) -> Option<Result<PathBuf, String>> {
        let r = reference.trim();
        let (kind, dir) = if r.starts_with("ollama:") {
            ("Ollama", &self.ollama)
        } else if r.starts_with("lmstudio:") {
            ("LM Studio", &self.lmstudio)
        } else {
            return None;
        };
        let Some(dir) = dir else {
            return Some(Err(format!(
                "{r}: no {kind} folder is configured (paraphymd --{}-models DIR, or {}_models in the config file)",
                if kind == "Ollama" { "ollama" } else { "lmstudio" },
                if kind == "Ollama" { "ollama" } else { "lmstudio" },
            )));
        };
        let found = if kind == "Ollama" {
            ollama_models(dir)
        } else {
            lmstudio_models(dir)
        };
        Some(
            found
                .into_iter()
                .find(|f| f.reference == r)
                .map(|f| f.path)
                .ok_or_else(|| format!("{r} is not in the {kind} folder {}", dir.display())),
        )
    }
}

fn ollama_models(dir: &Path) -> Vec<Found> {
    let manifests = dir.join("manifests");
    let mut out = Vec::new();
    // host / namespace / model / tag
    for host in read_dirs(&manifests) {
        for ns in read_dirs(&host) {
            for model in read_dirs(&ns) {
                let Ok(tags) = std::fs::read_dir(&model) else {
                    continue;
                };
                for tag in tags.flatten() {
                    let path = tag.path();
                    if !path.is_file() {
                        continue;
                    }
                    let Some(blob) = ollama_blob(dir, &path) else {
                        continue;
                    };
                    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
                    let (Some(h), Some(n), Some(m), Some(t)) =
                        (name(&host), name(&ns), name(&model), name(&path))
                    else {
                        continue;
                    };
                    let shown = match (h.as_str(), n.as_str()) {
                        (OLLAMA_HOST, "library") => format!("{m}:{t}"),
                        (OLLAMA_HOST, _) => format!("{n}/{m}:{t}"),
                        _ => format!("{h}/{n}/{m}:{t}"),
                    };
                    out.push(Found {
                        reference: format!("ollama:{shown}"),
                        path: blob,
                    });
                }
            }
        }
    }
    out
}

/// The GGUF blob a manifest names, if it exists.
fn ollama_blob(dir: &Path, manifest: &Path) -> Option<PathBuf> {
    let text = std::fs::read(manifest).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let layer = v
        .get("layers")?
        .as_array()?
        .iter()
        .find(|l| l.get("mediaType").and_then(|m| m.as_str()) == Some(OLLAMA_MODEL_LAYER))?;
    let digest = layer.get("digest")?.as_str()?;
    let hex = digest.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let blob = dir.join("blobs").join(format!("sha256-{hex}"));
    blob.is_file().then_some(blob)
}

fn lmstudio_models(dir: &Path) -> Vec<Found> {
    let mut out = Vec::new();
    for publisher in read_dirs(dir) {
        for repo in read_dirs(&publisher) {
            let Ok(files) = std::fs::read_dir(&repo) else {
                continue;
            };
            for f in files.flatten() {
                let path = f.path();
                let is_gguf = path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
                if !is_gguf || !path.is_file() {
                    continue;
                }
                let rel = path.strip_prefix(dir).unwrap_or(&path);
                out.push(Found {
                    reference: format!("lmstudio:{}", rel.display()),
                    path,
                });
            }
        }
    }
    out
}

fn read_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ollama_manifests_and_lmstudio_files_are_found_and_resolved() {
        let root = std::env::temp_dir().join(format!("paraphym-library-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (ollama, lms) = (root.join("ollama"), root.join("lms"));
        let hex = "ab".repeat(32);
        let manifest = |ns: &str, model: &str, tag: &str, digest: &str| {
            let d = ollama
                .join("manifests")
                .join(OLLAMA_HOST)
                .join(ns)
                .join(model);
            std::fs::create_dir_all(&d).unwrap();
            let m = serde_json::json!({"layers": [
                {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:00"},
                {"mediaType": OLLAMA_MODEL_LAYER, "digest": digest},
            ]});
            std::fs::write(d.join(tag), m.to_string()).unwrap();
        };
        manifest("library", "llama3.2", "1b", &format!("sha256:{hex}"));
        manifest("someone", "tiny", "latest", &format!("sha256:{hex}"));
        // A manifest whose blob is missing, and one that is not JSON.
        manifest(
            "library",
            "gone",
            "latest",
            &format!("sha256:{}", "cd".repeat(32)),
        );
        std::fs::write(
            ollama
                .join("manifests")
                .join(OLLAMA_HOST)
                .join("library/gone/bad"),
            "{",
        )
        .unwrap();
        std::fs::create_dir_all(ollama.join("blobs")).unwrap();
        std::fs::write(ollama.join("blobs").join(format!("sha256-{hex}")), b"GGUF").unwrap();
        let repo = lms.join("lmstudio-community").join("Qwen3-GGUF");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(repo.join("Qwen3-1.7B-Q4_K_M.gguf"), b"GGUF").unwrap();
        std::fs::write(repo.join("README.md"), b"").unwrap();

        let folders = Folders {
            ollama: Some(ollama.clone()),
            lmstudio: Some(lms.clone()),
        };
        let refs: Vec<String> = folders.scan().into_iter().map(|f| f.reference).collect();
        assert_eq!(
            refs,
            [
                "lmstudio:lmstudio-community/Qwen3-GGUF/Qwen3-1.7B-Q4_K_M.gguf",
                "ollama:llama3.2:1b",
                "ollama:someone/tiny:latest",
            ]
        );
        let blob = ollama.join("blobs").join(format!("sha256-{hex}"));
        assert_eq!(folders.resolve("ollama:llama3.2:1b"), Some(Ok(blob)));
        assert!(matches!(
            folders.resolve("ollama:gone:latest"),
            Some(Err(_))
        ));
        assert_eq!(folders.resolve("qwen3:1.7b"), None);
        let none = Folders::default();
        let e = none.resolve("lmstudio:x/y/z.gguf").unwrap().unwrap_err();
        assert!(e.contains("--lmstudio-models"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
