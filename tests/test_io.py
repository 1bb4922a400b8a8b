"""STAR/MRC I/O: ids, lazy stacks, RELION 3.0 files, and clear errors for bad input."""
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from flexplugin.engine.errors import InputError
from flexplugin.engine.io import (check_volume_matches, read_mask, read_particles, read_volume,
                                  write_particles_star, write_volume)


def _tables(star):
    d = starfile.read(star, always_dict=True)
    return d["particles"].copy(), d["optics"].copy()


def test_reads_simulated_star(small_flex_data):
    ps = read_particles(small_flex_data / "particles.star")
    parts, optics = _tables(small_flex_data / "particles.star")
    assert len(ps) == 120 and ps.box == 32 and ps.apix == 4.0 and not ps.phase_flipped
    assert ps.ids.tolist() == list(range(1, 121))
    # images come from three stacks (50 per stack) and match the files read directly
    assert ps.table["rlnImageName"].str.split("@").str[1].nunique() == 3
    with mrcfile.open(small_flex_data / "stacks" / "particles_001.mrcs") as m:
        direct = m.data[4].copy()
    np.testing.assert_array_equal(ps.images([54])[0], direct)
    sh = ps.shifts_px([0, 1]).numpy()
    np.testing.assert_allclose(sh[:, 0], parts["rlnOriginXAngst"].to_numpy()[:2] / 4.0, rtol=1e-5)
    c = ps.ctf_params([7])
    assert float(c.defocus_u[0]) == pytest.approx(parts["rlnDefocusU"].iloc[7], rel=1e-6)
    assert float(c.voltage[0]) == 300.0
    assert set(ps.half_sets()) == {1, 2}
    np.testing.assert_array_equal(ps.half_sets(), parts["rlnRandomSubset"].to_numpy())


def test_ids_are_kept_and_subset(small_flex_data, tmp_path):
    parts, optics = _tables(small_flex_data / "particles.star")
    parts["rlnImageName"] = [f"{n.split('@')[0]}@{small_flex_data}/{n.split('@')[1]}" for n in parts["rlnImageName"]]
    parts["rlnImageId"] = np.arange(len(parts)) * 7 + 1000  # non-consecutive ids
    parts = parts.iloc[::-1]
    write_particles_star(tmp_path / "p.star", parts, optics)
    ps = read_particles(tmp_path / "p.star")
    assert ps.ids[0] == 1000 + 7 * 119
    sub = ps.subset(np.array([0, 5]))
    assert sub.ids.tolist() == [ps.ids[0], ps.ids[5]]
    np.testing.assert_array_equal(sub.images([1]), ps.images([5]))


def test_relion30_file(small_flex_data, tmp_path):
    parts, optics = _tables(small_flex_data / "particles.star")
    parts["rlnImageName"] = [f"{n.split('@')[0]}@{small_flex_data}/{n.split('@')[1]}" for n in parts["rlnImageName"]]
    parts["rlnOriginX"] = parts.pop("rlnOriginXAngst") / 4.0
    parts["rlnOriginY"] = parts.pop("rlnOriginYAngst") / 4.0
    parts["rlnVoltage"] = 300.0
    parts = parts.drop(columns=["rlnOpticsGroup", "rlnImageId"])
    starfile.write(parts, tmp_path / "r30.star", overwrite=True)
    with pytest.raises(InputError, match="pixel size"):
        read_particles(tmp_path / "r30.star")
    ps = read_particles(tmp_path / "r30.star", apix=4.0)
    ref = read_particles(small_flex_data / "particles.star")
    np.testing.assert_allclose(ps.shifts_px(slice(0, 5)).numpy(), ref.shifts_px(slice(0, 5)).numpy(), atol=1e-5)
    assert ps.ids.tolist()[:3] == [1, 2, 3]


def _variant(small_flex_data, tmp_path, mutate):
    parts, optics = _tables(small_flex_data / "particles.star")
    parts["rlnImageName"] = [f"{n.split('@')[0]}@{small_flex_data}/{n.split('@')[1]}" for n in parts["rlnImageName"]]
    parts, optics = mutate(parts, optics)
    write_particles_star(tmp_path / "v.star", parts, optics)
    return tmp_path / "v.star"


