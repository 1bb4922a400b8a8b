"""3D Variability Display: volume series and clusters from a finished 3DVA run (cryoSPARC var_3D_disp).

Modes:
* **simple**: for each component k, frames V0 + t_f·V̂_k with t_f evenly spaced between the
  `range_percentile` and 100 − `range_percentile` percentiles of the coordinates z_k. Always linear.
* **intermediates**: frame centres c_f as in simple mode, spacing Δ; each frame is a Wiener
  reconstruction (flexplugin.engine.reconstruct, two half sets, FSC-weighted) from the images themselves,
  weighted by their position along z_k:
    width > 0   triangular weights max(0, 1 − |z − c_f| / (width·Δ)), i.e. `width` is the half-width of
                the window in frames (width 1 is linear interpolation between neighbouring frames; the
                default 2 lets each particle contribute to ~4 frames, smoother at low particle counts);
    width = 0   top-hat: the particles with −Δ/2 ≤ z − c_f < Δ/2;
    width = −1  equal-count bins of the sorted coordinates (no percentile clipping).
  Non-linear changes appear because nothing is interpolated between maps.
* **cluster**: k-means (k-means++ seeding, Lloyd iterations, seeded) on the coordinates of the selected
  components, `frames` clusters; one reconstruction and one particle STAR per cluster.

Output volumes are post-processed in this order: optional low-/high-pass (Butterworth), Fourier
downsampling to `downsample` (reconstructions are done at that box directly: the images are Fourier-
cropped before insertion, which saves memory and time), real-space centre crop to `crop`, hand flip
(mirror along z). With a component filter ("0,2") the selected components are renumbered 0, 1, … in the
output names, as cryoSPARC does; summary.json records the original index of each.

Under torchrun (engine/distributed.py) each rank inserts its share of every batch of the reconstructions, the
accumulators are summed over the ranks, and rank 0 alone prints and writes; summary.json records the number
of processes ("world_size") and the particles each held ("particles_per_rank"; 0 in simple mode, which reads
no images).
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile
import torch

from .. import distributed
from ..atomic import atomic_path, save_plot, to_csv
from ..cluster import kmeans
from ..cryosparc_cs import read_blocks
from ..errors import InputError
from ..fourier import (
    butterworth_highpass,
    butterworth_lowpass,
    crop_center,
    fourier_crop_2d,
    fourier_crop_3d,
    irfft3c,
    radius_3d,
    rfft3c,
)
from ..insertion import insert_slices
from ..io import ID_LABEL, read_mask, write_volume
from ..progress import Progress
from ..reconstruct import NYQUIST, BackprojectionAccumulator, backprojection_terms, finalize_halves
from ..va3d_config import DisplayConfig  # torch-free: the CLI builds 3dva-display's options from it
from .em import dump_json, fourier_resize_3d
from .outputs import RunFolder

__all__ = ["DisplayConfig", "run_display", "frame_weights", "kmeans", "parse_components", "insert_weighted"]


def parse_components(spec: str | None, k: int) -> list[int]:
    """'0,2' → [0, 2]; None/'' → all; clear errors for bad indices."""
    if spec is None or str(spec).strip() == "":
        return list(range(k))
    try:
        sel = [int(s) for s in str(spec).replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise InputError(f"--components must be comma-separated integers like \"0,2\", got {spec!r}") from None
    bad = [c for c in sel if not 0 <= c < k]
    if bad or not sel:
        raise InputError(f"--components {spec!r}: the run has components 0..{k - 1}")
    if len(set(sel)) != len(sel):
        raise InputError(f"--components {spec!r} repeats a component")
    return sel


def frame_centres(z: np.ndarray, frames: int, percentile: float) -> np.ndarray:
    lo, hi = np.percentile(z, [percentile, 100.0 - percentile])
    return np.linspace(lo, hi, frames)


def frame_weights(z: np.ndarray, frames: int, percentile: float, width: float) -> np.ndarray:
    """(frames, N) weights of each particle in each intermediate frame (see module docstring)."""
    z = np.asarray(z, dtype=np.float64)
    if width == -1:
        order = np.argsort(z, kind="stable")
        w = np.zeros((frames, len(z)))
        for f, part in enumerate(np.array_split(order, frames)):
            w[f, part] = 1.0
        return w
    if width < 0:
        raise InputError(f"--width must be > 0 (triangular), 0 (top-hat) or -1 (equal-count bins), got {width}")
    c = frame_centres(z, frames, percentile)
    delta = (c[-1] - c[0]) / max(frames - 1, 1)
    if delta <= 0:
        raise InputError("the coordinates of this component have no spread; nothing to display")
    diff = z[None, :] - c[:, None]
    if width == 0:  # half-open bins [c − Δ/2, c + Δ/2): each particle in at most one frame
        return ((diff >= -delta / 2) & (diff < delta / 2)).astype(np.float64)
    return np.clip(1.0 - np.abs(diff) / (width * delta), 0.0, None)


class _Post:
    """Output post-processing: filters, downsampling, crop, hand flip (see module docstring)."""

    def __init__(self, cfg: DisplayConfig, box: int, apix: float):
        self.cfg, self.box, self.apix = cfg, box, apix
        self.rbox = cfg.downsample or box  # reconstruction / output box before cropping
        if self.rbox % 2 or self.rbox > box or self.rbox < 8:
            raise InputError(f"--downsample must be an even box between 8 and {box}, got {self.rbox}")
        self.rapix = apix * box / self.rbox
        if cfg.crop is not None and (cfg.crop % 2 or cfg.crop > self.rbox or cfg.crop < 4):
            raise InputError(f"--crop must be an even box <= {self.rbox}, got {cfg.crop}")
        if cfg.filter_res is not None and cfg.filter_res < 2 * self.rapix - 1e-6:
            raise InputError(f"--filter-res {cfg.filter_res} Å is finer than Nyquist of the output "
                             f"({2 * self.rapix:.3f} Å)")
        coarsest = box * apix / 4  # 3dva's own limit: the Nyquist of an 8-px box
        if cfg.filter_res is not None and cfg.filter_res > coarsest + 1e-6:
            raise InputError(f"--filter-res {cfg.filter_res:g} Å is coarser than {coarsest:.1f} Å (a quarter of the "
                             f"{box * apix:.0f} Å box): the maps would keep only the lowest few Fourier shells; "
                             "use a value near the resolution of the variability")

    def __call__(self, vol: np.ndarray | torch.Tensor, already_at_rbox: bool = False) -> np.ndarray:
        v = torch.as_tensor(np.asarray(vol), dtype=torch.float32)
        if not already_at_rbox and self.rbox != v.shape[-1]:
            v = fourier_crop_3d(v, self.rbox)
        n = v.shape[-1]
        if self.cfg.filter_res or self.cfg.highpass_res:
            k = radius_3d(n) / self.rapix
            h = torch.ones_like(k)
            if self.cfg.filter_res:
                h = h * butterworth_lowpass(k, 1.0 / self.cfg.filter_res, self.cfg.filter_order)
            if self.cfg.highpass_res:
                h = h * butterworth_highpass(k, 1.0 / self.cfg.highpass_res, self.cfg.highpass_order)
            v = irfft3c(rfft3c(v) * h, n)
        if self.cfg.crop:
            v = crop_center(v, self.cfg.crop, 3)
        out = v.numpy()
        if self.cfg.flip_hand:
            out = out[::-1].copy()
        return np.ascontiguousarray(out, dtype=np.float32)


def _write_subset_star(ps, ids: np.ndarray, dst: Path, extra: dict | None = None) -> None:
    """Rows of the particles' source STAR whose particle id is in `ids` (ids as io.ParticleSet defines them),
    with the absolute stack paths io.read_particles resolved, so the file works from any folder."""
    src = ps.star_path
    blocks = read_blocks(src)  # a STAR file's blocks, or a cryoSPARC .cs file's tables
    key = "particles" if "particles" in blocks else next(k for k, v in blocks.items()
                                                         if isinstance(v, pd.DataFrame) and "rlnImageName" in v)
    t = blocks[key]
    src_ids = t[ID_LABEL].to_numpy(np.int64) if ID_LABEL in t else np.arange(1, len(t) + 1)
    pos = pd.Series(np.arange(len(t)), index=src_ids)
    sub = t.iloc[pos.loc[ids].to_numpy()].copy()
    if ID_LABEL not in sub:
        sub.insert(0, ID_LABEL, ids)
    names = pd.Series(ps.table["rlnImageName"].to_numpy(), index=ps.ids)
    sub["rlnImageName"] = names.loc[ids].to_numpy()
    for k, v in (extra or {}).items():
        sub[k] = v
    blocks[key] = sub
    with atomic_path(dst) as tmp:
        starfile.write(blocks, tmp, overwrite=True)


def insert_weighted(accs: list[BackprojectionAccumulator], images: torch.Tensor, rotations: torch.Tensor,
                    shifts_px: torch.Tensor | None, ctf, weights: torch.Tensor, phase_flipped: bool = False) -> None:
    """Add one batch to several accumulators at once, accumulator g with per-image weights weights[g].

    Equals ``accs[g].add(images, rotations, shifts_px, ctf, phase_flipped, weights[g])`` for every g (same
    padding, re-centring, CTF, and the same trilinear insertion, engine/insertion.py; a test pins
    this), but inserts all maps as channels of one call, so a particle shared by several frames is
    gridded once.
    """
    a0 = accs[0]
    m, dev = a0.m, a0.device
    c_y, c2, R = backprojection_terms(images, rotations, shifts_px, ctf, a0.apix, phase_flipped, dev)
    w = weights.to(dev, torch.float32)  # (G, B)
    data = c_y[:, None] * w.T[:, :, None, None]  # (B, G, N, N//2+1)
    den = c2[:, None] * w.T[:, :, None, None]
    out_r, out_c = insert_slices(den, data, R, m, NYQUIST)
    assert out_r is not None and out_c is not None  # both value sets were given
    for g, a in enumerate(accs):
        a.num += out_c[g]
        a.den += out_r[g]
        a.count += int((weights[g] > 0).sum())


def _reconstruct_weighted(ps, weights: np.ndarray, post: _Post, cfg: DisplayConfig, mask: np.ndarray | None,
                          label: str, log=print) -> list[dict]:
    """One FSC-weighted reconstruction per row of `weights` (G, N), streaming the stack; maps that do not
    fit in `max_memory_gb` are done in further passes. Returns per-map dicts with the volume and stats."""
    G, N = weights.shape
    rbox, pad = post.rbox, 2
    m = pad * rbox
    per_map = 2 * (m * m * (m // 2 + 1)) * (8 + 4) * 2  # two half accumulators (+ the batch's insertion buffer)
    per_pass = max(1, int(cfg.max_memory_gb * 1e9 // per_map))
    half = ps.half_sets(cfg.seed)
    mask_r = None
    if mask is not None:
        mask_r = fourier_resize_3d(torch.as_tensor(mask), rbox).clamp(0, 1) if rbox != ps.box else torch.as_tensor(mask)
    results: list[dict] = []
    scale = rbox / ps.box
    for g0 in range(0, G, per_pass):
        group = list(range(g0, min(G, g0 + per_pass)))
        accs = {h: [BackprojectionAccumulator(rbox, post.rapix, pad, cfg.device) for _ in group] for h in (1, 2)}
        active = np.nonzero(weights[group].sum(0) > 0)[0]
        prog = Progress(len(active), f"{label} maps {group[0]}..{group[-1]}", every=30.0,
                        stream=None if distributed.is_main() else (lambda _line: None))
        for s in range(0, len(active), cfg.batch_size):
            rows = distributed.shard(active[s:s + cfg.batch_size])  # this rank's share of the batch
            if not len(rows):
                continue
            imgs = torch.from_numpy(ps.images(rows))
            if rbox != ps.box:
                imgs = fourier_crop_2d(imgs, rbox)
            rots = ps.rotations(rows)
            sh = ps.shifts_px(rows) * scale
            ctf = ps.ctf_params(rows) if ps.has_ctf else None
            for h in (1, 2):
                sel = np.nonzero(half[rows] == h)[0]
                if len(sel):
                    wt = torch.as_tensor(weights[np.ix_(np.asarray(group), rows[sel])], dtype=torch.float32)
                    insert_weighted(accs[h], imgs[sel], rots[sel], sh[sel], ctf[sel] if ctf is not None else None,
                                    wt, ps.phase_flipped)
            prog.step(min(len(active), s + cfg.batch_size))
        for acc in accs[1] + accs[2]:  # every rank's particles (a no-op in one process)
            acc.all_reduce_()
        for i, g in enumerate(group):
            a1, a2 = accs[1][i], accs[2][i]
            info: dict[str, Any] = {"index": g, "particles": int((weights[g] > 0).sum()),
                                    "weight_sum": float(weights[g].sum())}
            if a1.count == 0 or a2.count == 0:
                info |= {"volume": None, "resolution_0143_A": None}
                log(f"{label}: map {g} has no particles in one half set; skipped")
            else:
                r = finalize_halves(a1, a2, mask_r)
                info |= {"volume": r.full, "resolution_0143_A": r.res_0143}
            results.append(info)
        del accs
    return results


def run_display(run_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: DisplayConfig,
                particles: str | None = None, log=print) -> dict:
    """Run one display mode; writes volumes, STAR subsets, plots and summary.json into out_dir."""
    from . import plots as pv
    if cfg.mode not in ("simple", "intermediates", "cluster"):
        raise InputError(f"unknown mode {cfg.mode!r}")
    rf = RunFolder(run_dir)
    sel = parse_components(cfg.components, rf.k)
    min_frames = 1 if cfg.mode == "cluster" else 2
    if cfg.frames < min_frames:
        raise InputError(f"--frames must be at least {min_frames} in {cfg.mode} mode, got {cfg.frames}")
    if not 0 <= cfg.range_percentile < 50:
        raise InputError(f"--range-percentile must be in [0, 50), got {cfg.range_percentile}")
    box, apix = rf.consensus.shape[-1], rf.apix
    post = _Post(cfg, box, apix)
    out = Path(out_dir)
    main = distributed.is_main()  # under torchrun every rank reconstructs its share; rank 0 alone writes
    if main:
        out.mkdir(parents=True, exist_ok=True)
    else:
        log = _silent
    z = rf.latents[:, sel]
    summary: dict[str, Any] = {
        "mode": cfg.mode, "run": str(Path(run_dir).resolve()), "config": asdict(cfg),
        "components": [{"output_index": j, "source_component": c} for j, c in enumerate(sel)],
        "apix": post.rapix, "box": cfg.crop or post.rbox, "files": []}
    files: list[str] = summary["files"]
    ps = None
    mask = None
    if cfg.mode != "simple":
        ps = rf.particles(particles)
        if not cfg.skip_reconstruction:
            ps.require(poses=True, ctf=False)
            mp = rf.run.get("mask")
            if mp and Path(mp).exists():
                mask = read_mask(mp)[0]

    if cfg.mode == "simple":
        for j, c in enumerate(sel):
            t = frame_centres(rf.latents[:, c], cfg.frames, cfg.range_percentile)
            if main:
                (out / f"component_{j:03d}").mkdir(exist_ok=True)
            for f, tf in enumerate(t):
                name = f"component_{j:03d}/frame_{f:03d}.mrc"
                if main:
                    write_volume(out / name, post(rf.consensus + tf * rf.components[c]), post.rapix)
                files.append(name)
            summary["components"][j]["t"] = t.tolist()
        log(f"3dva-display: {len(sel)} series of {cfg.frames} frames written to {out}")

    elif cfg.mode == "intermediates":
        assert ps is not None  # read above in every mode but simple
        counts = []
        for j, c in enumerate(sel):
            w = frame_weights(rf.latents[:, c], cfg.frames, cfg.range_percentile, cfg.width)
            counts.append(w.sum(1))
            if main:
                (out / f"component_{j:03d}").mkdir(exist_ok=True)
            info = summary["components"][j]
            info["frame_centres"] = (frame_centres(rf.latents[:, c], cfg.frames, cfg.range_percentile).tolist()
                                     if cfg.width != -1 else [float(np.mean(rf.latents[w[f] > 0, c]))
                                                              for f in range(cfg.frames)])
            info["frame_weight_sums"] = w.sum(1).tolist()
            if cfg.frame_particles:
                for f in range(cfg.frames):
                    name = f"component_{j:03d}/frame_{f:03d}_particles.star"
                    keep = w[f] > 0
                    if main:
                        _write_subset_star(ps, ps.ids[keep], out / name, {"rlnFlex3dvaFrameWeight": w[f, keep]})
                    files.append(name)
            if cfg.skip_reconstruction:
                continue
            res = _reconstruct_weighted(ps, w, post, cfg, mask, f"3dva-display component {j}", log)
            info["frame_resolution_0143_A"] = [r["resolution_0143_A"] for r in res]
            for r in res:
                if r["volume"] is None:
                    continue
                name = f"component_{j:03d}/frame_{r['index']:03d}.mrc"
                if main:
                    write_volume(out / name, post(r["volume"], already_at_rbox=True), post.rapix)
                files.append(name)
        if main:
            save_plot(pv.plot_frame_counts, out / "frame_counts.png", np.array(counts))
        files.append("frame_counts.png")
        log(f"3dva-display: intermediates for {len(sel)} component(s) written to {out}")

    else:  # cluster
        assert ps is not None
        labels, centres = kmeans(z, cfg.frames, cfg.seed)
        if main:
            to_csv(pd.DataFrame({ID_LABEL: rf.ids, "cluster": labels}), out / "clusters.csv", index=False)
        files.append("clusters.csv")
        summary["clusters"] = [{"cluster": c, "particles": int((labels == c).sum()), "centre": centres[c].tolist()}
                               for c in range(cfg.frames)]
        for c in range(cfg.frames):
            name = f"cluster_{c:03d}_particles.star"
            if main:
                _write_subset_star(ps, ps.ids[labels == c], out / name)
            files.append(name)
        if main:
            save_plot(pv.plot_clusters, out / "clusters.png", z, labels, centres, three_d=z.shape[1] >= 3)
        files.append("clusters.png")
        if not cfg.skip_reconstruction:
            w = np.stack([(labels == c).astype(np.float64) for c in range(cfg.frames)])
            res = _reconstruct_weighted(ps, w, post, cfg, mask, "3dva-display clusters", log)
            for r in res:
                summary["clusters"][r["index"]]["resolution_0143_A"] = r["resolution_0143_A"]
                if r["volume"] is None:
                    continue
                name = f"cluster_{r['index']:03d}.mrc"
                if main:
                    write_volume(out / name, post(r["volume"], already_at_rbox=True), post.rapix)
                files.append(name)
        log(f"3dva-display: {cfg.frames} clusters written to {out}")
    world = distributed.world()
    summary |= {"world_size": world, "particles_per_rank": -(-len(ps) // world) if ps is not None else 0}
    if main:
        dump_json(out / "summary.json", summary)
    return summary


def _silent(*_args, **_kwargs) -> None:
    """The log of ranks other than 0."""
