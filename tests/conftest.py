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


# the markers declared in pyproject.toml, given by folder so that every test carries its floor:
# `pytest -m "not scipion and not gui"` runs the engine and CLI alone, `-m reference` the independent oracles
_FOLDER_MARKERS = {"scipion": "scipion", "gui": "gui", "reference": "reference"}
# files whose tests train, reconstruct, run torchrun jobs or Scipion protocols (seconds to minutes each)
_SLOW_FILES = {"test_flex_benchmark.py", "test_flex_distributed.py", "test_distributed_jobs.py",
               "test_flex_reconstruct_distributed.py", "test_flex_generate_reconstruct.py", "test_va3d.py",
               "test_flex_train.py", "test_prep_cache.py", "test_launch.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by its folder (scipion, gui, reference) and slow by file (the heavy ones)."""
    for item in items:
        marker = _FOLDER_MARKERS.get(item.path.parent.name)
        if marker:
            item.add_marker(getattr(pytest.mark, marker))
        name = item.path.name
        if name in _SLOW_FILES or name.startswith(("test_scipion_", "test_chain_")):
            item.add_marker(pytest.mark.slow)
