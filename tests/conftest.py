"""Shared pytest fixtures: small simulated data sets, made once per session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def rigid_data(tmp_path_factory):
    """High-SNR, motion-free example data (box 48) for reconstruction accuracy tests."""
    from flexplugin.engine.simulate import SimConfig, simulate_dataset
    out = tmp_path_factory.mktemp("rigid")
    simulate_dataset(SimConfig(n=1000, box=48, apix=2.5, snr=10.0, seed=3, hinge_deg=0, twist_deg=0,
                               stack_size=400), out, progress=lambda s: None)
    return out


@pytest.fixture(scope="session")
def small_flex_data(tmp_path_factory):
    """Small flexible data set (box 32) for I/O and CLI tests."""
    from flexplugin.engine.simulate import SimConfig, simulate_dataset
    out = tmp_path_factory.mktemp("flex_small")
    simulate_dataset(SimConfig(n=120, box=32, apix=4.0, snr=1.0, seed=1, stack_size=50), out,
                     progress=lambda s: None)
    return out
