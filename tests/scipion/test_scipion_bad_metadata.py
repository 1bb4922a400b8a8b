"""The Scipion side of the bad-metadata catalogue (tests/engine/test_bad_metadata.py): a particle set whose CTF or pose
values the engine would refuse (a NaN, infinite, zero or negative defocus, a zero voltage, a pose matrix with NaN)
fails the protocols' _validate before any run starts, naming the particles; a clean set passes. The shared check
(protocols/protocol_base.py particleValueErrors) is SQL over the set, with no loop over its particles; its
per-particle fallback, for a set without SQL, gives the same errors.
"""
from ..helpers import scipion_project  # noqa: I001  (first: sets up Scipion's environment before pyworkflow is imported)

import os
import unittest

import numpy as np

from flexplugin.protocols import FlexPluginProt3DVA, FlexPluginProtTrain
from flexplugin.protocols.protocol_base import particleValueErrors
from pwem.objects import SetOfParticles

from .test_convert import ParticleSetCase

__all__ = ["TestParticleValueValidation"]


def _defocus(which: str, value: float):
    """Set defocus U or V as stored (setStandardDefocus would swap them to keep U >= V)."""
    def mutate(p):
        getattr(p.getCTF(), f"setDefocus{which}")(value)
    return mutate


def _voltage(value: float):
    def mutate(p):
        p.getAcquisition().setVoltage(value)
    return mutate


def _nanPose(p):
    m = p.getTransform().getMatrix().copy()
    m[0, 1] = np.nan
    p.getTransform().setMatrix(m)


class _NoSQL:
    """A particle set whose storage answers no SQL (aggregates and conditions fail): the check must loop instead."""

    def __init__(self, parts):
        self._parts = parts

    def aggregate(self, *args, **kwargs):
        raise RuntimeError("no SQL here")

    def iterItems(self, *args, **kwargs):
        if kwargs.get("where"):
            raise RuntimeError("no SQL here")
        return self._parts.iterItems(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._parts, name)


class _NoLoop(_NoSQL):
    """A particle set that refuses a loop over all its particles: the SQL path alone must find the bad ones."""

    def aggregate(self, *args, **kwargs):
        return self._parts.aggregate(*args, **kwargs)

    def iterItems(self, *args, **kwargs):
        if not kwargs.get("where"):
            raise AssertionError("looped over every particle")
        return self._parts.iterItems(*args, **kwargs)


class TestParticleValueValidation(ParticleSetCase):
    @classmethod
    def setUpClass(cls):
        cls.cwd = os.getcwd()
        cls.addClassCleanup(os.chdir, cls.cwd)
        cls.project = scipion_project.newProject("bad_metadata")

    def badSet(self, name: str, bad: dict) -> SetOfParticles:
        """The test set (ids ParticleSetCase.IDS) with `bad[id](particle)` applied to the particles listed."""
        good, _ = self.makeSet(name + "_src", spiderStack=False)
        parts = SetOfParticles(filename=self.path(f"{name}.sqlite"))
        parts.copyInfo(good)
        for p in good.iterItems():
            p = p.clone()
            if int(p.getObjId()) in bad:
                bad[int(p.getObjId())](p)
            parts.append(p)
        parts.write()
        return parts

    def assertRefused(self, parts, words: list[str]) -> None:
        """particleValueErrors (SQL and loop alike) and the 3DVA and flex-training forms name the problem."""
        errors = particleValueErrors(_NoLoop(parts))
        self.assertEqual(particleValueErrors(_NoSQL(parts)), errors)
        for cls in (FlexPluginProt3DVA, FlexPluginProtTrain):
            prot = self.project.newProtocol(cls)
            prot.inputParticles.set(parts)
            formErrors = prot.validate()
            for w in words:
                self.assertTrue(any(w in e for e in errors), (w, errors))
                self.assertTrue(any(w in e for e in formErrors), (cls.__name__, w, formErrors))

    def test_clean_set_passes(self):
        parts, _ = self.makeSet("clean", spiderStack=False)
        self.assertEqual(particleValueErrors(_NoLoop(parts)), [])
        self.assertEqual(particleValueErrors(_NoSQL(parts)), [])
        prot = self.project.newProtocol(FlexPluginProt3DVA)
        prot.inputParticles.set(parts)
        self.assertFalse([e for e in prot.validate() if "particle" in e.lower() and "input" in e.lower()])

    def test_nan_defocus(self):
        self.assertRefused(self.badSet("nan", {42: _defocus("U", float("nan"))}),
                           ["The input particle 42 has a defocus U that is missing, NaN", "Re-estimate the CTF"])

    def test_infinite_and_negative_defocus(self):
        parts = self.badSet("neg", {7: _defocus("V", -12000.0), 8: _defocus("V", float("inf")),
                                    9999: _defocus("V", 0.0)})
        self.assertRefused(parts, ["The input 3 particles (ids 7, 8, 9999) have a defocus V"])

    def test_zero_voltage(self):
        self.assertRefused(self.badSet("volt", {15: _voltage(0.0)}),
                           ["The input particle 15 has a voltage that is not a positive number of kV"])

    def test_nan_pose(self):
        self.assertRefused(self.badSet("pose", {100: _nanPose}),
                           ["The input particle 100 has an alignment (pose) with NaN or infinite values"])


if __name__ == "__main__":
    unittest.main()
