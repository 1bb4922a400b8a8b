"""Tetrahedral mesh for 3D Flex: solvent mask, regular tetra mesh, rigidity weights, segments, files.

The mesh is a regular grid of `cells` cubes across the box, each cube split into 6 tetrahedra along its
main diagonal (Freudenthal/Kuhn split: the split is the same in every cube, so faces match and the mesh
is conforming). Only cubes that contain masked voxels are kept. Because the split is regular, the tetra
and barycentric coordinates of any point follow from the ordering of its fractional cube coordinates,
so the flow can be re-rasterised analytically on any grid (training box, full box) without searching.

Coordinates: vertex positions `tm_points` are in voxels of the mesh box, (x, y, z) order, relative to
the box centre N//2 (the convention of the engine); `tm_tetraidx_map` is indexed [z, y, x].
The saved pickle follows cryoSPARC's mesh layout (docs/algorithms.md §2.2) so meshes can be exchanged.
"""
from __future__ import annotations

import itertools
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..atomic import atomic_path, write_text
from ..errors import InputError
from ..fourier import lowpass_volume
from .mesh_config import MeshConfig  # the defaults, declared once

__all__ = ["Mesh", "auto_mask", "build_mesh", "parse_fuse_list", "load_mesh", "save_mesh", "write_mesh_pdb",
           "rasterize_weights", "mesh_from_dict"]

MESH_VERSION = 1
# the 6 axis orders of the Freudenthal split; tet t of a cube follows PERMS[t]
PERMS = list(itertools.permutations(range(3)))


@dataclass
class Mesh:
    """Vertices (V, 3) xyz voxel units from the box centre, cells (C, 4), per-cell weights and segments."""

    N: int
    psize_A: float
    cells_across: int
    points: np.ndarray
    cells: np.ndarray
    rweights: np.ndarray
    cell_cube: np.ndarray  # (C, 3) integer cube coordinates (ix, iy, iz) of each cell
    cell_perm: np.ndarray  # (C,) Freudenthal permutation index of each cell
    cell_segment: np.ndarray  # (C,) segment label (0 when no segmentation)
    mask: np.ndarray
    mask_soft: np.ndarray
    map_r: np.ndarray
    segmask: np.ndarray | None = None
    segfuses: list[tuple[int, int]] = field(default_factory=list)
    rigid_segments: list[int] = field(default_factory=list)

    @property
    def cube_size(self) -> float:
        """Edge of one cube in voxels of the mesh box."""
        return self.N / self.cells_across

    def rest_edges(self) -> np.ndarray:
        """Edge matrices Dm (C, 3, 3) in Å, columns p1−p0, p2−p0, p3−p0."""
        p = self.points[self.cells] * self.psize_A  # (C, 4, 3)
        return np.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]], -1)

    def tetraidx_map(self) -> np.ndarray:
        """N³ map [z, y, x] of the cell index per voxel, −1 outside the mesh."""
        cell, _, _ = rasterize_weights(self, self.N)
        out = np.full(self.N ** 3, -1, dtype=np.int64)
        vox, c = cell
        out[vox] = c
        return out.reshape(self.N, self.N, self.N)


