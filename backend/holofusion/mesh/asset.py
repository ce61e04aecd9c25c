"""Grid -> Blender-ready asset: mesh, UV atlas, baked texture, in glTF's units and axes.

The model's world follows CO3D (about unit spread, up = -Y). The asset is in glTF's: metres, +Y up (Blender's glTF
importer turns that into its +Z up), resting on the ground plane (lowest point at y = 0), centred on the origin in
x and z, and scaled so its largest side is ``size_m``: by default a real-world size per category
(``DEFAULT_SIZE_M``: an apple 8 cm, a donut 10 cm, a teddy bear 35 cm, a hydrant 75 cm; 30 cm otherwise). The
rotation from the model's world to glTF's is 180 degrees about x, a proper rotation, so faces keep their winding.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..configbase import DictConfig
from ..grid import VoxelGrid
from .bake import bake_albedo
from .extract import Mesh, MeshConfig, extract_mesh, vertex_normals
from .gltf import glb_bytes
from .uv import unwrap

__all__ = ["AssetConfig", "Asset", "make_asset", "DEFAULT_SIZE_M", "default_size"]

DEFAULT_SIZE_M = {"apple": 0.08, "donut": 0.10, "teddybear": 0.35, "hydrant": 0.75}
FALLBACK_SIZE_M = 0.30


def default_size(category: str | None) -> float:
    """The documented default largest side (metres) of an object of ``category``."""
    return DEFAULT_SIZE_M.get(category or "", FALLBACK_SIZE_M)


@dataclass
class AssetConfig(DictConfig):
    """How a grid becomes an asset."""

    texture_size: int = 1024
    """Side of the square base-colour texture in texels."""
    padding: int = 4
    """Texels between UV charts (filled by dilation, so no seam shows when the texture is filtered)."""
    size_m: float | None = None
    """Largest side of the object in metres (None: ``default_size`` of the category)."""
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self) -> None:
        if not 16 <= self.texture_size <= 8192:
            raise ValueError(f"texture_size must be in 16..8192; got {self.texture_size}")
        if self.size_m is not None and not self.size_m > 0:
            raise ValueError(f"size_m must be positive; got {self.size_m}")


@dataclass
class Asset:
    """A textured mesh in glTF space. ``mesh`` (vertices in metres, +Y up; per-vertex UVs), ``normals`` (V, 3),
    ``texture`` (T, T, 3) uint8, ``world_mesh`` the same mesh in the model's world (for checks against the grid),
    ``timings`` seconds per step, ``scale`` metres per world unit."""

    mesh: Mesh
    normals: np.ndarray
    texture: np.ndarray
    world_mesh: Mesh
    scale: float
    timings: dict[str, float]

    def png(self) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.texture).save(buf, format="PNG", compress_level=1)  # speed over a few kB
        return buf.getvalue()

    def glb(self, name: str = "object", extras: dict[str, Any] | None = None, png: bytes | None = None) -> bytes:
        return glb_bytes(self.mesh.vertices, self.normals, self.mesh.uvs, self.mesh.faces, png or self.png(), name,
                         extras)

    def arrays(self, png: bytes | None = None) -> dict[str, Any]:
        """What the server sends: float32 positions / normals / uvs, uint32 faces, the texture as PNG bytes."""
        return {"positions": self.mesh.vertices, "normals": self.normals, "uvs": self.mesh.uvs,
                "faces": self.mesh.faces.astype(np.uint32), "texture_png": png or self.png()}


def to_gltf_space(vertices: np.ndarray, size_m: float) -> tuple[np.ndarray, float]:
    """World (up = -Y) -> glTF (+Y up, metres, resting on y = 0, centred in x and z, largest side ``size_m``)."""
    v = vertices.astype(np.float64) * np.array([1.0, -1.0, -1.0])  # 180 degrees about x
    lo, hi = v.min(0), v.max(0)
    scale = size_m / max(float((hi - lo).max()), 1e-12)
    centre = np.array([(lo[0] + hi[0]) / 2, lo[1], (lo[2] + hi[2]) / 2])
    return ((v - centre) * scale).astype(np.float32), scale


STEPS = ("mesh", "uv_atlas", "bake")


def make_asset(grid: VoxelGrid, field_fn: nn.Module, config: AssetConfig | None = None,
               category: str | None = None, callback: Callable[[str, int, int], Any] | None = None) -> Asset:
    """Mesh, unwrap and bake one grid (batch of 1) rendered by ``field_fn`` (a ``Decoder`` or ``ExplicitField``).

    ``callback(step_name, i, total)`` is called after each of ``STEPS`` (for progress bars). Raises
    ``EmptyGridError`` (a ``UserError``) when the grid holds no surface.
    """
    cfg = config or AssetConfig()
    timings: dict[str, float] = {}

    def done(i: int) -> None:
        if callback is not None:
            callback(STEPS[i], i + 1, len(STEPS))

    welded = extract_mesh(grid, field_fn, cfg.mesh, timings)
    done(0)
    t0 = time.perf_counter()
    world, source = unwrap(welded, cfg.texture_size, cfg.padding)
    timings["uv_atlas"] = time.perf_counter() - t0
    done(1)
    t0 = time.perf_counter()
    texture, _ = bake_albedo(world, grid, field_fn, cfg.texture_size, dilate=cfg.padding)
    timings["bake"] = time.perf_counter() - t0
    done(2)
    verts, scale = to_gltf_space(world.vertices, cfg.size_m or default_size(category))
    mesh = Mesh(verts, world.faces, world.uvs)
    # Normals of the welded mesh, so the copies of a seam vertex share one normal and no shading seam shows; the
    # rotation to glTF space flips their y and z like the positions'.
    normals = (vertex_normals(welded.vertices, welded.faces)[source] * np.array([1, -1, -1], np.float32))
    return Asset(mesh, np.ascontiguousarray(normals, np.float32), texture, world, scale, timings)
