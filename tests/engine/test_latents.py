"""The latents file contract (flexplugin.engine.latents): one layout written, older layouts still read.

Files are written and checked as text here (not only through the module's own reader), so a change of layout
or of the id label fails a test.
"""
from __future__ import annotations

import numpy as np
import pytest

from flexplugin.engine import latents as L
from flexplugin.engine.errors import InputError


def test_written_layout_as_text(tmp_path):
    ids = np.array([9, 2, 40])
    z = np.array([[0.1, -1.25], [1e-8, 2.0], [-0.333333343, 0.5]], dtype=np.float32)
    L.write_latents(tmp_path / "latents.csv", ids, z, {"scale": np.array([1.0, 0.5, 2.0])})
    header, *rows = (tmp_path / "latents.csv").read_text().splitlines()
    assert header == "rlnImageId,z0,z1,scale"
    cells = [r.split(",") for r in rows]
    assert [int(c[0]) for c in cells] == [9, 2, 40]  # row order kept, ids as whole numbers
    np.testing.assert_array_equal(np.array([[float(c[1]), float(c[2])] for c in cells], dtype=np.float32), z)
    assert [float(c[3]) for c in cells] == [1.0, 0.5, 2.0]


def test_round_trip_and_npy(tmp_path):
    rng = np.random.default_rng(0)
    ids, z = rng.permutation(1000)[:50] + 1, rng.normal(size=(50, 3)).astype(np.float32)
    files = L.write_latents_files(tmp_path, ids, z)
    assert files == {"latents": "latents.npy", "latents_csv": "latents.csv"}
    np.testing.assert_array_equal(np.load(tmp_path / "latents.npy"), z)
    got = L.read_latents(tmp_path / "latents.csv")
    assert got.k == 3 and got.extra == {}
    np.testing.assert_array_equal(got.ids, ids)
    np.testing.assert_array_equal(got.z.astype(np.float32), z)  # float32 comes back exactly
    assert got.by_id()[int(ids[7])] == 7


@pytest.mark.parametrize("header", ["rlnImageId,rlnFlexLatent1,rlnFlexLatent2",  # flex-train, before
                                    "rlnImageId,zFlex1,zFlex2",  # the training protocol's seed files, before
                                    "rlnImageId,z0,z1,scale"])  # 3DVA (unchanged)
def test_older_layouts_are_read(tmp_path, header):
    path = tmp_path / "old.csv"
    extra = ",3.5" if "scale" in header else ""
    path.write_text(f"{header}\n5,0.5,-0.25{extra}\n3,1.5,2{extra}\n")
    got = L.read_latents(path)
    np.testing.assert_array_equal(got.ids, [5, 3])
    np.testing.assert_array_equal(got.z, [[0.5, -0.25], [1.5, 2.0]])
    assert list(got.extra) == (["scale"] if extra else [])


@pytest.mark.parametrize("text, match", [
    ("z0,z1\n0.1,0.2\n", "no rlnImageId column"),
    ("rlnImageId,z0,z2\n1,0.1,0.2\n", r"not z0..z\{K-1\}"),
    ("rlnImageId,scale\n1,0.1\n", r"not z0..z\{K-1\}"),
    ("rlnImageId,z0,rlnFlexLatent1\n1,0.1,0.2\n", "both hold coordinate 0"),
    ("rlnImageId,z0\n1,0.1\n1,0.2\n", "particle id 1 appears more than once"),
    ("rlnImageId,z0\n1.5,0.1\n", "not a whole number"),
    ("rlnImageId,z0\n1,0.1\n2,nan\n", "column z0 holds .* at particle id 2"),
    ("rlnImageId,z0\n1,0.1\n2,abc\n", "column z0 holds 'abc' at particle id 2"),
    ("", "cannot read the latents file"),
])
def test_bad_files_are_input_errors(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        L.read_latents(path)


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="latents file not found"):
        L.read_latents(tmp_path / "none.csv")
    with pytest.raises(ValueError, match="for 2 particle ids"):
        L.write_latents(tmp_path / "x.csv", [1, 2], np.zeros((3, 1)))
    with pytest.raises(ValueError, match="would read back as"):
        L.write_latents(tmp_path / "x.csv", [1], np.zeros((1, 1)), {"z1": np.zeros(1)})


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    import errno

    import pandas as pd

    from flexplugin.engine.errors import DiskFullError
    path = tmp_path / "latents.csv"
    L.write_latents(path, [1, 2], np.array([[0.5], [1.5]]))
    before = path.read_text()

    def half_written(self, target, **kwargs):  # writes part of the table, then the disk is full
        with open(target, "w") as fh:
            fh.write("rlnImageId,z0\n1,0.1\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_written)
    with pytest.raises(DiskFullError, match="latents.csv"):
        L.write_latents(path, [1, 2], np.array([[0.1], [0.2]]))
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["latents.csv"]
