"""The training data's object frame, and generated objects placed in it.

CO3D normalises each sequence's world so that its point cloud is centred with about unit standard deviation
(``notes/co3d-and-cameras.md``), and the procedural categories do exactly that (``data/procedural.py``): every
training object sits at the origin with the same spread, sqrt of the mean over the three axes of the per-axis
variance of its surface points. A model learns this only approximately: the shipped hydrant's distilled samples sat
0.06 lower than the real hydrants on average and scattered 2.3 times as widely about it; the donut's came out 7 %
smaller than every real donut.

So ``holofusion calibrate`` measures the frame the training objects share (``training_frame``: the mean centre and
spread of their point clouds, refused where their spreads vary: data that were not normalised keep their sizes), the
model keeps it in its metadata under ``"frame"``, and the pipeline moves each object it makes onto its centre
(``place_in_frame``), and with ``scale`` also scales it to its spread: a change of the grid's box alone, so the
field itself, its colours and its surface level are untouched and nothing is resampled. The centre and spread of a
generated object are the area-weighted moments of its surface at the model's level (``surface_frame``), deterministic.

Centring is the default and scaling opt-in (``calibrate --frame-scale``), because neither is a free win: an object's
centroid and spread are those of its whole surface, so a sample that misses the data's detail (a stem cavity not
carved, fog clinging under the body) has them in other places than its body, and moving or scaling it by them can
move its body away from where real objects have theirs. Which way a model goes is measured on held-out objects
(README, "Object frame").

Where a sample's surface carries such extras, its centre can be read off its extent instead (``centre_rule``
"box", ``calibrate --frame-centre box``): the midpoint, per axis, of the 2 % and 98 % quantiles of its surface.
Detail inside the object's extent (a cavity carved or not) does not move it at all, and a fringe of fog only where
it holds more than 2 % of the surface. The frame's centre is then the training objects' mean box midpoint, since
an object that is not symmetric has the two in different places (the training apples' midpoint sits 0.10 from
their centroid in y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import UserError
from .grid import VoxelGrid

__all__ = ["ObjectFrame", "frame_of", "frame_record", "frame_presets", "spread_of", "box_centre", "training_frame",
           "surface_frame", "place_in_frame", "cameras_in_frame", "SPREAD_TOLERANCE", "CENTRE_RULES", "BOX_QUANTILE"]

SPREAD_TOLERANCE = 0.02
"""Largest coefficient of variation of the training objects' spreads for which they count as normalised to one
frame. The procedural categories' point clouds vary by 0.2 to 0.6 % (4,096 points each); objects in their own
sizes vary by tens of per cent."""

CENTRE_RULES = ("centroid", "box")
"""How an object's centre is read off its surface: the area-weighted centroid (the default), or the midpoint of
its extent between the ``BOX_QUANTILE`` and 1 - ``BOX_QUANTILE`` quantiles on each axis (module docstring)."""

BOX_QUANTILE = 0.02


@dataclass(frozen=True)
class ObjectFrame:
    """Where the training objects sit: their surface's centre (world x, y, z) and spread (world units)."""

    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    spread: float = 1.0
    scale: bool = False
    """Scale objects to ``spread`` as well as centring them (False, the default: centre only, keep the model's
    sizes; module docstring)."""
    rule: str = "centroid"
    """Which centre of an object lands on ``centre`` (``CENTRE_RULES``); ``centre`` was measured the same way."""

    def factor(self, spread: float) -> float:
        """The uniform scale that takes an object of ``spread`` into this frame."""
        return self.spread / spread if self.scale else 1.0

    def __post_init__(self) -> None:
        if len(self.centre) != 3 or not all(math.isfinite(v) for v in self.centre):
            raise ValueError(f"a frame's centre is 3 finite numbers; got {self.centre!r}")
        if not (math.isfinite(self.spread) and self.spread > 0):
            raise ValueError(f"a frame's spread must be positive and finite; got {self.spread!r}")
        if self.rule not in CENTRE_RULES:
            raise ValueError(f"a frame's centre rule is one of {', '.join(CENTRE_RULES)}; got {self.rule!r}")


