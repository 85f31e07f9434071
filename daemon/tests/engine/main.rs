//! Engine tests: one test binary, run against the real Gemma 3 270M file
//! (`scripts/fetch-test-model.sh`) and the real tokenizer.json files
//! (`scripts/fetch-tokenizers.sh`); `scripts/test.sh` fetches both first.

mod util;

mod bad_files;
mod batch;
mod gemma3;
mod reuse;
mod static_step;
mod synthetic;
mod template;
mod tokenizer;
