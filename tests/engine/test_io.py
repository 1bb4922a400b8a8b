"""STAR/MRC I/O: ids, lazy stacks, RELION 3.0 files, and clear errors for bad input."""
import mrcfile
import numpy as np
import pytest
import starfile

from flexplugin.engine.errors import InputError
from flexplugin.engine.io import (
    ID_LABEL,
    check_volume_matches,
    read_mask,
    read_particles,
    read_segmentation,
    read_volume,
    write_particles_star,
    write_volume,
)


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


# ------------------------------------------------------------------------- values checked at read time (issue 13)
def test_every_rule_column_is_checked(small_flex_data, tmp_path):
    """Each column the engine uses refuses NaN, naming the column, the row and the particle id (or optics group)."""
    from flexplugin.engine.io import COLUMN_RULES
    used = ["rlnImageId", "rlnOpticsGroup", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY",
            "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift",
            "rlnCtfBfactor", "rlnCtfScalefactor", "rlnGroupScaleCorrection", "rlnVoltage", "rlnSphericalAberration",
            "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnDetectorPixelSize", "rlnMagnification", "rlnImageSize",
            "rlnRandomSubset", "rlnCtfDataArePhaseFlipped"]
    assert set(used) <= set(COLUMN_RULES)
    parts, optics = _tables(small_flex_data / "particles.star")
    ok = {"rlnOriginX": 0.0, "rlnOriginY": 0.0, "rlnCtfScalefactor": 1.0, "rlnGroupScaleCorrection": 1.0,
          "rlnDetectorPixelSize": 4.0, "rlnMagnification": 10000.0}
    for col in used:
        a, o = parts.copy(), optics.copy()
        for c, v in ok.items():  # columns the simulated file lacks
            a[c] = v
        if col in ("rlnDetectorPixelSize", "rlnMagnification") or col not in o:  # checked as particle columns
            a[col] = a[col] if col in a else o[col].iloc[0]
            o = o.drop(columns=[col]) if col in o else o
            a[col] = a[col].astype(float)
            a.loc[4, col] = np.nan
            where = "data_particles row 5 (particle id 5)" if col != "rlnImageId" else "data_particles row 5;"
        else:
            o[col] = o[col].astype(float)
            o.loc[0, col] = np.nan
            where = "data_optics row 1" + (" (optics group 1)" if col != "rlnOpticsGroup" else ";")
        a["rlnImageName"] = [f"{n.split('@')[0]}@{small_flex_data}/{n.split('@')[1]}" for n in a["rlnImageName"]]
        write_particles_star(tmp_path / "v.star", a, o)
        with pytest.raises(InputError) as e:
            read_particles(tmp_path / "v.star")
        assert f"{col} is NaN in {where}" in str(e.value), (col, str(e.value))


def test_valid_values_pass_and_become_numbers(small_flex_data, tmp_path, capsys):
    """Unknown columns may hold NaN or text; known integer columns become int64; a missing optics value is a
    WARNING line; an --apix equal to the file's is accepted."""
    def mutate(a, o):
        a["rlnClassNumber"] = 1.0
        a.loc[3, "rlnClassNumber"] = np.nan  # the last column, NaN: not a row cut short
        a["rlnMicrographName"] = "mic.mrc"
        return a, o.drop(columns=["rlnSphericalAberration"])
    p = _variant(small_flex_data, tmp_path, mutate)
    ps = read_particles(p, apix=4.0)
    assert ps.table[ID_LABEL].dtype == np.int64 and ps.table["rlnOpticsGroup"].dtype == np.int64
    assert ps.table["rlnDefocusU"].dtype == np.float64 and np.isnan(ps.table["rlnClassNumber"].iloc[3])
    assert "WARNING: " in capsys.readouterr().out
    with pytest.raises(InputError, match=r"--apix 4.1 disagrees with the pixel size 4 Å"):
        read_particles(p, apix=4.1)


