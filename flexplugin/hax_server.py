"""hax "annotate space" server functions: our 3D Flex and 3DVA latents decoded into maps, live, for FlexHub.

hax's annotate-space viewer (DavidHerreros/hax-em) decodes a latent point through a program's "server functions"
file: its server loads this file by path (in the environment named by `--env_name`), builds
`HeterogeneityProgramInterface(_path_template=<outdir>/decoded_map_class_{:02d}.mrc, _program_loading_params=
<every viewer argument, as a dict>)`, and for each request calls `decode_state_from_latent(latent)` with an
(n, K) array; map i (from 1) must be written to `_path_template.format(i)`.

Our arguments, given to the viewer by `getAnnotateSpaceArguments(particles)` (the function FlexHub plugins
expose for scipion-em-hax) or by hand:
    --flex_model <model.pt or its folder>   a flex-train model: maps as `flexplugin flex-generate` makes them
    --flex_box train|full|<pixels>          flex-generate's --box (default train)
    --va3d_run <3dva run folder>            a 3dva run: consensus + Σ z_k component_k, as 3dva-display's frames
    --va3d_filter_res <Å>                   3dva-display's --filter-res (default: none)
    --device cpu|cuda|auto                  (default auto: the GPU hax was given, else the CPU)
Values arrive as text; other viewer arguments (outdir, env_name, boxsize, ...) are ignored.

This module imports only the engine (absolute imports: hax loads it by path, not as part of the package).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["FLEX_PROGNAME", "VA3D_PROGNAME", "FlexDecoder", "HeterogeneityProgramInterface", "VA3DDecoder",
           "annotate_space_arguments", "getAnnotateSpaceArguments"]

# FlexInfo.progName of our SetOfParticlesFlex (the same strings as protocols/constants.py; checked by a test,
# not imported: this module sits below the protocols)
FLEX_PROGNAME = "FLEXPLUGIN.3DFLEX"
VA3D_PROGNAME = "FLEXPLUGIN.3DVA"


def _device(name: str | None):
    import torch
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class FlexDecoder:
    """Maps of a 3D Flex model at latent points: the flex-generate path (FlexModel.volumes at box `box`)."""

    def __init__(self, model: str | os.PathLike, box: str | int = "train", device: str | None = None):
        from flexplugin.engine.flex.generate import load_model
        self.model = load_model(str(model), _device(device))
        b = str(box).strip().lower()
        self.box = {"train": self.model.train_box, "full": self.model.crop}.get(b) or int(b)
        self.k, self.apix = self.model.k, self.model.apix_at(self.box)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """(n, box, box, box) float32 maps at the (n, K) latent points."""
        return np.asarray(self.model.volumes(np.asarray(z, dtype=np.float32), self.box), dtype=np.float32)


class VA3DDecoder:
    """Maps of a 3DVA run at latent points: consensus + Σ_k z_k component_k, post-processed (low-pass) as
    3dva-display's frames are."""

    def __init__(self, run: str | os.PathLike, filter_res: float | str | None = None, device: str | None = None):
        from flexplugin.engine.va3d.display import DisplayConfig, _Post
        from flexplugin.engine.va3d.outputs import load_run
        self.run = load_run(run)
        fr = None if filter_res in (None, "", "None", "none") else float(filter_res)
        box = self.run.consensus.shape[-1]
        self.post = _Post(DisplayConfig(filter_res=fr), box, self.run.apix)
        self.k, self.apix, self.box = self.run.k, self.post.rapix, self.post.rbox
        self.device = device  # the sums run on the CPU in float64: a map per request

    def decode(self, z: np.ndarray) -> np.ndarray:
        """(n, box, box, box) float32 maps at the (n, K) latent points."""
        z = np.asarray(z, dtype=np.float64)
        comps = np.asarray(self.run.components, dtype=np.float64)
        return np.stack([self.post(self.run.consensus + np.tensordot(zi, comps, 1)) for zi in z])


