#!/usr/bin/env bash
# The GPU benchmark, on any CUDA host, from the bundle scripts/gpu-package.sh
# makes (dist/gpu: paraphymd.gz, paraphym-bench.gz, device-libpath.sh,
# gpu-count.c, this script). It synthesizes the models there (big files don't
# travel) and prints, per shape:
#
#   1. cold start: a first daemon on an empty JIT cache (load, which pays the
#      PTX JIT during pre-warm, then the first request), and loads from a cold
#      page cache where the host lets us drop it;
#   2. side by side: stock Candle, the bare loop, the engine and the daemon
#      (load, prefill, decode, time to first token), REPS interleaved runs;
#   3. a check: perplexity of one text on the CPU and on the GPU;
#   4. device<->host copies and kernel launches per generated token, counted
#      by CUPTI (gpu-count.c, built here when a C compiler and CUPTI exist);
#   5. the sampling routes and the memory budget on this GPU (section
#      "routes", not run by default; needs python3);
#   6. the daemon's aggregate tokens/s at 1, 2, 4, 8, 16 concurrent streams
#      (STREAMS), one worker batching them beside as many replica workers,
#      once for each way workers on one GPU take turns (--gpu-turns);
#   7. batched decoding at the model level: aggregate tokens/s of 1..16
#      sequences in one forward pass per step (section "batch", not run by
#      default).
#
#   dist/gpu/gpu-bench.sh [WORK_DIR] [SHAPES]
#
# SHAPES: space-separated, from qwen3-1.7b (default) and phi4 (14B).
# Environment: REPS (decode repetitions, default 3), TURNS (default
# "off launch step"), SECTIONS (default "cold check decode copies concurrent").
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/tmp/paraphym-gpu}"
shapes="${2:-qwen3-1.7b phi4}"
sections="${SECTIONS:-cold check decode copies concurrent}"
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
has() { case " $sections " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
secs() { awk "BEGIN { printf \"%.2f\", $(date +%s.%N) - $1 }"; }
field() { tr ' ' '\n' | sed -n "s/^$1=//p"; }

# The CUPTI counter, built once; empty when this host can't build it.
counter=""
build_counter() {
  local inc lib
  inc="$(find /usr/local/cuda*/extras/CUPTI/include /usr/local/cuda*/include /opt /usr \
    -name cupti.h -print -quit 2>/dev/null | xargs -r dirname)"
  [ -n "$inc" ] || return 1
  lib="$(find "$(dirname "$inc")" /usr/local/cuda* /opt /usr -name 'libcupti.so*' -print -quit \
    2>/dev/null | xargs -r dirname)"
  [ -n "$lib" ] || return 1
  local cc
  cc="$(command -v cc || command -v gcc || command -v clang)" || return 1
  "$cc" -shared -fPIC -O2 -I"$inc" "$here/gpu-count.c" -o "$work/libgpucount.so" \
    -L"$lib" -lcupti -Wl,-rpath,"$lib" || return 1
  counter="$work/libgpucount.so"
}

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

  if has cold; then
    # A first user on a fresh machine: an empty JIT cache. The daemon pays
    # the JIT while it pre-warms (inside its load); the first request should
    # not. The driver keeps the compiled kernels, so later runs skip it.
    jit="$work/jit-empty-$shape"
    rm -rf "$jit"
    t0=$(date +%s.%N)
    line="$(CUDA_CACHE_PATH="$jit" "$bench" decode-child --loop daemon --device cuda \
      --model "$model" --prompt-tokens 128 --gen-tokens 16)"
    echo "cold start (empty JIT cache): daemon start + load $(echo "$line" | field load_s | xargs printf '%.2f') s," \
      "first request's TTFT $(echo "$line" | field ttft_inside_s | xargs printf '%.3f') s" \
      "(whole process $(secs "$t0") s)"
    line="$(CUDA_CACHE_PATH="$jit" "$bench" decode-child --loop daemon --device cuda \
      --model "$model" --prompt-tokens 128 --gen-tokens 16)"
    echo "same, JIT cache filled: daemon start + load $(echo "$line" | field load_s | xargs printf '%.2f') s," \
      "first request's TTFT $(echo "$line" | field ttft_inside_s | xargs printf '%.3f') s"
    for loop in engine daemon; do
      if sync && { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then
        line="$(CUDA_CACHE_PATH="$jit" "$bench" decode-child --loop "$loop" --device cuda \
          --model "$model" --prompt-tokens 16 --gen-tokens 4)"
        echo "cold page cache: $loop load $(echo "$line" | field load_s | xargs printf '%.2f') s"
      else
        echo "cold page cache: not measured (this host refuses to drop its page cache)"
        break
      fi
    done
    # Every later process reads the file from a warm page cache, as the
    # targets ask.
    cat "$model" > /dev/null
  else
    # Still keep the JIT out of the timed figures.
    "$bench" decode --model "$model" --device cuda --prompt-tokens 16 --gen-tokens 4 --reps 1 \
      --loops engine >/dev/null
  fi

  if has decode; then
    "$bench" decode --model "$model" --device cuda --prompt-tokens 128 --gen-tokens 128 \
      --reps "${REPS:-3}"
  fi

  if has batch; then
    # Batched decoding at the model level (issue 11): B sequences, one
    # pass per step, next to one sequence alone in the bare loop: the
    # forward pass shaped by its sequences, and the fixed step replayed as
    # a CUDA graph per batch size.
    for path in forward graph; do
      "$bench" batch --model "$model" --device cuda --streams 1,2,4,8,16 --prompt-tokens 128 \
        --gen-tokens 128 --reps "${REPS:-3}" --path "$path"
    done
  fi

  if has check; then
    # The GPU's numbers against the CPU's: perplexity of the same text.
    for dev in cpu cuda; do
      echo "check: $dev $("$bench" perplexity --model "$model" --text "$here/gpu-count.c" --ctx 128 --chunks 2 --device "$dev")"
    done
  fi

  if has copies; then
    if [ -z "$counter" ] && ! build_counter; then
      echo "copies: not counted (no C compiler or CUPTI on this host)"
    else
      # Two runs per loop that differ only in the tokens generated; the
      # difference over 32 tokens is the per-token cost (load, warm-up,
      # prefill and the daemon's pre-warm cancel out). All of a run's CUDA
      # processes are summed (the daemon column: paraphymd).
      printf '%s\n' "copies and launches per generated token (CUPTI activity records; 128-token prompt, greedy; runs of 65 and 33 tokens, difference over 32)"
      printf '%-8s %12s %12s %12s %12s %12s\n' loop "D->H copies" "D->H bytes" "H->D copies" "H->D bytes" kernels
      for loop in stock bare engine daemon; do
        for gen in 33 65; do
          rm -f "$work/count-$gen.txt"
          CUDA_INJECTION64_PATH="$counter" GPU_COUNT_OUT="$work/count-$gen.txt" \
            "$bench" decode-child --loop "$loop" --device cuda --model "$model" \
            --prompt-tokens 128 --gen-tokens "$gen" >/dev/null
        done
        awk -v loop="$loop" '
          { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[FILENAME, kv[1]] += kv[2] } }
          END {
            a = ARGV[1]; b = ARGV[2]
            split("dtoh dtoh_bytes htod htod_bytes kernels", keys, " ")
            printf "%-8s", loop
            for (k = 1; k <= 5; k++) printf " %12.1f", (v[b, keys[k]] - v[a, keys[k]]) / 32
            printf "\n"
            if (v[a, "dropped"] + v[b, "dropped"] > 0) print "  (CUPTI dropped records: figures are low)"
          }' "$work/count-33.txt" "$work/count-65.txt"
      done
    fi
  fi

  if has routes; then
    # The sampling routes on this GPU, through the daemon and the Python
    # client: greedy (argmax on the device) against top-k 1 sampling (the
    # device's top-k), a seeded top-k 40 draw twice, and the host route (a
    # repeat penalty); and the memory budget the daemon chose.
    sock="$work/routes.sock"
    rm -f "$sock"
    "$work/paraphymd" --socket "$sock" --log-file "$work/routes.log" --device cuda \
      --keep-alive forever 2>/dev/null &
    pid=$!
    ask() {
      python3 "$here/paraphym_client.py" --socket "$sock" --model "$model" --raw \
        --max-tokens 48 "$@" "The history of computing is"
    }
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
    greedy="$(ask --temperature 0)"
    top1="$(ask --temperature 1 --top-k 1 --seed 3)"
    [ "$greedy" = "$top1" ] && same=identical || same=DIFFERENT
    echo "routes: greedy (device argmax) vs top-k 1 sampling (device top-k): $same"
    a="$(ask --temperature 0.8 --top-k 40 --seed 7)"
    b="$(ask --temperature 0.8 --top-k 40 --seed 7)"
    [ "$a" = "$b" ] && same=identical || same=DIFFERENT
    echo "routes: seeded top-k 40 sampling twice: $same; differs from greedy: $([ "$a" != "$greedy" ] && echo yes || echo no)"
    c="$(ask --temperature 0.8 --top-k 40 --seed 7 --repeat-penalty 1.3)"
    echo "routes: host route (repeat penalty) answered ${#c} characters"
    grep -o 'memory budget from the GPU.*' "$work/routes.log" | head -1 | sed 's/^/routes: /' || true
    kill "$pid"; wait "$pid" 2>/dev/null || true
  fi

  if has concurrent; then
    for turns in ${TURNS:-off launch step}; do
      echo "-- concurrent streams, --gpu-turns $turns"
      "$bench" concurrent --model "$model" --device cuda --streams "${STREAMS:-1,2,4,8,16}" --prompt-tokens 32 \
        --gen-tokens 128 --reps 1 --daemon-arg=--gpu-turns="$turns"
    done
  fi
done
