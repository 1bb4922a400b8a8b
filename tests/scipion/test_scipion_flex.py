"""Headless Scipion: 3D flex mesh prep and training in a real project on tiny simulated data.

Checks outputs (classes, ids, poses, CTF, sampling rates, FlexInfo), validation of bad inputs, continuing a run
from another run and with Scipion's own Continue, latent seeding from a SetOfParticlesFlex with the automatic
(cropped) mesh, and that the viewers point at existing files.
"""
import os
import shlex
import shutil
import tempfile
import time
import unittest

import matplotlib.image as mpimg
import mrcfile
import numpy as np
import pandas as pd

from pwem.objects import EMFile, ParticleFlex, SetOfParticlesFlex, Volume, VolumeMask
from pyworkflow.protocol.constants import MODE_RESUME
from pyworkflow.viewer import MessageView

from flexplugin.protocols import FLEX_PROGNAME, FlexPluginProtMeshPrep, FlexPluginProtTrain

from ..helpers import scipion_project  # noqa: F401  (sets up Scipion's environment before pyworkflow is imported)
from ..helpers.scipion_sets import check_flex_set, check_same_particle
from ..helpers.scipion_views import hub_sections, open_viewer

__all__ = ["TestFlexProtocols"]  # what tests/scipion/__init__.py re-exports

N, BOX, APIX = 300, 32, 4.0
CELLS = 8
K, TRAIN_BOX, EPOCHS = 2, 16, 2
TINY = dict(trainingBox=TRAIN_BOX, epochs=EPOCHS, batchSize=64, layers=2, hiddenUnits=16, useGpu=False,
            numberOfThreads=1)


_point = scipion_project.point
_log = scipion_project.logText
_writeMap = scipion_project.writeMap


