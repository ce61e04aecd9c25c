"""Grid -> triangle mesh: marching cubes on the density, cleanup, smoothing, quadric decimation.

- **Level**: the density sigma* = ln 2 / l at which a slab of thickness ``opacity_length`` (world units) absorbs half
  the light (``holofusion.evaluate.density_level``): the surface sits where the field turns opaque at that scale, a
  fixed world quantity, so it does not move with the lattice or with the grid's resolution.
- **Lattice**: the field is queried on an L^3 lattice over the grid's box, which may be finer than the grid
  (trilinear interpolation between cells, then the decoder), so a 16^3 coarse grid still gives a smooth surface.
  The lattice is padded with one empty layer, so surfaces that touch the box close instead of staying open.
- **Cleanup**: connected components smaller than ``min_component`` of the largest (by face count) are floaters and
  are dropped.
- **Smoothing**: Taubin's lambda/mu smoothing (1995), which removes the marching-cubes terracing without the
  shrinking of plain Laplacian smoothing.
- **Decimation**: quadric error metrics (Garland & Heckbert 1997, the ``fast-simplification`` package) down to
  ``target_faces``: the UV unwrap that follows scales with the face count, so the mesh is decimated first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..configbase import DictConfig
from ..errors import UserError
from ..evaluate import density_lattice, density_level
from ..grid import VoxelGrid

__all__ = ["MeshConfig", "Mesh", "extract_mesh", "marching_cubes", "drop_small_components", "taubin_smooth",
           "decimate", "vertex_normals", "EmptyGridError"]


class EmptyGridError(UserError):
    """The field has no surface at the chosen level: nothing to extract."""


@dataclass
class MeshConfig(DictConfig):
    """How a grid becomes a mesh."""

    lattice: int = 128
    """L: the field is evaluated at L^3 points over the box (finer than the grid gives smoother surfaces)."""
    opacity_length: float = 1.0
    """The surface is where a slab this thick (world units) absorbs half the light (density ln 2 / l); the same
    default as the evaluation's surfaces (``SurfaceConfig``), so the mesh is the surface that was measured."""
    min_component: float = 0.1
    """Components with fewer faces than this fraction of the largest one's are dropped (floaters; the same default
    as the evaluation's surfaces, ``SurfaceConfig.min_component``)."""
    smooth_iterations: int = 10
    """Taubin smoothing passes (0: none)."""
    target_faces: int = 20000
    """Decimate to about this many triangles (0: keep them all)."""
    activation: str = "softplus"
    """The density activation of the field's decoder (``RenderConfig.density_activation``)."""
    chunk: int = 262144
    """Field evaluations at once."""

    def __post_init__(self) -> None:
        if self.lattice < 8:
            raise ValueError(f"lattice must be at least 8; got {self.lattice}")
        if self.opacity_length <= 0:
            raise ValueError(f"opacity_length must be positive; got {self.opacity_length}")
        if self.target_faces < 0 or self.smooth_iterations < 0:
            raise ValueError("target_faces and smooth_iterations must be >= 0")


@dataclass
class Mesh:
    """A triangle mesh in world units: vertices (V, 3) float32, faces (F, 3) int32 (counter-clockwise seen from
    outside, so normals point out), optional per-vertex uvs (V, 2) float32 in [0, 1] (origin top-left, as glTF)."""

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray | None = None

    @property
    def n_faces(self) -> int:
        return int(self.faces.shape[0])

    def normals(self) -> np.ndarray:
        return vertex_normals(self.vertices, self.faces)

    def area(self) -> float:
        v = self.vertices[self.faces].astype(np.float64)
        return float(0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1).sum())

    def is_watertight(self) -> bool:
        """Every edge is shared by exactly two faces, in opposite directions (closed and consistently oriented)."""
        f = self.faces.astype(np.int64)
        e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        n = int(self.vertices.shape[0])
        directed = e[:, 0] * n + e[:, 1]
        if np.unique(directed).size != directed.size:
            return False  # an edge used twice in the same direction: inconsistent or non-manifold
        reverse = e[:, 1] * n + e[:, 0]
        return bool(np.isin(reverse, directed).all())


def marching_cubes(sigma: np.ndarray, level: float, box_min, box_max) -> tuple[np.ndarray, np.ndarray]:
    """PyMCubes on a density lattice sigma (L, L, L) indexed [z, y, x] with vertices spanning the box: (vertices in
    world (x, y, z), faces oriented outward, i.e. toward lower density)."""
    import mcubes

    L = sigma.shape[0]
    # One empty layer all round closes surfaces that reach the box's faces.
    padded = np.pad(sigma.astype(np.float64), 1, constant_values=0.0)
    # mcubes indexes the volume as [x0, x1, x2] and returns vertices in that index order: ours is [z, y, x].
    verts, faces = mcubes.marching_cubes(padded, float(level))
    if len(faces) == 0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
    zyx = verts - 1.0  # undo the padding: lattice index coordinates
    lo = np.asarray(box_min, np.float64)
    hi = np.asarray(box_max, np.float64)
    xyz = lo + zyx[:, ::-1] * (hi - lo) / (L - 1)
    faces = faces.astype(np.int64)
    # Reversing the axis order mirrors space, which flips the winding; check against the density gradient anyway
    # (a robust test: the mesh's signed volume is positive when its faces face outward).
    faces = faces[:, ::-1] if _signed_volume(xyz, faces) < 0 else faces
    return xyz.astype(np.float32), np.ascontiguousarray(faces, dtype=np.int32)


