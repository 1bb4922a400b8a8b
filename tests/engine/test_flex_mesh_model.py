"""3D Flex mesh and model pieces against geometric facts (no training)."""
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from flexplugin.engine.errors import InputError
from flexplugin.engine.flex.mesh import (
    auto_mask,
    build_mesh,
    load_mesh,
    parse_fuse_list,
    rasterize_weights,
    save_mesh,
    write_mesh_pdb,
)
from flexplugin.engine.flex.model import (
    FlowGenerator,
    MeshRaster,
    deformation_gradients,
    project_warped,
    rigidity_penalty,
    warp_volume,
)
from flexplugin.engine.geometry import euler_to_matrix


def _blob_volume(n=32):
    g = np.arange(n) - n // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    v = np.exp(-((x - 4) ** 2 + y ** 2 + z ** 2) / 18.0) + 0.6 * np.exp(-((x + 6) ** 2 + (y - 3) ** 2 + z ** 2) / 8.0)
    return v.astype(np.float32)


@pytest.fixture(scope="module")
def mesh():
    return build_mesh(_blob_volume(), 2.0, cells=8)


def test_mesh_is_conforming_and_fills_kept_cubes(mesh):
    faces = Counter()
    for c in mesh.cells:
        for f in ((0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)):
            faces[tuple(sorted(c[list(f)]))] += 1
    assert max(faces.values()) == 2  # every face is shared by at most two tetrahedra
    Dm = mesh.rest_edges()
    vol = np.linalg.det(Dm) / 6.0
    assert np.all(np.abs(vol) > 0)
    n_cubes = len(np.unique(mesh.cell_cube, axis=0))
    assert len(mesh.cells) == 6 * n_cubes
    cube_A3 = (mesh.cube_size * mesh.psize_A) ** 3
    assert np.abs(vol).sum() == pytest.approx(n_cubes * cube_A3, rel=1e-9)


