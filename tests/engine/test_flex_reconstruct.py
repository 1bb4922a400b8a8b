"""Units of the latent-binned 3D Flex reconstruction that need no trained model: the CG solver against a dense
solve, the binned operator against analytic cases (zero flow = the Wiener formula, an integer shift = the
shifted Wiener map), the choice of latent bins against the flow spread it promises, and the flex map against
its Wiener start in FSC with the truth on data whose flow is known exactly.

The data-driven checks (noflex = the library's Wiener map, flex beats noflex where things move, binned →
per-particle as G grows, bad inputs) are in tests/engine/test_flex_generate_reconstruct.py, on its trained model."""
import itertools

import numpy as np
import pytest
import torch

from flexplugin.engine.errors import InputError
from flexplugin.engine.flex.binning import bins_from_labels, choose_bins, significance_shrinkage
from flexplugin.engine.flex.generate import FlexModel
from flexplugin.engine.flex.mesh import build_mesh
from flexplugin.engine.flex.reconstruct import BinnedHalf, Sphere, check_options, flex_reconstruct, pcg
from flexplugin.engine.flex.reconstruct_config import FLOW_NOISE
from flexplugin.engine.fourier import rfft3c
from flexplugin.engine.io import read_particles, read_volume
from flexplugin.engine.reconstruct import shell_fsc
from flexplugin.engine.simulate import SimConfig, simulate_dataset


def test_pcg_solves_a_dense_spd_system_and_says_why_it_stopped():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 30, generator=g)
    H = A.T @ A + 0.1 * torch.eye(30)
    b = torch.randn(30, generator=g)
    d = torch.diagonal(H)
    x, hist, why = pcg(lambda p: H @ p, b, torch.zeros(30), lambda r: r / d, 200, 1e-6)
    np.testing.assert_allclose(x.numpy(), torch.linalg.solve(H, b).numpy(), rtol=1e-3, atol=1e-4)
    assert "converged" in why
    assert all(b2 <= b1 + 1e-6 for b1, b2 in itertools.pairwise(hist))  # CG decreases the quadratic every step
    _, _, why2 = pcg(lambda p: H @ p, b, torch.zeros(30), lambda r: r / d, 2, 1e-12)
    assert why2 == "iteration limit 2"
    # the exact inverse as preconditioner: one step
    _, h1, why1 = pcg(lambda p: H @ p, b, torch.zeros(30), lambda r: torch.linalg.solve(H, r), 5, 1e-5)
    assert "iteration 1" in why1 and len(h1) == 2


def test_sphere_spectrum_is_the_centred_rfft_and_its_adjoint_is_exact():
    sp = Sphere.make(12, "cpu")
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(24, 24, 24, generator=g), torch.randn(24, 24, 24, generator=g)
    ref = rfft3c(x).reshape(-1)[sp.index]  # fourier.rfft3c, rolls and all
    torch.testing.assert_close(sp.spectrum(x), ref, rtol=1e-5, atol=1e-3)
    w = sp.shell.float() + 1.0  # a radial weight keeps the Friedel symmetry of y on the kx = 0 plane
    y = w * sp.spectrum(v)
    lhs = float((sp.mult * (sp.spectrum(x).conj() * y).real).sum())
    assert float((x * sp.adjoint(y)).sum()) == pytest.approx(lhs, rel=1e-4)
    # volume() inverts spectrum() on band-limited maps
    band = sp.volume(sp.spectrum(x))
    torch.testing.assert_close(sp.volume(sp.spectrum(band)), band, rtol=1e-4, atol=1e-4)


