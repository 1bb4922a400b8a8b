"""Prepared-particles cache (engine/flex/cache.py, flex-train --scratch): float16 images at the training box equal
the on-the-fly crop to float16 rounding, training with and without it agrees, a changed input or box rebuilds it,
an unchanged one is reused, and an unusable scratch folder or a full disk is refused before any training."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

from flexplugin.engine.errors import DiskFullError, InputError
from flexplugin.engine.flex import cache as cache_mod
from flexplugin.engine.flex.cache import SCRATCH_ENV, open_cache, scratch_folder
from flexplugin.engine.flex.mesh import build_mesh
from flexplugin.engine.flex.prep import PreparedParticles, prep_spec, prep_volume
from flexplugin.engine.flex.train import FlexTrainer, TrainConfig
from flexplugin.engine.io import read_particles, read_volume

F16_EPS = 2.0 ** -11  # float16's relative rounding (unit roundoff)


@pytest.fixture()
def data(small_flex_data):
    ps = read_particles(small_flex_data / "particles.star")
    return ps, prep_spec(ps.box, ps.apix, 28, 16)  # real-space crop 32 → 28, then Fourier crop to 16


def _quiet(_line: str) -> None:
    pass


def test_cached_batch_equals_on_the_fly(data, tmp_path):
    """Every cached image is the on-the-fly prepared image rounded once to float16 (relative error ≤ 2⁻¹¹ per
    pixel, after the per-image RMS scaling); poses, shifts and CTF are the same objects."""
    ps, spec = data
    rows = np.array([5, 0, 77, 119, 3])
    fly = PreparedParticles(ps, spec).batch(rows, "cpu")
    cached = PreparedParticles(ps, spec, open_cache(ps, spec, tmp_path, progress=_quiet)).batch(rows, "cpu")
    a, b = fly["images"], cached["images"]
    assert a.shape == b.shape == (5, 16, 16) and b.dtype == torch.float32
    rms = a.square().mean(dim=(-2, -1), keepdim=True).sqrt()
    bound = F16_EPS * a.abs() + 2.0 ** -24 * rms + 1e-6 * rms  # normal and subnormal float16 rounding
    assert ((a - b).abs() <= bound).all()
    assert (a - b).abs().max() > 0  # the cache really is float16, not a copy of the float32 images
    for k in ("rotations", "shifts", "rows"):
        torch.testing.assert_close(fly[k], cached[k], rtol=0, atol=0)


def test_float16_keeps_precision_at_any_scale(data, tmp_path, monkeypatch):
    """Raw-count images (×1e6: beyond float16's 65504) and tiny ones (×1e-7: float16 subnormals) keep 2⁻¹¹
    relative precision, thanks to the stored per-image scale."""
    ps, spec = data
    rows = np.arange(8)
    for factor in (1e6, 1e-7):
        real = ps.images
        monkeypatch.setattr(type(ps), "images", lambda self, r, check_finite=True, f=factor, g=real: g(r) * f)
        fly = PreparedParticles(ps, spec).batch(rows, "cpu")["images"]
        got = PreparedParticles(ps, spec, open_cache(ps, spec, tmp_path / str(factor), progress=_quiet)).batch(
            rows, "cpu")["images"]
        monkeypatch.undo()
        rms = fly.square().mean(dim=(-2, -1), keepdim=True).sqrt()
        assert torch.isfinite(got).all()
        assert ((fly - got).abs() <= F16_EPS * fly.abs() + 1e-6 * rms).all(), factor


def test_training_with_and_without_cache_agrees(data, small_flex_data, tmp_path):
    """Two epochs of training (latent search included) from the same seed: the latents with the cache differ from
    those without only by what float16 image rounding moves them. Measured, in units of std(z): max |Δz| 0.021,
    median 0.0033; the same cache read one row off (every particle given its neighbour's image) gives max 4.8,
    median 0.77, so the bounds below tell float16 rounding from a wrong image by two orders of magnitude."""
    ps, _ = data
    spec = prep_spec(ps.box, ps.apix, None, 16)  # the mesh spans the whole box
    vol, apix = read_volume(small_flex_data / "consensus.mrc")
    mesh = build_mesh(vol, apix, cells=6)
    cfg = TrainConfig(k=2, epochs=2, extra_epochs=0, layers=2, hidden=16, batch_size=40, seed=3)
    z = []
    for cache in (None, open_cache(ps, spec, tmp_path / "s", progress=_quiet)):
        tr = FlexTrainer(PreparedParticles(ps, spec, cache), prep_volume(vol, spec), mesh, cfg, "cpu")
        tr.fit(tmp_path / f"out{cache is None}", progress=_quiet)
        z.append(tr.latents.numpy())
    d = np.abs(z[0] - z[1]) / z[0].std()
    assert 0 < d.max() < 0.1 and np.median(d) < 0.01, (d.max(), np.median(d))


def test_changed_input_or_box_rebuilds_and_same_reuses(data, small_flex_data, tmp_path):
    """Same particles and boxes: reused (no rebuild, the file untouched, a 'reusing' line). A restamped stack, a
    subset or another training box: another cache folder, built anew."""
    ps, spec = data
    lines: list[str] = []
    c1 = open_cache(ps, spec, tmp_path, progress=lines.append)
    assert any("preparing 120 particles" in s for s in lines)
    img = c1.folder / "images.npy"
    stamp = os.stat(img).st_mtime_ns
    lines.clear()
    c2 = open_cache(read_particles(small_flex_data / "particles.star"), spec, tmp_path, progress=lines.append)
    assert c2.folder == c1.folder and os.stat(img).st_mtime_ns == stamp
    assert any("reusing" in s for s in lines) and not any("preparing" in s for s in lines)
    others = [open_cache(ps.subset(np.arange(60)), spec, tmp_path, progress=_quiet),
              open_cache(ps, prep_spec(ps.box, ps.apix, 28, 20), tmp_path, progress=_quiet)]
    stack = ps.table["rlnImageName"].iloc[0].split("@", 1)[1]
    st = os.stat(stack)
    os.utime(stack, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a re-extracted stack
    try:
        lines.clear()
        others.append(open_cache(ps, spec, tmp_path, progress=lines.append))
        assert any("preparing" in s for s in lines)
    finally:
        os.utime(stack, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len({c1.folder, *(c.folder for c in others)}) == 4
    assert [len(c) for c in others] == [60, 120, 120] and others[1].images16.shape[1:] == (20, 20)
    assert not list(tmp_path.glob("*.tmp-*"))  # no temporary folder left


def test_positioned_reads_equal_the_stored_array(data, tmp_path):
    """ParticleCache.images (os.preadv of each row) equals the .npy read by numpy times the stored scales, for
    rows in any order; a row outside the cache and a truncated file are errors, not garbage."""
    ps, spec = data
    c = open_cache(ps, spec, tmp_path, progress=_quiet)
    full = np.load(c.folder / "images.npy").astype(np.float32) * np.load(c.folder / "scales.npy")[:, None, None]
    rows = np.array([119, 0, 64, 63, 5, 5])
    np.testing.assert_array_equal(c.images(rows), full[rows])
    with pytest.raises(IndexError, match="row 120"):
        c.images(np.array([120]))
    path = c.folder / "images.npy"
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 100)
    with pytest.raises(InputError, match="shorter than its header"):
        c.images(np.array([119]))  # a cache truncated while in use


def test_damaged_cache_is_rebuilt(data, tmp_path):
    ps, spec = data
    c = open_cache(ps, spec, tmp_path, progress=_quiet)
    ref = c.images(np.arange(10))
    (c.folder / "images.npy").write_bytes(b"\x93NUMPY truncated")
    lines: list[str] = []
    np.testing.assert_array_equal(open_cache(ps, spec, tmp_path, progress=lines.append).images(np.arange(10)), ref)
    assert any("preparing" in s for s in lines)


def test_scratch_folder_options(tmp_path, monkeypatch):
    monkeypatch.delenv(SCRATCH_ENV, raising=False)
    assert scratch_folder(None) is None
    made = scratch_folder(str(tmp_path / "new" / "scratch"))
    assert made is not None and made.is_dir()
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "env"))
    assert scratch_folder(None) == tmp_path / "env" and (tmp_path / "env").is_dir()
    monkeypatch.setenv(SCRATCH_ENV, "")
    assert scratch_folder(None) is None  # an empty variable: no cache
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        scratch_folder(str(tmp_path / "f"))
    with pytest.raises(InputError, match="cannot create the scratch folder"):
        scratch_folder(str(tmp_path / "f" / "sub"))
    with pytest.raises(InputError, match="--scratch is empty"):
        scratch_folder(" ")
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "f"))
    with pytest.raises(InputError, match=f"{SCRATCH_ENV} .*is a file"):
        scratch_folder(None)


def test_not_enough_space_is_refused_before_writing(data, tmp_path, monkeypatch):
    ps, spec = data
    real = cache_mod.shutil.disk_usage
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(DiskFullError) as e:
        open_cache(ps, spec, tmp_path, progress=_quiet)
    assert e.value.errno == errno.ENOSPC and "prepared-particles cache" in str(e.value)
    assert "GiB free" in str(e.value) and not list(tmp_path.iterdir())


_WORKER = '''
import json, os, sys
from pathlib import Path
import numpy as np
from flexplugin.engine import distributed
from flexplugin.engine.flex.cache import open_cache
from flexplugin.engine.flex.prep import prep_spec
from flexplugin.engine.io import read_particles
star, scratch, node_local = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
distributed.init_from_env("cpu")
if node_local:  # as if each rank ran on its own node, with its own node-local scratch folder
    os.environ["LOCAL_RANK"] = "0"
    scratch = scratch / str(distributed.rank())
ps = read_particles(star)
lines = []
c = open_cache(ps, prep_spec(ps.box, ps.apix, 28, 16), scratch, "cpu", lines.append)
# one file per rank: two ranks printing long lines to one pipe interleave them
Path(sys.argv[4], f"rank{distributed.rank()}.json").write_text(json.dumps(
    {"rank": distributed.rank(), "folder": str(c.folder), "lines": lines, "images": c.images(np.arange(len(c))).tolist()}))
'''


@pytest.mark.parametrize("node_local", [False, True])
def test_two_ranks_share_one_build(small_flex_data, tmp_path, node_local):
    """torchrun, two gloo processes: on a shared scratch folder rank 0 alone builds and rank 1 reads the same
    cache; with a scratch folder per node (each rank made LOCAL_RANK 0 of its own node) rank 1 finds none after
    rank 0's build and builds its own. Both ranks see the same images either way."""
    import json
    import subprocess
    import sys
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(worker), str(small_flex_data / "particles.star"), str(tmp_path / "scratch"),
                        "1" if node_local else "0", str(tmp_path)], capture_output=True, text=True, timeout=300,
                       check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [d["rank"] for d in out] == [0, 1]
    built = [any("preparing" in s for s in d["lines"]) for d in out]
    assert built == [True, node_local]
    assert (out[0]["folder"] != out[1]["folder"]) == node_local
    np.testing.assert_array_equal(out[0]["images"], out[1]["images"])
    assert not list(tmp_path.rglob("*.tmp-*"))


@pytest.mark.parametrize("cached", [False, True])
def test_loader_workers_give_the_same_batches(data, tmp_path, cached):
    """PreparedParticles.loader with two DataLoader workers (prefetching) yields exactly the batches of
    batch(), in order, from the stacks or from the cache."""
    ps, spec = data
    pp = PreparedParticles(ps, spec, open_cache(ps, spec, tmp_path, progress=_quiet) if cached else None)
    order = np.random.default_rng(1).permutation(len(pp))
    batches = [order[s:s + 25] for s in range(0, len(order), 25)]
    got = list(pp.loader(batches, "cpu", workers=2, prefetch=2))
    assert len(got) == len(batches)
    for rows, b in zip(batches, got):
        ref = pp.batch(rows, "cpu")
        for k in ("images", "rotations", "shifts", "rows"):
            torch.testing.assert_close(b[k], ref[k], rtol=0, atol=0)
        torch.testing.assert_close(b["ctf"].defocus_u, ref["ctf"].defocus_u, rtol=0, atol=0)
