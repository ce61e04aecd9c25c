"""Evaluating HoloDiffusion: surfaces of generated grids, point-set distances, and the generative metrics.

`holofusion sample` writes grids and turntables of chosen seeds; `holofusion evaluate` compares many samples of a
category with its held-out objects.

Surfaces (``surface_points``). A sample is a density field, not a point set. The field is evaluated on a lattice of
L^3 vertices over the grid's box and the surface is its level set sigma = sigma*, where sigma* = ln 2 / l makes a
slab of thickness l (``SurfaceConfig.opacity_length``, a fixed world length) absorb half the light: "half opaque at
the scale l". The level is a fixed number of world units, not one lattice step, so the surface does not move when
the lattice is refined, and the same level serves models of any grid size. Points are the crossings of the level on
lattice edges (linear interpolation along the edge: the vertices marching cubes would place), drawn at random with
weight 1 / |n|_1 (n the unit normal from the density gradient): an axis-aligned lattice meets a surface patch of unit
normal n in |n_x| + |n_y| + |n_z| crossings per unit area, so these weights make the draw uniform over the area,
like the ground-truth point clouds (``ProceduralObject.sample_surface``). Colour is the decoder's rendered colour
averaged over view directions (``Decoder.mean_colour``) at each point, as the baked textures have it: the colour
head alone leaves out the view branch's residual, which carries much of a trained model's colour. This was
preferred over unprojecting rendered depth maps: a 64^3 lattice needs about a tenth of the field evaluations of
rendering enough views, the result does not depend on a choice of views, and occluded parts (a donut's hole) are
not missed. A field with no crossing (nothing above the level, or everything)
is an *empty* sample.

Distances (``chamfer_matrix``). The Chamfer distance as PointFlow (Yang et al. 2019) evaluates it: squared Euclidean
distances, each point to its nearest neighbour in the other set, averaged per direction and the two means summed.
Computed twice per pair: on positions only ("geometry") and on 6-D points (x, y, z, w r, w g, w b) ("coloured").
The colour weight w is chosen from the references (``colour_weight_for``) so that, between the held-out objects,
colour differences and shape differences contribute equally to the coloured distance: it is in world units per unit
of RGB, so it follows the world's scale, and it keeps either aspect from drowning the other (scaling colour by the
object's size instead made the coloured distance between procedural apples 97% colour). The JSON records w;
``--colour-weight`` fixes it to compare runs on different data. An empty sample is at distance +inf from every
non-empty set and at 0 from another empty sample.

Metrics (PointFlow, sec. 5; the usual ones for 3D generators), for a distance d, samples S and references R:
- COV: the fraction of references that are the nearest reference of at least one sample (higher is better);
- MMD: the mean over references of the distance to the nearest sample (lower is better);
- 1-NNA: the leave-one-out accuracy of the 1-nearest-neighbour classifier on S u R with labels "sample" /
  "reference" (50% is ideal; 100% means the two are told apart; below 50% means samples sit on top of references,
  e.g. copies: a sample set equal to the references scores 0%). An empty sample is always told apart;
- diversity ratio: the mean pairwise distance among samples over the mean among references (1 is ideal; well below
  1 is collapse).
FID/KID on renders need an Inception-v3 network and its weights; this version has no such extractor (see
``FID_NOTE``, ``check_inception``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .colour import colour_map_of, map_decoder
from .errors import UserError
from .frame import frame_of, frame_record, place_in_frame, surface_frame
from .grid import VoxelGrid
from .nets.decoder import Decoder
from .render import activate_density
from .weights import atomic_torch_save

__all__ = [
    "SurfaceConfig",
    "ColouredPoints",
    "density_level",
    "density_lattice",
    "level_set_points",
    "surface_points",
    "model_surface_points",
    "training_categories",
    "training_reconstructions",
    "chamfer_pairs",
    "chamfer_matrix",
    "colour_weight_for",
    "matched_colour_error",
    "rms_radius",
    "coverage",
    "minimum_matching_distance",
    "one_nn_accuracy",
    "mean_pairwise",
    "generative_metrics",
    "reference_points",
    "turntable_settings",
    "check_inception",
    "write_samples",
    "evaluate_model",
    "format_table",
    "FID_NOTE",
]

FID_NOTE = "no Inception weights given (--inception PATH.safetensors); none can be downloaded here"
INCEPTION_UNSUPPORTED = ("FID/KID need an Inception-v3 feature extractor, which is not supported in this version "
                         "(torchvision is not a dependency and no reference weights exist here to verify one "
                         "against); run without --inception: the other metrics do not need it")


# ==================================================================================================================
# surfaces


@dataclass
class SurfaceConfig:
    """How a grid's surface is turned into a coloured point set."""

    lattice: int = 64
    """L: the density is evaluated at L^3 lattice vertices spanning the grid's box (faces included)."""
    opacity_length: float = 1.0
    """l, world units: the surface is where a slab this thick would be half opaque, sigma* = ln 2 / l. 1.0 is about
    half a CO3D-normalised object's radius: an object whose renders look solid (sigma * its size >> 1) always has a
    surface. A shorter l (a higher level) found no surface at all in a young model (interior sigma ~ 1.5 per unit,
    renders already opaque); for a sharp, well-trained model the level moves the surface by less than the field's
    transition width (about one coarse cell)."""
    points: int = 2048
    """P: points drawn on each surface (PointFlow's 2048)."""
    chunk: int = 65536
    """Lattice vertices decoded at once (bounds memory)."""
    min_component: float = 0.1
    """Inside regions (26-connected lattice vertices above the level) smaller than this fraction of the largest one
    are floaters and are left out, as the mesh chain drops them (``MeshConfig.min_component``), so the surface
    measured is the object a user gets; 0 keeps everything. 0.1, not less: the shipped apple model's reconstructions
    of held-out apples had fog blobs of 2 % to 10 % of the body at its calibrated level."""

    def __post_init__(self) -> None:
        if int(self.lattice) < 2:
            raise ValueError(f"SurfaceConfig.lattice must be >= 2, got {self.lattice!r}")
        if not self.opacity_length > 0:
            raise ValueError(f"SurfaceConfig.opacity_length must be > 0, got {self.opacity_length!r}")
        if int(self.points) < 1 or int(self.chunk) < 1:
            raise ValueError(f"SurfaceConfig.points and chunk must be >= 1, got {self.points!r}, {self.chunk!r}")


@dataclass
class ColouredPoints:
    """B point sets of P points each, with colours; empty sets are flagged (their rows hold zeros)."""

    points: Tensor
    """(B, P, 3) world positions."""
    colours: Tensor
    """(B, P, 3) RGB in [0, 1]."""
    empty: Tensor
    """(B,) bool: True where the object has no surface."""

    def __post_init__(self) -> None:
        b = self.points.shape[0]
        if self.points.dim() != 3 or self.points.shape[2] != 3 or self.colours.shape != self.points.shape:
            raise ValueError(f"points and colours must both be (B, P, 3); got {tuple(self.points.shape)} and "
                             f"{tuple(self.colours.shape)}")
        if self.empty.shape != (b,):
            raise ValueError(f"empty must be ({b},), got {tuple(self.empty.shape)}")

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, idx: slice) -> ColouredPoints:
        """The point sets ``idx`` selects (a slice keeps the batch dimension)."""
        return ColouredPoints(self.points[idx], self.colours[idx], self.empty[idx])

    @staticmethod
    def cat(parts: Sequence[ColouredPoints]) -> ColouredPoints:
        return ColouredPoints(torch.cat([p.points for p in parts]), torch.cat([p.colours for p in parts]),
                              torch.cat([p.empty for p in parts]))


