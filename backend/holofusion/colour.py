"""Colour calibration: making a model's colours those of the objects it learned from.

Why. A trained model's colours are brighter than the objects': the shipped hydrant autoencoder gives its own training
objects surface colours 0.06 brighter in each of R, G and B than their point clouds, and its samples inherit that
(``holofusion evaluate`` then tells samples from real objects by colour alone). The training images are the cause: at
64 px many object pixels are blended with the white background, and a coarse grid explains that white partly as
surface colour. The bias is systematic (the same sign on every object, whatever the view direction: the colour
averaged over the front half-sphere or its median over directions carry it alike), so it is measured once per model
on training objects and undone at the end of the pipeline.

What. A ``ColourMap`` is, per channel, an affine map of the colour's logit: c' = sigmoid(a logit(c) + b). Acting on
logits, not on colours, lets it be folded exactly into both kinds of field the pipeline ends in: the coarse
decoder's colour layers (``map_decoder``: the colour logit is linear in them) and a distilled grid's colour logits
(``map_explicit_grid``), so renders, surfaces, textures and previews all carry it with no extra step.

How it is fitted (``fit_colour_map``). Each channel's logits of the model's colours on calibration objects are
matched to those of the objects' true colours quantile by quantile (least squares over the 5th to 95th percentiles,
which leaves out the clipped ends where a logit is +-inf): the map carries the distribution of the made colours onto
the true one, contrast as well as brightness, and needs no point-to-point matching (which a reconstruction's small
misplacements would blur into a contrast loss).

Where from. Each preset gets its own map, since the later stages undo part of the coarse bias, and a map is
measured one of two ways (``holofusion calibrate --source``). ``calibrate_colour_on_samples`` (the default) runs the
preset on seeds that evaluations do not use and matches its samples' colours to those of training objects: it
measures what users get. ``calibrate_colour`` measures reconstructions of training objects instead (``draft``: the
autoencoder's grids coloured by the decoder; ``standard`` and ``high``: that preset's super-resolution and
distillation run on those grids); that needs the training views and fewer objects, but on the hydrant samples came
out darker than reconstructions and its map over-corrected them. Held-out objects are never used. Maps live in the
HoloDiffusion model's info under ``"colour"``, by preset (``holofusion calibrate``); a preset without one is left as
it is.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .grid import VoxelGrid

__all__ = [
    "ColourMap", "fit_colour_map", "map_decoder", "map_explicit_grid", "colour_map_of", "calibrate_colour",
    "calibrate_colour_on_samples", "training_colours", "measurable_presets", "QUANTILES",
]

QUANTILES = np.linspace(0.05, 0.95, 91)
"""The quantiles ``fit_colour_map`` matches (the clipped ends left out)."""

_EPS = 1.0 / 512
"""Colours are clamped to [eps, 1 - eps] before their logit: 8-bit colours of 0 and 255 stay finite."""


def _logit(x: Tensor) -> Tensor:
    x = x.clamp(_EPS, 1 - _EPS)
    return torch.log(x) - torch.log1p(-x)


@dataclass(frozen=True)
class ColourMap:
    """Per channel (R, G, B): c' = sigmoid(scale * logit(c) + shift)."""

    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if len(self.scale) != 3 or len(self.shift) != 3:
            raise ValueError(f"a colour map has 3 scales and 3 shifts; got {self.scale}, {self.shift}")
        if not all(math.isfinite(v) for v in (*self.scale, *self.shift)) or min(self.scale) <= 0:
            raise ValueError(f"a colour map's scales must be positive and finite, its shifts finite; got "
                             f"{self.scale}, {self.shift}")

    @property
    def is_identity(self) -> bool:
        return self.scale == (1.0, 1.0, 1.0) and self.shift == (0.0, 0.0, 0.0)

    def _ab(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.tensor(self.scale, dtype=like.dtype, device=like.device),
                torch.tensor(self.shift, dtype=like.dtype, device=like.device))

    def apply_logits(self, logits: Tensor) -> Tensor:
        """(..., 3) colour logits -> mapped logits."""
        a, b = self._ab(logits)
        return logits * a + b

    def apply(self, rgb: Tensor) -> Tensor:
        """(..., 3) colours in [0, 1] -> mapped colours."""
        return torch.sigmoid(self.apply_logits(_logit(rgb.float()))).to(rgb.dtype)

    def to_record(self) -> dict[str, list[float]]:
        return {"scale": [round(v, 6) for v in self.scale], "shift": [round(v, 6) for v in self.shift]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ColourMap:
        try:
            return cls(tuple(float(v) for v in record["scale"]), tuple(float(v) for v in record["shift"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a colour map record: {record!r} ({e})") from None


def fit_colour_map(made: Tensor, true: Tensor, quantiles: Sequence[float] = QUANTILES,
                   scale_range: tuple[float, float] = (0.5, 2.0)) -> ColourMap:
    """The map carrying the colours ``made`` (N, 3) onto the distribution of ``true`` (M, 3), both in [0, 1]: per
    channel, the least-squares line through (logit quantile of made, logit quantile of true). The scale is kept in
    ``scale_range``: a channel of nearly one colour (a flat made distribution) must not be stretched without bound."""
    if made.ndim != 2 or true.ndim != 2 or made.shape[1] != 3 or true.shape[1] != 3 or not len(made) or not len(true):
        raise ValueError(f"need (N, 3) and (M, 3) colours; got {tuple(made.shape)} and {tuple(true.shape)}")
    q = torch.tensor(np.asarray(quantiles, dtype=np.float64))
    x = torch.quantile(_logit(made.double()), q, dim=0)  # (Q, 3)
    y = torch.quantile(_logit(true.double()), q, dim=0)
    scale, shift = [], []
    for c in range(3):
        xc, yc = x[:, c], y[:, c]
        var = float(((xc - xc.mean()) ** 2).sum())
        a = float(((xc - xc.mean()) * (yc - yc.mean())).sum()) / var if var > 1e-12 else 1.0
        a = min(max(a, scale_range[0]), scale_range[1])
        scale.append(a)
        shift.append(float(yc.mean() - a * xc.mean()))
    return ColourMap(tuple(scale), tuple(shift))


@torch.no_grad()
def map_decoder(decoder: torch.nn.Module, cmap: ColourMap) -> torch.nn.Module:
    """A copy of a ``Decoder`` whose rendered colour is ``cmap`` of the original's, for every view direction.

    The colour logit is albedo_logit + view_out(...), both linear in their last layer's weights: scaling those rows
    by a and adding b to the albedo bias gives a * logit + b exactly. The original is left untouched (the
    super-resolution model and distillation read the colours it was trained on)."""
    out = copy.deepcopy(decoder)
    a, b = cmap._ab(out.head.weight)
    lo = out._split[0]  # the head's rows: density, albedo logits (3), features, view branch
    out.head.weight[lo:lo + 3] *= a[:, None]
    out.head.bias[lo:lo + 3] = out.head.bias[lo:lo + 3] * a + b
    if out.view_dependent:
        out.view_out.weight *= a[:, None]
        out.view_out.bias *= a
    return out


def map_explicit_grid(grid: VoxelGrid, cmap: ColourMap) -> VoxelGrid:
    """A distilled grid (1, 4, R, R, R: density, colour logits) with ``cmap`` applied to its colour logits."""
    f = grid.features.clone()
    a, b = cmap._ab(f)
    f[:, 1:4] = f[:, 1:4] * a[None, :, None, None, None] + b[None, :, None, None, None]
    return VoxelGrid(f, grid.box_min, grid.box_max)


def colour_map_of(model, preset: str) -> ColourMap | None:
    """The map ``holofusion calibrate`` stored for ``preset`` in a HoloDiffusion model's info, else None."""
    record = ((getattr(model, "info", None) or {}).get("colour") or {}).get(preset)
    return ColourMap.from_record(record) if record else None


def measurable_presets(pipe, names: Sequence[str], what: str = "preset") -> dict[str, Any]:
    """{name: Preset} for preset ``names`` that ``pipe`` can run, else a ``UserError`` starting with ``what`` (the
    option the names came from): an unknown name, or a super-resolved preset without a super-resolution model."""
    from .errors import UserError
    from .pipeline import PRESETS

    table = {}
    for name in names:
        if name not in PRESETS:
            raise UserError(f"{what}: {name!r} is not a preset; choose from {', '.join(PRESETS)}")
        if PRESETS[name].superres and pipe.sr_for(PRESETS[name]) is None:
            raise UserError(f"{what} {name}: that preset needs a super-resolution model, and the model is not a "
                            "model folder with a superres.safetensors; give the folder, or only draft")
        table[name] = PRESETS[name]
    return table


def training_colours(model, data, objects: int | None = None, points: int = 1024, seed: int = 0) -> Tensor:
    """True colours (B, points, 3) in [0, 1] of ``objects`` training objects of a HoloDiffusion model's categories
    (default: every training object), read off their point clouds alone (``evaluate.training_point_clouds``): what
    ``calibrate_colour_on_samples`` matches samples to. No view is loaded, so a dataset made with few, small views
    serves as well."""
    from .errors import UserError
    from .evaluate import training_categories, training_point_clouds

    _, colours = training_point_clouds(model, data, objects, points, seed, coloured=True)
    if colours is None:
        raise UserError(f"--data {str(data)!r}: no training point cloud of {', '.join(training_categories(model))} "
                        "with colours to calibrate on")
    return colours


def _surface_colours(pipe, grid: VoxelGrid, seed: int, pre, scfg) -> Tensor | None:
    """The colours (P, 3) of the surface ``pre`` makes from a coarse grid (object ``seed``), before any colour map:
    the coarse decoder's for draft, the distilled grid's after stages 2 and 3 otherwise; None where it is empty."""
    from .distill import ExplicitField
    from .evaluate import surface_points

    hd = pipe.hd
    if pre.superres:
        grid = pipe.refine(grid, seed, pre)[2]
        field, activation = ExplicitField(), "softplus"
    else:
        field, activation = hd.decoder, hd.config.render.density_activation
    with torch.no_grad():
        found = surface_points(grid, field, activation, scfg, [torch.Generator().manual_seed(seed)])
    return None if bool(found.empty[0]) else found.colours[0]


def _map_record(pipe, name: str, pre, made: list[Tensor], true: Tensor, **about: Any) -> dict[str, Any]:
    """Fits the map of ``made`` colours onto ``true`` (N, 3) and the record ``holofusion calibrate`` stores."""
    from .errors import UserError
    from .evaluate import weights_digest

    if not made:
        raise UserError(f"no calibration object has a surface under preset {name!r}: nothing to fit colours on")
    m = torch.cat(made)
    cmap = fit_colour_map(m, true)
    record: dict[str, Any] = {**cmap.to_record(), **about, "objects": len(made),
                              "error_before": [round(float(v), 4) for v in m.mean(0) - true.mean(0)],
                              "error_after": [round(float(v), 4) for v in cmap.apply(m).mean(0) - true.mean(0)]}
    if pre.superres:
        record["superres"] = weights_digest(pipe.sr_for(pre))
    return record


def _surface_config(pipe, opacity_length: float | None, points: int):
    from .evaluate import SurfaceConfig, opacity_length_of

    return SurfaceConfig(points=points, opacity_length=opacity_length or opacity_length_of(pipe.hd))


def _table(pipe, presets: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    return dict(presets) if isinstance(presets, Mapping) else measurable_presets(pipe, presets)


def calibrate_colour(pipe, z: Tensor, truth: Tensor, presets: Sequence[str] | Mapping[str, Any],
                     opacity_length: float | None = None, points: int = 1024,
                     progress: bool = True) -> dict[str, dict[str, Any]]:
    """The colour map of each of ``presets``, measured on reconstructions of training objects: their encoder-space
    grids z (B, C, S, S, S) and true colours (B, P, 3) (``evaluate.training_reconstructions``).

    ``draft`` maps the coarse field's colours (the decoder's, at the surface) onto the true ones; a preset with
    super-resolution first runs its stages 2 and 3 on each grid as the pipeline would on a sample (object i's views
    seeded with i) and maps the distilled surface's colours. Surfaces are cut at the model's level (or
    ``opacity_length``) as evaluations cut them. Returns {preset: record} for the model's info under ``"colour"``:
    the map, the objects measured, the mean colour error (made minus true, per channel) before and after, and for a
    super-resolved preset the digest of the super-resolution model it was measured with (``HoloFusionPipeline``
    applies the map only with that model). ``presets`` are names of ``PRESETS``, or {name: Preset} to measure
    other settings under a name.

    A reconstruction is not a sample: on the hydrant, samples came out darker than reconstructions, and this map
    over-corrected them (``calibrate_colour_on_samples`` measures the samples themselves)."""
    from tqdm import tqdm

    scfg = _surface_config(pipe, opacity_length, points)
    grids = pipe.hd.to_grid(z)
    records: dict[str, dict[str, Any]] = {}
    for name, pre in _table(pipe, presets).items():
        made, true = [], []
        for i in tqdm(range(len(z)), desc=f"colour of {name}", unit="obj", disable=not progress):
            found = _surface_colours(pipe, VoxelGrid(grids.features[i:i + 1], grids.box_min, grids.box_max), i,
                                     pre, scfg)
            if found is not None:
                made.append(found)
                true.append(truth[i].float())
        records[name] = _map_record(pipe, name, pre, made, torch.cat(true) if true else torch.empty(0, 3),
                                    source="reconstructions")
    return records


def calibrate_colour_on_samples(pipe, seeds: Sequence[int], truth: Tensor,
                                presets: Sequence[str] | Mapping[str, Any], opacity_length: float | None = None,
                                points: int = 1024, progress: bool = True) -> dict[str, dict[str, Any]]:
    """The colour map of each of ``presets``, measured on its own samples: the objects the preset makes for
    ``seeds`` (the model's categories in turn), their surface colours before any map matched, as a distribution,
    to the colours of training objects ``truth`` (B, P, 3) (``training_colours``). Samples and training objects
    need no pairing (the fit matches quantiles), so the map undoes what sampling adds to the model's colour bias
    as well as the bias itself. Keep ``seeds`` apart from the seeds evaluations measure. Returns {preset: record}
    as ``calibrate_colour`` does, with the seeds and the number of training objects."""
    from tqdm import tqdm

    scfg = _surface_config(pipe, opacity_length, points)
    cats = pipe.categories or [None]
    true = truth.reshape(-1, 3).float()
    records: dict[str, dict[str, Any]] = {}
    coarse: dict[tuple, VoxelGrid] = {}  # presets sampling alike (draft and standard) share their coarse grids
    for name, pre in _table(pipe, presets).items():
        made = []
        for i, s in enumerate(tqdm(seeds, desc=f"colour of {name} samples", unit="obj", disable=not progress)):
            at = (int(s), cats[i % len(cats)], pre.coarse_steps, pre.autoguidance)
            if at not in coarse:
                coarse[at] = pipe.coarse(*at[:3], None, at[3])
            found = _surface_colours(pipe, coarse[at], int(s), pre, scfg)
            if found is not None:
                made.append(found)
        records[name] = _map_record(pipe, name, pre, made, true, source="samples",
                                    seeds=[int(min(seeds)), int(max(seeds))], references=len(truth))
    return records
