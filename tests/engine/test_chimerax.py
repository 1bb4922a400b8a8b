"""The ChimeraX scripts the commands write (flexplugin/chimerax.py), read back: every command is one ChimeraX knows
with well-formed arguments, every path exists, the series are in frame order at a level inside the maps' range,
and the mesh markers sit where mesh.pdb (engine/flex/mesh.py) puts the vertices. ChimeraX itself is not run.

The `runs` fixture (tiny 3D Flex and 3DVA runs through the CLI on the 120-particle box-32 set) is shared with
tests/engine/test_hax_server.py.
"""
from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from flexplugin.chimerax import surface_level, write_series_script

from ..helpers.files import read_map

COMMANDS = {"open", "volume", "vseries", "view", "tile", "color"}


@pytest.fixture(scope="module")
def runs(small_flex_data, tmp_path_factory) -> dict:
    """flex-mesh, flex-train (2 epochs), flex-generate, flex-reconstruct, 3dva and 3dva-display outputs."""
    from flexplugin.cli import main
    d, t = small_flex_data, tmp_path_factory.mktemp("chimerax")
    common = ["--device", "cpu", "--threads", "1"]
    main(["flex-mesh", "--volume", str(d / "consensus.mrc"), "--cells", "6", "--out", str(t / "mesh")])
    main(["flex-train", "--particles", str(d / "particles.star"), "--volume", str(d / "consensus.mrc"), "--mesh",
          str(t / "mesh" / "mesh.pkl"), "--train-box", "16", "--k", "2", "--epochs", "2", "--batch-size", "60",
          "--layers", "2", "--hidden", "16", "--out", str(t / "train"), *common])
    main(["flex-generate", "--model", str(t / "train"), "--frames", "5", "--no-atlas", "--out", str(t / "gen"),
          *common])
    main(["flex-reconstruct", "--model", str(t / "train"), "--particles", str(d / "particles.star"),
          "--iterations", "3", "--mask", str(d / "mask.mrc"), "--out", str(t / "frec"), *common])
    main(["3dva", "--particles", str(d / "particles.star"), "--mask", str(d / "mask.mrc"), "--volume",
          str(d / "consensus.mrc"), "--k", "2", "--iterations", "2", "--filter-res", "16", "--out", str(t / "va"),
          *common])
    main(["3dva-display", "--run", str(t / "va"), "--frames", "5", "--out", str(t / "disp"), *common])
    return {"data": d, **{k: t / k for k in ("mesh", "train", "gen", "frec", "va", "disp")}}


def _commands(script: Path) -> list[list[str]]:
    """The script's commands split as ChimeraX splits them; each is a known command, each quoted path exists."""
    cmds = [shlex.split(line) for line in script.read_text().splitlines() if line.strip()]
    for c in cmds:
        assert c[0] in COMMANDS, c
        for w in c[1:]:
            if w.startswith("/"):
                assert Path(w).exists(), (script, w)
    return cmds


