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

One set's FSC differences at a shell carry the noise of its images: with --replicates R the bench also simulates R
noise replicates of the set (the same particles, poses, CTFs, states and clean images, fresh noise of the same level:
SimConfig.noise_seed), reconstructs each with the same model and latents at the last --flow-noise value, and prints per
shell the mean of flex − start over the R + 1 realisations with its standard error, and the shells where the mean is
below −0.001 by more than two standard errors (a loss that is not noise).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_flex_reconstruct_quality.py --data SET --model TRAIN_DIR \
        [--replicates 6 --work /tmp/replicates]

SET holds particles.star and gt/ (flexplugin simulate, or engine/pdb_motion.make_benchmark); TRAIN_DIR is
flex-train's output for those particles. Timings on a shared machine: compare the ratios measured in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexplugin.engine.flex.generate import load_model
from flexplugin.engine.flex.reconstruct import HighresResult, flex_reconstruct
from flexplugin.engine.flex.reconstruct_config import FLOW_NOISE
from flexplugin.engine.fourier import radius_3d
from flexplugin.engine.io import read_particles, read_volume
from flexplugin.engine.pdb_motion import BENCHMARKS, build_motion
from flexplugin.engine.reconstruct import reconstruct_particles, shell_fsc
from flexplugin.engine.simulate import SimConfig, simulate_dataset

ROOT = Path(__file__).resolve().parents[1]
LOSS_FLOOR = 1e-3  # an FSC difference below a thousandth is no loss (FSC curves are read to 0.001 at best)


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


def truth_fsc(r: HighresResult, truth: torch.Tensor, weight: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """FSC with the truth (optionally inside a soft mask) of a flex_reconstruct result's flex map and its Wiener start
    (the mean of the start halves)."""
    start = 0.5 * (r.start_half1 + r.start_half2)
    return {k: np.asarray(shell_fsc(_t(m), truth, weight)) for k, m in (("flex", r.flex_map), ("start", start))}


def noise_replicate(data: Path, out: Path, noise_seed: int, refdata: Path) -> Path:
    """Re-simulate the set in `data` from its simulation.json with fresh noise (noise_seed) into `out`."""
    if not (out / "particles.star").exists():
        meta = json.loads((data / "simulation.json").read_text())
        cfg = SimConfig(**{**meta["config"], "noise_seed": noise_seed})
        ds = meta.get("dataset")
        spec = BENCHMARKS[ds["name"]] if ds else None
        motion = build_motion(spec, refdata / spec.sdist) if spec else None
        simulate_dataset(cfg, out, lambda s: None, motion=motion, dataset=ds)
    return out


def replicate_table(runs: list[dict[str, np.ndarray]], sigma: np.ndarray) -> None:
    """Print, per shell, the start's mean FSC with the truth and flex − start: mean, standard error, range."""
    d = np.array([r["flex"] - r["start"] for r in runs])
    start = np.array([r["start"] for r in runs]).mean(0)
    mean, se = d.mean(0), d.std(0, ddof=1) / np.sqrt(len(d))
    print(f"flex - start, FSC with the truth, over {len(d)} noise realisations\n"
          "shell  start FSC  3/sqrt(n)  mean     s.e.    min      max")
    for k in range(1, len(mean)):
        print(f"{k:5d}  {start[k]:9.4f}  {3 * sigma[k]:9.4f}  {mean[k]:+.4f}  {se[k]:.4f}  {d[:, k].min():+.4f}  "
              f"{d[:, k].max():+.4f}")
    shells = np.arange(1, len(mean))
    below = shells[mean[1:] + 2 * se[1:] < -LOSS_FLOOR]
    print(f"  worst shell of the mean: {worst(mean, shells)} ± {se[shells[np.argmin(mean[1:])]]:.4f}; shells where "
          f"the mean is below -{LOSS_FLOOR} by more than 2 s.e.: {', '.join(map(str, below)) or 'none'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--flow-noise", type=float, nargs="+", default=[0.0, FLOW_NOISE])
    ap.add_argument("--margin", type=int, default=3, help="dilation of the moving mask for the static region, voxels")
    ap.add_argument("--replicates", type=int, default=0, help="noise replicates of the set to add (0: none)")
    ap.add_argument("--work", type=Path, help="folder for the noise replicates (kept, reused)")
    ap.add_argument("--refdata", type=Path, default=Path(os.environ.get("FLEXPLUGIN_REFDATA", ROOT / ".cache/refdata")))
    a = ap.parse_args()
    if a.replicates and a.work is None:
        ap.error("--replicates needs --work")
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
        fw, fs = truth_fsc(r, truth), truth_fsc(r, truth, stat)
        hh = {"flex": shell_fsc(_t(r.flex_half1), _t(r.flex_half2)),
              "start": shell_fsc(_t(r.start_half1), _t(r.start_half2))}
        every = np.arange(1, c // 2 + 1)
        signal = every[fw["start"][1:] > 3 * sigma[1:]]
        print(f"flow noise {tau:g} voxels of the training box: {r.bins} bins, {100 * r.vertices_still:.0f} % of the "
              "vertices still\n"
              f"  FSC with the truth, flex - start, worst shell: whole map {worst(fw['flex'] - fw['start'], every)}, "
              f"where the start has signal (shells {signal.min()}-{signal.max()}) "
              f"{worst(fw['flex'] - fw['start'], signal)}, static region {worst(fs['flex'] - fs['start'], every)}\n"
              f"  half-map FSC, flex - start, worst shell: {worst(hh['flex'] - hh['start'], every)}\n"
              f"  moving mask: correlation with the truth flex / noflex / Wiener {corr(r.flex_map):.3f} / "
              f"{corr(r.noflex_map):.3f} / {corr(wiener.full):.3f}; masked half-map FSC 0.143 flex / noflex "
              f"{r.res_flex:.2f} / {r.res_noflex:.2f} Å\n"
              f"  time flex-reconstruct / Wiener: {t_f:.1f} / {min(t_w):.1f} s = {t_f / min(t_w):.1f}x", flush=True)
    if not a.replicates:
        return
    runs = [fw]
    for i in range(a.replicates):
        rep = noise_replicate(a.data, a.work / f"noise{i + 1}", i + 1, a.refdata)
        r = flex_reconstruct(model, read_particles(rep / "particles.star"), mask=moving, flow_noise=a.flow_noise[-1],
                             progress=quiet)
        assert r is not None and r.start_half1 is not None and r.start_half2 is not None
        runs.append(truth_fsc(r, truth))
        print(f"  noise replicate {i + 1}: worst shell flex - start {worst(runs[-1]['flex'] - runs[-1]['start'], every)}",
              flush=True)
    replicate_table(runs, sigma)


if __name__ == "__main__":
    main()
