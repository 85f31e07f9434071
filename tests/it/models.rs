//! Model management (issue 10): `paraphym show` reads what a file is,
//! `paraphym rm` deletes only what paraphym downloaded, and GGUF files in
//! Ollama's and LM Studio's folders are served in place.

use std::path::Path;

use paraphym_daemon::synth::Arch;
use paraphym_tests::{gemma_path, raw_gen, tiny, TempDir, TestDaemon};

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[test]
fn show_describes_the_gemma_file() {
    let gemma = gemma_path();
    let daemon = TestDaemon::start(&["--prewarm", "1", "--context", "2048"]);
    let d = json_of(&daemon.cli(&["show", gemma.to_str().unwrap(), "--json"]));
    assert_eq!(d["architecture"], "gemma3");
    assert_eq!(d["quantization"], "Q4_K_M");
    let params = d["parameters"].as_u64().unwrap();
    assert!((250_000_000..300_000_000).contains(&params), "{params}");
    assert_eq!(d["context_length"], 32768);
    assert_eq!(d["context"], 2048);
    assert_eq!(
        d["size_bytes"].as_u64().unwrap(),
        std::fs::metadata(&gemma).unwrap().len()
    );
    assert!(d["chat_template"]
        .as_str()
        .unwrap()
        .contains("start_of_turn"));
    // The file has no template: the built-in Gemma one serves it, and says so.
    assert_eq!(d["template_origin"], "built-in gemma (the file has none)");
    assert_eq!(d["loaded"], false);
    let text = daemon.cli(&["show", gemma.to_str().unwrap()]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("Q4_K_M") && text.contains("268M"), "{text}");
    let missing = daemon.cli(&["show", "/nowhere/x.gguf"]);
    assert!(!missing.status.success());
}

/// An Ollama models folder: a manifest naming a blob.
fn ollama_folder(root: &Path, model: &Path) {
    let hex = "5e".repeat(32);
    let manifest = root.join("manifests/registry.ollama.ai/library/tiny-qwen");
    std::fs::create_dir_all(&manifest).unwrap();
    std::fs::write(
        manifest.join("latest"),
        serde_json::json!({"schemaVersion": 2, "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}")},
            {"mediaType": "application/vnd.ollama.image.template", "digest": format!("sha256:{}", "0".repeat(64))}
        ]})
        .to_string(),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::copy(model, root.join(format!("blobs/sha256-{hex}"))).unwrap();
}

#[test]
fn ollama_and_lmstudio_folders_are_served_in_place_and_never_deleted() {
    let dir = TempDir::new("folders");
    let (ollama, lms) = (dir.path().join("ollama"), dir.path().join("lms"));
    ollama_folder(&ollama, &tiny(Arch::Qwen3));
    let repo = lms.join("someone/Tiny-Llama-GGUF");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::copy(tiny(Arch::Llama), repo.join("tiny-llama.gguf")).unwrap();
    let daemon = TestDaemon::start(&[
        "--prewarm",
        "1",
        "--ollama-models",
        ollama.to_str().unwrap(),
        "--lmstudio-models",
        lms.to_str().unwrap(),
    ]);
    let models = json_of(&daemon.cli(&["models", "--json"]));
    let refs: Vec<&str> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["reference"].as_str().unwrap())
        .collect();
    for want in [
        "ollama:tiny-qwen:latest",
        "lmstudio:someone/Tiny-Llama-GGUF/tiny-llama.gguf",
    ] {
        assert!(refs.contains(&want), "{want} not in {refs:?}");
    }
    let c = daemon.client();
    for (reference, arch) in [
        ("ollama:tiny-qwen:latest", "qwen3"),
        ("lmstudio:someone/Tiny-Llama-GGUF/tiny-llama.gguf", "llama"),
    ] {
        let (_, stats) = c
            .generate(raw_gen(reference, "Hello", 3))
            .unwrap()
            .collect_text()
            .unwrap();
        assert_eq!(stats.generated_tokens, 3);
        let d = json_of(&daemon.cli(&["show", reference, "--json"]));
        assert_eq!(d["architecture"], arch);
        // Not ours to delete.
        let rm = daemon.cli(&["rm", reference]);
        assert!(!rm.status.success());
        assert!(
            String::from_utf8_lossy(&rm.stderr).contains("only removes what it downloaded"),
            "{rm:?}"
        );
    }
    assert!(ollama
        .join(format!("blobs/sha256-{}", "5e".repeat(32)))
        .is_file());
    assert!(repo.join("tiny-llama.gguf").is_file());
    let unknown = daemon.cli(&["show", "ollama:nope:latest"]);
    assert!(!unknown.status.success());
}

#[test]
fn rm_deletes_a_download_and_only_that() {
    let dir = TempDir::new("hub");
    let hub = dir.path().join("hub");
    let repo = hub.join("models--someone--tiny-GGUF");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join(format!("snapshots/{commit}"))).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let blob = repo.join(format!("blobs/{}", "a1".repeat(32)));
    std::fs::copy(tiny(Arch::Gemma3), &blob).unwrap();
    let link = repo.join(format!("snapshots/{commit}/tiny.gguf"));
    std::os::unix::fs::symlink(format!("../../blobs/{}", "a1".repeat(32)), &link).unwrap();
    let daemon = TestDaemon::start_with_env(
        &["--prewarm", "1"],
        &[
            ("HF_HUB_CACHE", hub.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    let reference = "hf:someone/tiny-GGUF/tiny.gguf";
    let c = daemon.client();
    c.generate(raw_gen(reference, "Hi", 2))
        .unwrap()
        .collect_text()
        .unwrap();
    // A plain path is never deleted.
    let other = dir.path().join("mine.gguf");
    std::fs::copy(tiny(Arch::Gemma3), &other).unwrap();
    assert!(!daemon
        .cli(&["rm", other.to_str().unwrap()])
        .status
        .success());
    assert!(other.is_file());
    // The download goes, loaded or not.
    let rm = daemon.cli(&["rm", reference]);
    assert!(rm.status.success(), "{rm:?}");
    assert!(!blob.exists() && !link.exists());
    assert!(paraphym_tests::status(&c).models.is_empty());
    let again = daemon.cli(&["rm", reference]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not downloaded"));
}
