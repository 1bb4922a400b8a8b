"""Headless Scipion: 3D variability analysis and 3D variability display in a real project on tiny simulated data.

Checks the 3DVA outputs (SetOfParticlesFlex by id against latents.csv and the simulation's ground truth, poses, CTF,
FlexInfo, consensus map, components), Scipion's Continue from the engine's checkpoint, validation of bad inputs, the
three display modes (frame series per component, classes by id with their maps), the protocol tree and that the
viewers point at existing files.
"""
import json
import os
import shutil
import subprocess
import tempfile
import time
import unittest

import mrcfile
import numpy as np
import pandas as pd

from pwem.constants import ALIGN_NONE, ALIGN_PROJ
from pwem.objects import (
    Class3D,
    FlexInfo,
    ParticleFlex,
    SetOfClasses3D,
    SetOfParticles,
    SetOfParticlesFlex,
    SetOfVolumes,
    Volume,
    VolumeMask,
)
from pyworkflow.object import Float
from pyworkflow.protocol.constants import MODE_RESUME
from pyworkflow.viewer import MessageView

from flexplugin import Plugin
from flexplugin.engine.io import read_particles
from flexplugin.protocols import VA3D_PROGNAME, FlexPluginProt3DVA, FlexPluginProt3DVADisplay

from ..helpers import scipion_project  # noqa: F401  (sets up Scipion's environment before pyworkflow is imported)
from ..helpers.scipion_sets import check_flex_set, check_same_particle
from ..helpers.scipion_views import hub_sections, open_viewer

__all__ = ["Test3DVAProtocols"]  # what tests/scipion/__init__.py re-exports

N, BOX, APIX = 360, 32, 4.0
K, ITERATIONS, FILTER_RES = 2, 4, 12.0
FRAMES, CLUSTERS = 3, 2
CPU = dict(useGpu=False, numberOfThreads=1)


def _readMap(path: str) -> np.ndarray:
    with mrcfile.open(path, permissive=True) as m:
        return np.asarray(m.data, dtype=np.float64)


_point = scipion_project.point
_log = scipion_project.logText
_writeMap = scipion_project.writeMap


