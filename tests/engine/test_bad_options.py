"""Bad options, output folders and model files across all nine commands: each gives an `error:` line naming the
problem and exit status 2 (3 for a full disk), no traceback, and leaves earlier outputs byte-identical.

CASES is the catalogue (flex-train's own input catalogue is tests/engine/test_bad_inputs.py). Each case is (id, command,
extra arguments, words the error line must hold, where --out points):

* "copy" (default): a copy of that command's finished output folder, which must come back byte-identical
  (so a refused `--atlas-axes 0,5` wrote no series, a refused rerun deleted nothing);
* "fresh": a folder that does not exist yet, which a refused job must not leave behind;
* "file", "under-file", "ro", "ro-new", "locked": an --out that is a file, lies under a file, is an existing
  folder on a read-only filesystem (a tmpfs mounted read-only; skipped without mount rights), a folder to be
  made there, or a folder another job holds locked.

Arguments may name {sim} (the small simulated set), {good} (the finished outputs), {t} (scratch files).
New commands and options join the catalogue: one case per meaningless value.

A driver runs the good pipeline and then every case through `flexplugin.cli.main` in one subprocess (one torch
import instead of one per case). The tests after the catalogue check the lock, the manifest of a rerun and the
image paths of the STAR outputs.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexplugin.engine.outdir import LOCK_NAME, MANIFEST_NAME

from ..helpers.files import snapshot

EXIT_INPUT, EXIT_DISK_FULL = 2, 3

# a good invocation of each command, without --out; {good}/<OUT_OF[command]> holds its finished outputs
BASE = {
    "simulate": ["simulate", "--n", "20", "--box", "16", "--apix", "4", "--seed", "2"],
    "reconstruct": ["reconstruct", "--particles", "{sim}/particles.star", "--device", "cpu", "--threads", "1"],
    "flex-prep": ["flex-prep", "--particles", "{sim}/particles.star", "--volume", "{sim}/consensus.mrc",
                  "--train-box", "16"],
    "flex-mesh": ["flex-mesh", "--volume", "{sim}/consensus.mrc", "--cells", "6"],
    "flex-train": ["flex-train", "--particles", "{sim}/particles.star", "--volume", "{sim}/consensus.mrc", "--mesh",
                   "{good}/mesh/mesh.pkl", "--train-box", "16", "--epochs", "1", "--batch-size", "60", "--layers",
                   "2", "--hidden", "16", "--device", "cpu", "--threads", "1"],
    "flex-generate": ["flex-generate", "--model", "{good}/train", "--frames", "3", "--atlas-grid", "2", "--device",
                      "cpu"],
    "flex-reconstruct": ["flex-reconstruct", "--model", "{good}/train", "--particles", "{sim}/particles.star",
                         "--iterations", "2", "--no-noflex", "--device", "cpu"],
    "3dva": ["3dva", "--particles", "{sim}/particles.star", "--mask", "{sim}/mask.mrc", "--volume",
             "{sim}/consensus.mrc", "--k", "2", "--iterations", "2", "--filter-res", "16", "--device", "cpu"],
    "3dva-display": ["3dva-display", "--run", "{good}/va", "--frames", "3", "--device", "cpu"],
}
OUT_OF = {"simulate": "simulate", "reconstruct": "rec", "flex-prep": "prep", "flex-mesh": "mesh", "flex-train": "train",
          "flex-generate": "gen", "flex-reconstruct": "frec", "3dva": "va", "3dva-display": "clus"}
GOOD_EXTRA = {"3dva-display": ["--mode", "cluster"]}  # the finished display is a cluster one (STAR subsets)

_FOLDER_CASES = [  # every command: an --out that cannot be used
    (kind, words) for kind, words in (
        ("file", ["--out", "is a file, not a folder"]),
        ("under-file", ["--out", "lies under", "which is a file"]),
        ("ro", ["cannot write into the output folder", "read-only"]),
        ("locked", ["is in use by another flexplugin job", "pid", "on host", LOCK_NAME]),
    )
]

CASES = [(f"{cmd}-out-{kind}", cmd, [], words, kind) for cmd in BASE for kind, words in _FOLDER_CASES] + [
    ("simulate-out-ro-new", "simulate", [], ["cannot create the output folder", "read-only"], "ro-new"),
    ("3dva-out-ro-new", "3dva", [], ["cannot create the output folder", "read-only"], "ro-new"),
    # --- options every command shares (cli.run, cli.resolve_device)
    ("reconstruct-threads-negative", "reconstruct", ["--threads", "-1"], ["--threads", ">= 0", "got -1"], "fresh"),
    ("flex-generate-threads-negative", "flex-generate", ["--threads", "-1"], ["--threads", "got -1"], "copy"),
    ("3dva-device-mps", "3dva", ["--device", "mps"], ["--device 'mps'", "not supported", "cpu"], "copy"),
    ("flex-train-device-meta", "flex-train", ["--device", "meta"], ["--device 'meta'", "not supported"], "fresh"),
    ("reconstruct-device-text", "reconstruct", ["--device", "gpu7"], ["--device 'gpu7'", "not a device"], "copy"),
    ("reconstruct-seed-negative", "reconstruct", ["--seed", "-1"], ["--seed", "got -1"], "copy"),
    ("3dva-display-seed-negative", "3dva-display", ["--seed", "-3"], ["--seed", "got -3"], "copy"),
    ("simulate-apix-nan", "simulate", ["--apix", "nan"], ["--apix", "finite number", "got nan"], "fresh"),
    ("simulate-hinge-inf", "simulate", ["--hinge", "inf"], ["--hinge", "finite number", "got inf"], "copy"),
    ("simulate-n-zero", "simulate", ["--n", "0"], ["need n >= 2"], "copy"),
    ("simulate-noise-seed-negative", "simulate", ["--noise-seed", "-1"], ["--noise-seed", ">= 0", "got -1"], "copy"),
    ("reconstruct-batch-size-zero", "reconstruct", ["--batch-size", "0"], ["--batch-size", "at least 1"], "copy"),
    ("reconstruct-pad-zero", "reconstruct", ["--pad", "0"], ["--pad", "at least 1", "got 0"], "copy"),
    ("flex-mesh-out-empty", "flex-mesh", ["--out", ""], ["--out is empty"], "fresh"),
    ("reconstruct-missing-particles", "reconstruct", ["--particles", "{t}/missing.star"],
     ["particle STAR file not found", "missing.star"], "copy"),
    # --- flex-prep
    ("flex-prep-num-particles-negative", "flex-prep", ["--num-particles", "-5"], ["--num-particles", "got -5"], "copy"),
    ("flex-prep-num-particles-zero", "flex-prep", ["--num-particles", "0"], ["--num-particles", "at least 1"], "fresh"),
    ("flex-prep-num-particles-too-many", "flex-prep", ["--num-particles", "1000"], ["--num-particles 1000", "exceeds"],
     "copy"),
    ("flex-prep-crop-zero", "flex-prep", ["--crop", "0"], ["--crop", "got 0"], "copy"),
    ("flex-prep-train-box-odd", "flex-prep", ["--train-box", "15"], ["training box must be even", "15"], "copy"),
    ("flex-prep-volume-blank", "flex-prep", ["--volume", "{t}/zeros.mrc"], ["zeros.mrc", "same value (0)"], "copy"),
    # --- flex-mesh
    ("flex-mesh-rigid-text", "flex-mesh", ["--rigid", "a,b"], ["--rigid 'a,b'", "whole numbers"], "copy"),
    ("flex-mesh-fuse-syntax", "flex-mesh", ["--fuse", "1>>x"], ["--fuse item '1>>x'", "parent>child"], "copy"),
    ("flex-mesh-fuse-no-segmentation", "flex-mesh", ["--fuse", "1>2"], ["--fuse", "need --segmentation"], "copy"),
    ("flex-mesh-cells-zero", "flex-mesh", ["--cells", "0"], ["--cells", "got 0"], "copy"),
    ("flex-mesh-mask-lowpass-zero", "flex-mesh", ["--mask-lowpass", "0"], ["--mask-lowpass", "> 0"], "copy"),
    ("flex-mesh-mask-dilate-negative", "flex-mesh", ["--mask-dilate", "-5"], ["--mask-dilate", ">= 0"], "copy"),
    ("flex-mesh-mask-pad-nan", "flex-mesh", ["--mask-pad", "nan"], ["--mask-pad", "finite"], "copy"),
    ("flex-mesh-volume-blank", "flex-mesh", ["--volume", "{t}/zeros.mrc"], ["zeros.mrc", "every voxel"], "fresh"),
    # --- flex-train (its full catalogue: tests/engine/test_bad_inputs.py)
    ("flex-train-init-idxs-text", "flex-train", ["--init-latents", "{good}/va/latents.csv", "--init-idxs", "a,b"],
     ["--init-idxs", "'a,b'"], "fresh"),
    ("flex-train-k3-3dva-scale", "flex-train", ["--k", "3", "--init-latents", "{good}/va/latents.csv"],
     ["latents.csv", "--k 3"], "fresh"),
    ("flex-train-volume-blank", "flex-train", ["--volume", "{t}/zeros.mrc"], ["zeros.mrc", "every voxel"], "fresh"),
    ("flex-train-scratch-file", "flex-train", ["--scratch", "{t}/zeros.mrc"],
     ["--scratch", "zeros.mrc", "is a file, not a folder"], "fresh"),
    ("flex-train-scratch-under-file", "flex-train", ["--scratch", "{t}/zeros.mrc/cache"],
     ["--scratch", "cannot create the scratch folder"], "fresh"),
    ("flex-train-scratch-empty", "flex-train", ["--scratch", " "], ["--scratch is empty"], "fresh"),
    ("flex-train-workers-negative", "flex-train", ["--workers", "-1"], ["--workers", ">= 0", "got -1"], "fresh"),
    # --- flex-generate: options, points, model files, memory
    ("flex-generate-box-text", "flex-generate", ["--box", "abc"], ["--box 'abc'", "'train', 'full' or a number"],
     "copy"),
    ("flex-generate-box-zero", "flex-generate", ["--box", "0"], ["--box", ">= 16", "got 0"], "copy"),
    ("flex-generate-box-odd", "flex-generate", ["--box", "15"], ["--box", "even", "got 15"], "copy"),
    ("flex-generate-box-huge", "flex-generate", ["--box", "4000"], ["--box 4000", "GiB", "smaller --box"], "copy"),
    ("flex-generate-frames-one", "flex-generate", ["--frames", "1"], ["--frames", "at least 2"], "copy"),
    ("flex-generate-percentile-negative", "flex-generate", ["--percentile", "-5"], ["--percentile", "got -5"], "copy"),
    ("flex-generate-percentile-reversed", "flex-generate", ["--percentile", "60"], ["--percentile", "reverses"],
     "copy"),
    ("flex-generate-atlas-grid-zero", "flex-generate", ["--atlas-grid", "0"], ["--atlas-grid", "got 0"], "copy"),
    ("flex-generate-atlas-axes-text", "flex-generate", ["--atlas-axes", "x,y"], ["--atlas-axes 'x,y'", "whole numbers"],
     "copy"),
    ("flex-generate-atlas-axes-same", "flex-generate", ["--atlas-axes", "0,0"], ["--atlas-axes", "two different"],
     "copy"),
    ("flex-generate-atlas-axes-one", "flex-generate", ["--atlas-axes", "1"], ["--atlas-axes", "two different"], "copy"),
    ("flex-generate-atlas-axes-out-of-range", "flex-generate", ["--atlas-axes", "0,5"], ["--atlas-axes 0,5", "K=2"],
     "fresh"),  # refused before any series is written
    ("flex-generate-from-particles-text", "flex-generate", ["--from-particles", "abc"],
     ["--from-particles 'abc'", "neither a file"], "copy"),
    ("flex-generate-from-particles-missing-file", "flex-generate", ["--from-particles", "{t}/ids.txt"],
     ["ids.txt", "neither a file (not found)"], "copy"),
    ("flex-generate-from-particles-bad-file", "flex-generate", ["--from-particles", "{t}/ids_text.txt"],
     ["ids_text.txt", "one particle id"], "copy"),
    ("flex-generate-from-particles-unknown-id", "flex-generate", ["--from-particles", "99999"],
     ["particle ids [99999]", "not in the model"], "copy"),
    ("flex-generate-points-and-particles", "flex-generate", ["--points", "{t}/points_far.csv", "--from-particles", "1"],
     ["--points or --from-particles, not both"], "copy"),
    ("flex-generate-points-far", "flex-generate", ["--points", "{t}/points_far.csv"],
     ["points_far.csv", "point 1", "far outside"], "copy"),
    ("flex-generate-points-text", "flex-generate", ["--points", "{t}/ids_text.txt"], ["ids_text.txt", "comma-separated"],
     "copy"),
    ("flex-generate-model-missing", "flex-generate", ["--model", "{t}/nothing"], ["model not found", "flex-train"],
     "copy"),
    ("flex-generate-model-mrc", "flex-generate", ["--model", "{sim}/consensus.mrc"],
     ["consensus.mrc is an MRC map", "model.pt"], "copy"),
    ("flex-generate-model-truncated", "flex-generate", ["--model", "{t}/truncated/model.pt"],
     ["cannot read", "truncated or damaged", "--continue", "train afresh"], "copy"),
    ("flex-generate-model-text", "flex-generate", ["--model", "{t}/text.pt"], ["text.pt is a text file", "model.pt"],
     "copy"),
    ("flex-generate-model-checkpoint", "flex-generate", ["--model", "{good}/train/checkpoint.pt"],
     ["training checkpoint", "not a finished", "--continue"], "copy"),
    ("flex-generate-model-3dva", "flex-generate", ["--model", "{good}/va/checkpoint.pt"],
     ["a 3DVA checkpoint", "not a finished 3D Flex model"], "copy"),
    ("flex-generate-map-blank", "flex-generate", ["--map", "{t}/zeros16.mrc"], ["zeros16.mrc", "every voxel"], "copy"),
    # --- flex-reconstruct: the model file (its own options: tests of flex-reconstruct)
    ("flex-reconstruct-model-mrc", "flex-reconstruct", ["--model", "{sim}/mask.mrc"], ["is an MRC map"], "fresh"),
    ("flex-reconstruct-model-truncated", "flex-reconstruct", ["--model", "{t}/truncated"],
     ["truncated or damaged"], "copy"),
    # --- 3dva
    ("3dva-filter-res-coarse", "3dva", ["--filter-res", "1000"], ["--filter-res 1000", "coarser than 32"], "copy"),
    ("3dva-volume-blank", "3dva", ["--volume", "{t}/zeros.mrc"], ["zeros.mrc", "every voxel"], "copy"),
    ("3dva-continue-empty", "3dva", ["--continue"], ["--continue", "no 3DVA checkpoint", "drop --continue"], "fresh"),
    ("3dva-continue-flex-checkpoint", "3dva", ["--continue", "--out", "{t}/flexrun"],
     ["3D Flex training checkpoint", "not a 3DVA checkpoint"], "special"),
    ("3dva-continue-truncated", "3dva", ["--continue", "--out", "{t}/va_truncated"],
     ["cannot read", "truncated or damaged", "start a new run"], "special"),
    ("3dva-k-zero", "3dva", ["--k", "0"], ["--k", "at least 1"], "copy"),
    ("3dva-lambda-nan", "3dva", ["--lambda", "nan"], ["--lambda", "finite", "got nan"], "copy"),
    ("3dva-box-crop-odd", "3dva", ["--box-crop", "7"], ["--box-crop", "even", "got 7"], "copy"),
    ("3dva-num-particles-negative", "3dva", ["--num-particles", "-5"], ["--num-particles", "at least 2"], "copy"),
    # --- 3dva-display
    ("3dva-display-percentile-negative", "3dva-display", ["--range-percentile", "-5"], ["--range-percentile", "-5"],
     "copy"),
    ("3dva-display-percentile-reversed", "3dva-display", ["--range-percentile", "60"], ["--range-percentile", "60"],
     "copy"),
    ("3dva-display-frames-zero", "3dva-display", ["--mode", "cluster", "--frames", "0"], ["--frames", "at least 1"],
     "copy"),
    ("3dva-display-filter-res-coarse", "3dva-display", ["--filter-res", "1000"], ["--filter-res 1000", "coarser"],
     "copy"),
    ("3dva-display-batch-size-zero", "3dva-display", ["--batch-size", "0"], ["--batch-size", "at least 1"], "copy"),
    ("3dva-display-max-memory-nan", "3dva-display", ["--max-memory-gb", "nan"], ["--max-memory-gb", "finite"],
     "copy"),
    ("3dva-display-max-memory-negative", "3dva-display", ["--max-memory-gb", "-1"], ["--max-memory-gb", "positive"],
     "copy"),
    ("3dva-display-width-nan", "3dva-display", ["--mode", "intermediates", "--width", "nan"], ["--width", "finite"],
     "copy"),
    ("3dva-display-too-many-clusters", "3dva-display", ["--mode", "cluster", "--frames", "1000"],
     ["1000 clusters", "120 particles"], "copy"),
    ("3dva-display-components-text", "3dva-display", ["--components", "x"], ["--components", "integers"], "copy"),
    ("3dva-display-not-a-run", "3dva-display", ["--run", "{sim}"], ["not a finished 3dva run"], "copy"),
    ("3dva-display-run-json-damaged", "3dva-display", ["--run", "{t}/va_badjson"],
     ["va_badjson is a damaged 3dva run", "run.json", "rerun"], "copy"),
    ("3dva-display-latents-truncated", "3dva-display", ["--run", "{t}/va_badnpy"],
     ["va_badnpy is a damaged 3dva run", "latents.npy", "rerun"], "copy"),
    ("3dva-display-other-dataset", "3dva-display", ["--mode", "cluster", "--particles", "{t}/other/particles.star"],
     ["particles.star", "name other particles", "defocus", "give the particles"], "copy"),
    ("flex-reconstruct-other-dataset", "flex-reconstruct", ["--particles", "{t}/other/particles.star"],
     ["particles.star", "name other particles", "defocus"], "fresh"),
]
# disk full: exit 3, the earlier outputs intact (a 4 kB file-size limit during the job)
DISK_FULL = [("reconstruct-disk-full", "reconstruct", ["--seed", "5"], ["File too large", "earlier outputs are intact"]),
             ("3dva-display-disk-full", "3dva-display", ["--mode", "cluster"], ["File too large"]),
             ("flex-train-scratch-disk-full", "flex-train", ["--scratch", "{t}/scratch_full"],
              ["File too large", "prepared-particles cache", "scratch_full"])]

_DRIVER = """
import contextlib, io, json, resource, shutil, signal, sys, time, traceback
from flexplugin.cli import main
from flexplugin.engine.outdir import OutputFolder

