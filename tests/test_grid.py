"""VoxelGrid: layout, geometry helpers and trilinear lookup against a hand-written reference."""

from __future__ import annotations

import math

import pytest
import torch

from holofusion.grid import VoxelGrid, gather_trilinear, trilinear_corners

BOX_MIN = (-1.0, -2.0, -3.0)
BOX_MAX = (1.0, 2.0, 1.5)


def reference_sample(features: torch.Tensor, box_min, box_max, points: torch.Tensor) -> torch.Tensor:
    """Trilinear lookup one point at a time: cell centres at lo + (i + 0.5) * size / n, zero-valued cells beyond the
    lattice, and nothing at all outside the box. features (B, C, D, H, W); points (B, N, 3) -> (B, N, C)."""
    b, c, d, h, w = features.shape
    counts = (w, h, d)  # cells along x, y, z
    out = torch.zeros(b, points.shape[1], c, dtype=torch.float64)
    for bi in range(b):
        for ni in range(points.shape[1]):
            p = [float(v) for v in points[bi, ni]]
            if any(not (lo <= v <= hi) for v, lo, hi in zip(p, box_min, box_max)):
                continue
            # continuous index along each axis, integer at a cell centre
            f = [(v - lo) / (hi - lo) * n - 0.5 for v, lo, hi, n in zip(p, box_min, box_max, counts)]
            base = [math.floor(x) for x in f]
            frac = [x - i for x, i in zip(f, base)]
            acc = torch.zeros(c, dtype=torch.float64)
            for dz in (0, 1):
                for dy in (0, 1):
                    for dx in (0, 1):
                        ix, iy, iz = base[0] + dx, base[1] + dy, base[2] + dz
                        if not (0 <= ix < w and 0 <= iy < h and 0 <= iz < d):
                            continue
                        weight = (
                            (frac[0] if dx else 1 - frac[0])
                            * (frac[1] if dy else 1 - frac[1])
                            * (frac[2] if dz else 1 - frac[2])
                        )
                        acc += weight * features[bi, :, iz, iy, ix].double()
            out[bi, ni] = acc
    return out


def random_grid(gen: torch.Generator, b: int = 2, c: int = 5, dhw=(4, 6, 3)) -> VoxelGrid:
    return VoxelGrid(torch.randn(b, c, *dhw, generator=gen), BOX_MIN, BOX_MAX)


def random_points(gen: torch.Generator, b: int, n: int, margin: float = 0.15) -> torch.Tensor:
    """Points spread over the box grown by `margin` of its size on each side, so some fall outside."""
    lo, hi = torch.tensor(BOX_MIN), torch.tensor(BOX_MAX)
    u = torch.rand(b, n, 3, generator=gen) * (1 + 2 * margin) - margin
    return lo + u * (hi - lo)


