#!/usr/bin/env bash
# Package the CUDA build for a GPU host that has no Rust: paraphymd and
# paraphym-bench built with `--features cuda` (portable x86-64-v3 code, not
# this machine's CPU), stripped and gzipped into dist/gpu/ (~13 MB each) with
# scripts/gpu-bench.sh and the loader-path helper beside them.
#
#   scripts/gpu-package.sh [path/to/cuda-env.sh] [path/to/device-libpath.sh]
#
# cuda-env.sh provides the CUDA toolkit pieces the build needs (nvcc, the
# runtime libraries to link against) and exports CUDA_COMPUTE_CAP etc.;
# device-libpath.sh, sourced on the GPU host, puts the CUDA user-space
# libraries on the loader path. Both default to ../shared/scripts/.
set -euo pipefail
cd "$(dirname "$0")/.."

env_script="${1:-../shared/scripts/cuda-env.sh}"
libpath_script="${2:-../shared/scripts/device-libpath.sh}"
# shellcheck disable=SC1090
source "$env_script"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
export RUSTFLAGS="-C target-cpu=x86-64-v3"
cargo build --release -p paraphym-daemon --features cuda --bin paraphymd --bin paraphym-bench

out=dist/gpu
mkdir -p "$out"
for b in paraphymd paraphym-bench; do
  strip -o "$out/$b" "$CARGO_TARGET_DIR/release/$b"
  gzip -f -9 "$out/$b"
done
# The vocabularies the synthetic models get (Qwen3's; cl100k for Phi-4).
cache="${PARAPHYM_CACHE:-$HOME/.cache/paraphym}"
[ -s "$cache/tokenizers/qwen3/tokenizer.json" ] && [ -s "$cache/tokenizers/gpt35turbo/tokenizer.json" ] ||
  scripts/fetch-tokenizers.sh qwen3 gpt35turbo >/dev/null
for family in qwen3 gpt35turbo; do
  mkdir -p "$out/tokenizers/$family"
  cp "$cache/tokenizers/$family/"tokenizer*.json "$out/tokenizers/$family/"
  gzip -f -9 "$out/tokenizers/$family/"*.json
done
cp scripts/gpu-bench.sh scripts/gpu-count.c scripts/paraphym_client.py "$out/"
install -m 0644 "$libpath_script" "$out/device-libpath.sh"
du -ch "$out"/* | tail -1
