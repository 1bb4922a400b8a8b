"""Worker of tests/engine/test_distributed_jobs.py::test_collectives: one of two processes (RANK, WORLD_SIZE=2,
MASTER_ADDR, MASTER_PORT in the environment) checks engine/distributed.py's sums against values computed by hand.

Exits 0 when every check holds; otherwise prints what differed and exits 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flexplugin.engine import distributed  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    assert distributed.init_from_env("cpu")
    r, w = distributed.rank(), distributed.world()
    problems = []
    # complex sum (gloo sums real and imaginary parts)
    z = torch.tensor([1 + 2j, -3j], dtype=torch.complex64) * (r + 1)
    distributed.all_reduce_(z)
    if not torch.equal(z, torch.tensor([3 + 6j, -9j], dtype=torch.complex64)):
        problems.append(f"complex sum {z.tolist()}")
    # rows merged from the rank that owns them; the other ranks' values for those rows are ignored
    rows = torch.arange(7)[r::w]
    table = torch.full((7, 2), -99.0)
    table[rows] = torch.stack([rows * 1.0, rows * 10.0], 1)
    distributed.merge_rows_(table, rows.numpy())
    want = torch.stack([torch.arange(7) * 1.0, torch.arange(7) * 10.0], 1)
    if not torch.equal(table, want):
        problems.append(f"merged rows {table.tolist()}")
    # several tensors in one collective
    a, b = torch.full((3,), float(r + 1)), torch.full((2, 2), 10.0 * (r + 1))
    distributed.all_reduce_flat_([a, b])
    if not (torch.equal(a, torch.full((3,), 3.0)) and torch.equal(b, torch.full((2, 2), 30.0))):
        problems.append(f"flat sum {a.tolist()} {b.tolist()}")
    # payload counted: 2 complex64 (16 B), the 7x2 float32 table (56 B), 3 + 4 float32 in one buffer (28 B)
    expected = 16 + 56 + 28
    got = distributed.bytes_reduced()
    if got != expected:
        problems.append(f"bytes counted {got}, expected {expected}")
    if problems:
        print(f"rank {r}: " + "; ".join(problems), flush=True)
    distributed.shutdown()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
