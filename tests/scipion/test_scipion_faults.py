"""Faults at the Scipion level, in a real headless project on tiny simulated data: a GPU id that does not exist
(the CPU-fallback field on, then off), NaN images (caught by the engine mid-run: the protocol fails with the
engine's message as its error), an empty particle set, and the CPU-fallback field on every GPU protocol.

A 3D flex training protocol SIGKILLed mid-epoch (protocol process and engine child), seen as dead by a refresh as
the GUI does it, then continued with Scipion's Continue (MODE_RESUME): TestKilledTraining. A full disk while
convert.py writes the engine's input: TestConvertDiskFull. The same faults on the bare CLI: tests/engine/test_faults.py.
"""
import ctypes
import errno
import io
import os
import shutil
import signal
import tempfile
import time
import unittest
from unittest import mock

import mrcfile
import numpy as np
import psutil
import torch

import pyworkflow.protocol.params as params
from pwem.emlib.image import ImageHandler
from pwem.objects import SetOfParticles
from pyworkflow.protocol import getProtocolFromDb
from pyworkflow.protocol.constants import MODE_RESUME, STATUS_FAILED, STATUS_RUNNING

from flexplugin import convert
from flexplugin import protocols as flexprotocols
from flexplugin.engine import atomic
from flexplugin.engine import io as engine_io
from flexplugin.engine.errors import DiskFullError
from flexplugin.engine.io import read_particles
from flexplugin.protocols import FlexPluginProt3DVA, FlexPluginProtBase, FlexPluginProtMeshPrep, FlexPluginProtTrain

from ..helpers import scipion_project  # noqa: F401  (sets up Scipion's environment before pyworkflow is imported)
from .test_convert import ParticleSetCase

__all__ = ["TestFaultProtocols", "TestKilledTraining", "TestConvertDiskFull"]  # what tests/scipion/__init__.py re-exports

N, BOX, APIX = 80, 16, 4.0
NAN_INDEX = 5  # the image (1-based, in the stack) made NaN
MISSING_GPU = torch.cuda.device_count() + 3
FALLBACK_ENV = "FLEXPLUGIN_CPU_FALLBACK"


_log = scipion_project.logText


class FallbackProbe(FlexPluginProtBase):
    """A protocol with the shared GPU fields and one section (not part of the plugin)."""

    _label = "cpu fallback probe"

    def _defineParams(self, form):
        self._defineGpuParams(form)
        form.addSection(label="Input")
        form.addParam("dummy", params.IntParam, default=1)


def _sectionsWithFallback(prot) -> list:
    """Labels of the form sections holding the CPU-fallback field."""
    return [s.label.get() for s in prot.getDefinition().iterSections()
            if "allowCpuFallback" in [name for name, _ in s.iterParams()]]


