"""reconstruct, 3dva and 3dva-display under torchrun (torch.distributed, gloo on the CPU): two processes give
one process's results to float tolerance, rank 0 alone writes and prints, the summaries record the world; a
killed rank ends a 3dva job with no final outputs and its checkpoint continues in one process; a checkpoint
written by one process continues under two.

Data: 240 particles, box 32, 4 Å/px, SNR 0.5 (every run a few seconds). Each multi-process run is
`python -m torch.distributed.run --standalone --nproc-per-node 2 -m flexplugin -- <job> ...`, the one-process
reference the same job through flexplugin's CLI in the test's own process (no process start-up to pay).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ..helpers.files import read_map
from .torchrun_kill import kill_a_rank_after_checkpoint

N_PARTICLES = 240
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# "--" ends torchrun's options: without it torchrun's parser takes 3dva-display's --run for its --run-path
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "flexplugin",
            "--"]
ONE = [sys.executable, "-m", "flexplugin"]


def _one(*args: str) -> None:
    """The job in one process: flexplugin's CLI in this process."""
    from flexplugin.cli import main
    assert main([*args, "--device", "cpu"]) == 0


def _run(launch: list[str], *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([*launch, *args, "--device", "cpu", "--threads", "1"], check=False, capture_output=True,
                       text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return r


def _assert_maps_close(a: Path, b: Path, rtol: float = 1e-4) -> None:
    va, vb = read_map(a), read_map(b)
    scale = np.abs(va).max()
    assert scale > 0, a
    assert np.abs(va - vb).max() <= rtol * scale, (a, np.abs(va - vb).max() / scale)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from flexplugin.engine.simulate import SimConfig, simulate_dataset
    out = tmp_path_factory.mktemp("dist_jobs_data")
    simulate_dataset(SimConfig(n=N_PARTICLES, box=32, apix=4.0, snr=0.5, seed=4, stack_size=100), out,
                     progress=lambda s: None)
    return out


def test_collectives():
    """engine/distributed.py's sums in two processes against hand-computed values: a complex all-reduce, rows merged
    from the rank that owns them, several tensors in one collective, and the bytes counted (tests/engine/dist_collectives.py;
    the env:// rendezvous set by hand, as torchrun would)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("dist_collectives.py")
    procs = [subprocess.Popen([sys.executable, str(worker)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs


def _va3d_args(data: Path, out: Path, iterations: int, *extra: str) -> list[str]:
    return ["3dva", "--particles", str(data / "particles.star"), "--mask", str(data / "mask.mrc"), "--volume",
            str(data / "consensus.mrc"), "--out", str(out), "--k", "2", "--filter-res", "12", "--iterations",
            str(iterations), "--batch-size", "64", *extra]


@pytest.fixture(scope="module")
def va3d_one(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist_va3d_one") / "run"
    _one(*_va3d_args(data, out, 4))
    return out


def _assert_va3d_same(a: Path, b: Path) -> None:
    ra, rb = (json.loads((p / "run.json").read_text()) for p in (a, b))
    assert [h["objective"] for h in ra["history"]] == pytest.approx([h["objective"] for h in rb["history"]],
                                                                    rel=1e-5)
    assert ra["objective_final"] == pytest.approx(rb["objective_final"], rel=1e-5)
    for name in ra["files"]["components"]:
        _assert_maps_close(a / name, b / name, rtol=1e-3)
    za, zb = np.load(a / "latents.npy"), np.load(b / "latents.npy")
    assert np.abs(za - zb).max() <= 1e-3 * np.abs(za).max()
    ea = json.loads((a / "explained_variance.json").read_text())["components"]
    eb = json.loads((b / "explained_variance.json").read_text())["components"]
    assert [c["eigenvalue"] for c in ea] == pytest.approx([c["eigenvalue"] for c in eb], rel=1e-3)


def test_reconstruct_two_processes_equal_one(data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["reconstruct", "--particles", str(data / "particles.star"), "--batch-size", "64"]
    _one(*args, "--out", str(one))
    r = _run(TORCHRUN, *args, "--out", str(two))
    for name in ("map.mrc", "half1.mrc", "half2.mrc"):
        _assert_maps_close(one / name, two / name)
    f1, f2 = np.loadtxt(one / "fsc.txt"), np.loadtxt(two / "fsc.txt")
    assert np.abs(f1 - f2).max() < 1e-4
    # a real reconstruction: the map matches the simulator's consensus (independent of both runs)
    assert _corr(read_map(two / "map.mrc"), read_map(data / "consensus.mrc")) > 0.8
    s1, s2 = (json.loads((p / "reconstruct.json").read_text()) for p in (one, two))
    assert (s1["world_size"], s1["particles_per_rank"]) == (1, N_PARTICLES)
    assert (s2["world_size"], s2["particles_per_rank"]) == (2, N_PARTICLES // 2)
    assert s1["half_counts"] == s2["half_counts"] and sum(s2["half_counts"]) == N_PARTICLES
    assert r.stdout.count("reconstruct: resolution") == 1  # rank 0 alone prints
    assert "2 processes (about 120 particles each)" in r.stdout


def test_3dva_two_processes_equal_one(data, va3d_one, tmp_path):
    two = tmp_path / "two"
    r = _run(TORCHRUN, *_va3d_args(data, two, 4))
    _assert_va3d_same(va3d_one, two)
    # the components are real: component 0 follows the simulated motion (ground truth, not our output)
    gt = __import__("pandas").read_csv(data / "ground_truth.csv")
    col = next(c for c in gt.columns if c not in ("rlnImageId", "particle", "id"))
    z0 = np.load(two / "latents.npy")[:, 0]
    assert abs(_corr(z0, gt[col].to_numpy())) > 0.5
    info = json.loads((two / "run.json").read_text())
    assert (info["world_size"], info["particles_per_rank"]) == (2, N_PARTICLES // 2)
    assert json.loads((va3d_one / "run.json").read_text())["world_size"] == 1
    assert r.stdout.count("3dva: iteration 4/4") == 1 and r.stdout.count("3dva: done in") == 1


def test_3dva_checkpoint_of_one_process_continues_under_two(data, va3d_one, tmp_path):
    out = tmp_path / "run"
    _one(*_va3d_args(data, out, 2))
    r = _run(TORCHRUN, *_va3d_args(data, out, 4, "--continue"))
    assert "continuing from iteration 2" in r.stdout
    _assert_va3d_same(va3d_one, out)
    assert json.loads((out / "run.json").read_text())["world_size"] == 2


def test_3dva_killed_rank_ends_the_job_and_the_checkpoint_continues_in_one(data, va3d_one, tmp_path):
    """SIGKILL one of two ranks once the first checkpoint exists: the job fails naming the killed rank's
    signal (torchrun's report), writes no final outputs, and its checkpoint continues in one process to the
    one-process result."""
    out = tmp_path / "run"
    _, _, stderr = kill_a_rank_after_checkpoint([*TORCHRUN, *_va3d_args(data, out, 200), "--device", "cpu", "--threads",
                                                 "1"], out / "checkpoint.pt", ENV, timeout=300)
    # the surviving rank's own error line: its collective failed, or torchrun stopped it (engine/distributed.py)
    assert "error: rank 0 of 2" in stderr, stderr[-3000:]
    assert not (out / "run.json").exists() and not (out / "latents.npy").exists()
    r = _run(ONE, *_va3d_args(data, out, 4, "--continue"))
    done = int(r.stdout.split("continuing from iteration ")[1].split()[0])
    assert 1 <= done < 4, "the kill came after the reference's iterations; nothing left to compare"
    _assert_va3d_same(va3d_one, out)


def test_3dva_display_reconstructions_two_processes_equal_one(va3d_one, tmp_path):
    # intermediates: weighted maps (cluster mode's 0/1 weights go through the same _reconstruct_weighted)
    for mode, extra in (("intermediates", ["--frames", "3", "--width", "1"]),):
        one, two = tmp_path / f"{mode}1", tmp_path / f"{mode}2"
        args = ["3dva-display", "--run", str(va3d_one), "--mode", mode, *extra, "--batch-size", "64"]
        _one(*args, "--out", str(one))
        r = _run(TORCHRUN, *args, "--out", str(two))
        s1, s2 = (json.loads((p / "summary.json").read_text()) for p in (one, two))
        maps = [f for f in s1["files"] if f.endswith(".mrc")]
        assert maps and maps == [f for f in s2["files"] if f.endswith(".mrc")]
        for name in maps:
            _assert_maps_close(one / name, two / name)
        assert sorted(p.name for p in one.rglob("*") if not p.name.startswith(".")) == \
            sorted(p.name for p in two.rglob("*") if not p.name.startswith("."))
        assert (s1["world_size"], s2["world_size"], s2["particles_per_rank"]) == (1, 2, N_PARTICLES // 2)
        assert r.stdout.count("written to") == 1  # rank 0 alone logs