def frame_record(model, preset: str | None = None) -> dict[str, Any] | None:
    """The ``"frame"`` record in a HoloDiffusion model's info (``training_frame``), or None; with ``preset``, None
    also where the record names the presets it is used for (``"presets"``) and ``preset`` is not one of them."""
    rec = (getattr(model, "info", None) or {}).get("frame") or None
    if rec is None or preset is None or not rec.get("presets") or preset in rec["presets"]:
        return rec  # (a record naming no preset places every object, a custom preset's too)
    return None


def frame_presets(record: dict[str, Any]) -> tuple[str, ...]:
    """The presets whose objects a frame record places: those it names, or every preset where it names none (as
    records written before presets could be chosen do)."""
    from .pipeline import PRESETS

    return tuple(record.get("presets") or PRESETS)


def frame_of(model, preset: str | None = None) -> ObjectFrame | None:
    """The frame a HoloDiffusion model's training objects share (``holofusion calibrate``), or None where it has
    not been measured (then generated objects keep the place and size the model gave them), or, with ``preset``,
    where it is not used for that preset: a preset whose stages undo a model's bias in place can do worse moved
    (README, "Object frame"), so ``calibrate --frame-presets`` can name the presets it helps."""
    rec = frame_record(model, preset)
    if rec is None:
        return None
    return ObjectFrame(tuple(float(v) for v in rec["centre"]), float(rec["spread"]),  # type: ignore[arg-type]
                       bool(rec.get("scale", False)), str(rec.get("centre_rule", "centroid")))


def spread_of(points: Tensor) -> Tensor:
    """(B, P, 3) -> (B,): sqrt of the mean over the axes of each set's per-axis variance (the data's spread)."""
    return points.double().var(dim=1, unbiased=False).mean(-1).sqrt().to(points.dtype)


def box_centre(points: Tensor, weights: Tensor | None = None, q: float = BOX_QUANTILE) -> Tensor:
    """(N, 3) -> (3,): per axis, the midpoint of the ``q`` and 1 - ``q`` quantiles of ``points``, each counted with
    its weight (``weights`` (N,), e.g. the area a lattice crossing stands for; None: all alike)."""
    w = torch.ones(len(points), dtype=torch.float64) if weights is None else weights.double()
    cdf_at = torch.tensor([q, 1.0 - q], dtype=torch.float64) * w.sum()
    mids = []
    for axis in range(3):
        v, order = points[:, axis].double().sort()
        cdf = w[order].cumsum(0)
        lo, hi = v[torch.searchsorted(cdf, cdf_at).clamp(max=len(v) - 1)]
        mids.append((lo + hi) / 2)
    return torch.stack(mids)


def training_frame(model, data: str | Path, objects: int | None = None, points: int = 4096,
                   seed: int = 0, rule: str = "centroid") -> dict[str, Any]:
    """The frame of a HoloDiffusion model's training objects, measured on their point clouds alone (no view is
    read): the record kept in the model's info under ``"frame"``. Raises ``UserError`` where the objects' spreads
    vary by more than ``SPREAD_TOLERANCE``: they were not normalised to one frame, and moving every generated object
    into their mean one would erase sizes the data hold."""
    from .evaluate import training_categories, training_point_clouds

    p = training_point_clouds(model, data, objects, points, seed)[0].double()
    if len(p) < 2:
        raise UserError(f"--data {str(data)!r}: the frame needs the point clouds of at least 2 training objects of "
                        f"{', '.join(training_categories(model))}; found {len(p)}")
    if rule not in CENTRE_RULES:
        raise ValueError(f"rule must be one of {', '.join(CENTRE_RULES)}; got {rule!r}")
    centres = p.mean(1) if rule == "centroid" else torch.stack([box_centre(x) for x in p])
    spreads = spread_of(p)
    variation = float(spreads.std() / spreads.mean())
    if variation > SPREAD_TOLERANCE:
        raise UserError(f"--data {str(data)!r}: the training objects' spreads vary by {variation:.1%} (coefficient of "
                        f"variation over {len(p)} objects; at most {SPREAD_TOLERANCE:.0%} counts as one frame): their "
                        "worlds were not normalised to one size, so generated objects keep the sizes the model gives "
                        "them and no frame is written")
    rec = {"centre": [round(float(v), 6) for v in centres.mean(0)], "spread": round(float(spreads.mean()), 6),
           "spread_variation": round(variation, 6),
           "centre_deviation": round(float((centres - centres.mean(0)).norm(dim=-1).mean()), 6),
           "objects": len(p), "points": points, "split": "train", "data": str(Path(data).resolve())}
    if rule != "centroid":  # (only then: records written before there was a choice read as centroids)
        rec["centre_rule"] = rule
    return rec


