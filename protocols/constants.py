"""Names every flexplugin protocol and viewer shares: program names, input names and the engine's file names.

A protocol takes these from here (or from protocol_base.py), never from a sibling protocol, so the protocols sit
on one floor above the base. File names follow what the engine commands write into their --out folders.
"""
from __future__ import annotations

from flexplugin.engine.latents import LATENTS_CSV, LATENTS_NPY

__all__ = ["FLEX_PROGNAME", "VA3D_PROGNAME", "INPUT_TRAINING", "MESH_FILES", "MESH_CROPPED_MAP", "TRAIN_FILES",
           "TRAIN_PLOTS", "VA3D_RUN_JSON", "VA3D_VARIANCE_JSON"]

# FlexInfo.progName of flexplugin's results (FlexHub consumers, generation, reconstruction and the 3DVA display
# dispatch on them)
FLEX_PROGNAME = "FLEXPLUGIN.3DFLEX"
VA3D_PROGNAME = "FLEXPLUGIN.3DVA"

INPUT_TRAINING = "inputTraining"  # the form field holding a 3D flex training run or its particles

# what `flexplugin flex-mesh` writes into its --out folder (`map`: the cropped map, only with --crop)
MESH_FILES = {"mesh": "mesh.pkl", "pdb": "mesh.pdb", "mask": "mesh_mask.mrc", "slices": "mesh_slices.png",
              "info": "mesh.json"}
MESH_CROPPED_MAP = "mesh_map.mrc"

# what `flexplugin flex-train` writes into its --out folder
TRAIN_FILES = {"model": "model.pt", "checkpoint": "checkpoint.pt", "info": "train.json", "canonical": "canonical.mrc",
               "latents": LATENTS_CSV, "latents_npy": LATENTS_NPY, "particles": "particles_flex.star"}
TRAIN_PLOTS = ("latents", "activations", "flow", "losses")  # <name>.png

# what `flexplugin 3dva` writes (run.json lists the rest under "files")
VA3D_RUN_JSON = "run.json"
VA3D_VARIANCE_JSON = "explained_variance.json"
