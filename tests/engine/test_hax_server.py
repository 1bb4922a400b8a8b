"""flexplugin/hax_server.py called exactly as hax's annotate-space server calls a program's server functions
(hax-em hax/viewers/annotate_space/viewer_socket/server.py): the file loaded by path as `loaded_module`, the
interface built with `_path_template` = <outdir>/decoded_map_class_{:02d}.mrc and every viewer argument as text
in `_program_loading_params`, latents read with np.loadtxt (one row → (1, K)), maps read back from
`_path_template.format(i)`, i from 1. The maps must equal the CLI's own: flex-generate --points for 3D Flex,
3dva-display's frames for 3DVA. hax itself (napari, Qt) is not installed here.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from .test_chimerax import runs  # noqa: F401  (the shared tiny 3D Flex and 3DVA runs)

SERVER_FILE = Path(__file__).resolve().parents[2] / "flexplugin" / "hax_server.py"


def _load_as_hax():
    """The module as hax loads it: from its path, under the name hax gives it."""
    spec = importlib.util.spec_from_file_location("loaded_module", SERVER_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["loaded_module"] = module
    spec.loader.exec_module(module)
    return module


def _metadata(outdir: Path, **ours: str) -> dict:
    """The viewer's metadata dict: hax's own entries plus the program's arguments, all as text."""
    return {"outdir": str(outdir), "server_functions_path": str(SERVER_FILE), "env_name": "flexplugin",
            "boxsize": "16", "chimerax_binary": "/nonexistent/chimerax", **ours}


def _decode(module, outdir: Path, z: np.ndarray, **ours: str) -> list[np.ndarray]:
    """One request: the latents written to a file and read back as the server does; the maps it wrote."""
    outdir.mkdir(parents=True, exist_ok=True)
    template = str(outdir / "decoded_map_class_{:02d}.mrc")
    iface = module.HeterogeneityProgramInterface(_path_template=template,
                                                 _program_loading_params=_metadata(outdir, **ours))
    np.savetxt(outdir / "z.txt", z)
    zz = np.loadtxt(outdir / "z.txt")
    zz = zz[None, ...] if zz.ndim == 1 else zz
    iface.decode_state_from_latent(latent=zz)
    maps = []
    for i in range(1, len(zz) + 1):
        with mrcfile.open(template.format(i)) as m:
            maps.append(np.asarray(m.data, dtype=np.float32).copy())
    return maps


def test_flex_maps_equal_flex_generate(runs, tmp_path):  # noqa: F811
    """3D Flex: hax's maps at three latent points = flex-generate --points at the same points."""
    from flexplugin.cli import main
    z = np.array([[-0.5, 0.2], [0.0, 0.0], [0.7, -0.3]])
    pts = tmp_path / "points.csv"
    np.savetxt(pts, z, delimiter=",")
    main(["flex-generate", "--model", str(runs["train"]), "--points", str(pts), "--no-atlas", "--out",
          str(tmp_path / "gen"), "--device", "cpu", "--threads", "1"])
    maps = _decode(_load_as_hax(), tmp_path / "hax", z, flex_model=str(runs["train"] / "model.pt"),
                   device="cpu")
    assert len(maps) == 3
    for i, m in enumerate(maps):
        with mrcfile.open(tmp_path / "gen" / f"vol_{i:03d}.mrc") as ref:
            np.testing.assert_allclose(m, ref.data, rtol=0, atol=1e-5 * float(np.abs(ref.data).max()))
            assert m.shape == ref.data.shape
    one = _decode(_load_as_hax(), tmp_path / "hax1", z[2], flex_model=str(runs["train"]), device="cpu")
    np.testing.assert_array_equal(one[0], maps[2])  # a single point (a 1-D loadtxt row) is map 01


@pytest.mark.parametrize("filter_res", [None, "16"])
def test_va3d_maps_equal_display_frames(runs, tmp_path, filter_res):  # noqa: F811
    """3DVA: hax's maps at 3dva-display's frame points (t along component 1, 0 elsewhere) = its frames."""
    from flexplugin.cli import main
    disp = tmp_path / "disp"
    main(["3dva-display", "--run", str(runs["va"]), "--frames", "3", "--components", "1", "--out", str(disp),
          "--device", "cpu", "--threads", "1"] + (["--filter-res", filter_res] if filter_res else []))
    t = np.asarray(json.loads((disp / "summary.json").read_text())["components"][0]["t"])
    z = np.zeros((len(t), 2))
    z[:, 1] = t
    ours = {"va3d_run": str(runs["va"])} | ({"va3d_filter_res": filter_res} if filter_res else {})
    maps = _decode(_load_as_hax(), tmp_path / "hax", z, **ours)
    for f, m in enumerate(maps):
        with mrcfile.open(disp / "component_000" / f"frame_{f:03d}.mrc") as ref:
            np.testing.assert_allclose(m, ref.data, rtol=0, atol=1e-5 * float(np.abs(ref.data).max()))
            assert ref.voxel_size.x == pytest.approx(float(mrcfile.open(
                tmp_path / "hax" / f"decoded_map_class_{f + 1:02d}.mrc").voxel_size.x))


def test_wrong_latent_width_and_missing_arguments(runs, tmp_path):  # noqa: F811
    module = _load_as_hax()
    with pytest.raises(ValueError, match="--flex_model"):
        module.HeterogeneityProgramInterface(_path_template=str(tmp_path / "m_{:02d}.mrc"),
                                             _program_loading_params=_metadata(tmp_path))
    iface = module.HeterogeneityProgramInterface(_path_template=str(tmp_path / "m_{:02d}.mrc"),
                                                 _program_loading_params=_metadata(tmp_path, va3d_run=str(runs["va"])))
    with pytest.raises(ValueError, match="K=2"):
        iface.decode_state_from_latent(np.zeros((1, 3)))


def test_arguments_for_scipion_hax(tmp_path):
    """The argument string FlexHub plugins give scipion-em-hax, and our progNames as the protocols set them."""
    from pwem.objects import FlexInfo

    import flexplugin.hax_server as hs
    from flexplugin.hax_server import annotate_space_arguments, getAnnotateSpaceArguments
    from flexplugin.protocols import FLEX_PROGNAME, VA3D_PROGNAME
    assert (hs.FLEX_PROGNAME, hs.VA3D_PROGNAME) == (FLEX_PROGNAME, VA3D_PROGNAME)

    class Particles:  # a SetOfParticlesFlex's getFlexInfo, the only call the function makes
        def __init__(self, info):
            self.info = info

        def getFlexInfo(self):
            return self.info
    info = FlexInfo(FLEX_PROGNAME)
    info.setAttr("modelPath", str(tmp_path / "model.pt"))
    info.setAttr("trainingBox", 32)
    args = getAnnotateSpaceArguments(Particles(info), gpu_id=0).split()
    assert args[args.index("--flex_model") + 1] == str(tmp_path / "model.pt")
    assert args[args.index("--server_functions_path") + 1] == str(SERVER_FILE)
    assert args[args.index("--boxsize") + 1] == "32" and args[args.index("--gpu_id") + 1] == "0"
    va = annotate_space_arguments(VA3D_PROGNAME, {"runPath": "Runs/0001/extra/run", "filterRes": 8.0, "box": 64})
    assert f"--va3d_run {Path('Runs/0001/extra/run').resolve()}" in va and "--va3d_filter_res 8" in va
    with pytest.raises(ValueError, match="not a flexplugin result"):
        annotate_space_arguments("CryoDRGN", {})
