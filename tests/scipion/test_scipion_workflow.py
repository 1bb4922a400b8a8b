"""Headless Scipion: the whole flexplugin workflow (the README tutorial) chained in one real project, tiny data.

simulate (stacks split over several files) → 3D variability analysis → 3D variability display in its three modes →
3D flex mesh prep (on the 3DVA consensus) → 3D flex training seeded from the 3DVA coordinates (zFlex, by particle
id) → 3D flex generate → 3D flex reconstruction. Every output is checked for its class, size, ids (the simulated ids
all the way through), sampling rate, zFlex dimensions, FlexInfo and files.
"""
import os
import unittest

import numpy as np
import pandas as pd

from pwem.constants import ALIGN_PROJ
from pwem.objects import (
    EMFile,
    ParticleFlex,
    SetOfClasses3D,
    SetOfFSCs,
    SetOfParticlesFlex,
    SetOfVolumes,
    SetOfVolumesFlex,
    Volume,
    VolumeFlex,
    VolumeMask,
)

from flexplugin.engine.io import read_particles
from flexplugin.engine.latents import latent_columns
from flexplugin.protocols import FLEX_PROGNAME, VA3D_PROGNAME
from flexplugin.tutorial import PRESETS, TutorialRun

from ..helpers import scipion_project  # noqa: F401  (sets up Scipion's environment before pyworkflow is imported)

__all__ = ["TestWorkflow"]  # what tests/scipion/__init__.py re-exports

PRESET = PRESETS["tiny"]
N, BOX, APIX = PRESET.particles, PRESET.box, PRESET.apix
K_VA, K, TRAIN_BOX = PRESET.va_components, PRESET.latents, PRESET.training_box
APIX_TRAIN = APIX * BOX / TRAIN_BOX
FRAMES = PRESET.generate_frames


_log = scipion_project.logText


