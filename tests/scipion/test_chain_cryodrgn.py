"""Headless Scipion: a chain with a real plugin, scipion-em-cryodrgn 3.13.1 running cryoDRGN 4.3.1 (docs/ecosystem.md).

`make test-setup` (scripts/test_setup_cryodrgn.sh) installs the plugin (and scipion-em-relion, whose relion.convert
it imports) into the project venv and cryoDRGN 4.3.1 into its own venv in the reference cache; the plugin is pointed
at that venv through its variable CRYODRGN_ENV_ACTIVATION. Without them the tests skip (fail under CI=true).

1. Our simulate protocol's particles go through cryoDRGN's 'preprocess particles' (box kept) into its 'training
   VAE' (zdim 2, one epoch, small networks, CPU). Checked against what cryoDRGN itself parsed: the poses and CTF in
   its poses.pkl / ctf.pkl equal our simulated truth (RELION's A matrices, shifts / box), its z.pkl has a row per
   particle, and its SetOfParticlesFlex carries those rows as zFlex.
2. cryoDRGN's SetOfParticlesFlex goes into our latent subset (the half with z1 above its mean): the kept particles
   are exactly those whose z.pkl row says so, the rows found through the particle images, not the ids.
3. That subset (cryoDRGN's latents, ids no longer consecutive) seeds our 3D Flex training (one epoch, tiny): the
   seed file flex-train reads gives each particle id the z.pkl row of that particle's image, and the trained set
   keeps the subset's ids. Asking for more latent dims than cryoDRGN's zdim, or for components beyond it, fails
   validation.
"""
import hashlib
import os
import pickle
import unittest

import mrcfile
import numpy as np

from flexplugin.engine.geometry import euler_to_matrix_np
from flexplugin.engine.io import read_particles
from flexplugin.engine.latents import read_latents
from flexplugin.protocols import FlexPluginProtSubset, FlexPluginProtTrain

from ..helpers import refdata, scipion_project

__all__ = ["TestChainCryoDrgn"]

N, BOX, APIX = 256, 32, 4.0
ZDIM = 2
# one epoch with small networks; --no-analysis: cryoDRGN 4's train_vae would otherwise run its analysis (UMAP,
# notebooks) after the last epoch, which the plugin does in its own analyze protocol
DRGN_TRAIN = dict(zDim=ZDIM, numEpochs=1, qLayers=2, qDim=64, pLayers=2, pDim=64, numberOfThreads=1,
                  extraParams="--no-analysis --seed 1 --batch-size 32")
FLEX_TINY = dict(numberOfLatents=ZDIM, trainingBox=16, epochs=1, batchSize=64, layers=2, hiddenUnits=16, seed=2,
                 useGpu=False, numberOfThreads=1)
VENV = "cryodrgn-4.3.1-venv"  # in the reference cache, made by scripts/test_setup_cryodrgn.sh
_point = scipion_project.point


def _requireChain() -> str:
    """The activation command of the cryoDRGN venv, after checking that the set-up is complete (else skip/fail)."""
    venv = refdata.refdata_dir() / VENV
    if not (venv / "bin" / "cryodrgn").exists() or not (venv / "flexplugin-setup.txt").exists():
        refdata.missing(f"cryoDRGN 4.3.1 venv {venv}")
    try:
        import cryodrgn  # the Scipion plugin (the program lives in the venv)
        import relion  # noqa: F401
    except ImportError as e:
        refdata.missing(f"Scipion plugins scipion-em-cryodrgn 3.13.1 and scipion-em-relion ({e})")
    if getattr(cryodrgn, "__version__", None) != "3.13.1":
        refdata.missing(f"scipion-em-cryodrgn 3.13.1 (found {getattr(cryodrgn, '__version__', '?')})")
    return f". {venv / 'bin' / 'activate'}"


def _loadPickle(path: str):
    """The first object of a cryoDRGN pickle (poses, CTF, or z.pkl's means)."""
    with open(path, "rb") as f:
        return pickle.load(f)


def _imageKey(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img, dtype=np.float32).tobytes()).hexdigest()