def density_level(opacity_length: float) -> float:
    """sigma* (per world unit) at which a slab ``opacity_length`` thick is half opaque: 1 - exp(-sigma* l) = 1/2."""
    return math.log(2.0) / opacity_length


def _lattice_axes(box_min: Sequence[float], box_max: Sequence[float], n: int, device=None) -> list[Tensor]:
    return [torch.linspace(float(lo), float(hi), n, device=device) for lo, hi in zip(box_min, box_max)]


@torch.no_grad()
def density_lattice(grid: VoxelGrid, decoder: Decoder, activation: str = "softplus", lattice: int = 64,
                    chunk: int = 65536) -> Tensor:
    """sigma >= 0 per world unit at the L^3 lattice vertices spanning the box: (B, L, L, L), indexed [z, y, x]."""
    ax = _lattice_axes(grid.box_min, grid.box_max, lattice, grid.device)
    zz, yy, xx = torch.meshgrid(ax[2], ax[1], ax[0], indexing="ij")
    pts = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3).to(grid.dtype)
    b = grid.batch_size
    # A decoder that reads density from channel 0 alone (``ExplicitField.density_channel``) needs only that channel
    # interpolated: a quarter of the lookups of the distilled grid's four.
    channel = getattr(decoder, "density_channel", None)
    source = VoxelGrid(grid.features[:, channel:channel + 1], grid.box_min, grid.box_max) if channel is not None \
        else grid
    out = []
    for start in range(0, pts.shape[0], chunk):
        p = pts[start:start + chunk].unsqueeze(0).expand(b, -1, -1)
        # No gradients here: torch's grid_sample is the faster kernel for a plain lookup (5x on 2M points).
        looked_up = source.sample(p, mode="grid_sample")
        raw = looked_up[..., 0] if channel is not None else decoder(looked_up).density_raw
        out.append(activate_density(raw, activation))
    return torch.cat(out, dim=1).view(b, lattice, lattice, lattice)


def drop_floaters(sigma: Tensor, level: float, min_fraction: float) -> Tensor:
    """``sigma`` (L, L, L) with every inside region (26-connected vertices at or above ``level``) smaller than
    ``min_fraction`` of the largest one set to zero, so no surface is found around it."""
    from scipy import ndimage

    inside = (sigma >= level).numpy()
    labels, n = ndimage.label(inside, structure=np.ones((3, 3, 3), dtype=bool))
    if n < 2:
        return sigma
    sizes = np.bincount(labels.ravel())[1:]
    small = np.flatnonzero(sizes < min_fraction * sizes.max()) + 1
    if small.size == 0:
        return sigma
    out = sigma.clone()
    out[torch.from_numpy(np.isin(labels, small))] = 0.0
    return out


def level_set_points(sigma: Tensor, box_min: Sequence[float], box_max: Sequence[float], level: float, n: int,
                     generator: torch.Generator | None = None) -> Tensor | None:
    """``n`` points on the level set ``sigma = level`` of a lattice field, about uniform over the surface's area.

    sigma: (L, L, L) values at the lattice vertices spanning the box, indexed [z, y, x] (``density_lattice``).
    Returns (n, 3) world points, or None when no lattice edge crosses the level. Points are the edge crossings
    (``level_set_crossings``), drawn with replacement with their weights.
    """
    found = level_set_crossings(sigma, box_min, box_max, level)
    if found is None:
        return None
    pts_all, w_all = found
    # With replacement: the draw then follows the weights exactly, whatever n is against the number of crossings.
    pick = torch.multinomial(w_all, n, replacement=True, generator=generator)
    return pts_all[pick]


def level_set_crossings(sigma: Tensor, box_min: Sequence[float], box_max: Sequence[float],
                        level: float) -> tuple[Tensor, Tensor] | None:
    """Every lattice edge's crossing of the level set ``sigma = level`` (linear interpolation) and its weight
    1 / |n|_1, which makes the crossings an area-uniform measure of the surface (see the module docstring):
    ((K, 3) world points, (K,) weights), or None when no edge crosses the level."""
    if sigma.dim() != 3 or len(set(sigma.shape)) != 1:
        raise ValueError(f"sigma must be a cubic (L, L, L) lattice, got {tuple(sigma.shape)}")
    sigma = sigma.float()
    n_lat = sigma.shape[0]
    lo = torch.tensor([float(v) for v in box_min])
    hi = torch.tensor([float(v) for v in box_max])
    step = (hi - lo) / (n_lat - 1)  # (x, y, z)
    inside = sigma >= level
    # Gradient in world units, components ordered (x, y, z) like the points; it only orients the weights.
    gz, gy, gx = torch.gradient(sigma, spacing=(float(step[2]), float(step[1]), float(step[0])))
    grad = torch.stack([gx, gy, gz], dim=-1)  # (L, L, L, 3)
    pts, wts = [], []
    for axis, dim in ((0, 2), (1, 1), (2, 0)):  # world axis x/y/z runs along tensor dim 2/1/0
        a = sigma.narrow(dim, 0, n_lat - 1)
        b = sigma.narrow(dim, 1, n_lat - 1)
        cross = inside.narrow(dim, 0, n_lat - 1) != inside.narrow(dim, 1, n_lat - 1)
        idx = cross.nonzero()  # (K, 3) = (k, j, i) of the edge's first vertex
        if idx.numel() == 0:
            continue
        va, vb = a[cross], b[cross]
        t = ((level - va) / (vb - va)).clamp(0.0, 1.0)
        base = lo + idx.flip(-1).float() * step  # (x, y, z) of the first vertex
        p = base.clone()
        p[:, axis] += t * step[axis]
        ga = grad.narrow(dim, 0, n_lat - 1)[cross]
        gb = grad.narrow(dim, 1, n_lat - 1)[cross]
        g = torch.lerp(ga, gb, t[:, None])
        # |g|_2 / |g|_1 = 1 / |n|_1 for the unit normal n; a vanishing gradient gets the mean weight of all directions.
        w = g.norm(dim=-1) / g.abs().sum(-1).clamp_min(1e-12)
        w = torch.where(g.abs().sum(-1) > 1e-12, w, torch.full_like(w, 0.75))
        pts.append(p)
        wts.append(w)
    if not pts:
        return None
    return torch.cat(pts), torch.cat(wts)


@torch.no_grad()
def surface_points(grid: VoxelGrid, decoder: Decoder, activation: str = "softplus",
                   config: SurfaceConfig | None = None,
                   generators: Sequence[torch.Generator] | None = None) -> ColouredPoints:
    """Coloured surface points of each of the grid's B scenes: P points per scene, coloured by the decoder's
    view-averaged colour (``mean_colour``).

    ``generators``: one per scene (object i's points depend on ``generators[i]`` alone); None seeds scene i with i.
    """
    cfg = config or SurfaceConfig()
    b = grid.batch_size
    gens = list(generators) if generators is not None else [torch.Generator().manual_seed(i) for i in range(b)]
    if len(gens) != b:
        raise ValueError(f"need one generator per scene: {b} scenes, {len(gens)} generators")
    level = density_level(cfg.opacity_length)
    points = torch.zeros(b, cfg.points, 3)
    colours = torch.zeros(b, cfg.points, 3)
    empty = torch.zeros(b, dtype=torch.bool)
    for i in range(b):
        one = VoxelGrid(grid.features[i:i + 1], grid.box_min, grid.box_max)
        sigma = density_lattice(one, decoder, activation, cfg.lattice, cfg.chunk)[0].cpu()
        if cfg.min_component > 0:
            sigma = drop_floaters(sigma, level, cfg.min_component)
        p = level_set_points(sigma, grid.box_min, grid.box_max, level, cfg.points, gens[i])
        if p is None:
            empty[i] = True
            continue
        feats = one.sample(p.to(grid.device, grid.dtype).unsqueeze(0))[0]
        points[i] = p
        colours[i] = decoder.mean_colour(feats).float().cpu()
    return ColouredPoints(points, colours, empty)


