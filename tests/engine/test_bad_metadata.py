"""Bad input files: each is an `error:` line naming the problem (file, column, row), exit status 2, no traceback,
and earlier outputs in --out left byte-identical, through every command that reads such a file.

CASES is the catalogue of bad input files built from the tiny data set (120 particles, box 32): one STAR cell or
line edited as a careless user or a broken export would (a NaN defocus, text in an angle, a row cut short, an
optics group the optics table lacks, ...), RELION 3.0 files, --apix against the file, and MRC volumes, masks and
segmentations (negative voxel size, complex data, a density map as segmentation), plus the bad files that were
already refused (missing file, missing columns, a stack too short, ...) so the catalogue is complete. Each case
names the slot its file goes into: `particles` runs reconstruct, 3dva, flex-prep and flex-train; `volume`
3dva, flex-prep, flex-train and flex-mesh; `mask` reconstruct, 3dva and flex-mesh; `segmentation` flex-mesh.
A new input file format or column joins it: append (id, slot, maker, words the error line must hold).

All runs go through the CLI's `main` in one subprocess (tests/engine/test_bad_inputs.py's driver: one import of torch
instead of one per run); one also runs as `python -m flexplugin.cli`.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from ..helpers.files import snapshot
from .test_bad_inputs import _DRIVER

ROW = 6  # the data row (1-based) holding the bad cell; the simulated particle ids are 1..120, so also its id

COMMANDS = {
    "reconstruct": ["reconstruct", "--particles", "{particles}", "--mask", "{mask}", "--out", "{out}",
                    "--batch-size", "120", "--device", "cpu", "--threads", "1"],
    "3dva": ["3dva", "--particles", "{particles}", "--mask", "{mask}", "--volume", "{volume}", "--out", "{out}",
             "--k", "1", "--iterations", "1", "--filter-res", "12", "--device", "cpu", "--threads", "1"],
    "flex-prep": ["flex-prep", "--particles", "{particles}", "--volume", "{volume}", "--out", "{out}",
                  "--train-box", "16"],
    "flex-train": ["flex-train", "--particles", "{particles}", "--volume", "{volume}", "--mesh", "{mesh}",
                   "--out", "{out}", "--train-box", "16", "--epochs", "1", "--batch-size", "120", "--device", "cpu",
                   "--threads", "1"],
    "flex-mesh": ["flex-mesh", "--volume", "{volume}", "--mask", "{mask}", "--out", "{out}", "--cells", "6"],
}
SLOTS = {"particles": ["reconstruct", "3dva", "flex-prep", "flex-train"],
         "volume": ["3dva", "flex-prep", "flex-train", "flex-mesh"],
         "mask": ["reconstruct", "3dva", "flex-mesh"],
         "segmentation": ["flex-mesh"],
         "apix": ["reconstruct", "3dva"]}  # particles with an --apix option (the flex commands have none)


# ----------------------------------------------------------------------------------------- STAR text edits
def _star_lines(text: str, block: str) -> tuple[list[str], list[str], list[int]]:
    """(all lines, column names of data_<block>'s loop, line numbers of its data rows)."""
    lines = text.splitlines()
    k = lines.index(f"data_{block}") + 1
    while not lines[k].startswith("_"):
        k += 1
    cols = []
    while lines[k].startswith("_"):
        cols.append(lines[k].split()[0][1:])
        k += 1
    rows = []
    while k < len(lines) and not lines[k].startswith("data_"):
        if lines[k].strip():
            rows.append(k)
        k += 1
    return lines, cols, rows


def edit(block: str, row: int, column: str | None, value: str):
    """A maker writing particles.star with one cell of data_<block> row `row` set to `value` (as text);
    column None: value 'cut' drops the row's last two values, 'extra' appends one."""
    def make(d: dict, path: Path) -> Path:
        lines, cols, rows = _star_lines(d["star_text"], block)
        tokens = lines[rows[row - 1]].split()
        if column is not None:
            tokens[cols.index(column)] = value
        elif value == "cut":
            tokens = tokens[:-2]
        else:
            tokens.append("1")
        lines[rows[row - 1]] = "\t".join(tokens)
        path.write_text("\n".join(lines) + "\n")
        return path
    return make


def tables(mutate):
    """A maker writing `mutate(particles, optics)` (DataFrames; optics None: a RELION 3.0 single table)."""
    def make(d: dict, path: Path) -> Path:
        parts, optics = mutate(d["parts"].copy(), d["optics"].copy())
        starfile.write(parts if optics is None else {"optics": optics, "particles": parts}, path, overwrite=True)
        return path
    return make


def relion30(parts: pd.DataFrame, optics: pd.DataFrame) -> pd.DataFrame:
    """The particles as a RELION 3.0 table: optics values per particle, shifts in pixels, no optics block."""
    t = parts.merge(optics.drop(columns=["rlnOpticsGroupName", "rlnImageSize", "rlnImageDimensionality"]),
                    on="rlnOpticsGroup").drop(columns=["rlnOpticsGroup", "rlnImagePixelSize"])
    t["rlnOriginX"] = t.pop("rlnOriginXAngst") / 4.0
    t["rlnOriginY"] = t.pop("rlnOriginYAngst") / 4.0
    t["rlnDetectorPixelSize"] = 4.0  # µm; 4 µm x 10^4 / 10^4 = 4 Å/px
    t["rlnMagnification"] = 10000.0
    return t


def text(content: str):
    def make(d: dict, path: Path) -> Path:
        path.write_text(content)
        return path
    return make


def missing(d: dict, path: Path) -> Path:
    return path.with_name("does_not_exist" + path.suffix)


def stack_with_nan(d: dict, path: Path) -> Path:
    """particles.star whose row ROW points at a stack whose image holds a NaN pixel."""
    imgs = mrcfile.read(d["data"] / "stacks" / "particles_000.mrcs").copy()
    imgs[ROW - 1, 3, 4] = np.nan
    with mrcfile.new(path.with_suffix(".mrcs"), overwrite=True) as m:
        m.set_data(imgs)
    parts = d["parts"].copy()
    parts.loc[ROW - 1, "rlnImageName"] = f"{ROW:06d}@{path.with_suffix('.mrcs').name}"
    starfile.write({"optics": d["optics"], "particles": parts}, path, overwrite=True)
    return path


# ----------------------------------------------------------------------------------------- MRC makers
def mrc(kind: str):
    """A maker copying the consensus map (or the mask) with one defect: 'negative-voxel', 'complex', 'nan',
    'noncubic', 'float-segmentation' (the density map itself), 'not-mrc'."""
    def make(d: dict, path: Path) -> Path:
        src = d["data"] / ("mask.mrc" if path.name.startswith("mask") else "consensus.mrc")
        vol = mrcfile.read(src).copy()
        if kind == "not-mrc":
            path.write_text("this is not an MRC file\n")
            return path
        if kind == "complex":
            vol = (vol + 0.5j * vol).astype(np.complex64)
        if kind == "nan":
            vol[3, 4, 5] = np.nan
        if kind == "noncubic":
            vol = vol[:, :, :-2].copy()
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(vol)
            m.voxel_size = 4.0
            if kind == "negative-voxel":
                m.header.cella = (-4.0 * vol.shape[2], -4.0 * vol.shape[1], -4.0 * vol.shape[0])
        return path
    return make


def _set(column: str, value, rows=None):
    def mutate(parts, optics):
        t = parts if column in parts else optics
        t[column] = t[column].astype(object)
        t.loc[t.index if rows is None else rows, column] = value
        return parts, optics
    return mutate


def _drop(*columns):
    return lambda parts, optics: (parts.drop(columns=list(columns)), optics)


def cs_file(mutate=None):
    """A maker writing the particles as a cryoSPARC .cs file (tests/reference/test_cryosparc_cs.py), `mutate(array)`
    spoiling it; the file is bad.cs, so the CLI reads it as cryoSPARC's."""
    def make(d: dict, path: Path) -> Path:
        from ..helpers.cs_files import star_to_cs
        return star_to_cs(d["data"] / "particles.star", path.with_suffix(".cs"), mutate)
    return make


def _cs_set(field: str, value):
    def mutate(a):
        a[field][ROW - 1] = value
        return a
    return mutate


def _cs_drop(*fields):
    from numpy.lib.recfunctions import repack_fields
    return lambda a: repack_fields(a[[n for n in a.dtype.names if n not in fields]])


P = "particles"
CASES = [
    # --- silent wrong results before (an all-zero map, a Cholesky traceback, a dropped particle, a truncated id)
    ("defocus-nan", P, edit("particles", ROW, "rlnDefocusU", "nan"),
     ["bad.star", "rlnDefocusU is NaN", f"data_particles row {ROW} (particle id {ROW})", "positive"]),
    ("defocus-inf", P, edit("particles", ROW, "rlnDefocusV", "inf"), ["rlnDefocusV is inf", f"row {ROW}"]),
    ("defocus-negative", P, edit("particles", ROW, "rlnDefocusU", "-15000"),
     ["rlnDefocusU is -15000", f"row {ROW}", "positive"]),
    ("voltage-zero", P, edit("optics", 1, "rlnVoltage", "0"),
     ["rlnVoltage is 0", "data_optics row 1 (optics group 1)", "positive", "kV"]),
    ("voltage-nan", P, edit("optics", 1, "rlnVoltage", "nan"), ["rlnVoltage is NaN", "data_optics row 1"]),
    ("optics-group-missing", P, edit("particles", ROW, "rlnOpticsGroup", "3"),
     ["rlnOpticsGroup 3", f"data_particles row {ROW} (particle id {ROW})", "not in the optics table"]),
    ("row-cut-short", P, edit("particles", ROW, None, "cut"),
     [f"data_particles row {ROW} has 12 values but the table has 14 columns", "no value for rlnOpticsGroup"]),
    ("row-too-long", P, edit("particles", ROW, None, "extra"),
     [f"data_particles row {ROW} has 15 values but the table has 14 columns"]),
    ("optics-row-cut-short", P, edit("optics", 1, None, "cut"), ["data_optics row 1 has 7 values", "9 columns"]),
    ("pose-nan", P, edit("particles", ROW, "rlnAngleTilt", "nan"), ["rlnAngleTilt is NaN", f"particle id {ROW}"]),
    ("shift-nan", P, edit("particles", ROW, "rlnOriginXAngst", "NaN"), ["rlnOriginXAngst is NaN", f"row {ROW}"]),
    ("id-fraction", P, edit("particles", ROW, "rlnImageId", "1.5"),
     ["rlnImageId is 1.5", f"data_particles row {ROW}", "whole number"]),
    # --- non-numeric metadata (tracebacks before)
    ("angle-text", P, edit("particles", ROW, "rlnAngleRot", "ten"), ["rlnAngleRot holds the text 'ten'", f"row {ROW}"]),
    ("defocus-text", P, edit("particles", ROW, "rlnDefocusU", "2.1um"),
     ["rlnDefocusU holds the text '2.1um'", f"data_particles row {ROW} (particle id {ROW})"]),
    ("image-index-text", P, edit("particles", ROW, "rlnImageName", "six@stacks/particles_000.mrcs"),
     ["rlnImageName 'six@stacks/particles_000.mrcs'", f"row {ROW}", "image number"]),
    ("image-index-zero", P, edit("particles", ROW, "rlnImageName", "0@stacks/particles_000.mrcs"),
     ["rlnImageName '0@stacks/particles_000.mrcs'", f"row {ROW}", "from 1"]),
    ("optics-group-text", P, edit("particles", ROW, "rlnOpticsGroup", "one"),
     ["rlnOpticsGroup holds the text 'one'", f"row {ROW}"]),
    ("voltage-text", P, edit("optics", 1, "rlnVoltage", "300kV"), ["rlnVoltage holds the text '300kV'", "data_optics row 1"]),
    ("pixel-size-text", P, edit("optics", 1, "rlnImagePixelSize", "four"),
     ["rlnImagePixelSize holds the text 'four'", "data_optics row 1"]),
    ("image-size-zero", P, edit("optics", 1, "rlnImageSize", "0"), ["rlnImageSize is 0", "data_optics row 1"]),
    ("amplitude-contrast-one", P, edit("optics", 1, "rlnAmplitudeContrast", "1.0"),
     ["rlnAmplitudeContrast is 1", "below 1"]),
    ("phase-flipped-yes", P, edit("optics", 1, "rlnCtfDataArePhaseFlipped", "yes"),
     ["rlnCtfDataArePhaseFlipped holds the text 'yes'", "0 or 1"]),
    ("phase-flipped-two", P, edit("optics", 1, "rlnCtfDataArePhaseFlipped", "2"), ["rlnCtfDataArePhaseFlipped is 2"]),
    ("id-text", P, edit("particles", ROW, "rlnImageId", "x7"), ["rlnImageId holds the text 'x7'", f"row {ROW}"]),
    ("id-repeated", P, edit("particles", ROW, "rlnImageId", "1"), ["rlnImageId 1 appears more than once", f"row {ROW}"]),
    ("random-subset-text", P, edit("particles", ROW, "rlnRandomSubset", "A"), ["rlnRandomSubset holds the text 'A'"]),
    ("optics-group-listed-twice", P, tables(lambda a, o: (a, pd.concat([o, o]))),
     ["optics group 1 is listed more than once"]),
    ("relion30-magnification-zero", P, tables(lambda a, o: (_set("rlnMagnification", 0.0, [ROW - 1])(relion30(a, o), None)[0], None)),
     ["rlnMagnification is 0", f"row {ROW}"]),
    ("relion30-voltage-text", P, tables(lambda a, o: (_set("rlnVoltage", "high", [ROW - 1])(relion30(a, o), None)[0], None)),
     ["rlnVoltage holds the text 'high'", f"row {ROW}"]),
    # --- refused already (kept so that the catalogue is complete)
    ("particles-missing", P, missing, ["particle STAR file not found", "does_not_exist.star"]),
    ("particles-not-star", P, text("this is not a STAR file\n"), ["bad.star"]),
    ("no-image-name", P, tables(lambda a, o: (a.drop(columns=["rlnImageName"]), o)), ["no rlnImageName"]),
    ("no-poses", P, tables(lambda a, o: (a.drop(columns=["rlnAngleRot", "rlnAngleTilt"]), o)), ["3D alignment"]),
    ("no-ctf", P, tables(lambda a, o: (a.drop(columns=["rlnDefocusU", "rlnDefocusV"]), o)), ["no CTF"]),
    ("empty-table", P, tables(lambda a, o: (a.iloc[:0], o)), ["particle table is empty"]),
    ("relion30-no-pixel-size", P, tables(lambda a, o: (relion30(a, o).drop(columns=["rlnMagnification"]), None)),
     ["RELION 3.0 file without pixel size", "--apix"]),
    ("optics-no-pixel-size", P, tables(lambda a, o: (a, o.drop(columns=["rlnImagePixelSize"]))),
     ["optics table has no rlnImagePixelSize"]),
    ("pixel-sizes-differ", P, tables(lambda a, o: (a.assign(rlnOpticsGroup=[1 + i % 2 for i in range(len(a))]),
                                                   pd.concat([o, o.assign(rlnOpticsGroup=2, rlnImagePixelSize=3.0)]))),
     ["different pixel sizes"]),
    ("stack-missing", P, tables(_set("rlnImageName", "000001@/nonexistent/stack.mrcs", [ROW - 1])),
     ["image stack not found", "/nonexistent/stack.mrcs"]),
    ("stack-too-short", P, tables(_set("rlnImageName", "000999@stacks/particles_000.mrcs", [ROW - 1])),
     ["asks for image 999"]),
    ("box-mismatch", P, tables(lambda a, o: (a, o.assign(rlnImageSize=64))), ["rlnImageSize is 64", "32-px"]),
    ("nan-image", P, stack_with_nan, ["NaN or Inf values in images of particle ids", "re-extract"]),
    # --- --apix against the file
    ("apix-disagrees", "apix", edit("optics", 1, "rlnVoltage", "300"),
     ["--apix 2 disagrees with the pixel size 4 Å", "rlnImagePixelSize", "omit --apix"]),
    ("apix-negative", "apix", tables(lambda a, o: (relion30(a, o).drop(columns=["rlnMagnification"]), None)),
     ["--apix must be a positive number"]),
    # --- cryoSPARC .cs particle files (engine/cryosparc_cs.py)
    ("cs-not-cs", P, lambda d, p: text("not a cryoSPARC file\n")(d, p.with_suffix(".cs")),
     ["bad.cs", "as a cryoSPARC .cs file"]),
    ("cs-missing", P, lambda d, p: p.with_name("does_not_exist.cs"), ["cryoSPARC particle file not found"]),
    ("cs-no-blob-path", P, cs_file(_cs_drop("blob/path")), ["bad.cs", "no blob/path field"]),
    ("cs-pose-nan", P, cs_file(_cs_set("alignments3D/pose", np.nan)),
     ["bad.cs", "alignments3D/pose holds", f"row {ROW - 1} (0-based, uid"]),
    ("cs-stack-missing", P, cs_file(_cs_set("blob/path", b"stacks/missing.mrcs")),
     ["bad.cs", "stacks/missing.mrcs", f"row {ROW - 1}", "not found"]),
    ("cs-defocus-negative", P, cs_file(_cs_set("ctf/df1_A", -15000)), ["bad.cs", "rlnDefocusU is -15000", "positive"]),
    ("cs-no-alignments", P, cs_file(_cs_drop("alignments3D/pose", "alignments3D/shift")), ["3D alignment"]),
    # --- MRC volumes, masks and segmentations
    ("volume-negative-voxel", "volume", mrc("negative-voxel"), ["voxel size -4", "must be positive"]),
    ("volume-complex", "volume", mrc("complex"), ["complex values", "must be real"]),
    ("mask-negative-voxel", "mask", mrc("negative-voxel"), ["voxel size -4"]),
    ("mask-complex", "mask", mrc("complex"), ["complex values"]),
    ("volume-missing", "volume", missing, ["volume not found"]),
    ("volume-not-mrc", "volume", mrc("not-mrc"), ["cannot read volume"]),
    ("volume-nan", "volume", mrc("nan"), ["NaN or Inf"]),
    ("volume-noncubic", "volume", mrc("noncubic"), ["must be cubic"]),
    ("mask-missing", "mask", missing, ["volume not found"]),
    ("segmentation-density-map", "segmentation", mrc("float-segmentation"),
     ["segmentation labels each voxel with a whole number", "density map"]),
]
EXTRA = {"apix-disagrees": ["--apix", "2"], "apix-negative": ["--apix=-4"]}

RUNS = [(case, cmd) for case, slot, _, _ in CASES for cmd in SLOTS[slot]]


@pytest.fixture(scope="module")
def files(small_flex_data, tmp_path_factory) -> dict:
    """The tiny data set's files, a mesh for flex-train, and every case's bad file, by name."""
    from flexplugin.engine.flex.mesh import build_mesh, save_mesh
    from flexplugin.engine.io import read_volume
    d, t = small_flex_data, tmp_path_factory.mktemp("bad_metadata")
    tabs = starfile.read(d / "particles.star", always_dict=True)
    vol, apix = read_volume(d / "consensus.mrc")
    save_mesh(build_mesh(vol, apix, cells=6), t / "mesh.pkl")
    base = {"data": d, "star_text": (d / "particles.star").read_text(), "parts": tabs["particles"],
            "optics": tabs["optics"]}
    f = {"particles": str(d / "particles.star"), "volume": str(d / "consensus.mrc"), "mask": str(d / "mask.mrc"),
         "mesh": str(t / "mesh.pkl")}
    for case, slot, make, _ in CASES:
        suffix = ".star" if slot in ("particles", "apix") else ".mrc"
        name = ("mask_" if slot == "mask" else "") + case
        (t / case).mkdir()
        (t / case / "stacks").symlink_to(d / "stacks")  # relative image names resolve from the file's folder
        f[case] = str(make(base, t / case / ("bad" + suffix if slot != "mask" else name + suffix)))
    return f


def _argv(case: str, cmd: str, files: dict, out: Path) -> list[str]:
    slot = next(c[1] for c in CASES if c[0] == case)
    names = {**files, "out": str(out), "particles" if slot == "apix" else slot: files[case]}
    argv = [a.format(**names) for a in COMMANDS[cmd]] + EXTRA.get(case, [])
    if slot == "segmentation":
        argv += ["--segmentation", files[case]]
    return argv


def _earlier_outputs(out: Path) -> dict:
    """An --out folder holding an earlier run's outputs (random bytes under the names of real outputs)."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(len(str(out)))
    for name in ("map.mrc", "summary.json", "checkpoint_earlier.pt"):
        (out / name).write_bytes(rng.bytes(256))
    return snapshot(out)


@pytest.fixture(scope="module")
def results(files, tmp_path_factory) -> dict:
    """Every (case, command) through `flexplugin.cli.main` in one subprocess; per run: exit status, stderr, the
    --out folder's files before and after."""
    t = tmp_path_factory.mktemp("bad_metadata_out")
    outs = {run: t / f"{run[0]}__{run[1]}" for run in RUNS}
    before = {run: _earlier_outputs(out) for run, out in outs.items()}
    argvs = [_argv(case, cmd, files, outs[(case, cmd)]) for case, cmd in RUNS]
    r = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(argvs), capture_output=True, text=True,
                       timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = dict(zip(RUNS, json.loads(r.stdout.splitlines()[-1])))
    for run in RUNS:
        res[run]["before"], res[run]["after"] = before[run], snapshot(outs[run])
    return res


def _check(code: int, stderr: str, words: list[str]) -> None:
    """Exit status 2, no traceback, and an `error:` line holding every expected word."""
    errors = "\n".join(line for line in stderr.splitlines() if line.startswith("error:"))
    assert code == 2, (code, stderr[-3000:])
    assert "Traceback" not in stderr, stderr
    for w in words:
        assert w in errors, (w, stderr)


@pytest.mark.parametrize("case, cmd", RUNS, ids=[f"{case}-{cmd}" for case, cmd in RUNS])
def test_bad_input_file(results, case, cmd):
    """A clear error naming the problem; the earlier outputs in --out are byte-identical."""
    r = results[(case, cmd)]
    _check(r["code"], r["stderr"], next(c[3] for c in CASES if c[0] == case))
    assert {k: r["after"].get(k) for k in r["before"]} == r["before"]


@pytest.mark.parametrize("case, cmd", [("defocus-nan", "3dva")])
def test_entry_point_maps_errors_alike(files, tmp_path, case, cmd):
    """A run through `python -m flexplugin.cli` itself, as a user runs it (one process: ~5 s of importing torch;
    tests/engine/test_bad_inputs.py runs more)."""
    r = subprocess.run([sys.executable, "-m", "flexplugin.cli", *_argv(case, cmd, files, tmp_path / "out")],
                       capture_output=True, text=True, check=False)
    _check(r.returncode, r.stderr, next(c[3] for c in CASES if c[0] == case))


def test_catalogue_ids_unique():
    assert len({c[0] for c in CASES}) == len(CASES)
    assert all(re.fullmatch(r"[a-z0-9-]+", c[0]) for c in CASES)