@pytest.mark.parametrize("mode", ["gather", "grid_sample"])
def test_lookup_matches_reference(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    grid = random_grid(gen)
    pts = random_points(gen, 2, 150)
    got = grid.sample(pts, mode=mode)
    want = reference_sample(grid.features, BOX_MIN, BOX_MAX, pts)
    assert got.shape == (2, 150, 5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    outside = ~grid.contains(pts)
    assert outside.any() and (~outside).any()
    assert torch.all(got[outside] == 0)


@pytest.mark.parametrize("mode", ["gather", "grid_sample"])
def test_zero_outside_box_even_next_to_a_face(mode: str) -> None:
    # Just beyond a face, zero padding alone would still blend in half of the outer cell; the box mask must not.
    grid = VoxelGrid(torch.ones(1, 2, 4, 4, 4))
    eps = 1e-3
    pts = torch.tensor([[[4 + eps, 0.0, 0.0], [0.0, -4 - eps, 0.0], [0.0, 0.0, 4.1], [10.0, 10.0, 10.0]]])
    assert torch.all(grid.sample(pts, mode=mode) == 0)
    # ... while on the face itself the value is half the outer cell's (blend towards the zero padding).
    face = torch.tensor([[[4.0, 0.0, 0.0]]])
    torch.testing.assert_close(grid.sample(face, mode=mode), torch.full((1, 1, 2), 0.5))


def test_cell_centers_order_and_exact_values() -> None:
    gen = torch.Generator().manual_seed(1)
    grid = random_grid(gen, b=1, c=3, dhw=(3, 4, 5))
    centres = grid.cell_centers()
    assert centres.shape == (3 * 4 * 5, 3)
    vx, vy, vz = grid.voxel_size
    assert (vx, vy, vz) == pytest.approx((2 / 5, 4 / 4, 4.5 / 3))
    torch.testing.assert_close(centres[0], torch.tensor([-1 + vx / 2, -2 + vy / 2, -3 + vz / 2]))
    # x varies fastest, as in features.flatten(2); sampling at a centre returns that cell exactly.
    torch.testing.assert_close(centres[1] - centres[0], torch.tensor([vx, 0.0, 0.0]))
    for mode in ("gather", "grid_sample"):
        got = grid.sample(centres[None], mode=mode)[0]
        torch.testing.assert_close(got, grid.features[0].flatten(1).T, atol=1e-5, rtol=1e-5)


def test_default_box_and_voxel_size() -> None:
    grid = VoxelGrid.zeros(2, 64, 16)
    assert grid.box_min == (-4.0, -4.0, -4.0) and grid.box_max == (4.0, 4.0, 4.0)
    assert grid.voxel_size == (0.5, 0.5, 0.5)
    assert grid.batch_size == 2 and grid.channels == 64 and grid.resolution == (16, 16, 16)
    g64 = grid.to(dtype=torch.float64)
    assert g64.dtype == torch.float64 and g64.box_min == grid.box_min
    assert VoxelGrid.zeros(1, 1, 2, box_min=-1, box_max=1).box_max == (1.0, 1.0, 1.0)


def test_gradients_match_between_kernels() -> None:
    gen = torch.Generator().manual_seed(2)
    grid = random_grid(gen)
    pts = random_points(gen, 2, 64, margin=0.05)
    upstream = torch.randn(2, 64, 5, generator=gen)
    grads = []
    for mode in ("gather", "grid_sample"):
        feats = grid.features.clone().requires_grad_()
        p = pts.clone().requires_grad_()
        out = VoxelGrid(feats, BOX_MIN, BOX_MAX).sample(p, mode=mode)
        grads.append(torch.autograd.grad(out, [feats, p], upstream))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-4)
    assert grads[0][0].abs().sum() > 0


def test_gather_trilinear_backward_is_the_transpose() -> None:
    # <A x, y> = <x, A^T y> for the sparse interpolation matrix A.
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 5, (12, 8), generator=gen)
    w = torch.rand(12, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gather_trilinear, (table, idx, w))
    # The fused bias + ReLU the renderer uses for a decoder's first layer.
    bias = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w_, b_: gather_trilinear(t, idx, w_, b_, relu=True), (table, w, bias))
    fused = gather_trilinear(table, idx, w, bias, relu=True)
    torch.testing.assert_close(fused, torch.relu(gather_trilinear(table, idx, w) + bias))


def test_table_option_interpolates_a_linear_map_of_the_cells() -> None:
    gen = torch.Generator().manual_seed(4)
    grid = random_grid(gen)
    pts = random_points(gen, 2, 40)
    proj = torch.randn(5, 3, generator=gen)
    for mode in ("gather", "grid_sample"):
        got = grid.sample(pts, mode=mode, table=grid.gather_table() @ proj)
        torch.testing.assert_close(got, grid.sample(pts, mode=mode) @ proj, atol=1e-5, rtol=1e-5)


def test_trilinear_corners_weights_sum_to_one_inside() -> None:
    coords = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.2, 0.7], [-0.99, 0.99, 0.0]])
    idx, w = trilinear_corners(coords, (4, 4, 4))
    assert idx.shape == (3, 8) and w.shape == (3, 8)
    torch.testing.assert_close(w[:2].sum(-1), torch.ones(2))
    assert w[2].sum() < 1  # within half a cell of a face, part of the weight falls on the zero padding


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        VoxelGrid(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError):
        VoxelGrid(torch.zeros(1, 1, 2, 2, 2), box_min=(1, 0, 0), box_max=(0, 1, 1))
    with pytest.raises(ValueError):
        VoxelGrid(torch.zeros(1, 1, 2, 2, 2), box_min=(0, 0), box_max=(1, 1, 1))
    grid = VoxelGrid.zeros(2, 3, 4)
    with pytest.raises(ValueError):
        grid.sample(torch.zeros(3, 5, 3))
    with pytest.raises(ValueError):
        grid.sample(torch.zeros(2, 5, 3), mode="nearest")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(5)
    grid = random_grid(gen)
    pts = random_points(gen, 2, 200)
    want = grid.sample(pts)
    for mode in ("auto", "gather", "grid_sample"):
        got = grid.to("cuda").sample(pts.cuda(), mode=mode)  # type: ignore[arg-type]
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