def auto_mask(volume: np.ndarray, apix: float, lowpass_A: float = MeshConfig.mask_lowpass,
              threshold: float | None = None, threshold_fraction: float = 0.05, dilate_A: float = MeshConfig.mask_dilate,
              pad_A: float = MeshConfig.mask_pad) -> tuple[np.ndarray, np.ndarray]:
    """Solvent mask from a map: low-pass, threshold, dilate, soft pad. Returns (hard, soft).

    `threshold` is absolute (cryoSPARC's `mask_in_threshold_level`); when None, `threshold_fraction` of the
    low-passed map's maximum is used, which does not depend on the map's arbitrary scale.
    """
    lp = lowpass_volume(torch.as_tensor(volume, dtype=torch.float32), lowpass_A, apix, order=4).numpy()
    thr = threshold if threshold is not None else threshold_fraction * float(lp.max())
    hard = lp > thr
    if not hard.any():
        raise InputError(f"mask threshold {thr:.4g} leaves no voxel of the map; lower the threshold")
    lab, n = ndimage.label(hard)
    if n > 1:  # keep components that hold at least 1 % of the masked volume (drop specks)
        sizes = ndimage.sum(hard, lab, range(1, n + 1))
        hard = np.isin(lab, 1 + np.nonzero(sizes >= 0.01 * sizes.sum())[0])
    it = max(0, int(round(dilate_A / apix)))
    if it:
        hard = ndimage.binary_dilation(hard, iterations=it)
    pad_px = max(1.0, pad_A / apix)
    dist = ndimage.distance_transform_edt(~hard)
    soft = np.where(hard, 1.0, np.where(dist <= pad_px, 0.5 * (1 + np.cos(np.pi * dist / pad_px)), 0.0))
    return hard, soft.astype(np.float32)


def parse_fuse_list(text: str | None, segments: list[int]) -> list[tuple[int, int]]:
    """'0>3, 0>4, 3>2' → [(0, 3), (0, 4), (3, 2)]; checks it is a tree listed root first, breadth-first."""
    if not text:
        return []
    pairs = []
    for tok in text.replace(";", ",").split(","):
        tok = tok.strip()
        if not tok:
            continue
        if ">" not in tok:
            raise InputError(f"fuse list item '{tok}' must look like 'parent>child'")
        a, b = (int(s) for s in tok.split(">"))
        for s in (a, b):
            if s not in segments:
                raise InputError(f"fuse list names segment {s}, which is not in the segmentation {segments}")
        pairs.append((a, b))
    seen = {pairs[0][0]}
    for a, b in pairs:
        if a not in seen:
            raise InputError(f"fuse list must be breadth-first from the root: parent {a} of '{a}>{b}' "
                             "is not yet in the tree")
        if b in seen:
            raise InputError(f"fuse list is not a tree: segment {b} is reached twice")
        seen.add(b)
    return pairs


