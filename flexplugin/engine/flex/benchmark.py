"""3D Flex trained and scored on a simulated data set with ground truth: the runs the bench and the tests share.

The simulator (simulate.py, pdb_motion.py) writes the truth beside the particles: the motion coordinate per
rlnImageId (ground_truth.csv), the states along it (gt/states.csv, gt/state_*.mrc), the consensus and a mask
of the moving atoms (gt/moving_mask.mrc). A run builds the mesh and trains exactly as `flex-mesh` and
`flex-train` do at the settings given (their defaults unless overridden), then scores with scoring.py:
- the cross-validated |Spearman ρ| of the best linear read-out of the true motion from the latents;
- maps generated at the mean latent of the particles truly near each state, against that state and against
  the consensus, inside the moving-domain mask (the gain), and whether the series runs through the states;
- the oracle |ρ|: the same read-out of latents searched, with the training's likelihood and band, over the TRUE
  state maps instead of decoded ones: what the images can tell at that band with a perfect model, the ceiling
  of any latent inference there.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..fourier import fourier_crop_3d
from ..io import ParticleSet, read_particles, read_volume
from ..projector import prepare_volume_ft
from ..va3d.slicing import make_band
from .mesh import build_mesh
from .mesh_config import MeshConfig
from .model import warp_volume
from .prep import PreparedParticles, prep_spec, prep_volume
from .scoring import readout_rho, state_metrics
from .search import SearchTables, batch_scores
from .train import FlexTrainer, TrainConfig, working_box

__all__ = ["Truth", "load_truth", "oracle_rho", "run_and_score", "score_trainer", "state_points"]


@dataclass
class Truth:
    """Ground truth of a simulated data set, in the particles' row order."""

    motion: np.ndarray  # (N,)
    states_t: np.ndarray  # (S,)
    states: np.ndarray  # (S, n, n, n)
    consensus: np.ndarray
    moving_mask: np.ndarray


def load_truth(data: str | Path, ids: np.ndarray) -> Truth:
    """Read what the simulator wrote in `data` for the particles `ids` (matched by rlnImageId)."""
    data = Path(data)
    motion = pd.read_csv(data / "ground_truth.csv").set_index("rlnImageId").loc[ids, "motion"].to_numpy()
    st = pd.read_csv(data / "gt" / "states.csv")
    states = np.stack([read_volume(data / "gt" / f"state_{int(i):03d}.mrc")[0] for i in st["state"]])
    return Truth(motion, st["motion"].to_numpy(), states, read_volume(data / "consensus.mrc")[0],
                 read_volume(data / "gt" / "moving_mask.mrc")[0])


def state_points(z: np.ndarray, motion: np.ndarray, states_t: np.ndarray) -> np.ndarray:
    """(S, K) mean latent of the particles whose true motion lies within half a state spacing of each state."""
    half = 0.5 * float(np.min(np.diff(np.sort(states_t)))) if len(states_t) > 1 else 0.1
    pts = []
    for t in states_t:
        sel = np.abs(motion - t) <= half
        pts.append(z[sel].mean(0) if sel.any() else z[np.argmin(np.abs(motion - t))])
    return np.asarray(pts, dtype=np.float32)


@torch.no_grad()
def score_trainer(tr: FlexTrainer, truth: Truth) -> dict:
    """Scores of a trained model (module docstring); maps compared on the training box."""
    z = tr.latents.cpu().numpy()
    spec, t = tr.spec, tr.spec.train
    pts = torch.as_tensor(state_points(z, truth.motion, truth.states_t), device=tr.dev)
    u = tr.raster(t).flow(tr.gen(pts), spec.apix_train)
    generated = warp_volume(tr.canonical(), u).cpu().numpy()

    def at_train_box(v: np.ndarray) -> np.ndarray:
        return prep_volume(v, spec).numpy()
    m = state_metrics(generated, np.stack([at_train_box(v) for v in truth.states]), at_train_box(truth.consensus),
                      np.clip(at_train_box(truth.moving_mask), 0, 1))
    flow = tr.flow_for(pts[[0, -1]]).norm(dim=-1)
    return {"rho": readout_rho(z, truth.motion), "mean_gain": m["mean_gain"], "min_gain": m["min_gain"],
            "end_gains": [m["gain"][0], m["gain"][-1]], "order_rho": m["order_rho"], "best_match": m["best_match"],
            "max_flow_A": float(flow.max())}


