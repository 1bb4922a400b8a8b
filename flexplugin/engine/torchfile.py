"""Reading flexplugin's torch files (3D Flex model.pt/checkpoint.pt, 3DVA checkpoint.pt) with errors a user can act on.

A truncated or foreign file, an MRC map given where a model belongs, or one job's file given to another
becomes an InputError that says what the file is and how to recover, instead of a pickle or zip traceback.
"""
from __future__ import annotations

import os

from .errors import InputError

__all__ = ["describe", "load_torch_file", "sniff_format"]

FLEX_FORMAT = "flexplugin-flex-model"


def sniff_format(path: str | os.PathLike) -> str | None:
    """A name for well-known non-torch files (MRC map, STAR, text), from their first bytes; None otherwise."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
    except OSError:
        return None
    if len(head) >= 212 and head[208:211] == b"MAP":
        return "an MRC map"
    if head[:2] == b"PK" or head[:2] == b"\x80\x02" or not head:
        return None  # torch's zip or legacy pickle (or empty: reported as truncated)
    text = head.lstrip()
    if text.startswith((b"data_", b"# version")) or b"\nloop_" in head:
        return "a STAR file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return None


def describe(d) -> str:
    """What a loaded flexplugin torch file is, in words."""
    if not isinstance(d, dict):
        return f"a {type(d).__name__}, not a flexplugin file"
    if d.get("format") == FLEX_FORMAT:
        if all(k in d for k in ("opt_flow", "opt_density", "opt_latent")):
            return "a 3D Flex training checkpoint (checkpoint.pt of flex-train)"
        return "a 3D Flex model (model.pt of flex-train)"
    if {"key", "iteration", "W"} <= d.keys():
        return "a 3DVA checkpoint (checkpoint.pt of 3dva)"
    return "not a flexplugin file"


def load_torch_file(path: str | os.PathLike, what: str, hint: str):
    """torch.load of `path` (expected: `what`); an unreadable, truncated or non-torch file is an InputError
    saying what the file is, with `hint` (how to recover) appended."""
    import torch
    kind = sniff_format(path)
    if kind is not None:
        raise InputError(f"{path} is {kind}, not {what}; {hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (zip, pickle, EOF errors: all mean an unreadable file)
        why = (str(e).splitlines() or [""])[0].split(". ")[0][:200]
        raise InputError(f"cannot read {path} as {what} ({type(e).__name__}: {why}): the file is truncated or "
                         f"damaged; {hint}") from None
