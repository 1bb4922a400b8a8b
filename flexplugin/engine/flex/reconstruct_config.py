"""Defaults of the 3D Flex reconstruction (flex-reconstruct), declared once and torch-free, so that the CLI and the
Scipion protocol take them from here (docs/flex_reconstruction.md explains each)."""
from __future__ import annotations

__all__ = ["BATCH_SIZE", "FLOW_TOL", "ITERATIONS", "MAX_BINS", "TOL"]

ITERATIONS = 20  # most CG iterations per half map
TOL = 1e-2  # CG stops when the preconditioned residual is below this fraction of the right-hand side's
FLOW_TOL = 0.25  # largest flow spread within a latent bin, voxels of the crop box, for 95 % of the particles
MAX_BINS = 64  # cap on the number of latent bins chosen from FLOW_TOL (memory: two accumulators per bin and half)
BATCH_SIZE = 128  # particles per insertion batch
