"""Settings of the 3D Flex generator (flex-generate), each declared once with its default, help text and cryoSPARC
key, torch-free, so that the CLI builds its options and the generate protocol its defaults from here
(engine/options.py). The inputs (--model, --points, --from-particles, --map) are not settings."""
from __future__ import annotations

from dataclasses import dataclass

from ..options import setting

__all__ = ["GenerateConfig"]


@dataclass
class GenerateConfig:
    """How flex-generate samples the latent space; names follow the CLI options."""

    frames: int = setting(41, "volumes per latent axis (odd puts the centre of the range in the middle)",
                          "flex_gen_num_pts")
    percentile: float = setting(1.0, "each axis spans the particles' [p, 100-p] percentiles")
    box: str = setting("train", "'train' (training box), 'full' (crop box: the flow is re-rasterised on the finer "
                                "grid) or a number of pixels")
    atlas: bool = setting(True, "the latent atlas")
    atlas_axes: str | None = setting(None, "the two latent axes of the atlas", default_text="0,1")
    atlas_grid: int = setting(7, "atlas grid points per axis")
