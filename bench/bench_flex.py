"""3D Flex training epoch time side by side with cryoDRGN's train_vae on the same particles, and peak memory.

Run: .venv/bin/python bench/bench_flex.py [--n 1000] [--boxes 64] [--device cpu|cuda] [--mem-n 512,2048]
                                           [--epoch 1] [--no-install]

Project issue: one epoch at box 64 should be at least 3x faster than one cryoDRGN train_vae epoch (3x256 encoder
and decoder, zdim 1) on the same particles, and memory should stay flat in the number of particles. This prints
the numbers, never a pass/fail: per box, "cryoDRGN epoch seconds / flexplugin epoch seconds" (above 1: ours is
faster) and our peak memory at two particle counts.

Ours: one `FlexTrainer.run_epoch` with flex-train's defaults (TrainConfig(), mesh `build_mesh(vol, apix)`),
timed at epoch `--epoch` (default 1, the first one that starts with a latent search, so the search is inside the
time and its share is printed). The noise estimate is set-up, done once per run, and not timed. Each of our runs
is a fresh child process, so its peak RSS (VmHWM) is its own (GPU: peak allocated memory). On CPU the peak is
also split: RSS after set-up (the noise estimate keeps the spectra of up to TrainConfig.noise_particles = 1000
particles), the epoch's own peak above that (VmHWM restarted through /proc/self/clear_refs), and mapped files
(the particle stacks are memory-mapped, so every page read counts in RSS though the kernel may drop it).
cryoDRGN: `train_vae --zdim 1 --enc-layers 3 --enc-dim 256 --dec-layers 3 --dec-dim 256 -n 1` with its other
defaults (batch 16, AMP on a GPU), on the same device (CUDA_VISIBLE_DEVICES hides or picks the GPU, since
cryoDRGN itself takes the first GPU whenever there is one). Its epoch time is the one it logs itself
("Epoch: 1 ... Finished in h:mm:ss"): the training loop only, without start-up, data loading, checkpoint
evaluation or the final z pass, so the ratio compares epochs and not process start-up; the whole run's wall time
is printed beside it.

cryoDRGN install (first use, skipped with --no-install): cryodrgn==4.3.1 goes into its own venv under
.cache/cryodrgn-venv (git-ignored), made idempotent by a stamp file that records what was installed. Why this
route: cryodrgn's own requirements pull in jupyterlab, umap-learn (numba, llvmlite), flask, plotly and, through
torch>=2, possibly a second multi-GB torch; and installing it into the project venv would move our pins (pandas,
scipy, ...). So the venv is made from the same base interpreter as the project venv, a `.pth` file puts the
project venv's site-packages on sys.path *after* the venv's own (torch, numpy, scipy, pandas, matplotlib,
starfile are shared, never duplicated), and cryodrgn is installed with --no-deps together with, pinned and also
--no-deps, only what `cryodrgn.commands.{parse_pose_star,parse_ctf_star,train_vae}` import (found by importing
them until nothing was missing): pyyaml and igraph (+texttable) from cryodrgn.utils, seaborn and scikit-learn
(+joblib, threadpoolctl, narwhals, cloudpickle) from cryodrgn.analysis, nbformat (+traitlets, fastjsonschema,
jsonschema, attrs, referencing, rpds-py, jsonschema-specifications) from cryodrgn.commands.analyze, which
train_vae imports. The `cryodrgn` console script imports all of its 23 commands (umap, ...) before it parses
anything, so the commands run through a three-line runner that imports only the one command module (the same
`add_args`/`main` the console script calls). An install that fails prints one line with the reason and the
ratio is reported as "cryoDRGN not available: <reason>".
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexplugin.engine.flex.mesh import build_mesh
from flexplugin.engine.flex.prep import PreparedParticles, prep_spec, prep_volume
from flexplugin.engine.flex.train import FlexTrainer, TrainConfig
from flexplugin.engine.io import read_particles, read_volume
from flexplugin.engine.simulate import SimConfig, simulate_dataset

DRGN_VENV = ROOT / ".cache" / "cryodrgn-venv"
# cryodrgn without its dependencies, plus what its parse_pose_star/parse_ctf_star/train_vae modules import and the
# project venv does not hold (see the module docstring); pinned so that the venv is the same on every machine.
DRGN_PACKAGES = [
    "cryodrgn==4.3.1",
    "pyyaml==6.0.4", "igraph==1.0.0", "texttable==1.7.2",
    "seaborn==0.13.2", "scikit-learn==1.9.1", "joblib==1.6.0", "threadpoolctl==3.8.0", "narwhals==2.29.0",
    "cloudpickle==3.1.3",
    "nbformat==5.11.1", "traitlets==5.16.1", "fastjsonschema==2.22.3", "jsonschema==4.26.0", "attrs==26.1.0",
    "referencing==0.37.0", "rpds-py==2026.9.1", "jsonschema-specifications==2025.9.1",
]
DRGN_COMMANDS = ("parse_pose_star", "parse_ctf_star", "train_vae")
# Runs one cryoDRGN command as its console script would, without importing the other commands.
DRGN_RUNNER = ("import argparse, importlib, sys\n"
               "mod = importlib.import_module('cryodrgn.commands.' + sys.argv[1])\n"
               "p = argparse.ArgumentParser(prog='cryodrgn ' + sys.argv[1]); mod.add_args(p)\n"
               "mod.main(p.parse_args(sys.argv[2:]))\n")
CHILD_TAG = "BENCH_FLEX_CHILD "


def proc_mem() -> dict[str, float]:
    """This process's memory (MB) from /proc/self/status: VmHWM (peak RSS of its own address space; not
    ru_maxrss, which on Linux carries over fork/exec, so a child would report at least the parent's peak),
    VmRSS, RssAnon (heap) and RssFile (mapped files: libraries and the memory-mapped particle stacks)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    if "VmHWM" not in out:
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][-300:] if lines else "(no output)"


