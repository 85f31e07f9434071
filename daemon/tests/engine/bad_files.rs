//! Every kind of bad model file gets an error naming the file and the reason.

use std::path::Path;

use candle_core::quantized::GgmlDType;
use paraphym_daemon::engine::gguf::{self, GgufFile, TensorData, Value};
use paraphym_daemon::engine::{Engine, EngineError, LoadOptions, ModelFileError};

use crate::util::{self, TempDir};

fn load(path: &Path) -> EngineError {
    let opts = LoadOptions {
        warmup: false,
        ..LoadOptions::default()
    };
    let err = Engine::load(path, &opts).expect_err("a bad file must not load");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "the error should name the file: {msg}"
    );
    err
}

fn reason(path: &Path) -> ModelFileError {
    let err = load(path);
    err.model_file_reason()
        .unwrap_or_else(|| panic!("expected a model-file error, got {err}"))
        .clone()
}

/// Metadata and tensors of the real file, re-read so they can be edited.
fn real_parts() -> (Vec<(String, Value)>, Vec<TensorData>) {
    let g = GgufFile::open(&util::gemma_path()).unwrap();
    let mut md: Vec<(String, Value)> = g
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    md.sort_by(|a, b| a.0.cmp(&b.0));
    let mut names: Vec<&str> = g.tensor_names().collect();
    names.sort();
    let tensors = names
        .iter()
        .map(|n| {
            let info = g.tensor_info(n).unwrap();
            TensorData {
                name: n.to_string(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                data: g.tensor_bytes(n).unwrap().to_vec(),
            }
        })
        .collect();
    (md, tensors)
}

fn write(
    dir: &TempDir,
    name: &str,
    md: &[(String, Value)],
    t: &[TensorData],
) -> std::path::PathBuf {
    let p = dir.0.join(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
    gguf::write(&mut f, md, t).unwrap();
    drop(f);
    p
}

#[test]
fn bad_model_files_get_typed_errors() {
    let dir = TempDir::new("bad-files");
    let (md, tensors) = real_parts();

    // A rewrite of the real file loads: the writer itself is sound.
    let good = write(&dir, "good.gguf", &md, &tensors);
    let engine = Engine::load(
        &good,
        &LoadOptions {
            warmup: false,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(engine.model().architecture(), "gemma3");
    drop(engine);

    // Not GGUF at all.
    let p = dir.0.join("notes.txt");
    std::fs::write(&p, "this is a text file, not a model").unwrap();
    assert_eq!(reason(&p), ModelFileError::NotGguf { found: *b"this" });
    let p = dir.0.join("empty.gguf");
    std::fs::write(&p, b"").unwrap();
    assert!(matches!(reason(&p), ModelFileError::NotGguf { .. }));

    // Truncated: in the header, in the tensor directory, and in the tensor data.
    let bytes = std::fs::read(&good).unwrap();
    for (name, len) in [
        ("cut-header.gguf", 100),
        ("cut-tokens.gguf", 2_000_000),
        ("cut-data.gguf", bytes.len() - 1000),
    ] {
        let p = dir.0.join(name);
        std::fs::write(&p, &bytes[..len]).unwrap();
        match reason(&p) {
            ModelFileError::Truncated { len: l, .. } => assert_eq!(l, len as u64),
            other => panic!("{name}: expected Truncated, got {other}"),
        }
    }

    // An unsupported version.
    let mut v1 = bytes[..64].to_vec();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    let p = dir.0.join("v1.gguf");
    std::fs::write(&p, &v1).unwrap();
    assert_eq!(reason(&p), ModelFileError::UnsupportedVersion(1));

    // A claimed string length far past the end must not allocate or panic.
    let mut huge = bytes[..64].to_vec();
    huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes()); // first key's length
    let p = dir.0.join("huge-len.gguf");
    std::fs::write(&p, &huge).unwrap();
    assert!(matches!(reason(&p), ModelFileError::Truncated { .. }));

    // An architecture we do not run.
    let mut md2 = md.clone();
    for (k, v) in &mut md2 {
        if k == "general.architecture" {
            *v = Value::String("mamba".into());
        }
    }
    let p = write(&dir, "mamba.gguf", &md2, &tensors);
    match reason(&p) {
        ModelFileError::UnsupportedArchitecture { arch, supported } => {
            assert_eq!(arch, "mamba");
            assert!(supported.contains("gemma3"));
        }
        other => panic!("expected UnsupportedArchitecture, got {other}"),
    }

    // A missing metadata key.
    let md3: Vec<_> = md
        .iter()
        .filter(|(k, _)| k != "gemma3.block_count")
        .cloned()
        .collect();
    let p = write(&dir, "no-blocks.gguf", &md3, &tensors);
    assert_eq!(
        reason(&p),
        ModelFileError::MissingKey("gemma3.block_count".into())
    );

    // A key of the wrong type.
    let mut md4 = md.clone();
    for (k, v) in &mut md4 {
        if k == "gemma3.embedding_length" {
            *v = Value::String("640".into());
        }
    }
    let p = write(&dir, "wrong-type.gguf", &md4, &tensors);
    assert!(matches!(reason(&p), ModelFileError::WrongType { .. }));

    // A missing tensor.
    let t2: Vec<_> = tensors
        .iter()
        .filter(|t| t.name != "blk.3.ffn_up.weight")
        .cloned()
        .collect();
    let p = write(&dir, "no-ffn-up.gguf", &md, &t2);
    assert_eq!(
        reason(&p),
        ModelFileError::MissingTensor("blk.3.ffn_up.weight".into())
    );

    // A tensor of the wrong shape.
    let mut t3 = tensors.clone();
    let q = t3
        .iter_mut()
        .find(|t| t.name == "blk.0.attn_norm.weight")
        .unwrap();
    q.shape = vec![320];
    q.data.truncate(320 * 4);
    q.dtype = GgmlDType::F32;
    let p = write(&dir, "bad-shape.gguf", &md, &t3);
    assert!(matches!(reason(&p), ModelFileError::BadShape { .. }));

    // Tokenizer metadata that does not add up.
    let md5: Vec<_> = md
        .iter()
        .map(|(k, v)| match (k.as_str(), v) {
            ("tokenizer.ggml.scores", Value::Array(a)) => {
                (k.clone(), Value::Array(a[..10].to_vec()))
            }
            _ => (k.clone(), v.clone()),
        })
        .collect();
    let p = write(&dir, "bad-vocab.gguf", &md5, &tensors);
    assert!(matches!(reason(&p), ModelFileError::Tokenizer(_)));

    // A missing file is an I/O error that names it.
    let missing = dir.0.join("absent.gguf");
    assert!(matches!(load(&missing), EngineError::Io { .. }));
}
