#!/usr/bin/env bash
# make demo: simulate the built-in example data and run the main jobs on it; outputs go to $2.
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=${2:-demo_output}
FP=("$PY" -m flexplugin.cli)
mkdir -p "$OUT"
"${FP[@]}" simulate --out "$OUT/data"
"${FP[@]}" reconstruct --particles "$OUT/data/particles.star" --mask "$OUT/data/mask.mrc" --out "$OUT/reconstruct"
"${FP[@]}" 3dva --particles "$OUT/data/particles.star" --mask "$OUT/data/mask.mrc" \
    --volume "$OUT/data/consensus.mrc" --k 2 --filter-res 8 --out "$OUT/3dva"
"${FP[@]}" 3dva-display --run "$OUT/3dva" --mode simple --frames 9 --out "$OUT/3dva_display"
"${FP[@]}" flex-mesh --volume "$OUT/data/consensus.mrc" --cells 12 --out "$OUT/flex_mesh"
"${FP[@]}" flex-train --particles "$OUT/data/particles.star" --volume "$OUT/data/consensus.mrc" \
    --mesh "$OUT/flex_mesh/mesh.pkl" --train-box 32 --init-latents "$OUT/3dva/latents.csv" --out "$OUT/flex_train"
"${FP[@]}" flex-generate --model "$OUT/flex_train" --frames 9 --out "$OUT/flex_generate"
"${FP[@]}" flex-reconstruct --model "$OUT/flex_train" --particles "$OUT/data/particles.star" \
    --mask "$OUT/data/mask.mrc" --out "$OUT/flex_reconstruct"
cat <<MSG

demo: done.
  example data         $OUT/data (particles.star, consensus.mrc, mask.mrc, gt/)
  reconstruction       $OUT/reconstruct (map.mrc, half maps, fsc.png)
  3DVA                 $OUT/3dva (components, latents.csv, plots/) and $OUT/3dva_display (frames)
  3D Flex mesh         $OUT/flex_mesh (mesh.pkl, mesh.pdb, mesh_slices.png)
  3D Flex training     $OUT/flex_train (seeded from 3DVA: model.pt, latents.csv, latents.png, activations.png, flow.png)
  3D Flex generation   $OUT/flex_generate (series_*/vol_*.mrc, atlas.png)
  3D Flex reconstruct  $OUT/flex_reconstruct (flex_map.mrc, noflex_map.mrc, half maps, fsc.png)
MSG