def test_barycentric_reproduces_positions_on_any_box(mesh):
    for m in (32, 20, 48):
        (vox, cell), verts, bary = rasterize_weights(mesh, m)
        assert np.all(bary >= -1e-12) and np.allclose(bary.sum(1), 1)
        z, y, x = np.unravel_index(vox, (m, m, m))
        pos = (np.stack([x, y, z], 1) - m // 2) * (mesh.N / m)
        assert np.abs((mesh.points[verts] * bary[:, :, None]).sum(1) - pos).max() < 1e-9
    # every masked voxel of the mesh box lies in the mesh
    tmap = mesh.tetraidx_map()
    assert np.all(tmap[mesh.mask] >= 0)


def test_rigidity_weights_follow_density(mesh):
    w = mesh.rweights
    assert w.min() >= 0.5 - 1e-9 and w.max() == pytest.approx(1.0)
    # the cell at the densest point is stiffer than the sparsest cells
    tmap = mesh.tetraidx_map()
    dense = tmap[16, 16, 20]
    assert w[dense] > np.percentile(w, 25)


def test_save_load_and_pdb(mesh, tmp_path):
    save_mesh(mesh, tmp_path / "m.pkl")
    with open(tmp_path / "m.pkl", "rb") as fh:
        d = pickle.load(fh)
    for key in ("mask", "mask_soft", "map_r", "map_r_masked", "N", "psize_A", "tm_points", "tm_cells",
                "tm_tetraidx_map", "tm_rweights", "version"):
        assert key in d, key
    assert d["version"] == 1 and d["tm_tetraidx_map"].shape == (32, 32, 32)
    m2 = load_mesh(tmp_path / "m.pkl")
    np.testing.assert_array_equal(m2.cells, mesh.cells)
    np.testing.assert_allclose(m2.rweights, mesh.rweights)
    write_mesh_pdb(mesh, tmp_path / "m.pdb")
    lines = (tmp_path / "m.pdb").read_text().splitlines()
    assert sum(line.startswith("HETATM") for line in lines) == len(mesh.points)
    assert any(line.startswith("CONECT") for line in lines)
    with pytest.raises(InputError, match="not found"):
        load_mesh(tmp_path / "none.pkl")
    with open(tmp_path / "bad.pkl", "wb") as fh:
        pickle.dump({"x": 1}, fh)
    with pytest.raises(InputError, match="not a 3D Flex mesh"):
        load_mesh(tmp_path / "bad.pkl")


def test_segments_fuse_and_rigid():
    v = _blob_volume()
    seg = np.zeros_like(v)
    seg[:, :, :16] = 1
    seg[:, :, 16:] = 2
    free = build_mesh(v, 2.0, cells=8, segmentation=seg)
    fused = build_mesh(v, 2.0, cells=8, segmentation=seg, fuse_list="1>2", rigid_list="2")
    assert len(free.points) > len(fused.points)  # unfused segments keep their own interface vertices
    shared_free = set(free.cells[free.cell_segment == 1].ravel()) & set(free.cells[free.cell_segment == 2].ravel())
    shared_fused = set(fused.cells[fused.cell_segment == 1].ravel()) & set(fused.cells[fused.cell_segment == 2].ravel())
    assert not shared_free and shared_fused
    assert np.all(fused.rweights[fused.cell_segment == 2] == 20.0)
    with pytest.raises(InputError, match="not a tree"):
        parse_fuse_list("1>2, 2>1", [1, 2])
    with pytest.raises(InputError, match="breadth-first"):
        parse_fuse_list("2>3, 1>2", [1, 2, 3])
    with pytest.raises(InputError, match="not in the segmentation"):
        parse_fuse_list("1>7", [1, 2])


def test_bad_mesh_inputs():
    v = _blob_volume()
    with pytest.raises(InputError, match="--cells"):
        build_mesh(v, 2.0, cells=1)
    with pytest.raises(InputError, match="no voxel"):
        auto_mask(v, 2.0, threshold=1e6)
    with pytest.raises(InputError, match="empty"):
        build_mesh(v, 2.0, mask=np.zeros_like(v))


def test_generator_starts_at_zero_flow_and_rigid_motion_is_free(mesh):
    gen = FlowGenerator(2, len(mesh.points))
    assert torch.count_nonzero(gen(torch.randn(5, 2))) == 0
    cells = torch.as_tensor(mesh.cells)
    rest_inv = torch.linalg.inv(torch.as_tensor(mesh.rest_edges(), dtype=torch.float64))
    w = torch.as_tensor(mesh.rweights)
    pts = torch.as_tensor(mesh.points * mesh.psize_A)
    R = euler_to_matrix(*(torch.tensor(a, dtype=torch.float64) for a in (20.0, 35.0, -10.0)))
    d_rigid = (pts @ R.T - pts + torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64))[None]
    F = deformation_gradients(d_rigid, cells, rest_inv)
    assert torch.allclose(F, R.expand_as(F), atol=1e-9)
    assert float(rigidity_penalty(F, w)) < 1e-18
    d_stretch = (pts * torch.tensor([0.1, 0.0, 0.0], dtype=torch.float64))[None]  # 10 % stretch along x
    F2 = deformation_gradients(d_stretch, cells, rest_inv)
    sv = torch.linalg.svdvals(F2)
    assert torch.allclose(sv.max(-1).values, torch.full_like(sv[..., 0], 1.1))
    expected = ((1.1 ** 2 - 1) ** 2 * w).sum()
    assert float(rigidity_penalty(F2, w)) == pytest.approx(float(expected))


def test_flow_interpolates_displacements(mesh):
    r = MeshRaster(mesh, 32)
    d = torch.zeros(1, len(mesh.points), 3)
    d[0, :, 0] = 4.0  # every vertex moves 4 Å along x
    u = r.flow(d, apix_m=2.0)
    inside = torch.zeros(32 ** 3, dtype=torch.bool)
    inside[r.vox] = True
    ux = u[0, ..., 0].reshape(-1)
    assert torch.allclose(ux[inside], torch.full_like(ux[inside], 2.0))  # 2 voxels
    assert torch.count_nonzero(ux[~inside]) == 0


def test_warp_and_projection_conventions():
    n = 32
    v = torch.as_tensor(_blob_volume(n))
    u = torch.zeros(1, n, n, n, 3)
    u[..., 0] = 3.0  # W(x) = V(x + 3 e_x): content moves by −3 voxels in x
    w = warp_volume(v, u)[0]
    assert torch.allclose(w[:, :, 5:-5], v[:, :, 8:-2], atol=1e-5)
    A = euler_to_matrix(torch.tensor([0.0, 30.0]), torch.tensor([0.0, 60.0]), torch.tensor([0.0, -45.0]))
    from flexplugin.engine.projector import project
    rigid = project_warped(v, A)
    ref = project(v, A, pad=2)
    rel = ((rigid - ref).norm(dim=(-1, -2)) / ref.norm(dim=(-1, -2)))
    assert rel.max() < 0.04  # the real-space path agrees with the Fourier projector (RELION convention)
    moved = project_warped(v, A[:1], u)
    assert torch.allclose(moved[0][:, :-3], rigid[0][:, 3:], atol=1e-3 * float(rigid.abs().max()))