@torch.no_grad()
def oracle_rho(tr: FlexTrainer, truth: Truth, kmax_frac: float | None = None, points: int = 33,
               batch_size: int = 256) -> float:
    """|ρ| of the posterior-mean motion of every particle over maps of the true states (linearly interpolated
    between them at `points` motion values), scored with the trainer's likelihood - scale, noise spectrum,
    CTF, poses - at band `kmax_frac` of the training Nyquist (default: the final band). A perfect model's
    latent search could do no better: the ceiling for the latents' |ρ| at that band."""
    spec, t, dev = tr.spec, tr.spec.train, tr.dev
    frac = tr.cfg.kmax_final if kmax_frac is None else kmax_frac
    m = working_box(t, frac)
    states = torch.stack([prep_volume(v, spec) for v in truth.states]).to(dev)
    st_t = torch.as_tensor(truth.states_t, dtype=torch.float32)
    fine = torch.linspace(float(st_t.min()), float(st_t.max()), points)
    j = torch.searchsorted(st_t, fine).clamp(1, len(st_t) - 1)
    w = ((fine - st_t[j - 1]) / (st_t[j] - st_t[j - 1])).to(dev)[:, None, None, None]
    maps = (1 - w) * states[j - 1] + w * states[j]
    maps = fourier_crop_3d(maps, m) if m != t else maps
    tables = SearchTables(prepare_volume_ft(maps, pad=2))
    band = make_band(m, dev, kmax_px=frac * t / 2)
    assert tr.noise_shell is not None, "the trainer estimates the noise before it trains"
    wts = band.weight / tr.noise_shell[band.shell.clamp(max=t // 2)]
    z = []
    for s in range(0, len(tr.p), batch_size):
        b = tr.p.batch(np.arange(s, min(s + batch_size, len(tr.p))), dev)
        cross, power = batch_scores(tr, b, tables, band, wts, m)  # the latent search's own likelihood terms
        z.append(torch.softmax(cross - 0.5 * power, 1) @ fine.to(dev))
    return readout_rho(torch.cat(z).cpu().numpy()[:, None], truth.motion)


def run_and_score(data: str | Path, train_box: int = 32, cfg: TrainConfig | None = None,
                  init: np.ndarray | None = None, cells: int = MeshConfig.cells, mask: np.ndarray | None = None,
                  particles: ParticleSet | None = None, device: str = "cpu", out: str | Path | None = None,
                  progress: Callable[[str], None] = lambda s: None) -> tuple[FlexTrainer, dict]:
    """Mesh (flex-mesh's automatic mask unless `mask`), train with `cfg` (defaults) and score; returns both.

    Checkpoints go to `out`, or to a temporary folder removed afterwards."""
    data = Path(data)
    ps = particles if particles is not None else read_particles(data / "particles.star")
    vol, apix = read_volume(data / "consensus.mrc")
    mesh = build_mesh(vol, apix, mask=mask, cells=cells)
    spec = prep_spec(ps.box, ps.apix, None, train_box)
    t0 = time.monotonic()
    tr = FlexTrainer(PreparedParticles(ps, spec), prep_volume(vol, spec), mesh, cfg or TrainConfig(), device, init)
    if out is None:
        with tempfile.TemporaryDirectory() as tmp:
            tr.fit(tmp, progress=progress)
    else:
        tr.fit(out, progress=progress)
    truth = load_truth(data, ps.ids)
    score = score_trainer(tr, truth)
    score["oracle_rho"] = oracle_rho(tr, truth)
    score.update(seconds=time.monotonic() - t0, cells=len(mesh.cells), train_box=train_box, k=tr.cfg.k,
                 particles=len(ps))
    return tr, score
