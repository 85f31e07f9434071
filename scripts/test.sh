#!/usr/bin/env bash
# The test command: fetch what the tests need (idempotent), then run every test.
#
#   scripts/test.sh [cargo test args...]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-test-model.sh >/dev/null
scripts/fetch-tokenizers.sh gemma3 >/dev/null
cargo test --workspace "$@"