class TestFaultProtocols(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cwd = os.getcwd()
        t0 = time.time()
        project = cls.project = scipion_project.newProject("faults")
        cls.sim = scipion_project.runSimulate(project, numberOfParticles=N, boxSize=BOX, pixelSize=APIX, snr=1.0,
                                              seed=2, stackSize=N)
        gpu = dict(useGpu=True, gpuList=str(MISSING_GPU))
        cls.fallback = cls.launch(cls.newVA(objLabel="3dva on a missing GPU", **gpu), check=True)
        cls.noFallback = cls.launch(cls.newVA(objLabel="3dva on a missing GPU, no fallback", allowCpuFallback=False,
                                              **gpu))
        # one NaN image in the simulated stack, then a run on those particles
        index, stack = next(p.getLocation() for p in cls.sim.outputParticles.iterItems()
                            if p.getLocation()[0] == NAN_INDEX)
        cls.nanId = next(p.getObjId() for p in cls.sim.outputParticles.iterItems()
                         if p.getLocation()[0] == NAN_INDEX)
        with mrcfile.mmap(stack, mode="r+") as m:
            m.data[index - 1, 3, 4] = np.nan
        cls.nan = cls.launch(cls.newVA(objLabel="3dva on NaN images", useGpu=False))
        cls.seconds = time.time() - t0

    @classmethod
    def tearDownClass(cls):
        print(f"fault protocols: {cls.seconds:.0f} s")
        os.chdir(cls.cwd)

    @classmethod
    def newVA(cls, **kwargs) -> FlexPluginProt3DVA:
        prot = cls.project.newProtocol(FlexPluginProt3DVA, numberOfComponents=1, iterations=1, filterRes=12.0,
                                       numberOfThreads=1, **kwargs)
        prot.inputParticles.set(cls.sim)
        prot.inputParticles.setExtended("outputParticles")
        prot.inputMask.set(cls.sim)
        prot.inputMask.setExtended("outputMask")
        return prot

    @classmethod
    def launch(cls, prot, check: bool = False):
        errors = prot.validate()
        if errors:
            raise AssertionError(f"{prot.getRunName()} does not validate: {errors}")
        return scipion_project.launch(cls.project, prot, check=check)

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="flexplugin_faults_")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    # ------------------------------------------------------------------ GPU that does not exist
    def test_missing_gpu_falls_back_to_the_cpu(self):
        log = _log(self.fallback)
        self.assertIn(f"--device cuda:{MISSING_GPU}", log)  # Scipion gave the step the GPU id asked for
        self.assertIn(f"WARNING: --device cuda:{MISSING_GPU}", log)
        self.assertIn("running on the CPU instead", log)
        self.assertIn("device cpu", log)
        self.assertEqual(self.fallback.outputParticles.getSize(), N)

    def test_missing_gpu_without_fallback_fails_clearly(self):
        prot = self.noFallback
        self.assertTrue(prot.isFailed(), prot.getStatus())
        error = prot.getErrorMessage()
        self.assertIn(f"--device cuda:{MISSING_GPU}", error)
        self.assertIn("Fall back to the CPU", error)  # names the field that would let it run
        self.assertTrue("CUDA is not available" in error or "does not exist" in error, error)
        self.assertIn("exit status 2", error)
        self.assertFalse(prot.hasAttribute("outputParticles"))

    def test_fallback_field_on_every_gpu_protocol(self):
        found = []
        for name in dir(flexprotocols):
            cls = getattr(flexprotocols, name)
            if not (isinstance(cls, type) and issubclass(cls, FlexPluginProtBase)) or cls is FlexPluginProtBase:
                continue
            prot = self.project.newProtocol(cls)
            if not prot.allowsGpu():
                continue
            found.append(name)
            param = prot.getParam("allowCpuFallback")
            self.assertIsNotNone(param, name)
            self.assertTrue(prot.allowCpuFallback.get(), f"{name}: the fallback is on by default")
            self.assertEqual(param.expertLevel.get(), params.LEVEL_ADVANCED, name)
            self.assertEqual(len(_sectionsWithFallback(prot)), 1, name)
            self.assertNotIn(_sectionsWithFallback(prot)[0], ("General", params.PARALLELIZATION), f"{name}: hidden")
            self.assertEqual(prot.getEngineEnviron()[FALLBACK_ENV], "1", name)
            prot.allowCpuFallback.set(False)
            self.assertEqual(prot.getEngineEnviron()[FALLBACK_ENV], "0", name)
        self.assertIn("FlexPluginProt3DVA", found)
        self.assertIn("FlexPluginProtTrain", found)

    def test_probe_device_arguments_and_environment(self):
        prot = FallbackProbe()
        self.assertTrue(prot.allowsCpuFallback())
        prot.useGpu.set(True)
        prot.gpuList.set(str(MISSING_GPU))
        # the arguments (step identity) do not depend on the fallback; the environment does
        self.assertEqual(prot.getDeviceArgs(), ["--device", "cuda:%(GPU)s"])
        self.assertEqual(prot.getEngineEnviron()[FALLBACK_ENV], "1")
        prot.allowCpuFallback.set(False)
        self.assertFalse(prot.allowsCpuFallback())
        self.assertEqual(prot.getDeviceArgs(), ["--device", "cuda:%(GPU)s"])
        self.assertEqual(prot.getEngineEnviron()[FALLBACK_ENV], "0")
        self.assertEqual(_sectionsWithFallback(prot), ["Input"])

    def test_engine_error_line_is_found(self):
        log = os.path.join(self.tmp, "run.stderr")
        with open(log, "w") as fh:
            fh.write("error: an old failure\n")
        start = os.path.getsize(log)
        with open(log, "a") as fh:
            fh.write("some progress\nerror: NaN or Inf values in images\nTraceback? no\n")
        self.assertEqual(FlexPluginProtBase._engineError(log, start), "NaN or Inf values in images")
        self.assertIsNone(FlexPluginProtBase._engineError(log, os.path.getsize(log)))
        self.assertIsNone(FlexPluginProtBase._engineError(os.path.join(self.tmp, "missing.log")))

    def test_disk_full_error_tells_the_scipion_way_out(self):
        """Exit status 3 (disk full): the protocol's error keeps the engine's message and adds Scipion's remedy."""
        import subprocess
        from unittest import mock
        prot = FallbackProbe()
        out, err = (os.path.join(self.tmp, f"disk.{s}") for s in ("stdout", "stderr"))
        open(out, "w").close()
        open(err, "w").close()

        def fail(*args, **kwargs):
            with open(err, "a") as fh:
                fh.write("error: No space left on device while writing x.mrc; earlier outputs are intact\n")
            raise subprocess.CalledProcessError(3, "flexplugin")
        with mock.patch.object(prot, "getStdoutLog", return_value=out), \
                mock.patch.object(prot, "getStderrLog", return_value=err), \
                mock.patch.object(prot, "runJob", side_effect=fail):
            with self.assertRaises(RuntimeError) as ctx:
                prot.runEngine("flex-train", [])
        text = str(ctx.exception)
        self.assertIn("flexplugin flex-train failed (exit status 3): No space left on device while writing x.mrc", text)
        self.assertIn("then Continue this run", text)

    # ------------------------------------------------------------------ NaN images, empty set
    def test_nan_images_fail_with_the_engine_message(self):
        prot = self.nan
        self.assertTrue(prot.isFailed(), prot.getStatus())
        error = prot.getErrorMessage()
        self.assertIn(f"NaN or Inf values in images of particle ids [{self.nanId}]", error)
        self.assertIn("re-extract these particles or remove them", error)
        self.assertIn("flexplugin 3dva failed (exit status 2)", error)
        self.assertIn("NaN or Inf values", _log(prot))
        self.assertFalse(prot.hasAttribute("outputParticles"))

    def test_empty_set_is_refused_before_running(self):
        empty = SetOfParticles(filename=os.path.join(self.tmp, "empty.sqlite"))
        empty.copyInfo(self.sim.outputParticles)
        empty.write()
        prot = self.newVA(useGpu=False)
        self.assertEqual(prot.validate(), [])
        prot.inputParticles.set(empty)
        errors = prot.validate()
        self.assertTrue(any("The input particle set is empty" in e for e in errors), errors)
        empty.close()


