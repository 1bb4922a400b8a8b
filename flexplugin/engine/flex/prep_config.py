"""Settings of the 3D Flex data prep (the crop and training boxes), declared once with their defaults, help text
and cryoSPARC keys, torch-free: flex-prep and flex-train build their options, the training protocol its defaults
from here (engine/options.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ..options import setting

__all__ = ["PrepConfig"]


@dataclass
class PrepConfig:
    """The boxes of the data prep; names follow the CLI options (cryoSPARC 3D Flex Data Prep's keys in the
    metadata)."""

    crop: int | None = setting(None, "real-space crop box in px, about the centre", "box_size_pix",
                               default_text="none, keep the box")
    train_box: int = setting(128, "training box in px after Fourier cropping, or the crop box when smaller. Keep "
                                  "training Nyquist below the consensus resolution so the high-res reconstruction "
                                  "can be validated", "bin_size_pix")
