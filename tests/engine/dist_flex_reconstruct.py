"""Worker of tests/engine/test_flex_reconstruct_distributed.py: flex-reconstruct of DATA with a small random-flow 3D Flex
model, run as one process or under `torchrun --nproc-per-node N`; rank 0 saves the maps and bins to OUT.

Usage: python tests/engine/dist_flex_reconstruct.py DATA OUT
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flexplugin.engine import distributed
from flexplugin.engine.flex.generate import FlexModel
from flexplugin.engine.flex.mesh import build_mesh
from flexplugin.engine.flex.model import FlowGenerator
from flexplugin.engine.flex.reconstruct import flex_reconstruct
from flexplugin.engine.io import read_particles, read_volume


def small_model(data: Path) -> FlexModel:
    """A model over DATA's particles: the consensus's mesh, a seeded random generator (flows of a few Å) and seeded
    N(0, 1) latents (K = 2), the same in every process."""
    ps = read_particles(data / "particles.star")
    vol, apix = read_volume(data / "consensus.mrc")
    mesh = build_mesh(vol, apix, cells=6)
    torch.manual_seed(0)
    gen = FlowGenerator(2, len(mesh.points), layers=2, hidden=16)
    torch.nn.init.normal_(gen.out.weight, std=1.5)
    gen.eval()
    z = np.random.default_rng(0).normal(size=(len(ps), 2)).astype(np.float32)
    return FlexModel(gen, mesh, torch.as_tensor(vol), apix, ps.box, ps.box, ps.box, apix, z, ps.ids, {},
                     torch.device("cpu"))


def main(argv: list[str]) -> None:
    data, out = Path(argv[0]), Path(argv[1])
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    ps = read_particles(data / "particles.star")
    # flow_noise 0: the random flows are mostly below the default flow noise (ReconstructConfig.flow_noise), which would hold
    # them still in one bin; this test is about the ranks' insertion into several bins
    r = flex_reconstruct(small_model(data), ps, iterations=3, tol=1e-6, batch_size=16, max_bins=8, flow_noise=0.0,
                         progress=lambda s: None)
    assert (r is None) != distributed.is_main()  # rank 0 alone gets the result
    if distributed.is_main():
        torch.save({"flex": np.stack([r.flex_half1, r.flex_half2]), "noflex": np.stack([r.noflex_half1, r.noflex_half2]),
                    "start": np.stack([r.start_half1, r.start_half2]), "bins": r.bins, "objective": r.objective,
                    "half_counts": r.half_counts,
                    "world": distributed.world()}, out)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
