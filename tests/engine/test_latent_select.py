"""flexplugin.latent_select: range/point/id parsing, box, sphere and k-means selections, the selection plot."""
import math
import os

import numpy as np
import pytest

from flexplugin import latent_select as ls


def test_parse_box_syntax():
    assert ls.parse_box("1: -1.5 0.5; 2: 0 2", 3) == {0: (-1.5, 0.5), 1: (0.0, 2.0)}
    assert ls.parse_box(" 3 : *, 1e-1 \n 1: -inf 4", 3) == {2: (-math.inf, 0.1), 0: (-math.inf, 4.0)}
    assert ls.parse_box("2: 0.5 *;", 2) == {1: (0.5, math.inf)}


@pytest.mark.parametrize("text, words", [
    ("", "at least one range"),
    ("1 -1 1", "no ':'"),
    ("x: 0 1", "not an integer"),
    ("0: 0 1", "dimension 0 does not exist"),
    ("4: 0 1", "dimensions 1 to 3"),
    ("1: 0 1; 1: 2 3", "given twice"),
    ("1: 0", "exactly two bounds"),
    ("1: 0 1 2", "exactly two bounds"),
    ("1: a 1", "'a' is not a number"),
    ("1: 1 1", "smaller than the maximum"),
    ("1: 2 -1", "smaller than the maximum"),
])
def test_parse_box_errors(text, words):
    with pytest.raises(ValueError, match=words):
        ls.parse_box(text, 3)


def test_parse_point_and_ids():
    np.testing.assert_array_equal(ls.parse_point("0.5, -1", 2), [0.5, -1.0])
    for bad in ("0.5", "1, 2, 3", "a, b", "nan, 1"):
        with pytest.raises(ValueError, match="centre"):
            ls.parse_point(bad, 2)
    assert ls.parse_ids("3, 1", 4) == [0, 2]
    assert ls.parse_ids("2-4 1", 4) == [0, 1, 2, 3]
    for bad, words in (("", "give the clusters"), ("0", "numbered 1 to 4"), ("5", "numbered 1 to 4"),
                       ("x", "not a cluster number"), ("3-2", "does not exist")):
        with pytest.raises(ValueError, match=words):
            ls.parse_ids(bad, 4)


def test_box_mask_against_loop():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(500, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -2.0]
    ranges = ls.parse_box("1: -0.5 1; 3: -2.2 *", 3)
    want = [i for i in range(len(z)) if -0.5 <= z[i, 0] <= 1 and z[i, 2] >= -2.2]
    np.testing.assert_array_equal(np.flatnonzero(ls.box_mask(z, ranges)), want)
    # in standard deviations: the same test on (z - mean) / sd
    mean, sd = z.mean(0), z.std(0)
    want = [i for i in range(len(z)) if abs((z[i, 1] - mean[1]) / sd[1]) <= 1]
    np.testing.assert_array_equal(np.flatnonzero(ls.box_mask(z, {1: (-1.0, 1.0)}, "sd")), want)
    assert abs(ls.box_mask(z, {1: (-1.0, 1.0)}, "sd").mean() - 0.68) < 0.06  # ±1 sd of a Gaussian
    with pytest.raises(ValueError, match="units"):
        ls.box_mask(z, ranges, "px")


def test_sphere_mask():
    z = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [-0.6, 0.8], [3.0, 3.0]])
    np.testing.assert_array_equal(ls.sphere_mask(z, [0, 0], 1.0), [True, True, False, True, False])
    np.testing.assert_array_equal(ls.sphere_mask(z, [1, 1], 0.5), [False, False, True, False, False])


def test_kmeans_recovers_blobs_numbered_along_dimension_1():
    rng = np.random.default_rng(3)
    means = np.array([[4.0, 0.0], [-4.0, 1.0], [0.0, -5.0]])  # numbered by x: blob 1 is cluster 3, ...
    truth = rng.integers(0, 3, 300)
    z = means[truth] + 0.5 * rng.normal(size=(300, 2))
    labels, centres = ls.kmeans(z, 3, seed=7)
    order = np.argsort(means[:, 0])  # expected cluster of each blob: its rank along dimension 1
    expected = np.empty(3, int)
    expected[order] = np.arange(3)
    np.testing.assert_array_equal(labels, expected[truth])
    np.testing.assert_allclose(centres, [z[labels == c].mean(0) for c in range(3)])  # Lloyd fixed point
    assert np.all(np.diff(centres[:, 0]) > 0)
    # deterministic for a seed, and a different seed finds the same clusters here
    for seed in (7, 8):
        l2, c2 = ls.kmeans(z, 3, seed=seed)
        np.testing.assert_array_equal(l2, labels)
        np.testing.assert_allclose(c2, centres)
    np.testing.assert_array_equal(np.flatnonzero(ls.cluster_mask(labels, [0, 2])),
                                  np.flatnonzero(truth != 2))  # clusters 1 and 3: the blobs at x = -4 and 4
    with pytest.raises(ValueError, match="clusters"):
        ls.kmeans(z[:2], 3)


def test_kmeans_is_a_local_optimum_on_continuous_data():
    """On unclustered data every point is nearest its own centre and every centre is its members' mean."""
    z = np.random.default_rng(0).normal(size=(400, 3))
    labels, centres = ls.kmeans(z, 4, seed=0)
    d = ((z[:, None] - centres[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(d.argmin(1), labels)
    np.testing.assert_allclose(centres, [z[labels == c].mean(0) for c in range(4)])
    # sd units: the same partition as k-means on the standardised latents
    zs = z * [1.0, 10.0, 0.1]
    l_sd, c_sd = ls.kmeans(zs, 4, seed=0, units="sd")
    l_std, c_std = ls.kmeans(ls.standardise(zs), 4, seed=0)
    np.testing.assert_array_equal(l_sd, l_std)
    np.testing.assert_allclose(c_sd, c_std)


def test_plot_selection(tmp_path):
    rng = np.random.default_rng(0)
    for k in (1, 2, 3):
        z = rng.normal(size=(200, k))
        keep = z[:, 0] > 0
        path = ls.plot_selection(z, keep, tmp_path / f"sel{k}.png", centres=z[:2] if k > 1 else None)
        assert os.path.getsize(path) > 5000
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
