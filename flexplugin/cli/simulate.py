"""`flexplugin simulate`: the built-in flexible example data set (particles, consensus, mask, ground truth)."""
from __future__ import annotations

import argparse

from .common import add_config_options, config_from_args

COMMAND = "simulate"
HELP = "write the built-in flexible example data set"


def add_args(p: argparse.ArgumentParser) -> None:
    """--out and SimConfig's options (declared once there, engine/simulate_config.py)."""
    from ..engine.simulate_config import SimConfig
    p.add_argument("--out", required=True, help="output folder")
    add_config_options(p, SimConfig)


def main(a: argparse.Namespace) -> None:
    """Write the data set into --out."""
    from ..engine.simulate import SimConfig, simulate_dataset
    simulate_dataset(config_from_args(SimConfig, a), a.out)
