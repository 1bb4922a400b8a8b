"""Headless Scipion: chaining flexplugin with other protocols, and the latent subset protocol, in one real project.

Input from "another plugin": the simulated particles re-packed as a foreign SetOfParticles (ids not consecutive and
not in stack order, three .mrcs stacks of which two start at index > 1), imported with pwem's ProtImportParticles
from a Scipion sqlite; a tiny 3DVA on it must map every result back by id (zFlex against latents.csv, locations and
poses against the import, images reaching the engine against the original ones, coordinate 1 following each
particle's simulated motion). Output to the framework: FlexPluginProtSubset (box, clusters, sphere) checked
exactly against numpy, pwem's subset / join sets / filter set (a zFlex formula) on our SetOfParticlesFlex and subset
of our SetOfVolumes, and a 3DVA run downstream of a latent subset.
"""
import json
import os
import unittest
import uuid

import mrcfile
import numpy as np
import pandas as pd

from pwem.constants import ALIGN_PROJ
from pwem.objects import ParticleFlex, SetOfParticles, SetOfParticlesFlex, SetOfVolumes
from pwem.protocols import ProtImportParticles, ProtSetFilter, ProtSubSet, ProtUnionSet

from flexplugin.engine.io import read_particles
from flexplugin.protocols import VA3D_PROGNAME, FlexPluginProt3DVA, FlexPluginProtSubset

from ..helpers import scipion_project  # noqa: F401  (sets up Scipion's environment before pyworkflow is imported)

__all__ = ["TestChaining"]  # what tests/scipion/__init__.py re-exports

N, BOX, APIX = 300, 32, 4.0
K, ITERATIONS, FILTER_RES = 2, 4, 12.0
OFFSETS = (0, 3, 7)  # junk images before the particles in each foreign stack: first indices 1, 4 and 8
BOX_RANGES = "1: -0.8 *; 2: -1 1"  # in standard deviations
CLUSTERS, KEEP_CLUSTERS, SEED = 3, "1, 3", 5
CPU = dict(useGpu=False, numberOfThreads=1)


def _latents(parts) -> dict[int, np.ndarray]:
    return {int(p.getObjId()): p.getZFlex() for p in parts.iterItems(orderBy="id")}


def _standardised(z: np.ndarray) -> np.ndarray:
    return (z - z.mean(0)) / z.std(0)


_point = scipion_project.point


