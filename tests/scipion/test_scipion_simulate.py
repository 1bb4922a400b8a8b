"""Headless Scipion: run FlexPluginProtSimulate in a real project and check its outputs end to end."""
import os
import shutil
import tempfile
import time
import unittest

import numpy as np
import pandas as pd

from pwem.constants import ALIGN_NONE, ALIGN_PROJ
from pwem.objects import SetOfParticles, Volume, VolumeMask

from flexplugin import convert
from flexplugin.engine.geometry import euler_to_matrix_np, relion_from_scipion_matrix
from flexplugin.engine.io import read_particles, read_volume, split_image_name, write_volume
from flexplugin.protocols import FlexPluginProtBase

from ..helpers import scipion_project  # noqa: F401  (sets up Scipion's environment before pyworkflow is imported)

__all__ = ["TestSimulateProtocol"]  # what tests/scipion/__init__.py re-exports

N, BOX, APIX = 200, 32, 4.0


class InputProbe(FlexPluginProtBase):
    """A protocol with the shared inputs, to run the base class's checks on real outputs."""

    _label = "input probe"

    def _defineParams(self, form):
        self._defineGpuParams(form)
        form.addSection(label="Input")
        self._defineParticlesParam(form)
        self._defineVolumeParam(form)
        self._defineMaskParam(form)


