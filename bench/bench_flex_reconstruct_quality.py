"""3D Flex reconstruction against its Wiener start and the truth, on a benchmark set with a trained model.

For each --flow-noise value (ReconstructConfig.flow_noise; 0 is the flows as trained) the bench runs
flex_reconstruct on the set's particles (the FSC mask: gt/moving_mask.mrc) and prints, against the true middle state
(gt/state_*.mrc):
- the worst shell of flex − Wiener start in FSC with the truth: whole map (all shells, and the shells where the start
  has signal: its FSC above 3/√n, n the shell's independent coefficients) and static region (inside the particle
  sphere, outside the moving mask dilated by --margin voxels, soft edge);
- the worst shell of flex − start in half-map FSC (unmasked);
- inside the moving mask: correlation of the flex, noflex and Wiener (`reconstruct_particles`) maps with the truth,
  and the masked half-map FSC = 0.143 resolution of flex and noflex;
- time of flex_reconstruct over the Wiener reconstruction of the same particles (the faster of two), same run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_flex_reconstruct_quality.py --data SET --model TRAIN_DIR

SET holds particles.star and gt/ (flexplugin simulate, or engine/pdb_motion.make_benchmark); TRAIN_DIR is
flex-train's output for those particles. Timings on a shared machine: compare the ratios measured in one run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexplugin.engine.flex.generate import load_model
from flexplugin.engine.flex.reconstruct import flex_reconstruct
from flexplugin.engine.flex.reconstruct_config import FLOW_NOISE
from flexplugin.engine.fourier import radius_3d
from flexplugin.engine.io import read_particles, read_volume
from flexplugin.engine.reconstruct import reconstruct_particles, shell_fsc


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)


def shell_sigma(n: int) -> np.ndarray:
    """1/√(independent coefficients) per shell round(|k|·n) = 0..n/2: the FSC's noise level where there is no signal."""
    r = torch.round(radius_3d(n, "cpu") * n).long().reshape(-1)  # the rfft half grid: one of each Friedel pair
    counts = torch.bincount(r, minlength=n // 2 + 1)[: n // 2 + 1].double()
    return (1 / counts.clamp(min=1).sqrt()).numpy()


def static_mask(moving: np.ndarray, margin: int) -> np.ndarray:
    """Soft mask of the voxels inside the particle sphere (radius 0.45 box) and outside the dilated moving mask."""
    n = moving.shape[-1]
    keep = ~ndimage.binary_dilation(moving > 0.5, iterations=margin)
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    keep &= (z ** 2 + y ** 2 + x ** 2) < (0.45 * n) ** 2
    return ndimage.gaussian_filter(keep.astype(np.float32), 1.0)


def worst(diff: np.ndarray, shells: np.ndarray) -> str:
    """'value (shell s)' of the smallest entry of diff among the given shells."""
    i = shells[np.argmin(diff[shells])]
    return f"{diff[i]:+.4f} ({i})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--flow-noise", type=float, nargs="+", default=[0.0, FLOW_NOISE])
    ap.add_argument("--margin", type=int, default=3, help="dilation of the moving mask for the static region, voxels")
    a = ap.parse_args()
    model = load_model(a.model, "cpu")
    ps = read_particles(a.data / "particles.star")
    moving = read_volume(a.data / "gt/moving_mask.mrc")[0].astype(np.float32)
    states = sorted((a.data / "gt").glob("state_*.mrc"))
    truth = _t(read_volume(states[len(states) // 2])[0])
    c = model.crop
    if moving.shape[-1] != c:
        raise SystemExit(f"the moving mask is {moving.shape[-1]} px, the crop box {c}: use a set at the model's crop")
    inside = moving > 0.5
    stat = _t(static_mask(moving, a.margin))
    sigma = shell_sigma(c)
    quiet = lambda s: None  # noqa: E731

    def corr(m: np.ndarray) -> float:
        x, y = m[inside] - m[inside].mean(), truth.numpy()[inside] - truth.numpy()[inside].mean()
        return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))

    t_w = []
    for _ in range(2):
        t0 = time.perf_counter()
        wiener = reconstruct_particles(ps, progress=quiet)
        t_w.append(time.perf_counter() - t0)
    print(f"{a.data}: {len(ps)} particles, crop box {c}, truth {states[len(states) // 2].name}, "
          f"Wiener reconstruction {min(t_w):.1f} s; torch threads {torch.get_num_threads()}", flush=True)
    for tau in a.flow_noise:
        t0 = time.perf_counter()
        r = flex_reconstruct(model, ps, mask=moving, flow_noise=tau, progress=quiet)
        t_f = time.perf_counter() - t0
        assert r is not None and r.start_half1 is not None and r.start_half2 is not None  # one process: rank 0
        start = 0.5 * (r.start_half1 + r.start_half2)
        fw = {k: shell_fsc(_t(m), truth) for k, m in (("flex", r.flex_map), ("start", start))}
        fs = {k: shell_fsc(_t(m), truth, stat) for k, m in (("flex", r.flex_map), ("start", start))}
        hh = {"flex": shell_fsc(_t(r.flex_half1), _t(r.flex_half2)),
              "start": shell_fsc(_t(r.start_half1), _t(r.start_half2))}
        every = np.arange(1, c // 2 + 1)
        signal = every[fw["start"][1:] > 3 * sigma[1:]]
        print(f"flow noise {tau:g} voxels: {r.bins} bins, {100 * r.vertices_still:.0f} % of the vertices still\n"
              f"  FSC with the truth, flex - start, worst shell: whole map {worst(fw['flex'] - fw['start'], every)}, "
              f"where the start has signal (shells {signal.min()}-{signal.max()}) "
              f"{worst(fw['flex'] - fw['start'], signal)}, static region {worst(fs['flex'] - fs['start'], every)}\n"
              f"  half-map FSC, flex - start, worst shell: {worst(hh['flex'] - hh['start'], every)}\n"
              f"  moving mask: correlation with the truth flex / noflex / Wiener {corr(r.flex_map):.3f} / "
              f"{corr(r.noflex_map):.3f} / {corr(wiener.full):.3f}; masked half-map FSC 0.143 flex / noflex "
              f"{r.res_flex:.2f} / {r.res_noflex:.2f} Å\n"
              f"  time flex-reconstruct / Wiener: {t_f:.1f} / {min(t_w):.1f} s = {t_f / min(t_w):.1f}x", flush=True)


if __name__ == "__main__":
    main()
