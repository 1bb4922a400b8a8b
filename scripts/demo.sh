#!/usr/bin/env bash
# make demo: simulate the built-in example data and run the main job on it; outputs go to $2.
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=${2:-demo_output}
mkdir -p "$OUT"
"$PY" -m flexplugin.cli simulate --out "$OUT/data"
"$PY" -m flexplugin.cli reconstruct --particles "$OUT/data/particles.star" --mask "$OUT/data/mask.mrc" \
    --out "$OUT/reconstruct"
echo
echo "demo: done. Example data in $OUT/data, reconstruction (map, half maps, FSC plot) in $OUT/reconstruct"