class TestSimulateProtocol(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cwd = os.getcwd()
        t0 = time.time()
        cls.project = scipion_project.newProject("simulate")
        cls.prot = scipion_project.runSimulate(cls.project, numberOfParticles=N, boxSize=BOX, pixelSize=APIX,
                                               snr=0.5, seed=2, stackSize=150)
        cls.seconds = time.time() - t0
        cls.star = cls.prot._getExtraPath("data", "particles.star")

    @classmethod
    def tearDownClass(cls):
        os.chdir(cls.cwd)

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="flexplugin_simulate_")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def log(self) -> str:
        return open(self.prot.getStdoutLog()).read()

    def test_finished_with_outputs(self):
        self.assertTrue(self.prot.isFinished(), self.log())
        self.assertEqual(self.prot._validate(), [])
        parts = self.prot.outputParticles
        self.assertIsInstance(parts, SetOfParticles)
        self.assertIsInstance(self.prot.outputVolume, Volume)
        self.assertIsInstance(self.prot.outputMask, VolumeMask)
        self.assertEqual(parts.getSize(), N)
        self.assertEqual(parts.getAlignment(), ALIGN_PROJ)
        self.assertTrue(parts.hasCTF())
        self.assertFalse(parts.isPhaseFlipped())
        self.assertAlmostEqual(parts.getSamplingRate(), APIX)
        self.assertEqual(parts.getDim(), (BOX, BOX, 1))
        self.assertEqual(parts.getAcquisition().getVoltage(), 300.0)
        self.assertEqual(parts.getAcquisition().getSphericalAberration(), 2.7)
        self.assertEqual(parts.getAcquisition().getAmplitudeContrast(), 0.1)
        self.assertEqual([p.getObjId() for p in parts.iterItems(orderBy="id")], list(range(1, N + 1)))
        for obj in (self.prot.outputVolume, self.prot.outputMask):
            self.assertAlmostEqual(obj.getSamplingRate(), APIX)
            self.assertEqual(obj.getDim(), (BOX, BOX, BOX))
            self.assertFalse(os.path.isabs(obj.getFileName()))
        _, vapix = read_volume(self.prot.outputVolume.getFileName())
        self.assertAlmostEqual(vapix, APIX, places=4)
        self.assertIn(f"{N} particles", self.prot.summary()[0])
        self.assertTrue(self.prot.methods())
        self.assertLess(self.seconds, 45, "project + simulate should take seconds")

    def test_outputs_survive_reloading_the_project(self):
        project = scipion_project.reloadProject(self.project)
        prot = project.getProtocol(self.prot.getObjId())
        parts = prot.outputParticles
        self.assertEqual(parts.getSize(), N)
        self.assertEqual(parts.getAlignment(), ALIGN_PROJ)
        self.assertTrue(parts.hasCTF())

    def test_particles_match_star_by_id(self):
        ps = read_particles(self.star)
        rows = {int(i): r for i, r in zip(ps.ids, ps.table.to_dict("records"))}
        parts = self.prot.outputParticles
        stacks = set()
        for p in parts.iterItems(orderBy="id"):
            r = rows[p.getObjId()]
            with self.subTest(particle=p.getObjId()):
                rot, tilt, psi, sx, sy = relion_from_scipion_matrix(p.getTransform().getMatrix())
                np.testing.assert_allclose(euler_to_matrix_np(rot, tilt, psi),
                                           euler_to_matrix_np(r["rlnAngleRot"], r["rlnAngleTilt"],
                                                              r["rlnAnglePsi"]), atol=1e-6)
                np.testing.assert_allclose([sx * APIX, sy * APIX], [r["rlnOriginXAngst"], r["rlnOriginYAngst"]],
                                           atol=1e-5)
                ctf = p.getCTF()
                self.assertAlmostEqual(ctf.getDefocusU(), r["rlnDefocusU"], places=3)
                self.assertAlmostEqual(ctf.getDefocusV(), r["rlnDefocusV"], places=3)
                self.assertAlmostEqual(ctf.getDefocusAngle(), r["rlnDefocusAngle"], places=3)
                index, fn = p.getLocation()
                self.assertFalse(os.path.isabs(fn))
                self.assertEqual((index, os.path.abspath(fn)), split_image_name(r["rlnImageName"]))
                self.assertEqual(getattr(p, convert.RANDOM_SUBSET_ATTR).get(), r["rlnRandomSubset"])
                stacks.add(fn)
        self.assertEqual(len(stacks), 2)  # 200 particles, 150 per stack

    def test_conversion_round_trip_on_outputs(self):
        star = os.path.join(self.tmp, "again.star")
        n = convert.writeSetOfParticles(self.prot.outputParticles, star)
        self.assertEqual(n, N)
        original, again = read_particles(self.star), read_particles(star)
        a = original.table.set_index("rlnImageId").sort_index()
        b = again.table.set_index("rlnImageId").sort_index()
        self.assertEqual(a.index.tolist(), b.index.tolist())
        Ra = original.rotations(np.argsort(original.ids)).double().numpy()
        Rb = again.rotations(np.argsort(again.ids)).double().numpy()
        np.testing.assert_allclose(Ra, Rb, atol=1e-5)
        for col in ("rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
                    "rlnPhaseShift", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
            np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), atol=1e-4, err_msg=col)
        self.assertEqual(a["rlnImageName"].tolist(), b["rlnImageName"].tolist())
        self.assertEqual(a["rlnRandomSubset"].tolist(), b["rlnRandomSubset"].tolist())
        np.testing.assert_array_equal(original.images(np.argsort(original.ids)[:20]),
                                      again.images(np.argsort(again.ids)[:20]))
        truth = pd.read_csv(self.prot._getExtraPath("data", "ground_truth.csv"))
        self.assertEqual(sorted(truth.rlnImageId), list(range(1, N + 1)))

    def test_base_checks_on_real_inputs(self):
        prot = self.project.newProtocol(InputProbe)
        prot.useGpu.set(False)
        prot.inputParticles.set(self.prot)
        prot.inputParticles.setExtended("outputParticles")
        prot.inputVolume.set(self.prot)
        prot.inputVolume.setExtended("outputVolume")
        prot.inputMask.set(self.prot)
        prot.inputMask.setExtended("outputMask")
        self.assertEqual(prot._validate(), [])
        # writing the input STAR through the base class gives the same particles
        prot.workingDir.set(os.path.join(self.tmp, "probe"))
        star = prot.writeInputParticles()
        self.assertEqual(sorted(read_particles(star).ids.tolist()), list(range(1, N + 1)))

        wrongVolume = Volume(location=self.prot.outputVolume.getFileName())
        wrongVolume.setSamplingRate(APIX * 2)
        self.assertTrue(any("pixel size" in e for e in prot._validateMatchesParticles(
            wrongVolume, self.prot.outputParticles, "volume")))
        small = os.path.join(self.tmp, "small.mrc")
        write_volume(small, np.zeros((BOX // 2,) * 3, np.float32), APIX)
        smallVolume = Volume(location=small)
        smallVolume.setSamplingRate(APIX)
        self.assertTrue(any("voxels wide" in e for e in prot._validateMatchesParticles(
            smallVolume, self.prot.outputParticles, "volume")))

        unaligned = SetOfParticles(filename=os.path.join(self.tmp, "unaligned.sqlite"))
        unaligned.copyInfo(self.prot.outputParticles)
        unaligned.setAlignment(ALIGN_NONE)
        unaligned.setHasCTF(False)
        errors = prot._validateParticles(unaligned)
        self.assertTrue(any("empty" in e for e in errors))
        self.assertTrue(any("3D alignment" in e for e in errors))
        self.assertTrue(any("no CTF" in e for e in errors))


if __name__ == "__main__":
    unittest.main()
