"""Checks the Scipion tests share on our output particle sets: a SetOfParticlesFlex that keeps its input's
particles (ids, poses, CTF, image locations) and geometry."""
from __future__ import annotations

import unittest

import numpy as np


def check_flex_set(test: unittest.TestCase, parts, n: int, box: int, apix: float) -> None:
    """`parts` is a SetOfParticlesFlex of n aligned particles with CTF, box × box at apix Å/px."""
    from pwem.constants import ALIGN_PROJ
    from pwem.objects import SetOfParticlesFlex
    test.assertIsInstance(parts, SetOfParticlesFlex)
    test.assertEqual(parts.getSize(), n)
    test.assertEqual(parts.getAlignment(), ALIGN_PROJ)
    test.assertTrue(parts.hasCTF())
    test.assertAlmostEqual(parts.getSamplingRate(), apix)
    test.assertEqual(parts.getDim(), (box, box, 1))


def check_same_particle(test: unittest.TestCase, p, q) -> None:
    """Output particle p carries input particle q's pose, CTF and image location."""
    np.testing.assert_allclose(p.getTransform().getMatrix(), q.getTransform().getMatrix(), atol=1e-9)
    test.assertAlmostEqual(p.getCTF().getDefocusU(), q.getCTF().getDefocusU())
    test.assertAlmostEqual(p.getCTF().getDefocusAngle(), q.getCTF().getDefocusAngle())
    test.assertEqual(p.getLocation(), q.getLocation())