def _check_series(script: Path, frames: list[Path], markers: Path | None) -> None:
    cmds = _commands(script)
    assert cmds[0][0] == "open" and cmds[0][-4:] == ["format", "mrc", "vseries", "true"]
    assert [Path(p) for p in cmds[0][1:-4]] == [f.resolve() for f in frames]
    assert cmds[1][:4] == ["volume", "#1", "style", "surface"] and cmds[1][4] == "level"
    level = float(cmds[1][5])
    mid = read_map(frames[len(frames) // 2])
    inside = (mid > level).mean()
    assert mid.min() < level < mid.max() and 0 < inside < 0.2, (level, inside)
    if markers is not None:
        assert ["open", str(markers.resolve())] in cmds
    assert ["vseries", "play", "#1", "loop", "true", "direction", "oscillate"] in cmds


def test_flex_generate_scripts(runs):
    gen = runs["gen"]
    scripts = sorted(gen.glob("series_*.cxc"))
    assert [s.stem for s in scripts] == ["series_00", "series_01"]
    for s in scripts:
        frames = sorted((gen / s.stem).glob("vol_*.mrc"))
        assert len(frames) == 5
        _check_series(s, frames, gen / "mesh.cmm")


def test_mesh_markers_match_mesh_pdb(runs):
    """Markers in mesh.cmm = the mesh.pdb atoms of the same mesh (flex-mesh's file), links = the cells' edges."""
    root = ET.parse(runs["gen"] / "mesh.cmm").getroot()
    assert root.tag == "marker_set"
    markers = root.findall("marker")
    xyz = np.array([[float(m.get(a)) for a in "xyz"] for m in markers])
    pdb = [ln for ln in (runs["mesh"] / "mesh.pdb").read_text().splitlines() if ln.startswith("HETATM")]
    ref = np.array([[float(ln[30:38]), float(ln[38:46]), float(ln[46:54])] for ln in pdb])
    np.testing.assert_allclose(xyz, ref, atol=2e-3)
    assert [int(m.get("id")) for m in markers] == list(range(1, len(ref) + 1))
    links = root.findall("link")
    ids = {int(m.get("id")) for m in markers}
    assert links and all(int(ln.get("id1")) in ids and int(ln.get("id2")) in ids for ln in links)


def test_gain_script(runs):
    frec = runs["frec"]
    cmds = _commands(frec / "chimerax_gain.cxc")
    assert cmds[0] == ["open", str((frec / "flex_map.mrc").resolve()), "format", "mrc"]
    assert cmds[1] == ["open", str((frec / "locres_gain.mrc").resolve()), "format", "mrc"]
    assert ["volume", "#2", "hide"] in cmds
    color = next(c for c in cmds if c[0] == "color")
    assert color[:6] == ["color", "sample", "#1", "map", "#2", "palette"] and color[7] == "range"
    assert color[6] == "blue:white:red"
    lo, hi = (float(x) for x in color[8].split(","))
    gain = np.abs(read_map(frec / "locres_gain.mrc"))  # all 0 in this tiny run (flex = noflex): the ±1 Å fallback
    expected = max(np.percentile(gain[gain > 0], 95), 0.1) if gain.any() else 1.0
    assert lo == -hi and hi == pytest.approx(expected, rel=1e-3)
    level = float(next(c for c in cmds if c[:2] == ["volume", "#1"])[5])
    flex = read_map(frec / "flex_map.mrc")
    assert flex.min() < level < flex.max()


def test_3dva_display_scripts(runs):
    disp = runs["disp"]
    comps = sorted(p for p in disp.glob("component_[0-9][0-9][0-9]") if p.is_dir())
    assert len(comps) == 2
    for c in comps:
        _check_series(disp / f"{c.name}.cxc", sorted(c.glob("frame_[0-9][0-9][0-9].mrc")), None)


def test_gain_span(tmp_path):
    """The colour range: the 95th percentile of |gain| over the voxels where the gain is set."""
    from flexplugin.chimerax import gain_span
    from flexplugin.engine.io import write_volume
    g = np.zeros((16, 16, 16), np.float32)
    g[4:12, 4:12, 4:12] = np.linspace(-4, 4, 512).reshape(8, 8, 8)  # |gain| uniform-ish on (0, 4]
    write_volume(tmp_path / "gain.mrc", g, 2.0)
    v = np.abs(g[g != 0])
    assert gain_span(tmp_path / "gain.mrc") == pytest.approx(np.percentile(v, 95))
    assert 3.5 < gain_span(tmp_path / "gain.mrc") < 4.0


def test_surface_level_on_a_ball(tmp_path):
    """A ball of density 1 in noise: the level lies between the noise and the ball."""
    rng = np.random.default_rng(0)
    g = np.linspace(-1, 1, 32)
    r = np.sqrt(sum(a ** 2 for a in np.meshgrid(g, g, g, indexing="ij")))
    vol = (r < 0.4).astype(float) + 0.05 * rng.standard_normal(r.shape)
    lev = surface_level(vol)
    assert 0.15 < lev < 0.95
    with pytest.raises(ValueError):
        write_series_script(tmp_path / "x.cxc", [], lev)
    assert re.fullmatch(r"[-0-9.e]+", f"{lev:.6g}")