def surface_frame(grid: VoxelGrid, decoder, activation: str, opacity_length: float,
                  lattice: int = 64, rule: str = "centroid") -> tuple[Tensor, float] | None:
    """(centre (3,), spread) of a one-object grid's surface at ``opacity_length``, floaters dropped as in meshes and
    measurements: the area-weighted moments of every crossing of the level on the ``lattice``^3 lattice of the
    evaluation's surfaces (``evaluate.level_set_crossings``), so no random draw; None where it has no surface. The
    centre by ``rule`` (``CENTRE_RULES``: the centroid, or the weighted ``box_centre``); the spread is always about
    the centroid, as the training objects' is."""
    from .evaluate import SurfaceConfig, density_lattice, density_level, drop_floaters, level_set_crossings

    if rule not in CENTRE_RULES:
        raise ValueError(f"rule must be one of {', '.join(CENTRE_RULES)}; got {rule!r}")
    level = density_level(opacity_length)
    with torch.no_grad():
        sigma = density_lattice(grid, decoder, activation, lattice)[0].cpu()
    sigma = drop_floaters(sigma, level, SurfaceConfig.min_component)
    found = level_set_crossings(sigma, grid.box_min, grid.box_max, level)
    if found is None:
        return None
    p, w = found[0].double(), found[1].double()
    w = w / w.sum()
    centre = (w[:, None] * p).sum(0)
    variance = (w[:, None] * (p - centre).square()).sum(0)
    if rule == "box":
        centre = box_centre(p, w)
    return centre, float(variance.mean().sqrt())


def place_in_frame(grid: VoxelGrid, centre: Tensor, spread: float, frame: ObjectFrame) -> VoxelGrid:
    """The same field with its box moved and scaled uniformly so that a surface of ``centre`` and ``spread`` lands
    on ``frame``: x -> frame.centre + (x - centre) * frame.spread / spread. The features are shared, not copied."""
    k = frame.factor(spread)
    c = [float(v) for v in centre]
    box_min = tuple(f + (b - m) * k for f, b, m in zip(frame.centre, grid.box_min, c))
    box_max = tuple(f + (b - m) * k for f, b, m in zip(frame.centre, grid.box_max, c))
    return VoxelGrid(grid.features, box_min, box_max)  # type: ignore[arg-type]


def cameras_in_frame(cameras, centre: Tensor, spread: float, frame: ObjectFrame):
    """``cameras`` moved with the world of ``place_in_frame``: every view of the moved object is the image it was.
    The world scales by k about ``centre``, so camera space scales by k too, which a perspective projection does not
    see: with X_cam = X_world R + T, T' = k (centre R + T) - frame.centre R."""
    from dataclasses import replace

    k = frame.factor(spread)
    c = centre.to(cameras.R.dtype).to(cameras.R.device)
    f = torch.tensor(frame.centre, dtype=cameras.R.dtype, device=cameras.R.device)
    return replace(cameras, T=k * (c @ cameras.R + cameras.T) - f @ cameras.R)