class TestFlexProtocols(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cwd = os.getcwd()
        cls.seconds = {}
        t0 = time.time()
        cls.project = scipion_project.newProject("flex")
        cls.sim = scipion_project.runSimulate(cls.project, numberOfParticles=N, boxSize=BOX, pixelSize=APIX,
                                              snr=0.5, seed=4, stackSize=N)
        cls.seconds["simulate"] = time.time() - t0

        t0 = time.time()
        mesh = cls.project.newProtocol(FlexPluginProtMeshPrep, objLabel="mesh", numberOfCells=CELLS)
        _point(mesh.inputVolume, cls.sim, "outputVolume")
        _point(mesh.inputMask, cls.sim, "outputMask")
        cls.assertValid(mesh)
        cls.mesh = scipion_project.launch(cls.project, mesh)
        cls.seconds["mesh"] = time.time() - t0

        t0 = time.time()
        train = cls.project.newProtocol(FlexPluginProtTrain, objLabel="train", numberOfLatents=K, **TINY)
        cls.setInputs(train)
        _point(train.meshRun, cls.mesh)
        cls.assertValid(train)
        cls.train = scipion_project.launch(cls.project, train)
        cls.seconds["train"] = time.time() - t0

    @classmethod
    def tearDownClass(cls):
        print(f"flex protocol timings (s): { {k: round(v, 1) for k, v in cls.seconds.items()} }")
        os.chdir(cls.cwd)

    @classmethod
    def assertValid(cls, prot) -> None:
        errors = prot.validate()
        if errors:
            raise AssertionError(f"{prot.getClassName()} does not validate: {errors}")

    @classmethod
    def setInputs(cls, prot, particles=None) -> None:
        """Simulated particles (or the given protocol's outputParticles) and the consensus map."""
        _point(prot.inputParticles, particles or cls.sim, "outputParticles")
        _point(prot.inputVolume, cls.sim, "outputVolume")

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="flexplugin_flex_")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def newTrain(self, **params) -> FlexPluginProtTrain:
        kwargs = dict(numberOfLatents=K, **TINY)
        kwargs.update(params)
        return self.project.newProtocol(FlexPluginProtTrain, **kwargs)

    # ------------------------------------------------------------------ mesh prep
    def test_mesh_prep_outputs(self):
        mesh = self.mesh
        self.assertTrue(mesh.isFinished())
        self.assertIsInstance(mesh.outputMask, VolumeMask)
        self.assertIsInstance(mesh.outputMesh, EMFile)
        self.assertAlmostEqual(mesh.outputMask.getSamplingRate(), APIX)
        self.assertEqual(mesh.outputMask.getDim(), (BOX, BOX, BOX))
        self.assertEqual(mesh.outputMesh.getFileName(), mesh.getMeshFile())
        for name, path in mesh.getMeshFiles().items():
            self.assertTrue(os.path.exists(path), f"{name}: {path}")
        info = mesh.getMeshInfo()
        self.assertEqual((info["box"], info["cells_across"]), (BOX, CELLS))
        self.assertGreater(info["cells"], 0)
        self.assertIn(f"{info['vertices']} vertices, {info['cells']} tetrahedra", mesh.summary()[0])
        self.assertAlmostEqual(mesh.getMeshExtent(), BOX * APIX)
        self.assertTrue(mesh.methods())
        self.assertEqual(mesh.validate(), [])
        self.assertIn("--cells 8", _log(mesh))

    def test_mesh_prep_validation(self):
        prot = self.project.newProtocol(FlexPluginProtMeshPrep)
        _point(prot.inputVolume, self.sim, "outputVolume")
        self.assertEqual(prot.validate(), [])
        small = VolumeMask(location=_writeMap(os.path.join(self.tmp, "small.mrc"), BOX // 2, APIX))
        small.setSamplingRate(APIX)
        prot.inputMask.set(small)
        self.assertTrue(any("same box" in e for e in prot.validate()), prot.validate())
        prot.inputMask.set(None)
        prot.fuseList.set("1>2")
        self.assertTrue(any("segmentation map" in e for e in prot.validate()))
        prot.fuseList.set("")
        seg = Volume(location=_writeMap(os.path.join(self.tmp, "seg.mrc"), BOX, APIX, 1.0))
        seg.setSamplingRate(APIX)
        prot.inputSegmentation.set(seg)
        prot.fuseList.set("1 then 2")
        self.assertTrue(any("Segments to fuse" in e for e in prot.validate()))
        prot.fuseList.set("1>2, 1>3")
        prot.rigidList.set("2,3")
        self.assertEqual(prot.validate(), [])
        prot.cropBox.set(BOX + 2)
        self.assertTrue(any("crop box" in e for e in prot.validate()))
        prot.cropBox.set(24)
        self.assertEqual(prot.validate(), [])
        self.assertAlmostEqual(prot.getMeshExtent(), 24 * APIX)
        prot.numberOfCells.set(0)
        self.assertTrue(prot.validate())
        # the fuse list reaches flex-mesh as one argument despite its '>' and spaces: runEngine quotes for the shell
        args = prot._getMeshArgs()
        self.assertEqual(args[args.index("--fuse") + 1], "1>2, 1>3")
        self.assertEqual(args[args.index("--rigid") + 1], "2,3")
        calls = []
        prot.runJob = lambda program, arguments, **kw: calls.append(arguments)
        prot.runEngine("flex-mesh", args)
        self.assertEqual(shlex.split(calls[0]), ["flex-mesh"] + [str(a) for a in args])

    def test_mesh_prep_cropped_with_segments(self):
        t0 = time.time()
        from pwem.protocols import ProtImportVolumes
        labels = np.ones((BOX,) * 3, np.float32)
        labels[:, :, BOX // 2:] = 2  # two segments: x < 16 and x >= 16
        folder = os.path.abspath(self.project.getTmpPath("segmentation"))
        os.makedirs(folder, exist_ok=True)
        with mrcfile.new(os.path.join(folder, "segments.mrc"), overwrite=True) as m:
            m.set_data(labels)
            m.voxel_size = APIX
        imp = self.project.newProtocol(ProtImportVolumes, filesPath=folder, filesPattern="segments.mrc",
                                       samplingRate=APIX)
        scipion_project.launch(self.project, imp)
        crop = 24
        mesh = self.project.newProtocol(FlexPluginProtMeshPrep, objLabel="mesh segments", numberOfCells=6,
                                        cropBox=crop, fuseList="1>2", rigidList="2")
        _point(mesh.inputVolume, self.sim, "outputVolume")
        _point(mesh.inputMask, self.sim, "outputMask")
        _point(mesh.inputSegmentation, imp, "outputVolume")
        self.assertValid(mesh)
        scipion_project.launch(self.project, mesh)
        self.seconds["mesh segments"] = time.time() - t0
        info = mesh.getMeshInfo()
        self.assertEqual(info["box"], crop)
        self.assertEqual(info["segments"], [1, 2])
        self.assertEqual(info["rigidity_max"], 20.0)  # the rigid segment
        self.assertIn("Segments: 1, 2.", mesh.summary())
        self.assertAlmostEqual(mesh.getMeshExtent(), crop * APIX)
        self.assertEqual(mesh.outputMask.getDim(), (crop,) * 3)
        with mrcfile.open(mesh.getMeshMapFile()) as m:  # the map the mesh was built on: the central 24 px
            lo = BOX // 2 - crop // 2
            with mrcfile.open(self.sim.outputVolume.getFileName()) as full:
                np.testing.assert_array_equal(m.data, full.data[lo:lo + crop, lo:lo + crop, lo:lo + crop])

    # ------------------------------------------------------------------ training
    def test_training_outputs(self):
        train, inParts = self.train, self.sim.outputParticles
        self.assertTrue(train.isFinished())
        parts = train.outputParticles
        check_flex_set(self, parts, N, BOX, APIX)

        table = pd.read_csv(train._getTrainDir("latents.csv")).set_index("rlnImageId")
        inputs = {p.getObjId(): p.clone() for p in inParts.iterItems()}
        ids = []
        for p in parts.iterItems(orderBy="id"):
            ids.append(p.getObjId())
            self.assertIsInstance(p, ParticleFlex)
            q = inputs[p.getObjId()]
            z = p.getZFlex()
            self.assertEqual(len(z), K)
            np.testing.assert_allclose(z, table.loc[p.getObjId()].to_numpy(), rtol=1e-6, atol=1e-7)
            check_same_particle(self, p, q)
            self.assertEqual(p.getFlexInfo().getProgName(), FLEX_PROGNAME)
        self.assertEqual(ids, sorted(inputs))
        zs = np.array([p.getZFlex() for p in parts.iterItems()])
        self.assertGreater(zs.std(), 0, "latents should differ between particles")

        flexInfo = parts.getFlexInfo()
        self.assertEqual(flexInfo.getProgName(), FLEX_PROGNAME)
        self.assertEqual(flexInfo.getAttr("latentDim"), K)
        self.assertEqual(flexInfo.getAttr("trainingBox"), TRAIN_BOX)
        self.assertEqual(flexInfo.getAttr("cropBox"), BOX)
        self.assertAlmostEqual(flexInfo.getAttr("trainingSamplingRate"), APIX * BOX / TRAIN_BOX)
        self.assertEqual(flexInfo.getAttr("meshPath"), self.mesh.getMeshFile())
        for attr in ("modelPath", "checkpointPath", "meshPath"):
            self.assertTrue(os.path.exists(flexInfo.getAttr(attr)), attr)

        vol = train.outputVolume
        self.assertIsInstance(vol, Volume)
        self.assertAlmostEqual(vol.getSamplingRate(), APIX * BOX / TRAIN_BOX)
        self.assertEqual(vol.getDim(), (TRAIN_BOX,) * 3)

        info = train.getTrainInfo()
        self.assertEqual(info["epochs_done"], EPOCHS)
        self.assertIn(f"Trained {EPOCHS} epochs", train.summary()[0])
        self.assertTrue(train.methods())
        self.assertEqual(train._citations(), ["Punjani2023"])
        self.assertEqual(train.validate(), [])
        for name, path in train.getPlotFiles().items():
            self.assertTrue(os.path.exists(path), name)
        log = _log(train)
        for words in ("--device cpu", "--threads 1", f"--k {K}", f"--train-box {TRAIN_BOX}", f"--epochs {EPOCHS}"):
            self.assertIn(words, log)
        self.assertNotIn("--init-latents", log)  # plain particles: nothing to seed from

    def test_outputs_survive_reloading_the_project(self):
        project = scipion_project.reloadProject(self.project)
        train = project.getProtocol(self.train.getObjId())
        parts = train.outputParticles
        self.assertIsInstance(parts, SetOfParticlesFlex)
        self.assertEqual(parts.getFlexInfo().getProgName(), FLEX_PROGNAME)
        self.assertEqual(parts.getFlexInfo().getAttr("latentDim"), K)
        self.assertEqual(len(parts.getFirstItem().getZFlex()), K)
        # the set's own sqlite carries FlexInfo too (what other plugins open)
        again = SetOfParticlesFlex(filename=parts.getFileName())
        again.loadAllProperties()
        self.assertEqual(again.getFlexInfo().getProgName(), FLEX_PROGNAME)
        self.assertEqual(again.getSize(), N)
        again.close()

    def test_training_validation(self):
        prot = self.newTrain()
        self.setInputs(prot)
        _point(prot.meshRun, self.mesh)
        self.assertEqual(prot.validate(), [])

        for bad in (0, 17):  # the engine's range (TrainConfig.validate) is 1 to 16
            prot.numberOfLatents.set(bad)
            self.assertTrue(any("latent" in e for e in prot.validate()), prot.validate())
        prot.numberOfLatents.set(K)
        prot.searchKmax.set(1.5)
        self.assertTrue(any("Nyquist" in e for e in prot.validate()), prot.validate())
        prot.searchKmax.set(0.5)
        self.assertIn("--search-kmax", prot._getTrainArgs())
        prot.searchKmax.set(1.0)

        prot.trainingBox.set(BOX * 2)
        self.assertTrue(any("training box" in e for e in prot.validate()), prot.validate())
        prot.trainingBox.set(15)
        self.assertTrue(any("even" in e for e in prot.validate()))
        prot.trainingBox.set(TRAIN_BOX)
        prot.cropBox.set(BOX + 2)
        self.assertTrue(any("crop box" in e for e in prot.validate()))
        prot.cropBox.set(24)  # the mesh run spans the full 32 px box
        self.assertTrue(any("mesh spans" in e for e in prot.validate()), prot.validate())
        prot.cropBox.set(None)

        prot.meshRun.set(None)
        small = VolumeMask(location=_writeMap(os.path.join(self.tmp, "small.mrc"), BOX // 2, APIX))
        small.setSamplingRate(APIX)
        prot.inputMask.set(small)
        self.assertTrue(any("mask" in e and "voxels wide" in e for e in prot.validate()), prot.validate())
        prot.inputMask.set(None)
        self.assertEqual(prot.validate(), [])

        # seeding from a SetOfParticlesFlex: the components must exist
        self.setInputs(prot, particles=self.train)
        self.assertEqual(prot.validate(), [])
        prot.initComponents.set("1 3")
        self.assertTrue(any("from 1 to 2" in e for e in prot.validate()), prot.validate())
        prot.initComponents.set("2")
        self.assertTrue(any("one input component per latent" in e for e in prot.validate()))
        prot.numberOfLatents.set(3)
        prot.initComponents.set("")
        self.assertTrue(any("fewer than the 3" in e for e in prot.validate()))
        prot.initFromInput.set(False)
        self.assertEqual(prot.validate(), [])

        cont = self.newTrain(doContinue=True)
        self.assertTrue(any("Choose the training run" in e for e in cont.validate()))
        _point(cont.continueRun, self.train)
        self.assertTrue(any("already trained" in e for e in cont.validate()), cont.validate())
        cont.extraEpochs.set(1)
        self.assertEqual(cont.validate(), [])

    def test_continue_from_another_run(self):
        t0 = time.time()
        cont = self.newTrain(doContinue=True, extraEpochs=1, objLabel="train continued")
        _point(cont.continueRun, self.train)
        self.assertValid(cont)
        scipion_project.launch(self.project, cont)
        self.seconds["continue"] = time.time() - t0
        self.assertEqual(cont.getTrainInfo()["epochs_done"], EPOCHS + 1)
        self.assertIn(f"continuing after epoch {EPOCHS}", _log(cont))
        self.assertEqual(self.train.getTrainInfo()["epochs_done"], EPOCHS, "the continued run must not change")
        parts = cont.outputParticles
        self.assertEqual(parts.getSize(), N)
        self.assertEqual(parts.getFlexInfo().getAttr("epochs"), EPOCHS + 1)
        self.assertEqual(parts.getFlexInfo().getAttr("meshPath"), self.mesh.getMeshFile())
        self.assertEqual(sorted(p.getObjId() for p in parts.iterItems()),
                         sorted(p.getObjId() for p in self.sim.outputParticles.iterItems()))
        self.assertIn("Continued from", " ".join(cont.summary()))

    def test_seeded_latents_automatic_mesh_and_scipion_continue(self):
        t0 = time.time()
        crop = 24
        prot = self.newTrain(numberOfLatents=1, initComponents="2", cropBox=crop, objLabel="train seeded")
        self.setInputs(prot, particles=self.train)  # a SetOfParticlesFlex with K latents
        _point(prot.inputMask, self.sim, "outputMask")
        self.assertValid(prot)
        scipion_project.launch(self.project, prot)
        self.seconds["seeded"] = time.time() - t0
        log = _log(prot)
        self.assertIn("--init-idxs 1", log)
        self.assertIn("--crop 24", log)

        # the seed file holds the input's zFlex by particle id
        seed = pd.read_csv(prot._getInitLatentsFile()).set_index("rlnImageId")
        self.assertEqual(list(seed.columns), ["z0", "z1"])
        for p in self.train.outputParticles.iterItems():
            np.testing.assert_allclose(seed.loc[p.getObjId()].to_numpy(), p.getZFlex(), rtol=1e-6)

        # the automatic mesh was built on the map cropped to the crop box
        meshInfo = os.path.join(os.path.dirname(prot._getMeshFile()), "mesh.json")
        self.assertEqual(pd.read_json(meshInfo, typ="series")["box"], crop)
        self.assertTrue(prot._getMeshFile().startswith(prot._getExtraPath()))
        apixTrain = APIX * crop / TRAIN_BOX
        self.assertAlmostEqual(prot.outputVolume.getSamplingRate(), apixTrain)
        self.assertAlmostEqual(prot.outputParticles.getFlexInfo().getAttr("trainingSamplingRate"), apixTrain)
        self.assertEqual(len(prot.outputParticles.getFirstItem().getZFlex()), 1)

        # Scipion's Continue with more epochs resumes from the run's own checkpoint
        t0 = time.time()
        prot.extraEpochs.set(1)
        prot.runMode.set(MODE_RESUME)
        scipion_project.launch(self.project, prot)
        self.seconds["scipion continue"] = time.time() - t0
        self.assertEqual(prot.getTrainInfo()["epochs_done"], EPOCHS + 1)
        self.assertIn(f"continuing after epoch {EPOCHS}", _log(prot))
        self.assertEqual(prot.outputParticles.getFlexInfo().getAttr("epochs"), EPOCHS + 1)
        self.assertEqual(prot.outputParticles.getSize(), N)

    # ------------------------------------------------------------------ form and protocol tree
    def test_form_conditions_and_tree(self):
        prot = self.newTrain()
        form = prot.getDefinition()

        def visible():
            return {name for name, _ in form.iterParams() if form.evalParamCondition(name)}

        fresh = visible()
        self.assertLessEqual({"inputParticles", "inputVolume", "meshRun", "inputMask", "numberOfLatents",
                              "trainingBox", "rigidity"}, fresh)
        self.assertNotIn("continueRun", fresh)
        prot.meshRun.set(self.mesh)
        self.assertNotIn("inputMask", visible(), "the mask only feeds the automatic mesh")
        prot.doContinue.set(True)
        self.assertEqual(visible() & {"continueRun", "epochs", "extraEpochs", "inputParticles", "numberOfLatents"},
                         {"continueRun", "epochs", "extraEpochs"})
        for cls in (FlexPluginProtMeshPrep, FlexPluginProtTrain):
            for name, param in cls().getDefinition().iterParams():
                if name not in ("runName", "runMode", "hostName", "numberOfThreads", "numberOfMpi"):
                    self.assertTrue(param.help.get(), f"{cls.__name__}.{name} has no help")

        placed = hub_sections()
        self.assertEqual(placed.get("FlexPluginProtMeshPrep"), "Data preparation")
        self.assertEqual(placed.get("FlexPluginProtTrain"), "Landscape estimation")

    # ------------------------------------------------------------------ viewers
    def _checkPng(self, views, path):
        from flexplugin.viewers import PngView
        self.assertEqual(len(views), 1)
        self.assertIsInstance(views[0], PngView)
        self.assertEqual(views[0].getImagePath(), os.path.abspath(path))
        self.assertTrue(os.path.exists(path))
        plotter = views[0].createPlotter()  # what show() displays, drawn off-screen
        self.assertEqual(plotter.getFigure().get_axes()[0].get_images()[0].get_array().shape[:2],
                         mpimg.imread(path).shape[:2])
        plotter.close()

    def test_viewers(self):
        from flexplugin.viewers import FlexPluginMeshViewer, FlexPluginTrainViewer, chimeraxProgram
        viewer = open_viewer(self, self.train, FlexPluginTrainViewer)
        visualize = viewer._getVisualizeDict()
        for param, name in (("showLatents", "latents"), ("showActivations", "activations"), ("showFlow", "flow"),
                            ("showLosses", "losses")):
            self._checkPng(visualize[param](param), self.train.getPlotFiles()[name])
        self._checkPng(visualize["showMeshSlices"]("showMeshSlices"), self.mesh.getMeshFiles()["slices"])

        meshViewer = open_viewer(self, self.mesh, FlexPluginMeshViewer)
        self._checkPng(meshViewer._getVisualizeDict()["showMeshSlices"]("showMeshSlices"),
                       self.mesh.getMeshFiles()["slices"])
        for v, prot, mapFile in ((viewer, self.train, self.train._getTrainDir("canonical.mrc")),
                                 (meshViewer, self.mesh, self.mesh.getMeshMapFile())):
            views = v._getVisualizeDict()["showMeshChimera"]("showMeshChimera")
            script = prot._getExtraPath("chimerax_mesh.cxc")
            text = open(script).read()
            self.assertIn(os.path.abspath(mapFile), text)
            self.assertIn(os.path.abspath(self.mesh.getMeshFiles()["pdb"]), text)
            if chimeraxProgram() is None:
                self.assertIsInstance(views[0], MessageView)
                self.assertIn(script, views[0].getMessage())
            else:
                self.assertNotIsInstance(views[0], MessageView)


if __name__ == "__main__":
    unittest.main()
