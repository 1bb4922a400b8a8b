"""The command line as a user runs it: subprocesses, exit codes, messages."""

import pytest

from ..helpers.cli import run_cli


def test_help_and_version():
    r = run_cli("--help")
    assert r.returncode == 0 and "simulate" in r.stdout and "reconstruct" in r.stdout
    assert "flexplugin" in run_cli("--version").stdout


def test_simulate_then_reconstruct(tmp_path):
    r = run_cli("simulate", "--out", str(tmp_path / "d"), "--n", "200", "--box", "32", "--apix", "4", "--snr", "2")
    assert r.returncode == 0, r.stderr
    r = run_cli("reconstruct", "--particles", str(tmp_path / "d" / "particles.star"), "--out", str(tmp_path / "r"),
             "--device", "cpu", "--batch-size", "64")
    assert r.returncode == 0, r.stderr
    assert "resolution" in r.stdout and "ETA" in r.stdout
    assert (tmp_path / "r" / "map.mrc").exists()


def test_bad_input_exit_code_and_message(tmp_path):
    r = run_cli("reconstruct", "--particles", str(tmp_path / "missing.star"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "particle STAR file not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_gpu_is_clear(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    r = run_cli("reconstruct", "--particles", "x.star", "--out", str(tmp_path), "--device", "cuda:3")
    assert r.returncode != 0 and "CUDA is not available" in r.stderr