class TestWorkflow(unittest.TestCase):
    """The README tutorial's chain (flexplugin.tutorial), run with its tiny preset."""

    @classmethod
    def setUpClass(cls):
        cls.cwd = os.getcwd()
        cls.project = scipion_project.newProject("workflow")
        cls.tutorial = TutorialRun(cls.project, PRESET)
        prots = cls.tutorial.run()
        cls.sim, cls.va, cls.mesh = prots["simulate"], prots["3dva"], prots["mesh"]
        cls.train, cls.generate, cls.recon = prots["train"], prots["generate"], prots["reconstruct"]
        cls.displays = {m: prots[f"display_{m}"] for m in ("simple", "intermediates", "cluster")}

    @classmethod
    def tearDownClass(cls):
        seconds = cls.tutorial.seconds
        print(f"workflow timings (s): { {k: round(v, 1) for k, v in seconds.items()} }, "
              f"total {sum(seconds.values()):.0f} s")
        os.chdir(cls.cwd)

    def simIds(self) -> list[int]:
        return sorted(p.getObjId() for p in self.sim.outputParticles.iterItems())

    def checkParticles(self, parts, progName: str, k: int) -> None:
        """A SetOfParticlesFlex of the simulated particles (ids, poses, CTF, stacks) with k coordinates each."""
        self.assertIsInstance(parts, SetOfParticlesFlex)
        self.assertEqual(parts.getSize(), N)
        self.assertEqual(parts.getFlexInfo().getProgName(), progName)
        self.assertEqual(parts.getAlignment(), ALIGN_PROJ)
        self.assertTrue(parts.hasCTF())
        self.assertAlmostEqual(parts.getSamplingRate(), APIX)
        inputs = {p.getObjId(): p.clone() for p in self.sim.outputParticles.iterItems()}
        ids = []
        for p in parts.iterItems(orderBy="id"):
            ids.append(p.getObjId())
            self.assertIsInstance(p, ParticleFlex)
            self.assertEqual(len(p.getZFlex()), k)
            q = inputs[p.getObjId()]
            np.testing.assert_allclose(p.getTransform().getMatrix(), q.getTransform().getMatrix(), atol=1e-9)
            self.assertAlmostEqual(p.getCTF().getDefocusV(), q.getCTF().getDefocusV())
            self.assertEqual(p.getLocation(), q.getLocation())
        self.assertEqual(ids, self.simIds())

    def test_all_ran(self):
        for prot in (self.sim, self.va, self.mesh, self.train, self.generate, self.recon, *self.displays.values()):
            self.assertTrue(prot.isFinished(), prot.getRunName())
            self.assertEqual(prot.validate(), [], prot.getRunName())
        # the run labels the tutorial gives are what the project (and the GUI's graph) shows
        runs = {r.getObjLabel() for r in scipion_project.reloadProject(self.project).getRuns()}
        self.assertLessEqual({"3DVA display simple", "3DVA display intermediates", "3DVA display cluster",
                              "3D flex training (seeded by 3DVA)"}, runs)

    def test_3dva_outputs(self):
        self.checkParticles(self.va.outputParticles, VA3D_PROGNAME, K_VA)
        info = self.va.outputParticles.getFlexInfo()
        self.assertEqual(info.getAttr("K"), K_VA)
        self.assertTrue(os.path.exists(os.path.join(info.getAttr("runPath"), "latents.csv")))
        self.assertIsInstance(self.va.outputVolume, Volume)
        self.assertAlmostEqual(self.va.outputVolume.getSamplingRate(), APIX)
        self.assertIsInstance(self.va.outputComponents, SetOfVolumes)
        self.assertEqual(self.va.outputComponents.getSize(), K_VA)

    def test_3dva_display_modes(self):
        """Frames per component (simple, intermediates) and clusters of the 3DVA particles, by id."""
        for mode in ("simple", "intermediates"):
            disp = self.displays[mode]
            for c in range(1, K_VA + 1):
                vols = getattr(disp, f"outputComponent_{c}")
                self.assertIsInstance(vols, SetOfVolumes)
                self.assertGreaterEqual(vols.getSize(), 2, mode)
                self.assertLessEqual(vols.getSize(), PRESET.display_frames, mode)
                self.assertAlmostEqual(vols.getSamplingRate(), APIX)
                for vol in vols.iterItems():
                    self.assertEqual(vol.getDim(), (BOX,) * 3)
                    self.assertTrue(os.path.exists(vol.getFileName()))
        # simple mode never drops a frame (no particles are read)
        self.assertEqual(self.displays["simple"].outputComponent_1.getSize(), PRESET.display_frames)
        classes = self.displays["cluster"].outputClasses
        self.assertIsInstance(classes, SetOfClasses3D)
        self.assertEqual(classes.getSize(), PRESET.cluster_count)
        members = sorted(p.getObjId() for cls in classes.iterItems() for p in cls.iterItems())
        self.assertEqual(members, self.simIds())  # every 3DVA particle in exactly one cluster, by id

    def test_mesh_on_3dva_consensus(self):
        self.assertIsInstance(self.mesh.outputMask, VolumeMask)
        self.assertIsInstance(self.mesh.outputMesh, EMFile)
        self.assertAlmostEqual(self.mesh.getMeshExtent(), BOX * APIX)
        for name, path in self.mesh.getMeshFiles().items():
            self.assertTrue(os.path.exists(path), name)

    def test_training_seeded_from_3dva(self):
        train = self.train
        # the seed file is the 3DVA's zFlex by particle id; components 1 and 2 seed the two latent dims
        seed = pd.read_csv(train._getInitLatentsFile()).set_index("rlnImageId")
        self.assertEqual(list(seed.columns), latent_columns(K_VA))
        self.assertEqual(sorted(seed.index), self.simIds())
        zva = {p.getObjId(): p.getZFlex() for p in self.va.outputParticles.iterItems()}
        for pid, z in zva.items():
            np.testing.assert_allclose(seed.loc[pid].to_numpy(), z, rtol=1e-6, atol=1e-6)
        log = _log(train)
        self.assertIn("--init-latents", log)
        self.assertIn("--init-idxs 0,1", log)
        self.assertIn(f"--k {K}", log)

        self.checkParticles(train.outputParticles, FLEX_PROGNAME, K)
        info = train.outputParticles.getFlexInfo()
        self.assertEqual(info.getAttr("latentDim"), K)
        self.assertEqual(info.getAttr("trainingBox"), TRAIN_BOX)
        self.assertAlmostEqual(info.getAttr("trainingSamplingRate"), APIX_TRAIN)
        self.assertEqual(info.getAttr("meshPath"), self.mesh.getMeshFile())
        for attr in ("modelPath", "checkpointPath", "meshPath"):
            self.assertTrue(os.path.exists(info.getAttr(attr)), attr)
        self.assertAlmostEqual(train.outputVolume.getSamplingRate(), APIX_TRAIN)
        self.assertEqual(train.outputVolume.getDim(), (TRAIN_BOX,) * 3)

        # two epochs from the seed keep its order: latent 1 still follows 3DVA component 1, particle by particle
        ids = self.simIds()
        latent = {p.getObjId(): p.getZFlex()[0] for p in train.outputParticles.iterItems()}
        r = np.corrcoef([latent[i] for i in ids], [zva[i][0] for i in ids])[0, 1]
        self.assertGreater(abs(r), 0.9, f"latent 1 vs 3DVA component 1: r = {r:.3f}")

    def test_generate(self):
        gen = self.generate
        latents = np.array([p.getZFlex() for p in self.train.outputParticles.iterItems()])
        for k in range(K):
            vols = getattr(gen, f"outputVolumes_{k + 1}")
            self.assertIsInstance(vols, SetOfVolumesFlex)
            self.assertEqual(vols.getSize(), FRAMES)
            self.assertAlmostEqual(vols.getSamplingRate(), APIX_TRAIN)
            info = vols.getFlexInfo()
            self.assertEqual(info.getProgName(), FLEX_PROGNAME)
            self.assertEqual(info.getAttr("modelPath"), self.train._getTrainDir("model.pt"))
            self.assertEqual(info.getAttr("series"), f"latent axis {k + 1}")
            z = []
            for vol in vols.iterItems(orderBy="id"):
                self.assertIsInstance(vol, VolumeFlex)
                self.assertTrue(os.path.exists(vol.getFileName()))
                self.assertEqual(vol.getDim(), (TRAIN_BOX,) * 3)
                self.assertAlmostEqual(vol.getSamplingRate(), APIX_TRAIN)
                z.append(vol.getZFlex())
            z = np.array(z)
            self.assertEqual(z.shape, (FRAMES, K))
            np.testing.assert_allclose(z[[0, -1], k], np.percentile(latents[:, k], [1, 99]), rtol=1e-4, atol=1e-5)
        self.assertFalse(hasattr(gen, f"outputVolumes_{K + 1}"))
        self.assertTrue(os.path.exists(gen.getAtlasFile()))

    def test_reconstruction(self):
        recon = self.recon
        info = recon.getReconstructInfo()
        self.assertEqual(info["particles"], N)
        star = read_particles(recon._getInputStarFile())
        self.assertEqual(sorted(int(i) for i in star.ids), self.simIds())  # the particles went by id
        for name in ("outputVolumeFlex", "outputVolumeNoflex"):
            vol = getattr(recon, name)
            self.assertIsInstance(vol, Volume)
            self.assertAlmostEqual(vol.getSamplingRate(), APIX)
            self.assertEqual(vol.getDim(), (BOX,) * 3)
            self.assertTrue(all(os.path.exists(f) for f in [vol.getFileName()] + list(vol.getHalfMaps().split(","))))
        self.assertIsInstance(recon.outputFSCs, SetOfFSCs)
        labels = [f.getObjLabel() for f in recon.outputFSCs.iterItems(orderBy="id")]
        self.assertEqual(labels[:2], ["3D flex", "noflex (rigid)"])  # half-map FSCs, then the corrected masked ones
        self.assertEqual(len(labels), 4, labels)
        self.assertTrue(all("corrected by phase randomisation" in label for label in labels[2:]), labels)
        for path in recon.getPlotFiles().values():
            self.assertTrue(os.path.exists(path))


if __name__ == "__main__":
    unittest.main()
