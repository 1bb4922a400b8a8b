"""engine/resolution.py against independent references: FSC identities, noise statistics, the analytic FSC of a
known signal-to-noise ratio, phase randomisation, the mask artefact it removes, and local resolution against a known
Gaussian B-factor. Boxes ≤ 48, a few seconds in all."""
from __future__ import annotations

import json
import os
import tempfile
import unittest

import mrcfile
import numpy as np
import torch

from flexplugin.engine import resolution as R
from flexplugin.engine.errors import InputError
from flexplugin.engine.fourier import fsc_resolution

N = 48


def _shell_stats(n: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy-only reference: the shell of each rfftn voxel (round |k|·n) and the number of full-spectrum voxels
    per shell (Friedel mates counted), built without the module under test."""
    f = np.fft.fftfreq(n) * n
    fx = np.fft.rfftfreq(n) * n
    idx = np.rint(np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)).astype(int)
    w = np.full(n // 2 + 1, 2.0)
    w[0] = w[-1] = 1.0
    W = np.broadcast_to(w, idx.shape)
    sel = idx <= n // 2
    return idx, np.bincount(idx[sel], W[sel], n // 2 + 1)


def _shell_power(vol: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Σ|F|² per shell over the full spectrum (numpy reference)."""
    n = vol.shape[0]
    w = np.full(n // 2 + 1, 2.0)
    w[0] = w[-1] = 1.0
    p = np.abs(np.fft.rfftn(vol)) ** 2 * w
    sel = idx <= n // 2
    return np.bincount(idx[sel], p[sel], n // 2 + 1)


def _sphere(n: int, radius: float, edge: float) -> np.ndarray:
    """numpy reference soft sphere (raised cosine edge) centred at n//2."""
    g = np.arange(n) - n // 2
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    if edge == 0:
        return (r <= radius).astype(np.float64)
    t = np.clip((r - radius) / edge, 0, 1)
    return 0.5 * (1 + np.cos(np.pi * t))


def _effective_fraction(mask: np.ndarray) -> float:
    """Fraction of the box that counts as independent after masking, (Σm²)²/(n³ Σm⁴): a masked FSC of noise has
    standard deviation ≈ 1/sqrt(n_shell · fraction)."""
    return float((mask ** 2).sum() ** 2 / (mask.size * (mask ** 4).sum()))


class TestFSC(unittest.TestCase):
    def setUp(self):
        self.rng = np.random.default_rng(7)
        self.idx, self.count = _shell_stats(N)

    def test_fsc_of_a_map_with_itself_is_one(self):
        a = self.rng.standard_normal((N, N, N))
        np.testing.assert_allclose(R.fsc_curve(a, a), 1.0, atol=1e-12)
        np.testing.assert_allclose(R.fsc_curve(a, 3.0 * a), 1.0, atol=1e-12)
        np.testing.assert_allclose(R.fsc_curve(a, -a)[1:], -1.0, atol=1e-12)

    def test_fsc_of_independent_noise_is_zero_within_three_over_root_n(self):
        a, b = self.rng.standard_normal((2, N, N, N))
        c = R.fsc_curve(a, b)[1:]
        bound = 3.0 / np.sqrt(self.count[1:])
        self.assertTrue(np.all(np.abs(c) < bound), f"{np.round(c / bound, 2)}")
        # and the spread is that of a correlation of n_shell independent pairs (not much smaller: not a dead curve)
        z = c * np.sqrt(self.count[1:])
        self.assertGreater(z.std(), 0.5)
        self.assertLess(z.std(), 1.6)

    def test_resolution_matches_the_projects_fsc_resolution(self):
        curves = [np.r_[1.0, np.linspace(0.99, -0.05, N // 2)], np.r_[1.0, np.full(N // 2, 0.9)],
                  np.r_[1.0, 0.1, np.full(N // 2 - 1, 0.5)], np.r_[1.0, 0.9, 0.2, 0.1, np.full(N // 2 - 3, 0.3)]]
        for c in curves:
            want = fsc_resolution(c, 1.7)
            want = N * 1.7 if np.isinf(want) else want
            self.assertAlmostEqual(R.resolution_at(c, N, 1.7), want, places=9)
        np.testing.assert_allclose(R.resolutions_at(np.stack(curves), N, 1.7),
                                   [R.resolution_at(c, N, 1.7) for c in curves])


class TestPhaseRandomisation(unittest.TestCase):
    def test_amplitudes_kept_phases_random_beyond_the_cutoff(self):
        rng = np.random.default_rng(1)
        a = rng.standard_normal((N, N, N))
        cut = 6
        r = R.randomize_phases(a, cut, torch.Generator().manual_seed(3)).numpy()
        self.assertEqual(r.dtype, np.float64)
        np.testing.assert_allclose(np.abs(np.fft.rfftn(r)), np.abs(np.fft.rfftn(a)), rtol=1e-9, atol=1e-9)
        idx, count = _shell_stats(N)
        low = idx <= cut
        np.testing.assert_allclose(np.fft.rfftn(r)[low], np.fft.rfftn(a)[low], atol=1e-9)
        c = R.fsc_curve(a, r)
        np.testing.assert_allclose(c[: cut + 1], 1.0, atol=1e-9)
        # FSC(a, r) = Σ|A|² cos Δφ / Σ|A|² over count/2 independent Friedel pairs with exponentially distributed |A|²:
        # its standard deviation is sqrt(2/count), twice the variance of two independent noise maps' FSC
        beyond = c[cut + 1:]
        self.assertTrue(np.all(np.abs(beyond) < 3.0 * np.sqrt(2.0 / count[cut + 1:])), np.round(beyond, 3))

    def test_randomised_masked_fsc_of_signal_is_zero_beyond_the_cutoff(self):
        """Two half maps sharing all their signal: after randomising beyond the shell where the unmasked FSC
        falls below 0.8 and a soft mask, FSC_rand ≈ 0 from a few shells beyond it."""
        rng = np.random.default_rng(2)
        idx, count = _shell_stats(N)
        s = np.fft.irfftn(np.fft.rfftn(rng.standard_normal((N, N, N))) * np.exp(-(np.minimum(idx, N) / 8.0) ** 2),
                          s=(N, N, N)) * 20
        h1, h2 = s + rng.standard_normal((N, N, N)), s + rng.standard_normal((N, N, N))
        m = _sphere(N, 16, 6)
        f = R.masked_fsc(h1, h2, m, 1.0)
        want_shell = int(np.nonzero(f.unmasked[1:] < 0.8)[0][0]) + 1
        self.assertEqual(f.randomize_shell, want_shell)
        self.assertAlmostEqual(f.randomize_A, N / want_shell)
        sd = 1.0 / np.sqrt(count * _effective_fraction(m))
        far = slice(want_shell + 4, None)
        self.assertTrue(np.all(np.abs(f.randomized[far]) < 4 * sd[far]), np.round(f.randomized[far] / sd[far], 2))


class TestMaskedFSC(unittest.TestCase):
    def test_recovers_the_analytic_fsc_of_signal_and_noise(self):
        """Half maps = s + independent white noise (σ = 1), s confined in a soft mask: per shell the masked FSC must
        be S/(S+N) with S = Σ|FT(m·s)|² and N = σ²·Σm²·n_shell (the expected power of masked white noise)."""
        rng = np.random.default_rng(3)
        idx, count = _shell_stats(N)
        m = _sphere(N, 14, 5)
        amp = 8.0 * np.exp(-(np.minimum(idx, N) / 9.0) ** 2)
        s = np.fft.irfftn(np.fft.rfftn(rng.standard_normal((N, N, N))) * amp, s=(N, N, N)) * m
        S = _shell_power(m * s, idx)
        analytic = S / (S + (m ** 2).sum() * count)
        reps = 8
        got = []
        for seed in range(reps):
            h1, h2 = s + rng.standard_normal((N, N, N)), s + rng.standard_normal((N, N, N))
            f = R.masked_fsc(h1, h2, m, 1.0, seed=seed)
            got.append(f.corrected)
        got = np.mean(got, 0)
        self.assertGreater(f.randomize_shell, 3)  # the correction is active over most shells
        sd = 1.0 / np.sqrt(count * _effective_fraction(m) * reps)
        err = (got - analytic)[1:] / sd[1:]
        self.assertTrue(np.all(np.abs(err) < 3 * np.sqrt(2)), np.round(err, 2))
        # the curve spans the threshold, so this checks a real fall-off, not a flat line
        self.assertGreater(analytic[1], 0.8)
        self.assertLess(analytic[-4], 0.05)

    def test_phase_randomisation_removes_the_mask_artefact(self):
        """A signal with no power beyond shell 6 and a hard mask: the masked FSC stays high beyond it (the mask
        spreads the signal), the corrected FSC is ≈ 0 there, as the signal's own FSC (0) requires."""
        rng = np.random.default_rng(4)
        idx, count = _shell_stats(N)
        F = np.fft.rfftn(rng.standard_normal((N, N, N)))
        F[idx > 6] = 0
        s = np.fft.irfftn(F, s=(N, N, N))
        s *= 3.0 / s.std()
        m = _sphere(N, 12, 0)
        reps, masked, corrected = 4, [], []
        for seed in range(reps):
            h1, h2 = s + rng.standard_normal((N, N, N)), s + rng.standard_normal((N, N, N))
            f = R.masked_fsc(h1, h2, m, 1.0, seed=seed)
            masked.append(f.masked)
            corrected.append(f.corrected)
        self.assertEqual(f.randomize_shell, 7)  # the unmasked FSC falls at the signal's edge
        beyond = slice(f.randomize_shell + 2, None)
        sd = 1.0 / np.sqrt(count * _effective_fraction(m) * reps)
        masked, corrected = np.mean(masked, 0)[beyond], np.mean(corrected, 0)[beyond]
        self.assertTrue(np.all(masked > 0.15), np.round(masked, 2))  # the artefact is there
        self.assertTrue(np.all(np.abs(corrected) < 3 * np.sqrt(2) * sd[beyond]), np.round(corrected, 3))
        self.assertLess(f.resolution_masked_A, 2.5)  # the masked FSC claims ~Nyquist
        self.assertGreater(f.resolution_corrected_A, N / 10)  # the corrected one does not
        self.assertTrue(any("phase-randomised FSC" in w for w in f.warnings))  # RELION's warning about the mask

    def test_no_mask_gives_the_unmasked_fsc_and_bad_shapes_are_input_errors(self):
        rng = np.random.default_rng(5)
        a, b = rng.standard_normal((2, 16, 16, 16))
        f = R.masked_fsc(a, b, None, 2.0)
        self.assertIsNone(f.corrected)
        self.assertEqual(f.resolution_A, f.resolution_unmasked_A)
        with self.assertRaisesRegex(InputError, "mask"):
            R.masked_fsc(a, b, np.ones((8, 8, 8)), 2.0)
        with self.assertRaisesRegex(InputError, "cubic"):
            R.masked_fsc(a, b[:8], None, 2.0)


class TestLocalResolution(unittest.TestCase):
    def test_sharp_half_beats_the_blurred_half_at_the_predicted_resolution(self):
        """White signal (SNR 2 per voxel) sharp for x < n/2 and blurred by B = 400 Å² for x ≥ n/2, independent
        white noise per half map. Sharp side: FSC = 2/3 at every shell, so Nyquist. Blurred side: SNR(k) =
        2·exp(−B k²/2), so FSC = 0.143 at k* = sqrt(2 ln(2/(0.143/0.857))/B)."""
        rng = np.random.default_rng(6)
        apix, B, snr = 2.0, 400.0, 2.0
        f = np.fft.fftfreq(N) / apix
        fx = np.fft.rfftfreq(N) / apix
        k2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2
        sig = rng.standard_normal((N, N, N)) * np.sqrt(snr)
        blurred = np.fft.irfftn(np.fft.rfftn(sig) * np.exp(-B * k2 / 4), s=(N, N, N))
        x = np.arange(N)[None, None, :]
        s = np.where(x < N // 2, sig, blurred)
        h1, h2 = s + rng.standard_normal((N, N, N)), s + rng.standard_normal((N, N, N))
        loc, info = R.local_resolution(h1, h2, apix, step_px=4)
        w = info["window_px"]
        self.assertEqual(loc.shape, (N, N, N))
        inner = (slice(w // 2, N - w // 2),) * 2
        sharp = np.median(loc[inner + (slice(w // 2, N // 2 - w // 2),)])
        blur = np.median(loc[inner + (slice(N // 2 + w // 2, N - w // 2),)])
        self.assertAlmostEqual(sharp, 2 * apix, delta=0.02)  # Nyquist
        k_star = np.sqrt(2 * np.log(snr / (0.143 / (1 - 0.143))) / B)
        self.assertLess(abs(1 / blur - k_star), 1 / (w * apix), f"blurred side {blur:.2f} Å, predicted "
                                                                 f"{1 / k_star:.2f} Å")
        # resolution worsens monotonically (within noise) across the boundary along x
        profile = np.median(loc[inner], axis=(0, 1))[w // 2: N - w // 2]
        self.assertGreater(profile[-1] - profile[0], 3.0)

    def test_map_is_the_window_weighted_harmonic_mean_of_direct_window_fscs(self):
        """Each voxel against a direct computation: loop over the windows covering it, FSC of the windowed cubes,
        resolution at 0.143, weighted mean of 1/resolution with the window's value at that voxel."""
        rng = np.random.default_rng(11)
        n, w, step, apix = 32, 16, 4, 1.5
        s = rng.standard_normal((n, n, n))
        h1, h2 = s + 1.5 * rng.standard_normal((n, n, n)), s + 1.5 * rng.standard_normal((n, n, n))
        loc, info = R.local_resolution(h1, h2, apix, window_px=w, step_px=step)
        self.assertEqual((info["window_px"], info["step_px"]), (w, step))
        g = np.arange(w) - (w - 1) / 2
        r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
        win = 0.5 * (1 + np.cos(np.pi * np.clip((r - (w / 2 - w / 8)) / (w / 8), 0, 1)))
        corners = range((n // 2 - w // 2) % step, n - w + 1, step)
        for v in ((16, 16, 16), (5, 9, 20), (12, 27, 3), (3, 3, 3)):
            num = den = 0.0
            for cz in corners:
                for cy in corners:
                    for cx in corners:
                        t = (v[0] - cz, v[1] - cy, v[2] - cx)
                        if all(0 <= q < w for q in t):
                            cut = np.s_[cz:cz + w, cy:cy + w, cx:cx + w]
                            res = fsc_resolution(R.fsc_curve(h1[cut] * win, h2[cut] * win), apix)
                            res = min(max(res, 2 * apix), w * apix)
                            num, den = num + win[t] / res, den + win[t]
            self.assertAlmostEqual(float(loc[v]), den / num, places=4, msg=str(v))

    def test_mask_limits_the_windows_and_zeroes_outside(self):
        rng = np.random.default_rng(8)
        n = 32
        a, b = rng.standard_normal((2, n, n, n))
        m = _sphere(n, 6, 2)
        loc, info = R.local_resolution(a + 2 * b, a + 2 * rng.standard_normal((n, n, n)), 1.0, mask=m, step_px=2)
        self.assertTrue(np.all(loc[m <= 0.5] == 0))
        self.assertTrue(np.all(loc[m > 0.5] >= 2.0 - 1e-6))
        self.assertTrue(np.all(loc[m > 0.5] <= info["window_px"] + 1e-6))
        self.assertLess(info["windows"], (n // 2) ** 3 / 8)


class TestOutputs(unittest.TestCase):
    def test_write_resolution_outputs_gain_positive_where_flex_is_sharper(self):
        """flex half maps sharp everywhere, noflex blurred for x ≥ n/2: the gain (noflex − flex) is ≈ 0 on the
        sharp side and positive on the blurred side; files are written and readable."""
        rng = np.random.default_rng(9)
        n, apix = 40, 2.0
        f = np.fft.fftfreq(n) / apix
        fx = np.fft.rfftfreq(n) / apix
        k2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2
        m = _sphere(n, 15, 3)
        sig = rng.standard_normal((n, n, n)) * 1.5 * m
        blurred = np.fft.irfftn(np.fft.rfftn(sig) * np.exp(-400 * k2 / 4), s=(n, n, n))
        x = np.arange(n)[None, None, :]
        nf = np.where(x < n // 2, sig, blurred)
        halves = {"flex": (sig + rng.standard_normal(sig.shape), sig + rng.standard_normal(sig.shape)),
                  "noflex": (nf + rng.standard_normal(sig.shape), nf + rng.standard_normal(sig.shape))}
        calls = []

        def fake_plot(*args, path, **kwargs):  # records the call and writes a file, as a plot function does
            calls.append((args, kwargs))
            with open(path, "wb") as fh:
                fh.write(b"png")
            return str(path)

        with tempfile.TemporaryDirectory() as out:
            info = R.write_resolution_outputs(out, halves, m, apix, plot_gain=fake_plot, plot_fsc=fake_plot,
                                              step_px=4)
            for name in ("resolution.json", "fsc_masked_flex.star", "fsc_masked_noflex.star", "locres_flex.mrc",
                         "locres_noflex.mrc", "locres_gain.mrc", "locres_gain.png", "fsc_masked.png"):
                self.assertTrue(os.path.exists(os.path.join(out, name)), name)
            with open(os.path.join(out, "resolution.json")) as fh:
                self.assertEqual(json.load(fh)["gain"]["median_A"], info["gain"]["median_A"])
            with mrcfile.open(os.path.join(out, "locres_gain.mrc")) as mf:
                gain = mf.data.copy()
                self.assertAlmostEqual(float(mf.voxel_size.x), apix, places=4)
            import starfile
            star = starfile.read(os.path.join(out, "fsc_masked_flex.star"))
            np.testing.assert_allclose(star["rlnFourierShellCorrelationCorrected"], info["fsc"]["flex"]["corrected"],
                                       atol=1e-6)
            self.assertEqual(list(star["rlnSpectralIndex"]), list(range(n // 2 + 1)))
        inside = m > 0.5
        left = inside & (x < n // 2 - 6)
        right = inside & (x >= n // 2 + 6)
        self.assertLess(abs(np.median(gain[left])), 0.5)
        self.assertGreater(np.median(gain[right]), 2.0)
        self.assertTrue(np.all(gain[~inside] == 0))
        self.assertGreater(info["gain"]["median_A"], 0)
        self.assertEqual(len(calls), 2)
        self.assertEqual(calls[0][0][0].shape, (n, n, n))  # gain, baseline, improved, region
        self.assertEqual(calls[0][1]["labels"], ("noflex", "flex"))
        self.assertLess(info["locres"]["flex"]["median_in_region_A"], info["locres"]["noflex"]["median_in_region_A"])

    def test_one_map_without_mask_has_no_gain(self):
        """A single pair (e.g. `flexplugin reconstruct`, or flex-reconstruct --no-noflex): FSC and local resolution
        only, measured in the automatic mask; no gain file, no gain entry."""
        rng = np.random.default_rng(12)
        n = 32
        s = 4 * _sphere(n, 7, 2) + rng.standard_normal((n, n, n)) * _sphere(n, 7, 2)
        with tempfile.TemporaryDirectory() as out:
            info = R.write_resolution_outputs(out, {"map": (s + rng.standard_normal(s.shape),
                                                            s + rng.standard_normal(s.shape))}, None, 2.0)
            self.assertEqual(sorted(os.listdir(out)), ["fsc_masked_map.star", "locres_map.mrc", "resolution.json"])
        self.assertNotIn("gain", info)
        self.assertFalse(info["masked"])
        self.assertIsNone(info["fsc"]["map"]["corrected"])
        self.assertGreater(info["region_voxels"], 0)
        self.assertLess(info["region_voxels"], n ** 3 / 2)

    def test_bad_inputs_are_input_errors(self):
        a = np.zeros((16, 16, 16), np.float32)
        with tempfile.TemporaryDirectory() as out:
            with self.assertRaisesRegex(InputError, "noflex half maps"):
                R.write_resolution_outputs(out, {"noflex": (a, a[:8])}, None, 1.0)
            bad = a.copy()
            bad[0, 0, 0] = np.nan
            with self.assertRaisesRegex(InputError, "NaN"):
                R.write_resolution_outputs(out, {"flex": (a, bad)}, None, 1.0)
            with self.assertRaisesRegex(InputError, "mask"):
                R.write_resolution_outputs(out, {"flex": (a, a)}, np.ones((8, 8, 8)), 1.0)
            self.assertFalse(os.path.exists(os.path.join(out, "resolution.json")))


class TestMasks(unittest.TestCase):
    def test_soft_edge_and_sphere_agree_with_the_reference_cosine(self):
        n = 32
        hard = _sphere(n, 8, 0) > 0.5
        soft = R.soft_edge(hard, 4)
        self.assertTrue(np.all(soft[hard] == 1))
        self.assertTrue(np.all((soft >= 0) & (soft <= 1)))
        from scipy import ndimage
        d = ndimage.distance_transform_edt(~hard)
        np.testing.assert_allclose(soft[(d > 0) & (d < 4)], 0.5 * (1 + np.cos(np.pi * d[(d > 0) & (d < 4)] / 4)),
                                   rtol=1e-6)
        self.assertTrue(np.all(soft[d >= 4] == 0))
        np.testing.assert_allclose(R.spherical_mask(n, 8, 3).numpy(), _sphere(n, 8, 3), atol=1e-6)

    def test_auto_mask_covers_a_blob_not_the_solvent(self):
        """A blob in noise: the mask holds the blob and leaves the box's corners (pure noise) out."""
        rng = np.random.default_rng(10)
        n = 48
        blob = 5 * _sphere(n, 6, 2)
        vol = blob + rng.standard_normal((n, n, n))
        m = R.auto_mask([vol], 2.0)
        self.assertTrue(np.all(m[_sphere(n, 6, 0) > 0.5] == 1))
        self.assertEqual(float(m[_sphere(n, 0.45 * n, 0) < 0.5].max()), 0.0)
        self.assertLess(float((m > 0.5).mean()), 0.25)


class TestReconstructCommand(unittest.TestCase):
    def test_reconstruct_writes_the_masked_fsc_and_local_resolution_as_flex_reconstruct(self):
        """`flexplugin reconstruct` with a mask: resolution.json, the RELION FSC table and the local-resolution map,
        measured on its own half maps (its masked curve agrees with reconstruct.json's, computed elsewhere)."""
        import subprocess
        import sys

        from flexplugin.engine.simulate import SimConfig, simulate_dataset
        with tempfile.TemporaryDirectory() as tmp:
            simulate_dataset(SimConfig(n=300, box=32, apix=4.0, snr=0.5, seed=3), tmp + "/d", progress=lambda s: None)
            p = subprocess.run([sys.executable, "-m", "flexplugin.cli", "reconstruct", "--particles",
                                tmp + "/d/particles.star", "--mask", tmp + "/d/mask.mrc", "--out", tmp + "/r"],
                               capture_output=True, text=True)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("corrected by phase randomisation", p.stdout)
            info = json.load(open(tmp + "/r/resolution.json"))
            rec = json.load(open(tmp + "/r/reconstruct.json"))
            f = info["fsc"]["map"]
            self.assertTrue(info["masked"])
            self.assertIsNotNone(f["corrected"])
            self.assertAlmostEqual(f["resolution_masked_A"], rec["resolution_0143_A"], delta=0.05 * rec["resolution_0143_A"])
            for name in ("fsc_masked_map.star", "fsc_masked.png", "locres_map.mrc"):
                self.assertTrue(os.path.exists(os.path.join(tmp, "r", name)), name)
            loc = mrcfile.read(tmp + "/r/locres_map.mrc")
            inside = loc[loc > 0]
            self.assertGreater(len(inside), 100)
            self.assertTrue(np.all((inside >= 2 * 4.0 - 1e-3) & (inside <= 32 * 4.0)))  # Nyquist .. box


if __name__ == "__main__":
    unittest.main()
