"""Settings of the 3D Flex mesh prep (flex-mesh), each declared once with its default, help text and cryoSPARC key,
torch-free, so that the CLI builds its options and the Scipion protocols their defaults from here
(engine/options.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ..options import setting

__all__ = ["MeshConfig"]


@dataclass
class MeshConfig:
    """flex-mesh's mesh and automatic-mask settings; names follow the CLI options."""

    cells: int = setting(20, "tetra cells across the box", "tetra_num_cells")
    rigidity_min: float = setting(0.5, "rigidity weight of empty cells; dense cells get 1.0", "rigidity_penalty_min")
    stiffen_low_density: bool = setting(False, "peripheral non-empty cells get weight 3.0",
                                        "rigidity_penalty_stiffen_low_density")
    mask_lowpass: float = setting(10.0, "auto mask: low-pass in Å")
    mask_threshold: float | None = setting(None, "auto mask: absolute threshold",
                                           default_text="5 % of the low-passed map's maximum")
    mask_dilate: float = setting(2.0, "auto mask: dilation in Å")
    mask_pad: float = setting(5.0, "auto mask: soft edge in Å")
