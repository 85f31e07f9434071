#!/usr/bin/env bash
# The test command: fetch what the tests need (idempotent), then run every test.
#
#   scripts/test.sh [cargo test args...]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-test-model.sh >/dev/null
scripts/fetch-tokenizers.sh gemma3 qwen3 llama3 gpt35turbo gpt4o >/dev/null
# The independent reference forward pass (scripts/ref_forward.py).
python3 -c 'import numpy, gguf' 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check numpy gguf
# The HTTP bridge's tests use the official OpenAI client and Prometheus' parser.
python3 -c 'import openai, prometheus_client, jsonschema' 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check openai prometheus_client jsonschema
# The TUI's end-to-end test drives the real client inside tmux.
if ! command -v tmux >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq tmux >/dev/null
  else
    echo "scripts/test.sh: the TUI test needs tmux: install it (apt install tmux, brew install tmux)" >&2
    exit 1
  fi
fi
# The end-to-end tests (tests/) run the real binaries: build them first.
cargo build --workspace --bins
# One test proves a release build ignores the test hooks.
cargo build --release -p paraphym-daemon --bin paraphymd
cargo test --workspace "$@"
