"""Scipion particle sets <-> engine STAR (flexplugin.convert) through real pwem objects and sqlite files.

The pose oracle is independent of flexplugin.engine.geometry: the relion plugin's convention written with
pwem.convert.transformations (Minv = euler_matrix(-rot, -tilt, -psi, 'szyz'), Minv[:3, 3] = -s, M = inv(Minv)).
"""
import math
import os
import shutil
import tempfile
import unittest

import mrcfile
import numpy as np

import pyworkflow.object as pwobj
from pwem.constants import ALIGN_2D, ALIGN_NONE, ALIGN_PROJ
from pwem.convert.transformations import euler_matrix
from pwem.emlib.image import ImageHandler
from pwem.objects import (
    Acquisition,
    CTFModel,
    FlexInfo,
    Particle,
    ParticleFlex,
    SetOfParticles,
    SetOfParticlesFlex,
    Transform,
)

from flexplugin import convert
from flexplugin.engine.errors import InputError
from flexplugin.engine.geometry import euler_to_matrix_np, relion_from_scipion_matrix, scipion_matrix_from_relion
from flexplugin.engine.io import read_particles, write_particles_star

from ..helpers import scipion_project  # noqa: F401  (sets up Scipion's environment before pwem is imported)

__all__ = ["TestPoseConvention", "TestWriteStar", "TestReadStar", "TestLatents"]  # what tests/scipion/__init__.py re-exports

BOX = 16
APIX = 1.7

# (rot, tilt, psi, shift x px, shift y px): random poses plus the gimbal cases tilt = 0 and tilt = 180
_rng = np.random.default_rng(11)
POSES = [tuple(v) for v in np.column_stack([_rng.uniform(-180, 180, 8), _rng.uniform(1, 179, 8),
                                            _rng.uniform(-180, 180, 8), _rng.uniform(-5, 5, (8, 2))])]
POSES += [(30.0, 0.0, 40.0, 1.5, -2.25), (-75.0, 180.0, 10.0, -3.0, 0.5), (0.0, 0.0, 0.0, 0.0, 0.0),
          (120.0, 90.0, -60.0, 4.0, 4.0)]


def independentMatrix(rot: float, tilt: float, psi: float, sx: float, sy: float) -> np.ndarray:
    """Scipion ALIGN_PROJ matrix as the relion plugin builds it, with pwem's own Euler code."""
    Minv = euler_matrix(-math.radians(rot), -math.radians(tilt), -math.radians(psi), "szyz")
    Minv[:3, 3] = [-sx, -sy, 0.0]
    return np.linalg.inv(Minv)


def writeStack(path: str, images: np.ndarray) -> None:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(images.astype(np.float32))
        m.voxel_size = APIX
        m.set_image_stack()


