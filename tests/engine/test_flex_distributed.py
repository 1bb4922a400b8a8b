"""flex-train under torch.distributed (torchrun, gloo on the CPU): two processes take the steps one process
takes, to float tolerance, and a checkpoint written by N processes continues under M.

Each run is tests/engine/dist_flex_train.py in its own process (torchrun --standalone for two ranks): 2 epochs on the
120-particle set at training box 16, so the second epoch starts with a latent search and a final search follows.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .torchrun_kill import kill_a_rank_after_checkpoint

WORKER = Path(__file__).with_name("dist_flex_train.py")
EPOCHS = "2"


def _run(data: Path, out: Path, nproc: int, *extra: str) -> dict:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
              if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*launch, str(WORKER), str(data), str(out), EPOCHS, *extra], check=False,
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _assert_same(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    assert torch.allclose(a["latents"], b["latents"], atol=1e-2)  # after two posterior-mean searches
    assert float((a["latents"] - b["latents"]).abs().mean()) < 1e-3
    for k, v in a["generator"].items():
        assert torch.allclose(v, b["generator"][k], atol=1e-3), k
    assert torch.allclose(a["density"], b["density"], rtol=1e-4, atol=1e-4 * float(a["density"].abs().max()))
    assert a["scale"] == pytest.approx(b["scale"], rel=1e-6)
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["data"] == pytest.approx(hb["data"], rel=1e-5)
        assert ha["rigidity"] == pytest.approx(hb["rigidity"], rel=1e-4, abs=1e-9)


@pytest.fixture(scope="module")
def one_process(small_flex_data, tmp_path_factory):
    return _run(small_flex_data, tmp_path_factory.mktemp("dist1") / "one.pt", 1)


def test_two_processes_take_the_steps_of_one(small_flex_data, one_process, tmp_path):
    two = _run(small_flex_data, tmp_path / "two.pt", 2)
    assert (one_process["world"], two["world"]) == (1, 2)
    _assert_same(one_process, two)
    assert float(one_process["latents"].std()) > 0.05  # a real result, not an untouched table


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_checkpoint_continues_under_another_world_size(small_flex_data, one_process, tmp_path, first, then):
    _run(small_flex_data, tmp_path / "a.pt", first, "--stop-after", "1")
    resumed = _run(small_flex_data, tmp_path / "b.pt", then, "--resume", str(tmp_path / "a_run"))
    assert resumed["world"] == then
    _assert_same(one_process, resumed)


def test_cli_flex_train_under_torchrun(small_flex_data, tmp_path):
    """`torchrun -m flexplugin flex-train`: rank 0 alone writes the outputs and prints, train.json records the
    world; a job that does not run data-parallel refuses to start in several processes."""
    from flexplugin.engine.flex.mesh import build_mesh, save_mesh
    from flexplugin.engine.io import read_volume
    vol, apix = read_volume(small_flex_data / "consensus.mrc")
    save_mesh(build_mesh(vol, apix, cells=6), tmp_path / "mesh.pkl")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "flexplugin"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "train"
    r = subprocess.run([*torchrun, "flex-train", "--particles", str(small_flex_data / "particles.star"), "--volume",
                        str(small_flex_data / "consensus.mrc"), "--mesh", str(tmp_path / "mesh.pkl"), "--out",
                        str(out), "--train-box", "16", "--epochs", "2", "--batch-size", "32", "--layers", "2",
                        "--hidden", "16", "--device", "cpu"], check=False, capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    info = json.loads((out / "train.json").read_text())
    assert (info["world_size"], info["particles_per_rank"]) == (2, 60)
    assert info["epochs_done"] == 2 and (out / "model.pt").exists() and (out / "particles_flex.star").exists()
    assert r.stdout.count("flex-train: done after") == 1  # one rank prints
    assert "Traceback" not in r.stderr
    bad = subprocess.run([*torchrun, "simulate", "--out", str(tmp_path / "sim")], check=False,
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0
    assert "error: simulate does not run in several processes" in bad.stderr
    assert not (tmp_path / "sim" / "particles.star").exists()


def test_a_killed_rank_ends_the_job_and_the_checkpoint_resumes(small_flex_data, tmp_path):
    """SIGKILL one of two ranks once the first checkpoint exists: the job ends with an error naming the failed
    rank (torchrun's report), no output of a half-finished job appears, and the checkpoint continues in one
    process to the end."""
    vol_path, star = small_flex_data / "consensus.mrc", small_flex_data / "particles.star"
    from flexplugin.engine.flex.mesh import build_mesh, save_mesh
    from flexplugin.engine.io import read_volume
    vol, apix = read_volume(vol_path)
    save_mesh(build_mesh(vol, apix, cells=6), tmp_path / "mesh.pkl")
    out = tmp_path / "train"
    args = ["flex-train", "--particles", str(star), "--volume", str(vol_path), "--mesh", str(tmp_path / "mesh.pkl"),
            "--out", str(out), "--train-box", "16", "--epochs", "6", "--batch-size", "32", "--layers", "2",
            "--hidden", "16", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kill_a_rank_after_checkpoint([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                  "-m", "flexplugin", *args], out / "checkpoint.pt", env)
    assert not (out / "model.pt").exists()  # a failed job writes no final outputs
    done = subprocess.run([sys.executable, "-m", "flexplugin", *args, "--continue"], check=False,
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "continuing after epoch" in done.stdout
    info = json.loads((out / "train.json").read_text())
    assert info["epochs_done"] == 6 and info["world_size"] == 1
