"""Settings of the 3D Flex reconstruction (flex-reconstruct), each declared once with its default and help text and
torch-free, so that the CLI builds its options and the Scipion protocol its defaults from here (engine/options.py;
docs/flex_reconstruction.md explains each)."""
from __future__ import annotations

from dataclasses import dataclass

from ..options import setting

__all__ = ["BATCH_SIZE", "FLOW_NOISE", "FLOW_TOL", "ITERATIONS", "MAX_BINS", "NOFLEX", "TOL", "ReconstructConfig"]


@dataclass
class ReconstructConfig:
    """flex-reconstruct's solver settings; names follow the CLI options."""

    iterations: int = setting(20, "most conjugate-gradient iterations per half map; the solver usually stops "
                                  "earlier at --tol", "cf. flex_bfgs_num_iters")
    tol: float = setting(0.01, "stop when the preconditioned residual is below this fraction of the right-hand "
                               "side's")
    reg: float = setting(1.0, "scale of the per-shell regularisation derived from the half-map FSC, as in the Wiener "
                              "map; > 1 smooths more")
    bins: int | None = setting(None, "number of latent bins (more bins = more exact, slower)",
                               default_text="none, chosen from --flow-tol")
    flow_tol: float = setting(0.25, "largest flow spread within a latent bin, voxels of the crop box, for 95 % of the "
                                    "particles")
    max_bins: int = setting(64, "cap on the number of latent bins when chosen from --flow-tol (memory: two Fourier "
                                "accumulators per bin and half set)")
    flow_noise: float = setting(0.125, "noise level of the trained flows, voxels of the training box (where the flow "
                                       "generator learned them): each mesh vertex's motion is shrunk by 1 - (flow_noise "
                                       "/ rms)^2, rms its displacement's spread over the particles, and held still where "
                                       "rms is below it (0: no shrinkage)")
    noflex: bool = setting(True, "also reconstruct without motion (the rigid baseline, the Wiener map) with the same "
                                 "solver, for the FSC and the local resolution gain", "flex_do_noflex_recon")
    batch_size: int = setting(128, "particles per insertion batch")
    seed: int = setting(0, "seed of the half-set split when rlnRandomSubset is absent")


_D = ReconstructConfig()
ITERATIONS = _D.iterations
TOL = _D.tol
FLOW_TOL = _D.flow_tol
FLOW_NOISE = _D.flow_noise
MAX_BINS = _D.max_bins
NOFLEX = _D.noflex
BATCH_SIZE = _D.batch_size
