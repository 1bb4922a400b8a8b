"""`flexplugin` command line: one subcommand per job; parses arguments, calls the engine, prints progress.

One module per command (COMMANDS), each with `COMMAND` (its name), `HELP`, `add_args(parser)` and `main(args)`;
common.py holds what they share (device, CPU fallback, settings options, `run` with its exit codes). The command
modules import common.py and the engine, never each other; this module only lists them. Options that mirror a
cryoSPARC parameter are declared once, in the engine's settings dataclasses (flexplugin/engine/options.py).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .common import CPU_FALLBACK_ENV, DISTRIBUTED_COMMANDS, EXIT_DISTRIBUTED, resolve_device, run

__all__ = ["COMMANDS", "CPU_FALLBACK_ENV", "DISTRIBUTED_COMMANDS", "EXIT_DISTRIBUTED", "build_parser", "main",
           "resolve_device", "run"]

# the command modules of this package, in the order `flexplugin --help` lists them
COMMANDS = ("simulate", "reconstruct", "va3d", "va3d_display", "flex_prep", "flex_mesh", "flex_train",
            "flex_generate", "flex_reconstruct")


def build_parser() -> argparse.ArgumentParser:
    """The `flexplugin` parser: one subparser per module of COMMANDS, its options from the module's add_args."""
    from .. import __version__
    p = argparse.ArgumentParser(prog="flexplugin", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"flexplugin {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        mod = importlib.import_module(f"{__name__}.{name}")
        s = sub.add_parser(mod.COMMAND, help=mod.HELP, description=getattr(mod, "DESCRIPTION", None))
        mod.add_args(s)
        s.set_defaults(func=mod.main)
    return p


def main(argv: list[str] | None = None) -> int:
    """`flexplugin <command> ...` (and `python -m flexplugin[.cli]`): parse, then run (common.run's exit codes)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --gpus with several ids passes them on to torchrun
    return run(args)
