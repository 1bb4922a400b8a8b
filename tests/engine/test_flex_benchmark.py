"""3D Flex learns real motions at its default settings: the CI-sized benchmark (bench/bench_motion.py is full size).

Data the training was not tuned on: two real proteins (pdb_motion.BENCHMARKS: adenylate kinase closing its LID
and NMP domains between two crystal structures, and HIV-1 protease along an elastic-network mode that twists
the dimer; structures from the mdanalysistests sdist in the reference cache) and the built-in example, each
600 particles at box 64 (SNR 0.1), trained at box 32 (the issue's benchmark set-up; the bench runs 3,000
particles at box 128). Mesh and training at flex-mesh's and flex-train's defaults.

Targets: from random latents a cross-validated |ρ| ≥ 0.90 with K=1 and with K=2; seeded from 3DVA at least
the seed's own |ρ| + 0.01; maps generated at the latents of the particles truly in each state beat the
consensus inside the moving domains at both ends of the motion, and run through the states in order.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from flexplugin.engine.flex.benchmark import run_and_score
from flexplugin.engine.flex.scoring import readout_rho
from flexplugin.engine.flex.train import TrainConfig, normalize_init_latents
from flexplugin.engine.io import read_particles
from flexplugin.engine.pdb_motion import make_benchmark
from flexplugin.engine.simulate import SimConfig, simulate_dataset

from ..helpers.refdata import MDATESTS, refdata_dir, sdist_file

N = 600
DATASETS = ["adk-closure", "hivpr-mode", "example"]


@pytest.fixture(scope="module", params=DATASETS)
def data(request, tmp_path_factory):
    """One data set at box 64: the real proteins at 1.5 Å/px (96 Å box), the example at its default 2 Å/px."""
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "example":
        simulate_dataset(SimConfig(n=N, box=64, apix=2.0, snr=0.1, seed=5), out, progress=lambda s: None)
    else:
        sdist_file(MDATESTS, "MDAnalysisTests/data/adk_open.pdb")  # skips (fails under CI) when not fetched
        make_benchmark(request.param, refdata_dir() / MDATESTS, out, n=N, box=64, apix=1.5, snr=0.1, seed=1,
                       progress=lambda s: None)
    ps = read_particles(out / "particles.star")
    truth = pd.read_csv(out / "ground_truth.csv").set_index("rlnImageId").loc[ps.ids, "motion"].to_numpy()
    return {"dir": out, "ps": ps, "truth": truth, "name": request.param}


def _check_states(score: dict) -> None:
    # the oracle (latents searched over the true state maps) bounds what a latent search can tell at that band
    assert score["rho"] <= score["oracle_rho"] + 0.01, score
    assert min(score["end_gains"]) > 0, score  # both ends sharper than the consensus where the protein moves
    assert score["order_rho"] >= 0.9, score  # the generated series runs through the true states in order


@pytest.mark.parametrize("k", [1, 2])
def test_random_latents_learn_the_motion(data, k, tmp_path):
    if k == 2 and data["name"] == "example":  # measured 0.975 (README); skipped to keep the suite short
        pytest.skip("K=2 from random latents is asserted on the two real proteins; the bench runs the example")
    _, score = run_and_score(data["dir"], train_box=32, cfg=TrainConfig(k=k), particles=data["ps"], out=tmp_path)
    print(data["name"], f"K={k}", score)
    assert score["rho"] >= 0.90, score
    _check_states(score)


def test_seeded_from_3dva_improves_its_seed(data, tmp_path):
    d = data["dir"]
    r = subprocess.run([sys.executable, "-m", "flexplugin.cli", "3dva", "--particles", str(d / "particles.star"),
                        "--volume", str(d / "consensus.mrc"), "--mask", str(d / "mask.mrc"), "--out",
                        str(tmp_path / "va"), "--k", "2", "--filter-res", "9", "--iterations", "10"],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    va = pd.read_csv(tmp_path / "va" / "latents.csv").set_index("rlnImageId").loc[data["ps"].ids]
    seed = va[["z0", "z1"]].to_numpy()
    rho_seed = readout_rho(seed, data["truth"])
    _, score = run_and_score(d, train_box=32, cfg=TrainConfig(k=2), init=normalize_init_latents(seed, 2),
                             particles=data["ps"], out=tmp_path / "flex")
    print(data["name"], f"seed {rho_seed:.3f}", score)
    assert score["rho"] >= rho_seed + 0.01, (rho_seed, score)
    _check_states(score)


def test_seed_keeps_relative_variances():
    """Seeding scales every column by one factor: a weak second 3DVA component stays weak."""
    rng = np.random.default_rng(0)
    z = np.c_[3.0 * rng.normal(size=500), 0.3 * rng.normal(size=500)]
    s = normalize_init_latents(z, 2)
    ratio = s.std(0)[1] / s.std(0)[0]
    assert abs(ratio - z.std(0)[1] / z.std(0)[0]) < 1e-3
