"""argparse options generated from the engine's settings dataclasses (flexplugin/engine/options.py): each field
becomes `--kebab-case` with its type, default and help (cryoSPARC key and default appended), so an option is
declared once, beside its default, in the dataclass."""
from __future__ import annotations

import argparse
import typing
from dataclasses import Field
from typing import Any

from .engine.options import cli_fields, help_text, option_name

__all__ = ["add_config_options", "config_from_args"]


def _value_type(cls: type, f: Field) -> type:
    """The number or text type of a field (`float | None` -> float), from the dataclass's resolved annotations."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _positive_float(s: str) -> float:
    """A number > 0 (argparse names the option in its error: 'argument --filter-res: must be > 0, got 0')."""
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def add_config_options(p: argparse.ArgumentParser, cls: type) -> None:
    """Add one option per command-line field of settings dataclass `cls` to parser `p` (dest = the field name;
    a boolean defaulting to True is `--no-<name>`, one defaulting to False `--<name>`)."""
    for f in cli_fields(cls):
        text = help_text(f).replace("%", "%%")  # argparse formats help with %
        if isinstance(f.default, bool):
            p.add_argument(option_name(f), dest=f.name, action="store_false" if f.default else "store_true",
                           help=text)
        else:
            kind = _positive_float if f.metadata.get("positive") else _value_type(cls, f)
            extra = {"required": True} if f.metadata.get("required") else {"default": f.default}
            p.add_argument(option_name(f), dest=f.name, type=kind, choices=f.metadata.get("choices"), help=text,
                           **extra)


def config_from_args(cls: type, a: argparse.Namespace, **extra: Any) -> Any:
    """An instance of settings dataclass `cls` from parsed arguments (its command-line fields) and `extra`
    (its other fields, when not left at their defaults)."""
    return cls(**{f.name: getattr(a, f.name) for f in cli_fields(cls)}, **extra)