# ------------------------------------------------------------------------------------------------- cryoDRGN venv
def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_cryodrgn(install: bool) -> tuple[Path | None, str]:
    """Python of the cryoDRGN venv (installing it on first use), or None and the reason it is not available."""
    py = _venv_python(DRGN_VENV)
    stamp = DRGN_VENV / "bench-installed.json"
    project_site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    want = {"packages": DRGN_PACKAGES, "project_site": project_site, "python": sys.version.split()[0]}
    try:
        if json.loads(stamp.read_text()) == want and py.exists():
            return py, "already installed"
    except (OSError, ValueError):
        pass
    if not install:
        return None, f"not installed in {DRGN_VENV} and --no-install given"
    base = Path(getattr(sys, "_base_executable", "") or
                Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")
    t0 = time.perf_counter()
    print(f"bench_flex: installing {DRGN_PACKAGES[0]} into {DRGN_VENV} (sharing torch/numpy of this venv)...",
          flush=True)
    steps = [
        [str(base), "-m", "venv", "--clear", str(DRGN_VENV)],
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", *DRGN_PACKAGES],
        [str(py), "-c", "import torch, numpy, cryodrgn; "
         + "; ".join(f"import cryodrgn.commands.{c}" for c in DRGN_COMMANDS)
         + "; print(cryodrgn.__version__, torch.__version__, torch.__file__)"],
    ]
    for i, cmd in enumerate(steps):
        if i == 1:  # after the venv exists: the project's site-packages go after the venv's own
            site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       check=False, capture_output=True, text=True).stdout.strip())
            try:
                (site / "zz_flexplugin_project_venv.pth").write_text("\n".join(project_site) + "\n")
            except OSError as e:
                return None, f"cannot write the .pth file into {site}: {e}"
        try:
            r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"install step {' '.join(cmd[:4])} failed: {e}"
        if r.returncode != 0:
            why = _last_line("\n".join(ln for ln in (r.stderr + "\n" + r.stdout).splitlines()
                                       if "is ignored" not in ln))
            return None, f"install step {' '.join(cmd[:4])} failed: {why}"
    version_line = _last_line(r.stdout)
    stamp.write_text(json.dumps(want, indent=1))
    return py, f"installed in {time.perf_counter() - t0:.0f} s ({version_line})"


def _drgn_env(device: str) -> dict:
    env = dict(os.environ)
    dev = torch.device(device)
    if dev.type != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif dev.index is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(dev.index)
    return env