def test_missing_poses_and_ctf(small_flex_data, tmp_path):
    p = _variant(small_flex_data, tmp_path, lambda a, o: (a.drop(columns=["rlnAngleRot", "rlnAngleTilt"]), o))
    with pytest.raises(InputError, match="3D alignment"):
        read_particles(p).require()
    p = _variant(small_flex_data, tmp_path, lambda a, o: (a.drop(columns=["rlnDefocusU", "rlnDefocusV"]), o))
    with pytest.raises(InputError, match="no CTF"):
        read_particles(p).require()


def test_missing_stack_and_index_beyond_end(small_flex_data, tmp_path):
    def missing(a, o):
        a.loc[3, "rlnImageName"] = "1@/nonexistent/stack.mrcs"
        return a, o
    ps = read_particles(_variant(small_flex_data, tmp_path, missing))
    with pytest.raises(InputError, match="not found"):
        ps.check_stacks()

    def beyond(a, o):
        a.loc[3, "rlnImageName"] = a.loc[3, "rlnImageName"].replace(a.loc[3, "rlnImageName"].split("@")[0], "999")
        return a, o
    ps = read_particles(_variant(small_flex_data, tmp_path, beyond))
    with pytest.raises(InputError, match="asks for image 999"):
        ps.check_stacks()
    with pytest.raises(InputError, match="beyond the end"):
        ps.images([3])


def test_nan_images(small_flex_data, tmp_path):
    stack = np.zeros((3, 32, 32), np.float32)
    stack[1, 5, 5] = np.nan
    write_volume(tmp_path / "nan.mrcs", stack, 4.0)
    parts, optics = _tables(small_flex_data / "particles.star")
    parts = parts.iloc[:3].copy()
    parts["rlnImageName"] = [f"{i}@{tmp_path}/nan.mrcs" for i in (1, 2, 3)]
    write_particles_star(tmp_path / "n.star", parts, optics)
    ps = read_particles(tmp_path / "n.star")
    with pytest.raises(InputError, match=r"NaN or Inf values in images of particle ids \[2\]"):
        ps.images([0, 1, 2])


def test_empty_and_unparsable(tmp_path, small_flex_data):
    parts, optics = _tables(small_flex_data / "particles.star")
    write_particles_star(tmp_path / "e.star", parts.iloc[:0], optics)
    with pytest.raises(InputError, match="empty"):
        read_particles(tmp_path / "e.star")
    with pytest.raises(InputError, match="not found"):
        read_particles(tmp_path / "nope.star")


def test_box_and_pixel_size_mismatch(small_flex_data, tmp_path):
    p = _variant(small_flex_data, tmp_path, lambda a, o: (a, o.assign(rlnImageSize=64)))
    with pytest.raises(InputError, match="rlnImageSize is 64"):
        read_particles(p)
    with pytest.raises(InputError, match="40 voxels wide"):
        check_volume_matches("mask", (40, 40, 40), 4.0, 32, 4.0)
    with pytest.raises(InputError, match="pixel size 3.0000"):
        check_volume_matches("consensus volume", (32, 32, 32), 3.0, 32, 4.0)


def test_volumes(tmp_path):
    write_volume(tmp_path / "v.mrc", np.ones((8, 8, 10), np.float32), 1.5)
    with pytest.raises(InputError, match="cubic"):
        read_volume(tmp_path / "v.mrc")
    v = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    write_volume(tmp_path / "ok.mrc", v, 1.5)
    back, apix = read_volume(tmp_path / "ok.mrc")
    np.testing.assert_array_equal(back, v)
    assert apix == pytest.approx(1.5)
    write_volume(tmp_path / "m.mrc", v * 3, 1.5)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        read_mask(tmp_path / "m.mrc")
    v[0, 0, 0] = np.inf
    write_volume(tmp_path / "inf.mrc", v, 1.5)
    with pytest.raises(InputError, match="NaN or Inf"):
        read_volume(tmp_path / "inf.mrc")