# ---------------------------------------------------------------------------------------------- killed training
# 1,000 particles: at training box 16 an epoch on 200 particles lasts ~0.1 s, too short a window to kill in
# reliably on a loaded machine; 1,000 make epoch 2 last ~0.5 s (same settings for both runs, so same results)
KILL_N, KILL_BOX, KILL_EPOCHS = 1000, 32, 3
KILL_TRAIN = dict(numberOfLatents=1, trainingBox=16, epochs=KILL_EPOCHS, batchSize=50, layers=2, hiddenUnits=16,
                  seed=3, useGpu=False, numberOfThreads=1)
EPOCH_LINE = "flex-train epoch: {}/" + str(KILL_EPOCHS)
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def _processTree(pid: int) -> list:
    """The process `pid` (the protocol's run process as launched by Scipion) and all its descendants."""
    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def _gone(proc) -> bool:
    """True when the process has ended (a zombie has ended too: it only waits for its parent to reap it)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _reaped(proc) -> bool:
    """True when the process is gone altogether (not even a zombie)."""
    try:
        proc.status()
        return False
    except psutil.NoSuchProcess:
        return True


def _setChildSubreaper(on: bool) -> bool:
    """Make this process a child subreaper (Linux prctl PR_SET_CHILD_SUBREAPER), or stop being one.

    Killed processes whose parent was killed too are re-parented to the nearest subreaper, else to init. Scipion's
    liveness check (pyworkflow.utils.process.isProcessAlive: `psutil.Process(pid)` exists) counts a zombie as alive,
    and some container inits reap orphans late or never: as a subreaper we reap the killed tree ourselves, as a
    desktop's init would at once. Returns False when unavailable (then init must reap them)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        return not _gone(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