def _signed_volume(v: np.ndarray, f: np.ndarray) -> float:
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def drop_small_components(vertices: np.ndarray, faces: np.ndarray, min_fraction: float) -> tuple[np.ndarray,
                                                                                               np.ndarray]:
    """Keeps the connected components (through shared vertices) with at least ``min_fraction`` of the largest one's
    faces; unused vertices are removed."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = vertices.shape[0]
    if faces.shape[0] == 0:
        return vertices, faces
    rows = np.concatenate([faces[:, 0], faces[:, 1]])
    cols = np.concatenate([faces[:, 1], faces[:, 2]])
    graph = coo_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    face_label = label[faces[:, 0]]
    sizes = np.bincount(face_label)
    keep = sizes[face_label] >= min_fraction * sizes.max()
    return _compact(vertices, faces[keep])


def _compact(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    used = np.unique(faces)
    remap = np.full(vertices.shape[0], -1, np.int64)
    remap[used] = np.arange(used.size)
    return vertices[used], remap[faces].astype(np.int32)


def taubin_smooth(vertices: np.ndarray, faces: np.ndarray, iterations: int, lam: float = 0.5,
                  mu: float = -0.53) -> np.ndarray:
    """Taubin smoothing: each pass moves every vertex toward the mean of its neighbours by ``lam``, then away by
    ``mu`` (a low-pass filter that keeps volume, unlike plain Laplacian smoothing)."""
    from scipy.sparse import coo_matrix

    if iterations == 0 or faces.shape[0] == 0:
        return vertices
    n = vertices.shape[0]
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).astype(np.int64)
    e = np.concatenate([e, e[:, ::-1]])
    adj = coo_matrix((np.ones(e.shape[0]), (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()
    adj.data[:] = 1.0  # an edge shared by two faces counts once
    deg = np.asarray(adj.sum(1)).ravel()
    deg[deg == 0] = 1.0
    v = vertices.astype(np.float64)
    for _ in range(iterations):
        for w in (lam, mu):
            v = v + w * (adj @ v / deg[:, None] - v)
    return v.astype(np.float32)


def decimate(vertices: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric-error decimation to about ``target_faces`` triangles (no-op when there are fewer already)."""
    import fast_simplification

    if target_faces <= 0 or faces.shape[0] <= target_faces:
        return vertices, faces
    v, f = fast_simplification.simplify(vertices.astype(np.float64), faces.astype(np.int32),
                                        target_count=int(target_faces))
    v, f = _compact(v.astype(np.float32), f.astype(np.int64))
    # Collapses can leave degenerate (zero-area) triangles; they carry no surface and upset UV unwrapping.
    a = np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    ok = (a > 1e-12) & (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])
    return _compact(v, f[ok])


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (V, 3) float32."""
    v = vertices.astype(np.float64)
    fn = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])  # length = 2 x area
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, faces[:, k], fn)
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(norm > 0, n / np.maximum(norm, 1e-30), np.array([0.0, 1.0, 0.0]))
    return n.astype(np.float32)


@torch.no_grad()
def extract_mesh(grid: VoxelGrid, field: nn.Module, config: MeshConfig | None = None,
                 timings: dict[str, float] | None = None) -> Mesh:
    """The surface of one grid (batch of 1) rendered by ``field`` (a ``Decoder`` or ``ExplicitField``) as a mesh.

    Raises ``EmptyGridError`` when nothing in the box reaches the surface level. ``timings`` (if given) receives
    the seconds of each step.
    """
    import time

    cfg = config or MeshConfig()
    if grid.batch_size != 1:
        raise ValueError(f"extract one object at a time; got a batch of {grid.batch_size}")
    clock = {} if timings is None else timings
    t0 = time.perf_counter()
    sigma = density_lattice(grid, field, cfg.activation, cfg.lattice, cfg.chunk)[0].float().cpu().numpy()
    level = density_level(cfg.opacity_length)
    clock["field"] = time.perf_counter() - t0
    if not (sigma > level).any():
        raise EmptyGridError(f"nothing to extract: no point of the grid is dense enough to be surface (the highest "
                             f"density is {float(sigma.max()):.3g}, the surface level {level:.3g} per world unit)")
    t0 = time.perf_counter()
    v, f = marching_cubes(sigma, level, grid.box_min, grid.box_max)
    clock["marching_cubes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    v, f = drop_small_components(v, f, cfg.min_component)
    v = taubin_smooth(v, f, cfg.smooth_iterations)
    clock["cleanup"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    v, f = decimate(v, f, cfg.target_faces)
    clock["decimate"] = time.perf_counter() - t0
    if f.shape[0] == 0:
        raise EmptyGridError("nothing to extract: the surface vanished in cleanup (only specks above the level)")
    return Mesh(np.ascontiguousarray(v, np.float32), np.ascontiguousarray(f, np.int32))


def object_size(mesh: Mesh) -> float:
    """The diagonal of the mesh's bounding box (world units): the scale that tolerances are quoted against."""
    if mesh.vertices.size == 0:
        return 0.0
    return float(math.dist(mesh.vertices.min(0), mesh.vertices.max(0)))
