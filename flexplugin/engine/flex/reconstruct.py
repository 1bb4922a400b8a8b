"""3D Flex high-resolution reconstruction: the canonical map with the learned motion undone.

Latents and the flow generator are frozen. For each half set the canonical map V at the crop box solves
    min_V  ½ Σ_i Σ_k |Y_i(k) − C_i(k)·S_i(k)·F[P_i D_{u_i} V](k)|² / σ²(k)  +  ½ λ ‖V‖²
by L-BFGS (strong-Wolfe line search), where D_u is the convection (backward warp) by particle i's flow,
re-rasterised from the mesh on the crop box, P_i the projection at its pose and S_i its origin shift.
The objective is linear least squares in V, so autograd's gradient is exactly the adjoint chain
(adjoint convection ∘ backprojection). The "noflex" baseline solves the same problem with u = 0.

Each half starts from its own Wiener reconstruction (engine/reconstruct.py), which is the noflex
solution up to regularisation, so the iterations spend their effort on what the motion changes; the
halves never see each other's particles. σ²(k) is estimated per shell from the residuals of that start.
Particles are streamed in batches on every pass, so memory does not grow with their number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..ctf import compute_ctf
from ..fourier import crop_center, freq_grid_2d, fsc, fsc_resolution, rfft2c, shift_phase_2d
from ..io import ParticleSet
from ..progress import Progress
from ..reconstruct import BackprojectionAccumulator, finalize_halves
from .generate import FlexModel
from .model import project_positions, ray_positions

__all__ = ["HighresResult", "flex_reconstruct"]


@dataclass
class HighresResult:
    flex_half1: np.ndarray
    flex_half2: np.ndarray
    noflex_half1: np.ndarray
    noflex_half2: np.ndarray
    fsc_flex: np.ndarray
    fsc_noflex: np.ndarray
    apix: float
    res_flex: float
    res_noflex: float
    objective: dict

    @property
    def flex_map(self) -> np.ndarray:
        return 0.5 * (self.flex_half1 + self.flex_half2)

    @property
    def noflex_map(self) -> np.ndarray:
        return 0.5 * (self.noflex_half1 + self.noflex_half2)


class _HalfProblem:
    """The least-squares objective of one half set, evaluated by streaming its particles."""

    def __init__(self, model: FlexModel, ps: ParticleSet, rows: np.ndarray, crop: int, batch_size: int,
                 device: torch.device):
        self.model, self.ps, self.rows, self.c, self.bs, self.dev = model, ps, rows, crop, batch_size, device
        self.apix = ps.apix
        g = freq_grid_2d(crop, device) * crop
        r = g.norm(dim=-1)
        self.shell = torch.round(r).long().clamp(max=crop // 2)
        mult = torch.full_like(r, 2.0)
        mult[:, 0] = 1.0
        mult[:, -1] = 1.0
        self.mult = mult * (r <= crop // 2)
        self.noise = torch.ones(crop // 2 + 1, device=device)
        self.z = torch.as_tensor(model.latents[self._model_rows(rows)], dtype=torch.float32, device=device)
        self.radius = None
        # poses, flows and CTFs are frozen: each batch's ray positions, filter (shift × CTF) and image
        # spectra are computed once and kept while they fit in `cache_mb`
        self.cache: dict = {}
        self.cache_bytes = 0
        self.cache_mb = 2048.0

    def _model_rows(self, rows: np.ndarray) -> np.ndarray:
        index = {int(i): r for r, i in enumerate(self.model.ids)}
        ids = self.ps.ids[rows]
        missing = [int(i) for i in ids if int(i) not in index]
        if missing:
            from ..errors import InputError
            raise InputError(f"{len(missing)} particles (e.g. id {missing[0]}) have no latent in the model; "
                             "reconstruct with the particles the model was trained on (or a subset)")
        return np.array([index[int(i)] for i in ids])

    def batches(self):
        for s in range(0, len(self.rows), self.bs):
            yield s, self.rows[s:s + self.bs]

    def _batch(self, rows: np.ndarray, zb: torch.Tensor | None) -> tuple:
        """(ray positions, filter, image spectra) of a batch, from the cache when possible."""
        key = (int(rows[0]), len(rows), zb is not None)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        with torch.no_grad():
            u = self.model.flow(zb, self.c) if zb is not None else None
            pos = ray_positions(self.c, self.ps.rotations(rows, self.dev), u, self.radius)
            filt = shift_phase_2d(self.c, -self.ps.shifts_px(rows, self.dev)) * compute_ctf(
                self.ps.ctf_params(rows, self.dev), self.c, self.apix, self.ps.phase_flipped)
            imgs = torch.from_numpy(self.ps.images(rows)).to(self.dev)
            y = rfft2c(crop_center(imgs, self.c, 2) if imgs.shape[-1] != self.c else imgs)
        item = (pos, filt, y)
        size = sum(t.numel() * t.element_size() for t in item)
        if self.cache_bytes + size <= self.cache_mb * 2 ** 20:
            self.cache[key] = item
            self.cache_bytes += size
        return item

    def model_ft(self, V: torch.Tensor, rows: np.ndarray, zb: torch.Tensor | None) -> torch.Tensor:
        pos, filt, _ = self._batch(rows, zb)
        return rfft2c(project_positions(V, pos)) * filt

    def images_ft(self, rows: np.ndarray, zb: torch.Tensor | None = None) -> torch.Tensor:
        return self._batch(rows, zb)[2]

    @torch.no_grad()
    def estimate_noise(self, V: torch.Tensor, flex: bool, max_particles: int = 1000) -> None:
        pw = torch.zeros(self.c // 2 + 1, device=self.dev)
        cnt = torch.zeros_like(pw)
        for s, rows in self.batches():
            if s >= max_particles:
                break
            zb = self.z[s:s + len(rows)] if flex else None
            r2 = (self.images_ft(rows, zb) - self.model_ft(V, rows, zb)).abs().square() * (self.mult > 0)
            pw.index_add_(0, self.shell.flatten(), r2.sum(0).flatten())
            cnt.index_add_(0, self.shell.flatten(), (self.mult > 0).flatten().float() * len(rows))
        self.noise = (pw / cnt.clamp(min=1)).clamp(min=1e-12)

    def objective(self, V: torch.Tensor, flex: bool, lam: float) -> torch.Tensor:
        """Loss with its gradient accumulated in V.grad (one streamed pass)."""
        w = self.mult / self.noise[self.shell]
        total = 0.0
        for s, rows in self.batches():
            zb = self.z[s:s + len(rows)] if flex else None
            loss = 0.5 * ((self.images_ft(rows, zb) - self.model_ft(V, rows, zb)).abs().square() * w).sum()
            loss.backward()
            total += float(loss.detach())
        reg = 0.5 * lam * V.square().sum()
        reg.backward()
        return torch.tensor(total + float(reg.detach()))


def _solve(problem: _HalfProblem, V0: torch.Tensor, flex: bool, iterations: int, lam: float,
           label: str, progress) -> tuple[torch.Tensor, list[float]]:
    V = V0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([V], lr=1.0, max_iter=iterations, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-12)
    history: list[float] = []
    prog = Progress(iterations, label, every=0, stream=progress)

    def closure():
        opt.zero_grad(set_to_none=False)
        if V.grad is None:
            V.grad = torch.zeros_like(V)
        f = problem.objective(V, flex, lam)
        history.append(float(f))
        return f
    # LBFGS counts function evaluations; report per iteration through its state
    state_iter = [0]

    def closure_with_progress():
        f = closure()
        it = opt.state[opt._params[0]].get("n_iter", 0) if opt.state else 0
        if it > state_iter[0]:
            state_iter[0] = it
            prog.step(min(it, iterations), f"objective {f:.6g}")
        return f
    opt.step(closure_with_progress)
    state = opt.state[opt._params[0]]
    done, budget = state.get("n_iter", 0), opt.defaults["max_eval"]
    # torch's L-BFGS also stops at max_eval (1.25 × max_iter) function evaluations: say so rather than claim
    # all iterations ran (seen at box 64: 18 of 20 iterations in 25 evaluations)
    stop = ""
    if done < iterations:
        why = f"evaluation budget {budget}" if state.get("func_evals", 0) >= budget else "converged"
        stop = f" (stopped at iteration {done}: {why})"
    prog.step(iterations, f"objective {history[-1]:.6g} after {len(history)} evaluations{stop}", force=True)
    return V.detach(), history


def flex_reconstruct(model: FlexModel, ps: ParticleSet, iterations: int = 20, batch_size: int = 128,
                     lam: float | None = None, do_noflex: bool = True, mask: np.ndarray | None = None,
                     seed: int = 0, device: torch.device | str = "cpu", progress=None) -> HighresResult:
    """Flex and noflex half maps at the crop box by L-BFGS, their FSCs and resolutions (see module docstring)."""
    from ..errors import InputError
    dev = torch.device(device)
    ps.require(poses=True, ctf=True)
    if ps.box != model.box or abs(ps.apix - model.apix) > 1e-3 * model.apix:
        raise InputError(f"particles ({ps.box} px, {ps.apix:.4f} Å) differ from the training input "
                         f"({model.box} px, {model.apix:.4f} Å)")
    if iterations < 1:
        raise InputError("--iterations must be >= 1")
    c = model.crop
    half = ps.half_sets(seed)
    out: dict = {}
    objectives: dict = {}
    for h in (1, 2):
        rows = np.nonzero(half == h)[0]
        prob = _HalfProblem(model, ps, rows, c, batch_size, dev)
        prob.radius = model.support_radius(c)
        # the half's own Wiener map is the starting point (and the noflex solution up to regularisation)
        acc = BackprojectionAccumulator(c, ps.apix, 2, dev)
        for s, r in prob.batches():
            imgs = torch.from_numpy(ps.images(r))
            imgs = crop_center(imgs, c, 2) if imgs.shape[-1] != c else imgs
            acc.add(imgs, ps.rotations(r), ps.shifts_px(r), ps.ctf_params(r), ps.phase_flipped)
        out[f"acc{h}"] = acc
        out[f"prob{h}"] = prob
    rec = finalize_halves(out["acc1"], out["acc2"])
    starts = {1: torch.as_tensor(rec.half1, device=dev), 2: torch.as_tensor(rec.half2, device=dev)}
    del rec, out["acc1"], out["acc2"]
    maps = {}
    for h in (1, 2):
        prob = out[f"prob{h}"]
        V0 = starts[h]
        prob.estimate_noise(V0, flex=False)
        lam_h = lam if lam is not None else 1e-3 * float((prob.mult / prob.noise[prob.shell]).mean()) * len(prob.rows)
        modes = [("flex", True)] + ([("noflex", False)] if do_noflex else [])
        for name, flex in modes:
            V, hist = _solve(prob, V0, flex, iterations, lam_h, f"flex-reconstruct {name} half {h}", progress)
            maps[(name, h)] = V.cpu().numpy()
            objectives[f"{name}_half{h}"] = hist
    m = torch.as_tensor(mask, dtype=torch.float32) if mask is not None else None
    f_flex = fsc(torch.as_tensor(maps[("flex", 1)]), torch.as_tensor(maps[("flex", 2)]), m)
    if do_noflex:
        f_nf = fsc(torch.as_tensor(maps[("noflex", 1)]), torch.as_tensor(maps[("noflex", 2)]), m)
    else:
        f_nf = np.full_like(f_flex, np.nan)
    nf1 = maps.get(("noflex", 1), np.zeros_like(maps[("flex", 1)]))
    nf2 = maps.get(("noflex", 2), np.zeros_like(maps[("flex", 2)]))
    return HighresResult(maps[("flex", 1)], maps[("flex", 2)], nf1, nf2, f_flex, f_nf, ps.apix,
                         fsc_resolution(f_flex, ps.apix), fsc_resolution(f_nf, ps.apix) if do_noflex else float("nan"),
                         objectives)