class TestChaining(scipion_project.ProjectRuns, unittest.TestCase):
    timingsLabel = "chaining protocol"

    @classmethod
    def setUpClass(cls):
        cls.cwd = os.getcwd()
        cls.seconds = {}
        project = cls.project = scipion_project.newProject("chaining")
        cls.sim = cls.timed("simulate", lambda: scipion_project.runSimulate(
            project, numberOfParticles=N, boxSize=BOX, pixelSize=APIX, snr=0.5, seed=4, stackSize=N))

        sqlite, cls.simIdOf = cls.writeForeignParticles()
        imp = project.newProtocol(ProtImportParticles, objLabel="import foreign",
                                  importFrom=ProtImportParticles.IMPORT_FROM_SCIPION, sqliteFile=sqlite,
                                  samplingRate=APIX, voltage=300.0, sphericalAberration=2.7, amplitudeContrast=0.1)
        cls.imp = cls.launch("import", imp)

        va = project.newProtocol(FlexPluginProt3DVA, objLabel="3dva foreign", numberOfComponents=K,
                                 iterations=ITERATIONS, filterRes=FILTER_RES, **CPU)
        _point(va.inputParticles, cls.imp, "outputParticles")
        _point(va.inputMask, cls.sim, "outputMask")
        _point(va.inputVolume, cls.sim, "outputVolume")
        cls.va = cls.launch("3dva", va)

        cls.box = cls.launch("subset box", cls.newSubset(objLabel="subset box", mode=0, units=1,
                                                         boxRanges=BOX_RANGES))
        cls.clusters = cls.launch("subset clusters", cls.newSubset(
            objLabel="subset clusters", mode=1, numberOfClusters=CLUSTERS, clusterIds=KEEP_CLUSTERS, seed=SEED))

        # downstream: the plain subset goes back into an engine protocol (as it would into a re-refinement)
        down = project.newProtocol(FlexPluginProt3DVA, objLabel="3dva on subset", numberOfComponents=1,
                                   iterations=2, filterRes=FILTER_RES, **CPU)
        _point(down.inputParticles, cls.box, "outputPlainParticles")
        _point(down.inputMask, cls.sim, "outputMask")
        _point(down.inputVolume, cls.sim, "outputVolume")
        cls.down = cls.launch("3dva on subset", down)

    @classmethod
    def newSubset(cls, **params) -> FlexPluginProtSubset:
        prot = cls.project.newProtocol(FlexPluginProtSubset, **params)
        _point(prot.inputParticles, cls.va, "outputParticles")
        return prot

    @classmethod
    def writeForeignParticles(cls) -> tuple[str, dict[int, int]]:
        """The simulated particles as another plugin could hand them over: shuffled into three stacks (two not
        starting at index 1, junk images before them), under random non-consecutive ids. Returns the sqlite and
        {foreign id: simulated id}."""
        folder = os.path.join(scipion_project.ROOT, f"foreign_{uuid.uuid4().hex[:6]}")
        os.makedirs(folder)
        rng = np.random.default_rng(11)
        sim = cls.sim.outputParticles
        originals = [p.clone() for p in sim.iterItems(orderBy="id")]
        order = rng.permutation(len(originals))
        newIds = rng.choice(np.arange(2, 20 * N), size=N, replace=False)  # not sorted: not in stack order
        cls.foreignIds = sorted(int(i) for i in newIds)
        assert cls.foreignIds != list(range(cls.foreignIds[0], cls.foreignIds[0] + N))

        parts = SetOfParticles(filename=os.path.join(folder, "foreign.sqlite"))
        parts.copyInfo(sim)
        parts.setAlignment(ALIGN_PROJ)
        parts.setHasCTF(True)
        simIdOf = {}
        for c, chunk in enumerate(np.array_split(order, len(OFFSETS))):
            images = []
            for _ in range(OFFSETS[c]):
                images.append(rng.normal(size=(BOX, BOX)).astype(np.float32))
            stack = os.path.join(folder, f"foreign_stack_{c}.mrcs")
            for row in chunk:
                p = originals[row]
                q = p.clone()
                q.setObjId(int(newIds[row]))
                q.setLocation(len(images) + 1, stack)
                images.append(cls.readImage(p))
                parts.append(q)
                simIdOf[int(newIds[row])] = int(p.getObjId())
            with mrcfile.new(stack, overwrite=True) as m:
                m.set_data(np.stack(images))
                m.voxel_size = APIX
        parts.write()
        parts.close()
        return parts.getFileName(), simIdOf

    @staticmethod
    def readImage(p) -> np.ndarray:
        index, path = p.getLocation()
        with mrcfile.mmap(path.split(":")[0], permissive=True) as m:
            return np.array(m.data[index - 1], dtype=np.float32)

    # ------------------------------------------------------------ foreign input
    def test_foreign_particles_map_back_by_id(self):
        imported = self.imp.outputParticles
        self.assertEqual(sorted(imported.getIdSet()), self.foreignIds)
        self.assertTrue(imported.hasCTF())
        self.assertEqual(imported.getAlignment(), ALIGN_PROJ)
        stacks = {os.path.basename(p.getFileName()) for p in imported.iterItems()}
        self.assertEqual(len(stacks), len(OFFSETS))
        self.assertEqual(min(p.getIndex() for p in imported.iterItems()), 1)
        self.assertGreater(max(p.getIndex() for p in imported.iterItems()), N // len(OFFSETS))
        inputs = {p.getObjId(): p.clone() for p in imported.iterItems()}
        sims = {p.getObjId(): p.clone() for p in self.sim.outputParticles.iterItems()}

        # 3DVA's outputs: one particle per foreign id, zFlex = the engine's row for that id, same image and pose
        parts = self.va.outputParticles
        self.assertIsInstance(parts, SetOfParticlesFlex)
        table = pd.read_csv(self.va._getRunDir("latents.csv")).set_index("rlnImageId")
        self.assertEqual(sorted(table.index), self.foreignIds)
        for p in parts.iterItems(orderBy="id"):
            i = p.getObjId()
            np.testing.assert_allclose(p.getZFlex(), table.loc[i, [f"z{k}" for k in range(K)]].to_numpy(),
                                       rtol=1e-6, atol=1e-6)
            q = inputs[i]
            self.assertEqual(p.getLocation(), q.getLocation())
            np.testing.assert_allclose(p.getTransform().getMatrix(), q.getTransform().getMatrix(), atol=1e-9)
            self.assertAlmostEqual(p.getCTF().getDefocusU(), sims[self.simIdOf[i]].getCTF().getDefocusU())
        self.assertEqual(sorted(parts.getIdSet()), self.foreignIds)

        # the images the engine read for each id are the original particle's (stack, index and offset resolved)
        star = read_particles(self.va._getInputStarFile())
        rows = {int(i): r for r, i in enumerate(star.ids)}
        self.assertEqual(sorted(rows), self.foreignIds)
        check = self.foreignIds[::25]
        images = star.images(np.array([rows[i] for i in check]))
        for img, i in zip(images, check):
            np.testing.assert_allclose(img, self.readImage(sims[self.simIdOf[i]]), atol=1e-6)

        # and the coordinates belong to the right particles: coordinate 1 follows their simulated motion
        truth = pd.read_csv(self.sim._getDataDir("ground_truth.csv")).set_index("rlnImageId")["motion"]
        ids = self.foreignIds
        z1 = np.array([table.loc[i, "z0"] for i in ids])
        corr = np.corrcoef(z1, truth.loc[[self.simIdOf[i] for i in ids]].to_numpy())[0, 1]
        self.assertGreater(abs(corr), 0.8, f"coordinate 1 vs simulated motion by id: r = {corr:.3f}")

    # ------------------------------------------------------------ latent subset
    def checkSubset(self, prot, wantIds: list[int]) -> None:
        """Both outputs hold exactly `wantIds`, with the input's zFlex, FlexInfo, poses, CTF and locations."""
        source = self.va.outputParticles
        inputs = {p.getObjId(): p.clone() for p in source.iterItems()}
        flex, plain = prot.outputParticles, prot.outputPlainParticles
        self.assertIsInstance(flex, SetOfParticlesFlex)
        self.assertNotIsInstance(plain, SetOfParticlesFlex)
        self.assertIsInstance(plain, SetOfParticles)
        for s in (flex, plain):
            self.assertEqual(sorted(s.getIdSet()), sorted(wantIds))
            self.assertTrue(s.hasCTF())
            self.assertEqual(s.getAlignment(), ALIGN_PROJ)
            self.assertAlmostEqual(s.getSamplingRate(), APIX)
        info = flex.getFlexInfo()
        self.assertEqual(info.getProgName(), VA3D_PROGNAME)
        for attr in ("runPath", "consensusPath", "K", "filterRes"):
            self.assertEqual(info.getAttr(attr), source.getFlexInfo().getAttr(attr))
        for p in flex.iterItems():
            q = inputs[p.getObjId()]
            self.assertIsInstance(p, ParticleFlex)
            np.testing.assert_array_equal(p.getZFlex(), q.getZFlex())
            self.assertEqual(p.getLocation(), q.getLocation())
        for p in plain.iterItems():
            q = inputs[p.getObjId()]
            self.assertFalse(hasattr(p, "_zFlex"))
            self.assertEqual(p.getLocation(), q.getLocation())
            np.testing.assert_allclose(p.getTransform().getMatrix(), q.getTransform().getMatrix(), atol=1e-9)
            self.assertAlmostEqual(p.getCTF().getDefocusV(), q.getCTF().getDefocusV())
        table = pd.read_csv(prot.getSelectionFile())
        self.assertEqual(sorted(table.loc[table["kept"] == 1, "rlnImageId"]), sorted(wantIds))
        self.assertTrue(os.path.getsize(prot.getPlotFile()) > 5000)
        n = len(wantIds)
        self.assertIn(f"Kept {n} of {N} particles ({100 * n / N:.1f} %)", prot.summary()[0])
        self.assertIn(f"the {n} ", prot.methods()[0])

    def allLatents(self) -> tuple[np.ndarray, np.ndarray]:
        lat = _latents(self.va.outputParticles)
        ids = np.array(sorted(lat))
        return ids, np.array([lat[i] for i in ids])

    def test_subset_box_in_standard_deviations(self):
        ids, z = self.allLatents()
        s = _standardised(z)
        want = ids[(s[:, 0] >= -0.8) & (s[:, 1] >= -1) & (s[:, 1] <= 1)]
        self.assertTrue(0 < len(want) < N)
        self.checkSubset(self.box, want.tolist())
        self.assertIn("the box 1: [-0.8, inf]; 2: [-1, 1] (standard deviations)", self.box.summary()[0])

    def test_subset_clusters(self):
        ids, z = self.allLatents()
        table = pd.read_csv(self.clusters.getSelectionFile()).set_index("rlnImageId").loc[ids]
        labels = table["cluster"].to_numpy() - 1
        info = self.clusters.getSelectionInfo()
        centres = np.array(info["clusterCentres"])
        self.assertEqual(centres.shape, (CLUSTERS, K))
        # independently: a k-means solution (centres are their members' means, each particle nearest its
        # centre), numbered along latent 1, and the kept particles are exactly those of clusters 1 and 3
        np.testing.assert_allclose(centres, [z[labels == c].mean(0) for c in range(CLUSTERS)], atol=1e-9)
        d = ((z[:, None] - centres[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(d.argmin(1), labels)
        self.assertTrue(np.all(np.diff(centres[:, 0]) > 0))
        self.assertEqual(info["clusterSizes"], [int((labels == c).sum()) for c in range(CLUSTERS)])
        want = ids[np.isin(labels, [0, 2])]
        self.checkSubset(self.clusters, want.tolist())
        summary = self.clusters.summary()
        self.assertIn(f"k-means clusters 1, 3 of {CLUSTERS} (seed {SEED}, latent units)", summary[0])
        self.assertEqual(len(summary), 1 + CLUSTERS)
        self.assertTrue(summary[1].startswith(f"Cluster 1: {info['clusterSizes'][0]} particles") and
                        summary[1].endswith("(kept)."))
        self.assertFalse(summary[2].endswith("(kept)."))

    def test_subset_sphere_inverted(self):
        ids, z = self.allLatents()
        centre = z.mean(0)
        radius = float(np.median(np.linalg.norm(z - centre, axis=1)))
        prot = self.newSubset(objLabel="subset sphere outside", mode=2, invert=True, radius=radius,
                              centre=", ".join(repr(float(v)) for v in centre))
        self.launch("subset sphere", prot)
        want = ids[np.linalg.norm(z - centre, axis=1) > radius]
        self.checkSubset(prot, want.tolist())
        self.assertIn("outside the sphere of radius", prot.summary()[0])

    def test_subset_validation(self):
        ok = self.newSubset(mode=0, boxRanges="2: * 0")
        self.assertEqual(ok.validate(), [])
        for params, words in (
                (dict(mode=0, boxRanges="3: 0 1"), "Ranges: range '3: 0 1': latent dimension 3 does not exist"),
                (dict(mode=0, boxRanges="1: 1 0"), "minimum must be smaller"),
                (dict(mode=0, boxRanges="1 0 1"), "write 'dimension: min max'"),
                (dict(mode=0, boxRanges=""), "give at least one range"),
                (dict(mode=1, numberOfClusters=3, clusterIds="4"), "clusters are numbered 1 to 3"),
                (dict(mode=1, numberOfClusters=0), "between 1 and the number of particles"),
                (dict(mode=1, numberOfClusters=N + 1), "between 1 and the number of particles"),
                (dict(mode=2, centre="0.1"), "one finite value per latent dimension (2)"),
                (dict(mode=2, centre="0, 0", radius=0.0), "radius must be positive")):
            with self.subTest(**params):
                errors = self.newSubset(**params).validate()
                self.assertEqual(len(errors), 1, errors)
                self.assertIn(words, errors[0])
        plain = self.project.newProtocol(FlexPluginProtSubset)
        _point(plain.inputParticles, self.imp, "outputParticles")  # a set without latents
        self.assertIn("no latent coordinates", " ".join(plain.validate()))

    def test_empty_region_fails_with_the_latent_span(self):
        prot = self.newSubset(objLabel="subset empty", mode=0, boxRanges="1: 1000 2000")
        self.assertEqual(prot.validate(), [])
        scipion_project.launch(self.project, prot, check=False)
        self.assertTrue(prot.isFailed())
        self.assertIn("No particle lies in the region", prot.getErrorMessage())
        self.assertIn("widen the region", prot.getErrorMessage())

    def test_subset_viewer(self):
        from pwem.viewers import ObjectView
        from pyworkflow.plugin import Domain

        from flexplugin.viewers import PngView
        from flexplugin.viewers.viewer_subset import FlexPluginSubsetViewer
        self.assertIn(FlexPluginSubsetViewer, Domain.findViewers(self.clusters, "tkinter"))  # Scipion finds it
        viewer = FlexPluginSubsetViewer(project=self.project, protocol=self.clusters)
        viewer.setProtocol(self.clusters)
        visualize = viewer._getVisualizeDict()
        views = visualize["showSelection"]("showSelection")
        self.assertEqual(len(views), 1)
        self.assertIsInstance(views[0], PngView)
        self.assertEqual(views[0].getImagePath(), os.path.abspath(self.clusters.getPlotFile()))
        views = visualize["showParticles"]("showParticles")
        self.assertIsInstance(views[0], ObjectView)
        self.assertEqual(os.path.abspath(views[0].getPath()),
                         os.path.abspath(self.clusters.outputParticles.getFileName()))

    # ------------------------------------------------------------ framework protocols on our outputs
    def test_pwem_subset_and_join_of_particles_flex(self):
        full, box, clusters = self.va.outputParticles, self.box.outputParticles, self.clusters.outputParticles
        latents = _latents(full)

        sub = self.project.newProtocol(ProtSubSet, objLabel="pwem subset", setOperation=ProtSubSet.SET_DIFFERENCE)
        _point(sub.inputFullSet, self.va, "outputParticles")
        _point(sub.inputSubSet, self.box, "outputParticles")
        self.launch("pwem subset", sub)
        out = sub.outputParticlesFlex
        self.assertIsInstance(out, SetOfParticlesFlex)
        self.assertEqual(sorted(out.getIdSet()), sorted(set(full.getIdSet()) - set(box.getIdSet())))
        self.assertEqual(out.getFlexInfo().getProgName(), VA3D_PROGNAME)
        self.assertTrue(out.hasCTF())
        self.assertEqual(out.getAlignment(), ALIGN_PROJ)
        self.assertEqual(out.getFlexInfo().getAttr("K"), K)
        for i, z in _latents(out).items():
            np.testing.assert_array_equal(z, latents[i])

        join = self.project.newProtocol(ProtUnionSet, objLabel="pwem join", ignoreDuplicates=True)
        join.inputSets.append(box)
        join.inputSets.append(clusters)
        self.assertEqual(join.validate(), [])
        self.launch("pwem join", join)
        union = join.outputSet
        self.assertIsInstance(union, SetOfParticlesFlex)
        self.assertEqual(sorted(union.getIdSet()), sorted(set(box.getIdSet()) | set(clusters.getIdSet())))
        self.assertEqual(union.getFlexInfo().getProgName(), VA3D_PROGNAME)
        self.assertTrue(union.hasCTF())
        self.assertEqual(union.getAlignment(), ALIGN_PROJ)
        self.assertEqual(union.getFlexInfo().getAttr("K"), K)
        for i, z in _latents(union).items():
            np.testing.assert_array_equal(z, latents[i])

    def test_pwem_filter_set_by_a_latent_range(self):
        """pwem's 'filter set' with a formula on zFlex: the framework's own way to cut a latent range."""
        filt = self.project.newProtocol(ProtSetFilter, objLabel="pwem filter z1 > 0", operation=0,
                                        formula="item.getZFlex()[0] > 0")
        _point(filt.inputSet, self.va, "outputParticles")
        self.launch("pwem filter", filt)
        out = filt.outputParticles
        latents = _latents(self.va.outputParticles)
        self.assertIsInstance(out, SetOfParticlesFlex)
        self.assertEqual(sorted(out.getIdSet()), sorted(i for i, z in latents.items() if z[0] > 0))
        for i, z in _latents(out).items():
            np.testing.assert_array_equal(z, latents[i])
        self.assertTrue(out.hasCTF())
        self.assertEqual(out.getAlignment(), ALIGN_PROJ)
        self.assertEqual(out.getFlexInfo().getProgName(), VA3D_PROGNAME)

    def test_pwem_subset_of_components(self):
        sub = self.project.newProtocol(ProtSubSet, objLabel="pwem subset volumes", selectIds=True, range="2")
        _point(sub.inputFullSet, self.va, "outputComponents")
        self.launch("pwem subset volumes", sub)
        vols = sub.outputVolumes
        self.assertIsInstance(vols, SetOfVolumes)
        self.assertEqual(vols.getSize(), 1)
        vol = vols.getFirstItem()
        self.assertEqual(vol.getObjId(), 2)
        self.assertEqual(vol.getFileName(), self.va._getRunDir("component_001.mrc"))
        self.assertAlmostEqual(vols.getSamplingRate(), APIX)

    def test_3dva_downstream_of_a_latent_subset(self):
        parts = self.down.outputParticles
        self.assertEqual(sorted(parts.getIdSet()), sorted(self.box.outputPlainParticles.getIdSet()))
        table = pd.read_csv(self.down._getRunDir("latents.csv")).set_index("rlnImageId")
        for p in parts.iterItems():
            self.assertAlmostEqual(p.getZFlex()[0], table.loc[p.getObjId(), "z0"], places=5)
        with open(self.down._getRunDir("run.json")) as fh:
            self.assertEqual(json.load(fh)["n_particles"], self.box.outputParticles.getSize())


if __name__ == "__main__":
    unittest.main()
