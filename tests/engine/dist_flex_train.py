"""Worker of tests/engine/test_flex_distributed.py: a short default-shaped flex-train on DATA, run either as one
process or under `torchrun --nproc-per-node N`; rank 0 saves the final state (latents, generator, map) to OUT.

Usage: python tests/engine/dist_flex_train.py DATA OUT [EPOCHS] [--resume CKPT_DIR] [--stop-after E]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flexplugin.engine import distributed
from flexplugin.engine.flex.config import TrainConfig
from flexplugin.engine.flex.mesh import build_mesh
from flexplugin.engine.flex.prep import PreparedParticles, prep_spec, prep_volume
from flexplugin.engine.flex.train import FlexTrainer
from flexplugin.engine.io import read_particles, read_volume


def main(argv: list[str]) -> None:
    data, out = Path(argv[0]), Path(argv[1])
    epochs = int(argv[2]) if len(argv) > 2 and not argv[2].startswith("--") else 3
    resume = Path(argv[argv.index("--resume") + 1]) if "--resume" in argv else None
    stop = int(argv[argv.index("--stop-after") + 1]) if "--stop-after" in argv else None
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    ps = read_particles(data / "particles.star")
    vol, apix = read_volume(data / "consensus.mrc")
    spec = prep_spec(ps.box, ps.apix, None, 16)
    cfg = TrainConfig(k=2, epochs=epochs, batch_size=32, layers=2, hidden=16, noise_particles=100)
    tr = FlexTrainer(PreparedParticles(ps, spec), prep_volume(vol, spec), build_mesh(vol, apix, cells=8), cfg, "cpu")
    ckpt = out.parent / (out.stem + "_run")
    if resume is not None:
        tr.load_checkpoint(resume / "checkpoint.pt")
    tr.fit(ckpt, progress=lambda s: None, stop_after=stop)
    if distributed.is_main():
        torch.save({"latents": tr.latents.cpu(), "generator": tr.gen.state_dict(), "density": tr.density.detach(),
                    "scale": tr.scale, "noise": tr.noise_shell.cpu(), "history": tr.history,
                    "world": distributed.world(), "epoch": tr.epoch}, out)
    distributed.shutdown()  # leave the group after rank 0 has saved (an exit with the group alive can abort)


if __name__ == "__main__":
    main(sys.argv[1:])
