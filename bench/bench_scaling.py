"""Data-parallel scaling on the CPU: throughput of `reconstruct` and of flex-train epochs with 1 and 2 processes
(torchrun, gloo, one thread per process), and the bytes each process sums over the ranks.

Usage: python bench/bench_scaling.py [--n 2000] [--box 64] [--train-box 32] [--epochs 2] [--procs 1,2]

The data set is the built-in simulated example (`flexplugin simulate`, made once in a temporary folder or given
with --data). Each measurement runs this file as a worker under `python -m torch.distributed.run --standalone
--nproc-per-node P`: the worker reads the data, waits for every rank (barrier), then times the job's own loop
(`reconstruct_particles`; flex-train's noise estimate once, then `run_epoch` without latent searches), so
process start-up, imports and reading the STAR file are left out. Bytes are what `engine/distributed.py`'s
all_reduce_ counted on rank 0 (each process sends and receives about that much with gloo's ring all-reduce).
For flex-train the gradient bytes per step are also computed from the parameter sizes, and the difference to the
measured total is the end-of-epoch latent exchange. With --flat-gradients flex-train's gradients are summed in
one collective per step (an experiment: the bench replaces the trainer's `_sum_gradients`). The share of rank 0's
time spent in all-reduces includes waiting for the slower rank. The CPU time of each rank's loop is printed too:
on a machine shared with other work a process may get less than a core, which the wall-clock throughput then
shows but the CPU time does not. Timings on a shared machine: compare the ratios of one run, not absolute seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(a: argparse.Namespace) -> None:
    """One process of a measurement (under torchrun): time the job's loop, rank 0 writes the JSON."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from flexplugin.engine import distributed
    from flexplugin.engine.io import read_particles
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    ps = read_particles(Path(a.data) / "particles.star")
    result = {"job": a.worker, "world_size": distributed.world(), "particles": len(ps)}

    def barrier() -> None:
        if distributed.world() > 1:
            dist.barrier()

    if a.worker == "reconstruct":
        import io

        from flexplugin.engine.reconstruct import reconstruct_particles
        reconstruct_particles(ps.subset(np.arange(min(64, len(ps)))), progress=io.StringIO())  # warm-up
        barrier()
        distributed.bytes_reduced(reset=True)
        distributed.reduce_seconds(reset=True)
        t0, c0 = time.perf_counter(), time.process_time()
        reconstruct_particles(ps, batch_size=256, progress=io.StringIO())
        cpu = time.process_time() - c0
        barrier()
        sec = time.perf_counter() - t0
        result |= {"seconds": sec, "particles_per_s": len(ps) / sec, "bytes": distributed.bytes_reduced(),
                   "reduce_seconds": distributed.reduce_seconds(),
                   "steps": 1, "note": "one all-reduce of the two half sets' accumulators per job"}
    else:
        from flexplugin.engine.flex.config import TrainConfig
        from flexplugin.engine.flex.mesh import build_mesh
        from flexplugin.engine.flex.prep import PreparedParticles, prep_spec, prep_volume
        from flexplugin.engine.flex.train import FlexTrainer
        from flexplugin.engine.io import read_volume
        vol, apix = read_volume(Path(a.data) / "consensus.mrc")
        spec = prep_spec(ps.box, ps.apix, None, a.train_box)
        cfg = TrainConfig(epochs=a.epochs, batch_size=64, search_every=0, final_search=False, noise_particles=500)
        tr = FlexTrainer(PreparedParticles(ps, spec), prep_volume(vol, spec), build_mesh(vol, apix, cells=12), cfg,
                         "cpu")
        if a.flat_gradients:  # experiment: the step's gradients summed in one collective instead of one per tensor
            def summed_flat() -> None:
                prms = [*tr.gen.parameters(), tr.density]
                for prm in prms:
                    if prm.grad is None:
                        prm.grad = torch.zeros_like(prm)
                distributed.all_reduce_flat_([prm.grad for prm in prms])
            tr._sum_gradients = summed_flat
        tr.estimate_noise(progress=lambda s: None)
        barrier()
        distributed.bytes_reduced(reset=True)
        distributed.reduce_seconds(reset=True)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(a.epochs):
            tr.run_epoch(progress=lambda s: None)
        cpu = time.process_time() - c0
        barrier()
        sec = time.perf_counter() - t0
        steps = a.epochs * math.ceil(len(ps) / cfg.batch_size)
        grad = sum(p.numel() * p.element_size() for p in [*tr.gen.parameters(), tr.density])
        total = distributed.bytes_reduced()
        result |= {"seconds": sec, "particles_per_s": a.epochs * len(ps) / sec, "bytes": total, "steps": steps,
                   "reduce_seconds": distributed.reduce_seconds(),
                   "gradient_bytes_per_step": grad if distributed.world() > 1 else 0,
                   "latent_exchange_bytes_per_epoch": (total - grad * steps) / a.epochs if total else 0,
                   "note": f"{a.epochs} epochs of batch 64 at training box {a.train_box}, no latent search"
                           + (", gradients summed in one flat all-reduce per step" if a.flat_gradients else "")}
    # CPU seconds of each rank's loop (the machine may give a process less than a core when it is shared)
    cpus = torch.zeros(distributed.world(), dtype=torch.float64)
    cpus[distributed.rank()] = cpu
    distributed.all_reduce_(cpus)
    result |= {"cpu_seconds_total": float(cpus.sum()), "cpu_seconds_max_rank": float(cpus.max())}
    if distributed.is_main():
        Path(a.result).write_text(json.dumps(result))


