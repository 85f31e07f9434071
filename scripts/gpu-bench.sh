#!/usr/bin/env bash
# The GPU benchmark, on any CUDA host, from the bundle scripts/gpu-package.sh
# makes (dist/gpu: paraphymd.gz, paraphym-bench.gz, device-libpath.sh, this
# script). It synthesizes the models there (big files don't travel), warms
# the JIT once, then prints side by side: stock Candle, the bare loop, the
# engine and the daemon (load, prefill, decode, time to first token), and
# the daemon's aggregate tokens/s at 1, 2, 4, 8 concurrent streams.
#
#   dist/gpu/gpu-bench.sh [WORK_DIR] [SHAPES]
#
# SHAPES: space-separated, from qwen3-1.7b (default) and phi4 (14B, 7.7 GB).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/tmp/paraphym-gpu}"
shapes="${2:-qwen3-1.7b phi4}"
mkdir -p "$work"
# shellcheck disable=SC1091
source "$here/device-libpath.sh"
for b in paraphymd paraphym-bench; do
  [ -x "$work/$b" ] || { gunzip -c "$here/$b.gz" > "$work/$b"; chmod +x "$work/$b"; }
done
# The synthetic models' vocabularies, where paraphym-bench synth looks.
export PARAPHYM_CACHE="$work/cache"
for f in "$here"/tokenizers/*/*.json.gz; do
  family="$(basename "$(dirname "$f")")"
  mkdir -p "$PARAPHYM_CACHE/tokenizers/$family"
  gunzip -c "$f" > "$PARAPHYM_CACHE/tokenizers/$family/$(basename "$f" .gz)"
done
bench="$work/paraphym-bench"
echo "== $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader) · $(date -u +%F)"
for shape in $shapes; do
  case "$shape" in
    qwen3-1.7b) arch=qwen3 ;;
    phi4) arch=phi3 ;;
    *) echo "unknown shape $shape" >&2; exit 2 ;;
  esac
  model="$work/$shape.gguf"
  [ -s "$model" ] || "$bench" synth --arch "$arch" --shape "$shape" --out "$model"
  echo "== $shape ($(du -h "$model" | cut -f1))"
  # The first process on a fresh machine pays the PTX JIT (the driver caches
  # the result on disk); it is reported, and kept out of the figures.
  t0=$(date +%s.%N)
  "$bench" decode --model "$model" --device cuda --prompt-tokens 16 --gen-tokens 4 --reps 1 \
    --loops engine >/dev/null
  echo "first process (load + JIT + 16-token prefill + 4 tokens): $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $t0 }") s"
  "$bench" decode --model "$model" --device cuda --prompt-tokens 128 --gen-tokens 128 --reps "${REPS:-3}"
  "$bench" concurrent --model "$model" --device cuda --streams 1,2,4,8 --prompt-tokens 32 \
    --gen-tokens 128 --reps 1
done
