"""Faults at the Scipion level, in a real headless project on tiny simulated data: a GPU id that does not exist
(the CPU-fallback field on, then off), NaN images (caught by the engine mid-run: the protocol fails with the
engine's message as its error), an empty particle set, and the CPU-fallback field on every GPU protocol.

Disk full and a killed training are tested on the CLI the protocols run (tests/test_faults.py).
"""
from . import scipion_project  # noqa: F401  (sets up Scipion's environment before pyworkflow is imported)

import os
import shutil
import tempfile
import time
import unittest

import mrcfile
import numpy as np
import torch

import pyworkflow.protocol.params as params
from pwem.objects import SetOfParticles

from flexplugin import protocols as flexprotocols
from flexplugin.protocols import FlexPluginProt3DVA, FlexPluginProtBase

__all__ = ["TestFaultProtocols"]  # what tests/__init__.py re-exports

N, BOX, APIX = 80, 16, 4.0
NAN_INDEX = 5  # the image (1-based, in the stack) made NaN
MISSING_GPU = torch.cuda.device_count() + 3
FALLBACK_ENV = "FLEXPLUGIN_CPU_FALLBACK"


class FallbackProbe(FlexPluginProtBase):
    """A protocol with the shared GPU fields and one section (not part of the plugin)."""

    _label = "cpu fallback probe"

    def _defineParams(self, form):
        self._defineGpuParams(form)
        form.addSection(label="Input")
        form.addParam("dummy", params.IntParam, default=1)


def _log(prot) -> str:
    out, err, _ = prot.getLogsAsStrings()
    return out + err


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


if __name__ == "__main__":
    unittest.main()
