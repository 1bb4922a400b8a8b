"""Faults at the engine/CLI level, as a user meets them: a training killed mid-epoch and continued, a GPU that
does not exist (with and without --cpu-fallback), a full disk while writing outputs (file-size limit, injected
ENOSPC, a real full tmpfs) and a kill during an atomic save.

Every job runs in a subprocess like a user's (or Scipion's runJob) would, on tiny simulated data.
"""
import errno
import io
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flexplugin import cli
from flexplugin.engine import atomic
from flexplugin.engine.errors import EXIT_DISK_FULL, EXIT_INPUT, DiskFullError
from flexplugin.engine.io import read_volume
from flexplugin.engine.outdir import LOCK_NAME

from ..helpers.files import snapshot

PY = [sys.executable, "-m", "flexplugin.cli"]
EPOCHS = 3
TRAIN = ["--train-box", "16", "--epochs", str(EPOCHS), "--batch-size", "50", "--k", "1", "--layers", "2",
         "--hidden", "16", "--seed", "3", "--device", "cpu", "--threads", "1"]


def _run(*args, env=None, limit_bytes=None, check=False):
    """Run the CLI; `limit_bytes` lowers RLIMIT_FSIZE in the child (writes beyond it fail with EFBIG)."""
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed by SIGXFSZ
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    r = subprocess.run([*PY, *map(str, args)], capture_output=True, text=True, env=env,
                       preexec_fn=preexec if limit_bytes else None)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def _temps(folder: Path) -> list:
    return [str(p) for p in folder.rglob("*.tmp*")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """200 simulated particles (box 32) and a coarse mesh of their consensus map."""
    d = tmp_path_factory.mktemp("faults_data")
    _run("simulate", "--out", d / "sim", "--n", 200, "--box", 32, "--apix", 4, "--snr", 1, "--seed", 1, check=True)
    _run("flex-mesh", "--volume", d / "sim" / "consensus.mrc", "--cells", 8, "--out", d / "mesh", check=True)
    return d


def _train_args(data: Path, out: Path) -> list:
    return ["flex-train", "--particles", data / "sim" / "particles.star", "--volume", data / "sim" / "consensus.mrc",
            "--mesh", data / "mesh" / "mesh.pkl", "--out", out, *TRAIN]


# --------------------------------------------------------------------------------------- killed mid-epoch
@pytest.fixture(scope="module")
def killed(data, tmp_path_factory):
    """An uninterrupted training, and the same training SIGKILLed during epoch 2, refused a checkpoint by a full
    disk once, then continued: logs, checkpoint snapshots and outputs of each stage."""
    root = tmp_path_factory.mktemp("faults_killed")
    ref = _run(*_train_args(data, root / "ref"), check=True)

    out = root / "killed"
    log_path = root / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*PY, *map(str, _train_args(data, out))], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while "flex-train epoch: 1/" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"training ended (status {proc.returncode}) before epoch 1 was reported:\n"
                            + log_path.read_text())
            time.sleep(0.02)
        # epoch 1 is checkpointed before it is reported, and epoch 2 starts right after the report
        if proc.poll() is not None:
            pytest.fail("training finished before it could be killed during epoch 2: make the data set larger")
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_log = log_path.read_text()
    assert f"epoch: 2/{EPOCHS}" not in killed_log, "epoch 2 finished before the kill: the test did not kill mid-epoch"
    after_kill = {k: v for k, v in snapshot(out, (LOCK_NAME,)).items() if not k.endswith(".tmp")}
    stale_lock = (out / LOCK_NAME).read_text() if (out / LOCK_NAME).exists() else ""

    # continuing with no room for the next checkpoint: clear error, the epoch-1 checkpoint stays as it was
    full = _run(*_train_args(data, out), "--continue", limit_bytes=4096)
    after_full = snapshot(out, (LOCK_NAME,))

    cont = _run(*_train_args(data, out), "--continue", check=True)
    return {"ref": ref, "ref_dir": root / "ref", "out": out, "killed_log": killed_log, "after_kill": after_kill,
            "full": full, "after_full": after_full, "cont": cont, "stale_lock": stale_lock}


