"""Procedural stand-ins for the four CO3Dv2 categories HoloDiffusion trains on: apple, donut, hydrant, teddybear.

Each object is a signed distance function (SDF) with an albedo field, built from its seed alone, and rendered by a
vectorised sphere tracer into what a CO3D frame holds: an image on a white background, a soft foreground mask and a
z-depth map. The same object gives a coloured surface point cloud (``sample_surface``) for evaluation and for the
sequence's ``pointcloud.ply``.

World frame, chosen to look like CO3D's (notes/co3d-and-cameras.md):

- **up is -Y** (``WORLD_UP``, the same constant as ``holofusion.cameras.WORLD_UP``): CO3D worlds are not gravity
  aligned but their up is roughly -Y, and HoloDiffusion's fly-around cameras use an up close to it. Objects are
  designed with +Y up and turned half a turn about X, a rotation, so nothing is mirrored.
- **centred, unit spread**: the surface's centroid is at the origin and its spread (the root mean square over the
  three axes of the per-axis standard deviation of surface points) is 1, as CO3D normalises each sequence's point
  cloud to about unit standard deviation. ``bounding_radius`` (about the origin) then comes out between about 2.1
  (round apples) and 3.3 (tall hydrants, sitting bears); it is a guaranteed bound measured on a grid, not a guess.

Randomness: shape and colour parameters come from ``numpy.random.default_rng([seed, category_index])``, so an object
depends on its seed and category alone and one seed gives unrelated objects in different categories. Cameras and
lights come from explicit ``torch.Generator`` objects (``sequence_cameras`` derives one from the seed and a salt).

Speed: on a 2-core CPU every SDF works on three contiguous 1-D tensors (x, y, z) rather than an (N, 3) tensor, because
reductions and broadcasts over a last axis of 3 and skinny matmuls cost 5 to 10 times more than flat elementwise ops;
parts that few rays come near (a face, sprinkles, a chain) are evaluated only for points inside their bounds.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..cameras import WORLD_UP as _CAMERAS_WORLD_UP
from ..cameras import PerspectiveCamera
from ..errors import UserError

__all__ = [
    "CATEGORIES",
    "WORLD_UP",
    "Light",
    "ProceduralObject",
    "SequenceCameraConfig",
    "TraceConfig",
    "make_object",
    "observed_colours",
    "random_light",
    "render_views",
    "sequence_cameras",
]

CATEGORIES = ("apple", "donut", "hydrant", "teddybear")

# The synthetic world's up axis, exactly -Y: CO3D's up is roughly -Y, and cameras.py orbits around this axis.
WORLD_UP: tuple[float, float, float] = tuple(float(v) for v in _CAMERAS_WORLD_UP)  # type: ignore[assignment]

_F = torch.float32
P3 = tuple[Tensor, Tensor, Tensor]
"""A batch of points as three 1-D tensors (x, y, z)."""


# ====================================================================== SDF building blocks
# Points are in an object's design frame (+Y up). Distances are exact, or lower bounds near the surface so that sphere
# tracing never steps through it; "approximate" marks the few that are only close. Constants are Python floats: a
# float operand costs nothing, a small tensor operand costs a broadcast.

def _vec(x) -> Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def _len3(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    return torch.sqrt(x * x + y * y + z * z)


def _len2(x: Tensor, y: Tensor) -> Tensor:
    return torch.sqrt(x * x + y * y)


def _sphere(p: P3, c, r: float) -> Tensor:
    return _len3(p[0] - c[0], p[1] - c[1], p[2] - c[2]) - r


def _ellipsoid(p: P3, c, radii) -> Tensor:
    """Approximate ellipsoid distance (Quilez's k0 (k0 - 1) / k1): exact on the surface, close to it nearby."""
    qx, qy, qz = ((p[i] - float(c[i])) / float(radii[i]) for i in range(3))
    k0 = _len3(qx, qy, qz)
    k1 = _len3(qx / float(radii[0]), qy / float(radii[1]), qz / float(radii[2]))
    return k0 * (k0 - 1.0) / k1.clamp_min(1e-9)


def _to_local(p: P3, c, basis: np.ndarray) -> P3:
    """Coordinates in a frame centred at c whose axes are the columns of ``basis`` (design-frame vectors)."""
    dx, dy, dz = p[0] - float(c[0]), p[1] - float(c[1]), p[2] - float(c[2])
    b = basis.astype(float)
    return tuple(dx * b[0, k] + dy * b[1, k] + dz * b[2, k] for k in range(3))  # type: ignore[return-value]


def _capsule(p: P3, a, b, r: float) -> Tensor:
    a = np.asarray(a, dtype=float)
    ba = np.asarray(b, dtype=float) - a
    inv = 1.0 / max(float(ba @ ba), 1e-12)
    px, py, pz = p[0] - a[0], p[1] - a[1], p[2] - a[2]
    h = ((px * ba[0] + py * ba[1] + pz * ba[2]) * inv).clamp(0.0, 1.0)
    return _len3(px - h * ba[0], py - h * ba[1], pz - h * ba[2]) - r


def _capsules(p: P3, a: Tensor, b: Tensor, r: Tensor) -> Tensor:
    """(N, K) distances to K capsules with ends a, b (K, 3) and radii r (K,): for many small parts at once."""
    ba = b - a
    inv = 1.0 / (ba * ba).sum(-1).clamp_min(1e-12)
    px, py, pz = (p[i][:, None] - a[:, i] for i in range(3))
    h = ((px * ba[:, 0] + py * ba[:, 1] + pz * ba[:, 2]) * inv).clamp(0.0, 1.0)
    return _len3(px - h * ba[:, 0], py - h * ba[:, 1], pz - h * ba[:, 2]) - r


class _GridCapsules:
    """Many small capsules (sprinkles), looked up through a grid over the XZ plane.

    Each capsule is filed under the grid cell holding its centre; a point is tested only against the capsules of the
    3x3 cells around its own. A capsule outside that window lies at least (distance to the window's edge) - (a
    capsule's reach) away, with the cell at least twice the reach, so that bound joins the minimum: the result stays a
    lower bound everywhere and is exact wherever the nearest capsule is in the window (always near the surface).
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, radius: float):
        ba = b - a
        self.radius = float(radius)
        self.reach = float(np.linalg.norm(ba, axis=1).max() / 2 + radius)
        self.cell = 2.0 * self.reach + 1e-3
        mid = (a + b) / 2
        self.lo = (float(mid[:, 0].min()) - 1.5 * self.cell, float(mid[:, 2].min()) - 1.5 * self.cell)
        ci = np.floor((mid[:, [0, 2]] - np.asarray(self.lo)) / self.cell).astype(int)
        self.nx, self.nz = int(ci[:, 0].max()) + 2, int(ci[:, 1].max()) + 2
        windows = []
        for i in range(self.nx):
            for j in range(self.nz):
                windows.append(np.flatnonzero((np.abs(ci[:, 0] - i) <= 1) & (np.abs(ci[:, 1] - j) <= 1)))
        k = max(1, max(len(w) for w in windows))
        # Pad each window with copies of a capsule far away, which never wins the minimum.
        far = len(a)
        table = np.full((len(windows), k), far, dtype=np.int64)
        for w_i, w in enumerate(windows):
            table[w_i, :len(w)] = w
        a_pad = np.concatenate([a, [[0.0, 1e3, 0.0]]])
        ba_pad = np.concatenate([ba, [[0.0, 1.0, 0.0]]])
        inv = 1.0 / np.maximum((ba_pad * ba_pad).sum(1), 1e-12)
        cols = [a_pad[:, 0], a_pad[:, 1], a_pad[:, 2], ba_pad[:, 0], ba_pad[:, 1], ba_pad[:, 2], inv]
        # One row per cell holding all 7 parameters of its window's k capsules, gathered per point in one call.
        self.table = torch.cat([_vec(c[table]) for c in cols], 1)  # (cells, 7 k)
        self.index = torch.from_numpy(table)
        self.k = k

    def _lookup(self, p: P3) -> tuple[Tensor, Tensor, Tensor]:
        """(N, k) distances to the window's capsules, the cell per point, and a lower bound for all other capsules."""
        x, y, z = p
        gx = (x - self.lo[0]) * (1.0 / self.cell)
        gz = (z - self.lo[1]) * (1.0 / self.cell)
        ix = gx.floor().clamp(0, self.nx - 1)
        iz = gz.floor().clamp(0, self.nz - 1)
        cell = (ix * self.nz + iz).to(torch.int64)
        ax, ay, az, bx, by, bz, inv = self.table.index_select(0, cell).split(self.k, 1)
        px, py, pz = x[:, None] - ax, y[:, None] - ay, z[:, None] - az
        h = ((px * bx + py * by + pz * bz) * inv).clamp(0.0, 1.0)
        d = _len3(px - h * bx, py - h * by, pz - h * bz) - self.radius
        # Distance from the point to the edge of its 3x3 window (points off the grid get no credit for it).
        fx, fz = gx - ix, gz - iz
        edge = torch.minimum(torch.minimum(fx, 1.0 - fx), torch.minimum(fz, 1.0 - fz)).clamp_min(0.0) + 1.0
        rest = edge * self.cell - self.reach
        return d, cell, rest

    def __call__(self, p: P3) -> Tensor:
        d, _, rest = self._lookup(p)
        return torch.minimum(d.amin(-1), rest)

    def nearest(self, p: P3) -> Tensor:
        """Index (N,) of the nearest capsule in the point's window, or the capsule count if the window is empty."""
        d, cell, _ = self._lookup(p)
        return self.index[cell, d.argmin(-1)]


def _cyl_axis(radial: Tensor, along: Tensor, radius: float, half_length: float, rounding: float = 0.0) -> Tensor:
    """Capped cylinder from a point's distance to the axis and its position along it (centre at 0), edges rounded."""
    dx = radial - (radius - rounding)
    dy = along.abs() - (half_length - rounding)
    outside = _len2(dx.clamp_min(0.0), dy.clamp_min(0.0))
    inside = torch.maximum(dx, dy).clamp_max(0.0)
    return outside + inside - rounding


def _cyl_y(p: P3, c, radius: float, half_height: float, rounding: float = 0.0) -> Tensor:
    return _cyl_axis(_len2(p[0] - c[0], p[2] - c[2]), p[1] - c[1], radius, half_height, rounding)


def _torus_y(p: P3, c, major: float, minor: float) -> Tensor:
    return _len2(_len2(p[0] - c[0], p[2] - c[2]) - major, p[1] - c[1]) - minor


def _smin(a: Tensor, b: Tensor, k: float) -> Tensor:
    """Polynomial smooth minimum (Quilez): equals min(a, b) once |a - b| >= k, so parts far apart stay exact."""
    h = (0.5 + (0.5 / k) * (b - a)).clamp(0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smax(a: Tensor, b: Tensor, k: float) -> Tensor:
    return -_smin(-a, -b, k)


def _gated(p: P3, bound: Tensor, fn: Callable[[P3], Tensor | tuple[Tensor, ...]], margin: float):
    """``fn(p)`` where ``bound < margin``, else ``bound`` (for each tensor ``fn`` returns).

    ``bound`` must be a lower bound of the distance to the group of parts ``fn`` measures (a sphere or slab around
    them). Sphere tracing then stays safe, and a smooth union of blend width <= ``margin`` with the group is exact
    wherever the group is evaluated, so the zero set does not change. Worth it for groups of small parts that most
    rays never come near (a face, sprinkles, a chain). ``margin = inf`` evaluates everywhere.
    """
    near = bound < margin
    idx = near.nonzero().squeeze(1)
    if idx.numel() == bound.numel():
        return fn(p)
    # Even with no point near, fn runs (on empty tensors) so that it says how many values it returns.
    out = fn(tuple(c.index_select(0, idx) for c in p))  # type: ignore[arg-type]
    if isinstance(out, tuple):
        return tuple(bound.index_copy(0, idx, v) for v in out)
    return bound.index_copy(0, idx, out)


def _basis_from_axis(axis: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """A 3x3 matrix whose columns are an orthonormal frame with the *first* column along ``axis``."""
    x = axis / np.linalg.norm(axis)
    ref = np.array([0.0, 1.0, 0.0]) if abs(x[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    z = np.cross(x, ref)
    z /= np.linalg.norm(z)
    y = np.cross(z, x)
    c, s = math.cos(roll), math.sin(roll)
    y, z = c * y + s * z, -s * y + c * z
    return np.stack([x, y, z], axis=1)


# ====================================================================== colour patterns

class _SineNoise:
    """Smooth noise: a sum of K plane waves with random directions and phases, of about unit variance.

    K sines per point are far cheaper than lattice noise and smooth enough for colour gradients, streaks, lumps and
    fur at the resolutions we render. ``stretch`` squeezes the wave vectors per axis (a small y gives vertical
    streaks).
    """

    def __init__(self, rng: np.random.Generator, frequency: float, k: int = 6, stretch=(1.0, 1.0, 1.0)):
        dirs = rng.normal(size=(k, 3)) * np.asarray(stretch, dtype=np.float64)[None, :]
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        freqs = frequency * rng.uniform(0.7, 1.3, size=k)
        self.w = [tuple(float(v) for v in d * f) for d, f in zip(dirs, freqs)]
        self.phase = [float(v) for v in rng.uniform(0, 2 * math.pi, size=k)]
        self.scale = math.sqrt(2.0 / k)

    def __call__(self, p: P3) -> Tensor:
        acc = None
        for (wx, wy, wz), ph in zip(self.w, self.phase):
            s = torch.sin(p[0] * wx + p[1] * wy + p[2] * wz + ph)
            acc = s if acc is None else acc + s
        return acc * self.scale  # type: ignore[operator]


def _hash01(ix: Tensor, iy: Tensor, iz: Tensor, salt: int) -> Tensor:
    """Integer lattice hash -> [0, 1). Masked to 31 bits at each stage so int64 products never overflow."""
    h = (ix * 73856093 + iy * 19349663 + iz * 83492791 + (salt & 0x3FFFFFFF)) & 0x7FFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0x7FFFFFFF
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF).to(_F) * (1.0 / 0x1000000)


def _dots(p: P3, frequency: float, radius: float, salt: int) -> tuple[Tensor, Tensor]:
    """Round spots, at most one per lattice cell at a random place in it: (coverage in [0,1] (N,), spot key (N,)).

    Apple lenticels, powdered sugar: a hash per point instead of a search over many spots. ``radius`` is in cell units
    and below 0.5, so a spot never crosses its cell's border; ``key`` in [0,1) lets callers thin or colour spots.
    """
    q = [c * frequency for c in p]
    cells = [torch.floor(c) for c in q]
    ix, iy, iz = (c.to(torch.int64) for c in cells)
    d2 = None
    for k in range(3):
        centre = cells[k] + radius + _hash01(ix, iy, iz, salt + k) * (1.0 - 2.0 * radius)
        e = q[k] - centre
        d2 = e * e if d2 is None else d2 + e * e
    cover = ((radius - torch.sqrt(d2)) * (1.0 / (0.35 * radius))).clamp(0.0, 1.0)  # type: ignore[arg-type]
    return cover, _hash01(ix, iy, iz, salt + 7)


def _mix(a: Tensor, b: Tensor, m) -> Tensor:
    """Blend colours a -> b ((3,) or (N,3)) by m ((N,) or scalar)."""
    if isinstance(m, Tensor) and m.dim() == 1:
        m = m[:, None]
    return a + (b - a) * m


def _jitter_colour(rng: np.random.Generator, rgb, amount: float = 0.06, brightness=(0.88, 1.1)) -> np.ndarray:
    c = np.asarray(rgb, dtype=np.float64)
    c = c * rng.uniform(*brightness) + rng.normal(scale=amount, size=3) * 0.5
    return np.clip(c, 0.0, 1.0)


def _smoothstep(e0: float, e1: float, x: Tensor) -> Tensor:
    t = ((x - e0) * (1.0 / (e1 - e0))).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _bezier(p0, p1, p2, n: int) -> np.ndarray:
    ts = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - ts) ** 2 * np.asarray(p0) + 2 * (1 - ts) * ts * np.asarray(p1) + ts ** 2 * np.asarray(p2)


# ====================================================================== categories (design frame: +Y up)

class _Shape(ABC):
    """One category instance in its design frame. Subclasses draw their parameters from ``rng`` in ``__init__``."""

    bound_centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    bound_radius: float = 2.0
    """A sphere that surely holds the design-frame surface (checked when the object is normalised)."""
    specular: float = 0.0
    """Strength of a Blinn-Phong highlight: waxy apples, icing and paint shine; fur does not."""
    params: dict
    gate_extra: float = 0.0
    """Added to every gate's margin (design units). Tracing needs only the margins themselves; but a gate's stand-in
    value (its bound) underestimates distance just outside it, which a soft shadow reads as a near miss and darkens:
    shading widens the gates; measuring the surface and projecting onto it sets ``inf`` (evaluate everywhere), where
    a stand-in value would look like a near-surface point."""
    shading: bool = False
    """Set while tracing shadow and occlusion rays: parts too small to cast a visible shadow (sprinkles) may drop
    out, which is cheaper and avoids the shadows of their lookup structure's bounds."""

    def _gate(self, p: P3, bound: Tensor, fn, margin: float):
        return _gated(p, bound, fn, margin + self.gate_extra)

    @abstractmethod
    def sdf(self, p: P3) -> Tensor:
        """(N,) signed distance in design units, negative inside."""

    @abstractmethod
    def albedo(self, p: P3) -> Tensor:
        """(N, 3) colour, meaningful on and near the surface."""


class _Apple(_Shape):
    FAMILIES = {
        # name: (base colour, blush / gradient colour)
        "red": ((0.66, 0.06, 0.06), (0.42, 0.03, 0.05)),
        "gala": ((0.88, 0.64, 0.22), (0.74, 0.10, 0.07)),
        "green": ((0.45, 0.68, 0.16), (0.66, 0.78, 0.28)),
        "yellow": ((0.92, 0.78, 0.26), (0.74, 0.80, 0.25)),
        "pink-lady": ((0.84, 0.82, 0.40), (0.90, 0.32, 0.32)),
    }

    def __init__(self, rng: np.random.Generator):
        self.sy = rng.uniform(0.78, 0.98)            # height / width
        self.taper = rng.uniform(0.0, 0.2)           # shoulders wider than the bottom
        self.lobe = rng.uniform(0.015, 0.035) if rng.random() < 0.4 else 0.0  # Red Delicious knobs
        self.lobe_phase = rng.uniform(0, 2 * math.pi)
        self.bump = _SineNoise(rng, 2.0, k=2)
        self.bump_amp = rng.uniform(0.005, 0.025)
        self.rt = rng.uniform(0.22, 0.34)            # top cavity
        self.rb = rng.uniform(0.12, 0.2)             # bottom cavity
        self.c_top = (0.0, self.sy + 0.35 * self.rt, 0.0)
        self.c_bot = (0.0, -self.sy - 0.45 * self.rb, 0.0)

        # Stem: a quadratic Bezier from inside the top cavity, bending to one side, as 3 tapering capsules.
        self.has_stem = rng.random() < 0.92
        y0 = self.sy + 0.35 * self.rt - self.rt - 0.05
        length = rng.uniform(0.28, 0.5)
        bend_dir = rng.uniform(0, 2 * math.pi)
        bend = rng.uniform(0.0, 0.22)
        pts = _bezier([0.0, y0, 0.0], [0.0, y0 + 0.6 * length, 0.0],
                      [bend * math.cos(bend_dir), y0 + length, bend * math.sin(bend_dir)], 4)
        r_stem = rng.uniform(0.032, 0.048)
        self.stem = [(pts[i], pts[i + 1], r_stem * (1.15 - 0.15 * i)) for i in range(3)]

        # Leaf (sometimes): a thin ellipsoid off the stem, tilted upwards.
        self.has_leaf = self.has_stem and rng.random() < 0.4
        leaf_len = rng.uniform(0.35, 0.6)
        leaf_w = leaf_len * rng.uniform(0.35, 0.5)
        a = rng.uniform(0, 2 * math.pi)
        tilt = math.radians(rng.uniform(10, 40))
        d = np.array([math.cos(a) * math.cos(tilt), math.sin(tilt), math.sin(a) * math.cos(tilt)])
        self.leaf_c = pts[2] + d * leaf_len * 0.5
        self.leaf_basis = _basis_from_axis(d, roll=rng.uniform(-0.6, 0.6))  # columns: length, normal, width
        self.leaf_radii = (leaf_len * 0.5, 0.022, leaf_w * 0.5)
        # One sphere around stem and leaf, for gating them (most rays never come near either).
        ends = [pts[0], pts[-1]] + ([self.leaf_c + d * leaf_len * 0.5, self.leaf_c - d * leaf_len * 0.5]
                                    if self.has_leaf else [])
        self.top_c = (np.min(ends, 0) + np.max(ends, 0)) / 2
        self.top_r = float(max(np.linalg.norm(e - self.top_c) for e in ends) + max(r_stem * 1.2, leaf_w * 0.5))

        fam = str(rng.choice(list(self.FAMILIES), p=[0.35, 0.2, 0.22, 0.13, 0.10]))
        base_c, blush_c = self.FAMILIES[fam]
        self.base = _vec(_jitter_colour(rng, base_c))
        self.blush = _vec(_jitter_colour(rng, blush_c))
        self.blush_amount = rng.uniform(0.0, 1.0)    # how much of the surface the blush covers
        self.blush_max = rng.uniform(0.6, 1.0)
        bd = rng.normal(size=3) * np.array([1.0, 0.5, 1.0])
        self.blush_dir = bd / np.linalg.norm(bd)
        self.blush_noise = _SineNoise(rng, 1.6, k=5)
        self.streaks = _SineNoise(rng, 9.0, k=5, stretch=(1.0, 0.08, 1.0))  # vertical stripes
        self.streak_amp = rng.uniform(0.3, 1.0) if fam in ("red", "gala", "pink-lady") else rng.uniform(0.0, 0.3)
        self.speckle_freq = rng.uniform(9.0, 16.0)
        self.speckle_density = rng.uniform(0.3, 0.8)
        self.speckle_colour = _vec(_jitter_colour(rng, (0.93, 0.88, 0.6), 0.04))
        self.cavity_colour = _vec(_jitter_colour(rng, (0.55, 0.5, 0.2)))
        self.stem_colour = _vec(_jitter_colour(rng, (0.36, 0.24, 0.12)))
        self.leaf_colour = _vec(_jitter_colour(rng, (0.22, 0.48, 0.12)))
        self.salt = int(rng.integers(0, 2**30))
        self.specular = rng.uniform(0.15, 0.35)
        self.bound_centre = (0.0, 0.15, 0.0)
        self.bound_radius = 1.9
        self.params = {"family": fam, "stem": self.has_stem, "leaf": self.has_leaf}

    def _body(self, p: P3) -> Tensor:
        x, y, z = p
        yn = y * (1.0 / self.sy)
        inv_w = 1.0 / (1.0 + self.taper * yn.clamp(-1.0, 1.0))
        # Scaling x and z by up to 1 / (1 - taper) stretches distances; shrink the result to keep a lower bound.
        d = _ellipsoid((x * inv_w, y, z * inv_w), (0.0, 0.0, 0.0), (1.0, self.sy, 1.0)) * (1.0 - self.taper)
        if self.lobe:
            # Knobs around the bottom, fading towards the axis so the pole stays smooth.
            phi = torch.atan2(z, x)
            r = _len2(x, z)
            d = d - self.lobe * torch.cos(5.0 * phi + self.lobe_phase) * (-yn).clamp(0.0, 1.0) ** 2 * r.clamp(0, 1)
        d = d - self.bump_amp * self.bump(p)
        d = _smax(d, -_sphere(p, self.c_top, self.rt), 0.18)
        d = _smax(d, -_sphere(p, self.c_bot, self.rb), 0.12)
        return d

    def _parts(self, p: P3) -> tuple[Tensor, Tensor | None, Tensor | None]:
        body = self._body(p)
        stem = leaf = None
        if self.has_stem:
            # The stem and leaf sit above the top cavity: evaluate them only near it.
            bound = _sphere(p, self.top_c, self.top_r)
            stem = self._gate(p, bound, self._stem, 0.05)
            if self.has_leaf:
                leaf = self._gate(p, bound, lambda q: _ellipsoid(_to_local(q, self.leaf_c, self.leaf_basis),
                                                                 (0, 0, 0), self.leaf_radii), 0.02)
        return body, stem, leaf

    def _stem(self, p: P3) -> Tensor:
        d = None
        for a, b, r in self.stem:
            s = _capsule(p, a, b, r)
            d = s if d is None else torch.minimum(d, s)
        return d  # type: ignore[return-value]

    def sdf(self, p: P3) -> Tensor:
        body, stem, leaf = self._parts(p)
        d = body if stem is None else _smin(body, stem, 0.04)
        return d if leaf is None else torch.minimum(d, leaf)

    def albedo(self, p: P3) -> Tensor:
        body, stem, leaf = self._parts(p)
        x, y, z = p
        bd = self.blush_dir
        # Blush over one side, broken up by noise and by vertical streaks near its edge, with a fairly sharp edge:
        # a soft 50/50 blend of red and yellow-green reads as brown, real apples show patches and stripes instead.
        streaks = self.streaks(p)
        m = (x * bd[0] + y * bd[1] + z * bd[2]) * 1.2 + 0.8 * self.blush_noise(p) + (self.blush_amount - 0.5) * 3.0 \
            + 1.5 * self.streak_amp * streaks
        c = _mix(self.base, self.blush, torch.sigmoid(3.0 * m) * self.blush_max)
        c = c * (1.0 + 0.15 * self.streak_amp * streaks)[:, None]
        cover, key = _dots(p, self.speckle_freq, 0.18, self.salt)
        c = _mix(c, self.speckle_colour, cover * (key < self.speckle_density).to(_F) * 0.55)
        # The stem cavity and the calyx are duller and greener.
        r = _len2(x, z)
        cav = (1.0 - _smoothstep(0.0, self.rt * 1.3, r)) * _smoothstep(0.3, 0.7, (y * (1.0 / self.sy)).abs())
        c = _mix(c, self.cavity_colour, cav * 0.7)
        if stem is not None:
            is_stem = stem < body
            if leaf is not None:
                is_stem &= stem <= leaf
            c = torch.where(is_stem[:, None], self.stem_colour.expand_as(c), c)
        if leaf is not None:
            leaf_c = self.leaf_colour * (1.0 + 0.15 * self.blush_noise(tuple(v * 3.0 for v in p)))[:, None]
            c = torch.where(((leaf < body) & (leaf < stem))[:, None], leaf_c, c)
        return c


class _Donut(_Shape):
    ICINGS = {
        "pink": (0.96, 0.55, 0.70), "chocolate": (0.30, 0.16, 0.09), "white": (0.95, 0.93, 0.89),
        "yellow": (0.97, 0.85, 0.40), "blue": (0.50, 0.72, 0.95), "mint": (0.62, 0.90, 0.72),
        "caramel": (0.78, 0.50, 0.22), "purple": (0.62, 0.42, 0.75), "red": (0.85, 0.18, 0.2),
    }
    SPRINKLES = [(0.95, 0.2, 0.2), (0.98, 0.85, 0.2), (0.25, 0.5, 0.95), (0.3, 0.85, 0.35), (0.98, 0.98, 0.96),
                 (0.98, 0.55, 0.15), (0.95, 0.45, 0.75), (0.6, 0.3, 0.85)]

    def __init__(self, rng: np.random.Generator):
        self.R = 1.0
        self.r = rng.uniform(0.34, 0.55)
        self.sy = rng.uniform(0.72, 0.95)            # donuts are flatter than a torus
        self.lumps = _SineNoise(rng, 2.2, k=2)
        self.lump_amp = rng.uniform(0.01, 0.035)
        self.iced = rng.random() < 0.85
        self.t = rng.uniform(0.03, 0.06)             # icing thickness
        self.edge0 = self.r * self.sy * rng.uniform(-0.2, 0.35)
        self.waves = [(rng.uniform(0.03, 0.09) * self.r, float(rng.integers(4, 10)), rng.uniform(0, 6.3)),
                      (rng.uniform(0.01, 0.04) * self.r, float(rng.integers(11, 23)), rng.uniform(0, 6.3))]
        icing_name = str(rng.choice(list(self.ICINGS)))
        self.icing_colour = _vec(_jitter_colour(rng, self.ICINGS[icing_name], 0.04, (0.92, 1.05)))
        self.dough = _vec(_jitter_colour(rng, (0.78, 0.50, 0.22), 0.04))
        self.dough_dark = _vec(_jitter_colour(rng, (0.52, 0.28, 0.1), 0.04))
        self.dough_band = _vec(_jitter_colour(rng, (0.95, 0.85, 0.62), 0.03))
        self.dough_noise = _SineNoise(rng, 3.0, k=5)
        self.icing_noise = _SineNoise(rng, 4.0, k=4)
        self.glazed = (not self.iced) and rng.random() < 0.6
        self.powdered = (not self.iced) and not self.glazed
        self.salt = int(rng.integers(0, 2**30))
        self.n_spr = 0
        if self.iced and rng.random() < 0.6:
            self._make_sprinkles(rng)
        self.specular = rng.uniform(0.25, 0.45) if (self.iced or self.glazed) else 0.05
        self.bound_radius = self.R + self.r + self.t + 0.4
        kind = icing_name if self.iced else ("glazed" if self.glazed else "powdered")
        self.params = {"icing": kind, "sprinkles": self.n_spr, "tube": round(self.r, 3)}

    def _edge(self, phi: Tensor) -> Tensor:
        h = None
        for amp, k, ph in self.waves:
            s = amp * torch.sin(k * phi + ph)
            h = s if h is None else h + s
        return h + self.edge0  # type: ignore[operator]

    def _make_sprinkles(self, rng: np.random.Generator) -> None:
        rainbow = rng.random() < 0.7
        n_try = int(rng.integers(40, 110))
        rt = self.r + self.t
        phi = rng.uniform(0, 2 * math.pi, n_try)
        theta = rng.uniform(-1.3, 1.3, n_try)            # angle around the tube, from its top
        radial = self.R + rt * np.sin(theta)
        y = rt * np.cos(theta) * self.sy
        h = self.edge0 + sum(a * np.sin(k * phi + ph) for a, k, ph in self.waves)
        keep = y > h + 0.06
        phi, theta, radial, y = phi[keep], theta[keep], radial[keep], y[keep]
        n = len(phi)
        centre = np.stack([radial * np.cos(phi), y, radial * np.sin(phi)], 1)
        normal = np.stack([np.sin(theta) * np.cos(phi), np.cos(theta) / self.sy, np.sin(theta) * np.sin(phi)], 1)
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        centre -= normal * 0.01                          # half sunk into the icing
        d = rng.normal(size=(n, 3))
        d -= (d * normal).sum(1, keepdims=True) * normal  # lying flat on it
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        half = rng.uniform(0.06, 0.09)
        self.spr_r = float(rng.uniform(0.025, 0.032))
        self.sprinkles = _GridCapsules(centre - d * half, centre + d * half, self.spr_r)
        # How far a sprinkle can stand out of the icing: its radius above its sunk centre, plus the rise of its ends
        # over the curved surface; a generous bound.
        self.spr_reach = self.spr_r + 0.04
        if rainbow:
            pal = np.asarray(self.SPRINKLES)
            cols = pal[rng.integers(0, len(pal), n)]
        else:
            # One colour (chocolate, white or pink), the one that stands out most from the icing.
            options = np.asarray([(0.25, 0.13, 0.07), (0.98, 0.98, 0.96), (0.95, 0.45, 0.75)])
            contrast = np.abs(options - self.icing_colour.numpy()[None]).sum(1) + rng.uniform(0, 0.3, 3)
            cols = np.tile(options[int(np.argmax(contrast))], (n, 1))
        # One more row for `nearest`'s padding index: points whose distance came from the grid bound keep the icing.
        self.spr_colour = torch.cat([_vec(cols), self.icing_colour[None]])
        self.n_spr = n

    def _parts(self, p: P3) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x, y, z = p
        ring = _len2(_len2(x, z) - self.R, y * (1.0 / self.sy))
        # Dividing y by sy < 1 stretches distances; multiplying back by sy keeps a lower bound.
        lumps = self.lump_amp * self.lumps(p)
        dough = (ring - self.r) * self.sy - lumps
        if not self.iced:
            return dough, None, None
        shell = (ring - (self.r + self.t)) * self.sy - lumps
        icing = _smax(shell, self._edge(torch.atan2(z, x)) - y, 0.02)
        if not self.n_spr or self.shading:
            return dough, icing, None
        # Sprinkles stand at most `spr_reach` out of the icing, so `icing - spr_reach` bounds their distance.
        spr = self._gate(p, icing - self.spr_reach, self.sprinkles, 0.02)
        return dough, icing, spr

    def sdf(self, p: P3) -> Tensor:
        dough, icing, spr = self._parts(p)
        d = dough if icing is None else torch.minimum(dough, icing)
        return d if spr is None else torch.minimum(d, spr)

    def albedo(self, p: P3) -> Tensor:
        dough, icing, spr = self._parts(p)
        x, y, z = p
        rxz = _len2(x, z)
        n = self.dough_noise(p)
        top = _smoothstep(-0.2, 0.9, y * (1.0 / (self.r * self.sy)) + 0.15 * n)
        c = _mix(self.dough, self.dough_dark, top * 0.75)
        # A fried donut's pale ring where it floated in the oil.
        band = torch.exp(-((y * (1.0 / (0.22 * self.r * self.sy))) ** 2)) \
            * _smoothstep(self.R, self.R + 0.5 * self.r, rxz)
        c = _mix(c, self.dough_band, band * 0.8)
        c = c * (1.0 + 0.06 * n)[:, None]
        if self.glazed:
            c = _mix(c, torch.tensor([0.97, 0.86, 0.62]), 0.35)
        if self.powdered:
            cover, key = _dots(p, 22.0, 0.3, self.salt)
            c = _mix(c, torch.tensor([0.98, 0.97, 0.95]), 0.45 + 0.5 * cover * (key < 0.8).to(_F))
        if icing is not None:
            ic = self.icing_colour * (1.0 + 0.04 * self.icing_noise(p))[:, None]
            c = torch.where((icing <= dough)[:, None], ic, c)
        if spr is not None:
            idx = ((spr < icing) & (spr < dough)).nonzero().squeeze(1)
            if idx.numel():
                q = tuple(v.index_select(0, idx) for v in p)
                which = self.sprinkles.nearest(q)  # type: ignore[arg-type]
                c = c.index_copy(0, idx, self.spr_colour[which])
        return c


class _Hydrant(_Shape):
    PAINTS = {
        "red": (0.75, 0.08, 0.06), "yellow": (0.95, 0.74, 0.08), "silver": (0.68, 0.69, 0.70),
        "green": (0.12, 0.45, 0.2), "blue": (0.14, 0.28, 0.68), "white": (0.9, 0.9, 0.87),
        "orange": (0.95, 0.42, 0.08), "black": (0.12, 0.12, 0.13),
    }

    def __init__(self, rng: np.random.Generator):
        self.rb = rb = rng.uniform(0.26, 0.36)
        self.H = H = rng.uniform(0.85, 1.3)
        self.taper = rng.uniform(0.0, 0.12)          # a little wider at the foot
        self.fr = rb * rng.uniform(1.3, 1.5)         # base flange
        self.fh = rng.uniform(0.07, 0.12)
        self.has_ring = rng.random() < 0.6           # a raised ring just above the flange
        self.ring_y = self.fh + rng.uniform(0.06, 0.14)
        self.tr = rb * rng.uniform(1.12, 1.3)        # bonnet flange
        self.th = rng.uniform(0.04, 0.08)
        self.dome_h = rb * rng.uniform(0.55, 1.05)
        self.nut_r = rb * rng.uniform(0.22, 0.35)
        self.nut_h = rng.uniform(0.06, 0.12)
        self.dome_y = H + 2 * self.th
        # Nozzles: two on the sides, sometimes a bigger pumper nozzle in front.
        self.n_noz = 3 if rng.random() < 0.5 else 2
        self.yn = H * rng.uniform(0.58, 0.76)
        rn = rb * rng.uniform(0.28, 0.38)
        ln = rb + rng.uniform(0.1, 0.2)
        yaw = rng.uniform(0, 2 * math.pi)
        self.nozzles = []  # (unit horizontal axis (ax, az), radius, length from the body's axis)
        for k in range(self.n_noz):
            ang = yaw + [math.pi / 2, -math.pi / 2, 0.0][k]
            big = k == 2
            self.nozzles.append(((math.cos(ang), math.sin(ang)), rn * (1.4 if big else 1.0),
                                 ln * (1.1 if big else 1.0)))
        self.noz_reach = max(r for _, r, _ in self.nozzles) * 1.25 + 0.03
        self.has_chain = rng.random() < 0.4
        if self.has_chain:
            self._make_chain(rng)

        paint = str(rng.choice(list(self.PAINTS), p=[0.34, 0.2, 0.1, 0.1, 0.08, 0.06, 0.07, 0.05]))
        self.paint = _vec(_jitter_colour(rng, self.PAINTS[paint], 0.04))
        cap_name = paint
        if rng.random() < 0.45:
            cap_name = str(rng.choice([k for k in self.PAINTS if k != paint]))
        self.cap = _vec(_jitter_colour(rng, self.PAINTS[cap_name], 0.04))
        self.flange = self.paint if rng.random() < 0.7 else _vec(_jitter_colour(rng, (0.2, 0.2, 0.21)))
        self.chain_colour = _vec(_jitter_colour(rng, (0.35, 0.34, 0.33)))
        self.rust = _SineNoise(rng, 6.0, k=6)
        self.rust_amount = rng.uniform(0.0, 0.45) if rng.random() < 0.6 else 0.0
        self.rust_colour = _vec(_jitter_colour(rng, (0.42, 0.22, 0.1)))
        self.paint_noise = _SineNoise(rng, 3.0, k=4)
        self.specular = rng.uniform(0.2, 0.45)
        top = self.dome_y + self.dome_h + self.nut_h
        self.bound_centre = (0.0, top / 2, 0.0)
        self.bound_radius = math.hypot(top / 2, ln * 1.1 + 0.15) + 0.25
        self.params = {"paint": paint, "caps": cap_name, "nozzles": self.n_noz, "chain": self.has_chain}

    def _make_chain(self, rng: np.random.Generator) -> None:
        # Hangs from the first side nozzle's cap and sags around the front to the body.
        (ax, az), rn, ln = self.nozzles[0]
        axis = np.array([ax, 0.0, az])
        p0 = axis * (ln - 0.03) + np.array([0.0, self.yn - rn * 0.7, 0.0])
        side = 1.0 if rng.random() < 0.5 else -1.0
        front = np.array([-az, 0.0, ax]) * side
        p2 = front * self.rb + np.array([0.0, self.yn - rng.uniform(0.0, 0.12), 0.0])
        p1 = (p0 + p2) / 2
        p1[1] -= 2 * rng.uniform(0.12, 0.3)
        pts = _bezier(p0, p1, p2, 10)
        # Push links off the body so the chain hangs outside it.
        rxz = np.hypot(pts[:, 0], pts[:, 2])
        need = self.rb * (1.0 + self.taper) + 0.03
        scale = np.where(rxz < need, need / np.maximum(rxz, 1e-6), 1.0)
        pts[:, 0] *= scale
        pts[:, 2] *= scale
        self.chain_a, self.chain_b = _vec(pts[:-1]), _vec(pts[1:])
        self.chain_r = torch.full((len(pts) - 1,), float(rng.uniform(0.016, 0.024)))
        self.chain_c = pts.mean(0)
        self.chain_rad = float(np.linalg.norm(pts - pts.mean(0), axis=1).max() + 0.03)

    def _nozzles(self, p: P3) -> tuple[Tensor, Tensor]:
        x, y, z = p
        py = y - self.yn
        py2 = py * py
        noz = cap = None
        for (ax, az), rn, ln in self.nozzles:
            s = x * ax + z * az
            # Distance from the nozzle's axis: the horizontal offset across it, and the height.
            across = x * (-az) + z * ax
            radial = torch.sqrt(across * across + py2)
            n_d = _cyl_axis(radial, s - ln / 2, rn, ln / 2, 0.01)
            c_d = torch.minimum(_cyl_axis(radial, s - (ln - 0.02), rn * 1.22, 0.05, 0.015),
                                _cyl_axis(radial, s - (ln + 0.05), rn * 0.55, 0.04, 0.01))
            noz = n_d if noz is None else torch.minimum(noz, n_d)
            cap = c_d if cap is None else torch.minimum(cap, c_d)
        return noz, cap  # type: ignore[return-value]

    def _parts(self, p: P3) -> dict[str, Tensor]:
        x, y, z = p
        rb, H = self.rb, self.H
        rxz = _len2(x, z)
        r_y = rb * self.taper * (1.0 - (y * (1.0 / H)).clamp(0.0, 1.0))
        # Parts overlap well rather than touch: touching solids leave an interior seam where the union's value is
        # about 0, which surface sampling would take for surface. The body reaches into the bonnet ring, the dome
        # and the nut sink into what lies below them.
        top = H + 1.5 * self.th  # not the ring's mid-plane: Newton steps would cycle between the two
        body = _cyl_axis(rxz - r_y, y - top / 2, rb, top / 2, 0.02)
        body = _smin(body, _cyl_y(p, (0, H + self.th, 0), self.tr, self.th, 0.015), 0.02)
        if self.has_ring:
            body = _smin(body, _len2(rxz - rb * 1.02, y - self.ring_y) - 0.035, 0.03)
        flange = _cyl_y(p, (0, self.fh / 2, 0), self.fr, self.fh / 2, 0.02)
        dome = _ellipsoid(p, (0, self.dome_y, 0), (rb * 1.02, self.dome_h, rb * 1.02))
        dome = _smax(dome, (H + self.th) - y, 0.01)
        nut_lo = self.dome_y + 0.75 * self.dome_h
        nut_hi = self.dome_y + self.dome_h + self.nut_h
        nut = _cyl_y(p, (0, (nut_lo + nut_hi) / 2, 0), self.nut_r, (nut_hi - nut_lo) / 2, 0.01)
        parts = {"body": body, "flange": flange, "cap": torch.minimum(dome, nut)}
        # Nozzles live in a horizontal slab around their axis height; the slab distance bounds them outside it.
        slab = (y - self.yn).abs() - self.noz_reach
        parts["nozzle"], parts["nozzle_cap"] = self._gate(p, slab, self._nozzles, 0.04)
        if self.has_chain:
            bound = _sphere(p, self.chain_c, self.chain_rad)
            parts["chain"] = self._gate(
                p, bound, lambda q: _capsules(q, self.chain_a, self.chain_b, self.chain_r).amin(-1), 0.02)
        return parts

    def sdf(self, p: P3) -> Tensor:
        parts = self._parts(p)
        d = _smin(parts["body"], parts["flange"], 0.03)
        d = _smin(d, parts["nozzle"], 0.03)
        d = torch.minimum(d, parts["cap"])
        d = torch.minimum(d, parts["nozzle_cap"])
        if "chain" in parts:
            d = torch.minimum(d, parts["chain"])
        return d

    def albedo(self, p: P3) -> Tensor:
        parts = self._parts(p)
        names = list(parts)
        which = torch.stack([parts[k] for k in names], -1).argmin(-1)
        colours = {"body": self.paint, "nozzle": self.paint, "flange": self.flange, "cap": self.cap,
                   "nozzle_cap": self.cap, "chain": self.chain_colour}
        c = torch.stack([colours[k] for k in names])[which]
        c = c * (1.0 + 0.05 * self.paint_noise(p))[:, None]
        if self.rust_amount:
            dirt = 0.6 * (1.0 - _smoothstep(0.0, 0.4, p[1]))  # worse near the ground
            rust = (self.rust(p) - 1.0 + 1.6 * self.rust_amount + dirt).clamp(0.0, 1.0)
            c = _mix(c, self.rust_colour, rust * 0.8)
        return c


class _Teddy(_Shape):
    FURS = {
        "brown": (0.46, 0.29, 0.15), "tan": (0.76, 0.56, 0.32), "cream": (0.93, 0.88, 0.78),
        "grey": (0.6, 0.6, 0.6), "dark-brown": (0.28, 0.17, 0.09), "golden": (0.85, 0.64, 0.3),
        "pink": (0.92, 0.62, 0.68), "white": (0.96, 0.96, 0.95), "black": (0.16, 0.15, 0.15), "blue": (0.45, 0.6, 0.85),
    }

    def __init__(self, rng: np.random.Generator):
        bh = rng.uniform(0.45, 0.6)
        bw = bh * rng.uniform(0.75, 0.95)
        bd = bh * rng.uniform(0.7, 0.85)
        self.body_c, self.body_r = (0.0, bh, 0.0), (bw, bh, bd)
        hr = bh * rng.uniform(0.62, 0.9)
        hz = rng.uniform(0.0, 0.1)
        head_c = np.array([0.0, 2 * bh + hr * 0.6, hz])
        self.hr = hr
        self.head_c, self.head_r = head_c, (hr * 1.05, hr * 0.97, hr * 0.95)
        ea = math.radians(rng.uniform(28, 50))
        er = hr * rng.uniform(0.28, 0.42)
        self.ears = [head_c + hr * 0.93 * np.array([s * math.sin(ea), math.cos(ea), -0.1]) for s in (-1, 1)]
        self.ear_r = (er, er, er * 0.55)
        ms = rng.uniform(0.85, 1.15)
        self.muzzle_c = head_c + hr * np.array([0.0, -0.3, 0.72])
        self.muzzle_r = np.array([0.42, 0.32, 0.34]) * hr * ms
        self.nose_c = self.muzzle_c + hr * ms * np.array([0.0, 0.12, 0.32])
        self.nose_r = np.array([0.13, 0.085, 0.08]) * hr * ms
        eye_sep = rng.uniform(0.3, 0.42)
        eye_up = rng.uniform(0.1, 0.22)
        self.eye_r = hr * rng.uniform(0.07, 0.1)
        self.eyes = []
        for s in (-1, 1):
            d = np.array([s * eye_sep, eye_up, 0.9])
            self.eyes.append(head_c + hr * 0.9 * d / np.linalg.norm(d))
        # Limbs as capsules: arms from the shoulders, legs stretched forward (a sitting bear).
        ar = bh * rng.uniform(0.26, 0.36)
        lr = bh * rng.uniform(0.3, 0.4)
        lift = rng.uniform(-0.15, 0.45)
        spread = rng.uniform(0.0, 0.35)
        self.arms, self.legs = [], []
        for s in (-1, 1):
            self.arms.append((np.array([s * bw * 0.7, bh * 1.55, 0.0]),
                              np.array([s * (bw + ar * 0.4 + spread * 0.3), bh * (0.75 + lift),
                                        bd * rng.uniform(0.3, 0.8)]), ar))
            self.legs.append((np.array([s * bw * 0.45, lr * 1.05, bd * 0.2]),
                              np.array([s * (bw * 0.55 + spread * 0.25), lr * 0.95, bd + lr * rng.uniform(0.6, 1.1)]),
                              lr))
        self.lr = lr
        self.has_bow = rng.random() < 0.25
        self.bow_c = (0.0, 2 * bh - 0.02 + hr * 0.05, hz * 0.4)
        self.bow_R = hr * 0.72

        fur_name = str(rng.choice(list(self.FURS), p=[0.24, 0.18, 0.1, 0.1, 0.1, 0.1, 0.06, 0.05, 0.04, 0.03]))
        self.fur = _vec(_jitter_colour(rng, self.FURS[fur_name], 0.05))
        r = rng.random()
        if r < 0.6:      # lighter muzzle, paw pads and inner ears
            light = _mix(self.fur, _vec([0.97, 0.92, 0.82]), float(rng.uniform(0.4, 0.75)))
        elif r < 0.8:   # the same as the fur
            light = self.fur * 1.05
        else:          # a contrasting fabric
            light = _vec(_jitter_colour(rng, self.FURS[str(rng.choice(list(self.FURS)))], 0.05))
        self.light = light.clamp(0, 1)
        self.dark = _vec(_jitter_colour(rng, (0.05, 0.04, 0.035), 0.02, (0.9, 1.3)))
        self.nose_colour = self.dark if rng.random() < 0.75 else _vec(_jitter_colour(rng, (0.45, 0.25, 0.2)))
        self.bow_colour = _vec(_jitter_colour(rng, [(0.8, 0.1, 0.12), (0.2, 0.3, 0.8), (0.95, 0.5, 0.7),
                                                    (0.95, 0.8, 0.2)][int(rng.integers(0, 4))]))
        self.fur_fine = _SineNoise(rng, 60.0, k=6)
        self.fur_coarse = _SineNoise(rng, 3.0, k=3)
        self.fur_amp = rng.uniform(0.03, 0.08)
        self.specular = 0.0
        top = float(head_c[1] + hr + er * 2)
        self.bound_centre = (0.0, top / 2, 0.2)
        self.bound_radius = math.hypot(top / 2, bw + ar + 0.5) + 0.4
        self.params = {"fur": fur_name, "bow": self.has_bow}

    def _face(self, p: P3) -> tuple[Tensor, Tensor, Tensor]:
        muzzle = _ellipsoid(p, self.muzzle_c, self.muzzle_r)
        nose = _ellipsoid(p, self.nose_c, self.nose_r)
        eyes = torch.minimum(_sphere(p, self.eyes[0], self.eye_r), _sphere(p, self.eyes[1], self.eye_r))
        return muzzle, nose, eyes

    def _parts(self, p: P3) -> dict[str, Tensor]:
        limbs = [_capsule(p, a, b, r) for a, b, r in self.arms + self.legs]
        parts = {
            "body": _ellipsoid(p, self.body_c, self.body_r),
            "head": _ellipsoid(p, self.head_c, self.head_r),
            "ears": torch.minimum(_ellipsoid(p, self.ears[0], self.ear_r), _ellipsoid(p, self.ears[1], self.ear_r)),
            "arms": torch.minimum(limbs[0], limbs[1]),
            "legs": torch.minimum(limbs[2], limbs[3]),
        }
        # The face is small and on the front of the head: evaluate it only there, in one gated call.
        bound = _sphere(p, self.head_c, self.hr * 1.45)
        muzzle, nose, eyes = self._gate(p, bound, self._face, 0.07)
        parts.update(muzzle=muzzle, nose=nose, eyes=eyes)
        if self.has_bow:
            parts["bow"] = _torus_y(p, self.bow_c, self.bow_R, 0.06)
        return parts

    def _combine(self, parts: dict[str, Tensor]) -> Tensor:
        d = _smin(parts["body"], parts["head"], 0.12)
        d = _smin(d, parts["arms"], 0.08)
        d = _smin(d, parts["legs"], 0.08)
        d = _smin(d, parts["ears"], 0.05)
        d = _smin(d, parts["muzzle"], 0.06)
        d = torch.minimum(d, parts["nose"])
        d = torch.minimum(d, parts["eyes"])
        if "bow" in parts:
            d = torch.minimum(d, parts["bow"])
        return d

    def sdf(self, p: P3) -> Tensor:
        return self._combine(self._parts(p))

    def albedo(self, p: P3) -> Tensor:
        parts = self._parts(p)
        n = p[0].shape[0]
        fine = self.fur_fine(p)
        fur = self.fur * (1.0 + self.fur_amp * fine + 0.04 * self.fur_coarse(p))[:, None]
        light = self.light * (1.0 + 0.5 * self.fur_amp * fine)[:, None]
        eps = 0.02
        # Inner ears: the front of each ear's disc.
        ear_front = torch.zeros(n, dtype=torch.bool)
        for e in self.ears:
            qx, qy, qz = p[0] - e[0], p[1] - e[1], p[2] - e[2]
            ear_front |= (qz > 0) & (_len2(qx, qy) < self.ear_r[0] * 0.7)
        inner_ear = (parts["ears"] < parts["head"] - eps) & ear_front
        # Off the face the muzzle's value is its gate's bound, which can undercut head and body on an arm: ask for
        # a point on the muzzle itself.
        muzzle = (parts["muzzle"] < eps) & (parts["muzzle"] < parts["head"] + 0.01)
        # Paw pads: the tips of the feet.
        pad = torch.zeros(n, dtype=torch.bool)
        for _, f, _ in self.legs:
            qx, qy, qz = p[0] - f[0], p[1] - f[1], p[2] - f[2]
            pad |= (qz > self.lr * 0.35) & (_len3(qx, qy, qz) < self.lr * 1.3)
        pad &= parts["legs"] < parts["body"]
        c = torch.where((inner_ear | muzzle | pad)[:, None], light, fur)
        c = torch.where((parts["nose"] < eps)[:, None], self.nose_colour.expand_as(c), c)
        c = torch.where((parts["eyes"] < eps)[:, None], self.dark.expand_as(c), c)
        if "bow" in parts:
            c = torch.where((parts["bow"] < eps)[:, None], self.bow_colour.expand_as(c), c)
        return c


_SHAPES: dict[str, type[_Shape]] = {"apple": _Apple, "donut": _Donut, "hydrant": _Hydrant, "teddybear": _Teddy}


# ====================================================================== the normalised object

@contextmanager
def _gates_widened(shape: _Shape, extra: float, shading: bool = False):
    """Temporarily widens every gate of ``shape`` by ``extra`` (see ``_Shape.gate_extra`` and ``_Shape.shading``)."""
    before = shape.gate_extra, shape.shading
    shape.gate_extra, shape.shading = extra, shading
    try:
        yield
    finally:
        shape.gate_extra, shape.shading = before


class ProceduralObject:
    """One procedural object in the CO3D-like world frame (up = ``WORLD_UP``, centred, unit surface spread).

    Attributes:
        category: one of ``CATEGORIES``.
        seed: the integer it was made from.
        bounding_radius: radius of a sphere about the origin that holds the whole surface (world units).
        specular: strength of the highlight the renderer adds (0 for fur).
        params: the main discrete draws (colour family, parts present), for logs and tests.
    """

    def __init__(self, category: str, seed: int, shape: _Shape, cells: int = 48):
        self.category = category
        self.seed = int(seed)
        self._shape = shape
        self.specular = float(shape.specular)
        self.params = dict(shape.params)
        # Normalise on a band of grid points around the surface: keeping every grid point within one cell of the
        # zero set gives about equal volume per unit area, so the band's mean and spread are the surface's.
        c0 = np.asarray(shape.bound_centre, dtype=np.float32)
        r0 = float(shape.bound_radius)
        lin = torch.linspace(-r0, r0, cells + 1, dtype=_F)
        cell = float(lin[1] - lin[0])
        gx, gy, gz = torch.meshgrid(lin + float(c0[0]), lin + float(c0[1]), lin + float(c0[2]), indexing="ij")
        g = (gx.reshape(-1), gy.reshape(-1), gz.reshape(-1))
        # Gates widened past the band's width: a gate's stand-in value is then never taken for a band point.
        with _gates_widened(shape, 2.0 * cell):
            near = (shape.sdf(g).abs() < cell).nonzero().squeeze(1)
        band = torch.stack([v.index_select(0, near) for v in g], -1)
        if band.shape[0] < 10:
            raise RuntimeError(f"{category} seed {seed}: the surface missed the normalisation grid")
        if float((band - torch.from_numpy(c0)).norm(dim=-1).max()) > r0 - 1.5 * cell:
            raise RuntimeError(f"{category} seed {seed}: the surface reaches the edge of its design bound")
        centre = band.mean(0)
        scale = 1.0 / float(band.var(0).mean().sqrt())
        # Any surface point lies within half a cell diagonal of a band point; add that and a margin.
        radius = float((band - centre).norm(dim=-1).max()) + cell * 0.87 + 0.02
        # design = world * (turn / scale) + centre, with turn = diag(1, -1, -1) (half a turn about X).
        self._scale = scale
        self._centre = tuple(float(v) for v in centre)
        self._mul = (1.0 / scale, -1.0 / scale, -1.0 / scale)
        self.bounding_radius = radius * scale
        self._cell = cell * scale
        self._band = (band - centre) * torch.tensor([scale, -scale, -scale])

    def __repr__(self) -> str:
        return (f"ProceduralObject({self.category!r}, seed={self.seed}, "
                f"bounding_radius={self.bounding_radius:.2f}, params={self.params})")

    def _design(self, x: Tensor, y: Tensor, z: Tensor) -> P3:
        m, c = self._mul, self._centre
        return x * m[0] + c[0], y * m[1] + c[1], z * m[2] + c[2]

    def sdf_xyz(self, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        """``sdf`` on points given as three 1-D tensors (the renderer's fast path)."""
        return self._shape.sdf(self._design(x, y, z)) * self._scale

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance (N,) of world points (N,3), negative inside; exact or a close lower bound near the surface."""
        p = points.to(_F)
        return self.sdf_xyz(p[:, 0], p[:, 1], p[:, 2])

    def albedo(self, points: Tensor) -> Tensor:
        """Surface colour (N,3) in [0,1] at world points (N,3); meaningful on and near the surface."""
        p = points.to(_F)
        return self._shape.albedo(self._design(p[:, 0], p[:, 1], p[:, 2])).clamp(0.0, 1.0)

    def project_to_surface(self, points: Tensor, steps: int = 10) -> Tensor:
        """Damped Newton steps along the SDF gradient, p <- p - f grad / max(|grad|^2, |grad| / 1.5).

        Plain Newton (divide by |grad|^2) lands on the zero set in a step or two where the field is a true distance,
        but flies off where the gradient is weak (inside smooth intersections, on approximate ellipsoids); the damping
        keeps every step within 1.5 |f|, which a distance bound allows.
        """
        p = points.to(_F).detach()
        with _gates_widened(self._shape, math.inf):
            for _ in range(steps):
                p = p.clone().requires_grad_(True)
                with torch.enable_grad():
                    f = self.sdf(p)
                    (grad,) = torch.autograd.grad(f.sum(), p)
                gn = grad.norm(dim=-1)
                denom = torch.maximum(gn * gn, gn / 1.5).clamp_min(1e-8)
                p = (p - (f / denom)[:, None] * grad).detach()
        return p

    def sample_surface(self, n: int, generator: torch.Generator | None = None,
                       tolerance: float = 2e-4) -> tuple[Tensor, Tensor]:
        """``n`` points on the surface, about uniform per unit area, with their albedo.

        Points start spread uniformly over the cells of the normalisation band, which holds equal volume inside and
        outside the surface (so convex and concave parts get their share), are projected onto the zero set, and are
        kept only if ``|sdf| < tolerance`` afterwards.

        Returns:
            points (n,3) and colours (n,3) in [0,1], float32.
        """
        if n <= 0:
            return torch.zeros(0, 3), torch.zeros(0, 3)
        kept: list[Tensor] = []
        total = 0
        for _ in range(20):
            m = int((n - total) * 1.1) + 64
            idx = torch.randint(0, self._band.shape[0], (m,), generator=generator)
            # A start that fails (stalled inside a thin part) is retried from elsewhere in the same cell, so that no
            # region loses its share of points.
            for _attempt in range(4):
                jitter = (torch.rand(idx.shape[0], 3, generator=generator) - 0.5) * self._cell
                p = self.project_to_surface(self._band[idx] + jitter)
                with torch.no_grad():
                    ok = (self.sdf(p).abs() < tolerance) & torch.isfinite(p).all(-1)
                kept.append(p[ok])
                total += int(ok.sum())
                idx = idx[~ok]
                if idx.numel() == 0:
                    break
            if total >= n:
                break
        # The retried points were appended after the first pass: shuffle so that a prefix is not biased.
        pts = torch.cat(kept)
        pts = pts[torch.randperm(pts.shape[0], generator=generator)][:n]
        if pts.shape[0] < n:
            raise RuntimeError(f"{self!r}: could only project {pts.shape[0]} of {n} points onto the surface")
        with torch.no_grad():
            return pts, self.albedo(pts)


def make_object(category: str, seed: int) -> ProceduralObject:
    """The procedural object of ``category`` made from ``seed``; the same pair always gives the same object."""
    if category not in _SHAPES:
        raise UserError(f"unknown category {category!r}; accepted categories are {', '.join(CATEGORIES)}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, CATEGORIES.index(category)])
    with torch.no_grad():
        return ProceduralObject(category, seed, _SHAPES[category](rng))


# ====================================================================== renderer

@dataclass
class Light:
    """One directional light plus ambient light, fixed in the world (in a CO3D video the room does not move)."""

    direction: tuple[float, float, float] = (0.35, -0.85, 0.4)
    """World direction from the object towards the light; the default is above (up is -Y) and to one side."""
    ambient: float = 0.42
    """Ambient intensity, scaled by ambient occlusion and a slight sky/ground tint along WORLD_UP."""
    diffuse: float = 0.7
    """Intensity of the Lambertian term."""
    fill: float = 0.2
    """A shadowless Lambertian fill light from the opposite side, so the side away from the key light is not flat
    ambient (rooms bounce light back)."""
    shadows: bool = True
    """Trace one shadow ray per lit pixel, with a soft penumbra."""
    softness: float = 10.0
    """Penumbra sharpness k in min(k h / t) along the shadow ray; larger is harder."""


def random_light(generator: torch.Generator) -> Light:
    """A light from 15..75 degrees above the horizon at any azimuth, of varied strength, drawn from ``generator``."""
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    az = 2 * math.pi * u[0]
    el = math.radians(15 + 60 * u[1])
    up = np.asarray(WORLD_UP)
    a = np.array([1.0, 0.0, 0.0])
    b = np.cross(up, a)
    d = math.cos(el) * (math.cos(az) * a + math.sin(az) * b) + math.sin(el) * up
    return Light(direction=(float(d[0]), float(d[1]), float(d[2])), ambient=0.36 + 0.12 * u[2],
                 diffuse=0.6 + 0.2 * u[3], fill=0.12 + 0.15 * u[1])


@dataclass
class TraceConfig:
    """Sphere-tracing limits and shading samples."""

    max_steps: int = 64
    """Steps before a ray is given up; rays still marching then (grazing a silhouette) count as near misses."""
    hit_fraction: float = 0.02
    """A ray hits when the SDF falls below this fraction of its pixel footprint at that distance."""
    compact_every: int = 3
    """Drop finished rays from the active set every this many steps (each compaction costs a gather)."""
    shadow_steps: int = 32
    """Steps of a shadow ray; it stops early once fully shadowed or out of the bounding sphere."""
    ao_samples: int = 3
    """SDF samples along the normal for ambient occlusion (0 disables it)."""


def _trace(obj: ProceduralObject, o: P3, u: P3, t0: Tensor, t1: Tensor, footprint: Tensor,
           cfg: TraceConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Sphere-traces unit-direction rays o + t u from t0 to t1 (all (M,)).

    Returns:
        hit (M,) bool; t (M,) at the hit, or for misses at the closest approach; ratio (M,): for misses the smallest
        SDF / pixel-footprint seen along the ray (how near the ray passed, in pixels), 0 for hits.
    """
    m = t0.shape[0]
    hit = torch.zeros(m, dtype=torch.bool)
    t_out = t1.clone()
    ratio_out = torch.full((m,), float("inf"))
    idx = torch.arange(m)
    # State of the active rays: origin, direction, footprint per unit t, exit t, current t, closest ratio and its t.
    ox, oy, oz = o
    ux, uy, uz = u
    fp, tmax, t = footprint, t1, t0.clone()
    best_r = torch.full((m,), float("inf"))
    best_t = t0.clone()
    for step in range(cfg.max_steps):
        d = obj.sdf_xyz(ox + ux * t, oy + uy * t, oz + uz * t)
        w = t * fp
        r = d / w
        better = r < best_r
        best_r = torch.where(better, r, best_r)
        best_t = torch.where(better, t, best_t)
        conv = r < cfg.hit_fraction
        # Converged rays stop moving until the next compaction removes them.
        t = torch.where(conv, t, t + d)
        last = step == cfg.max_steps - 1
        if (step + 1) % cfg.compact_every and not last:
            continue
        done = (conv | (t > tmax)) if not last else torch.ones_like(conv)
        di = done.nonzero().squeeze(1)
        if di.numel() == 0:
            continue
        gi = idx.index_select(0, di)
        cd = conv.index_select(0, di)
        hit.index_copy_(0, gi, cd)
        t_out.index_copy_(0, gi, torch.where(cd, t.index_select(0, di), best_t.index_select(0, di)))
        ratio_out.index_copy_(0, gi, torch.where(cd, torch.zeros(()), best_r.index_select(0, di)))
        ki = (~done).nonzero().squeeze(1)
        if ki.numel() == 0:
            break
        idx, ox, oy, oz, ux, uy, uz, fp, tmax, t, best_r, best_t = (
            v.index_select(0, ki) for v in (idx, ox, oy, oz, ux, uy, uz, fp, tmax, t, best_r, best_t))
    return hit, t_out, ratio_out


# Tetrahedron vertices for 4-sample finite-difference normals.
_TETRA = ((1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, 1.0, 1.0))


def _normals(obj: ProceduralObject, p: P3, h: float) -> P3:
    """Tetrahedral finite differences (4 SDF samples, one batched call) -> unit normals."""
    n = p[0].shape[0]
    q = [torch.cat([p[i] + h * k[i] for k in _TETRA]) for i in range(3)]
    d = obj.sdf_xyz(*q).reshape(4, n)
    g = [sum(_TETRA[j][i] * d[j] for j in range(4)) for i in range(3)]
    inv = 1.0 / _len3(*g).clamp_min(1e-12)  # type: ignore[arg-type]
    return g[0] * inv, g[1] * inv, g[2] * inv  # type: ignore[return-value]


def _soft_shadow(obj: ProceduralObject, p: P3, l: tuple[float, float, float], t_max: float, steps: int,
                 softness: float) -> Tensor:
    """Penumbra estimate along one ray towards the light; 1 = fully lit.

    Quilez's improved soft shadow: the nearest occluder is estimated from two consecutive SDF samples (h_prev, h) by
    triangulation, y = h^2 / (2 h_prev), d = sqrt(h^2 - y^2), and the penumbra is min(k d / (t - y)). The plain
    min(k h / t) bands visibly where an SDF underestimates distance (smooth unions, warped shapes), this does not.
    """
    m = p[0].shape[0]
    res = torch.ones(m)
    idx = torch.arange(m)
    px, py, pz = p
    t = torch.full((m,), 0.03)
    h_prev = torch.full((m,), 1e10)
    r_act = torch.ones(m)
    for step in range(steps):
        h = obj.sdf_xyz(px + l[0] * t, py + l[1] * t, pz + l[2] * t)
        y = (h * h / (2.0 * h_prev)).clamp_max(h.abs())
        d = torch.sqrt((h * h - y * y).clamp_min(0.0))
        r_act = torch.minimum(r_act, (softness * d / (t - y).clamp_min(1e-4)).clamp(0.0, 1.0))
        r_act = torch.where(h < 1e-4, torch.zeros_like(r_act), r_act)
        h_prev = h.clamp_min(1e-6)
        t = t + h.clamp(0.005, 0.4)
        done = (r_act < 0.01) | (t > t_max)
        if step == steps - 1:
            done = torch.ones_like(done)
        di = done.nonzero().squeeze(1)
        if di.numel():
            res.index_copy_(0, idx.index_select(0, di), r_act.index_select(0, di))
            ki = (~done).nonzero().squeeze(1)
            if ki.numel() == 0:
                break
            idx, px, py, pz, t, r_act, h_prev = (
                v.index_select(0, ki) for v in (idx, px, py, pz, t, r_act, h_prev))
    return res * res * (3.0 - 2.0 * res)


def _ambient_occlusion(obj: ProceduralObject, p: P3, n: P3, samples: int, scale: float) -> Tensor:
    """Occlusion from a few SDF samples along the normal (Quilez): creases such as neck and limb joints darken."""
    m = p[0].shape[0]
    if samples <= 0:
        return torch.ones(m)
    hs = [scale * (0.05 + 0.3 * j / max(samples - 1, 1)) for j in range(samples)]
    q = [torch.cat([p[i] + n[i] * h for h in hs]) for i in range(3)]
    d = obj.sdf_xyz(*q).reshape(samples, m)
    occ = sum((hs[j] - d[j]).clamp_min(0.0) * (0.5 ** j) for j in range(samples))
    return (1.0 - 2.0 / scale * occ).clamp(0.0, 1.0)  # type: ignore[operator]


def render_views(obj: ProceduralObject, cameras: PerspectiveCamera, light: Light | None = None,
                 generator: torch.Generator | None = None, config: TraceConfig | None = None,
                 chunk_views: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """Renders ``obj`` from a batch of V cameras (Lambert + ambient + soft shadow, highlights where shiny).

    Speed: run it with ``torch.set_num_threads(1)`` and one process per core. Its tensors are small (one element per
    active ray), so intra-op threads buy little, and on a busy 2-core machine two threads made it 20 to 40 times
    slower (threads spinning while another process holds the core).

    Args:
        obj: the object.
        cameras: V cameras sharing one image size (H, W).
        light: the light; None draws one from ``generator`` when given, else uses ``Light()``.
        generator: used only to draw the light when ``light`` is None.
        config: tracing limits.
        chunk_views: views traced together: all views of a chunk are one vectorised trace; chunks bound memory.
    Returns:
        images (V,H,W,3) in [0,1] composited on white; masks (V,H,W) in [0,1], 1 where the pixel-centre ray hits and
        fractional on silhouette edges (from how close a missing ray passed); depth (V,H,W): z-depth along the
        optical axis wherever the mask is > 0 (at the hit, or at the closest approach for edge pixels), else 0.
        Where the mask is 0 the image is exactly 1.
    """
    if light is None:
        light = random_light(generator) if generator is not None else Light()
    cfg = config or TraceConfig()
    outs = [_render_chunk(obj, cameras[i:i + chunk_views], light, cfg) for i in range(0, len(cameras), chunk_views)]
    images, masks, depths = (torch.cat(x) for x in zip(*outs))
    return images, masks, depths


def _diffuse_light(obj: ProceduralObject, p: P3, n: P3, light: Light, cfg: TraceConfig,
                   radius: float) -> tuple[Tensor, Tensor]:
    """The light a surface point receives and sends out evenly (ambient with occlusion, key light with its soft
    shadow, fill): multiplied by the albedo it is the view-independent colour a camera sees there. Also returns the
    key light's shadowed Lambert term, which scales the highlight."""
    lx, ly, lz = (float(c) for c in np.asarray(light.direction) / np.linalg.norm(light.direction))
    lam = (n[0] * lx + n[1] * ly + n[2] * lz).clamp_min(0.0)
    # Shadows and occlusion read distances well away from the surface: widen the gates (0.3 design units is about
    # half a world unit) so that stand-in values there are large enough not to darken anything.
    with _gates_widened(obj._shape, 0.3, shading=True):
        if light.shadows:
            li = (lam > 0).nonzero().squeeze(1)
            if li.numel():
                start = tuple(p[i].index_select(0, li) + n[i].index_select(0, li) * 0.02 for i in range(3))
                sh = _soft_shadow(obj, start, (lx, ly, lz), 2.0 * radius, cfg.shadow_steps,  # type: ignore
                                  light.softness)
                lam = lam.index_copy(0, li, lam.index_select(0, li) * sh)
        ao = _ambient_occlusion(obj, p, n, cfg.ao_samples, 0.5)  # type: ignore[arg-type]
    sky = 0.8 + 0.2 * (n[0] * WORLD_UP[0] + n[1] * WORLD_UP[1] + n[2] * WORLD_UP[2])
    # The fill comes from the key light's direction mirrored through the up axis, lifted a little.
    up_dot = lx * WORLD_UP[0] + ly * WORLD_UP[1] + lz * WORLD_UP[2]
    fl = [-(c - up_dot * u_) + 0.5 * u_ for c, u_ in zip((lx, ly, lz), WORLD_UP)]
    fn = math.sqrt(sum(c * c for c in fl)) or 1.0
    fill = (n[0] * (fl[0] / fn) + n[1] * (fl[1] / fn) + n[2] * (fl[2] / fn)).clamp_min(0.0)
    return light.ambient * ao * sky + light.diffuse * lam + light.fill * fill, lam


@torch.no_grad()
def observed_colours(obj: ProceduralObject, points: Tensor, light: Light, config: TraceConfig | None = None) -> Tensor:
    """(N, 3) surface points -> the colours the renderer gives them under ``light`` without the highlight: albedo
    times the light received (shadows, occlusion and fill included), in [0, 1].

    This is what a CO3D point cloud's colours are: photogrammetry reads them off the video frames, so they carry the
    room's shading; the specular highlight, which moves with the camera, is left out as a median over views leaves
    it out.
    """
    cfg = config or TraceConfig()
    p = tuple(points[:, i].to(_F) for i in range(3))
    n = _normals(obj, p, 1e-3)  # type: ignore[arg-type]
    alb = obj._shape.albedo(obj._design(*p)).clamp(0.0, 1.0)  # type: ignore[misc]
    shade, _ = _diffuse_light(obj, p, n, light, cfg, obj.bounding_radius)
    return (alb * shade[:, None]).clamp(0.0, 1.0).float()


@torch.no_grad()
def _render_chunk(obj: ProceduralObject, cameras: PerspectiveCamera, light: Light,
                  cfg: TraceConfig) -> tuple[Tensor, Tensor, Tensor]:
    h, w = cameras.image_size
    v = len(cameras)
    cams = cameras.to(dtype=_F)
    o, d = cams.rays()
    fx, fy, _, _ = cams.pixel_intrinsics()
    f_px = ((fx + fy) / 2)[:, None].expand(v, h * w).reshape(-1)
    ox, oy, oz = (o[..., i].reshape(-1) for i in range(3))
    dx, dy, dz = (d[..., i].reshape(-1) for i in range(3))
    dn = _len3(dx, dy, dz)
    inv = 1.0 / dn
    ux, uy, uz = dx * inv, dy * inv, dz * inv
    # A pixel at z-depth z spans z / f_px; along the unit ray z = t / |d|.
    footprint = inv / f_px
    m = dn.shape[0]

    # Only rays that cross the bounding sphere are traced, from where they enter it to where they leave.
    radius = obj.bounding_radius
    b = ox * ux + oy * uy + oz * uz
    disc = b * b - (ox * ox + oy * oy + oz * oz - radius * radius)
    crosses = (disc > 0) & (torch.sqrt(disc.clamp_min(0.0)) - b > 0)
    ci = crosses.nonzero().squeeze(1)

    def sel(x: Tensor, idx: Tensor) -> Tensor:
        return x.index_select(0, idx)

    sq = torch.sqrt(sel(disc, ci))
    t0 = (-sel(b, ci) - sq).clamp_min(1e-3)
    t1 = -sel(b, ci) + sq
    o_c = (sel(ox, ci), sel(oy, ci), sel(oz, ci))
    u_c = (sel(ux, ci), sel(uy, ci), sel(uz, ci))
    hit, t, ratio = _trace(obj, o_c, u_c, t0, t1, sel(footprint, ci), cfg)

    # Coverage: 1 for hits; a near miss that passed s pixel widths from the surface gets 0.5 - s, the share of a
    # pixel that a straight edge s pixels from its centre covers.
    cover = torch.where(hit, torch.ones_like(t), (0.5 - ratio).clamp(0.0, 0.5))
    si = (cover > 0).nonzero().squeeze(1)
    rays = sel(ci, si)
    ts = sel(t, si)
    cov = sel(cover, si)
    us = tuple(sel(c, si) for c in u_c)
    p = tuple(sel(o_c[i], si) + us[i] * ts for i in range(3))
    n = _normals(obj, p, 1e-3)  # type: ignore[arg-type]
    alb = obj._shape.albedo(obj._design(*p)).clamp(0.0, 1.0)  # type: ignore[misc]
    lx, ly, lz = (float(c) for c in np.asarray(light.direction) / np.linalg.norm(light.direction))
    shade, lam = _diffuse_light(obj, p, n, light, cfg, radius)
    col = alb * shade[:, None]
    if obj.specular > 0:
        # Blinn-Phong with the half vector between the light and the eye (-u).
        hx, hy, hz = lx - us[0], ly - us[1], lz - us[2]
        ndh = (n[0] * hx + n[1] * hy + n[2] * hz) / _len3(hx, hy, hz).clamp_min(1e-6)
        spec = obj.specular * ndh.clamp_min(0.0) ** 24 * lam.clamp(0.0, 1.0).sqrt()
        col = col + spec[:, None]
    col = col.clamp(0.0, 1.0)

    alpha = torch.zeros(m).index_copy(0, rays, cov)
    rgb = torch.ones(m, 3).index_copy(0, rays, col * cov[:, None] + (1.0 - cov[:, None]))
    depth = torch.zeros(m).index_copy(0, rays, ts * sel(inv, rays))
    return rgb.reshape(v, h, w, 3), alpha.reshape(v, h, w), depth.reshape(v, h, w)


# ====================================================================== cameras for a synthetic sequence

@dataclass
class SequenceCameraConfig:
    """How a synthetic CO3D-like video moves around its object (angles in degrees, distances in world units)."""

    elevation_deg: tuple[float, float] = (-10.0, 50.0)
    """Hard range of elevation above the horizon (the plane orthogonal to WORLD_UP); views are clamped to it."""
    base_elevation_deg: tuple[float, float] = (0.0, 40.0)
    """Range of a sequence's mean elevation; each view wobbles around it like a hand-held walk-around."""
    elevation_wobble_deg: float = 10.0
    """Per-view elevation change about the sequence's mean, uniform in +-this."""
    distance: tuple[float, float] = (6.0, 12.0)
    """Range of a sequence's mean camera distance from the origin."""
    distance_wobble: float = 0.1
    """Per-view relative change of distance, uniform in +-this."""
    fill: tuple[float, float] = (0.65, 0.95)
    """Per-view range of the fraction of the half-frame (short side) that the bounding sphere spans; sets the focal.
    The silhouette is smaller than the sphere: its larger side then spans about 50 to 85 % of the frame."""
    azimuth_jitter: float = 0.5
    """Per-view azimuth jitter as a fraction of the even spacing 360/n over the full circle."""
    roll_deg: float = 3.0
    """Camera roll, uniform in +-this (hand-held)."""
    at_jitter: float = 0.03
    """Look-at point offset per axis, as a fraction of the bounding radius."""


def _derived_generator(seed: int, salt: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF, salt]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed((int(state[0]) << 31) | (int(state[1]) >> 1))
    return g


def sequence_cameras(obj_seed: int, n_views: int, image_size_hw=(128, 128), bounding_radius: float = 2.0,
                     config: SequenceCameraConfig | None = None,
                     generator: torch.Generator | None = None) -> PerspectiveCamera:
    """The ``n_views`` cameras (float32) of one synthetic video around an object of ``bounding_radius``.

    Azimuths go once around the full circle in order (a walk around the object), jittered; elevation, distance and
    roll vary per view around per-sequence values; the focal length is set per view so the bounding sphere spans a
    ``fill`` fraction of the half-frame, which keeps the object in view. Draws come from ``generator`` or, by default,
    from one derived from ``obj_seed`` and a salt (independent of the object's own draws).
    """
    if n_views <= 0:
        raise ValueError(f"need at least one view; got n_views={n_views}")
    cfg = config or SequenceCameraConfig()
    g = generator if generator is not None else _derived_generator(obj_seed, 0xCA3E7A)
    n = n_views
    f64 = torch.float64

    def uni(lo: float, hi: float, size: int = n) -> Tensor:
        return lo + (hi - lo) * torch.rand(size, generator=g, dtype=f64)

    az0 = float(uni(0.0, 2 * math.pi, 1))
    direction = 1.0 if float(uni(0.0, 1.0, 1)) < 0.5 else -1.0
    step = 2 * math.pi / n
    az = az0 + direction * (torch.arange(n, dtype=f64) + uni(-0.5, 0.5) * cfg.azimuth_jitter) * step
    el_mean = float(uni(*cfg.base_elevation_deg, 1))
    el = (el_mean + uni(-1.0, 1.0) * cfg.elevation_wobble_deg).clamp(*cfg.elevation_deg)
    dist = float(uni(*cfg.distance, 1)) * (1.0 + uni(-1.0, 1.0) * cfg.distance_wobble)
    dist = dist.clamp_min(bounding_radius * 1.5)
    fill = uni(*cfg.fill)
    roll = torch.deg2rad(uni(-1.0, 1.0) * cfg.roll_deg)
    at = (torch.rand(n, 3, generator=g, dtype=f64) * 2 - 1) * (cfg.at_jitter * bounding_radius)

    up = torch.tensor(WORLD_UP, dtype=f64)
    a = torch.tensor([1.0, 0.0, 0.0], dtype=f64)
    b = torch.linalg.cross(up, a, dim=0)
    elr = torch.deg2rad(el)
    dirs = (torch.cos(elr) * torch.cos(az))[:, None] * a + (torch.cos(elr) * torch.sin(az))[:, None] * b \
        + torch.sin(elr)[:, None] * up
    eye = at + dist[:, None] * dirs
    # Tilting the up vector about the viewing direction rolls the camera.
    fwd = torch.nn.functional.normalize(at - eye, dim=-1)
    side = torch.nn.functional.normalize(torch.linalg.cross(up.expand_as(fwd), fwd, dim=-1), dim=-1)
    ups = torch.cos(roll)[:, None] * up + torch.sin(roll)[:, None] * side
    # The bounding sphere, seen from the eye, has half-angle asin(R / |eye|); a focal f maps tan of that angle to
    # f * tan in NDC, so f = fill / tan(half-angle). Measured from the sphere's centre, which is the origin.
    half_angle = torch.asin((bounding_radius / eye.norm(dim=-1)).clamp(max=0.99))
    focal = fill / torch.tan(half_angle)
    cams = [PerspectiveCamera.look_at(eye[i:i + 1], at[i:i + 1], ups[i], focal[i:i + 1], image_size_hw)
            for i in range(n)]
    return PerspectiveCamera.stack(cams).to(dtype=_F)
