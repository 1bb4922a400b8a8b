"""`flexplugin flex-generate`: volumes along the latent space of a trained 3D Flex model and its latent atlas
(engine/flex/generate.py); its settings are declared once in GenerateConfig (engine/flex/generate_config.py) and
its files written by engine/flex/outputs.py, with ChimeraX scripts (flexplugin/chimerax.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..engine.atomic import write_json
from .common import add_common, add_config_options, check_blank_map, device, option_ints

COMMAND = "flex-generate"
HELP = "3D Flex generator: volumes along the latent space and the atlas"


def add_args(p: argparse.ArgumentParser) -> None:
    """The model and output folder, custom points or particles, a canonical map, and GenerateConfig's options."""
    from ..engine.flex.generate_config import GenerateConfig
    p.add_argument("--model", required=True, help="model.pt from flex-train, or its folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--points", help="CSV of custom latent points: one per row, K comma-separated values, no header")
    p.add_argument("--from-particles", help="ids (comma-separated, or a file with one id per line): generate at "
                                            "their mean latent")
    p.add_argument("--map", help="canonical map to convect instead of the training one, e.g. flex_map.mrc from "
                                 "flex-reconstruct (its box and pixel size must match --box)")
    add_config_options(p, GenerateConfig)  # --frames, --percentile, --box, --no-atlas, --atlas-*: declared there
    add_common(p)


def _parse_generate_options(a: argparse.Namespace) -> dict:
    """flex-generate's options checked before the model is read: --box, --frames, --percentile, --atlas-*,
    --points/--from-particles. Returns the parsed box (int, or 'train'/'full') and atlas axes."""
    from ..engine.errors import InputError
    box = a.box.strip().lower()
    if box not in ("train", "full"):
        try:
            box = int(box)
        except ValueError:
            raise InputError(f"--box {a.box!r} must be 'train', 'full' or a number of pixels, e.g. --box 128") from None
        if box < 16 or box % 2:
            raise InputError(f"--box must be an even number of pixels >= 16, got {box}")
    if a.frames < 2:
        raise InputError(f"--frames must be at least 2, got {a.frames}")
    if not 0 <= a.percentile < 50:
        raise InputError(f"--percentile must be in [0, 50): each axis spans the [p, 100-p] percentiles, so p >= 50 "
                         f"reverses or empties the range; got {a.percentile}")
    if a.points and a.from_particles:
        raise InputError("give --points or --from-particles, not both")
    axes = None
    if a.atlas:
        if a.atlas_grid < 2:
            raise InputError(f"--atlas-grid must be at least 2 points per axis, got {a.atlas_grid}")
        if a.atlas_axes is not None:
            axes = option_ints(a.atlas_axes, "--atlas-axes", "0,1")
            if len(axes) != 2 or axes[0] == axes[1] or min(axes) < 0:
                raise InputError(f"--atlas-axes must name two different latent axes (0-based), e.g. '0,1'; "
                                 f"got {a.atlas_axes!r}")
    return {"box": box, "atlas_axes": axes}


def _particle_ids(spec: str) -> list[int]:
    """--from-particles: a file with one id per line, or comma-separated ids."""
    from ..engine.errors import InputError
    src = Path(spec)
    if src.is_file():
        try:
            return np.loadtxt(src, dtype=np.int64, ndmin=1).tolist()
        except ValueError as e:
            raise InputError(f"--from-particles {spec}: expected one particle id (a whole number) per line ({e})") \
                from None
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        ids = []
    if not ids:
        raise InputError(f"--from-particles {spec!r} is neither a file (not found) nor comma-separated particle ids, "
                         "e.g. '12,57,301'")
    return ids


def main(a: argparse.Namespace) -> None:
    """Generate volume series (along each latent axis, or at given points) and the atlas into --out."""
    import torch

    from ..engine.errors import InputError
    from ..engine.flex.generate import (
        axis_series,
        check_generation_memory,
        check_points_range,
        load_model,
        points_from_particles,
        read_points,
    )
    from ..engine.flex.outputs import write_atlas, write_series, write_series_plot
    from ..engine.io import read_volume
    opts = _parse_generate_options(a)
    ids = _particle_ids(a.from_particles) if a.from_particles else None
    dev = device(a.device)
    model = load_model(a.model, dev)
    out = Path(a.out)
    m = {"train": model.train_box, "full": model.crop}.get(opts["box"], opts["box"])
    ax = None
    if a.atlas and model.k >= 1:
        ax = opts["atlas_axes"] or ([0, 1] if model.k >= 2 else [0, 0])
        if max(ax) >= model.k:
            raise InputError(f"--atlas-axes {a.atlas_axes}: the model has K={model.k} latent axes (0 to "
                             f"{model.k - 1})")
    pts = None
    if a.points:
        pts = read_points(a.points, model.k)
        check_points_range(pts, model.latents, a.points)
    elif ids is not None:
        pts = points_from_particles(model, ids)
    canonical = None
    if a.map:
        hv, hapix = read_volume(a.map)
        if hv.shape[-1] != m:
            raise InputError(f"--map is {hv.shape[-1]} px but the output box is {m}; pass --box {hv.shape[-1]}")
        if abs(hapix - model.apix_at(m)) > 1e-3 * hapix:
            raise InputError(f"--map has {hapix:.4f} Å/px, the output box needs {model.apix_at(m):.4f}")
        check_blank_map(hv, a.map, "--map")
        canonical = torch.as_tensor(hv, device=dev)
    check_generation_memory(model, m, len(pts) if pts is not None else a.frames, dev)
    out.mkdir(parents=True, exist_ok=True)
    apix_m = model.apix_at(m)
    summary = {"box": m, "apix": apix_m, "series": []}
    from ..chimerax import MESH_CMM, mesh_markers, surface_level, write_marker_file, write_series_script
    markers = write_marker_file(out / MESH_CMM, *mesh_markers(model.mesh),  # the mesh, for the ChimeraX scripts
                                radius=model.mesh.cube_size * model.mesh.psize_A / 10)
    if pts is not None:
        vols = model.volumes(pts, m, canonical)
        names = write_series(vols, pts, out, apix_m)
        write_series_script(out / "series.cxc", [out / n for n in names], surface_level(vols[len(vols) // 2]),
                            markers)
        summary["series"].append({"name": "points", "folder": ".", "volumes": names, "chimerax": "series.cxc"})
        write_series_plot(vols, out / "series.png", "generated at the given points")
    else:
        for k, pts in enumerate(axis_series(model.latents, a.frames, a.percentile)):
            vols = model.volumes(pts, m, canonical)
            folder = out / f"series_{k:02d}"
            names = write_series(vols, pts, folder, apix_m)
            write_series_script(out / f"series_{k:02d}.cxc", [folder / n for n in names],
                                surface_level(vols[len(vols) // 2]), markers)
            write_series_plot(vols, out / f"series_{k:02d}.png", f"latent {k}: {pts[0, k]:.2f} → {pts[-1, k]:.2f}")
            summary["series"].append({"name": f"latent {k}", "folder": folder.name, "volumes": names,
                                      "chimerax": f"series_{k:02d}.cxc"})
            print(f"flex-generate: latent {k}: {len(vols)} volumes in {folder}", flush=True)
    if ax is not None:
        write_atlas(model, out / "atlas.png", (ax[0], ax[1]), a.atlas_grid)
        summary["atlas"] = "atlas.png"
    write_json(out / "generate.json", summary)
    print(f"flex-generate: volumes at box {m} ({apix_m:.3f} Å/px) written to {out}", flush=True)
