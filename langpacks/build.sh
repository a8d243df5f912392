#!/usr/bin/env bash
# Rebuild the packs this repository publishes (offline towers, demo data). ~10 min on 2 cores.
#   bash langpacks/build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
data=$(mktemp -d)/demo
mlilt data demo --langs en,sw --n 1000 --seed 0 --out "$data"
# sw defines the image space (default method ln+adapter trains both sides) ...
mlilt train --lang sw --data "$data/sw/train.jsonl" --out langpacks/sw --epochs 3 --batch-size 32 --overwrite
# ... and en is anchored on it: text side only, image features cached.
mlilt train --lang en --data "$data/en/train.jsonl" --out langpacks/en --anchor langpacks/sw \
    --epochs 3 --batch-size 32 --overwrite
