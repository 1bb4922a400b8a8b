"""`flexplugin 3dva-display`: volume series and clusters from a 3dva run (engine/va3d/display.py); its options
mirror cryoSPARC's 3D Variability Display (var_3D_disp) parameters, declared once in DisplayConfig
(engine/va3d_config.py)."""
from __future__ import annotations

import argparse
import math

from .common import add_common, add_config_options, config_from_args, device

COMMAND = "3dva-display"
HELP = "volume series / clusters from a 3dva run"
DESCRIPTION = ("3D Variability Display: simple (linear series V0 + t·V_k), intermediates (reconstructions in a "
               "rolling window along a component) or cluster (k-means on the coordinates, one reconstruction per "
               "cluster).")


def add_args(p: argparse.ArgumentParser) -> None:
    """The run and output folders, the particles, and DisplayConfig's options."""
    from ..engine.va3d_config import DisplayConfig
    p.add_argument("--run", required=True, help="output folder of `flexplugin 3dva`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--particles", default=None, help="particle STAR file (default: the one the run used)")
    add_config_options(p, DisplayConfig)  # --mode, --frames, ..., --max-memory-gb: declared once, there
    add_common(p)


def _check_display_options(a: argparse.Namespace) -> None:
    """3dva-display's numeric options that the engine would otherwise meet as a traceback or NaN weights."""
    from ..engine.errors import InputError
    if a.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {a.batch_size}")
    if not (math.isfinite(a.max_memory_gb) and a.max_memory_gb > 0):
        raise InputError(f"--max-memory-gb must be a positive number of GB, got {a.max_memory_gb}")
    if not math.isfinite(a.width):
        raise InputError(f"--width must be > 0 (triangular), 0 (top-hat) or -1 (equal-count bins), got {a.width}")
    if not math.isfinite(a.range_percentile):
        raise InputError(f"--range-percentile must be in [0, 50), got {a.range_percentile}")


def main(a: argparse.Namespace) -> None:
    """Make the display of the run in --run into --out, with ChimeraX scripts for its series and clusters."""
    from ..chimerax import write_display_scripts
    from ..engine import distributed
    from ..engine.va3d.display import run_display
    from ..engine.va3d_config import DisplayConfig
    _check_display_options(a)
    cfg = config_from_args(DisplayConfig, a, device=str(device(a.device)))
    run_display(a.run, a.out, cfg, particles=a.particles)
    if distributed.is_main():  # ChimeraX scripts for the series and the clusters (flexplugin/chimerax.py)
        write_display_scripts(a.out)
