"""`flexplugin flex-mesh`: 3D Flex mesh prep, the tetrahedral mesh and its rigidity weights (engine/flex/mesh.py);
its settings are declared once in MeshConfig (engine/flex/mesh_config.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..engine.atomic import save_plot, write_json
from .common import add_config_options, check_blank_map, option_ints

COMMAND = "flex-mesh"
HELP = "3D Flex mesh prep: tetrahedral mesh and rigidity weights"


def add_args(p: argparse.ArgumentParser) -> None:
    """The map, mask, segmentation and output folder, --crop, --fuse, --rigid and MeshConfig's options."""
    from ..engine.flex.mesh_config import MeshConfig
    p.add_argument("--volume", required=True, help="consensus map (at the training or crop box)")
    p.add_argument("--mask", help="solvent mask; made from the map when absent")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--crop", type=int,
                   help="crop the map, mask and segmentation about their centre to this box in px before meshing, "
                        "as flex-train --crop crops the particles (box_size_pix; default: the full box)")
    p.add_argument("--segmentation", help="MRC with integer segment labels (0 = none): one sub-mesh per segment")
    p.add_argument("--fuse", help="segments to fuse, a tree breadth-first root first, e.g. '1>3, 1>4, 3>2'")
    p.add_argument("--rigid", help="segments made rigid (weight 20), e.g. '2,4'")
    add_config_options(p, MeshConfig)  # --cells, ..., --mask-pad: declared once, in MeshConfig


def main(a: argparse.Namespace) -> None:
    """Build the mesh on --volume (and its mask or segmentation) and write it with its plots into --out."""
    from ..engine.errors import InputError
    from ..engine.flex.mesh import build_mesh, save_mesh, write_mesh_pdb
    from ..engine.flex.plots import plot_mesh
    from ..engine.io import read_mask, read_segmentation, read_volume, write_volume
    option_ints(a.rigid, "--rigid", "2,4")
    _check_fuse_syntax(a.fuse)
    for opt, v, low in (("--mask-lowpass", a.mask_lowpass, "> 0"), ("--mask-dilate", a.mask_dilate, ">= 0"),
                        ("--mask-pad", a.mask_pad, ">= 0")):
        if v < 0 or (low == "> 0" and v == 0):
            raise InputError(f"{opt} must be {low} Å, got {v}")
    vol, apix = read_volume(a.volume)
    check_blank_map(vol, a.volume, "--volume")
    mask = seg = None
    if a.mask:
        mask, mapix = read_mask(a.mask)
        if mask.shape != vol.shape or abs(mapix - apix) > 1e-3 * apix:
            raise InputError(f"mask ({mask.shape[0]} px, {mapix:.3f} Å) does not match the volume "
                             f"({vol.shape[0]} px, {apix:.3f} Å)")
    if a.segmentation:
        seg, sapix = read_segmentation(a.segmentation)  # whole-number labels: a density map is refused
        if seg.shape != vol.shape:
            raise InputError(f"segmentation box {seg.shape[0]} differs from the volume box {vol.shape[0]}")
    elif a.fuse or a.rigid:
        raise InputError("--fuse and --rigid need --segmentation")
    if a.crop is not None:
        vol, mask, seg = _crop_maps(a.crop, vol.shape[0], vol, mask, seg)
    mesh = build_mesh(vol, apix, mask=mask, cells=a.cells, rigidity_min=a.rigidity_min,
                      stiffen_low_density=a.stiffen_low_density, segmentation=seg, fuse_list=a.fuse,
                      rigid_list=a.rigid, lowpass_A=a.mask_lowpass, threshold=a.mask_threshold,
                      dilate_A=a.mask_dilate, pad_A=a.mask_pad)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_mesh(mesh, out / "mesh.pkl")
    write_mesh_pdb(mesh, out / "mesh.pdb")
    write_volume(out / "mesh_mask.mrc", mesh.mask_soft, apix)
    if a.crop is not None:
        write_volume(out / "mesh_map.mrc", vol, apix)  # the map the mesh covers, to view with mesh.pdb
    save_plot(plot_mesh, out / "mesh_slices.png", vol, mesh.tetraidx_map(), mesh.rweights)
    info = {"vertices": int(len(mesh.points)), "cells": int(len(mesh.cells)), "box": mesh.N, "apix": apix,
            "cells_across": a.cells, "rigidity_min": float(mesh.rweights.min()),
            "rigidity_max": float(mesh.rweights.max()), "segments": sorted(set(mesh.cell_segment.tolist()))}
    write_json(out / "mesh.json", info)
    print(f"flex-mesh: {info['vertices']} vertices, {info['cells']} tetrahedra over the mask; "
          f"mesh.pkl, mesh.pdb, mesh_slices.png in {out}", flush=True)


def _crop_maps(crop: int, box: int, *maps: np.ndarray | None) -> list[np.ndarray | None]:
    """The maps cropped about their centre to crop³ (the centring flex-train uses for particles, so the mesh lines
    up with the cropped training data); --crop must be even, >= 16 and <= the volume box."""
    import torch

    from ..engine.errors import InputError
    from ..engine.fourier import crop_center
    if crop > box or crop < 16 or crop % 2:
        raise InputError(f"--crop must be an even number of pixels >= 16 and <= the volume box {box}; got {crop}")
    return [None if m is None else crop_center(torch.from_numpy(np.ascontiguousarray(m)), crop, 3).numpy().copy()
            for m in maps]


def _check_fuse_syntax(text: str | None) -> None:
    """--fuse items look like 'parent>child' with whole-number segment labels (the tree is checked later)."""
    from ..engine.errors import InputError
    for tok in (text or "").replace(";", ",").split(","):
        parts = [t.strip() for t in tok.split(">")]
        if tok.strip() and (len(parts) != 2 or not all(t.lstrip("-").isdigit() for t in parts)):
            raise InputError(f"--fuse item {tok.strip()!r} must look like 'parent>child' with segment numbers, "
                             "e.g. '1>3, 1>4, 3>2'")