held, out = [], []
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit: EFBIG instead of death
for job in json.load(sys.stdin):
    if job.get("copy"):
        shutil.copytree(*job["copy"], symlinks=True)
    if job.get("lock"):
        f = OutputFolder(job["lock"], "flex-train")
        f.acquire()
        held.append(f)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if job.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], hard))
    err, t0 = io.StringIO(), time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(job["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    out.append({"code": code, "stderr": err.getvalue(), "seconds": time.monotonic() - t0})
print(json.dumps(out))
"""


def _run_driver(jobs: list[dict]) -> list[dict]:
    r = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(jobs), capture_output=True, text=True,
                       timeout=1200, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def _fill(args: list[str], names: dict) -> list[str]:
    return [str(a).format(**names) for a in args]


@pytest.fixture(scope="module")
def good(small_flex_data, tmp_path_factory) -> dict:
    """The finished outputs of every command on the small set, and the scratch files the cases name."""
    import starfile
    import torch

    from flexplugin.engine.io import write_volume
    root = tmp_path_factory.mktemp("bad_options")
    names = {"sim": str(small_flex_data), "good": str(root / "good"), "t": str(root / "t")}
    t = root / "t"
    t.mkdir()
    order = ["simulate", "reconstruct", "flex-prep", "flex-mesh", "flex-train", "flex-generate", "flex-reconstruct",
             "3dva", "3dva-display"]
    jobs = [{"argv": _fill(BASE[c] + GOOD_EXTRA.get(c, []) + ["--out", f"{{good}}/{OUT_OF[c]}"], names)}
            for c in order]
    results = _run_driver(jobs)
    for c, r in zip(order, results):
        assert r["code"] == 0, (c, r["stderr"][-3000:])
    g = root / "good"
    write_volume(t / "zeros.mrc", np.zeros((32, 32, 32), np.float32), 4.0)
    write_volume(t / "zeros16.mrc", np.zeros((16, 16, 16), np.float32), 8.0)
    (t / "ids_text.txt").write_text("first\nsecond\n")
    (t / "points_far.csv").write_text("0.1,0.1\n1e6,-1e6\n")
    (t / "text.pt").write_text("model of the week\n")
    (t / "truncated").mkdir()
    data = (g / "train" / "model.pt").read_bytes()
    (t / "truncated" / "model.pt").write_bytes(data[: len(data) // 3])
    shutil.copytree(g / "train", t / "flexrun")
    shutil.copytree(g / "va", t / "va_truncated")
    ck = (g / "va" / "checkpoint.pt").read_bytes()
    (t / "va_truncated" / "checkpoint.pt").write_bytes(ck[: len(ck) // 2])
    for name, file, cut in (("va_badjson", "run.json", 40), ("va_badnpy", "latents.npy", 100)):
        shutil.copytree(g / "va", t / name)
        (t / name / file).write_bytes((g / "va" / file).read_bytes()[:cut])
    # another data set numbered like this one: the same ids and stack names, other CTFs
    (t / "other").mkdir()
    blocks = starfile.read(small_flex_data / "particles.star", always_dict=True)
    blocks["particles"]["rlnDefocusU"] = blocks["particles"]["rlnDefocusU"] * 1.5 + 3000
    blocks["particles"]["rlnImageName"] = [f"{n.split('@')[0]}@{small_flex_data}/{n.split('@')[1]}"
                                           for n in blocks["particles"]["rlnImageName"]]
    starfile.write(blocks, t / "other" / "particles.star")
    assert torch.load(g / "va" / "checkpoint.pt", weights_only=False)["iteration"] == 2
    return {"root": root, "names": names, "good": g, "t": t}


def _mount_read_only(path: Path) -> bool:
    """A read-only tmpfs at `path` holding an empty folder `existing` (needs mount rights)."""
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)]
    if subprocess.run(mount, capture_output=True, check=False).returncode:
        return False
    (path / "existing").mkdir()
    return subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="module")
def results(good) -> dict:
    """Every case (and the disk-full ones) in one driver run; per case: exit status, stderr, seconds, and the
    --out folder with the snapshot it must still have (None: it must not exist)."""
    root, names = good["root"], good["names"]
    cases_dir = root / "cases"
    cases_dir.mkdir()
    ro = root / "ro"
    have_ro = _mount_read_only(ro)
    (root / "a_file").write_text("not a folder\n")
    jobs, meta = [], {}
    try:
        for case, cmd, extra, _, kind in CASES + [(c, cmd, e, w, "disk") for c, cmd, e, w in DISK_FULL]:
            if kind in ("ro", "ro-new") and not have_ro:
                continue
            src = good["good"] / OUT_OF[cmd]
            out = {"file": root / "a_file", "under-file": root / "a_file" / "out", "ro": ro / "existing",
                   "ro-new": ro / "new"}.get(kind, cases_dir / case)
            job = {"argv": _fill(BASE[cmd] + ["--out", str(out)] + extra, names)}
            expect = None
            if kind in ("copy", "locked", "disk"):
                job["copy"] = [str(src), str(out)]
                expect = snapshot(src, (LOCK_NAME,))
            if kind == "locked":
                job["lock"] = str(out)
            if kind == "disk":
                job["fsize"] = 4096
            if kind == "special":  # the case names its own --out, a prepared folder
                out = Path(_fill([extra[extra.index("--out") + 1]], names)[0])
                expect = snapshot(out, (LOCK_NAME,))
            jobs.append(job)
            meta[case] = {"out": out, "expect": expect, "kind": kind}
        for case, r in zip(meta, _run_driver(jobs)):
            out = meta[case]["out"]
            r.update(meta[case])
            r["after"] = (snapshot(out, (LOCK_NAME,)) if out.is_dir() and r["kind"] not in ("file", "under-file") else None)
            r["exists"] = out.exists()
            meta[case] = r
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True, check=False)
    return meta


def _check(r: dict, words: list[str], names: dict, code: int = EXIT_INPUT) -> None:
    """The exit status, no traceback, an `error:` line with every expected word."""
    errors = "\n".join(line for line in r["stderr"].splitlines() if line.startswith("error:"))
    assert r["code"] == code, (r["code"], r["stderr"][-3000:])
    assert "Traceback" not in r["stderr"], r["stderr"]
    for w in words:
        assert w.format(**names) in errors, (w, r["stderr"])


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_option(results, good, case):
    """A clear error; the earlier outputs unchanged, no new folder left behind, the lock released."""
    if case not in results:
        pytest.skip("no read-only filesystem here (mounting a tmpfs needs root)")
    _, _, _, words, kind = next(c for c in CASES if c[0] == case)
    r = results[case]
    _check(r, words, good["names"])
    if r["expect"] is not None:
        assert r["after"] == r["expect"], f"{case}: the earlier outputs changed"
    if kind == "fresh":
        assert not r["exists"], f"{case}: a refused job left {r['out']} behind"
    if kind == "file":
        assert (good["root"] / "a_file").read_text() == "not a folder\n"


@pytest.mark.parametrize("case", [c[0] for c in DISK_FULL])
def test_disk_full(results, good, case):
    r = results[case]
    _check(r, next(c for c in DISK_FULL if c[0] == case)[3], good["names"], EXIT_DISK_FULL)
    outputs = {k: v for k, v in r["after"].items() if k != MANIFEST_NAME}  # it records the files rewritten
    assert outputs == {k: v for k, v in r["expect"].items() if k != MANIFEST_NAME}, "an earlier output changed"
    assert not [k for k in r["after"] if ".tmp" in k]


def test_catalogue_covers_every_command_and_ids_unique():
    from flexplugin.cli import build_parser
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert commands == set(BASE), commands ^ set(BASE)
    ids = [c[0] for c in CASES] + [c[0] for c in DISK_FULL]
    assert len(set(ids)) == len(ids)


# ----------------------------------------------------------------------------------------- lock and manifest
def test_lock_of_a_dead_job_is_stale_and_a_live_one_blocks(tmp_path):
    """A lock file naming a pid that no longer runs does not block; a folder another process holds does."""
    import os
    import socket

    from flexplugin.engine.errors import InputError
    from flexplugin.engine.outdir import output_folder
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                             "command": "3dva", "started": "yesterday"}))
    with output_folder(out, "flex-mesh") as f:
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["command"] == "flex-mesh" and f.root
    assert not (out / LOCK_NAME).exists()
    script = (f"import sys\nfrom flexplugin.engine.outdir import output_folder\nwith output_folder({str(out)!r}, "
              "'3dva'):\n    print('held', flush=True)\n    sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = rf"in use by another flexplugin job \(3dva, pid {holder.pid} on host"
        with pytest.raises(InputError, match=busy), output_folder(out, "3dva"):
            pass
    finally:
        holder.communicate("", timeout=60)
    with output_folder(out, "3dva"):  # released when the holder ended
        pass


def test_rerun_removes_the_outputs_it_replaces(good, tmp_path):
    """flex-generate with fewer frames, 3dva-display with fewer clusters: the earlier run's extra files go, files
    the tool did not write (or changed since) stay, and other commands' files in the folder are untouched."""
    from flexplugin.cli import main
    names, gen = good["names"], tmp_path / "gen"
    shutil.copytree(good["good"] / "gen", gen)
    (gen / "series_00" / "notes.txt").write_text("mine\n")
    shutil.copy(gen / "series_00" / "vol_001.mrc", gen / "series_00" / "vol_099.mrc")  # a user's copy
    with open(gen / "series_01" / "vol_002.mrc", "ab") as fh:  # edited by the user since: not ours any more
        fh.write(b"\0")
    before = set(snapshot(gen, (LOCK_NAME,)))
    assert main(_fill(BASE["flex-generate"], names) + ["--out", str(gen), "--frames", "2", "--no-atlas"]) == 0
    after = set(snapshot(gen, (LOCK_NAME,)))
    assert before - after == {"series_00/vol_002.mrc", "atlas.png"}
    assert {"series_00/notes.txt", "series_00/vol_099.mrc", "series_01/vol_002.mrc"} <= after
    manifest = json.loads((gen / MANIFEST_NAME).read_text())["flex-generate"]
    assert "series_00/vol_001.mrc" in manifest and "series_00/vol_002.mrc" not in manifest

    clus = tmp_path / "clus"
    shutil.copytree(good["good"] / "clus", clus)
    args = _fill(BASE["3dva-display"], names) + ["--out", str(clus), "--mode", "cluster", "--skip-reconstruction"]
    assert main(args + ["--frames", "2"]) == 0
    files = set(snapshot(clus, (LOCK_NAME,)))
    assert not any(f.startswith("cluster_002") for f in files), files
    assert {"cluster_000_particles.star", "cluster_001_particles.star"} <= files


def test_star_outputs_resolve_from_any_folder(good, tmp_path, monkeypatch):
    """particles_3dva.star and the cluster STAR files name stacks that exist from another working folder."""
    from flexplugin.engine.io import read_particles
    monkeypatch.chdir(tmp_path)
    for star in (good["good"] / "va" / "particles_3dva.star", good["good"] / "clus" / "cluster_000_particles.star"):
        text = star.read_text()
        names = [ln.split()[0] for ln in text.splitlines() if "@" in ln]
        assert names and all(Path(n.split("@", 1)[1]).is_absolute() for n in names), names[:3]
        ps = read_particles(star)
        assert np.isfinite(ps.images(np.arange(2))).all()


def test_model_knows_its_particles(good):
    """model.pt records its particles (image, defocus): the same STAR passes, another data set numbered alike
    (same ids, same stack names, other defoci) is refused; a 3DVA run does the same through 3dva-display."""
    from flexplugin.engine.errors import InputError
    from flexplugin.engine.flex.generate import check_model_particles, load_model
    from flexplugin.engine.io import read_particles
    model = load_model(good["good"] / "train")
    assert model.particles is not None and len(model.particles["image"]) == len(model.ids)
    check_model_particles(model, read_particles(Path(good["names"]["sim"]) / "particles.star"), "same.star")
    other = read_particles(good["t"] / "other" / "particles.star")
    with pytest.raises(InputError, match=r"other\.star: 120 of 120 particle ids name other particles .*defocus"):
        check_model_particles(model, other, "other.star")


def test_manifest_never_deletes_outside_the_folder_or_after_a_failure(tmp_path):
    """Forged manifest entries (.., absolute, through a link) are ignored; a failed run deletes nothing and
    records its files, so the next successful run replaces them."""
    import os

    from flexplugin.engine.atomic import write_text
    from flexplugin.engine.outdir import output_folder
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    with output_folder(out, "simulate"):
        write_text(out / "a.txt", "a")
        write_text(out / "b.txt", "b")
    os.symlink(outside, out / "link")
    st = os.stat(outside / "keep.txt")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for rel in ("../outside/keep.txt", str(outside / "keep.txt"), "link/keep.txt"):
        manifest["simulate"][rel] = [st.st_size, st.st_mtime_ns]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError), output_folder(out, "simulate"):
        write_text(out / "c.txt", "c")
        raise RuntimeError("the job failed")
    assert {p.name for p in out.iterdir()} >= {"a.txt", "b.txt", "c.txt"}
    assert "c.txt" in json.loads((out / MANIFEST_NAME).read_text())["simulate"]
    with output_folder(out, "simulate") as f:
        write_text(out / "a.txt", "a2")
    assert sorted(f.deleted) == ["b.txt", "c.txt"]
    assert (outside / "keep.txt").read_text() == "keep\n" and (out / "a.txt").read_text() == "a2"
    assert not (out / "b.txt").exists() and not (out / LOCK_NAME).exists()



def test_lock_without_flock_decides_by_pid(tmp_path, monkeypatch):
    """Where flock is unsupported (some network filesystems) the recorded pid decides: a live holder on this
    host blocks, a dead one is stale, one on another host blocks (it cannot be checked from here)."""
    import errno
    import fcntl
    import os
    import socket

    from flexplugin.engine import outdir
    from flexplugin.engine.errors import InputError

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(outdir.fcntl, "flock", no_flock)
    assert outdir.fcntl is fcntl
    out = tmp_path / "out"
    out.mkdir()
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    for pid, where, blocks in ((os.getppid(), host, True), (int(dead.stdout), host, False),
                               (int(dead.stdout), "elsewhere.example", True)):
        (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": where, "command": "3dva"}))
        if blocks:
            with pytest.raises(InputError, match=f"pid {pid} on host {where}"), outdir.output_folder(out, "3dva"):
                pass
        else:
            with outdir.output_folder(out, "3dva"):
                assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
