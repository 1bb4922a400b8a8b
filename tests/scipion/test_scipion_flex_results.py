"""Headless Scipion: 3D flex generate and 3D flex reconstruction in a real project on tiny simulated data.

One tiny training (simulate, mesh prep, 2 epochs at a 16 px training box) feeds: generation along the latent axes
(from the training run), at custom points at the full box (from the training's SetOfParticlesFlex) and at the mean
latent of a subset; a reconstruction with an FSC mask. Checks the SetOfVolumesFlex outputs against the engine's
points.csv, the maps, half maps and FSC objects against the engine's files, validation of bad inputs, the protocol
tree and that the viewers show existing files.
"""
import functools
import os
import shutil
import tempfile
import unittest

import mrcfile
import numpy as np
import pandas as pd

from pwem.objects import (
    FSC,
    SetOfFSCs,
    SetOfParticles,
    SetOfParticlesFlex,
    SetOfVolumesFlex,
    Volume,
    VolumeFlex,
    VolumeMask,
)
from pwem.protocols import ProtSplitSet
from pyworkflow.viewer import MessageView

from flexplugin.protocols import (
    FLEX_PROGNAME,
    FlexPluginProtGenerate,
    FlexPluginProtMeshPrep,
    FlexPluginProtReconstruct,
    FlexPluginProtTrain,
)

from ..helpers import scipion_project  # noqa: F401  (sets up Scipion's environment before pyworkflow is imported)
from ..helpers.scipion_views import hub_sections, open_viewer

__all__ = ["TestFlexResultsProtocols"]  # what tests/scipion/__init__.py re-exports

N, BOX, APIX = 300, 32, 4.0
K, TRAIN_BOX, EPOCHS = 2, 16, 2
APIX_TRAIN = APIX * BOX / TRAIN_BOX
FRAMES, GRID = 5, 3
POINTS = [[-0.5, 0.25], [0.75, -1.0]]
CPU = dict(useGpu=False, numberOfThreads=1)


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


_point = scipion_project.point
_log = scipion_project.logText
_writeMap = functools.partial(scipion_project.writeMap, value=1.0)