def test_relion30_apix_from_magnification(small_flex_data, tmp_path):
    parts, _ = _tables(small_flex_data / "particles.star")
    parts["rlnImageName"] = [f"{n.split('@')[0]}@{small_flex_data}/{n.split('@')[1]}" for n in parts["rlnImageName"]]
    parts = parts.drop(columns=["rlnOpticsGroup"]).assign(rlnVoltage=300.0, rlnDetectorPixelSize=5.0,
                                                          rlnMagnification=12500.0)
    starfile.write(parts, tmp_path / "r30.star", overwrite=True)
    assert read_particles(tmp_path / "r30.star").apix == pytest.approx(4.0)
    assert read_particles(tmp_path / "r30.star", apix=4.0).apix == pytest.approx(4.0)
    with pytest.raises(InputError, match="rlnDetectorPixelSize x 10\\^4 / rlnMagnification"):
        read_particles(tmp_path / "r30.star", apix=2.0)


def test_volume_header_and_mode(tmp_path):
    v = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    with mrcfile.new(tmp_path / "neg.mrc") as m:
        m.set_data(v)
        m.header.cella = (-12.0, -12.0, -12.0)
    with pytest.raises(InputError, match="voxel size -1.5 x -1.5 x -1.5"):
        read_volume(tmp_path / "neg.mrc")
    with mrcfile.new(tmp_path / "zero.mrc") as m:  # an unset voxel size (0) stays allowed: it means unknown
        m.set_data(v)
    assert read_volume(tmp_path / "zero.mrc")[1] == 0.0
    with mrcfile.new(tmp_path / "c.mrc") as m:
        m.set_data((v + 1j * v).astype(np.complex64))
    with pytest.raises(InputError, match="complex values"):
        read_volume(tmp_path / "c.mrc")


def test_complex_stack(small_flex_data, tmp_path):
    with mrcfile.new(tmp_path / "c.mrcs") as m:
        m.set_data(np.ones((3, 32, 32), np.complex64))
    parts, optics = _tables(small_flex_data / "particles.star")
    parts = parts.iloc[:3].copy()
    parts["rlnImageName"] = [f"{i}@{tmp_path}/c.mrcs" for i in (1, 2, 3)]
    write_particles_star(tmp_path / "c.star", parts, optics)
    with pytest.raises(InputError, match="image stack holds complex values"):
        read_particles(tmp_path / "c.star")


def test_read_segmentation(tmp_path):
    labels = np.zeros((8, 8, 8), np.float32)
    labels[2:5, 2:5, 2:5], labels[5:7, 5:7, 5:7] = 1, 2
    write_volume(tmp_path / "seg.mrc", labels, 2.0)
    seg, apix = read_segmentation(tmp_path / "seg.mrc")
    assert seg.dtype == np.int64 and sorted(np.unique(seg).tolist()) == [0, 1, 2] and apix == pytest.approx(2.0)
    density = labels * 0.37
    write_volume(tmp_path / "density.mrc", density, 2.0)
    with pytest.raises(InputError, match=r"holds 0.37 at voxel \(x 2, y 2, z 2\).*density map"):
        read_segmentation(tmp_path / "density.mrc")
    write_volume(tmp_path / "negative.mrc", -labels, 2.0)
    with pytest.raises(InputError, match="found -2"):
        read_segmentation(tmp_path / "negative.mrc")


def test_optics_as_pairs(small_flex_data, tmp_path):
    """A single optics group written as `_label value` pairs (no loop_) reads like the one-row loop."""
    text = (small_flex_data / "particles.star").read_text()
    head, rest = text.split("data_particles", 1)
    labels = [ln.split()[0] for ln in head.splitlines() if ln.startswith("_")]
    values = next(ln for ln in head.splitlines() if ln.strip() and ln.split()[0] == "1").split()
    pairs = "data_optics\n\n" + "".join(f"{k} {v}\n" for k, v in zip(labels, values, strict=True)) + "\n\n"
    (tmp_path / "stacks").symlink_to(small_flex_data / "stacks")
    (tmp_path / "pairs.star").write_text(pairs + "data_particles" + rest)
    ps, ref = read_particles(tmp_path / "pairs.star"), read_particles(small_flex_data / "particles.star")
    assert (ps.apix, ps.box, len(ps)) == (ref.apix, ref.box, len(ref))
    assert ps.table["rlnVoltage"].tolist() == ref.table["rlnVoltage"].tolist()