class TmpDirCase(unittest.TestCase):
    """A test case with a fresh temporary folder as self.tmp."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="flexplugin_convert_")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, *p: str) -> str:
        return os.path.join(self.tmp, *p)


class TestPoseConvention(TmpDirCase):
    def test_matrix_from_relion_matches_pwem_euler(self):
        for pose in POSES:
            with self.subTest(pose=pose):
                np.testing.assert_allclose(scipion_matrix_from_relion(*pose), independentMatrix(*pose),
                                           atol=1e-10)

    def test_relion_from_matrix_recovers_pose(self):
        for pose in POSES:
            with self.subTest(pose=pose):
                rot, tilt, psi, sx, sy = relion_from_scipion_matrix(independentMatrix(*pose))
                np.testing.assert_allclose([sx, sy], pose[3:], atol=1e-9)
                # angles are ambiguous at tilt 0/180: compare the rotations they mean
                np.testing.assert_allclose(euler_to_matrix_np(rot, tilt, psi), euler_to_matrix_np(*pose[:3]),
                                           atol=1e-9)
                if 1 < pose[1] < 179:
                    np.testing.assert_allclose([rot, tilt, psi], pose[:3], atol=1e-7)

    def test_gimbal_lock_puts_in_plane_angle_in_psi(self):
        rot, tilt, psi, _, _ = relion_from_scipion_matrix(independentMatrix(30.0, 0.0, 40.0, 0, 0))
        self.assertAlmostEqual(tilt, 0.0, places=9)
        self.assertAlmostEqual(rot, 0.0, places=9)
        self.assertAlmostEqual(psi, 70.0, places=7)

    def test_transforms_survive_sqlite(self):
        fn = self.path("poses.sqlite")
        parts = SetOfParticles(filename=fn)
        parts.setAlignmentProj()
        for i, pose in enumerate(POSES):
            p = Particle()
            p.setObjId(10 * i + 3)
            p.setTransform(Transform(independentMatrix(*pose)))
            parts.append(p)
        parts.write()
        parts.close()

        back = SetOfParticles(filename=fn)
        back.loadAllProperties()
        self.assertEqual(back.getAlignment(), ALIGN_PROJ)
        seen = 0
        for p in back.iterItems(orderBy="id"):
            pose = POSES[(p.getObjId() - 3) // 10]
            M = p.getTransform().getMatrix()
            np.testing.assert_allclose(M, independentMatrix(*pose), atol=1e-12)
            rot, tilt, psi, sx, sy = relion_from_scipion_matrix(M)
            np.testing.assert_allclose(scipion_matrix_from_relion(rot, tilt, psi, sx, sy), M, atol=1e-9)
            seen += 1
        back.close()
        self.assertEqual(seen, len(POSES))


class ParticleSetCase(TmpDirCase):
    """Builds real particle sets: images in two stacks (one MRC, one SPIDER .stk), non-consecutive ids."""

    IDS = [3, 7, 8, 15, 42, 43, 100, 2001, 2002, 5000, 5001, 9999]

    def makeSet(self, name: str = "particles", withPoses: bool = True, withCTF: bool = True,
                subsets: bool = True, spiderStack: bool = True) -> tuple[SetOfParticles, dict]:
        rng = np.random.default_rng(5)
        n = len(self.IDS)
        images = rng.normal(size=(n, BOX, BOX)).astype(np.float32)
        half = n // 2
        writeStack(self.path(f"{name}_a.mrcs"), images[:half])
        writeStack(self.path(f"{name}_b.mrcs"), images[half:][::-1])  # stored in reverse order
        stackB = self.path(f"{name}_b.mrcs")
        if spiderStack:
            stackB = self.path(f"{name}_b.stk")
            ImageHandler().convertStack(self.path(f"{name}_b.mrcs"), stackB)
            os.remove(self.path(f"{name}_b.mrcs"))
        parts = SetOfParticles(filename=self.path(f"{name}.sqlite"))
        parts.setSamplingRate(APIX)
        parts.setAlignment(ALIGN_PROJ if withPoses else ALIGN_NONE)
        parts.setHasCTF(withCTF)
        parts.setAcquisition(Acquisition(magnification=10000, voltage=300.0, sphericalAberration=2.7,
                                         amplitudeContrast=0.1))
        truth = {}
        for j, pid in enumerate(self.IDS):
            pose = POSES[j % len(POSES)]
            ctf = (12000.0 + 100 * j, 11500.0 + 90 * j, 10.0 * j, 0.0 if j % 3 else 35.0)
            p = Particle()
            p.setObjId(pid)
            p.setLocation((j + 1, self.path(f"{name}_a.mrcs")) if j < half else (n - j, stackB))
            if withPoses:
                p.setTransform(Transform(independentMatrix(*pose)))
            if withCTF:
                c = CTFModel()
                c.setStandardDefocus(*ctf[:3])
                c.setPhaseShift(ctf[3])
                p.setCTF(c)
            if subsets:
                setattr(p, convert.RANDOM_SUBSET_ATTR, pwobj.Integer(1 + j % 2))
            parts.append(p)
            truth[pid] = dict(pose=pose, ctf=ctf, image=images[j], subset=1 + j % 2)
        parts.write()
        return parts, truth


class TestWriteStar(ParticleSetCase):
    def test_engine_reads_what_convert_writes(self):
        parts, truth = self.makeSet()
        star = self.path("out", "particles.star")
        n = convert.writeSetOfParticles(parts, star, outputDir=self.path("converted"))
        self.assertEqual(n, len(self.IDS))
        ps = read_particles(star)
        self.assertEqual(sorted(ps.ids.tolist()), self.IDS)
        self.assertAlmostEqual(ps.apix, APIX)
        self.assertEqual(ps.box, BOX)
        self.assertFalse(ps.phase_flipped)
        R = ps.rotations(slice(None)).double().numpy()
        shifts = ps.shifts_px(slice(None)).double().numpy()
        subsets = ps.half_sets()
        images = ps.images(np.arange(len(ps)))
        for row, pid in enumerate(ps.ids):
            t = truth[int(pid)]
            rot, tilt, psi, sx, sy = t["pose"]
            with self.subTest(particle=int(pid)):
                np.testing.assert_allclose(R[row], euler_to_matrix_np(rot, tilt, psi), atol=1e-5)
                np.testing.assert_allclose(shifts[row], [sx, sy], atol=1e-5)
                # independent route: the pose written in the STAR gives back the Scipion matrix
                r = ps.table.iloc[row]
                M = independentMatrix(r.rlnAngleRot, r.rlnAngleTilt, r.rlnAnglePsi,
                                      r.rlnOriginXAngst / APIX, r.rlnOriginYAngst / APIX)
                np.testing.assert_allclose(M, independentMatrix(*t["pose"]), atol=1e-5)
                self.assertAlmostEqual(r.rlnDefocusU, max(t["ctf"][:2]), places=4)
                self.assertAlmostEqual(r.rlnDefocusV, min(t["ctf"][:2]), places=4)
                self.assertAlmostEqual(r.rlnDefocusAngle, t["ctf"][2], places=4)
                self.assertAlmostEqual(r.rlnPhaseShift, t["ctf"][3], places=4)
                self.assertEqual(r.rlnVoltage, 300.0)
                self.assertEqual(r.rlnSphericalAberration, 2.7)
                self.assertEqual(r.rlnAmplitudeContrast, 0.1)
                self.assertEqual(subsets[row], t["subset"])
                np.testing.assert_array_equal(images[row], t["image"])  # right stack, right index
                self.assertTrue(os.path.isabs(r.rlnImageName.split("@", 1)[1]))
        # the SPIDER stack was converted once into the output folder
        self.assertEqual(os.listdir(self.path("converted")), ["particles_b.mrcs"])

    def test_optics_groups_and_phase_flip(self):
        parts, _ = self.makeSet(subsets=False, spiderStack=False)
        parts.setIsPhaseFlipped(True)
        parts.write()
        volts = {}
        # give half of the particles another voltage
        updated = SetOfParticles(filename=self.path("volts.sqlite"))
        updated.copyInfo(parts)
        for p in parts.iterItems(orderBy="id"):
            q = p.clone()
            acq = Acquisition(magnification=10000, voltage=200.0 if p.getObjId() % 2 else 300.0,
                              sphericalAberration=2.7, amplitudeContrast=0.07)
            q.setAcquisition(acq)
            volts[p.getObjId()] = acq.getVoltage()
            updated.append(q)
        updated.write()
        star = self.path("optics.star")
        convert.writeSetOfParticles(updated, star)
        ps = read_particles(star)
        self.assertTrue(ps.phase_flipped)
        self.assertEqual(len(ps.optics), 2)
        self.assertNotIn("rlnRandomSubset", ps.table)
        for pid, v in zip(ps.ids, ps.table.rlnVoltage):
            self.assertEqual(v, volts[int(pid)])
        self.assertTrue(np.allclose(ps.table.rlnAmplitudeContrast, 0.07))

    def test_non_mrc_stack_without_output_folder_is_an_error(self):
        parts, _ = self.makeSet()
        with self.assertRaisesRegex(InputError, "not MRC"):
            convert.writeSetOfParticles(parts, self.path("x.star"))

    def test_missing_alignment_is_a_clear_error(self):
        parts, _ = self.makeSet(withPoses=False)
        with self.assertRaisesRegex(InputError, "3D projection alignment"):
            convert.writeSetOfParticles(parts, self.path("x.star"), outputDir=self.tmp)
        parts.setAlignment(ALIGN_2D)
        with self.assertRaisesRegex(InputError, "alignment '2D'"):
            convert.writeSetOfParticles(parts, self.path("x.star"), outputDir=self.tmp)
        # allowed when the caller does not need poses: no pose columns then
        convert.writeSetOfParticles(parts, self.path("x.star"), outputDir=self.tmp, requireAlignment=False)
        self.assertFalse(read_particles(self.path("x.star")).has_poses)

    def test_missing_ctf_is_a_clear_error(self):
        parts, _ = self.makeSet(withCTF=False)
        with self.assertRaisesRegex(InputError, "no CTF"):
            convert.writeSetOfParticles(parts, self.path("x.star"), outputDir=self.tmp)
        convert.writeSetOfParticles(parts, self.path("x.star"), outputDir=self.tmp, requireCTF=False)
        self.assertFalse(read_particles(self.path("x.star")).has_ctf)

    def test_mirrored_transform_is_named(self):
        parts, _ = self.makeSet(spiderStack=False)
        mirrored = SetOfParticles(filename=self.path("mirrored.sqlite"))
        mirrored.copyInfo(parts)
        for p in parts.iterItems(orderBy="id"):
            q = p.clone()
            if q.getObjId() == 42:
                M = q.getTransform().getMatrix()
                M[:3, 0] *= -1
                q.setTransform(Transform(M))
            mirrored.append(q)
        mirrored.write()
        with self.assertRaisesRegex(InputError, "particle 42: .*not a proper rotation"):
            convert.writeSetOfParticles(mirrored, self.path("x.star"))

    def test_empty_set_and_missing_stack(self):
        empty = SetOfParticles(filename=self.path("empty.sqlite"))
        empty.setAlignmentProj()
        empty.setHasCTF(True)
        with self.assertRaisesRegex(InputError, "empty"):
            convert.writeSetOfParticles(empty, self.path("x.star"))
        parts, _ = self.makeSet(spiderStack=False)
        os.remove(self.path("particles_a.mrcs"))
        with self.assertRaisesRegex(InputError, "particle 3: image stack .*particles_a.mrcs does not exist"):
            convert.writeSetOfParticles(parts, self.path("x.star"))


class TestReadStar(ParticleSetCase):
    def test_star_to_set_round_trip_by_id(self):
        parts, truth = self.makeSet()
        star = self.path("particles.star")
        convert.writeSetOfParticles(parts, star, outputDir=self.path("converted"))
        # shuffle the rows: reading must key on rlnImageId, never on row order
        shuffled = self.path("shuffled.star")
        ps = read_particles(star)
        table = ps.table.sample(frac=1.0, random_state=1)
        write_particles_star(shuffled, table, ps.optics)

        back = SetOfParticles(filename=self.path("back.sqlite"))
        n = convert.readSetOfParticles(shuffled, back, relativeTo=self.tmp)
        back.write()
        back.close()
        back = SetOfParticles(filename=self.path("back.sqlite"))
        back.loadAllProperties()
        self.assertEqual(n, len(self.IDS))
        self.assertEqual(back.getAlignment(), ALIGN_PROJ)
        self.assertTrue(back.hasCTF())
        self.assertAlmostEqual(back.getSamplingRate(), APIX)
        self.assertEqual(back.getAcquisition().getVoltage(), 300.0)
        self.assertEqual([p.getObjId() for p in back.iterItems(orderBy="id")], self.IDS)
        for p in back.iterItems(orderBy="id"):
            t = truth[p.getObjId()]
            with self.subTest(particle=p.getObjId()):
                np.testing.assert_allclose(p.getTransform().getMatrix(), independentMatrix(*t["pose"]),
                                           atol=1e-5)
                ctf = p.getCTF()
                self.assertAlmostEqual(ctf.getDefocusU(), max(t["ctf"][:2]), places=4)
                self.assertAlmostEqual(ctf.getDefocusV(), min(t["ctf"][:2]), places=4)
                self.assertAlmostEqual(ctf.getPhaseShift(), t["ctf"][3], places=4)
                self.assertEqual(p.getAcquisition().getAmplitudeContrast(), 0.1)
                self.assertEqual(getattr(p, convert.RANDOM_SUBSET_ATTR).get(), t["subset"])
                index, fn = p.getLocation()
                self.assertFalse(os.path.isabs(fn))  # stored relative to `relativeTo`
                image = ImageHandler().read((index, os.path.join(self.tmp, fn))).getData()
                np.testing.assert_array_equal(image, t["image"])
        back.close()

    def test_paths_relative_to_a_symlinked_project(self):
        parts, _ = self.makeSet(spiderStack=False)
        star = self.path("particles.star")
        convert.writeSetOfParticles(parts, star)
        linkDir = tempfile.mkdtemp(prefix="flexplugin_link_")
        self.addCleanup(shutil.rmtree, linkDir, True)
        link = os.path.join(linkDir, "project")
        os.symlink(self.tmp, link)
        back = SetOfParticles(filename=self.path("linked.sqlite"))
        convert.readSetOfParticles(star, back, relativeTo=link)
        for p in back.iterItems(orderBy="id"):
            self.assertTrue(p.getFileName().startswith("particles_"), p.getFileName())
        outside = SetOfParticles(filename=self.path("outside.sqlite"))
        convert.readSetOfParticles(star, outside, relativeTo=self.path("sub"))
        self.assertTrue(all(os.path.isabs(p.getFileName()) for p in outside))

    def test_update_poses_matches_by_id(self):
        parts, truth = self.makeSet(spiderStack=False)
        star = self.path("particles.star")
        convert.writeSetOfParticles(parts, star)
        ps = read_particles(star)
        # new poses for a subset of particles, rows in reverse order
        table = ps.table.iloc[::-1].iloc[:8].copy()
        newPose = {int(i): (float(k * 10), 45.0 + k, float(-k * 5), 0.5 * k, -0.25 * k)
                   for k, i in enumerate(table.rlnImageId)}
        table["rlnAngleRot"] = [newPose[int(i)][0] for i in table.rlnImageId]
        table["rlnAngleTilt"] = [newPose[int(i)][1] for i in table.rlnImageId]
        table["rlnAnglePsi"] = [newPose[int(i)][2] for i in table.rlnImageId]
        table["rlnOriginXAngst"] = [newPose[int(i)][3] * APIX for i in table.rlnImageId]
        table["rlnOriginYAngst"] = [newPose[int(i)][4] * APIX for i in table.rlnImageId]
        write_particles_star(self.path("new.star"), table, ps.optics)

        out = SetOfParticles(filename=self.path("updated.sqlite"))
        with self.assertRaisesRegex(InputError, "missing"):
            convert.updateParticlesFromStar(parts, self.path("new.star"), out)
        out = SetOfParticles(filename=self.path("updated2.sqlite"))
        n = convert.updateParticlesFromStar(parts, self.path("new.star"), out, skipMissing=True)
        self.assertEqual(n, 8)
        self.assertEqual(sorted(p.getObjId() for p in out), sorted(newPose))
        for p in out.iterItems(orderBy="id"):
            np.testing.assert_allclose(p.getTransform().getMatrix(), independentMatrix(*newPose[p.getObjId()]),
                                       atol=1e-5)
            self.assertAlmostEqual(p.getCTF().getDefocusU(), max(truth[p.getObjId()]["ctf"][:2]), places=4)

    def test_rows_with_unknown_ids_are_an_error(self):
        parts, _ = self.makeSet(spiderStack=False)
        star = self.path("particles.star")
        convert.writeSetOfParticles(parts, star)
        ps = read_particles(star)
        table = ps.table.copy()
        table.loc[table.index[0], "rlnImageId"] = 123456
        write_particles_star(self.path("bad.star"), table, ps.optics)
        out = SetOfParticles(filename=self.path("u.sqlite"))
        with self.assertRaisesRegex(InputError, "not in the particle set"):
            convert.updateParticlesFromStar(parts, self.path("bad.star"), out, skipMissing=True)


class TestLatents(ParticleSetCase):
    """zFlex <-> the engine's latents file, by particle id (engine/latents.py), written and read as text here."""

    def makeFlexSet(self, z: dict[int, list[float]]) -> SetOfParticlesFlex:
        parts = SetOfParticlesFlex(filename=self.path("flex.sqlite"), progName="TEST")
        parts.setSamplingRate(APIX)
        for pid in sorted(z, reverse=True):  # inserted out of id order
            p = ParticleFlex(progName="TEST")
            p.setObjId(pid)
            p.setLocation((1, self.path("x.mrcs")))
            p.setZFlex(z[pid])
            parts.append(p)
        parts.write()
        return parts

    def test_zflex_written_as_latents_file_by_id(self):
        z = {pid: [0.25 * k - 1.0, 1.0 / (k + 3)] for k, pid in enumerate(self.IDS)}
        path = self.path("seed", "latents.csv")
        self.assertEqual(convert.writeZFlexLatents(self.makeFlexSet(z), path), (len(z), 2))
        with open(path) as fh:
            header, *lines = fh.read().splitlines()
        self.assertEqual(header, "rlnImageId,z0,z1")
        got = {int(w[0]): [float(w[1]), float(w[2])] for w in (line.split(",") for line in lines)}
        self.assertEqual(sorted(got), sorted(z))
        for pid in z:
            np.testing.assert_allclose(got[pid], z[pid], rtol=1e-8)

    def test_zflex_of_differing_lengths_is_an_error(self):
        parts = self.makeFlexSet({3: [0.1, 0.2], 7: [0.3]})
        with self.assertRaisesRegex(InputError, "particle 7 has 1 latent coordinates, the first has 2"):
            convert.writeZFlexLatents(parts, self.path("bad.csv"))

    def test_set_filled_by_id_from_latents_file(self):
        parts, _ = self.makeSet(spiderStack=False)
        rows = self.IDS[::-1][:10]  # reverse order, two particles left out
        with open(self.path("latents.csv"), "w") as fh:
            fh.write("rlnImageId,z0,z1,scale\n")
            fh.writelines(f"{pid},{pid / 1000},{-pid / 7},{1 + pid / 1e4}\n" for pid in rows)
        out = SetOfParticlesFlex(filename=self.path("out.sqlite"), progName="TEST")
        with self.assertRaisesRegex(InputError, f"particle {sorted(set(self.IDS) - set(rows))[0]} has no coordinates"):
            convert.readSetOfParticlesFlex(parts, self.path("latents.csv"), out, "TEST")
        out = SetOfParticlesFlex(filename=self.path("out2.sqlite"), progName="TEST")
        n, missing = convert.readSetOfParticlesFlex(parts, self.path("latents.csv"), out, "TEST",
                                                    extraAttrs={"scale": "_testScale"}, skipMissing=True)
        self.assertEqual((n, missing), (10, 2))
        self.assertTrue(out.hasAlignmentProj() and out.hasCTF())
        inputs = {p.getObjId(): p.clone() for p in parts}
        for p in out.iterItems(orderBy="id"):
            pid = p.getObjId()
            np.testing.assert_allclose(p.getZFlex(), [pid / 1000, -pid / 7], rtol=1e-7)
            self.assertAlmostEqual(p._testScale.get(), 1 + pid / 1e4)
            self.assertEqual(p.getLocation(), inputs[pid].getLocation())
            np.testing.assert_allclose(p.getTransform().getMatrix(), inputs[pid].getTransform().getMatrix())
        self.assertEqual(sorted(p.getObjId() for p in out), sorted(rows))

    def test_output_flex_info_is_not_the_inputs(self):
        """A SetOfParticlesFlex input (a training seeded from another) must not pass its FlexInfo on."""
        parts = self.makeFlexSet({3: [0.1, 0.2], 7: [0.3, 0.4]})
        old = FlexInfo("OLD")
        old.setAttr("trainingSamplingRate", 8.0)
        parts.setFlexInfo(old)
        parts.write()
        with open(self.path("z.csv"), "w") as fh:
            fh.write("rlnImageId,z0\n3,0.5\n7,-0.5\n")
        new = FlexInfo("NEW")
        new.setAttr("trainingSamplingRate", 6.0)
        out = SetOfParticlesFlex(filename=self.path("o.sqlite"), progName="NEW")
        convert.readSetOfParticlesFlex(parts, self.path("z.csv"), out, "NEW", flexInfo=new)
        self.assertEqual(out.getFlexInfo().getProgName(), "NEW")
        self.assertEqual(out.getFlexInfo().getAttr("trainingSamplingRate"), 6.0)
        self.assertEqual({p.getObjId(): list(p.getZFlex()) for p in out}, {3: [0.5], 7: [-0.5]})

    def test_old_flex_train_latents_and_unknown_ids(self):
        parts, _ = self.makeSet(spiderStack=False)
        with open(self.path("old.csv"), "w") as fh:  # flex-train's layout before engine/latents.py
            fh.write("rlnImageId,rlnFlexLatent1\n")
            fh.writelines(f"{pid},{pid / 100}\n" for pid in self.IDS)
        out = SetOfParticlesFlex(filename=self.path("old.sqlite"), progName="TEST")
        self.assertEqual(convert.readSetOfParticlesFlex(parts, self.path("old.csv"), out, "TEST"), (len(self.IDS), 0))
        self.assertEqual({p.getObjId(): list(p.getZFlex()) for p in out}, {pid: [pid / 100] for pid in self.IDS})
        with open(self.path("extra.csv"), "w") as fh:
            fh.write("rlnImageId,z0\n")
            fh.writelines(f"{pid},0.5\n" for pid in self.IDS + [123456])
        out = SetOfParticlesFlex(filename=self.path("extra.sqlite"), progName="TEST")
        with self.assertRaisesRegex(InputError, "1 rows have particle ids that are not in the input"):
            convert.readSetOfParticlesFlex(parts, self.path("extra.csv"), out, "TEST")


if __name__ == "__main__":
    unittest.main()