def _half(c: int = 16, seed: int = 0, flow_everywhere: bool = False) -> tuple[BinnedHalf, torch.Tensor]:
    """A one-bin problem with synthetic accumulators: K > 0 with the Friedel symmetry of real data, b = K·X(target)."""
    sp = Sphere.make(c, "cpu")
    m = sp.m
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(m, m, m, generator=g)
    k = rfft3c(noise).abs().square().reshape(-1)[sp.index]
    den = 1.0 + 0.5 * k / k.max()
    zz, yy, xx = torch.meshgrid(*[torch.arange(m, dtype=torch.float32) - m // 2] * 3, indexing="ij")
    target = torch.exp(-((xx - 1) ** 2 + (yy + 2) ** 2 + zz ** 2) / 8.0) + 0.5 * torch.exp(-((xx + 3) ** 2 + yy ** 2 + (zz - 2) ** 2) / 4.0)
    half = BinnedHalf(sp, 1, torch.device("cpu"))
    half.den[0] = den
    half.num[0] = den * sp.spectrum(target)
    half.counts[0] = 1
    half.reg = torch.full_like(den, 0.05)
    return half, target


def _set_flow(half: BinnedHalf, shift_xyz: tuple[float, float, float]) -> None:
    """One flow for the whole padded box: a constant shift (voxels, xyz)."""
    m = half.sp.m
    zz, yy, xx = torch.meshgrid(*[torch.arange(m, dtype=torch.float32) - m // 2] * 3, indexing="ij")
    pos = torch.stack([xx, yy, zz], -1).view(-1, 3)
    half.vox = torch.arange(m ** 3)
    half.grid = ((pos + torch.tensor(shift_xyz) + m // 2) * (2.0 / (m - 1)) - 1.0)[None]


def test_zero_flow_gives_the_wiener_formula():
    half, _ = _half()
    _set_flow(half, (0.0, 0.0, 0.0))  # through the warp path, with u = 0
    wiener = half.wiener(half.reg)
    x, _, why = pcg(half.hess, half.rhs(wiener), torch.zeros_like(wiener), half.precondition, 10, 1e-4)
    assert "iteration 1 " in why  # the preconditioner is the exact inverse when D = I
    np.testing.assert_allclose(x.numpy(), wiener.numpy(), atol=1e-4 * float(wiener.abs().max()))


def test_integer_shift_flow_gives_the_shifted_wiener_map():
    """W(x) = V(x + t) with t integer: the minimiser is the Wiener map moved by +t (away from the box edge)."""
    half, _ = _half()
    wiener = half.wiener(half.reg)
    t = (2, -1, 3)  # x, y, z voxels
    _set_flow(half, tuple(float(v) for v in t))
    x, _, _ = pcg(half.hess, half.rhs(wiener), torch.zeros_like(wiener), half.precondition, 30, 1e-6)
    expect = torch.roll(wiener, shifts=(t[2], t[1], t[0]), dims=(0, 1, 2))
    c = half.sp.m // 2
    inner = (slice(c - 8, c + 8),) * 3  # the object; the edges of the padded box lose what the shift pushes out
    err = (x - expect)[inner].abs().max() / expect[inner].abs().max()
    assert err < 0.02, float(err)
    assert (x - wiener)[inner].abs().max() / wiener[inner].abs().max() > 0.3  # the shift did move it


def test_hessian_is_symmetric_with_a_smooth_flow():
    half, _ = _half(seed=1)
    m = half.sp.m
    zz, yy, xx = torch.meshgrid(*[torch.arange(m, dtype=torch.float32) - m // 2] * 3, indexing="ij")
    pos = torch.stack([xx, yy, zz], -1).view(-1, 3)
    u = 0.7 * torch.stack([torch.sin(pos[:, 1] / 5), torch.cos(pos[:, 2] / 4), 0.3 * pos[:, 0] / m], -1)
    half.vox = torch.arange(m ** 3)
    half.grid = ((pos + u + m // 2) * (2.0 / (m - 1)) - 1.0)[None]
    g = torch.Generator().manual_seed(3)
    p, q = torch.randn(m, m, m, generator=g), torch.randn(m, m, m, generator=g)
    a, b = float((half.hess(p) * q).sum()), float((p * half.hess(q)).sum())
    assert abs(a - b) < 1e-4 * abs(a), (a, b)
    assert float((half.hess(p) * p).sum()) > 0


def test_binned_operator_is_each_bins_warp_fft_pair_and_adjoint_warp():
    """hess and rhs (one inverse FFT for all bins, per bin the inverse only on the support's bounding box) against
    the operator written out per bin: warp, Sphere.spectrum, K_g, Sphere.adjoint, the warp's adjoint by autograd."""
    half, _ = _half(seed=2)
    sp, m = half.sp, half.sp.m
    G = 3
    gen = torch.Generator().manual_seed(5)
    half.den = half.den.repeat(G, 1) * torch.rand(G, 1, generator=gen)
    half.num = half.num.repeat(G, 1) * torch.rand(G, 1, generator=gen)
    half.counts = np.array([4, 0, 7])  # the empty bin is skipped by both
    zz, yy, xx = torch.meshgrid(*[torch.arange(m, dtype=torch.float32) - m // 2] * 3, indexing="ij")
    pos = torch.stack([xx, yy, zz], -1).view(-1, 3)
    support = ((xx - 2) ** 2 + (yy + 1) ** 2 + zz ** 2 < 30).reshape(-1)  # an off-centre ball: a bounding box inside
    half.vox = torch.nonzero(support).squeeze(1)
    u = torch.randn(G, 1, 3, generator=gen) + 0.5 * torch.sin(pos[half.vox] / 3)[None]
    half.grid = (pos[half.vox][None] + u + m // 2) * (2.0 / (m - 1)) - 1.0
    p = torch.randn(m, m, m, generator=gen)

    def reference(z_of) -> torch.Tensor:
        V = p.clone().requires_grad_(True)
        out = torch.zeros_like(p)
        for g in (0, 2):
            W = half.warp(V, torch.tensor([g]))[0]
            out += torch.autograd.grad(W, V, grad_outputs=sp.adjoint(z_of(g, sp.spectrum(W.detach()))))[0]
        return out

    want = reference(lambda g, X: half.den[g] * X) + sp.adjoint(half.reg * sp.spectrum(p))
    got = half.hess(p)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    want_b, got_b = reference(lambda g, X: half.num[g]), half.rhs(p)
    assert float((got_b - want_b).abs().max()) < 1e-4 * float(want_b.abs().max())


def test_bins_hold_the_flow_spread_they_promise():
    rng = np.random.default_rng(0)
    z = rng.uniform(0, 1, size=(2000, 1))
    # one vertex moves 8 voxels along x over the latent range, another 2 voxels along y (apix 1)
    d = torch.zeros(2000, 3, 3)
    d[:, 0, 0] = torch.as_tensor(8 * z[:, 0], dtype=torch.float32)
    d[:, 2, 1] = torch.as_tensor(2 * z[:, 0], dtype=torch.float32)
    b = choose_bins(z, d, 1.0, tol_vox=0.25, max_bins=64)
    assert b.spread_at() <= 0.25
    # equal bins of a uniform 1-D latent: spread ≤ 8/(2G), reached at the bin edges; 95 % of the particles are
    # within 0.95 of that, so G = 16 is the first power of 2 to hold 0.25 voxels (G = 8 leaves about 0.48)
    assert b.count == 16, b.count
    assert b.spread.max() == pytest.approx(8 / 32, rel=0.2)
    # the bin's displacement is its members' mean
    sel = b.labels == b.labels[0]
    np.testing.assert_allclose(b.displacements[b.labels[0]].numpy(), d[sel].mean(0).numpy(), atol=1e-5)
    capped = choose_bins(z, d, 1.0, tol_vox=0.25, max_bins=8)
    assert capped.count == 8 and capped.spread_at() > 0.25
    # many particles: centres fitted on a subsample, every particle joins its nearest: the same promise holds
    zb = rng.uniform(0, 1, size=(12000, 1))
    db = torch.zeros(12000, 1, 3)
    db[:, 0, 0] = torch.as_tensor(8 * zb[:, 0], dtype=torch.float32)
    big = choose_bins(zb, db, 1.0, tol_vox=0.25, max_bins=64)
    assert big.count == 16 and big.spread_at() <= 0.25 and np.bincount(big.labels).min() > 0
    one = bins_from_labels(d, np.zeros(2000, dtype=np.int64), 1.0)
    assert one.count == 1 and one.spread.max() == pytest.approx(4.0, rel=0.05)  # 8 voxels of motion, mean in the middle


class _CommonPlusOwn(torch.nn.Module):
    """A flow generator whose latent is each particle's own displacement (Å, xyz) at every vertex, plus a deformation
    common to all particles: the frame a trained generator is free to carry (3D Flex fixes it nowhere)."""

    def __init__(self, n_vertices: int, common_A):
        super().__init__()
        self.n = n_vertices
        self.common = torch.nn.Parameter(torch.as_tensor(common_A, dtype=torch.float32), requires_grad=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z + self.common)[:, None, :].expand(-1, self.n, -1)


def test_flex_map_is_no_worse_than_its_wiener_start_in_fsc_with_the_truth(tmp_path):
    """Particles of the example object whose STAR origins are off by a known random 2-D error each (a motion whose
    flow is known exactly: u_i = -R_i^T (delta_i, 0) undoes it), and a model that also carries a common deformation
    of 0.5-0.6 voxel. At the defaults, shell by shell to Nyquist, the flex map's FSC with the truth is at least its
    Wiener start's - 0.01 (measured: >= -0.0005) and up to 0.72 above it where the misalignment blurs the start.
    Before the reconstruction took the particles' mean deformation out, the common deformation shifted the flex map
    off the truth: -0.044, -0.062, -0.075 in shells 3-5 (43-26 A), and gains of at most 0.36."""
    truth, ps, mesh, apix = _static_object(tmp_path)  # the object does not move: every state is the consensus
    delta = np.random.default_rng(0).normal(scale=1.5 * apix, size=(len(ps), 2))
    ps.table["rlnOriginXAngst"] += delta[:, 0]
    ps.table["rlnOriginYAngst"] += delta[:, 1]
    rot = ps.rotations(np.arange(len(ps))).double().numpy()
    own = -np.einsum("nji,nj->ni", rot, np.concatenate([delta, np.zeros((len(ps), 1))], 1)).astype(np.float32)
    gen = _CommonPlusOwn(len(mesh.points), [0.6 * apix, -0.5 * apix, 0.5 * apix])
    model = FlexModel(gen, mesh, torch.as_tensor(truth), apix, 32, 32, 32, apix, own, ps.ids, {}, torch.device("cpu"))
    r = flex_reconstruct(model, ps, do_noflex=False, progress=lambda s: None)
    t = torch.as_tensor(truth)
    flex = shell_fsc(torch.as_tensor(r.flex_map), t)
    start = shell_fsc(torch.as_tensor(0.5 * (r.start_half1 + r.start_half2)), t)
    assert (flex >= start - 0.01).all(), np.round(flex - start, 3)
    assert (flex - start).max() > 0.3, np.round(flex - start, 3)  # the flow undid the misalignment
    assert r.frame_shift_vox == pytest.approx(float(np.linalg.norm([0.6, 0.5, 0.5])), abs=0.1)


def test_significance_shrinkage_is_the_least_squares_factor_of_each_vertex():
    """Vertex v moves by ±a_v (random signs, so its rms over the particles is exactly a_v): the factor is
    1 − (τ/a_v)², the scale f that minimises the misalignment (1 − f)²(a² − τ²) + f²τ² of a displacement of rms a
    carrying noise of rms τ; 0 where a_v ≤ τ; all ones with τ = 0. Units: voxels of the box (apix 2 Å)."""
    rng = np.random.default_rng(0)
    a = np.array([0.0, 0.1, 0.25, 0.3, 0.5, 1.0, 4.0])  # voxels
    sign = rng.choice([-1.0, 1.0], size=(1000, len(a)))
    d = torch.zeros(1000, len(a), 3)
    d[:, :, 1] = torch.as_tensor(sign * a * 2.0, dtype=torch.float32)  # Å along y
    f = significance_shrinkage(d, 2.0, 0.25).numpy()
    expect = np.clip(1 - (0.25 / np.maximum(a, 1e-12)) ** 2, 0, None)
    np.testing.assert_allclose(f, expect, atol=1e-5)
    assert f[0] == f[1] == f[2] == 0 and f[-1] > 0.99
    a_sig = np.sqrt(a[4:] ** 2 - 0.25 ** 2)  # the least-squares optimum of the model, from its signal rms
    np.testing.assert_allclose(f[4:], a_sig ** 2 / (a_sig ** 2 + 0.25 ** 2), rtol=1e-5)
    assert (significance_shrinkage(d, 2.0, 0.0).numpy() == 1).all()


class _LinearFlow(torch.nn.Module):
    """A flow generator linear in the latent: displacements (N, V, 3) Å = z (N, K) @ w (K, 3V)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w, requires_grad=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.w).view(len(z), -1, 3)


def test_flow_noise_where_nothing_moves_is_held_still(tmp_path):
    """Particles of an object that does not move, and a model whose flows are noise of 0.12 voxel rms at every vertex
    (what trained generators carry where nothing moves: 0.09-0.17 voxel of the training box in the median over the
    benchmark models' static vertices, docs/algorithms.md 2.4; here the training box is the crop box). As trained
    (flow noise 0) the warps misalign and blur: the flex map's FSC with the truth falls below its Wiener start's by
    more than 0.01 (measured: -0.018 at shell 14 of 16). At the default flow noise (0.125 voxel of the training box)
    the insignificant vertices are held still and the flex map is no worse than its start at any shell (measured:
    equal)."""
    truth, ps, mesh, apix = _static_object(tmp_path)
    model = _noise_model(truth, ps, mesh, apix, 0.12, train_box=32)
    t = torch.as_tensor(truth)
    diff = {}
    for noise in (0.0, None):
        kw = {} if noise is None else {"flow_noise": noise}
        r = flex_reconstruct(model, ps, do_noflex=False, progress=lambda s: None, **kw)
        start = shell_fsc(torch.as_tensor(0.5 * (r.start_half1 + r.start_half2)), t)
        diff[noise] = shell_fsc(torch.as_tensor(r.flex_map), t) - start
        assert start[-3] > 0.3  # shells where the start resolves the truth are the ones that lose
    assert FLOW_NOISE == 0.125
    assert diff[0.0].min() < -0.01, np.round(diff[0.0], 3)
    assert diff[None].min() >= -0.002, np.round(diff[None], 3)
    assert r.vertices_still > 0.5


def test_flow_noise_is_stated_in_voxels_of_the_training_box(tmp_path):
    """The same flows (Å) from a model trained at half the crop box: the noise 0.12 voxel of the crop box is 0.06
    voxel of the training box, below what the default flow noise (0.125 training voxel) holds still; at the full
    training box it is above it. So the still share is (near) all at train box 16 and falls at train box 32."""
    truth, ps, mesh, apix = _static_object(tmp_path)
    still = {}
    for tb in (16, 32):
        r = flex_reconstruct(_noise_model(truth, ps, mesh, apix, 0.12, train_box=tb), ps, do_noflex=False,
                             iterations=1, progress=lambda s: None)
        still[tb] = r.vertices_still
    assert still[16] > 0.95 and still[32] < still[16] - 0.2, still


def _static_object(tmp_path):
    """400 particles of the example object without motion (box 32, 4 Å/px) and an 8-cell mesh over it."""
    cfg = SimConfig(n=400, box=32, apix=4.0, snr=0.5, seed=4, hinge_deg=0.0, twist_deg=0.0)
    simulate_dataset(cfg, tmp_path, progress=lambda s: None)
    ps = read_particles(tmp_path / "particles.star")
    truth, apix = read_volume(tmp_path / "consensus.mrc")
    return truth, ps, build_mesh(truth, apix, cells=8), apix


def _noise_model(truth, ps, mesh, apix: float, rms_vox: float, train_box: int):
    """A model over `mesh` whose vertex displacements are random, linear in a 4-D latent, of rms `rms_vox` voxels of
    the crop box (box 32), trained (nominally) at `train_box`."""
    k = 4
    w = torch.randn(k, 3 * len(mesh.points), generator=torch.Generator().manual_seed(1)) * (rms_vox * apix / np.sqrt(3 * k))
    z = np.random.default_rng(2).normal(size=(len(ps), k)).astype(np.float32)
    return FlexModel(_LinearFlow(w), mesh, torch.as_tensor(truth), apix * 32 / train_box, train_box, 32, 32, apix, z,
                     ps.ids, {}, torch.device("cpu"))


@pytest.mark.parametrize("kw, words", [
    ({"iterations": 0}, "--iterations"), ({"batch_size": 0}, "--batch-size"), ({"reg_scale": -1.0}, "--reg"),
    ({"reg_scale": float("nan")}, "--reg"), ({"tol": 0.0}, "--tol"), ({"tol": 1.5}, "--tol"), ({"bins": 0}, "--bins"),
    ({"flow_tol": 0.0}, "--flow-tol"), ({"flow_tol": float("inf")}, "--flow-tol"), ({"max_bins": 0}, "--max-bins"),
    ({"flow_noise": -0.1}, "--flow-noise"), ({"flow_noise": float("nan")}, "--flow-noise")])
def test_bad_options_are_named(kw, words):
    with pytest.raises(InputError, match=words):
        check_options(**kw)