def model_surface_points(model, z: Tensor, config: SurfaceConfig | None = None,
                         generators: Sequence[torch.Generator] | None = None,
                         decoder: Decoder | None = None) -> ColouredPoints:
    """``surface_points`` of a HoloDiffusion model's encoder-space grids z (B, C, S, S, S) (``model.denormalize``),
    decoded by ``decoder`` (default: the model's own)."""
    return surface_points(model.to_grid(z), decoder or model.decoder, model.config.render.density_activation, config,
                          generators)


# ==================================================================================================================
# the surface level of a model

DEFAULT_OPACITY_LENGTH = 1.0
"""The surface level of a model that carries no calibration (``SurfaceConfig.opacity_length``)."""

OPACITY_LENGTHS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25)
"""Candidate levels of ``calibrate_surface``, world units."""


def opacity_length_of(model) -> float:
    """The surface level a model was calibrated to (``calibrate_surface``; kept in its weights' info under
    ``"surface"``), else ``DEFAULT_OPACITY_LENGTH``."""
    surface = (getattr(model, "info", None) or {}).get("surface") or {}
    return float(surface.get("opacity_length", DEFAULT_OPACITY_LENGTH))


def fit_opacity_length(grid: VoxelGrid, decoder: Decoder, truth: Tensor, activation: str = "softplus",
                       lengths: Sequence[float] = OPACITY_LENGTHS,
                       config: SurfaceConfig | None = None) -> tuple[float, dict[float, float]]:
    """The level that puts the decoded surfaces of B grids where the true surfaces ``truth`` (B, P, 3) are.

    For each candidate opacity length, the median over the grids of the geometric Chamfer distance between a grid's
    surface (floaters left out, as everywhere) and its true points; the smallest wins. The median, not the mean: one
    object with a fog bank grown onto it at low levels (1.5 against 0.03) would otherwise decide for all. A grid
    with no surface at a level counts as inf there. Returns (best length, {length: median distance}).
    """
    cfg = config or SurfaceConfig()
    lengths = [float(x) for x in lengths]
    if not lengths or min(lengths) <= 0:
        raise ValueError(f"opacity lengths must be positive; got {lengths}")
    per_grid: dict[float, list[float]] = {x: [] for x in lengths}
    b = grid.batch_size
    no_colour = torch.zeros(1, cfg.points, 3)
    for i in range(b):
        one = VoxelGrid(grid.features[i:i + 1], grid.box_min, grid.box_max)
        sigma = density_lattice(one, decoder, activation, cfg.lattice, cfg.chunk)[0].cpu()
        for x in lengths:
            level = density_level(x)
            field = drop_floaters(sigma, level, cfg.min_component) if cfg.min_component > 0 else sigma
            p = level_set_points(field, grid.box_min, grid.box_max, level, cfg.points, torch.Generator().manual_seed(i))
            if p is None:
                per_grid[x].append(math.inf)
                continue
            _, geo = chamfer_pairs(p[None], no_colour, truth[i:i + 1].float(), torch.zeros_like(truth[i:i + 1]), 0.0)
            per_grid[x].append(float(geo[0]))
    scores = {x: float(np.median(v)) for x, v in per_grid.items()}
    best = min(lengths, key=lambda x: (scores[x], x))
    return best, scores


def training_categories(model, categories: Sequence[str] | None = None) -> list[str]:
    """The categories a calibration measures a HoloDiffusion model on: ``categories``, else those it was trained on."""
    info = getattr(model, "info", None) or {}
    cats = list(categories or model.config.categories or info.get("categories") or [])
    if not cats:
        raise UserError("the model names no category to calibrate on")
    return cats


def training_point_clouds(model, data: str | Path, objects: int | None = None, points: int = 1024, seed: int = 0,
                          coloured: bool = False) -> tuple[Tensor, Tensor | None]:
    """``objects`` training objects of a HoloDiffusion model's categories (default: every one), in an order drawn
    from ``seed``, read off their point clouds alone, each subsampled to ``points`` points: ((B, points, 3) world
    positions, (B, points, 3) colours in [0, 1], or None where some cloud has none). With ``coloured``, clouds
    without colours are skipped. No view is loaded, so a dataset made with few, small views serves as well."""
    from .data.co3d import Co3dDataset

    ds = Co3dDataset(data, training_categories(model), subset="fewview_dev", split="train", image_size=None)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds.sequences), generator=gen).tolist()
    pts, cols = [], []
    for i in order:
        p, c = ds.point_cloud(*ds.sequences[i])
        if not len(p) or (coloured and c is None):
            continue
        pick = torch.randint(0, len(p), (points,), generator=gen)
        pts.append(torch.from_numpy(p).float()[pick])
        cols.append(None if c is None else torch.from_numpy(c).float()[pick] / 255.0)
        if objects is not None and len(pts) == objects:
            break
    if not pts:
        return torch.zeros(0, points, 3), None
    return torch.stack(pts), None if any(c is None for c in cols) else torch.stack(cols)


