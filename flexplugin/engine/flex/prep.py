"""3D Flex data prep: real-space crop and Fourier downsampling of particles and maps to the training box.

Done on the fly while streaming (no copy of the stack is needed), read from a prepared-particles cache in a
scratch folder (flex-train --scratch, engine/flex/cache.py), or written out once with `flexplugin flex-prep`
to speed up repeated training runs. Particle ids are kept.
"""
from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..fourier import crop_center, fourier_crop_2d, fourier_crop_3d
from ..io import ParticleSet
from .prep_config import PrepConfig

__all__ = ["PrepSpec", "prep_spec", "PreparedParticles", "prep_volume"]


@dataclass(frozen=True)
class PrepSpec:
    """Input box N (apix), real-space crop box C, training box T; training pixel size = apix·C/T."""

    box: int
    apix: float
    crop: int
    train: int

    @property
    def apix_train(self) -> float:
        return self.apix * self.crop / self.train

    @property
    def shift_scale(self) -> float:
        """Pixels of the training box per pixel of the input box."""
        return self.train / self.crop


def prep_spec(box: int, apix: float, crop: int | None = PrepConfig.crop,
              train_box: int | None = PrepConfig.train_box) -> PrepSpec:
    """Validate crop/training boxes: crop ≤ box, training ≤ crop, both even; the defaults are PrepConfig's (no crop,
    the training box it declares); `train_box` None keeps the crop box."""
    crop = box if not crop else crop
    train = min(crop, train_box or crop)
    if crop > box or crop < 16 or crop % 2:
        raise InputError(f"crop box must be even, >= 16 and <= the particle box {box}; got {crop}")
    if train < 16 or train % 2:
        raise InputError(f"training box must be even and >= 16; got {train}")
    return PrepSpec(box, apix, crop, train)


def prep_images(images: torch.Tensor, spec: PrepSpec) -> torch.Tensor:
    """(B, N, N) → (B, T, T): centre crop to C, then Fourier-crop to T (pixel values preserved)."""
    x = crop_center(images, spec.crop, 2) if spec.crop != spec.box else images
    return fourier_crop_2d(x, spec.train) if spec.train != spec.crop else x


def prep_volume(vol: np.ndarray | torch.Tensor, spec: PrepSpec) -> torch.Tensor:
    """A map at the particle box → the training box (same physical extent as the cropped particles)."""
    v = torch.as_tensor(vol, dtype=torch.float32)
    if v.shape[-1] != spec.box:
        raise InputError(f"volume box {v.shape[-1]} differs from the particle box {spec.box}")
    v = crop_center(v, spec.crop, 3) if spec.crop != spec.box else v
    return fourier_crop_3d(v, spec.train) if spec.train != spec.crop else v


class PreparedParticles:
    """A ParticleSet seen at the training box: images, poses, shifts (training pixels), CTF.

    With `cache` (engine/flex/cache.py's ParticleCache of these particles at `spec`) the images come from the
    float16 memory-mapped prepared images instead of the full-box stacks, cropped again each time."""

    def __init__(self, particles: ParticleSet, spec: PrepSpec, cache=None):
        if cache is not None and len(cache) != len(particles):
            raise ValueError(f"the particle cache holds {len(cache)} images for {len(particles)} particles")
        self.ps, self.spec, self.cache = particles, spec, cache

    def __len__(self) -> int:
        return len(self.ps)

    @property
    def ids(self) -> np.ndarray:
        return self.ps.ids

    def images(self, rows: np.ndarray, device) -> torch.Tensor:
        """Images (B, T, T) float32 at the training box for 0-based table rows `rows`."""
        if self.cache is not None:
            return torch.from_numpy(self.cache.images(rows)).to(device)
        return prep_images(torch.from_numpy(self.ps.images(rows)).to(device), self.spec)

    def batch(self, rows: np.ndarray, device) -> dict:
        """Everything a training step needs for rows `rows`: images, rotations, shifts, CTF, the rows."""
        return {
            "images": self.images(rows, device),
            "rotations": self.ps.rotations(rows, device),
            "shifts": self.ps.shifts_px(rows, device) * self.spec.shift_scale,
            "ctf": self.ps.ctf_params(rows, device),
            "rows": torch.as_tensor(rows, device=device),
        }

    def loader(self, batches: list[np.ndarray], device, workers: int = 0, prefetch: int = 2) -> Generator[dict, None, None]:
        """`batch(rows, device)` for each of `batches`, in order; with `workers` > 0 the batches are read and
        prepared ahead by that many DataLoader worker processes (`prefetch` batches each), on the CPU, while
        the caller computes, then moved to `device` (pinned memory for a GPU)."""
        if workers <= 0:
            for rows in batches:
                yield self.batch(rows, device)
            return
        dev = torch.device(device)
        # torch's stubs type collate_fn for lists of samples; with batch_size=None it gets one whole batch
        dl = torch.utils.data.DataLoader(_Batches(self, batches), batch_size=None, shuffle=False,
                                         num_workers=workers, prefetch_factor=prefetch,
                                         collate_fn=_as_is,  # type: ignore[arg-type]
                                         pin_memory=dev.type == "cuda", persistent_workers=False)
        for b in dl:
            yield {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v.to(dev)
                   for k, v in b.items()}


class _Batches(torch.utils.data.Dataset):
    """Batch i of a list of row arrays, prepared on the CPU (what a DataLoader worker computes)."""

    def __init__(self, particles: PreparedParticles, batches: list[np.ndarray]):
        self.p, self.batches = particles, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.p.batch(self.batches[i], "cpu")


def _as_is(batch: dict) -> dict:
    """DataLoader collate for batches that are already whole (batch_size=None)."""
    return batch