class TestChainCryoDrgn(scipion_project.ProjectRuns, unittest.TestCase):
    timingsLabel = "cryoDRGN chain protocol"

    @classmethod
    def setUpClass(cls):
        activation = _requireChain()
        cls.cwd = os.getcwd()
        cls.seconds = {}
        # the plugin's variable, read from the environment by every Scipion process (protocol runs are
        # subprocesses); set again on the class in case another test already registered the plugin
        os.environ["CRYODRGN_ENV_ACTIVATION"] = activation
        from cryodrgn import Plugin as DrgnPlugin
        from cryodrgn.protocols import CryoDrgnProtPreprocess, CryoDrgnProtTrain
        project = cls.project = scipion_project.newProject("chain_cryodrgn")
        DrgnPlugin._defineVariables()
        cls.sim = cls.timed("simulate", lambda: scipion_project.runSimulate(
            project, numberOfParticles=N, boxSize=BOX, pixelSize=APIX, snr=1.0, seed=6, stackSize=N))

        pre = project.newProtocol(CryoDrgnProtPreprocess, objLabel="cryodrgn preprocess", doScale=False,
                                  numberOfThreads=1)
        _point(pre.inputParticles, cls.sim, "outputParticles")
        cls.pre = cls.launch("cryodrgn preprocess", pre)

        train = project.newProtocol(CryoDrgnProtTrain, objLabel="cryodrgn train", **DRGN_TRAIN)
        _point(train.inputParticles, cls.pre, "Particles")
        cls.drgn = cls.launch("cryodrgn train", train)

        sub = project.newProtocol(FlexPluginProtSubset, objLabel="subset z1 above mean", mode=0, units=1,
                                  boxRanges="1: 0 *")
        _point(sub.inputParticles, cls.drgn, "Particles")
        cls.sub = cls.launch("subset", sub)

        cls.flex = cls.launch("flex train", cls.newFlexTrain(cls.sub, "outputParticles",
                                                             objLabel="3d flex seeded by cryodrgn"))

        # cryoDRGN's own files: its input STAR (written by the relion plugin), its parses and its latents
        cls.drgnStar = read_particles(cls.drgn._getExtraPath("input_particles.star"))
        cls.zMu = np.asarray(_loadPickle(cls.drgn._getExtraPath("output", "z.pkl")), dtype=np.float64)
        cls.rowOfImage = {_imageKey(img): r for r, img in enumerate(cls.drgnStar.images(slice(None)))}
        cls.truth = read_particles(cls.sim._getExtraPath("data", "particles.star"))

    @classmethod
    def newFlexTrain(cls, particlesProt, output: str, **params):
        """A tiny 3D flex training on the given particles, the simulated consensus and mask (latents seeded)."""
        flex = cls.project.newProtocol(FlexPluginProtTrain, **{**FLEX_TINY, **params})
        _point(flex.inputParticles, particlesProt, output)
        _point(flex.inputVolume, cls.sim, "outputVolume")
        _point(flex.inputMask, cls.sim, "outputMask")
        return flex

    def drgnRows(self, parts) -> dict[int, int]:
        """Particle id → the row of cryoDRGN's input (and of z.pkl) holding that particle's image."""
        out = {}
        for p in parts.iterItems(orderBy="id"):
            index, fn = p.getLocation()
            with mrcfile.mmap(fn, mode="r", permissive=True) as m:
                out[int(p.getObjId())] = self.rowOfImage[_imageKey(m.data[index - 1])]
        return out

    # ------------------------------------------------------------------ 1. our particles into cryoDRGN
    def test_cryodrgn_read_our_poses_ctf_and_images(self):
        """cryoDRGN's parses of its input equal our simulated truth, particle by particle (matched by image)."""
        star, truth = self.drgnStar, self.truth
        self.assertEqual(len(star), N)
        # cryoDRGN's downsample to the same box rewrote the images through an FFT: match them to ours by nearest
        x = star.images(slice(None)).reshape(N, -1).astype(np.float64)
        y = truth.images(slice(None)).reshape(N, -1).astype(np.float64)
        order = ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T).argmin(1)
        self.assertEqual(sorted(order.tolist()), list(range(N)))  # every simulated image, each once
        np.testing.assert_allclose(x, y[order], atol=1e-5 * np.abs(y).max())  # and unchanged
        t = truth.table.iloc[order]
        rot, trans = _loadPickle(self.drgn._getExtraPath("poses.pkl"))
        A = euler_to_matrix_np(*(t[c].to_numpy(float) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
        np.testing.assert_allclose(rot, A, atol=1e-4)
        shifts = t[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float) / APIX
        np.testing.assert_allclose(np.asarray(trans) * BOX, shifts, atol=1e-3)
        ctf = np.asarray(_loadPickle(self.drgn._getExtraPath("ctf.pkl")), dtype=np.float64)
        # cryoDRGN's CTF rows: box, pixel size, defocus U, V (Å), angle (deg), kV, Cs (mm), amplitude contrast, phase
        np.testing.assert_allclose(ctf[:, 0], BOX)
        np.testing.assert_allclose(ctf[:, 1], APIX, rtol=1e-6)
        for j, c in ((2, "rlnDefocusU"), (3, "rlnDefocusV"), (4, "rlnDefocusAngle"), (5, "rlnVoltage"),
                     (6, "rlnSphericalAberration"), (7, "rlnAmplitudeContrast")):
            np.testing.assert_allclose(ctf[:, j], t[c].to_numpy(float), rtol=1e-5, atol=1e-3, err_msg=c)

    def test_cryodrgn_output_carries_its_latents(self):
        """cryoDRGN trained: a finite z.pkl row per particle, each particle's zFlex being its image's row."""
        out = self.drgn.Particles
        self.assertEqual(out.getSize(), N)
        self.assertEqual(self.zMu.shape, (N, ZDIM))
        self.assertTrue(np.isfinite(self.zMu).all())
        self.assertGreater(self.zMu.std(0).min(), 0)
        self.assertEqual(out.getFlexInfo().getProgName(), "CryoDRGN")
        rows = self.drgnRows(out)
        z = {int(p.getObjId()): p.getZFlex() for p in out.iterItems(orderBy="id")}
        for pid, r in rows.items():
            np.testing.assert_allclose(z[pid], self.zMu[r], rtol=1e-6, err_msg=f"particle {pid}")

    # ------------------------------------------------------------------ 2. cryoDRGN's latents into our subset
    def test_subset_keeps_cryodrgn_half_by_latent(self):
        """Our box subset on cryoDRGN's zFlex keeps exactly the particles whose z.pkl row has z1 >= mean."""
        inp, out = self.drgn.Particles, self.sub.outputParticles
        rows = self.drgnRows(inp)
        z1 = self.zMu[:, 0]
        want = sorted(pid for pid, r in rows.items() if z1[r] >= z1.mean())
        self.assertTrue(0 < len(want) < N)
        self.assertEqual(sorted(out.getIdSet()), want)
        self.assertEqual(sorted(self.sub.outputPlainParticles.getIdSet()), want)
        self.assertEqual(out.getFlexInfo().getProgName(), "CryoDRGN")

    # ------------------------------------------------------------------ 3. cryoDRGN's latents seed 3D Flex by id
    def test_flex_train_seeded_by_id_from_cryodrgn(self):
        """flex-train's seed file gives each id the z.pkl row of that particle's image; the output keeps the ids."""
        sub = self.sub.outputParticles
        seeds = read_latents(self.flex._getExtraPath("input", "init_latents.csv"))
        ids = sorted(sub.getIdSet())
        self.assertEqual(sorted(seeds.ids.tolist()), ids)
        self.assertNotEqual(ids, list(range(1, len(ids) + 1)))  # a subset: mapping by position would differ
        rows = self.drgnRows(sub)
        for pid, z in zip(seeds.ids.tolist(), seeds.z):
            np.testing.assert_allclose(z, self.zMu[rows[pid]], rtol=1e-6, err_msg=f"particle {pid}")
        # the particles flex-train read are those images too, under the same ids
        engine = read_particles(self.flex._getExtraPath("input", "particles.star"))
        for pid, img in zip(engine.ids.tolist(), engine.images(slice(None))):
            self.assertEqual(self.rowOfImage[_imageKey(img)], rows[pid], f"particle {pid}")
        seedFile = self.flex._getExtraPath("input", "init_latents.csv")
        self.assertIn(f"--init-latents {seedFile}", scipion_project.logText(self.flex))  # flex-train read them
        out = self.flex.outputParticles
        self.assertEqual(sorted(out.getIdSet()), ids)
        self.assertEqual(len(out.getFirstItem().getZFlex()), ZDIM)

    def test_flex_train_validates_latents_against_cryodrgn_zdim(self):
        """More latent dims than cryoDRGN's zdim, or components beyond it, are refused before running."""
        for params, msg in ((dict(numberOfLatents=ZDIM + 1), f"have {ZDIM} coordinates, fewer than"),
                            (dict(initComponents="1 3"), f"distinct numbers from 1 to {ZDIM}")):
            self.assertIn(msg, " ".join(self.newFlexTrain(self.drgn, "Particles", **params).validate()), params)
        self.assertEqual(self.newFlexTrain(self.drgn, "Particles", initComponents="2 1").validate(), [])
