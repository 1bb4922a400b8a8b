"""The 3D flex training form's "Reading the particles" fields reach flex-train: loader workers (`--workers`) and
the prepared-particles cache (`--scratch`, or Scipion's scratch through FLEXPLUGIN_SCRATCH), read back by
flexplugin's own parser from the command line runJob gets; bad values are refused by the form or by the engine;
the defaults add nothing, so earlier runs keep their argument lists (Scipion's Continue). No project, no
training: protocols are built in memory (seconds)."""
from __future__ import annotations  # noqa: I001  (scipion_project must be imported first)

from ..helpers import scipion_project  # noqa: F401  (sets up Scipion's environment before pyworkflow is imported)

import os
import shlex

import pytest

from flexplugin.cli import build_parser
from flexplugin.engine.flex.loading import LOADER_WORKERS, SCRATCH_ENV

from ..helpers.cli import run_cli


@pytest.fixture(scope="module", autouse=True)
def _plugins():
    scipion_project.loadPlugins()


@pytest.fixture()
def prot(tmp_path, monkeypatch):
    """A training protocol with its consensus volume set, in a run folder under tmp_path, on the CPU, with neither
    Scipion's scratch nor FLEXPLUGIN_SCRATCH configured."""
    import pyworkflow as pw
    from pwem.objects import Volume

    from flexplugin.protocols import FlexPluginProtTrain
    monkeypatch.setattr(pw.Config, "SCIPION_SCRATCH", None)
    monkeypatch.delenv(SCRATCH_ENV, raising=False)
    p = FlexPluginProtTrain(workingDir=str(tmp_path / "Runs" / "000002_FlexPluginProtTrain"))
    p.useGpu.set(False)
    p.inputVolume.set(Volume(location=str(tmp_path / "consensus.mrc")))
    return p


def _engine_line(p) -> tuple[list[str], dict]:
    """The words of the command runJob would run for the training step, and its environment."""
    seen = {}
    p.runJob = lambda program, line, **kw: seen.update(line=line, env=kw["env"])
    p.runEngine("flex-train", p._getTrainArgs())
    return shlex.split(seen["line"]), dict(seen["env"])


def _parsed(words: list[str]):
    return build_parser().parse_args(words)


def test_defaults_add_nothing(prot):
    """Form defaults: the engine's (declared once, in engine/flex/loading.py), and no option or variable added."""
    assert prot.loaderWorkers.get() == LOADER_WORKERS == _parsed(["flex-train", "--particles", "p", "--volume", "v",
                                                                  "--mesh", "m", "--out", "o"]).workers
    assert prot.useScratch.get() is True and not prot.scratchFolder.get()
    args = prot._getTrainArgs()
    assert "--workers" not in args and "--scratch" not in args
    assert args[-2:] == ["--threads", "4"]  # the list ends as it did before these fields existed
    words, env = _engine_line(prot)
    assert SCRATCH_ENV not in env
    a = _parsed(words)
    assert (a.workers, a.scratch) == (LOADER_WORKERS, None)


def test_form_values_reach_the_command_line(prot, tmp_path, monkeypatch):
    folder = tmp_path / "fast disk" / "cache"
    prot.loaderWorkers.set(3)
    prot.scratchFolder.set(f"  {folder}  ")
    assert [e for e in prot.validate() if "Input particles" not in e] == []  # only the missing input
    words, env = _engine_line(prot)
    a = _parsed(words)
    assert (a.command, a.workers, a.scratch) == ("flex-train", 3, str(folder))
    assert words[words.index("--threads"):] == ["--threads", "4", "--workers", "3", "--scratch", str(folder)]
    # a node's own disk: the variable travels quoted and the engine's parser expands it where it runs
    prot.scratchFolder.set("$TMPDIR/flexcache")
    words, _ = _engine_line(prot)
    assert "$TMPDIR/flexcache" in words
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node"))
    assert _parsed(words).scratch == str(tmp_path / "node" / "flexcache")
    # the cache off: no --scratch whatever the folder says; workers back at the default: no --workers
    prot.useScratch.set(False)
    prot.loaderWorkers.set(LOADER_WORKERS)
    assert prot._getLoadingArgs() == []
    assert "--scratch" not in prot._getTrainArgs() and "--workers" not in prot._getTrainArgs()


def test_scipion_scratch_is_the_fallback(prot, tmp_path, monkeypatch):
    """An empty folder: this run's temporary folder on SCIPION_SCRATCH (as Scipion links it), given to the engine
    through FLEXPLUGIN_SCRATCH so the step's arguments stay as they were; an engine variable already set wins;
    the cache off removes it."""
    import pyworkflow as pw
    ssd = tmp_path / "ssd"
    runTmp = ssd / "proj_Runs_000002_FlexPluginProtTrain"
    runTmp.mkdir(parents=True)
    os.makedirs(os.path.dirname(prot._getTmpPath()))
    os.symlink(runTmp, prot._getTmpPath())  # what pyworkflow's makeTmpPath does with SCIPION_SCRATCH set
    args = prot._getTrainArgs()
    assert SCRATCH_ENV not in _engine_line(prot)[1]  # no SCIPION_SCRATCH configured: no cache
    monkeypatch.setattr(pw.Config, "SCIPION_SCRATCH", str(ssd))
    words, env = _engine_line(prot)
    assert env[SCRATCH_ENV] == str(runTmp.resolve())
    assert prot._getTrainArgs() == args and "--scratch" not in words
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "admin"))
    assert _engine_line(prot)[1][SCRATCH_ENV] == str(tmp_path / "admin")
    prot.scratchFolder.set(str(tmp_path / "mine"))  # the form's folder goes on the command line, which wins
    words, env = _engine_line(prot)
    assert _parsed(words).scratch == str(tmp_path / "mine")
    prot.useScratch.set(False)
    assert SCRATCH_ENV not in _engine_line(prot)[1]


def test_bad_values_are_refused(prot, tmp_path):
    """Negative workers and a scratch 'folder' that is a file: refused by the form's validation, and by the engine
    (exit 2, an error line naming the option) for command lines written by hand."""
    prot.loaderWorkers.set(-1)
    assert any("0 or more loader workers" in e for e in prot.validate()), prot.validate()
    prot.loaderWorkers.set(2)
    afile = tmp_path / "scratch.txt"
    afile.write_text("not a folder")
    prot.scratchFolder.set(str(afile))
    assert any(f"scratch folder {afile} is a file" in e for e in prot.validate()), prot.validate()
    prot.useScratch.set(False)  # the folder is not used then
    assert not any("scratch" in e for e in prot.validate())
    prot.useScratch.set(True)
    prot.scratchFolder.set(str(tmp_path / "not yet" / "made"))  # may exist only where the job runs
    assert not any("scratch" in e for e in prot.validate())

    common = ["flex-train", "--particles", tmp_path / "none.star", "--volume", "v.mrc", "--mesh", "m.pkl",
              "--out", tmp_path / "out", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(SCRATCH_ENV, None)
    r = run_cli(*common, "--scratch", afile, env=env)
    assert r.returncode == 2 and f"error: --scratch {afile}: is a file" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli(*common, "--scratch", "$FLEXPLUGIN_TEST_UNSET_VARIABLE/c", env=env)
    assert r.returncode == 2 and "FLEXPLUGIN_TEST_UNSET_VARIABLE is not set" in r.stderr, r.stderr
