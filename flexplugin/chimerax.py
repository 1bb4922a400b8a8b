"""ChimeraX command scripts (.cxc) and marker files (.cmm) written beside the maps the commands generate.

Pure writers (arrays and paths in, text files out) used by the CLI: flex-generate and 3dva-display write one
script per volume series (the maps opened as a volume series at one surface level, playing back and forth; for
3D Flex the mesh as markers, `mesh.cmm`), flex-reconstruct a script colouring the flex map by the local
resolution gain. Paths in the scripts are absolute, so a script opens from any folder (`chimerax series_00.cxc`,
or `open series_00.cxc` in ChimeraX).

The surface level is taken from the map's statistics (`surface_level`): mean + 3 standard deviations, kept
between the 90th and 99.5th percentiles of the voxel values, one level for the whole series so the motion is not
mistaken for a change of level. Coordinates follow ChimeraX's reading of our MRC files (origin 0: voxel i at
i × pixel size Å), the frame of `mesh.pdb` (engine/flex/mesh.py write_mesh_pdb).
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .engine.atomic import atomic_path

__all__ = ["MESH_CMM", "gain_span", "mesh_markers", "surface_level", "write_display_scripts", "write_gain_script",
           "write_maps_script",
           "write_marker_file", "write_series_script"]

MESH_CMM = "mesh.cmm"


def surface_level(vol: np.ndarray) -> float:
    """A surface threshold for a density map: mean + 3σ of its voxels, clipped to their [90, 99.5] percentiles."""
    if hasattr(vol, "detach"):  # a torch tensor, on any device
        vol = vol.detach().cpu().numpy()
    v = np.asarray(vol, dtype=np.float64).ravel()
    lo, hi = np.percentile(v, [90.0, 99.5])
    return float(np.clip(v.mean() + 3.0 * v.std(), lo, hi))


def _q(path: str | os.PathLike) -> str:
    """An absolute path quoted for a ChimeraX command."""
    return f'"{Path(path).resolve()}"'


def _write(path: str | os.PathLike, lines: list[str]) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return Path(path)


def mesh_markers(mesh) -> tuple[np.ndarray, np.ndarray]:
    """A 3D Flex mesh (engine/flex/mesh.py Mesh) as marker positions (V, 3) in Å, origin at the box corner as
    in mesh.pdb, and its edges (E, 2) as 0-based vertex pairs."""
    xyz = (np.asarray(mesh.points, dtype=np.float64) + mesh.N // 2) * mesh.psize_A
    edges = {tuple(e) for c in np.asarray(mesh.cells) for e in itertools.combinations(sorted(c.tolist()), 2)}
    return xyz, np.array(sorted(edges), dtype=np.int64).reshape(-1, 2)


def write_marker_file(path: str | os.PathLike, xyz: np.ndarray, edges: np.ndarray | None = None,
                      radius: float = 1.0, name: str = "mesh") -> Path:
    """A ChimeraX marker file (.cmm): one marker per point (Å), a link per edge (ids are 1-based rows)."""
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    lines = [f'<marker_set name="{name}">']
    lines += [f'<marker id="{i + 1}" x="{x:.3f}" y="{y:.3f}" z="{z:.3f}" r="1" g="0.55" b="0" radius="{radius:g}"/>'
              for i, (x, y, z) in enumerate(xyz)]
    for a, b in (np.asarray(edges, dtype=np.int64).reshape(-1, 2) if edges is not None else []):
        lines.append(f'<link id1="{a + 1}" id2="{b + 1}" r="1" g="0.8" b="0.4" radius="{radius / 4:g}"/>')
    lines.append("</marker_set>")
    return _write(path, lines)


def write_series_script(path: str | os.PathLike, volumes: Sequence[str | os.PathLike], level: float,
                        markers: str | os.PathLike | None = None) -> Path:
    """A .cxc opening `volumes` as one volume series (#1) at surface `level`, playing back and forth, with the
    marker file `markers` (#2) when given."""
    if not volumes:
        raise ValueError("a volume series needs at least one map")
    lines = ["open " + " ".join(_q(v) for v in volumes) + " format mrc vseries true",
             f"volume #1 style surface level {level:.6g}"]
    if markers is not None:
        lines.append(f"open {_q(markers)}")
    lines += ["vseries play #1 loop true direction oscillate", "view"]
    return _write(path, lines)


def write_maps_script(path: str | os.PathLike, maps: Sequence[str | os.PathLike],
                      levels: Sequence[float]) -> Path:
    """A .cxc opening maps side by side (#1, #2, ...), each at its surface level."""
    lines = []
    for i, (m, lev) in enumerate(zip(maps, levels, strict=True), 1):
        lines += [f"open {_q(m)} format mrc", f"volume #{i} style surface level {lev:.6g}"]
    if len(maps) > 1:
        lines.append("tile")
    lines.append("view")
    return _write(path, lines)


def gain_span(gain_file: str | os.PathLike) -> float:
    """The colour range (± Å) for a local resolution gain map: the 95th percentile of |gain| where it is set."""
    import mrcfile
    with mrcfile.open(gain_file, permissive=True) as m:
        g = np.abs(np.asarray(m.data, dtype=np.float64))
    g = g[np.isfinite(g) & (g > 0)]
    return float(np.percentile(g, 95)) if len(g) else 1.0


def write_gain_script(path: str | os.PathLike, map_file: str | os.PathLike, gain_file: str | os.PathLike,
                      level: float, span: float) -> Path:
    """A .cxc showing `map_file`'s surface at `level` coloured by the local resolution gain map (blue −span, white
    0, red +span Å: red where the flex map is sharper); the gain map itself hidden."""
    span = max(float(span), 0.1)
    return _write(path, [f"open {_q(map_file)} format mrc", f"open {_q(gain_file)} format mrc",
                         f"volume #1 style surface level {level:.6g}", "volume #2 hide",
                         f"color sample #1 map #2 palette blue:white:red range {-span:.4g},{span:.4g}", "view"])


def _read_map(path: Path) -> np.ndarray:
    import mrcfile
    with mrcfile.open(path, permissive=True) as m:
        return np.asarray(m.data, dtype=np.float32)


def write_display_scripts(out: str | os.PathLike) -> list[Path]:
    """The scripts of a 3dva-display folder: component_NNN.cxc per series (component_NNN/frame_*.mrc, the level
    from the middle frame) and clusters.cxc for cluster_*.mrc; returns the scripts written."""
    out = Path(out)
    scripts = []
    for folder in sorted(p for p in out.glob("component_[0-9][0-9][0-9]") if p.is_dir()):
        frames = sorted(folder.glob("frame_[0-9][0-9][0-9].mrc"))
        if frames:
            level = surface_level(_read_map(frames[len(frames) // 2]))
            scripts.append(write_series_script(out / f"{folder.name}.cxc", frames, level))
    clusters = sorted(out.glob("cluster_[0-9][0-9][0-9].mrc"))
    if clusters:
        scripts.append(write_maps_script(out / "clusters.cxc", clusters,
                                         [surface_level(_read_map(c)) for c in clusters]))
    return scripts
