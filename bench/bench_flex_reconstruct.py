"""3D Flex reconstruction cost against the number of particles: insertion O(N·D²) once, evaluations flat in N.

Synthetic particles, simulated cheaply: noise images (the cost does not depend on their content) with random
poses, defocus and shifts, inserted by the reconstruction's own code (BinnedHalf.insert) into the latent bins
of a 3D Flex model whose generator is random (a mesh of the built-in example's object, a K=2 latent with
N(0, 1) particles; displacements of a few Å). For each N the bench prints the time to choose the bins, to
insert the particles, and of one conjugate-gradient evaluation (one Hessian-vector product: G warps and G
FFT pairs; the fastest of --evals) — the last must not grow with N. --bins fixes G so that the evaluations compare like with like; the bin
count the flow tolerance would choose is printed too.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_flex_reconstruct.py --n 5000 20000 50000 --box 64 --bins 32

Timings on a shared machine: compare the ratios measured in one run, not the seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexplugin.engine.ctf import CTFParams
from flexplugin.engine.flex.binning import choose_bins, vertex_displacements
from flexplugin.engine.flex.generate import FlexModel
from flexplugin.engine.flex.mesh import build_mesh
from flexplugin.engine.flex.model import FlowGenerator
from flexplugin.engine.flex.reconstruct import BinnedHalf, Sphere
from flexplugin.engine.geometry import euler_to_matrix
from flexplugin.engine.simulate import SimConfig, build_object, render_volumes


def synthetic_model(box: int, apix: float, n: int, amplitude_A: float, seed: int) -> FlexModel:
    """A FlexModel over the example object's mesh with a random generator and N(0, 1) latents (K = 2)."""
    cfg = SimConfig(box=box, apix=apix)
    vol = render_volumes(build_object(cfg), np.array([0.5]), box, apix, cfg.atom_sigma_A)[0]
    mesh = build_mesh(vol, apix, cells=12)
    torch.manual_seed(seed)
    gen = FlowGenerator(2, len(mesh.points), layers=2, hidden=32)
    torch.nn.init.normal_(gen.out.weight, std=amplitude_A / 4)
    gen.eval()
    z = np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32)
    return FlexModel(gen, mesh, torch.as_tensor(vol), apix, box, box, box, apix, z, np.arange(1, n + 1), {},
                     torch.device("cpu"))


def random_batch(rng: np.random.Generator, b: int, box: int) -> tuple:
    """Noise images, RELION rotations, origins (px) and CTF parameters of b synthetic particles."""
    imgs = torch.as_tensor(rng.normal(size=(b, box, box)), dtype=torch.float32)
    ang = torch.as_tensor(rng.uniform([0, 0, 0], [360, 180, 360], size=(b, 3)), dtype=torch.float64)
    rots = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]).to(torch.float32)
    shifts = torch.as_tensor(rng.uniform(-2, 2, size=(b, 2)), dtype=torch.float32)
    dfu = torch.as_tensor(rng.uniform(10000, 25000, size=b), dtype=torch.float32)

    def full(v: float) -> torch.Tensor:
        return torch.full((b,), v)
    ctf = CTFParams(dfu, dfu - 200, full(30.0), full(300.0), full(2.7), full(0.1), full(0.0), full(0.0))
    return imgs, rots, shifts, ctf


def run(n: int, box: int, apix: float, bins: int | None, flow_tol: float, max_bins: int, batch: int,
        evals: int, seed: int) -> dict:
    model = synthetic_model(box, apix, n, 3.0, seed)
    t0 = time.perf_counter()
    d = vertex_displacements(model.gen, model.latents)
    auto = choose_bins(model.latents, d, apix, flow_tol, max_bins, seed=seed)
    lb = choose_bins(model.latents, d, apix, 0.0, bins, seed=seed) if bins else auto
    t_bins = time.perf_counter() - t0
    half = BinnedHalf(Sphere.make(box, "cpu"), lb.count, torch.device("cpu"))
    rng = np.random.default_rng(seed)
    order = np.argsort(lb.labels, kind="stable")
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        rows = order[s:s + batch]
        imgs, rots, shifts, ctf = random_batch(rng, len(rows), box)
        half.insert(imgs, rots, shifts, ctf, False, apix, lb.labels[rows])
    t_insert = time.perf_counter() - t0
    half.set_flows(model, lb.displacements)
    half.reg = torch.ones_like(half.reg)
    V = half.wiener(half.reg)
    half.hess(V)  # warm-up
    times = []
    for _ in range(evals):  # the fastest of `evals`: the least disturbed by other jobs on a shared machine
        t0 = time.perf_counter()
        half.hess(V)
        times.append(time.perf_counter() - t0)
    t_eval = min(times)
    return {"n": n, "bins": lb.count, "auto_bins": auto.count, "auto_spread": auto.spread_at(),
            "t_bins": t_bins, "t_insert": t_insert, "t_eval": t_eval}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[5000, 20000, 50000])
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--apix", type=float, default=2.0)
    ap.add_argument("--bins", type=int, default=32, help="fixed G for the timed evaluations (0: as chosen)")
    ap.add_argument("--flow-tol", type=float, default=0.25)
    ap.add_argument("--max-bins", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--evals", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(f"box {a.box}, one half set of N synthetic particles, G fixed at {a.bins or 'the chosen count'}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'N':>7} {'G':>4} {'G(tol)':>6} {'spread':>7} {'bins s':>7} {'insert s':>9} {'insert ms/ptcl':>14} "
          f"{'eval s':>7}")
    rows = []
    for n in a.n:
        r = run(n, a.box, a.apix, a.bins or None, a.flow_tol, a.max_bins, a.batch, a.evals, a.seed)
        rows.append(r)
        print(f"{r['n']:>7} {r['bins']:>4} {r['auto_bins']:>6} {r['auto_spread']:>7.3f} {r['t_bins']:>7.2f} "
              f"{r['t_insert']:>9.2f} {1e3 * r['t_insert'] / n:>14.3f} {r['t_eval']:>7.3f}", flush=True)
    e = [r["t_eval"] for r in rows]
    print(f"evaluation time, largest N / smallest N: {e[-1] / e[0]:.2f} (flat in N: ~1); "
          f"insertion per particle, largest / smallest: "
          f"{(rows[-1]['t_insert'] / rows[-1]['n']) / (rows[0]['t_insert'] / rows[0]['n']):.2f}")


if __name__ == "__main__":
    main()