class TestKilledTraining(unittest.TestCase):
    """A 3D flex training run SIGKILLed during epoch 2 (no chance to record anything), found dead by a project
    refresh as the GUI does it, continued with Scipion's Continue: it resumes after epoch 1 and ends with the latents
    and canonical map of an uninterrupted run of the same settings in the same project."""

    @classmethod
    def setUpClass(cls):
        cls.cwd = os.getcwd()
        cls.addClassCleanup(os.chdir, cls.cwd)  # also when setUpClass fails (tearDownClass is not called then)
        cls.seconds = {}
        t0 = time.time()
        project = cls.project = scipion_project.newProject("faults_kill")
        cls.sim = scipion_project.runSimulate(project, numberOfParticles=KILL_N, boxSize=KILL_BOX, pixelSize=4.0,
                                              snr=1.0, seed=1, stackSize=KILL_N)
        mesh = project.newProtocol(FlexPluginProtMeshPrep, objLabel="mesh", numberOfCells=8)
        mesh.inputVolume.set(cls.sim)
        mesh.inputVolume.setExtended("outputVolume")
        cls.mesh = scipion_project.launch(project, cls.checked(mesh))
        cls.seconds["simulate + mesh"] = time.time() - t0

        t0 = time.time()
        cls.ref = scipion_project.launch(project, cls.newTrain("uninterrupted"))
        cls.seconds["uninterrupted"] = time.time() - t0

        t0 = time.time()
        prot = cls.killed = cls.newTrain("killed and continued")
        # orphans of the killed tree become our children, so we reap them at once (see _setChildSubreaper)
        cls.subreaper = _setChildSubreaper(True)
        try:
            project.launchProtocol(prot, wait=False)  # as the GUI does: a subprocess running pw_protocol_run.py
            try:
                cls.killedTree = cls.killDuringEpoch2(prot)
            finally:
                if prot.getPid() and _alive(prot.getPid()):  # whatever went wrong, leave nothing running
                    for proc in _processTree(prot.getPid()):
                        proc.kill()
        finally:
            _setChildSubreaper(False)
        cls.seconds["until killed"] = time.time() - t0
        cls.killedLog = cls.readLog(prot)
        cls.killedLogSize = len(cls.killedLog)
        cls.afterKill = {name: open(prot._getTrainDir(name), "rb").read() if os.path.exists(prot._getTrainDir(name))
                         else None for name in ("checkpoint.pt", "model.pt")}
        # what the project database says before anybody looks: the run.db still says running
        cls.statusInRunDb = getProtocolFromDb(project.path, prot.getDbPath(), prot.getObjId()).getStatus()

        # the GUI's refresh: Project.getRuns(refresh=True, checkPids=True) checks the pid of every active run
        runs = {r.getObjId(): r for r in project.getRuns(refresh=True, checkPids=True)}
        cls.dead = runs[prot.getObjId()]
        cls.deadStatus, cls.deadError = cls.dead.getStatus(), cls.dead.getErrorMessage()
        cls.deadPid = (cls.dead.getPid(), _alive(cls.dead.getPid()) if cls.dead.getPid() else None)

        # Scipion's Continue on that run, as the GUI would launch it
        t0 = time.time()
        cls.dead.runMode.set(MODE_RESUME)
        cls.cont = scipion_project.launch(project, cls.dead, check=False)
        cls.seconds["continue"] = time.time() - t0

    @classmethod
    def tearDownClass(cls):
        print(f"killed training timings (s): { {k: round(v, 2) for k, v in cls.seconds.items()} }")

    @classmethod
    def checked(cls, prot):
        errors = prot.validate()
        if errors:
            raise AssertionError(f"{prot.getRunName()} does not validate: {errors}")
        return prot

    @classmethod
    def newTrain(cls, label: str) -> FlexPluginProtTrain:
        prot = cls.project.newProtocol(FlexPluginProtTrain, objLabel=label, **KILL_TRAIN)
        prot.inputParticles.set(cls.sim)
        prot.inputParticles.setExtended("outputParticles")
        prot.inputVolume.set(cls.sim)
        prot.inputVolume.setExtended("outputVolume")
        prot.meshRun.set(cls.mesh)
        return cls.checked(prot)

    @staticmethod
    def readLog(prot) -> str:
        path = prot.getStdoutLog()
        return open(path, errors="replace").read() if os.path.exists(path) else ""

    @classmethod
    def killDuringEpoch2(cls, prot) -> list:
        """Wait until epoch 1 is reported (it is checkpointed before the report and epoch 2 starts right after), then
        SIGKILL the protocol's process and every descendant (the runJob shell and the engine); returns their pids.

        The protocol's processes share the test's process group (pyworkflow's Popen starts no new session), so
        the tree is killed process by process, the protocol's own process first so nothing is started anew."""
        pid = prot.getPid()
        if not pid:
            raise AssertionError(f"no pid after launching {prot.getRunName()}: {prot.getStatus()}")
        deadline = time.monotonic() + 600
        while EPOCH_LINE.format(1) not in cls.readLog(prot):
            if not _alive(pid):
                raise AssertionError("the training protocol ended before epoch 1 was reported:\n" + cls.readLog(prot))
            if time.monotonic() > deadline:
                raise AssertionError("epoch 1 not reported after 600 s:\n" + cls.readLog(prot))
            time.sleep(0.02)
        seen = time.monotonic()
        tree = _processTree(pid)
        names = [" ".join(p.cmdline())[:200] for p in tree]
        for proc in tree:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        cls.seconds["epoch 1 seen -> killed"] = time.monotonic() - seen  # epoch 2 lasts ~0.5 s (not asserted)
        # reap them: an unreaped zombie still counts as alive for Scipion's pid check (isProcessAlive)
        for proc in tree:
            try:
                os.waitpid(proc.pid, 0)  # our child, or re-parented to us as we are a child subreaper
            except ChildProcessError:
                pass  # not ours (no subreaper support): init reaps it
        deadline = time.monotonic() + 60
        while not all(_reaped(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        return [(p.pid, name, _reaped(p)) for p, name in zip(tree, names)]

    # ------------------------------------------------------------------ the kill
    def test_kill_hit_epoch_2_of_a_live_engine(self):
        log = self.killedLog
        self.assertIn(EPOCH_LINE.format(1), log)
        self.assertNotIn(EPOCH_LINE.format(2), log,
                         "epoch 2 finished before the kill: the test did not kill mid-epoch (make the data larger)")
        # the tree held the protocol's process and the engine, and none of them is running any more
        names = [name for _, name, _ in self.killedTree]
        self.assertTrue(any("pw_protocol_run.py" in n for n in names), names)
        self.assertTrue(any("flex-train" in n and not n.startswith(("/bin/sh", "sh ")) for n in names), names)
        self.assertTrue(all(gone for _, _, gone in self.killedTree), f"still there: {self.killedTree}")
        self.assertIsNotNone(self.afterKill["checkpoint.pt"], "no checkpoint after epoch 1")
        self.assertIsNone(self.afterKill["model.pt"], "the killed run must not have final outputs")
        st = torch.load(io.BytesIO(self.afterKill["checkpoint.pt"]), map_location="cpu", weights_only=False)
        self.assertEqual(st["epoch"], 1)

    def test_refresh_finds_the_dead_run_failed(self):
        self.assertEqual(self.statusInRunDb, STATUS_RUNNING, "a SIGKILLed run cannot record its end")
        self.assertEqual(self.deadStatus, STATUS_FAILED, f"pid checked (pid, alive): {self.deadPid}; killed "
                                                         f"(pid, ended): {self.killedTree}")
        self.assertIn("not found running", self.deadError)

    # ------------------------------------------------------------------ Scipion's Continue
    def test_continue_finishes_after_the_finished_epoch(self):
        prot = self.cont
        log = self.readLog(prot)
        self.assertTrue(prot.isFinished(), f"{prot.getStatus()}: {prot.getErrorMessage()}\n{log}")
        resumed = log[self.killedLogSize:]
        self.assertIn("--continue", resumed)
        self.assertIn("flex-train: continuing after epoch 1", resumed)
        self.assertNotIn(EPOCH_LINE.format(1), resumed, "the finished epoch 1 was trained again")
        self.assertIn(EPOCH_LINE.format(2), resumed)
        self.assertIn(EPOCH_LINE.format(KILL_EPOCHS), resumed)
        self.assertEqual(log.count(f"Wrote {KILL_N} particles"), 1, "Continue redid the finished conversion step")
        self.assertEqual(prot.getTrainInfo()["epochs_done"], KILL_EPOCHS)
        # epoch 1's history entry is the killed run's own record, not a re-run
        before = torch.load(io.BytesIO(self.afterKill["checkpoint.pt"]), map_location="cpu",
                            weights_only=False)["history"]
        after = torch.load(prot._getTrainDir("checkpoint.pt"), map_location="cpu", weights_only=False)["history"]
        self.assertEqual(len(after), KILL_EPOCHS)
        self.assertEqual(after[0], before[0])

    def test_continued_equals_uninterrupted(self):
        prot, ref = self.cont, self.ref
        self.assertTrue(prot.isFinished(), prot.getErrorMessage())
        z = {p.getObjId(): p.getZFlex() for p in prot.outputParticles.iterItems()}
        zRef = {p.getObjId(): p.getZFlex() for p in ref.outputParticles.iterItems()}
        self.assertEqual(sorted(z), sorted(zRef))
        self.assertEqual(len(z), KILL_N)
        ids = sorted(zRef)
        np.testing.assert_allclose(np.array([z[i] for i in ids]), np.array([zRef[i] for i in ids]), rtol=0,
                                   atol=1e-6)
        self.assertGreater(np.ptp(np.array([zRef[i] for i in ids])), 1e-3, "latents are all equal: nothing compared")
        mine, theirs = prot.outputVolume.getFileName(), ref.outputVolume.getFileName()
        self.assertNotEqual(os.path.abspath(mine), os.path.abspath(theirs))
        with mrcfile.open(mine) as a, mrcfile.open(theirs) as b:
            self.assertGreater(float(b.data.std()), 0.0)
            np.testing.assert_allclose(a.data, b.data, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- convert, disk full
def _temps(folder: str) -> list:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files
                  if atomic.TEMP_TAG in f)


def _fullDiskAfter(nbytes: int):
    """A writer stand-in that writes `nbytes` of junk to its output path, then fails as a full disk does."""
    def write(*args, **kwargs):
        out = next(str(a) for a in list(args) + list(kwargs.values()) if isinstance(a, (str, os.PathLike))
                   and str(a).endswith((".star", ".mrcs", ".tmp")))
        with open(out, "wb") as fh:
            fh.write(b"x" * nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), out)
    return write


class TestConvertDiskFull(ParticleSetCase):
    """convert.writeSetOfParticles (what every protocol's conversion step runs) on a full disk: the engine's STAR
    and the converted .mrcs stacks are written atomically, the previous file survives and no temp file is left."""

    def test_enospc_during_the_star_write_keeps_the_previous_file(self):
        parts, _ = self.makeSet(spiderStack=False)
        star = self.path("input", "particles.star")
        self.assertEqual(convert.writeSetOfParticles(parts, star), len(self.IDS))
        before = open(star, "rb").read()
        self.assertIn(b"rlnImageId", before)
        with mock.patch.object(engine_io.starfile, "write", _fullDiskAfter(100)):
            with self.assertRaises(DiskFullError) as ctx:
                convert.writeSetOfParticles(parts, star)
        message = str(ctx.exception)
        self.assertIn("No space left on device while writing", message)
        self.assertIn(star, message)
        self.assertIn("nothing was half-written", message)
        self.assertEqual(ctx.exception.errno, errno.ENOSPC)
        self.assertEqual(open(star, "rb").read(), before, "the previous STAR file was damaged")
        self.assertEqual(_temps(self.tmp), [])
        self.assertEqual(len(read_particles(star).table), len(self.IDS))

    def test_enospc_during_a_stack_conversion_leaves_no_stack(self):
        parts, _ = self.makeSet(spiderStack=True)  # one SPIDER stack: converted to .mrcs beside the STAR
        stacks = self.path("input", "stacks")
        star = self.path("input", "particles.star")
        with mock.patch.object(ImageHandler, "convertStack", _fullDiskAfter(100)):
            with self.assertRaises(DiskFullError) as ctx:
                convert.writeSetOfParticles(parts, star, outputDir=stacks)
        self.assertIn("No space left on device while writing", str(ctx.exception))
        self.assertIn(os.path.join(stacks, "particles_b.mrcs"), str(ctx.exception))
        self.assertEqual(os.listdir(stacks), [], "a half-written stack or temp file was left")
        self.assertFalse(os.path.exists(star))

        # xmipp reports a failed write without an errno: a full disk when the stack cannot fit, else its own error
        def xmippFails(handler, src, dst, *args, **kwargs):
            with open(dst, "wb") as fh:
                fh.write(b"x" * 10)
            raise RuntimeError("xmipp: cannot write image")
        full = shutil.disk_usage(self.tmp)._replace(free=0)
        with mock.patch.object(ImageHandler, "convertStack", xmippFails), \
                mock.patch.object(convert.shutil, "disk_usage", return_value=full):
            with self.assertRaises(DiskFullError):
                convert.writeSetOfParticles(parts, star, outputDir=stacks)
        with mock.patch.object(ImageHandler, "convertStack", xmippFails):
            with self.assertRaisesRegex(RuntimeError, "xmipp: cannot write image"):
                convert.writeSetOfParticles(parts, star, outputDir=stacks)
        self.assertEqual(os.listdir(stacks), [])

        # with room, the stack and the STAR are written and nothing else
        self.assertEqual(convert.writeSetOfParticles(parts, star, outputDir=stacks), len(self.IDS))
        self.assertEqual(os.listdir(stacks), ["particles_b.mrcs"])
        self.assertEqual(_temps(self.tmp), [])
        with mrcfile.open(os.path.join(stacks, "particles_b.mrcs")) as m:
            self.assertEqual(m.data.shape[0], len(self.IDS) - len(self.IDS) // 2)


if __name__ == "__main__":
    unittest.main()
