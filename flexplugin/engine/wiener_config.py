"""Settings of the Wiener backprojection (`flexplugin reconstruct`), each declared once with its default and help
text, torch-free, so that the CLI builds its options and `reconstruct_particles` its defaults from here
(engine/options.py)."""
from __future__ import annotations

from dataclasses import dataclass

from .options import setting

__all__ = ["WienerConfig"]


@dataclass
class WienerConfig:
    """How `flexplugin reconstruct` inserts the particles; names follow the CLI options."""

    pad: int = setting(2, "oversampling factor of the 3-D grid")
    batch_size: int = setting(256, "images per batch")
    seed: int = setting(0, "seed of the half-set split when rlnRandomSubset is absent")