def bench_cryodrgn(py: Path, data: Path, workdir: Path, device: str) -> dict:
    """cryoDRGN train_vae (zdim 1, 3x256) for one epoch on data/particles.star: its logged epoch seconds."""
    star = data / "particles.star"
    poses, ctf = workdir / "poses.pkl", workdir / "ctf.pkl"
    ps = read_particles(star)
    env = _drgn_env(device)

    def run(*args: str) -> str:
        r = subprocess.run([str(py), "-c", DRGN_RUNNER, *args], check=False, capture_output=True, text=True,
                           env=env)
        (workdir / f"{args[0]}.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            raise RuntimeError(f"cryoDRGN {args[0]} failed: {_last_line(r.stderr + r.stdout)}")
        return r.stdout + r.stderr

    geom = ["-D", str(ps.box), "--Apix", str(ps.apix)]
    run("parse_pose_star", str(star), "-o", str(poses), *geom)
    run("parse_ctf_star", str(star), "-o", str(ctf), *geom)
    t0 = time.perf_counter()
    log = run("train_vae", str(star), "--datadir", str(data), "--poses", str(poses), "--ctf", str(ctf),
              "--zdim", "1", "--enc-layers", "3", "--enc-dim", "256", "--dec-layers", "3", "--dec-dim", "256",
              "-n", "1", "--checkpoint", "0", "--no-analysis", "-o", str(workdir / "vae"))
    wall = time.perf_counter() - t0
    m = re.search(r"Epoch: 1 .*Finished in (\d+):(\d+):(\d+(?:\.\d*)?)", log)
    if m is None:
        raise RuntimeError(f"no epoch time in cryoDRGN's log ({workdir / 'train_vae.log'})")
    h, mi, s = m.groups()
    return {"seconds": int(h) * 3600 + int(mi) * 60 + float(s), "wall": wall, "n": len(ps)}


# ------------------------------------------------------------------------------------------------- ours
def child_epoch(data: Path, device: str, epoch: int) -> dict:
    """One default flex-train epoch at `epoch` on data/ (run in a fresh process: its peak memory is its own)."""
    mem0 = proc_mem()
    ps = read_particles(data / "particles.star")
    vol, apix = read_volume(data / "consensus.mrc")
    mesh = build_mesh(vol, apix)
    spec = prep_spec(ps.box, ps.apix, None, ps.box)
    cfg = TrainConfig()
    tr = FlexTrainer(PreparedParticles(ps, spec), prep_volume(vol, spec), mesh, cfg, device)
    tr.estimate_noise(progress=lambda s: None)
    cuda = tr.dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    mem1 = proc_mem()  # after set-up (reading, mesh, trainer, noise estimate)
    reset = reset_peak_rss()
    tr.epoch = epoch
    n_search = len(tr.searches)
    t0 = time.perf_counter()
    st = tr.run_epoch(progress=lambda s: None)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    searches = tr.searches[n_search:]
    mem2 = proc_mem()  # VmHWM: the epoch's peak when the reset worked
    return {"n": len(ps), "epoch": st.epoch, "seconds": dt, "search_seconds": sum(s["seconds"] for s in searches),
            "search_points": sum(int(s.get("points", 0)) for s in searches), "searches": len(searches),
            "box": spec.train, "work_box": st.box, "kmax_frac": st.kmax_frac, "cells": len(mesh.cells),
            "batch_size": cfg.batch_size, "k": cfg.k, "mem_start": mem0, "mem_setup": mem1, "mem_end": mem2,
            "peak_rss_mb": max(mem1["VmHWM"], mem2["VmHWM"]), "epoch_peak_rss_mb": mem2["VmHWM"] if reset else None,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None}


def bench_ours(data: Path, device: str, epoch: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(data), "--device", device,
           "--epoch", str(epoch)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(CHILD_TAG)]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"flexplugin epoch failed: {_last_line(r.stderr + r.stdout)}")
    return json.loads(lines[-1][len(CHILD_TAG):])


def mem_of(d: dict) -> float:
    return d["peak_gpu_mb"] if d["peak_gpu_mb"] is not None else d["peak_rss_mb"]


