"""Settings of the built-in example data set (`flexplugin simulate`), each declared once with its default and help
text, torch-free, so that the CLI builds its options and the simulate protocol its defaults from here
(engine/options.py)."""
from __future__ import annotations

from dataclasses import dataclass

from .options import setting

__all__ = ["SimConfig"]


@dataclass
class SimConfig:
    """What `flexplugin simulate` makes; the defaults fit a CPU (2,000 particles at box 64). Fields without a
    command-line option are set by the benchmarks and tests."""

    n: int = setting(2000, "number of particles")
    box: int = setting(64, "box size in pixels, even")
    apix: float = setting(2.0, "pixel size in Å")
    snr: float = setting(0.1, "signal-to-noise ratio, variance ratio")
    seed: int = setting(0, "seed of every random draw (poses, CTFs, motion states, noise)")
    noise_seed: int | None = setting(None, "seed of the image noise alone: the same particles (poses, CTFs, motion "
                                           "states, clean images) with fresh noise of the same level, for noise "
                                           "replicates of a benchmark", default_text="none, the noise follows --seed")
    hinge_deg: float = setting(25.0, "hinge amplitude in degrees at |t|=1", option="--hinge")
    twist_deg: float = setting(30.0, "head twist in degrees at |t|=1", option="--twist")
    atom_sigma_A: float = setting(2.0, "width (σ) of the pseudo-atoms in Å", cli=False)
    defocus_min: float = setting(10000.0, "smallest defocus in Å", cli=False)
    defocus_max: float = setting(25000.0, "largest defocus in Å", cli=False)
    max_shift_px: float = setting(2.0, "largest origin shift in pixels", cli=False)
    stack_size: int = setting(1000, "images per .mrcs stack")
    n_states: int = setting(9, "conformations rendered as ground-truth volumes along t", cli=False)
    bfactor: float = setting(0.0, "CTF B-factor (Å²) of the images", cli=False)