def training_reconstructions(model, data: str | Path, objects: int = 16, points: int = 1024, seed: int = 0,
                             progress: bool = True, categories: Sequence[str] | None = None,
                             image_size: int | None = None, n_source: int | None = None
                             ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``objects`` training objects of a HoloDiffusion model, encoded from ``n_source`` of their views, and their
    true surfaces: (z (B, C, S, S, S) encoder-space grids, points (B, points, 3), colours (B, points, 3) in [0, 1], or
    None where the clouds have none). What calibrations measure a model on (``calibrate_surface``,
    ``colour.calibrate_colour``); held-out objects are never used. ``categories``, ``image_size`` and ``n_source``
    default to what the model's info says it was trained on; objects and views are drawn from ``seed``."""
    from .cameras import PerspectiveCamera
    from .data.co3d import Co3dDataset

    info = getattr(model, "info", None) or {}
    cats = training_categories(model, categories)
    ds = Co3dDataset(data, cats, subset="fewview_dev", split="train",
                     image_size=int(image_size or info.get("image_size", 64)))
    n_source = int(n_source or info.get("n_source", 8))
    seqs = [s for s in ds.sequences if len(ds.frames(*s)) >= n_source]
    if not seqs:
        raise UserError(f"--data {str(data)!r}: no training sequence of {', '.join(cats)} with {n_source} views")
    gen = torch.Generator().manual_seed(seed)
    pick = [seqs[i] for i in torch.randperm(len(seqs), generator=gen)[:objects].tolist()]
    zs, truth, colours = [], [], []
    bar = tqdm(total=len(pick), desc="encoding training objects", unit="obj", disable=not progress)
    with torch.no_grad():
        for cat, seq in pick:
            frames = ds.frames(cat, seq)
            views = ds.load_views(cat, seq, [frames[j].frame_number for j in
                                             torch.randperm(len(frames), generator=gen)[:n_source].tolist()])
            zs.append(model.encode(views.images[None].to(model.device),
                                   PerspectiveCamera.stack([views.cameras]).to(model.device, torch.float32)))
            p, c = ds.point_cloud(cat, seq)
            pick_points = torch.randint(0, len(p), (points,), generator=gen)
            truth.append(torch.from_numpy(p).float()[pick_points])
            colours.append(None if c is None else torch.from_numpy(c).float()[pick_points] / 255.0)
            bar.update(1)
        bar.close()
    cols = None if any(c is None for c in colours) else torch.stack(colours)
    return torch.cat(zs), torch.stack(truth), cols


def calibrate_surface(model, data: str | Path, objects: int = 16, points: int = 1024, seed: int = 0,
                      progress: bool = True, categories: Sequence[str] | None = None, image_size: int | None = None,
                      n_source: int | None = None,
                      reconstructions: tuple[Tensor, Tensor, Tensor | None] | None = None) -> dict[str, Any]:
    """The surface level of a HoloDiffusion model, measured on its own training objects.

    The autoencoder places an object's surface somewhere in a density ramp about one coarse cell wide, and where in
    that ramp depends on the model: a level fixed once for all (``DEFAULT_OPACITY_LENGTH``) gave the shipped apple
    model's reconstructions a radius 9 % too large, which alone makes every sample tell apart from a real object
    (1-NNA 100 % at a 6 % scale error). So: encode ``objects`` training objects from ``n_source`` of their views
    (``training_reconstructions``, or the ones given), and pick the level whose surfaces lie closest to their point
    clouds (``fit_opacity_length``). Returns the record kept in the model's info under ``"surface"``.
    """
    z, truth, _ = reconstructions or training_reconstructions(model, data, objects, points, seed, progress,
                                                              categories, image_size, n_source)
    with torch.no_grad():
        best, scores = fit_opacity_length(model.to_grid(z), model.decoder, truth,
                                          model.config.render.density_activation, config=SurfaceConfig(points=points))
    if not math.isfinite(scores[best]):
        raise UserError("at no candidate level do most calibration objects have a surface: the autoencoder is not "
                        "trained enough to place one")
    return {"opacity_length": best, "chamfer": {f"{k:g}": round(v, 6) for k, v in scores.items() if math.isfinite(v)},
            "objects": len(z), "split": "train", "data": str(Path(data).resolve())}


# ==================================================================================================================
# distances


def _sq_dist(x: Tensor, y: Tensor) -> Tensor:
    """(K, P, D), (K, Q, D) -> (K, P, Q) squared Euclidean distances, up to rounding (may dip just below 0).

    One batched matmul of augmented points, [x, |x|^2, 1] . [-2y, 1, |y|^2] = |x - y|^2: with D this small the cost
    is writing the (P, Q) matrix, so folding the norms into the product saves two more passes over it.
    """
    xx = (x * x).sum(-1, keepdim=True)
    yy = (y * y).sum(-1, keepdim=True)
    a = torch.cat([x, xx, torch.ones_like(xx)], dim=-1)
    b = torch.cat([-2.0 * y, torch.ones_like(yy), yy], dim=-1)
    return torch.bmm(a, b.transpose(1, 2))


def _chamfer_of(d: Tensor) -> Tensor:
    """(K, P, Q) squared distances -> (K,) PointFlow Chamfer: both directed nearest-neighbour means, summed."""
    return d.amin(dim=2).clamp_min(0.0).mean(dim=1) + d.amin(dim=1).clamp_min(0.0).mean(dim=1)


def chamfer_pairs(a_points: Tensor, a_colours: Tensor, b_points: Tensor, b_colours: Tensor,
                  colour_weight: float) -> tuple[Tensor, Tensor]:
    """Chamfer distances of K pairs of point sets: a (K, P, 3) + colours, b (K, Q, 3) + colours.

    Returns (coloured (K,), geometry (K,)): PointFlow's Chamfer (squared distances, the two directed means summed)
    on (xyz, colour_weight * rgb) and on xyz alone.
    """
    w = float(colour_weight)
    geometry = _chamfer_of(_sq_dist(a_points.float(), b_points.float()))
    a6 = torch.cat([a_points.float(), w * a_colours.float()], dim=-1)
    b6 = torch.cat([b_points.float(), w * b_colours.float()], dim=-1)
    return _chamfer_of(_sq_dist(a6, b6)), geometry


def matched_colour_error(a_points: Tensor, a_colours: Tensor, b_points: Tensor, b_colours: Tensor) -> Tensor:
    """(K,) squared colour difference between each point and its nearest neighbour *by position* in the other set,
    averaged per direction and summed (the colour term of the coloured Chamfer as the colour weight goes to 0)."""
    d = _sq_dist(a_points.float(), b_points.float())
    ab = d.argmin(dim=2)  # (K, P) index into b
    ba = d.argmin(dim=1)  # (K, Q) index into a
    cb = torch.gather(b_colours.float(), 1, ab.unsqueeze(-1).expand(-1, -1, 3))
    ca = torch.gather(a_colours.float(), 1, ba.unsqueeze(-1).expand(-1, -1, 3))
    return (a_colours.float() - cb).square().sum(-1).mean(1) + (b_colours.float() - ca).square().sum(-1).mean(1)


def chamfer_matrix(a: ColouredPoints, b: ColouredPoints | None = None, colour_weight: float = 1.0,
                   max_bytes: int = 1 << 28, progress: bool = False,
                   device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """All pairwise Chamfer distances between the sets of ``a`` (N) and ``b`` (M): (coloured (N, M), geometry (N, M)).

    ``b=None`` compares ``a`` with itself (symmetric; only i < j is computed, the diagonal is 0). Pairs are done in
    chunks whose distance matrices take about ``max_bytes``, on ``device`` (default: where the points are); the
    result is on the CPU. An empty set is +inf from a non-empty one and 0 from another empty one.
    """
    sym = b is None
    b = a if sym else b
    n, m = len(a), len(b)
    coloured = torch.full((n, m), math.inf)
    geometry = torch.full((n, m), math.inf)
    both_empty = a.empty[:, None] & b.empty[None, :]
    coloured[both_empty] = 0.0
    geometry[both_empty] = 0.0
    ok = ~a.empty[:, None] & ~b.empty[None, :]
    if sym:
        ok &= torch.ones(n, m, dtype=torch.bool).triu(1)
        coloured.fill_diagonal_(0.0)
        geometry.fill_diagonal_(0.0)
    ii, jj = ok.nonzero(as_tuple=True)
    per_pair = a.points.shape[1] * b.points.shape[1] * 4 * 2  # a float32 (P, Q) matrix + a reduction's scratch
    k = max(1, int(max_bytes // per_pair))
    bar = tqdm(total=len(ii), desc="chamfer", unit="pair", disable=not progress, leave=False)
    for s in range(0, len(ii), k):
        i, j = ii[s:s + k], jj[s:s + k]
        c, g = chamfer_pairs(a.points[i].to(device), a.colours[i].to(device), b.points[j].to(device),
                             b.colours[j].to(device), colour_weight)
        coloured[i, j] = c.cpu()
        geometry[i, j] = g.cpu()
        bar.update(len(i))
    bar.close()
    if sym:
        upper = torch.ones(n, n, dtype=torch.bool).triu(1)
        coloured = torch.where(upper, coloured, coloured.T)
        geometry = torch.where(upper, geometry, geometry.T)
        coloured.fill_diagonal_(0.0)
        geometry.fill_diagonal_(0.0)
        coloured[both_empty] = 0.0
        geometry[both_empty] = 0.0
    return coloured, geometry


def rms_radius(sets: ColouredPoints) -> float:
    """Mean over the non-empty sets of their RMS distance from their centroid (the objects' size, world units)."""
    p = sets.points[~sets.empty]
    if p.shape[0] == 0:
        raise ValueError("no non-empty point set to measure the object size on")
    return float((p - p.mean(dim=1, keepdim=True)).square().sum(-1).mean(-1).sqrt().mean())


def colour_weight_for(references: ColouredPoints, max_pairs: int = 256, chunk: int = 8) -> float:
    """The default colour weight w: colour and shape differences between the references weigh the same.

    w^2 = mean geometric Chamfer / mean ``matched_colour_error`` over pairs of references (up to ``max_pairs``
    pairs, drawn with a fixed generator): to first order in w^2, the references' mean pairwise coloured Chamfer is then
    half shape, half colour. Objects of one category differ far less in shape than in colour in absolute terms (24
    procedural test apples: mean Chamfer 0.04 by shape against 1.4 with w = their radius), so a size-based weight
    would make the coloured distance a colour-only one. Falls back to the references' RMS radius when they all have
    one colour or one shape, or fewer than two references exist.
    """
    ok = (~references.empty).nonzero().flatten()
    m = len(ok)
    fallback = rms_radius(references)
    if m < 2:
        return fallback
    ii, jj = torch.triu_indices(m, m, 1)
    if len(ii) > max_pairs:
        pick = torch.randperm(len(ii), generator=torch.Generator().manual_seed(0))[:max_pairs]
        ii, jj = ii[pick], jj[pick]
    ii, jj = ok[ii], ok[jj]
    geo, col = [], []
    for s in range(0, len(ii), chunk):
        i, j = ii[s:s + chunk], jj[s:s + chunk]
        p, c, q, e = references.points[i], references.colours[i], references.points[j], references.colours[j]
        geo.append(_chamfer_of(_sq_dist(p.float(), q.float())))
        col.append(matched_colour_error(p, c, q, e))
    g, k = float(torch.cat(geo).mean()), float(torch.cat(col).mean())
    if not (g > 0 and k > 0):
        return fallback
    return math.sqrt(g / k)


# ==================================================================================================================
# metrics


def coverage(d_sr: Tensor) -> float:
    """COV: fraction of the M references that are the nearest reference of some sample. d_sr (N, M)."""
    nearest = d_sr.min(dim=1)
    hits = nearest.indices[torch.isfinite(nearest.values)]  # a sample far from everything (empty) covers nothing
    return float(torch.unique(hits).numel() / d_sr.shape[1])


def minimum_matching_distance(d_sr: Tensor) -> float:
    """MMD: mean over references of the distance to the nearest sample (inf if every sample is empty)."""
    return float(d_sr.min(dim=0).values.mean())


def one_nn_accuracy(d_ss: Tensor, d_rr: Tensor, d_sr: Tensor) -> float:
    """1-NNA: leave-one-out 1-NN accuracy on samples (N) u references (M). A point whose every distance is inf
    (an empty sample among non-empty sets) counts as told apart. Ties go to the first index (samples first)."""
    n, m = d_sr.shape
    full = torch.cat([torch.cat([d_ss, d_sr], 1), torch.cat([d_sr.T, d_rr], 1)], 0)
    full.fill_diagonal_(math.inf)
    is_sample = torch.arange(n + m) < n
    nearest = full.min(dim=1)
    correct = is_sample[nearest.indices] == is_sample
    correct |= ~torch.isfinite(nearest.values)
    return float(correct.float().mean())


def mean_pairwise(d: Tensor) -> float:
    """Mean of the finite off-diagonal entries of a symmetric (K, K) distance matrix (nan with fewer than 2 sets)."""
    k = d.shape[0]
    off = ~torch.eye(k, dtype=torch.bool)
    vals = d[off & torch.isfinite(d)]
    return float(vals.mean()) if vals.numel() else math.nan


def generative_metrics(d_ss: Tensor, d_rr: Tensor, d_sr: Tensor,
                       sample_empty: Tensor | None = None) -> dict[str, float]:
    """COV, MMD, 1-NNA and the diversity ratio for one distance: d_ss (N, N), d_rr (M, M), d_sr (N, M).

    ``sample_empty`` (N,) bool: empty samples are left out of the samples' mean pairwise distance (two empty samples
    are 0 apart, which would read as collapse rather than as failure; the failure shows in COV, MMD and 1-NNA).
    """
    keep = ~sample_empty if sample_empty is not None else torch.ones(d_ss.shape[0], dtype=torch.bool)
    s_pair, r_pair = mean_pairwise(d_ss[keep][:, keep]), mean_pairwise(d_rr)
    ratio = s_pair / r_pair if r_pair > 0 and math.isfinite(s_pair) else math.nan
    return {"cov": coverage(d_sr), "mmd": minimum_matching_distance(d_sr), "1nna": one_nn_accuracy(d_ss, d_rr, d_sr),
            "diversity_ratio": ratio, "sample_pairwise": s_pair, "reference_pairwise": r_pair}


# ==================================================================================================================
# data and models


def _check_category_in_data(root: Path, category: str) -> None:
    if not root.is_dir():
        raise UserError(f"--data {str(root)!r} is not a folder")
    if not (root / category / "frame_annotations.jgz").is_file():
        have = sorted(p.name for p in root.iterdir() if (p / "frame_annotations.jgz").is_file())
        raise UserError(f"--data {str(root)!r} has no category {category!r} (it has: {', '.join(have) or 'none'})")


def reference_points(root: str | Path, category: str, points: int = 2048, subset: str = "fewview_dev",
                     seed: int = 0) -> tuple[ColouredPoints, str, str | None, bool, list[str]]:
    """The held-out objects' point clouds, each subsampled to ``points`` points.

    Uses the ``test`` split of ``subset``; if it has no sequence, ``val`` (the note says so). Returns
    (point sets, split used, note or None, whether every cloud has colours, sequence names). Reference j draws its
    subsample from a generator seeded with ``seed + j``; clouds smaller than ``points`` are drawn with replacement.
    """
    from .data.co3d import Co3dDataset

    root = Path(root)
    _check_category_in_data(root, category)
    note = None
    split = "test"
    ds = Co3dDataset(root, category, subset=subset, split="test", image_size=None)
    if not ds.sequences:
        ds = Co3dDataset(root, category, subset=subset, split="val", image_size=None)
        split = "val"
        note = f"the {subset} test split of {category!r} has no sequence; the val split serves as the reference set"
        if not ds.sequences:
            raise UserError(f"--data {str(root)!r}: {category!r} has no held-out (test or val) sequence in "
                            f"{subset}; evaluation needs objects the model was not trained on")
    pts, cols, names, coloured = [], [], [], True
    for j, (cat, seq) in enumerate(ds.sequences):
        p, c = ds.point_cloud(cat, seq)
        if len(p) == 0:
            continue
        gen = torch.Generator().manual_seed(seed + j)
        if len(p) >= points:
            pick = torch.randperm(len(p), generator=gen)[:points]
        else:
            pick = torch.randint(0, len(p), (points,), generator=gen)
        pts.append(torch.from_numpy(p).float()[pick])
        if c is None:
            coloured = False
            cols.append(torch.zeros(points, 3))
        else:
            cols.append(torch.from_numpy(c).float()[pick] / 255.0)
        names.append(seq)
    if not pts:
        raise UserError(f"--data {str(root)!r}: the {split} point clouds of {category!r} are all empty")
    k = len(pts)
    return (ColouredPoints(torch.stack(pts), torch.stack(cols), torch.zeros(k, dtype=torch.bool)), split, note,
            coloured, names)


def model_file(path: str | Path) -> Path:
    """The HoloDiffusion weights ``--model`` names: a .safetensors file, a training run folder (its
    ``model.safetensors``), a model folder (its ``holodiffusion.safetensors``) or a shipped model's name."""
    from .pipeline import MODELS_DIR

    p = Path(path)
    if not p.exists():
        shipped = MODELS_DIR / str(path) / "holodiffusion.safetensors"
        if p.name == str(path) and shipped.is_file():
            return shipped
        from .generate import list_models

        known = ", ".join(r["name"] for r in list_models()) or "none shipped"
        raise UserError(f"--model {str(path)!r} does not exist (give a run folder, a .safetensors model file or a "
                        f"shipped model's name: {known})")
    if p.is_dir() and not (p / "model.safetensors").is_file() and (p / "holodiffusion.safetensors").is_file():
        return p / "holodiffusion.safetensors"
    if not p.is_dir() and p.suffix != ".safetensors":
        raise UserError(f"--model {str(path)!r} is not a .safetensors file or a run folder; HoloFusion reads "
                        ".safetensors only")
    return p


def _load_model(path: str, device: str):
    from .holodiffusion import load_holodiffusion

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return load_holodiffusion(str(model_file(path)), device)


def _load_pipeline(path: str, device: str, preset: str):
    """The ``HoloFusionPipeline`` of a model folder or shipped model name, for a preset that needs its
    super-resolution model."""
    from .pipeline import PRESETS, HoloFusionPipeline

    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r} is unknown; choose from {', '.join(PRESETS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    pipe = HoloFusionPipeline.from_pretrained(path, device)
    if pipe.sr is None:
        raise UserError(f"--preset {preset} needs a model folder that also holds superres.safetensors, and "
                        f"{path!r} has none; use --preset draft")
    return pipe


def resolve_autoguidance(model, model_path: str, given: float | None) -> float:
    """The autoguidance weight to sample with: ``given``, else the guide's own where the model has one (a model
    folder's guide.safetensors; ``HoloDiffusion.guide_weight``, what the presets use), else 1 (none)."""
    from .holodiffusion import check_guide_weight

    if given is None:
        return model.guide_weight
    given = check_guide_weight(given, "--autoguidance")
    if given != 1 and model.guide is None:
        raise UserError(f"--autoguidance {given} needs a model folder with a guide.safetensors, and "
                        f"{model_path!r} has none; leave it out")
    return float(given)


def _resolve_category(model, category: str | None) -> tuple[str, str | None]:
    """(name for files, category to condition on or None)."""
    known = list(model.config.categories)
    if category is None:
        if len(known) == 1:
            return known[0], known[0]
        if not known:
            return "object", None
        raise UserError(f"this model knows several categories ({', '.join(known)}); pick one with --category")
    if known and category not in known:
        raise UserError(f"--category {category!r} is not one this model knows ({', '.join(known)})")
    return category, category if known else None


def turntable_settings(model_path: str | Path) -> tuple[float, float, float]:
    """(distance, NDC focal, elevation in degrees) of the turntable renders: the run's training settings when its
    ``checkpoint.safetensors`` is beside the model, else the trainer's defaults."""
    from .train import TrainConfig
    from .weights import read_metadata

    d = TrainConfig()
    vals = (d.view_distance, d.view_focal, d.view_elevation)
    p = Path(model_path)
    ckpt = (p if p.is_dir() else p.parent) / "checkpoint.safetensors"
    if ckpt.is_file():
        try:
            train = read_metadata(ckpt)["config"].get("train", {})
            vals = (float(train.get("view_distance", vals[0])), float(train.get("view_focal", vals[1])),
                    float(train.get("view_elevation", vals[2])))
        except (UserError, AttributeError, TypeError, ValueError):
            pass  # a foreign or damaged checkpoint only loses the custom framing
    return vals


def _turntable_cameras(views: int, size: int, framing: tuple[float, float, float], device):
    """The ``views`` turntable cameras of sample sheets at ``size`` px, framed by (distance, focal, elevation)."""
    from .cameras import fly_around_cameras

    distance, focal, elevation = framing
    return fly_around_cameras(views, distance, elevation, focal, (size, size)).to(device)


@torch.no_grad()
def _turntables(model, z: Tensor | VoxelGrid, views: int, size: int, framing: tuple[float, float, float],
                decoder: Decoder | None = None) -> Tensor:
    """Renders encoder-space grids z (B, C, S, S, S) (or a grid of them, placed: ``frame.py``) with ``decoder``
    (default: the model's own) from ``views`` turntable cameras: (B, V, H, W, 3) in [0, 1]."""
    from .cameras import PerspectiveCamera
    from .render import render_grid

    grid = z if isinstance(z, VoxelGrid) else model.to_grid(z)
    cams = _turntable_cameras(views, size, framing, model.device)
    # generator=None: deterministic
    out = render_grid(grid, decoder or model.decoder, PerspectiveCamera.stack([cams] * grid.batch_size),
                      model.config.render)
    return out.rgb.reshape(grid.batch_size, views, size, size, 3).float().cpu()


@torch.no_grad()
def _field_turntable(grid: VoxelGrid, field, views: int, size: int, framing: tuple[float, float, float]) -> Tensor:
    """Renders one grid with its field (a distilled grid: ``ExplicitField``) from the same turntable cameras:
    (V, H, W, 3) in [0, 1]."""
    from .render import RenderConfig, render_grid

    cams = _turntable_cameras(views, size, framing, grid.device)
    out = render_grid(grid, field, cams, RenderConfig(n_coarse=64, n_fine=32, chunk_rays=4096))
    return out.rgb.reshape(views, size, size, 3).float().clamp(0, 1).cpu()


def check_inception(path: str | None) -> None:
    """``--inception``: honest refusal (see ``INCEPTION_UNSUPPORTED``), before any work is done."""
    if path is not None:
        raise UserError(f"--inception {path!r}: {INCEPTION_UNSUPPORTED}")


# ==================================================================================================================
# entry points


def write_samples(model_path: str, out: str | Path, category: str | None = None, seed: int = 0, count: int = 1,
                  steps: int = 25, sampler: str = "dpm++", views: int = 8, size: int = 128, device: str = "cpu",
                  progress: bool = True, sheet: bool = False, autoguidance: float | None = None) -> list[Path]:
    """The ``holofusion sample`` command: per seed, ``<category>_<seed>.safetensors`` and ``<category>_<seed>.png``;
    with ``sheet``, also ``<category>_sheet.png``: every seed's turntable in one picture, four seeds to a row.

    The safetensors file holds ``latent`` (normalised, (C, S, S, S)) and ``features`` (denormalised encoder space,
    what the decoder reads), with the model's config and {model, seed, steps, sampler, autoguidance, category, box}
    in its metadata (``autoguidance``: ``resolve_autoguidance``). Objects are sampled one seed at a time, so an
    object's grid bytes depend on its seed alone, not on --count.
    """
    from .diffusion import SAMPLERS
    from .plots import sample_sheet
    from .weights import save_weights

    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")
    if count < 1 or steps < 1:
        raise UserError(f"--count and --steps must be at least 1; got {count} and {steps}")
    model = _load_model(model_path, device)
    name, cond = _resolve_category(model, category)
    autoguidance = resolve_autoguidance(model, model_path, autoguidance)
    framing = turntable_settings(model_file(model_path))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    h = model.config.box_half_size
    written: list[Path] = []
    strips: list[Tensor] = []
    bar = tqdm(total=count * steps, desc="sampling", unit="step", disable=not progress)
    for s in range(seed, seed + count):
        x = model.sample([s], cond, steps=steps, sampler=sampler, callback=lambda *_: bar.update(1),
                         autoguidance=autoguidance)
        z = model.denormalize(x)
        info = {"model": str(Path(model_path).resolve()), "seed": s, "steps": steps, "sampler": sampler,
                "autoguidance": autoguidance,
                "category": cond, "box_min": [-h] * 3, "box_max": [h] * 3, "grid_size": model.config.grid_size}
        path = out / f"{name}_{s}.safetensors"
        save_weights(path, {"latent": x[0], "features": z[0]}, "holodiffusion-sample", model.config.to_dict(), info)
        rgb = _turntables(model, z, views, size, framing)
        png = out / f"{name}_{s}.png"
        sample_sheet(rgb, png, per_row=1)
        written += [path, png]
        if sheet:
            strips.append(rgb)
    bar.close()
    if sheet:
        step = model.info.get("step")
        trained = f" (step {step:,})" if isinstance(step, int) else ""
        seeds = f"seed {seed}" if count == 1 else f"seeds {seed}-{seed + count - 1}"
        title = f"{name}{trained}: {seeds}, {views} views each ({sampler}, {steps} steps)"
        sample_sheet(torch.cat(strips), out / f"{name}_sheet.png", title=title, per_row=min(4, count))
        written.append(out / f"{name}_sheet.png")
    return written


def _finite(v: Any) -> Any:
    """JSON has no inf / nan: they become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def weights_digest(*modules: torch.nn.Module | None) -> str:
    """sha256 over the parameters and buffers of ``modules`` (names, shapes, dtypes, values): the same digest means the
    same networks, whatever file or folder they were loaded from."""
    h = hashlib.sha256()
    for m in modules:
        if m is None:
            continue
        for name, t in sorted(m.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            flat = t.detach().cpu().contiguous().reshape(-1)  # reshape: 0-d buffers (step counters) too
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ObjectStore:
    """The measured objects of a pipeline evaluation, one file per seed in a folder beside the metrics JSON
    (``<json stem>.objects/``), written as each object is done. A standard evaluation of 100 objects takes most of an
    hour on a CPU; stopped by a crash, Ctrl-C or a closed laptop, the same command continues where it stopped, and a
    larger ``--samples`` adds to what is there. Reuse is exact because an object depends only on its seed and the
    ``key`` (the networks' digest, the preset, the category and the surface settings): a stored object is the one the
    pipeline would make again. A folder written under another key is emptied, not mixed in."""

    KEY_FILE = "key.json"

    def __init__(self, folder: Path, key: dict[str, Any]):
        self.folder, self.key = folder, json.loads(json.dumps(key))
        self.kept = 0
        key_file = folder / self.KEY_FILE
        if folder.is_dir():
            try:
                same = json.loads(key_file.read_text()) == self.key
            except (OSError, ValueError):
                same = False
            if not same:
                for f in folder.glob("seed_*.pt"):
                    f.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(key_file, json.dumps(self.key, indent=2) + "\n")

    def _path(self, seed: int) -> Path:
        return self.folder / f"seed_{seed:010d}.pt"

    def get(self, seed: int) -> tuple[ColouredPoints, Tensor] | None:
        """(surface points, sheet strip) of ``seed`` if stored (an unreadable file counts as not stored)."""
        try:
            d = torch.load(self._path(seed), map_location="cpu", weights_only=True)
            found = ColouredPoints(d["points"], d["colours"], d["empty"]), d["strip"]
        except (OSError, RuntimeError, KeyError, ValueError, EOFError):
            return None
        self.kept += 1
        return found

    def put(self, seed: int, sets: ColouredPoints, strip: Tensor) -> None:
        d = {"points": sets.points.cpu(), "colours": sets.colours.cpu(), "empty": sets.empty.cpu(),
             "strip": strip.cpu()}
        atomic_torch_save(d, self._path(seed))  # whole or absent: a run killed mid-write leaves no half object


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)


def evaluate_model(model_path: str, data: str, category: str | None, samples: int, steps: int = 25,
                   sampler: str = "dpm++", points: int = 2048, out: str | Path | None = None,
                   inception: str | None = None, seed: int = 0, batch: int = 8,
                   surface: SurfaceConfig | None = None, colour_weight: float | None = None,
                   sheet_objects: int = 16, sheet_views: int = 4, sheet_size: int = 64, device: str = "cpu",
                   progress: bool = True, opacity_length: float | None = None,
                   preset: str = "draft", autoguidance: float | None = None) -> tuple[dict[str, Any], Path, Path]:
    """The ``holofusion evaluate`` command: metrics of ``samples`` seeds (seed, seed + 1, ...) against the held-out
    objects of ``category``. Writes the JSON (default ``<run>/eval_<category>.json``; ``eval_<category>_<preset>.json``
    for a preset other than draft) and a sample sheet beside it (``<json stem>_samples.png``); returns (metrics,
    json path, sheet path).

    ``preset`` "draft" measures the coarse samples of a HoloDiffusion model (``steps`` and ``sampler`` apply);
    "standard" and "high" run the whole ``HoloFusionPipeline`` of a model folder that also holds a super-resolution
    model and measure the distilled objects, the surfaces a user's meshes are cut from (the preset sets the steps).

    ``autoguidance`` is the weight of the model folder's guide (``HoloDiffusion.attach_guide``; 1: none); by
    default the preset's where the folder has a guide, else 1.

    The surface level is ``opacity_length`` when given, else the model's calibrated one (``opacity_length_of``);
    ``surface`` sets the rest of the surface extraction (its own ``opacity_length`` is not used).

    With a pipeline preset each measured object is written to ``<json stem>.objects/`` as it is done
    (``ObjectStore``): the same command after an interruption continues where it stopped."""
    from .diffusion import SAMPLERS
    from .plots import sample_sheet

    t0 = time.perf_counter()
    check_inception(inception)
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")
    if samples < 1 or steps < 1 or points < 1 or batch < 1:
        raise UserError("--samples, --steps, --points and --batch must each be at least 1")
    root = Path(data)
    if category is not None:
        _check_category_in_data(root, category)
    pipe = _load_pipeline(model_path, device, preset) if preset != "draft" else None
    model = pipe.hd if pipe is not None else _load_model(model_path, device)
    name, cond = _resolve_category(model, category)
    autoguidance = resolve_autoguidance(model, model_path, autoguidance)
    if category is None:
        _check_category_in_data(root, name)
    if opacity_length is not None and not opacity_length > 0:
        raise UserError(f"--opacity-length must be positive; got {opacity_length}")
    scfg = replace(surface or SurfaceConfig(), points=points,
                   opacity_length=opacity_length if opacity_length is not None else opacity_length_of(model))
    # References are subsampled with their own fixed seeds: every --seed is compared with the same point sets.
    refs, split, note, ref_coloured, ref_names = reference_points(root, name, points)

    stem = f"eval_{name}" if preset == "draft" else f"eval_{name}_{preset}"
    out_path = Path(out) if out is not None else \
        (Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent) / f"{stem}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    seeds = list(range(seed, seed + samples))
    placed = frame_record(model, preset)  # the frame this preset's objects are placed in, if any (frame.py)
    framing = turntable_settings(model_file(model_path))
    k = min(sheet_objects, samples)
    reused: dict[str, Any] = {}
    if pipe is None:
        # the draft preset's objects, in its calibrated colours where the model has them (``colour.py``)
        cmap = colour_map_of(model, "draft")
        decoder = map_decoder(model.decoder, cmap) if cmap is not None else model.decoder
        colour_map = None if cmap is None else cmap.to_record()
        zs, sets = [], []
        bar = tqdm(total=samples * steps, desc="sampling", unit="step", disable=not progress)
        for start in range(0, samples, batch):
            chunk = seeds[start:start + batch]
            x = model.sample(chunk, cond, steps=steps, sampler=sampler, callback=lambda *_: bar.update(len(chunk)),
                             autoguidance=autoguidance)
            zs.append(model.denormalize(x))
        bar.close()
        z = torch.cat(zs)
        frame = frame_of(model, "draft")
        activation = model.config.render.density_activation
        bar = tqdm(total=samples, desc="surfaces", unit="obj", disable=not progress)
        grids = []
        for i, s in enumerate(seeds):
            grid = model.to_grid(z[i:i + 1])
            if frame is not None:  # placed as the pipeline places it (``HoloFusionPipeline.in_frame``)
                found = surface_frame(grid, decoder, activation, scfg.opacity_length, rule=frame.rule)
                grid = grid if found is None else place_in_frame(grid, *found, frame)
            sets.append(surface_points(grid, decoder, activation, scfg, [torch.Generator().manual_seed(s)]))
            grids.append(grid)
            bar.update(1)
        bar.close()
        sheet_rgb = torch.cat([_turntables(model, g, sheet_views, sheet_size, framing, decoder) for g in grids[:k]])
    else:
        from .pipeline import PRESETS

        pre = replace(PRESETS[preset], autoguidance=autoguidance)
        steps, sampler = pre.coarse_steps, "dpm++"
        sr = pipe.sr_for(pre)  # the model this preset draws with (``high``: a folder's 4x one)
        guide = pipe.hd.guide
        cmap = pipe.colour_map(preset, pre)
        colour_map = None if cmap is None else cmap.to_record()
        key = {
            "weights": weights_digest(pipe.hd, sr, guide),
            "configs": repr((pipe.hd.config, sr.config, guide.config if guide is not None else None)),
            "preset": [preset, repr(pre)], "category": name, "surface": asdict(scfg),
            "sheet": [sheet_views, sheet_size, list(framing)], "device": str(pipe.device), "torch": torch.__version__}
        if colour_map is not None:  # (only then: objects stored before colour calibration existed stay valid)
            # (not "colour_map": stores written under that name hold objects the map was not applied to)
            key["colour_map_applied"] = colour_map
        if placed is not None:  # likewise: objects placed in the training frame (frame.py)
            key["frame"] = placed
        store = ObjectStore(out_path.with_name(f"{out_path.stem}.objects"), key)
        sets, strips = [], []
        bar = tqdm(total=len(seeds), desc=f"{preset} preset", unit="obj", disable=not progress)
        for i, s in enumerate(seeds):
            found = store.get(s)
            if found is None:
                if store.kept:  # kept objects load in a blink, too fast for the bar to redraw: show them now
                    bar.set_postfix_str(f"{store.kept} kept from {store.folder.name}")
                # the distilled grid, in the preset's colour map, and its explicit field
                grid, decoder = pipe(s, cond, preset, autoguidance=autoguidance).field()
                pts = surface_points(grid, decoder, "softplus", scfg, [torch.Generator().manual_seed(s)])
                # every object's strip is kept (a fraction of a second): a later, larger sheet needs no re-run
                found = pts, _field_turntable(grid, decoder, sheet_views, sheet_size, framing)
                store.put(s, *found)
            sets.append(found[0])
            if i < k:
                strips.append(found[1])
            bar.update(1)
        bar.close()
        sheet_rgb = torch.stack(strips)
        reused = {"objects_folder": store.folder.name, "objects_reused": store.kept}
    gen_sets = ColouredPoints.cat(sets)

    w = colour_weight if colour_weight is not None else colour_weight_for(refs)
    both = ColouredPoints.cat([gen_sets, refs])
    col, geo = chamfer_matrix(both, None, w, progress=progress, device=model.device)
    n = samples
    results: dict[str, Any] = {}
    for key, d in (("coloured", col), ("geometry", geo)):
        results[key] = generative_metrics(d[:n, :n], d[n:, n:], d[:n, n:], gen_sets.empty)
    notes = [note] if note else []
    if not ref_coloured:
        results["coloured"] = None
        notes.append("some reference point clouds have no colours: coloured metrics are left out")
    n_empty = int(gen_sets.empty.sum())
    if n_empty:
        notes.append(f"{n_empty} of {n} samples have no surface at the level (empty): they count as infinitely far")

    sheet_path = out_path.with_name(f"{out_path.stem}_samples.png")
    sample_sheet(sheet_rgb, sheet_path, title=f"{name} ({preset}): seeds {seed}..{seed + k - 1}")

    report = {
        "model": str(Path(model_path).resolve()), "data": str(root.resolve()), "category": name,
        "reference_split": split, "references": len(refs), "reference_sequences": ref_names,
        "preset": preset, "samples": n, "seed": seed, "steps": steps, "sampler": sampler,
        "autoguidance": autoguidance, "colour_map": colour_map, "frame": placed,
        "points": points,
        "empty_samples": n_empty, "colour_weight": w,
        "colour_weight_rule": "given (--colour-weight)" if colour_weight is not None else
                              "balanced: colour and shape differences between the references weigh the same",
        "distance": "Chamfer (PointFlow): squared distances, both directed means summed; coloured = on "
                    "(x, y, z, w*r, w*g, w*b)",
        "surface": asdict(scfg), "surface_density_level": density_level(scfg.opacity_length),
        "coloured": results["coloured"], "geometry": results["geometry"],
        "diversity_ratio": None if results["coloured"] is None else results["coloured"]["diversity_ratio"],
        "diversity_ratio_geometry": results["geometry"]["diversity_ratio"],
        "fid": None, "kid": None, "fid_note": FID_NOTE,
        "notes": notes, "sample_sheet": sheet_path.name, "seconds": round(time.perf_counter() - t0, 2), **reused,
    }
    report = _finite(report)
    _atomic_write_text(out_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report, out_path, sheet_path


def format_table(report: dict[str, Any]) -> str:
    """A compact text table of an evaluation report."""

    def f(v: Any, pct: bool = False) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" if pct else f"{v:.4g}"

    lines = [f"{report['category']} ({report.get('preset', 'draft')} preset): {report['samples']} samples "
             f"({report['empty_samples']} empty) vs "
             f"{report['references']} {report['reference_split']} objects, {report['points']} points, "
             f"colour weight {f(report['colour_weight'])}",
             f"{'distance':<10} {'COV':>7} {'MMD':>10} {'1-NNA':>7} {'diversity':>10}"]
    for key in ("coloured", "geometry"):
        m = report.get(key)
        if m is None:
            lines.append(f"{key:<10} {'-':>7} {'-':>10} {'-':>7} {'-':>10}")
            continue
        lines.append(f"{key:<10} {f(m['cov'], True):>7} {f(m['mmd']):>10} {f(m['1nna'], True):>7} "
                     f"{f(m['diversity_ratio']):>10}")
    lines.append(f"FID/KID: {report['fid_note'] if report['fid'] is None else report['fid']}")
    lines += [f"note: {n}" for n in report.get("notes", [])]
    if report.get("objects_reused"):
        lines.append(f"{report['objects_reused']} of the {report['samples']} objects were measured by an earlier run "
                     f"and kept in {report['objects_folder']}/ (delete it to measure them again)")
    return "\n".join(lines)