def per_particle(mems: list[tuple[int, dict]], value, what: str) -> str:
    """'what: 512 particles a MB, 2048 particles b MB (+c MB for +1536 particles, d kB per particle)'."""
    text = f"{what}: " + ", ".join(f"{n} particles {value(d):.0f} MB" for n, d in mems)
    if len(mems) >= 2:
        (n1, d1), (n2, d2) = mems[0], mems[-1]
        dv = value(d2) - value(d1)
        text += f" ({dv:+.0f} MB for {n2 - n1:+d} particles, {1024 * dv / (n2 - n1):.1f} kB per particle)"
    return text


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="particles of the timed epoch (both programs)")
    ap.add_argument("--boxes", default="64", help="particle (= training) boxes, comma-separated, e.g. 64,128")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mem-n", default="512,2048", help="particle counts of the peak-memory runs (ours)")
    ap.add_argument("--epoch", type=int, default=1, help="0-based epoch of the default schedule to time (ours)")
    ap.add_argument("--no-install", action="store_true", help="do not install cryoDRGN; use it only if present")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(CHILD_TAG + json.dumps(child_epoch(a.child, a.device, a.epoch)), flush=True)
        return
    boxes = [int(b) for b in a.boxes.split(",") if b.strip()]
    mem_n = [int(x) for x in a.mem_n.split(",") if x.strip()]
    print(f"bench_flex: {a.n} particles, boxes {boxes}, device {a.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    py, why = ensure_cryodrgn(install=not a.no_install)
    print(f"bench_flex: cryoDRGN {why if py is not None else 'not available: ' + why}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for box in boxes:
            def dataset(n: int, box: int = box) -> Path:
                path = tmp / f"box{box}_n{n}"
                if not path.exists():
                    simulate_dataset(SimConfig(n=n, box=box, apix=128.0 / box), path, progress=lambda s: None)
                return path

            data = dataset(a.n)
            ours = bench_ours(data, a.device, a.epoch)
            share = ours["search_seconds"] / ours["seconds"]
            print(f"box {box:4d}: flexplugin epoch {ours['epoch']} "
                  f"(working box {ours['work_box']}, k_max {ours['kmax_frac']:.3f} Nyq, K {ours['k']}, "
                  f"{ours['cells']} cells, batch {ours['batch_size']}): {ours['seconds']:.2f} s for {ours['n']} "
                  f"particles ({ours['n'] / ours['seconds']:.1f}/s), latent search {ours['search_seconds']:.2f} s "
                  f"= {100 * share:.0f} % of the epoch ({ours['searches']} search, {ours['search_points']} points)",
                  flush=True)
            if py is None:
                print(f"box {box:4d}: cryoDRGN not available: {why}", flush=True)
            else:
                wd = tmp / f"drgn{box}"
                wd.mkdir()
                try:
                    other = bench_cryodrgn(py, data, wd, a.device)
                except (RuntimeError, OSError) as e:
                    print(f"box {box:4d}: cryoDRGN not available: {e}", flush=True)
                else:
                    print(f"box {box:4d}: cryoDRGN train_vae (zdim 1, 3x256, batch 16) epoch {other['seconds']:.2f} s "
                          f"for {other['n']} particles ({other['n'] / other['seconds']:.1f}/s; whole run "
                          f"{other['wall']:.1f} s with start-up)", flush=True)
                    print(f"box {box:4d}: ratio cryoDRGN epoch s / flexplugin epoch s = "
                          f"{other['seconds'] / ours['seconds']:.2f}", flush=True)
            mems = [(n, ours if n == a.n else bench_ours(dataset(n), a.device, a.epoch)) for n in mem_n]
            print(f"box {box:4d}: flexplugin peak memory, one epoch in a fresh process: "
                  + per_particle(mems, mem_of, "GPU allocated" if ours["peak_gpu_mb"] is not None else "peak RSS")
                  + f"; RSS after imports {mems[0][1]['mem_start'].get('VmRSS', float('nan')):.0f} MB", flush=True)
            if ours["peak_gpu_mb"] is None and all(d["epoch_peak_rss_mb"] is not None for _, d in mems):
                print(f"box {box:4d}:   of which: "
                      + per_particle(mems, lambda d: d["mem_setup"].get("VmRSS", float("nan")),
                                     "RSS after set-up (read, mesh, trainer, noise estimate)") + "; "
                      + per_particle(mems, lambda d: d["epoch_peak_rss_mb"] - d["mem_setup"].get("VmRSS", float("nan")),
                                     "epoch peak above it") + "; "
                      + per_particle(mems, lambda d: d["mem_end"].get("RssFile", float("nan")),
                                     "mapped files (libraries, particle stacks) at the end"), flush=True)

if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
