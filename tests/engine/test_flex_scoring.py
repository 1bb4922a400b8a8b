"""Benchmark scores on synthetic arrays whose answer is known: latent read-out and per-state map agreement."""
import numpy as np
import pytest

from flexplugin.engine.errors import InputError
from flexplugin.engine.flex.scoring import (
    masked_corr,
    readout_rho,
    spearman,
    state_metrics,
)


def test_spearman_known_values():
    x = np.arange(10.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    assert spearman(x, np.ones(10)) == 0.0  # constant: no information, not NaN


def test_readout_perfect_flipped_and_rotated():
    rng = np.random.default_rng(1)
    t = rng.uniform(-1, 1, 400)
    assert readout_rho(t, t) == pytest.approx(1.0)
    assert readout_rho(-3 * t + 5, t) == pytest.approx(1.0)  # sign and scale of the latent do not matter
    # the motion spread over two latent axes (a rotated basis) plus an unrelated third axis: still 1
    z = np.c_[np.cos(0.7) * t, np.sin(0.7) * t, rng.normal(size=400)]
    assert readout_rho(z, t) == pytest.approx(1.0, abs=1e-9)
    # a monotone but non-linear latent keeps a high rank correlation
    assert readout_rho(np.tanh(3 * t), t) > 0.95


def test_readout_random_and_noisy():
    rng = np.random.default_rng(2)
    t = rng.uniform(-1, 1, 2000)
    assert readout_rho(rng.normal(size=(2000, 4)), t) < 0.08  # held-out halves: fitting noise earns nothing
    noisy = readout_rho(t + rng.normal(0, 0.6, 2000), t)
    assert 0.5 < noisy < 0.9
    assert readout_rho(t, t, seed=0) == readout_rho(t, t, seed=0)


def test_readout_bad_inputs():
    with pytest.raises(InputError, match="do not match"):
        readout_rho(np.zeros((10, 2)), np.zeros(9))
    with pytest.raises(InputError, match="too few"):
        readout_rho(np.zeros((6, 2)), np.zeros(6))
    with pytest.raises(InputError, match="NaN"):
        readout_rho(np.full(20, np.nan), np.zeros(20))


def _blob_states(S=7, m=24, travel=8.0):
    """A fixed blob plus a blob sliding along x: true states, their consensus, and a mask on the slider."""
    g = np.arange(m) - m // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    fixed = np.exp(-((x + 5) ** 2 + y ** 2 + z ** 2) / 8.0)
    shifts = np.linspace(-travel / 2, travel / 2, S)
    states = np.stack([fixed + np.exp(-((x - 3 - s) ** 2 + (y - 4) ** 2 + z ** 2) / 6.0) for s in shifts])
    mask = (np.abs(y - 4) < 6).astype(float)
    return states, states.mean(0), mask


def test_state_metrics_perfect_reversed_and_consensus():
    states, cons, mask = _blob_states()
    rng = np.random.default_rng(3)
    perfect = state_metrics(states + 0.01 * rng.normal(size=states.shape), states, cons, mask)
    assert not perfect["reversed"] and perfect["order_rho"] == pytest.approx(1.0)
    assert min(perfect["corr_generated"]) > 0.99 and perfect["min_gain"] > 0
    assert perfect["best_match"] == list(range(len(states)))
    # the end states differ most from the consensus: largest gain there, smallest in the middle
    gain = perfect["gain"]
    assert gain[0] > gain[3] and gain[-1] > gain[3]
    backwards = state_metrics(states[::-1], states, cons, mask)
    assert backwards["reversed"] and backwards["order_rho"] == pytest.approx(1.0)
    assert backwards["gain"] == pytest.approx(perfect["gain"], abs=0.01)
    # a model that learnt nothing generates the consensus every time: no gain, no order
    flat = state_metrics(np.repeat(cons[None], len(states), 0), states, cons, mask)
    assert flat["mean_gain"] == pytest.approx(0.0, abs=1e-9) and flat["order_rho"] == 0.0


def test_state_metrics_shuffled_order_and_shapes():
    states, cons, mask = _blob_states()
    order = [3, 0, 6, 1, 5, 2, 4]
    shuffled = state_metrics(states[order], states, cons, mask)
    assert shuffled["best_match"] == order and shuffled["order_rho"] < 0.5
    assert masked_corr(states[0], states[0] * 2 + 1, mask) == pytest.approx(1.0)
    with pytest.raises(InputError, match="need generated"):
        state_metrics(states[:3], states, cons, mask)