def _load(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def test_kill_leaves_the_finished_epoch_checkpointed(killed):
    assert "checkpoint.pt" in killed["after_kill"], killed["killed_log"]
    assert "model.pt" not in killed["after_kill"], "the killed run must not have final outputs"
    st = _load(killed["after_kill"]["checkpoint.pt"])
    assert st["epoch"] == 1 and len(st["history"]) == 1


def test_killed_job_lock_does_not_block(killed):
    """The killed job's lock file stays behind, naming a pid that is gone: the next jobs ran (it is stale)."""
    assert '"command": "flex-train"' in killed["stale_lock"], killed["stale_lock"]
    assert "in use by" not in killed["full"].stderr + killed["cont"].stderr
    assert not (killed["out"] / LOCK_NAME).exists(), "a finished job removes its lock"


def test_continue_resumes_after_the_finished_epoch(killed):
    log = killed["cont"].stdout
    assert "continuing after epoch 1" in log, log
    assert "flex-train epoch: 1/" not in log, "epoch 1 was trained again"
    assert f"flex-train epoch: 2/{EPOCHS}" in log and f"flex-train epoch: {EPOCHS}/{EPOCHS}" in log, log
    # the history of epoch 1 is the killed run's own record (its timing), not a re-run
    before = _load(killed["after_kill"]["checkpoint.pt"])["history"][0]
    after = torch.load(killed["out"] / "checkpoint.pt", map_location="cpu", weights_only=False)["history"]
    assert len(after) == EPOCHS and after[0] == before


def test_killed_and_continued_equals_uninterrupted(killed):
    ref, out = killed["ref_dir"], killed["out"]
    np.testing.assert_allclose(np.load(out / "latents.npy"), np.load(ref / "latents.npy"), rtol=0, atol=1e-6)
    a = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    b = torch.load(ref / "model.pt", map_location="cpu", weights_only=False)
    torch.testing.assert_close(a["density"], b["density"], rtol=0, atol=1e-6)
    for k in b["generator"]:
        torch.testing.assert_close(a["generator"][k], b["generator"][k], rtol=0, atol=1e-6)
    assert [h["data"] for h in a["history"]] == pytest.approx([h["data"] for h in b["history"]], rel=1e-6)


def test_full_disk_during_training_keeps_the_checkpoint(killed):
    r = killed["full"]
    assert r.returncode == EXIT_DISK_FULL, r.stdout + r.stderr
    assert "continuing after epoch 1" in r.stdout
    assert "File too large for the file-size limit while writing" in r.stderr and "checkpoint.pt" in r.stderr
    assert "earlier outputs are intact" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert killed["after_full"] == killed["after_kill"], "the epoch-1 checkpoint changed or a file was left behind"
    assert not [k for k in killed["after_full"] if ".tmp" in k]


def test_kill_during_a_save_keeps_the_previous_file(tmp_path):
    """SIGKILL while torch.save is half-way through the temp file: the target still holds the old checkpoint."""
    target = tmp_path / "checkpoint.pt"
    script = f"""
import os, signal, torch
from flexplugin.engine.atomic import torch_save

torch_save({{"epoch": 1, "w": torch.arange(1000.)}}, {str(target)!r})
real_save = torch.save
def dying_save(obj, fh):
    fh.write(b"half a checkpoint")
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
torch_save({{"epoch": 2, "w": torch.zeros(1000)}}, {str(target)!r})
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (tmp_path / "checkpoint.pt.tmp").read_bytes() == b"half a checkpoint"  # the write really started
    st = torch.load(target, weights_only=False)
    assert st["epoch"] == 1 and torch.equal(st["w"], torch.arange(1000.))
    atomic.torch_save({"epoch": 3}, target)  # the next save replaces the stale temp file
    assert torch.load(target, weights_only=False)["epoch"] == 3 and _temps(tmp_path) == []


# --------------------------------------------------------------------------------------- GPU that does not exist
def _missing_gpu() -> str:
    return f"cuda:{torch.cuda.device_count() + 3}"


def _reconstruct(data: Path, out: Path, *extra, **kw):
    return _run("reconstruct", "--particles", data / "sim" / "particles.star", "--out", out, "--batch-size", 100,
                "--threads", 1, *extra, **kw)


def test_missing_gpu_without_fallback_is_a_clear_error(data, tmp_path):
    gpu = _missing_gpu()
    r = _reconstruct(data, tmp_path / "r", "--device", gpu)
    assert r.returncode == EXIT_INPUT, r.stdout + r.stderr
    assert f"--device {gpu}" in r.stderr and "--cpu-fallback" in r.stderr and "--device cpu" in r.stderr, r.stderr
    assert ("CUDA is not available" in r.stderr) or ("does not exist" in r.stderr)
    assert "Traceback" not in r.stderr and not (tmp_path / "r").exists()
    # the environment variable allows the fallback, the explicit flag still refuses it
    env = dict(os.environ, FLEXPLUGIN_CPU_FALLBACK="1")
    r = _reconstruct(data, tmp_path / "r", "--device", gpu, "--no-cpu-fallback", env=env)
    assert r.returncode == EXIT_INPUT and "--cpu-fallback" in r.stderr


def test_missing_gpu_with_fallback_runs_on_the_cpu(data, tmp_path):
    gpu = _missing_gpu()
    cpu = _reconstruct(data, tmp_path / "cpu", "--device", "cpu", check=True)
    fb = _reconstruct(data, tmp_path / "fb", "--device", gpu, "--cpu-fallback", check=True)
    warning = [ln for ln in fb.stdout.splitlines() if ln.startswith("WARNING:")]
    assert len(warning) == 1 and gpu in warning[0] and "running on the CPU" in warning[0], fb.stdout
    assert "device cpu" in fb.stdout and "WARNING" not in cpu.stdout
    np.testing.assert_array_equal(read_volume(tmp_path / "fb" / "map.mrc")[0], read_volume(tmp_path / "cpu" / "map.mrc")[0])
    # FLEXPLUGIN_CPU_FALLBACK=1 (what the Scipion protocols set) is tested end to end in test_scipion_faults.py


def test_resolve_device_messages():
    assert cli.resolve_device("cpu") == "cpu"
    assert cli.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    from flexplugin.engine.errors import InputError
    with pytest.raises(InputError, match="GPU id must be a number"):
        cli.resolve_device("cuda:x")
    with pytest.raises(InputError, match="not a device"):
        cli.resolve_device("tpu")
    for name in ("mps", "meta"):  # devices torch names but flexplugin does not run on
        with pytest.raises(InputError, match=f"--device '{name}' is not supported"):
            cli.resolve_device(name)
    logged = []
    assert cli.resolve_device(_missing_gpu(), cpu_fallback=True, log=logged.append) == "cpu"
    assert len(logged) == 1 and logged[0].startswith("WARNING:")


# --------------------------------------------------------------------------------------- disk full
@pytest.fixture()
def first_run(data, tmp_path):
    """A finished reconstruction in tmp_path/r (seed 0) and its bytes."""
    out = tmp_path / "r"
    _reconstruct(data, out, "--device", "cpu", "--seed", "0", check=True)
    return out, snapshot(out, (LOCK_NAME,))


def _assert_disk_full(r, out: Path, before: dict, reason: str) -> None:
    assert r.returncode == EXIT_DISK_FULL, r.stdout + r.stderr
    assert f"{reason} while writing {out / 'map.mrc'}" in r.stderr, r.stderr
    assert "earlier outputs are intact" in r.stderr and "free space" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(out, (LOCK_NAME,)) == before, "an earlier output changed"
    assert _temps(out) == []


def test_file_size_limit_while_writing(data, first_run):
    """A rerun (other half-set seed, so every output would change) under a 4 kB file-size limit."""
    out, before = first_run
    r = _reconstruct(data, out, "--device", "cpu", "--seed", "5", limit_bytes=4096)
    _assert_disk_full(r, out, before, "File too large for the file-size limit")
    again = _reconstruct(data, out, "--device", "cpu", "--seed", "5", check=True)  # room again: the rerun works
    assert "resolution" in again.stdout and snapshot(out, (LOCK_NAME,))["map.mrc"] != before["map.mrc"]


def test_injected_enospc_at_flush(data, first_run, monkeypatch, capsys):
    """ENOSPC reported late (when the temp file is flushed, as on NFS or with delayed allocation), in process."""
    out, before = first_run

    def no_space(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(atomic, "_fsync", no_space)
    code = cli.main(["reconstruct", "--particles", str(data / "sim" / "particles.star"), "--out", str(out),
                     "--device", "cpu", "--seed", "5", "--batch-size", "100"])
    err = capsys.readouterr().err
    assert code == EXIT_DISK_FULL, err
    assert f"No space left on device while writing {out / 'map.mrc'}" in err, err
    assert snapshot(out, (LOCK_NAME,)) == before and _temps(out) == []


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "No space left on device"),
                                         (errno.EDQUOT, "Disk quota exceeded"),
                                         (errno.EFBIG, "File too large for the file-size limit")])
def test_writers_turn_disk_full_into_a_clear_error(tmp_path, monkeypatch, code, words):
    target = tmp_path / "run.json"
    atomic.write_json(target, {"version": 1})
    real = Path.write_text

    def half_then_full(self, text, *a, **k):
        real(self, text[:5], *a, **k)
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(DiskFullError, match=f"{words} while writing {target}") as ei:
        atomic.write_json(target, {"version": 2})
    assert ei.value.errno == code and ei.value.path == str(target)
    monkeypatch.undo()
    assert target.read_text() == '{\n  "version": 1\n}' and _temps(tmp_path) == []
    # other errors pass through unchanged, still without leaving a temp file
    monkeypatch.setattr(Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(PermissionError):
        atomic.write_json(target, {"version": 3})
    assert _temps(tmp_path) == []


def test_real_full_tmpfs(data, tmp_path):
    """A real ENOSPC: a tiny tmpfs filled up after a first run (needs mount rights; skipped without them)."""
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        out = mnt / "r"
        _reconstruct(data, out, "--device", "cpu", "--seed", "0", check=True)
        before = snapshot(out, (LOCK_NAME,))
        st = os.statvfs(mnt)
        (mnt / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - 8192))
        r = _reconstruct(data, out, "--device", "cpu", "--seed", "5")
        _assert_disk_full(r, out, before, "No space left on device")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
