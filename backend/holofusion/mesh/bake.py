"""Baking: the grid's view-independent colour into the UV atlas's texture.

1. **Rasterise** every triangle into UV space, all at once (no per-texel or per-triangle Python loop): triangles are
   grouped by the size of their texel bounding box, each group tests every texel centre of every box against its
   triangle with barycentric coordinates, and the texels inside keep the barycentric mix of their triangle's
   3D corners: the surface point the texel shows.
2. **Query** the field's view-independent colour at those points (trilinear lookup, then the decoder's rendered
   colour averaged over directions, ``mean_colour``). Not the colour head alone (``albedo``): a trained coarse
   decoder keeps much of its colour in the view branch's residual, and the head alone is washed out against what
   the model renders (the shipped apple model's surface colours were 3.5x further from the true ones by it).
3. **Fill** the rest of the texture so no seam shows at any mip level: ``dilate`` rings of texels around the charts
   take the mean of their filled neighbours (the texels a bilinear lookup near a chart's edge reads), then a
   push-pull pyramid (coverage-weighted averages down to 1 x 1, then back up) fills every remaining texel with the
   colour of the nearest charts, so coarse mip levels average chart colours, never a background colour.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..grid import VoxelGrid
from .extract import Mesh

__all__ = ["rasterize_uv", "bake_albedo", "fill_texture", "sample_texture"]


def rasterize_uv(mesh: Mesh, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texels whose centres lie in a triangle of the UV layout.

    Returns (texel index (N,) into the size x size image, row-major with row = v * size; face index (N,);
    barycentric coordinates (N, 3)). A texel on an edge shared by two triangles goes to one of them.
    """
    if mesh.uvs is None:
        raise ValueError("the mesh has no UVs: unwrap it first")
    tri = mesh.uvs[mesh.faces].astype(np.float64) * size  # (F, 3, 2) in texel units, texel centres at +0.5
    lo = np.floor(tri.min(1) - 0.5).astype(np.int64) + 1  # first texel index whose centre may be inside
    hi = np.floor(tri.max(1) - 0.5).astype(np.int64)
    lo = np.clip(lo, 0, size - 1)
    hi = np.clip(hi, 0, size - 1)
    extent = np.maximum(hi - lo + 1, 0).max(1)  # (F,) box side in texels
    texels, faces, barys = [], [], []
    bucket = 1
    done = np.zeros(len(tri), bool)
    while not done.all():
        sel = np.flatnonzero(~done & (extent <= bucket))
        done[sel] = True
        if sel.size:
            t, f, b = _raster_bucket(tri[sel], lo[sel], bucket, size)
            texels.append(t)
            faces.append(sel[f])
            barys.append(b)
        bucket *= 2
    texel = np.concatenate(texels) if texels else np.zeros(0, np.int64)
    face = np.concatenate(faces) if faces else np.zeros(0, np.int64)
    bary = np.concatenate(barys) if barys else np.zeros((0, 3))
    # One owner per texel (the last writer would win anyway; make it explicit and deterministic).
    texel, first = np.unique(texel, return_index=True)
    return texel, face[first], bary[first]


def _raster_bucket(tri: np.ndarray, lo: np.ndarray, s: int, size: int) -> tuple[np.ndarray, np.ndarray,
                                                                                 np.ndarray]:
    """Triangles (n, 3, 2) whose texel boxes (from ``lo``) fit in s x s: texels inside, their triangle, barycentrics."""
    oy, ox = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    px = lo[:, None, 0] + ox.ravel()[None]  # (n, s*s) texel columns
    py = lo[:, None, 1] + oy.ravel()[None]
    cx, cy = px + 0.5, py + 0.5
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    det = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    ok = np.abs(det) > 1e-14
    det = np.where(ok, det, 1.0)[:, None]
    l0 = ((b[:, 1] - c[:, 1])[:, None] * (cx - c[:, 0, None]) + (c[:, 0] - b[:, 0])[:, None] * (cy - c[:, 1, None])) \
        / det
    l1 = ((c[:, 1] - a[:, 1])[:, None] * (cx - c[:, 0, None]) + (a[:, 0] - c[:, 0])[:, None] * (cy - c[:, 1, None])) \
        / det
    l2 = 1.0 - l0 - l1
    eps = -1e-9
    inside = (l0 >= eps) & (l1 >= eps) & (l2 >= eps) & ok[:, None] & (px < size) & (py < size)
    f, k = np.nonzero(inside)
    texel = py[f, k] * size + px[f, k]
    bary = np.stack([l0[f, k], l1[f, k], l2[f, k]], -1).clip(0, 1)
    bary /= bary.sum(1, keepdims=True)
    return texel, f, bary