def build_mesh(volume: np.ndarray, apix: float, mask: np.ndarray | None = None, cells: int = MeshConfig.cells,
               rigidity_min: float = MeshConfig.rigidity_min, stiffen_low_density: bool = MeshConfig.stiffen_low_density,
               segmentation: np.ndarray | None = None,
               fuse_list: str | None = None, rigid_list: str | None = None,
               mask_soft: np.ndarray | None = None, **mask_kw) -> Mesh:
    """Regular tetrahedral mesh over the masked region of `volume` (see module docstring)."""
    n = volume.shape[-1]
    if cells < 2 or cells > n:
        raise InputError(f"--cells must be between 2 and the box size {n}, got {cells}")
    if not 0 < rigidity_min <= 1:
        raise InputError(f"rigidity minimum must be in (0, 1], got {rigidity_min}")
    if mask is None:
        mask, mask_soft = auto_mask(volume, apix, **mask_kw)
    else:
        if mask.shape != volume.shape:
            raise InputError(f"mask shape {mask.shape} differs from volume shape {volume.shape}")
        mask_soft = mask.astype(np.float32) if mask_soft is None else mask_soft
        mask = mask > 0.5
    if not mask.any():
        raise InputError("the mask is empty: nothing to mesh")
    cs = n / cells
    idx = np.arange(n) - n // 2
    # cube coordinate of each voxel centre (vertex grid starts at -n/2)
    cube_of = np.clip(np.floor((idx + n / 2) / cs).astype(int), 0, cells - 1)
    zz, yy, xx = np.nonzero(mask)
    seg_labels = [0]
    if segmentation is not None:
        if segmentation.shape != volume.shape:
            raise InputError(f"segmentation shape {segmentation.shape} differs from volume shape {volume.shape}")
        segmentation = np.rint(segmentation).astype(np.int64)
        seg_labels = sorted(int(s) for s in np.unique(segmentation[mask]) if s > 0)
        if not seg_labels:
            raise InputError("the segmentation has no labelled voxel inside the mask")
    # which cubes are kept, and their segment (majority label of the masked voxels in the cube)
    cube_key = (cube_of[xx] * cells + cube_of[yy]) * cells + cube_of[zz]
    if segmentation is not None:
        lab = segmentation[zz, yy, xx]
        keep = lab > 0
        cube_key, lab = cube_key[keep], lab[keep]
        combo = cube_key * (max(seg_labels) + 1) + lab
        uniq, counts = np.unique(combo, return_counts=True)
        ck, cl = uniq // (max(seg_labels) + 1), uniq % (max(seg_labels) + 1)
        order = np.lexsort((-counts, ck))
        ck, cl = ck[order], cl[order]
        first = np.r_[True, ck[1:] != ck[:-1]]
        cubes, cube_seg = ck[first], cl[first]
    else:
        cubes = np.unique(cube_key)
        cube_seg = np.zeros(len(cubes), dtype=np.int64)
    cix = cubes // (cells * cells)
    ciy = (cubes // cells) % cells
    ciz = cubes % cells
    # vertices: one per (segment, grid corner); fused segments share corner vertices (union-find)
    fuses = parse_fuse_list(fuse_list, seg_labels) if segmentation is not None else []
    parent = {s: s for s in seg_labels}

    def root(s):
        while parent[s] != s:
            s = parent[s]
        return s
    for a, b in fuses:
        parent[root(b)] = root(a)
    corner_id: dict[tuple[int, int, int, int], int] = {}
    pts: list[list[float]] = []
    cells_out, cube_out, perm_out, seg_out = [], [], [], []
    for x0, y0, z0, s in zip(cix, ciy, ciz, cube_seg):
        r = root(int(s))
        for t, perm in enumerate(PERMS):
            corner = [x0, y0, z0]
            verts = []
            for step in range(4):
                if step:
                    corner[perm[step - 1]] += 1
                key = (r, corner[0], corner[1], corner[2])
                vid = corner_id.get(key)
                if vid is None:
                    vid = len(pts)
                    corner_id[key] = vid
                    pts.append([c * cs - n / 2 for c in corner])
                verts.append(vid)
            cells_out.append(verts)
            cube_out.append((x0, y0, z0))
            perm_out.append(t)
            seg_out.append(int(s))
    mesh = Mesh(N=n, psize_A=apix, cells_across=cells, points=np.asarray(pts, dtype=np.float64),
                cells=np.asarray(cells_out, dtype=np.int64), rweights=np.ones(len(cells_out)),
                cell_cube=np.asarray(cube_out, dtype=np.int64), cell_perm=np.asarray(perm_out, dtype=np.int64),
                cell_segment=np.asarray(seg_out, dtype=np.int64), mask=mask, mask_soft=mask_soft,
                map_r=volume.astype(np.float32), segmask=segmentation, segfuses=fuses)
    mesh.rweights = _rigidity_weights(mesh, volume, rigidity_min, stiffen_low_density)
    if rigid_list:
        rigid = [int(s) for s in rigid_list.replace(";", ",").split(",") if s.strip()]
        bad = [s for s in rigid if s not in seg_labels]
        if segmentation is None or bad:
            raise InputError(f"rigid segments {bad or rigid} are not in the segmentation")
        mesh.rigid_segments = rigid
        mesh.rweights[np.isin(mesh.cell_segment, rigid)] = 20.0
    return mesh


def _rigidity_weights(mesh: Mesh, volume: np.ndarray, rmin: float, stiffen: bool) -> np.ndarray:
    """1.0 in the densest cells, falling linearly to `rmin` in empty ones (mean density per cell)."""
    (vox, cell), _, _ = rasterize_weights(mesh, mesh.N)
    lp = lowpass_volume(torch.as_tensor(volume, dtype=torch.float32), 8.0, mesh.psize_A, order=4).numpy().ravel()
    s = np.bincount(cell, weights=np.clip(lp[vox], 0, None), minlength=len(mesh.cells))
    c = np.bincount(cell, minlength=len(mesh.cells))
    dens = s / np.maximum(c, 1)
    top = np.percentile(dens[c > 0], 95) if (c > 0).any() else 1.0
    frac = np.clip(dens / max(top, 1e-12), 0, 1)
    w = rmin + (1 - rmin) * frac
    if stiffen:  # peripheral, non-empty cells get 3.0 (cryoSPARC's rigidity_penalty_stiffen_low_density)
        w = np.where((frac > 0.02) & (frac < 0.3), 3.0, w)
    return w


def rasterize_weights(mesh: Mesh, m: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    """For a grid of box m (same physical extent), the voxels inside the mesh and their interpolation.

    Returns ((voxel flat indices [z,y,x], cell index per voxel), vertex ids (nvox, 4), barycentric (nvox, 4)).
    """
    n, cells = mesh.N, mesh.cells_across
    cs = n / cells
    lut = np.full((cells, cells, cells, len(PERMS)), -1, dtype=np.int64)
    cc = mesh.cell_cube
    lut[cc[:, 0], cc[:, 1], cc[:, 2], mesh.cell_perm] = np.arange(len(mesh.cells))
    code_to_perm = np.full(27, -1, dtype=np.int64)
    for i, p in enumerate(PERMS):
        code_to_perm[p[0] * 9 + p[1] * 3 + p[2]] = i
    # voxel centres of the m-grid in mesh-box voxel units relative to the centre
    g = (np.arange(m) - m // 2) * (n / m)
    f = (g + n / 2) / cs  # in cube units
    ci = np.floor(f).astype(int)
    inside1d = (ci >= 0) & (ci < cells)
    frac = f - ci
    zz, yy, xx = np.meshgrid(np.arange(m), np.arange(m), np.arange(m), indexing="ij")
    zz, yy, xx = zz.ravel(), yy.ravel(), xx.ravel()
    ok = inside1d[xx] & inside1d[yy] & inside1d[zz]
    zz, yy, xx = zz[ok], yy[ok], xx[ok]
    fr = np.stack([frac[xx], frac[yy], frac[zz]], 1)  # (nv, 3) fractional xyz
    order = np.argsort(-fr, axis=1, kind="stable")  # descending: the Freudenthal permutation
    pidx = code_to_perm[order[:, 0] * 9 + order[:, 1] * 3 + order[:, 2]]
    cell = lut[ci[xx], ci[yy], ci[zz], pidx]
    keep = cell >= 0
    cell, fr, order = cell[keep], fr[keep], order[keep]
    vox = (zz[keep] * m + yy[keep]) * m + xx[keep]
    fs = np.take_along_axis(fr, order, 1)  # sorted descending
    bary = np.stack([1 - fs[:, 0], fs[:, 0] - fs[:, 1], fs[:, 1] - fs[:, 2], fs[:, 2]], 1)
    verts = mesh.cells[cell]
    return (vox, cell), verts, bary


def save_mesh(mesh: Mesh, path: str | Path) -> None:
    """Pickle in cryoSPARC's layout plus our extra keys (cells_across, cell_cube, cell_perm)."""
    d = {
        "mask": mesh.mask, "mask_soft": mesh.mask_soft, "map_r": mesh.map_r,
        "map_r_masked": mesh.map_r * mesh.mask_soft, "N": mesh.N, "psize_A": mesh.psize_A,
        "tm_points": mesh.points, "tm_cells": mesh.cells, "tm_tetraidx_map": mesh.tetraidx_map(),
        "tm_rweights": mesh.rweights, "segmask": mesh.segmask, "segmask_exp": None,
        "segfuses": mesh.segfuses, "tm_segmask": mesh.cell_segment, "version": MESH_VERSION,
        "flexplugin": {"cells_across": mesh.cells_across, "cell_cube": mesh.cell_cube, "cell_perm": mesh.cell_perm,
                       "rigid_segments": mesh.rigid_segments, "points_units": "voxels from box centre, xyz"},
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        pickle.dump(d, fh, protocol=4)


def load_mesh(path: str | Path) -> Mesh:
    """Read a mesh pickle written by :func:`save_mesh` (other layouts: clear error)."""
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh)
    except FileNotFoundError:
        raise InputError(f"mesh file not found: {path}") from None
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read mesh {path}: {e}") from e
    return mesh_from_dict(d, str(path))


def mesh_from_dict(d: dict, path: str = "mesh") -> Mesh:
    """A Mesh from the unpickled dict of :func:`save_mesh` (checks the layout)."""
    if not isinstance(d, dict):
        raise InputError(f"{path} is not a 3D Flex mesh")
    need = ("mask", "N", "psize_A", "tm_points", "tm_cells", "tm_rweights", "version")
    missing = [k for k in need if k not in d]
    if missing:
        raise InputError(f"{path} is not a 3D Flex mesh (missing {missing})")
    extra = d.get("flexplugin")
    if extra is None:
        raise InputError(f"{path}: meshes from other programs are only supported when they use flexplugin's "
                         "regular tetra layout; rebuild it with `flexplugin flex-mesh`")
    return Mesh(N=int(d["N"]), psize_A=float(d["psize_A"]), cells_across=int(extra["cells_across"]),
                points=np.asarray(d["tm_points"]), cells=np.asarray(d["tm_cells"]),
                rweights=np.asarray(d["tm_rweights"], dtype=np.float64), cell_cube=np.asarray(extra["cell_cube"]),
                cell_perm=np.asarray(extra["cell_perm"]), cell_segment=np.asarray(d.get("tm_segmask")),
                mask=np.asarray(d["mask"]), mask_soft=np.asarray(d.get("mask_soft", d["mask"]), dtype=np.float32),
                map_r=np.asarray(d.get("map_r", np.zeros_like(d["mask"], dtype=np.float32))),
                segmask=d.get("segmask"), segfuses=list(d.get("segfuses") or []),
                rigid_segments=list(extra.get("rigid_segments", [])))


def write_mesh_pdb(mesh: Mesh, path: str | Path) -> None:
    """The mesh as a PDB for ChimeraX: one atom per vertex (Å, map origin at the box corner), CONECT edges.

    B-factors carry the mean rigidity weight of the cells around each vertex.
    """
    n = mesh.N
    xyz = (mesh.points + n // 2) * mesh.psize_A
    w = np.zeros(len(mesh.points))
    cnt = np.zeros(len(mesh.points))
    for k in range(4):
        np.add.at(w, mesh.cells[:, k], mesh.rweights)
        np.add.at(cnt, mesh.cells[:, k], 1)
    w /= np.maximum(cnt, 1)
    lines = []
    for i, (x, y, z) in enumerate(xyz):
        serial = i + 1
        lines.append(f"HETATM{serial:5d}  C   MSH A{(i // 10000) % 10000:4d}    {x:8.3f}{y:8.3f}{z:8.3f}"
                     f"  1.00{min(w[i], 999.99):6.2f}           C")
    edges = set()
    for c in mesh.cells:
        for a, b in itertools.combinations(sorted(c.tolist()), 2):
            edges.add((a, b))
    nbrs: dict[int, list[int]] = {}
    for a, b in sorted(edges):
        nbrs.setdefault(a, []).append(b)
    if len(xyz) <= 99999:
        for a, bs in nbrs.items():
            for k in range(0, len(bs), 4):
                lines.append("CONECT" + f"{a + 1:5d}" + "".join(f"{b + 1:5d}" for b in bs[k:k + 4]))
    lines.append("END")
    write_text(path, "\n".join(lines) + "\n")
