#!/usr/bin/env bash
# The main job, until the daemon and TUI exist: build, make sure a model is
# there (the Gemma 3 270M test model unless PARAPHYM_MODEL names one: a file,
# an alias such as qwen3:1.7b, or hf:owner/name/file.gguf; docs/MODELS.md),
# and stream a completion from it.
#
#   scripts/demo.sh ["prompt"] [max_tokens]
set -euo pipefail
cd "$(dirname "$0")/.."

prompt="${1:-Paris is the capital of}"
max_tokens="${2:-64}"
model="${PARAPHYM_MODEL:-}"
if [ -z "$model" ]; then
  model=$(scripts/fetch-test-model.sh)
fi
cargo build --release -q -p paraphym-daemon --example complete
exec target/release/examples/complete "$model" "$prompt" "$max_tokens"