class Test3DVAProtocols(scipion_project.ProjectRuns, unittest.TestCase):
    timingsLabel = "3DVA protocol"

    @classmethod
    def setUpClass(cls):
        cls.cwd = os.getcwd()
        cls.seconds = {}
        project = cls.project = scipion_project.newProject("va3d")
        cls.sim = cls.timed("simulate", lambda: scipion_project.runSimulate(
            project, numberOfParticles=N, boxSize=BOX, pixelSize=APIX, snr=0.5, seed=4, stackSize=N))

        va = cls.newVA(objLabel="3dva", numberOfComponents=K)
        _point(va.inputVolume, cls.sim, "outputVolume")
        cls.va = cls.launch("3dva", va)

        simple = cls.newDisplay(objLabel="display simple", frames=FRAMES)
        _point(simple.input3DVA, cls.va)  # the run itself
        cls.simple = cls.launch("display simple", simple)

        inter = cls.newDisplay(objLabel="display intermediates", mode=1, frames=FRAMES)
        _point(inter.input3DVA, cls.va, "outputParticles")  # its SetOfParticlesFlex
        cls.inter = cls.launch("display intermediates", inter)

        cluster = cls.newDisplay(objLabel="display cluster", mode=2, frames=CLUSTERS)
        _point(cluster.input3DVA, cls.va)
        cls.cluster = cls.launch("display cluster", cluster)

    @classmethod
    def newVA(cls, **params) -> FlexPluginProt3DVA:
        """A 3DVA protocol on the simulated particles and mask, with tiny settings."""
        kwargs = dict(numberOfComponents=K, iterations=ITERATIONS, filterRes=FILTER_RES, **CPU)
        kwargs.update(params)
        prot = cls.project.newProtocol(FlexPluginProt3DVA, **kwargs)
        _point(prot.inputParticles, cls.sim, "outputParticles")
        _point(prot.inputMask, cls.sim, "outputMask")
        return prot

    @classmethod
    def newDisplay(cls, **params) -> FlexPluginProt3DVADisplay:
        kwargs = dict(CPU)
        kwargs.update(params)
        return cls.project.newProtocol(FlexPluginProt3DVADisplay, **kwargs)

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="flexplugin_3dva_")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def inputIds(self) -> list[int]:
        return sorted(p.getObjId() for p in self.sim.outputParticles.iterItems())

    # ------------------------------------------------------------------ 3DVA
    def test_3dva_particles(self):
        va, inParts = self.va, self.sim.outputParticles
        self.assertTrue(va.isFinished())
        parts = va.outputParticles
        check_flex_set(self, parts, N, BOX, APIX)

        table = pd.read_csv(va._getRunDir("latents.csv")).set_index("rlnImageId")
        self.assertEqual(list(table.columns), [f"z{k}" for k in range(K)] + ["scale"])
        inputs = {p.getObjId(): p.clone() for p in inParts.iterItems()}
        ids = []
        for p in parts.iterItems(orderBy="id"):
            ids.append(p.getObjId())
            self.assertIsInstance(p, ParticleFlex)
            self.assertEqual(p.getFlexInfo().getProgName(), VA3D_PROGNAME)
            z = p.getZFlex()
            self.assertEqual(len(z), K)
            row = table.loc[p.getObjId()]
            np.testing.assert_allclose(z, row[[f"z{k}" for k in range(K)]].to_numpy(), rtol=1e-6, atol=1e-6)
            self.assertAlmostEqual(p._flex3dvaScale.get(), row["scale"], places=5)
            q = inputs[p.getObjId()]
            check_same_particle(self, p, q)
        self.assertEqual(ids, sorted(inputs))

        # the ids carry the right coordinates: component 1 follows the simulated motion of each particle
        truth = pd.read_csv(self.sim._getDataDir("ground_truth.csv")).set_index("rlnImageId")["motion"]
        z1 = np.array([p.getZFlex()[0] for p in parts.iterItems(orderBy="id")])
        corr = np.corrcoef(z1, truth.loc[ids].to_numpy())[0, 1]
        self.assertGreater(abs(corr), 0.8, f"component 1 vs simulated motion: r = {corr:.3f}")

    def test_3dva_flexinfo_volumes_and_info(self):
        va = self.va
        run = va.getRunInfo()
        ev = json.load(open(va._getRunDir("explained_variance.json")))["components"]
        info = va.outputParticles.getFlexInfo()
        self.assertEqual(info.getProgName(), VA3D_PROGNAME)
        self.assertEqual(info.getAttr("runPath"), va._getRunDir())
        self.assertTrue(os.path.exists(os.path.join(info.getAttr("runPath"), "run.json")))
        self.assertTrue(os.path.exists(info.getAttr("consensusPath")))
        self.assertEqual(info.getAttr("K"), K)
        self.assertEqual(info.getAttr("box"), BOX)
        self.assertAlmostEqual(info.getAttr("samplingRate"), APIX)
        self.assertEqual(info.getAttr("workingBox"), run["working_box"])
        self.assertAlmostEqual(info.getAttr("workingSamplingRate"), run["working_apix"])
        self.assertAlmostEqual(info.getAttr("filterRes"), FILTER_RES)
        self.assertEqual(info.getAttr("iterations"), ITERATIONS)
        variances = [float(v) for v in info.getAttr("explainedVariance").split(",")]
        np.testing.assert_allclose(variances, [c["eigenvalue"] for c in ev], rtol=1e-9)
        fractions = [float(v) for v in info.getAttr("explainedVarianceFraction").split(",")]
        self.assertAlmostEqual(sum(fractions), 1.0)
        self.assertGreater(variances[0], variances[1], "components are ordered by explained variance")

        vol = va.outputVolume
        self.assertIsInstance(vol, Volume)
        self.assertAlmostEqual(vol.getSamplingRate(), APIX)
        self.assertEqual(vol.getDim(), (BOX,) * 3)
        np.testing.assert_allclose(_readMap(vol.getFileName()), _readMap(self.sim.outputVolume.getFileName()),
                                   atol=1e-6)  # the consensus given is the one used

        comps = va.outputComponents
        self.assertIsInstance(comps, SetOfVolumes)
        self.assertEqual(comps.getSize(), K)
        self.assertAlmostEqual(comps.getSamplingRate(), APIX)
        for i, c in enumerate(comps.iterItems(orderBy="id")):
            self.assertAlmostEqual(c.getSamplingRate(), APIX)
            self.assertEqual(c.getDim(), (BOX,) * 3)
            self.assertEqual(c.getObjLabel(), f"component {i + 1}")
            self.assertAlmostEqual(np.linalg.norm(_readMap(c.getFileName())), 1.0, places=4)
            self.assertEqual(c.getFileName(), va._getRunDir(f"component_{i:03d}.mrc"))

        summary = " ".join(va.summary())
        self.assertIn(f"{N} particles, K = {K} components, {ITERATIONS} iterations", summary)
        self.assertIn(f"Component 2: explained variance {ev[1]['eigenvalue']:.4g}", summary)
        self.assertIn("Punjani2021", " ".join(va.methods()))
        self.assertEqual(va._citations(), ["Punjani2021"])
        self.assertEqual(va.validate(), [])
        log = _log(va)
        for words in ("--device cpu", "--threads 1", f"--k {K}", f"--filter-res {FILTER_RES}", "--scales optimal",
                      f"--iterations {ITERATIONS}", "--volume"):
            self.assertIn(words, log)
        for name, path in va.getPlotFiles().items():
            self.assertTrue(os.path.exists(path), name)
        self.assertEqual(set(va.getPlotFiles()),
                         {"histograms", "pairs", "convergence", "explained_variance", "components"})

    def test_outputs_survive_reloading_the_project(self):
        project = scipion_project.reloadProject(self.project)
        va = project.getProtocol(self.va.getObjId())
        parts = va.outputParticles
        self.assertIsInstance(parts, SetOfParticlesFlex)
        self.assertEqual(parts.getFlexInfo().getProgName(), VA3D_PROGNAME)
        self.assertEqual(parts.getFlexInfo().getAttr("K"), K)
        self.assertTrue(parts.hasCTF())
        self.assertEqual(len(parts.getFirstItem().getZFlex()), K)
        again = SetOfParticlesFlex(filename=parts.getFileName())  # what other plugins open
        again.loadAllProperties()
        self.assertEqual(again.getFlexInfo().getProgName(), VA3D_PROGNAME)
        # pwem loads only the attributes a fresh FlexInfo has; the others are stored as properties of the sqlite
        self.assertEqual(again.getProperty("_flexInfo.runPath"), self.va._getRunDir())
        self.assertEqual(again.getSize(), N)
        again.close()
        classes = project.getProtocol(self.cluster.getObjId()).outputClasses
        self.assertEqual(sum(c.getSize() for c in classes.iterItems()), N)

    def test_3dva_validation(self):
        prot = self.newVA()
        self.assertEqual(prot.validate(), [])

        small = VolumeMask(location=_writeMap(os.path.join(self.tmp, "small.mrc"), BOX // 2, APIX))
        small.setSamplingRate(APIX)
        prot.inputMask.set(small)
        self.assertTrue(any("mask" in e and "voxels wide" in e for e in prot.validate()), prot.validate())
        other = VolumeMask(location=_writeMap(os.path.join(self.tmp, "apix.mrc"), BOX, APIX / 2))
        other.setSamplingRate(APIX / 2)
        prot.inputMask.set(other)
        self.assertTrue(any("mask has pixel size" in e for e in prot.validate()), prot.validate())
        prot.inputMask.set(None)
        self.assertTrue(any("Mask" in e and "EMPTY" in e for e in prot.validate()), "the mask is required")
        _point(prot.inputMask, self.sim, "outputMask")
        vol = Volume(location=_writeMap(os.path.join(self.tmp, "vol.mrc"), BOX + 2, APIX))
        vol.setSamplingRate(APIX)
        prot.inputVolume.set(vol)
        self.assertTrue(any("volume" in e and "voxels wide" in e for e in prot.validate()), prot.validate())
        prot.inputVolume.set(None)
        self.assertEqual(prot.validate(), [])

        def fails(attr, value, words):
            old = getattr(prot, attr).get()
            getattr(prot, attr).set(value)
            errors = prot.validate()
            getattr(prot, attr).set(old)
            self.assertTrue(any(words in e for e in errors), f"{attr}={value}: {errors}")

        fails("numberOfComponents", 0, "at least 1")
        fails("numberOfComponents", N, "too few")
        fails("filterRes", None, "Set the filter resolution")
        fails("filterRes", 2 * APIX - 0.5, "finer than Nyquist")
        fails("highpassRes", FILTER_RES, "highpass resolution")
        fails("workingBox", 15, "working box")
        fails("workingBox", BOX + 2, "working box")
        fails("numberOfParticles", 1, "at least 2")
        fails("iterations", 0, "one iteration")
        fails("varLambda", -1.0, "Lambda")
        fails("scales", 1, "rlnCtfScalefactor")
        prot.filterRes.set(2 * APIX)  # exactly Nyquist is allowed
        self.assertEqual(prot.validate(), [])

        # particles without alignment or CTF
        bare = SetOfParticles(filename=os.path.join(self.tmp, "bare.sqlite"))
        bare.copyInfo(self.sim.outputParticles)
        bare.setAlignment(ALIGN_NONE)
        bare.setHasCTF(False)
        for p in self.sim.outputParticles.iterItems():
            bare.append(p.clone())
            if bare.getSize() == 10:
                break
        bare.write()
        prot.inputParticles.set(bare)
        errors = prot.validate()
        self.assertTrue(any("no 3D alignment" in e for e in errors), errors)
        self.assertTrue(any("no CTF" in e for e in errors), errors)
        bare.close()

    def test_input_scales_reach_the_engine(self):
        """Per-particle scale 'input': RELION's rlnCtfScalefactor of each particle goes into the STAR by id."""
        scaled = SetOfParticles(filename=os.path.join(self.tmp, "scaled.sqlite"))
        scaled.copyInfo(self.sim.outputParticles)
        want = {}
        for p in self.sim.outputParticles.iterItems(orderBy="id"):
            q = p.clone()
            want[q.getObjId()] = 0.8 + 0.001 * q.getObjId()
            q._rlnCtfScalefactor = Float(want[q.getObjId()])
            scaled.append(q)
        scaled.write()
        prot = self.newVA(scales=1, numberOfComponents=1, iterations=1)
        prot.inputParticles.set(scaled)
        self.assertEqual(prot.validate(), [])
        prot.setWorkingDir(os.path.join(self.tmp, "run"))
        prot.convertInputStep(1, True)
        star = read_particles(prot._getInputStarFile())
        np.testing.assert_allclose(star.table["rlnCtfScalefactor"].to_numpy(),
                                   [want[int(i)] for i in star.ids], rtol=1e-9)
        args = [str(a) for a in prot._getVa3dArgs()]
        self.assertEqual(args[args.index("--scales") + 1], "input")
        out = subprocess.run(Plugin.getProgram().split() + ["3dva"] + args, capture_output=True, text=True,
                             env=Plugin.getEnviron(), timeout=300)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(prot.getRunInfo()["config"]["scales"], "input")
        scaled.close()

    def test_scipion_continue_without_consensus(self):
        """No consensus given (reconstructed), K = 1, only part of the particles; then Scipion's Continue."""
        t0 = time.time()
        used = N - 60
        prot = self.newVA(objLabel="3dva continued", numberOfComponents=1, iterations=2, numberOfParticles=used)
        self.launch("3dva K=1", prot)
        run = prot.getRunInfo()
        self.assertIsNone(run["volume"])
        self.assertIn("reconstructing the consensus", _log(prot))
        parts = prot.outputParticles
        self.assertEqual(parts.getSize(), used)
        self.assertEqual(sorted(p.getObjId() for p in parts.iterItems()), self.inputIds()[:used])
        self.assertEqual(len(parts.getFirstItem().getZFlex()), 1)
        self.assertEqual(prot.outputComponents.getSize(), 1)
        self.assertNotIn("pairs", prot.getPlotFiles())

        prot.iterations.set(3)
        prot.runMode.set(MODE_RESUME)
        scipion_project.launch(self.project, prot)
        self.seconds["3dva continue"] = time.time() - t0 - self.seconds["3dva K=1"]
        log = _log(prot)
        self.assertIn("continuing from iteration 2", log)
        self.assertEqual(len(prot.getRunInfo()["history"]), 3)
        self.assertEqual(prot.outputParticles.getFlexInfo().getAttr("iterations"), 3)
        self.assertEqual(prot.outputParticles.getSize(), used)

    # ------------------------------------------------------------------ display
    def test_display_simple(self):
        disp = self.simple
        summary = disp.getDisplaySummary()
        consensus = _readMap(self.va.outputVolume.getFileName())
        for k in range(1, K + 1):
            vols = getattr(disp, f"outputComponent_{k}")
            self.assertIsInstance(vols, SetOfVolumes)
            self.assertEqual(vols.getSize(), FRAMES)
            self.assertAlmostEqual(vols.getSamplingRate(), APIX)
            component = _readMap(self.va._getRunDir(f"component_{k - 1:03d}.mrc"))
            t = summary["components"][k - 1]["t"]
            for f, vol in enumerate(vols.iterItems(orderBy="id")):
                self.assertAlmostEqual(vol.getSamplingRate(), APIX)
                self.assertEqual(vol.getDim(), (BOX,) * 3)
                self.assertAlmostEqual(vol._flex3dvaCoordinate.get(), t[f], places=5)
                np.testing.assert_allclose(_readMap(vol.getFileName()), consensus + t[f] * component, atol=1e-4)
            zs = [p.getZFlex()[k - 1] for p in self.va.outputParticles.iterItems()]
            self.assertAlmostEqual(t[0], np.percentile(zs, 3), places=3)  # range percentile 3 %
            self.assertAlmostEqual(t[-1], np.percentile(zs, 97), places=3)
        self.assertFalse(hasattr(disp, f"outputComponent_{K + 1}"))
        for s in disp.getSeriesFiles():
            self.assertTrue(os.path.exists(s["montage"]))
        self.assertIn("--device cpu", _log(disp))
        self.assertIn(f"{K} linear series", disp.summary()[0])
        self.assertTrue(disp.methods())

    def test_display_simple_filtered_downsampled(self):
        """One component (numbered as in the 3DVA run), downsampled and cropped: sampling rate follows."""
        disp = self.newDisplay(objLabel="display comp 2", frames=FRAMES, components="2", downsample=16, crop=12,
                               filterRes=20.0, flipHand=True)
        _point(disp.input3DVA, self.va)
        self.launch("display simple comp 2", disp)
        self.assertFalse(hasattr(disp, "outputComponent_1"))
        vols = disp.outputComponent_2
        self.assertEqual(vols.getSize(), FRAMES)
        self.assertAlmostEqual(vols.getSamplingRate(), APIX * BOX / 16)
        first = vols.getFirstItem()
        self.assertEqual(first.getDim(), (12,) * 3)
        self.assertAlmostEqual(first.getSamplingRate(), APIX * 2)
        self.assertEqual(first.getObjLabel(), "component 2 frame 1")
        log = _log(disp)
        for words in ("--components 1", "--downsample 16", "--crop 12", "--filter-res 20.0", "--flip-hand"):
            self.assertIn(words, log)

    def test_display_intermediates(self):
        disp = self.inter
        ids = set(self.inputIds())
        for k in range(1, K + 1):
            vols = getattr(disp, f"outputComponent_{k}")
            self.assertIsInstance(vols, SetOfVolumes)
            self.assertEqual(vols.getSize(), FRAMES)
            self.assertAlmostEqual(vols.getSamplingRate(), APIX)
            for vol in vols.iterItems():
                self.assertTrue(os.path.exists(vol.getFileName()))
                self.assertEqual(vol.getDim(), (BOX,) * 3)
                self.assertGreater(vol._flex3dvaParticles.get(), 0)
        self.assertEqual(len(ids), N)
        self.assertTrue(os.path.exists(disp.getPlotFiles()["frame_counts"]))
        self.assertIn("--mode intermediates", _log(disp))
        self.assertIn("--width 2.0", _log(disp))
        self.assertIn("reconstructed intermediate series", disp.summary()[0])

    def test_display_cluster(self):
        disp = self.cluster
        classes = disp.outputClasses
        self.assertIsInstance(classes, SetOfClasses3D)
        self.assertEqual(classes.getSize(), CLUSTERS)
        labels = pd.read_csv(disp._getDisplayDir("clusters.csv")).set_index("rlnImageId")["cluster"]
        seen = []
        for cls in classes.iterItems(orderBy="id"):
            self.assertIsInstance(cls, Class3D)
            self.assertTrue(cls.hasCTF())
            self.assertEqual(cls.getAlignment(), ALIGN_PROJ)
            rep = cls.getRepresentative()
            self.assertTrue(os.path.exists(rep.getFileName()), rep.getFileName())
            self.assertEqual(rep.getFileName(), disp._getDisplayDir(f"cluster_{cls.getObjId() - 1:03d}.mrc"))
            self.assertAlmostEqual(rep.getSamplingRate(), APIX)
            members = [p.getObjId() for p in cls.iterItems()]
            self.assertTrue(members)
            self.assertTrue(all(labels.loc[i] == cls.getObjId() - 1 for i in members))
            first = cls.getFirstItem()
            self.assertEqual(len(first.getZFlex()), K)  # the members keep their coordinates
            seen += members
        self.assertEqual(sorted(seen), self.inputIds())  # every particle once, ids preserved
        vols = disp.outputVolumes
        self.assertIsInstance(vols, SetOfVolumes)
        self.assertEqual(vols.getSize(), CLUSTERS)
        self.assertAlmostEqual(vols.getSamplingRate(), APIX)
        self.assertTrue(os.path.exists(disp.getClusterMontageFile()))
        self.assertTrue(os.path.exists(disp.getPlotFiles()["clusters"]))
        self.assertIn(f"{CLUSTERS} clusters of", disp.summary()[0])
        self.assertIn("FSC 0.143", " ".join(disp.summary()))

    def test_display_cluster_without_reconstruction(self):
        """Clusters of component 1 only, no maps: classes by id without representatives' files, no volume set."""
        disp = self.newDisplay(objLabel="display cluster no maps", mode=2, frames=3, components="1",
                               skipReconstruction=True)
        _point(disp.input3DVA, self.va, "outputParticles")
        self.launch("display cluster no maps", disp)
        self.assertIn("--skip-reconstruction", _log(disp))
        self.assertIn("--device cpu", _log(disp))
        classes = disp.outputClasses
        self.assertEqual(classes.getSize(), 3)
        self.assertFalse(hasattr(disp, "outputVolumes"))
        self.assertEqual(disp.getClusterMapFiles(), {})
        z1 = {p.getObjId(): p.getZFlex()[0] for p in self.va.outputParticles.iterItems()}
        ranges, seen = [], []
        for cls in classes.iterItems(orderBy="id"):
            self.assertFalse(cls.getRepresentative().getFileName())
            members = [p.getObjId() for p in cls.iterItems()]
            seen += members
            ranges.append((min(z1[i] for i in members), max(z1[i] for i in members)))
        self.assertEqual(sorted(seen), self.inputIds())
        ranges.sort()
        for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
            self.assertLess(hi, lo, "k-means on one coordinate makes disjoint intervals")
        self.assertIn("3 clusters of", disp.summary()[0])

    def test_display_validation(self):
        prot = self.newDisplay()
        _point(prot.input3DVA, self.va)
        self.assertEqual(prot.validate(), [])

        def fails(words, **values):
            old = {k: getattr(prot, k).get() for k in values}
            for k, v in values.items():
                getattr(prot, k).set(v)
            errors = prot.validate()
            for k, v in old.items():
                getattr(prot, k).set(v)
            self.assertTrue(any(words in e for e in errors), f"{values}: {errors}")

        fails("Components must be", components="3")
        fails("Components must be", components="1,1")
        fails("Components must be", components="first")
        fails("at least 2 frames", frames=1)
        fails("number of clusters", mode=2, frames=N + 1)
        fails("range percentile", rangePercentile=50.0)
        fails("window width", mode=1, width=-2.0)
        fails("downsampled box", downsample=BOX + 2)
        fails("crop box", crop=BOX + 2)
        fails("crop box", downsample=16, crop=20)
        fails("finer than Nyquist", filterRes=2 * APIX - 1)
        fails("finer than Nyquist", downsample=16, filterRes=2 * APIX + 1)
        fails("high-pass resolution", filterRes=20.0, highpassRes=10.0)
        prot.components.set("2, 1")
        self.assertEqual(prot.validate(), [])

        unfinished = self.project.newProtocol(FlexPluginProt3DVA)
        prot.input3DVA.set(unfinished)
        self.assertTrue(any("no output particles yet" in e for e in prot.validate()), prot.validate())
        other = SetOfParticlesFlex(filename=os.path.join(self.tmp, "other.sqlite"), progName="OTHER")
        other.setFlexInfo(FlexInfo("OTHER"))
        prot.input3DVA.set(other)
        self.assertTrue(any("not by flexplugin's 3D variability" in e for e in prot.validate()), prot.validate())
        empty = self.newDisplay()
        self.assertTrue(any("EMPTY" in e for e in empty.validate()))

    # ------------------------------------------------------------------ form and protocol tree
    def test_form_and_tree(self):
        for cls in (FlexPluginProt3DVA, FlexPluginProt3DVADisplay):
            for name, param in cls().getDefinition().iterParams():
                if name not in ("runName", "runMode", "hostName", "numberOfThreads", "numberOfMpi"):
                    self.assertTrue(param.help.get(), f"{cls.__name__}.{name} has no help")
        disp = self.newDisplay()
        form = disp.getDefinition()

        def visible():
            return {name for name, _ in form.iterParams() if form.evalParamCondition(name)}

        self.assertIn("rangePercentile", visible())
        self.assertNotIn("width", visible())
        self.assertNotIn("skipReconstruction", visible())
        disp.mode.set(2)
        self.assertEqual(visible() & {"rangePercentile", "width", "skipReconstruction"}, {"skipReconstruction"})

        placed = hub_sections()
        self.assertEqual(placed.get("FlexPluginProt3DVA"), "Landscape estimation")
        self.assertEqual(placed.get("FlexPluginProt3DVADisplay"), "Data analysis")

    # ------------------------------------------------------------------ viewers
    def _checkPngs(self, views, paths):
        from flexplugin.viewers import PngView
        self.assertEqual(len(views), len(paths), views)
        for view, path in zip(views, paths):
            self.assertIsInstance(view, PngView)
            self.assertEqual(view.getImagePath(), os.path.abspath(path))
            self.assertTrue(os.path.exists(path))
        plotter = views[0].createPlotter()  # what show() displays, drawn off-screen
        self.assertTrue(plotter.getFigure().get_axes()[0].get_images())
        plotter.close()

    def test_viewers(self):
        from flexplugin.viewers import FlexPlugin3DVADisplayViewer, FlexPlugin3DVAViewer, chimeraxProgram
        viewer = open_viewer(self, self.va, FlexPlugin3DVAViewer)
        visualize = viewer._getVisualizeDict()
        plots = self.va.getPlotFiles()
        for param, name in (("showHistograms", "histograms"), ("showPairs", "pairs"),
                            ("showExplainedVariance", "explained_variance"), ("showConvergence", "convergence"),
                            ("showComponents", "components")):
            self._checkPngs(visualize[param](param), [plots[name]])
        views = visualize["showChimera"]("showChimera")
        script = open(self.va._getExtraPath("chimerax_components.cxc")).read()
        self.assertIn(os.path.abspath(self.va._getRunDir("component_001.mrc")), script)
        if chimeraxProgram() is None:
            self._checkPngs(views, [plots["components"]])

        series = open_viewer(self, self.simple, FlexPlugin3DVADisplayViewer)._getVisualizeDict()
        montages = [s["montage"] for s in self.simple.getSeriesFiles()]
        self._checkPngs(series["showMontages"]("showMontages"), montages)
        views = series["showChimera"]("showChimera")
        script = open(self.simple._getExtraPath("chimerax_display.cxc")).read()
        self.assertEqual(script.count("vseries true"), K)
        self.assertIn(os.path.abspath(self.simple.getSeriesFiles()[0]["volumes"][-1]), script)
        if chimeraxProgram() is None:
            self._checkPngs(views, montages)
        self.assertIsInstance(series["showClusters"]("showClusters")[0], MessageView)

        inter = open_viewer(self, self.inter, FlexPlugin3DVADisplayViewer)._getVisualizeDict()
        self._checkPngs(inter["showFrameCounts"]("showFrameCounts"), [self.inter.getPlotFiles()["frame_counts"]])

        cluster = open_viewer(self, self.cluster, FlexPlugin3DVADisplayViewer)._getVisualizeDict()
        self._checkPngs(cluster["showClusters"]("showClusters"), [self.cluster.getPlotFiles()["clusters"]])
        self._checkPngs(cluster["showMontages"]("showMontages"), [self.cluster.getClusterMontageFile()])
        cluster["showChimera"]("showChimera")
        script = open(self.cluster._getExtraPath("chimerax_display.cxc")).read()
        self.assertNotIn("vseries", script)
        self.assertIn(os.path.abspath(self.cluster._getDisplayDir("cluster_001.mrc")), script)
        self.assertIsInstance(cluster["showFrameCounts"]("showFrameCounts")[0], MessageView)


if __name__ == "__main__":
    unittest.main()