def _measure(job: str, procs: int, data: Path, a: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{job}_{procs}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           str(Path(__file__).resolve()), "--worker", job, "--data", str(data), "--result", str(out),
           "--epochs", str(a.epochs), "--train-box", str(a.train_box)] + (["--flat-gradients"] if a.flat_gradients
                                                                           else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{job} with {procs} processes failed:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="particles of the simulated set (default 2000)")
    p.add_argument("--box", type=int, default=64, help="box of the simulated set (default 64)")
    p.add_argument("--train-box", type=int, default=32, help="flex-train's training box (default 32)")
    p.add_argument("--epochs", type=int, default=2, help="flex-train epochs timed (default 2)")
    p.add_argument("--procs", default="1,2", help="numbers of processes (default 1,2)")
    p.add_argument("--jobs", default="reconstruct,flex-train", help="jobs to measure")
    p.add_argument("--data", help="a data folder of `flexplugin simulate` (default: simulate one)")
    p.add_argument("--flat-gradients", action="store_true",
                   help="experiment: flex-train sums each step's gradients in one all-reduce (distributed."
                        "all_reduce_flat_) instead of engine/flex/train.py's one per tensor")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        _worker(a)
        return
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp_s:
        tmp = Path(tmp_s)
        data = Path(a.data) if a.data else tmp / "data"
        if not a.data:
            from flexplugin.engine.simulate import SimConfig, simulate_dataset
            simulate_dataset(SimConfig(n=a.n, box=a.box), data, progress=lambda s: None)
        print(f"data: {a.n} particles, box {a.box}; one thread per process; {os.cpu_count()} CPUs", flush=True)
        procs = [int(x) for x in a.procs.split(",")]
        for job in a.jobs.split(","):
            base = None
            for n in procs:
                r = _measure(job, n, data, a, tmp)
                base = base or r["particles_per_s"]
                line = (f"{job:12s} {n} process{'es' if n > 1 else '  '}: {r['particles_per_s']:8.1f} particles/s "
                        f"({r['seconds']:.2f} s, x{r['particles_per_s'] / base:.2f}); summed over ranks "
                        f"{r['bytes'] / 1e6:.2f} MB, {r['bytes'] / r['steps'] / 1e6:.3f} MB per step, rank 0 "
                        f"{100 * r['reduce_seconds'] / r['seconds']:.0f}% of the time in all-reduces; CPU time "
                        f"{r['cpu_seconds_total']:.2f} s in all, {r['cpu_seconds_max_rank']:.2f} s on the busiest rank")
                if job == "flex-train" and n > 1:
                    line += (f" (gradients {r['gradient_bytes_per_step'] / 1e6:.3f} MB per step, latent exchange "
                             f"{r['latent_exchange_bytes_per_epoch'] / 1e6:.3f} MB per epoch)")
                print(line, flush=True)


if __name__ == "__main__":
    main()