@torch.no_grad()
def bake_albedo(mesh: Mesh, grid: VoxelGrid, field: nn.Module, size: int = 1024, dilate: int = 4,
                chunk: int = 262144) -> tuple[np.ndarray, np.ndarray]:
    """The texture (size, size, 3) uint8 of the field's view-independent colour (``mean_colour``) on the mesh, and
    the mask (size, size) bool of texels the triangles cover (before filling)."""
    texel, face, bary = rasterize_uv(mesh, size)
    corners = mesh.vertices[mesh.faces[face]].astype(np.float64)  # (N, 3, 3)
    points = torch.from_numpy(np.einsum("nk,nkd->nd", bary, corners).astype(np.float32)).to(grid.device)
    colours = []
    for start in range(0, points.shape[0], chunk):
        feats = grid.sample(points[start:start + chunk][None].to(grid.dtype), mode="grid_sample")[0]
        colours.append(field.mean_colour(feats).float().cpu())
    rgb = torch.cat(colours).numpy() if colours else np.zeros((0, 3), np.float32)
    image = np.zeros((size * size, 3), np.float32)
    mask = np.zeros(size * size, bool)
    image[texel] = rgb
    mask[texel] = True
    image = fill_texture(image.reshape(size, size, 3), mask.reshape(size, size), dilate)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask.reshape(size, size)


def fill_texture(image: np.ndarray, mask: np.ndarray, dilate: int = 4) -> np.ndarray:
    """Fills every texel outside ``mask`` (see the module docstring): (H, W, 3) float -> (H, W, 3) float."""
    img = torch.from_numpy(np.ascontiguousarray(image, np.float32)).permute(2, 0, 1)[None]
    m = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    if m.sum() == 0:
        return image
    kernel = torch.ones(1, 1, 3, 3)
    for _ in range(dilate):
        total = F.conv2d(F.pad(img * m, (1, 1, 1, 1)), kernel.expand(3, 1, 3, 3), groups=3)
        count = F.conv2d(F.pad(m, (1, 1, 1, 1)), kernel)
        grow = (count > 0) & (m == 0)
        img = torch.where(grow, total / count.clamp_min(1e-6), img)
        m = torch.where(grow, torch.ones_like(m), m)
    img = torch.where(m > 0, img, _push_pull(img * m, m))
    return img[0].permute(1, 2, 0).numpy()


def _push_pull(weighted: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Coverage-weighted pyramid fill (Gortler et al. 1996's push-pull): (1, 3, H, W) premultiplied colour and
    (1, 1, H, W) weights -> colours everywhere."""
    h, w = weight.shape[-2:]
    if h == 1 and w == 1:
        return weighted / weight.clamp_min(1e-12)
    ph, pw = h % 2, w % 2
    c = F.avg_pool2d(F.pad(weighted, (0, pw, 0, ph)), 2) * 4
    wt = F.avg_pool2d(F.pad(weight, (0, pw, 0, ph)), 2) * 4
    coarse = _push_pull(c, wt)
    up = F.interpolate(coarse, scale_factor=2, mode="nearest")[..., :h, :w]
    here = weighted / weight.clamp_min(1e-12)
    return torch.where(weight > 0, here, up)


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a (H, W, 3) uint8 texture at (N, 2) UVs (glTF convention, texel centres at +0.5, clamped
    at the border): (N, 3) float in [0, 1]."""
    h, w = texture.shape[:2]
    x = uv[:, 0] * w - 0.5
    y = uv[:, 1] * h - 0.5
    x0 = np.clip(np.floor(x).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, h - 1)
    x1, y1 = np.clip(x0 + 1, 0, w - 1), np.clip(y0 + 1, 0, h - 1)
    fx = np.clip(x - x0, 0, 1)[:, None]
    fy = np.clip(y - y0, 0, 1)[:, None]
    t = texture.astype(np.float64) / 255.0
    top = t[y0, x0] * (1 - fx) + t[y0, x1] * fx
    bottom = t[y1, x0] * (1 - fx) + t[y1, x1] * fx
    return top * (1 - fy) + bottom * fy