class HeterogeneityProgramInterface:
    """hax's server-functions interface (hax/viewers/server_loading_functions/template.py), for our runs."""

    def __init__(self, _path_template: str, _program_loading_params: dict):
        self.model = self.prepare_heterogeneity_program(**_program_loading_params)
        self.path_template = _path_template

    def prepare_heterogeneity_program(self, **kwargs) -> FlexDecoder | VA3DDecoder:
        """The decoder named by the viewer's arguments: --flex_model (3D Flex) or --va3d_run (3DVA)."""
        device = kwargs.get("device") or "auto"
        if kwargs.get("flex_model"):
            return FlexDecoder(kwargs["flex_model"], kwargs.get("flex_box") or "train", device)
        if kwargs.get("va3d_run"):
            return VA3DDecoder(kwargs["va3d_run"], kwargs.get("va3d_filter_res"), device)
        raise ValueError("flexplugin's annotate-space server needs --flex_model <model.pt> (3D Flex) or "
                         "--va3d_run <3dva run folder> (3DVA)")

    def decode_state_from_latent(self, latent: np.ndarray) -> None:
        """Write the map of each latent row i (from 1) to path_template.format(i), with its pixel size."""
        from flexplugin.engine.io import write_volume
        z = np.asarray(latent, dtype=np.float64)
        z = z[None, :] if z.ndim == 1 else z
        if z.ndim != 2 or z.shape[1] != self.model.k:
            raise ValueError(f"latent points of shape {np.shape(latent)}: this model has K={self.model.k} "
                             "coordinates per point")
        for i, vol in enumerate(self.model.decode(z), 1):
            write_volume(self.path_template.format(i), vol, self.model.apix)


def annotate_space_arguments(prog_name: str, attrs: dict, gpu_id: int | None = None,
                             env_name: str | None = None) -> str:
    """The annotate-space command-line arguments for one of our SetOfParticlesFlex (its FlexInfo progName and
    attributes: modelPath/trainingBox for 3D Flex, runPath/filterRes/box for 3DVA); Scipion-free."""
    if prog_name == FLEX_PROGNAME:
        args = f"--flex_model {os.path.abspath(attrs['modelPath'])} --flex_box train"
        if attrs.get("trainingBox"):
            args += f" --boxsize {int(attrs['trainingBox'])}"
    elif prog_name == VA3D_PROGNAME:
        args = f"--va3d_run {os.path.abspath(attrs['runPath'])}"
        if attrs.get("filterRes") not in (None, "", "None"):
            args += f" --va3d_filter_res {float(attrs['filterRes']):g}"
        if attrs.get("box"):
            args += f" --boxsize {int(attrs['box'])}"
    else:
        raise ValueError(f"not a flexplugin result: FlexInfo progName {prog_name!r}")
    args += f" --server_functions_path {Path(__file__).resolve()}"
    if env_name:
        args += f" --env_name {env_name}"
    if gpu_id is not None:
        args += f" --gpu_id {gpu_id} --device cuda"
    return args


def getAnnotateSpaceArguments(particles, gpu_id: int | None = None) -> str:  # noqa: N802  (FlexHub's name)
    """The annotate-space arguments for a SetOfParticlesFlex of ours, as FlexHub plugins expose them to
    scipion-em-hax; --env_name is the conda environment of the engine's Python (FLEXPLUGIN_PYTHON), if any."""
    info = particles.getFlexInfo()
    names = ("modelPath", "trainingBox", "runPath", "filterRes", "box")
    attrs = {n: info.getAttr(n) if hasattr(info, n) else None for n in names}
    python = os.environ.get("FLEXPLUGIN_PYTHON") or ""
    prefix = Path(python).resolve().parent.parent if python else None
    env = str(prefix) if prefix is not None and (prefix / "conda-meta").is_dir() else None
    return annotate_space_arguments(info.getProgName(), attrs, gpu_id, env)