class TestFlexResultsProtocols(scipion_project.ProjectRuns, unittest.TestCase):
    timingsLabel = "flex results protocol"

    @classmethod
    def setUpClass(cls):
        cls.cwd = os.getcwd()
        cls.seconds = {}
        project = cls.project = scipion_project.newProject("flexresults")
        cls.sim = cls.timed("simulate", lambda: scipion_project.runSimulate(
            project, numberOfParticles=N, boxSize=BOX, pixelSize=APIX, snr=0.5, seed=4, stackSize=N))

        mesh = project.newProtocol(FlexPluginProtMeshPrep, objLabel="mesh", numberOfCells=8)
        _point(mesh.inputVolume, cls.sim, "outputVolume")
        _point(mesh.inputMask, cls.sim, "outputMask")
        cls.mesh = cls.launch("mesh", mesh)

        train = project.newProtocol(FlexPluginProtTrain, objLabel="train", numberOfLatents=K, trainingBox=TRAIN_BOX,
                                    epochs=EPOCHS, batchSize=64, layers=2, hiddenUnits=16, **CPU)
        _point(train.inputParticles, cls.sim, "outputParticles")
        _point(train.inputVolume, cls.sim, "outputVolume")
        _point(train.meshRun, cls.mesh)
        cls.train = cls.launch("train", train)

        split = project.newProtocol(ProtSplitSet, objLabel="halves", numberOfSets=2, randomize=False)
        _point(split.inputSet, cls.sim, "outputParticles")
        cls.split = cls.launch("split", split)
        cls.subset = cls.split.outputParticles01

        axes = project.newProtocol(FlexPluginProtGenerate, objLabel="generate axes", frames=FRAMES, atlasGrid=GRID,
                                   **CPU)
        _point(axes.inputTraining, cls.train)  # the training run itself
        cls.genAxes = cls.launch("generate axes", axes)

        points = project.newProtocol(FlexPluginProtGenerate, objLabel="generate points", mode=1, outputBox=1,
                                     doAtlas=False, latentPoints="\n".join(", ".join(str(v) for v in p)
                                                                           for p in POINTS), **CPU)
        _point(points.inputTraining, cls.train, "outputParticles")  # the training's SetOfParticlesFlex
        cls.genPoints = cls.launch("generate points", points)

        mean = project.newProtocol(FlexPluginProtGenerate, objLabel="generate mean", mode=2, doAtlas=False, **CPU)
        _point(mean.inputTraining, cls.train)
        _point(mean.inputSubset, cls.split, "outputParticles01")
        cls.genMean = cls.launch("generate mean", mean)

        recon = project.newProtocol(FlexPluginProtReconstruct, objLabel="reconstruct", iterations=2, batchSize=100,
                                    **CPU)
        _point(recon.inputTraining, cls.train)
        _point(recon.inputMask, cls.sim, "outputMask")
        cls.recon = cls.launch("reconstruct", recon)

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="flexplugin_results_")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def newGenerate(self, **params) -> FlexPluginProtGenerate:
        prot = self.project.newProtocol(FlexPluginProtGenerate, **CPU, **params)
        _point(prot.inputTraining, self.train)
        return prot

    def newReconstruct(self, **params) -> FlexPluginProtReconstruct:
        prot = self.project.newProtocol(FlexPluginProtReconstruct, **CPU, **params)
        _point(prot.inputTraining, self.train)
        return prot

    def foreignParticles(self, offset: int = 1000) -> SetOfParticles:
        """The simulated particles under ids that the training never saw."""
        parts = SetOfParticles(filename=os.path.join(self.tmp, "foreign.sqlite"))
        parts.copyInfo(self.sim.outputParticles)
        for p in self.sim.outputParticles.iterItems(orderBy="id"):
            q = p.clone()
            q.setObjId(p.getObjId() + offset)
            parts.append(q)
        parts.write()
        return parts

    def checkVolumes(self, volumes: SetOfVolumesFlex, folder: str, box: int, apix: float) -> np.ndarray:
        """Items match points.csv row by row (file, zFlex), with the box and pixel size; returns the points."""
        self.assertIsInstance(volumes, SetOfVolumesFlex)
        self.assertEqual(volumes.getFlexInfo().getProgName(), FLEX_PROGNAME)
        self.assertEqual(volumes.getFlexInfo().getAttr("latentDim"), K)
        self.assertEqual(volumes.getFlexInfo().getAttr("modelPath"), self.train._getTrainDir("model.pt"))
        self.assertAlmostEqual(volumes.getSamplingRate(), apix)
        table = pd.read_csv(os.path.join(folder, "points.csv"))
        self.assertEqual(volumes.getSize(), len(table))
        for vol, (_, row) in zip(volumes.iterItems(orderBy="id"), table.iterrows()):
            self.assertIsInstance(vol, VolumeFlex)
            self.assertEqual(os.path.normpath(vol.getFileName()), os.path.normpath(os.path.join(folder,
                                                                                                row["volume"])))
            self.assertTrue(os.path.exists(vol.getFileName()))
            np.testing.assert_allclose(vol.getZFlex(), row[[f"z{k}" for k in range(K)]].to_numpy(float),
                                       rtol=1e-6, atol=1e-7)
            self.assertAlmostEqual(vol.getSamplingRate(), apix)
            self.assertEqual(vol.getDim(), (box,) * 3)
            with mrcfile.open(vol.getFileName(), header_only=True) as m:
                self.assertAlmostEqual(float(m.voxel_size.x), apix, places=4)
        return table[[f"z{k}" for k in range(K)]].to_numpy(float)

    # ------------------------------------------------------------------ generate
    def test_generate_axes(self):
        prot = self.genAxes
        self.assertEqual(sorted(name for name, _ in prot._iterVolumeSets()), ["outputVolumes_1", "outputVolumes_2"])
        latents = np.array([p.getZFlex() for p in self.train.outputParticles.iterItems()])
        for k in range(K):
            volumes = getattr(prot, f"outputVolumes_{k + 1}")
            self.assertEqual(volumes.getFlexInfo().getAttr("series"), f"latent axis {k + 1}")
            z = self.checkVolumes(volumes, prot._getGenerateDir(f"series_{k:02d}"), TRAIN_BOX, APIX_TRAIN)
            self.assertEqual(len(z), FRAMES)
            self.assertTrue(np.all(np.diff(z[:, k]) > 0), "the series runs along its axis")
            np.testing.assert_allclose(z[:, k][[0, -1]], np.percentile(latents[:, k], [1, 99]), rtol=1e-4,
                                       atol=1e-5)
            others = np.delete(z, k, axis=1)
            np.testing.assert_allclose(others, np.tile(np.median(np.delete(latents, k, axis=1), 0), (FRAMES, 1)),
                                       rtol=1e-4, atol=1e-5)
        self.assertTrue(os.path.exists(prot.getAtlasFile()))
        self.assertEqual([s["name"] for s in prot.getSeriesFiles()], ["latent axis 1", "latent axis 2"])
        for s in prot.getSeriesFiles():
            self.assertTrue(os.path.exists(s["montage"]))
        self.assertEqual(prot.summary()[0], f"Generated 2 latent axis series of {FRAMES} volumes at a {TRAIN_BOX} px "
                                            f"box ({APIX_TRAIN:.3f} Å/px) from {self.train.getRunName()}.")
        self.assertTrue(prot.methods())
        self.assertEqual(prot._citations(), ["Punjani2023"])
        self.assertEqual(prot.validate(), [])
        log = _log(prot)
        for words in (f"--frames {FRAMES}", "--percentile 1.0", f"--atlas-grid {GRID}", "--box train",
                      "--device cpu", "--threads 1"):
            self.assertIn(words, log)

    def test_generate_points_full_box(self):
        prot = self.genPoints
        self.assertEqual([name for name, _ in prot._iterVolumeSets()], ["outputVolumes"])
        z = self.checkVolumes(prot.outputVolumes, prot._getGenerateDir(), BOX, APIX)
        np.testing.assert_allclose(z, POINTS, rtol=1e-6)
        np.testing.assert_allclose([v.getZFlex() for v in prot.outputVolumes.iterItems(orderBy="id")], POINTS)
        self.assertFalse(os.path.exists(prot.getAtlasFile()))
        self.assertEqual(prot.outputVolumes.getFlexInfo().getAttr("series"), "custom points")
        self.assertEqual(prot.summary()[0], f"Generated 2 volumes at the given latent points at a {BOX} px box "
                                            f"({APIX:.3f} Å/px) from {self.train.getRunName()} (outputParticles).")
        log = _log(prot)
        self.assertIn("--box full", log)
        self.assertIn("--no-atlas", log)
        np.testing.assert_allclose(np.loadtxt(prot._getPointsFile(), delimiter=",", ndmin=2), POINTS)

    def test_generate_mean_of_subset(self):
        prot = self.genMean
        ids = self.subset.getIdSet()
        self.assertLess(len(ids), N)
        latents = {p.getObjId(): p.getZFlex() for p in self.train.outputParticles.iterItems()}
        want = np.mean([latents[i] for i in ids], axis=0)
        z = self.checkVolumes(prot.outputVolumes, prot._getGenerateDir(), TRAIN_BOX, APIX_TRAIN)
        np.testing.assert_allclose(z, [want], rtol=1e-5, atol=1e-6)
        self.assertEqual(sorted(np.loadtxt(prot._getIdsFile(), dtype=int).tolist()), sorted(ids))
        self.assertIn(f"mean latent of {len(ids)} particles", prot.summary()[0])

    def test_generate_from_reconstructed_map(self):
        """The cryoSPARC workflow: deform the high-resolution flex map at the full box instead of the canonical map."""
        prot = self.newGenerate(objLabel="generate from flex map", mode=1, outputBox=1, doAtlas=False,
                                latentPoints=self.genPoints.latentPoints.get())
        _point(prot.inputMap, self.recon, "outputVolumeFlex")
        self.launch("generate from map", prot)
        self.assertIn("--map " + self.recon.outputVolumeFlex.getFileName(), _log(prot))
        z = self.checkVolumes(prot.outputVolumes, prot._getGenerateDir(), BOX, APIX)
        np.testing.assert_allclose(z, POINTS, rtol=1e-6)
        for mine, canonical in zip(prot.outputVolumes.iterItems(orderBy="id"),
                                   self.genPoints.outputVolumes.iterItems(orderBy="id")):
            with mrcfile.open(mine.getFileName()) as a, mrcfile.open(canonical.getFileName()) as b:
                self.assertFalse(np.allclose(a.data, b.data), "the given map, not the canonical one, is deformed")

    def test_generate_validation(self):
        empty = self.project.newProtocol(FlexPluginProtGenerate, mode=1)
        self.assertEqual(len(empty.validate()), 1, empty.validate())  # only the form's missing input
        self.assertIn("cannot be EMPTY", empty.validate()[0])
        prot = self.newGenerate()
        self.assertEqual(prot.validate(), [])
        for bad in ("1,3", "1,1"):  # beyond K = 2; the same axis twice (flex-generate refuses it too)
            prot.atlasAxes.set(bad)
            self.assertTrue(any("Atlas axes" in e for e in prot.validate()), prot.validate())
        prot.atlasAxes.set("2,1")
        self.assertEqual(prot.validate(), [])
        prot.frames.set(1)
        self.assertTrue(prot.validate())
        prot.frames.set(FRAMES)

        prot.mode.set(1)
        self.assertTrue(any("Give the latent points" in e for e in prot.validate()), prot.validate())
        prot.latentPoints.set("0.1, 0.2, 0.3\n0.4, 0.5, 0.6")  # K = 2
        self.assertTrue(any("needs 2 values" in e for e in prot.validate()), prot.validate())
        prot.latentPoints.set("0.1, zero")
        self.assertTrue(any("not a number" in e for e in prot.validate()), prot.validate())
        prot.latentPoints.set("# header\n0.1, 0.2\n\n-0.3 0.4\n")
        self.assertEqual(prot.validate(), [])
        self.assertEqual(prot._getPoints(), [[0.1, 0.2], [-0.3, 0.4]])
        prot.latentPoints.set("")
        prot.pointsFile.set(os.path.join(self.tmp, "missing.csv"))
        self.assertTrue(any("does not exist" in e for e in prot.validate()), prot.validate())
        path = os.path.join(self.tmp, "points.csv")
        with open(path, "w") as fh:
            fh.write("0.5\n")
        prot.pointsFile.set(path)
        self.assertTrue(any("needs 2 values" in e for e in prot.validate()), prot.validate())
        with open(path, "w") as fh:
            fh.write("0.5,0.5\n")
        self.assertEqual(prot.validate(), [])
        self.assertIn("--points", prot._getGenerateArgs())

        prot.mode.set(2)
        self.assertTrue(any("Choose the particles" in e for e in prot.validate()), prot.validate())
        prot.inputSubset.set(self.foreignParticles())
        self.assertTrue(any("are not in the training" in e for e in prot.validate()), prot.validate())
        _point(prot.inputSubset, self.split, "outputParticles02")
        self.assertEqual(prot.validate(), [])

        prot.outputBox.set(1)
        other = Volume(location=_writeMap(os.path.join(self.tmp, "map.mrc"), TRAIN_BOX, APIX_TRAIN))
        other.setSamplingRate(APIX_TRAIN)
        prot.inputMap.set(other)
        self.assertTrue(any("output box is 32 px" in e for e in prot.validate()), prot.validate())
        prot.outputBox.set(0)
        self.assertEqual(prot.validate(), [])

        # inputs that are not a finished flexplugin training
        prot.inputTraining.set(self.project.newProtocol(FlexPluginProtTrain))
        self.assertTrue(any("no output particles yet" in e for e in prot.validate()), prot.validate())
        alien = SetOfParticlesFlex(filename=os.path.join(self.tmp, "alien.sqlite"), progName="OTHER.PROGRAM")
        alien.write()
        prot.inputTraining.set(alien)
        self.assertTrue(any("OTHER.PROGRAM" in e for e in prot.validate()), prot.validate())

    # ------------------------------------------------------------------ reconstruct
    def test_reconstruct_outputs(self):
        prot = self.recon
        info = prot.getReconstructInfo()
        self.assertEqual(info["particles"], N)
        self.assertTrue(info["masked_fsc"])
        for name, kind in (("outputVolumeFlex", "flex"), ("outputVolumeNoflex", "noflex")):
            vol = getattr(prot, name)
            self.assertIsInstance(vol, Volume)
            self.assertEqual(vol.getFileName(), prot._getReconstructDir(f"{kind}_map.mrc"))
            self.assertAlmostEqual(vol.getSamplingRate(), APIX)
            self.assertEqual(vol.getDim(), (BOX,) * 3)
            self.assertTrue(vol.hasHalfMaps())
            halves = vol.getHalfMaps(asList=True)
            self.assertEqual(list(halves), [prot._getReconstructDir(f"{kind}_half_{h}.mrc") for h in "AB"])
            maps = []
            for path in [vol.getFileName()] + list(halves):
                with mrcfile.open(path) as m:
                    self.assertAlmostEqual(float(m.voxel_size.x), APIX, places=4)
                    maps.append(np.array(m.data))
            np.testing.assert_allclose(maps[0], 0.5 * (maps[1] + maps[2]), rtol=1e-4, atol=1e-5 * np.abs(maps[0]).max())

        fscs = prot.outputFSCs
        self.assertIsInstance(fscs, SetOfFSCs)
        table = np.loadtxt(prot._getReconstructDir("fsc.txt"))
        items = [f.clone() for f in fscs.iterItems(orderBy="id")]  # iterItems reuses one object
        corrected = "{} (masked, corrected by phase randomisation)"
        self.assertEqual([f.getObjLabel() for f in items], ["3D flex", "noflex (rigid)", corrected.format("3D flex"),
                                                            corrected.format("noflex (rigid)")])
        res = prot.getResolutionInfo()
        for fsc, kind in zip(items[2:], ("flex", "noflex")):
            freq, values = fsc.getData()
            np.testing.assert_allclose([float(v) for v in values], res["fsc"][kind]["corrected"], atol=1e-6)
            np.testing.assert_allclose([float(f) for f in freq], np.arange(BOX // 2 + 1) / (BOX * APIX), rtol=1e-9)
        for fsc, column in zip(items, (1, 2)):
            self.assertIsInstance(fsc, FSC)
            freq, values = fsc.getData()
            np.testing.assert_allclose([float(f) for f in freq], table[:, 0], rtol=1e-6)
            np.testing.assert_allclose([float(v) for v in values], table[:, column], rtol=1e-6, atol=1e-6)
        self.assertAlmostEqual(float(items[0].getData()[0][1]), 1 / (BOX * APIX), places=5)

        summary = prot.summary()
        self.assertEqual(summary[0], f"Flex map: {info['resolution_flex_A']:.2f} Å (masked half-map FSC = 0.143).")
        self.assertEqual(summary[1], f"Noflex map: {info['resolution_noflex_A']:.2f} Å.")
        self.checkLocalResolution(prot, summary)
        self.assertTrue(prot.methods())
        self.assertEqual(prot._citations(), ["Punjani2023"])
        self.assertEqual(prot.validate(), [])
        log = _log(prot)
        for words in ("--iterations 2", "--batch-size 100", "--mask", "--device cpu", "--threads 1", "--tol 0.01",
                      "--flow-tol 0.25"):
            self.assertIn(words, log)
        self.assertNotIn("--no-noflex", log)
        self.assertNotIn("--bins", log)
        self.assertIn(f"{info['bins']} latent bins, at most 2 CG iterations per half map", summary[-1])
        from flexplugin.engine.io import read_particles
        self.assertEqual(sorted(read_particles(prot._getInputStarFile()).ids.tolist()),
                         sorted(self.train.outputParticles.getIdSet()))

    def checkLocalResolution(self, prot: FlexPluginProtReconstruct, summary: list[str]) -> None:
        """Local-resolution outputs: Volumes at the map's box and pixel size, values within [Nyquist, window] inside
        the FSC mask and 0 outside, the gain = noflex − flex voxel by voxel, and its median (computed here from
        the files) in the summary."""
        res = prot.getResolutionInfo()
        with mrcfile.open(self.sim.outputMask.getFileName()) as m:
            inside = np.array(m.data) > 0.5
        maps = {}
        for kind, name in (("flex", "outputLocalResolutionFlex"), ("noflex", "outputLocalResolutionNoflex"),
                           ("gain", "outputLocalResolutionGain")):
            vol = getattr(prot, name)
            self.assertIsInstance(vol, Volume)
            self.assertEqual(vol.getFileName(), prot._getReconstructDir(f"locres_{kind}.mrc"))
            self.assertAlmostEqual(vol.getSamplingRate(), APIX)
            self.assertEqual(vol.getDim(), (BOX,) * 3)
            with mrcfile.open(vol.getFileName()) as m:
                self.assertAlmostEqual(float(m.voxel_size.x), APIX, places=4)
                maps[kind] = np.array(m.data)
        window_A = res["locres"]["flex"]["window_px"] * APIX
        for kind in ("flex", "noflex"):
            self.assertTrue(np.all(maps[kind][~inside] == 0), kind)
            covered = maps[kind][inside & (maps[kind] > 0)]
            self.assertGreater(covered.size, 0.9 * inside.sum())
            self.assertTrue(np.all((covered >= 2 * APIX - 1e-4) & (covered <= window_A + 1e-4)), kind)
        both = inside & (maps["flex"] > 0) & (maps["noflex"] > 0)
        np.testing.assert_allclose(maps["gain"][both], (maps["noflex"] - maps["flex"])[both], atol=1e-4)
        median = float(np.median(maps["gain"][both]))
        self.assertAlmostEqual(res["gain"]["median_A"], median, places=4)
        line = [s for s in summary if s.startswith("Local resolution gain (noflex − flex):")]
        self.assertEqual(len(line), 1, summary)
        self.assertIn(f"median {median:+.2f} Å inside the mask", line[0])
        fscLine = [s for s in summary if s.startswith("Half-map masked FSC corrected by phase randomisation")]
        self.assertEqual(len(fscLine), 1, summary)
        self.assertIn(f"flex {res['fsc']['flex']['resolution_A']:.2f} Å", fscLine[0])
        for name in ("fsc_masked_flex.star", "fsc_masked_noflex.star"):
            self.assertTrue(os.path.exists(prot._getReconstructDir(name)), name)

    def test_reconstruct_validation(self):
        empty = self.project.newProtocol(FlexPluginProtReconstruct)
        self.assertEqual(len(empty.validate()), 1, empty.validate())  # only the form's missing input
        self.assertIn("cannot be EMPTY", empty.validate()[0])
        prot = self.newReconstruct()
        self.assertEqual(prot.validate(), [])
        self.assertEqual(prot._getInputParticles().getSize(), N)  # empty: the training's particles
        self.assertNotIn("--no-noflex", prot._getReconstructArgs())
        prot.doNoflex.set(False)
        self.assertIn("--no-noflex", prot._getReconstructArgs())

        _point(prot.inputParticles, self.split, "outputParticles02")  # a subset of the training: fine
        self.assertEqual(prot.validate(), [])
        prot.inputParticles.set(self.foreignParticles())
        self.assertTrue(any("are not in the training" in e for e in prot.validate()), prot.validate())
        prot.inputParticles.set(None)

        for box, apix, words in ((24, APIX, "it must be cubic at the particle box (32 px)"),
                                 (BOX, APIX * 2, "pixel size")):
            mask = VolumeMask(location=_writeMap(os.path.join(self.tmp, f"mask{box}.mrc"), box, apix))
            mask.setSamplingRate(apix)
            prot.inputMask.set(mask)
            self.assertTrue(any(words in e for e in prot.validate()), prot.validate())
        prot.inputMask.set(None)
        prot.regularisation.set(-1.0)
        self.assertTrue(any("regularisation" in e for e in prot.validate()), prot.validate())
        prot.regularisation.set(0.01)
        self.assertEqual(prot.validate(), [])
        self.assertIn("--reg", prot._getReconstructArgs())
        prot.iterations.set(0)
        self.assertTrue(prot.validate())
        prot.iterations.set(2)
        for name, bad, good in (("tolerance", 1.5, 0.05), ("latentBins", 0, 3), ("flowTolerance", 0.0, 0.5)):
            getattr(prot, name).set(bad)
            self.assertTrue(prot.validate(), name)
            getattr(prot, name).set(good)
        self.assertEqual(prot.validate(), [])
        args = " ".join(str(x) for x in prot._getReconstructArgs())
        for words in ("--tol 0.05", "--bins 3", "--flow-tol 0.5"):
            self.assertIn(words, args)

        prot.inputTraining.set(self.project.newProtocol(FlexPluginProtTrain))
        self.assertTrue(any("no output particles yet" in e for e in prot.validate()), prot.validate())

    def test_reconstruct_mask_at_crop_box(self):
        """A training that cropped to 24 px: masks at the particle box (32) or the crop box (24) are accepted."""
        cropped = SetOfParticlesFlex(filename=os.path.join(self.tmp, "cropped.sqlite"), progName=FLEX_PROGNAME)
        cropped.copyInfo(self.train.outputParticles)
        cropped.getFlexInfo().setAttr("cropBox", 24)
        for p in self.train.outputParticles.iterItems(orderBy="id"):
            cropped.append(p.clone())
        cropped.write()
        prot = self.newReconstruct()
        prot.inputTraining.set(cropped)
        self.assertEqual(prot._getInputParticles().getSize(), N)
        for box, ok in ((BOX, True), (24, True), (16, False)):
            mask = VolumeMask(location=_writeMap(os.path.join(self.tmp, f"mask{box}.mrc"), box, APIX))
            mask.setSamplingRate(APIX)
            prot.inputMask.set(mask)
            errors = prot.validate()
            if ok:
                self.assertEqual(errors, [], box)
            else:
                self.assertTrue(any("the particle box (32 px) or the crop box (24 px)" in e for e in errors), errors)

    # ------------------------------------------------------------------ form and protocol tree
    def test_help_and_tree(self):
        for cls in (FlexPluginProtGenerate, FlexPluginProtReconstruct):
            for name, param in cls().getDefinition().iterParams():
                if name not in ("runName", "runMode", "hostName", "numberOfThreads", "numberOfMpi"):
                    self.assertTrue(param.help.get(), f"{cls.__name__}.{name} has no help")
        prot = self.newGenerate()
        form = prot.getDefinition()
        modeParams = {"frames", "percentile", "latentPoints", "pointsFile", "inputSubset"}

        def visible():
            return {name for name, _ in form.iterParams() if form.evalParamCondition(name)} & modeParams

        for mode, shown in ((0, {"frames", "percentile"}), (1, {"latentPoints", "pointsFile"}), (2, {"inputSubset"})):
            prot.mode.set(mode)
            self.assertEqual(visible(), shown, mode)

        placed = hub_sections()
        self.assertEqual(placed.get("FlexPluginProtGenerate"), "Data analysis")
        self.assertEqual(placed.get("FlexPluginProtReconstruct"), "Map reconstruction")

    # ------------------------------------------------------------------ viewers
    def _checkPngs(self, views, paths):
        from flexplugin.viewers import PngView
        self.assertEqual(len(views), len(paths))
        for view, path in zip(views, paths):
            self.assertIsInstance(view, PngView)
            self.assertEqual(view.getImagePath(), os.path.abspath(path))
            self.assertTrue(os.path.exists(path))
        plotter = views[0].createPlotter()  # what show() displays, drawn off-screen
        plotter.close()

    def test_viewers(self):
        from flexplugin.viewers import FlexPluginGenerateViewer, FlexPluginReconstructViewer, chimeraxProgram
        chimerax = chimeraxProgram() is not None
        viewer = open_viewer(self, self.genAxes, FlexPluginGenerateViewer)
        show = viewer._getVisualizeDict()
        montages = [s["montage"] for s in self.genAxes.getSeriesFiles()]
        self._checkPngs(show["showAtlas"]("showAtlas"), [self.genAxes.getAtlasFile()])
        self._checkPngs(show["showMontages"]("showMontages"), montages)
        views = show["showChimera"]("showChimera")
        script = _read(self.genAxes._getExtraPath("chimerax_series.cxc"))
        for k, s in enumerate(self.genAxes.getSeriesFiles(), 1):
            self.assertIn(" ".join(f'"{os.path.abspath(v)}"' for v in s["volumes"]) + " vseries true", script)
            self.assertIn(f"vseries play #{k}", script)
        if chimerax:
            self.assertNotIsInstance(views[0], MessageView)
        else:
            self._checkPngs(views, montages)

        pointsViewer = open_viewer(self, self.genPoints, FlexPluginGenerateViewer)
        self._checkPngs(pointsViewer._getVisualizeDict()["showMontages"]("showMontages"),
                        [self.genPoints._getGenerateDir("series.png")])
        atlas = pointsViewer._getVisualizeDict()["showAtlas"]("showAtlas")  # no atlas was drawn
        self.assertIsInstance(atlas[0], MessageView)

        viewer = open_viewer(self, self.recon, FlexPluginReconstructViewer)
        show = viewer._getVisualizeDict()
        plots = self.recon.getPlotFiles()
        self._checkPngs(show["showFsc"]("showFsc"), [plots["fsc"]])
        self._checkPngs(show["showSlices"]("showSlices"), [plots["maps"]])
        self._checkPngs(show["showFscMasked"]("showFscMasked"), [plots["fscMasked"]])
        self._checkPngs(show["showGain"]("showGain"), [plots["gain"]])
        views = show["showGainChimera"]("showGainChimera")
        script = _read(self.recon._getExtraPath("chimerax_gain.cxc"))
        self.assertIn(f'open "{os.path.abspath(self.recon.getMapFiles()["flex"][0])}"', script)
        self.assertIn(f'open "{os.path.abspath(self.recon.getLocalResolutionFiles()["gain"])}"', script)
        self.assertIn("color sample #1 map #2 palette blue:white:red", script)
        if chimerax:
            self.assertNotIsInstance(views[0], MessageView)
        else:
            self._checkPngs(views, [plots["gain"]])
        views = show["showChimera"]("showChimera")
        script = _read(self.recon._getExtraPath("chimerax_maps.cxc"))
        for kind in ("flex", "noflex"):
            self.assertIn(f'open "{os.path.abspath(self.recon.getMapFiles()[kind][0])}"', script)
        if chimerax:
            self.assertNotIsInstance(views[0], MessageView)
        else:
            self._checkPngs(views, [plots["maps"]])


if __name__ == "__main__":
    unittest.main()
