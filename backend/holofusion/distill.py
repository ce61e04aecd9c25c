"""Distillation: K super-resolved views -> one high-resolution grid (HoloFusion, sec. 3.3).

The views are super-resolved one by one, so they disagree a little (a speckle here, an edge a pixel off there); a
single grid fitted to all of them is consistent from every side by construction. The grid is explicit, with no
network: R^3 cells of (raw density, colour logits), rendered by the same ray marcher as the coarse grids through
``ExplicitField`` (trilinear interpolation of the raw values, then softplus and sigmoid, as in DVGO / Plenoxels).

- **Initialisation**: the coarse model's decoded density and albedo at the R^3 cell centres of the cube around the
  object (``object_box``: about half the coarse box, so the cells are half as large), so the fit starts from the
  coarse object and only has to add detail; with ``colour_init`` "views", the colour of every cell near the surface
  is then baked from the views (``backproject_colour``: a visibility- and angle-weighted mean per cell), so the
  colour starts where all the views agree and the fit mostly refines silhouettes and edges.
- **Loss**: random square patches of the views. Each rendered patch is compared with its target at every shift of
  up to ``shift_tolerance`` pixels and the best shift counts, so a target a pixel off from the others does not
  blur the grid; a small total-variation term keeps empty space clean.
- **Re-sampling** (``resample_every``): render the current grid at every view, noise it to a level that decreases
  over the fit, and let the super-resolution model denoise it, conditioned on the view's coarse render (SDEdit,
  Meng et al. 2022). The new targets keep what the grid agrees on and redraw the rest, so the views are pulled
  toward one object instead of being averaged.
- **Synchronised phase** (``sync_steps``): all K views denoised together from their renders, the grid fitted to the
  denoised estimates after every sampler step and its renders put in their place, so that detail is added to one
  object rather than to K.
- **Stopping**: after the last re-sampling, when the loss (mean over a window) stops falling by ``tolerance``.

On the shipped apple models none of the re-sampling variants beat plain fitting on views held out of the fit, so
the presets fit without them, from baked colour (see the README's figures); the variants stay, measured and
tested, for models whose super-resolved views agree better.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cameras import PerspectiveCamera, look_at_cameras_on_sphere
from .configbase import DictConfig
from .grid import VoxelGrid
from .nets.decoder import DecoderOutput
from .render import RenderConfig, activate_density, render_grid

__all__ = ["DistillConfig", "ExplicitField", "DistillResult", "object_box", "initial_grid", "start_grid", "distill",
           "patch_loss", "backproject_colour", "sharpen_density", "sharpness", "sharpness_split", "rim_mask", "psnr",
           "view_cameras", "DistillCancelled", "GridFit"]

IterCallback = Callable[[int, int, "Tensor | None"], bool | None]
"""callback(iteration, total, preview image (H, W, 3) or None) -> False stops the fit."""


class DistillCancelled(RuntimeError):
    """Raised when the callback returns False."""


@dataclass
class DistillConfig(DictConfig):
    """How the high-resolution grid is fitted."""

    resolution: int = 64
    """R: the distilled grid has R^3 cells over the object's cube (``box_density``)."""
    box_density: float | None = 0.5
    """The distilled grid spans the cube around where the coarse density exceeds this (world units^-1, after the
    activation), padded by ``box_margin``; None: the coarse grid's whole box. The coarse box is about twice the
    object's size, so this halves the cells' size at the same R."""
    box_margin: float = 0.15
    """Padding of that cube, as a fraction of its side, on each side."""
    iterations: int = 300
    """Most optimizer steps (fewer when it converges)."""
    lr: float = 0.15
    """Adam learning rate on the raw grid values (explicit grids take large steps; 0.05 fitted a tiny test
    scene a third as far in 100 steps)."""
    patches: int = 12
    """Patches per step (spread over the views)."""
    patch_size: int = 16
    """Side of a patch in target pixels."""
    shift_tolerance: int = 1
    """Largest misalignment in pixels the loss forgives (0: plain per-pixel loss)."""
    sharpen: float = 1.0
    """Steepness of the start grid's rim (``sharpen_density``; 1: the coarse density as it is). The coarse density
    rises over about one coarse cell, a fog a few pixels wide at every silhouette that the patch fit, which the
    views' one-pixel disagreements keep from committing to an edge, leaves where it is; raised to this power about
    the surface level, the same surface starts out with a crisp rim (2 in ``high``; 3 made the rim cells take the
    background's colour from views a pixel off)."""
    sharpen_max: float = 30.0
    """Largest density (per world unit) the sharpened start grid takes: opaque within about a cell."""
    colour_resolution: int | None = None
    """Colour is fitted on its own Rc^3 grid over the same cube, upsampled (trilinear) to R^3 for rendering; None:
    R, one grid. Fewer colour cells than there are target pixels that see them keep the fit from turning the
    views' disagreement into per-cell speckle, while density keeps the fine grid for silhouettes."""
    colour_init: str = "coarse"
    """Where the colour the fit starts from comes from: "coarse" (the coarse model's decoded colour) or "views"
    (``backproject_colour``: each surface cell takes the visibility- and angle-weighted mean of the super-resolved
    views that see it, one closed-form average per cell instead of a gradient fit that lets noise into the cells
    few patches reach)."""
    backproject_power: float = 4.0
    """The angle weighting of "views": cos(normal, view direction) to this power, so that each cell is coloured
    mostly by the views that face it (sharp), not by the grazing ones (smeared)."""
    backproject_band: float = 1.5
    """The depth band of "views", in cells: a cell counts as seen where its depth lies within this of the rendered
    depth (a soft coarse surface spreads a ray's weight over a few cells behind it)."""
    colour_lr: float | None = None
    """Learning rate of the colour cells (None: ``lr``). Baked colour needs only small corrections; Adam's
    normalised steps at the full rate put back cell-sized noise."""
    loss: str = "l2"
    """Per-pixel error of the patch loss: "l2" (the views' mean) or "l1" (their median: where independently
    super-resolved views disagree, a detail one view drew does not smear into the others)."""
    tv_weight: float = 1e-4
    """Weight of the total-variation term on density."""
    tv_colour_weight: float | None = None
    """Weight of the total-variation term on the colour logits (None: ``tv_weight``). Independently super-resolved
    views disagree most in small colour detail; fitted freely, that disagreement becomes cell-sized speckle."""
    resample_every: int = 100
    """Steps between re-samplings of the targets (0: never)."""
    resample_strength: tuple[float, float] = (0.45, 0.15)
    """SDEdit noise level (fraction of T) of the first and of the last re-sampling; linear in between."""
    sr_steps: int = 10
    """Sampler steps of the super-resolution model per (re-)sampling."""
    sync_steps: int = 0
    """After the first fit: a synchronised phase of this many super-resolution sampler steps (0: none). All K
    views are denoised together from their renders noised to ``sync_strength``; after every step the grid is fitted
    to the K denoised estimates for ``sync_iterations`` steps and its renders replace them, so each view's next step
    continues from what all views agree on. Detail is added as the noise falls, one consistent object throughout
    (independently re-sampled targets, ``resample_every``, each add detail of their own)."""
    sync_strength: float = 0.6
    """Noise level (fraction of T) the synchronised phase starts from."""
    sync_iterations: int = 20
    """Fit steps after each synchronised sampler step."""
    tolerance: float = 0.005
    """Stop when the windowed loss falls by less than this fraction over a window (after the last re-sampling)."""
    window: int = 25
    """Steps per window of the stopping rule."""
    render: RenderConfig = field(default_factory=lambda: RenderConfig(n_coarse=32, n_fine=16, chunk_rays=2048))
    """Ray marching of the distilled grid while fitting."""

    def __post_init__(self) -> None:
        self.resample_strength = tuple(float(x) for x in self.resample_strength)
        if len(self.resample_strength) != 2 or not all(0 < x <= 1 for x in self.resample_strength):
            raise ValueError(f"resample_strength must be two levels in (0, 1]; got {self.resample_strength}")
        if not 0 < self.sync_strength <= 1 or self.sync_steps < 0 or self.sync_iterations < 1:
            raise ValueError(f"sync_strength must be in (0, 1], sync_steps >= 0 and sync_iterations >= 1; got "
                             f"{self.sync_strength}, {self.sync_steps}, {self.sync_iterations}")
        if self.resolution < 4 or self.iterations < 1 or self.patches < 1 or self.patch_size < 2:
            raise ValueError("resolution >= 4, iterations >= 1, patches >= 1 and patch_size >= 2 are required")
        if not self.sharpen >= 1 or not self.sharpen_max > 0:
            raise ValueError(f"sharpen must be >= 1 and sharpen_max > 0; got {self.sharpen}, {self.sharpen_max}")
        if self.colour_resolution is not None and not 2 <= self.colour_resolution <= self.resolution:
            raise ValueError(f"colour_resolution must be between 2 and resolution ({self.resolution}); got "
                             f"{self.colour_resolution}")
        if self.colour_init not in ("coarse", "views"):
            raise ValueError(f"colour_init must be 'coarse' or 'views'; got {self.colour_init!r}")
        if self.loss not in ("l1", "l2"):
            raise ValueError(f"loss must be 'l1' or 'l2'; got {self.loss!r}")

    def to_dict(self):
        d = super().to_dict()
        d["render"]["background"] = list(d["render"]["background"])
        d["resample_strength"] = list(self.resample_strength)
        return d


class ExplicitField(nn.Module):
    """The "decoder" of an explicit grid: channel 0 is raw density, channels 1-3 colour logits (view-independent).

    Interchangeable with ``Decoder`` for the renderer, surface extraction and baking (``forward``, ``albedo``)."""

    channels = 4
    density_channel = 0
    """Density is channel 0 alone, untouched by the other channels (lets lookups of density only skip the rest)."""

    def forward(self, features: Tensor, directions: Tensor | None = None) -> DecoderOutput:
        return DecoderOutput(features[..., 0], torch.sigmoid(features[..., 1:4]), features[..., 4:4])

    def albedo(self, features: Tensor) -> Tensor:
        return torch.sigmoid(features[..., 1:4])

    mean_colour = albedo  # view-independent already


@dataclass
class DistillResult:
    """A fitted grid: ``grid`` (1, 4, R, R, R) explicit, to render with ``ExplicitField``; ``targets`` the last
    (re-sampled) views (K, 3, H, W); ``losses`` per step; ``iterations`` run; ``converged`` early."""

    grid: VoxelGrid
    targets: Tensor
    losses: list[float]
    iterations: int
    converged: bool


def _logit(x: Tensor, eps: float = 1e-3) -> Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x) - torch.log1p(-x)


@torch.no_grad()
def object_box(coarse: VoxelGrid, decoder: nn.Module, density: float, margin: float, probe: int = 48,
               activation: str = "softplus") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(box_min, box_max) of the cube around the cells of a ``probe``^3 lattice where the coarse grid's activated
    density exceeds ``density``, padded by ``margin`` of its side (and a probe cell) and kept inside the coarse
    box; the coarse box itself when nothing is that dense."""

    shell = VoxelGrid(torch.zeros(1, 1, probe, probe, probe, device=coarse.device), coarse.box_min, coarse.box_max)
    pts = shell.cell_centers()
    sigma = activate_density(decoder(coarse.sample(pts[None])[0]).density_raw, activation)
    dense = pts[sigma > density]
    lo_box, hi_box = torch.tensor(coarse.box_min), torch.tensor(coarse.box_max)
    if dense.shape[0] == 0:
        return coarse.box_min, coarse.box_max
    cell = (hi_box - lo_box) / probe
    lo, hi = dense.min(0).values.cpu() - cell, dense.max(0).values.cpu() + cell
    centre, side = (lo + hi) / 2, float((hi - lo).max()) * (1 + 2 * margin)
    side = min(side, float((hi_box - lo_box).min()))
    lo = torch.maximum(centre - side / 2, lo_box)
    lo = torch.minimum(lo, hi_box - side)  # shifted back inside, same side
    return tuple(lo.tolist()), tuple((lo + side).tolist())


@torch.no_grad()
def initial_grid(coarse: VoxelGrid, decoder: nn.Module, resolution: int, chunk: int = 65536,
                 box: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> VoxelGrid:
    """The coarse grid's decoded fields (raw density, albedo logits) at the cell centres of an R^3 grid over ``box``
    (default: the coarse grid's box; see ``object_box``): (1, 4, R, R, R). ``decoder`` is the coarse model's
    (density before activation, as ``RenderConfig``'s activation expects; the distilled grid uses the same
    activation)."""
    if coarse.batch_size != 1:
        raise ValueError(f"distil one object at a time; got a batch of {coarse.batch_size}")
    box_min, box_max = box if box is not None else (coarse.box_min, coarse.box_max)
    shell = VoxelGrid(torch.zeros(1, 1, resolution, resolution, resolution, device=coarse.device), box_min, box_max)
    pts = shell.cell_centers()
    raws, cols = [], []
    for start in range(0, pts.shape[0], chunk):
        feats = coarse.sample(pts[start:start + chunk][None])[0]
        out = decoder(feats)
        raws.append(out.density_raw)
        # The colour the coarse renders show (the views to fit are renders), not the baker's albedo.
        cols.append(decoder.mean_colour(feats))
    raw = torch.cat(raws).view(1, 1, resolution, resolution, resolution)
    rgb = torch.cat(cols).T.reshape(1, 3, resolution, resolution, resolution)
    return VoxelGrid(torch.cat([raw, _logit(rgb)], 1).float(), box_min, box_max)


def _inverse_activation(sigma: Tensor, activation: str) -> Tensor:
    """Raw density whose activation is ``sigma`` (> 0)."""
    if activation == "softplus":
        return torch.where(sigma > 20, sigma, torch.log(torch.expm1(sigma.clamp_max(20))))
    if activation == "exp":
        return sigma.log()
    return sigma  # relu


@torch.no_grad()
def sharpen_density(grid: VoxelGrid, level: float, power: float, sigma_max: float = 30.0,
                    activation: str = "softplus", floor: float = 1e-4) -> VoxelGrid:
    """The explicit ``grid`` with its density sigma replaced by level * (sigma / level) ** power, capped at
    ``sigma_max`` and floored at ``floor``: the level set at ``level`` (the surface meshes are cut at) stays where
    it is, and the density crosses it ``power`` times as steeply, so a fog-edged coarse surface becomes a crisp one
    in place. Colour is untouched."""
    feats = grid.features
    sigma = activate_density(feats[:, :1], activation).clamp_min(floor)
    sharp = (level * (sigma / level) ** power).clamp(floor, sigma_max)
    raw = _inverse_activation(sharp, activation)
    return VoxelGrid(torch.cat([raw, feats[:, 1:]], 1), grid.box_min, grid.box_max)


def start_grid(coarse: VoxelGrid, decoder: nn.Module, config: DistillConfig, level: float | None = None) -> VoxelGrid:
    """The grid a fit with ``config`` starts from: ``initial_grid`` over ``object_box`` (or the whole coarse box),
    its rim sharpened about the surface density ``level`` (per world unit) when ``config.sharpen`` > 1."""
    box = None
    if config.box_density is not None:
        box = object_box(coarse, decoder, config.box_density, config.box_margin,
                         activation=config.render.density_activation)
    init = initial_grid(coarse, decoder, config.resolution, box=box)
    if config.sharpen > 1:
        if level is None:
            raise ValueError("sharpening the start grid needs the surface level (density per world unit)")
        init = sharpen_density(init, level, config.sharpen, config.sharpen_max, config.render.density_activation)
    return init


@torch.no_grad()
def backproject_colour(grid: VoxelGrid, views: Tensor, cameras: PerspectiveCamera, render: RenderConfig,
                       power: float = 4.0, band: float = 1.5) -> VoxelGrid:
    """The explicit ``grid`` with the colour of every cell near its surface replaced by the weighted mean of the
    K ``views`` (K, 3, H, W) at the cell's projection: a texture bake into the grid.

    A cell counts as seen by a view where its z-depth lies within ``band`` cells of the grid's rendered depth
    there (a shadow-map test) and the pixel is covered (alpha > 0.5); its weight is the cosine between the
    density's outward normal and the direction to the camera, to the ``power``. Cells no view sees keep their
    colour."""
    feats = grid.features
    r = feats.shape[-1]
    out = render_grid(grid, ExplicitField(), cameras, render)
    k, h, w = len(cameras), *cameras.image_size
    depth = out.depth.reshape(k, 1, h, w)
    alpha = out.alpha.reshape(k, 1, h, w)
    pts = grid.cell_centers()
    cell = float(max(b - a for a, b in zip(grid.box_min, grid.box_max))) / r
    # Outward normal: minus the gradient of the activated density, box-blurred so that it is defined over the
    # few cells a ray crosses before it is opaque, not only at the one cell where density jumps (cells are
    # (z, y, x)-ordered, x fastest).
    sigma = activate_density(feats[:, :1], render.density_activation)
    sigma = F.avg_pool3d(sigma, 5, stride=1, padding=2, count_include_pad=False)[0, 0]
    gz, gy, gx = torch.gradient(sigma, dim=(0, 1, 2))
    normal = -F.normalize(torch.stack([gx, gy, gz], -1).reshape(-1, 3), dim=-1)
    num = torch.zeros(pts.shape[0], 3, device=feats.device)
    den = torch.zeros(pts.shape[0], device=feats.device)
    centres = cameras.center()
    for v in range(k):
        uv, z = cameras[v].project(pts, return_depth=True)
        # grid_sample's [-1, 1] spans the image's outer pixel edges (align_corners=False).
        g = torch.stack([uv[:, 0] / w * 2 - 1, uv[:, 1] / h * 2 - 1], -1)[None, None]
        d = F.grid_sample(depth[v:v + 1], g, align_corners=False, padding_mode="border")[0, 0, 0]
        a = F.grid_sample(alpha[v:v + 1], g, align_corners=False)[0, 0, 0]
        rgb = F.grid_sample(views[v:v + 1].to(feats.device), g, align_corners=False, padding_mode="border")[0, :, 0].T
        inside = (g.abs() <= 1).all(-1)[0, 0]
        seen = inside & (a > 0.5) & ((z - d).abs() < band * cell) & (z > 0)
        # A floor on the cosine: a seen cell whose normal is unclear still takes the views' mean.
        cos = (normal * F.normalize(centres[v] - pts, dim=-1)).sum(-1).clamp_min(0.05)
        wgt = torch.where(seen, cos ** power, torch.zeros_like(cos))
        num += wgt[:, None] * rgb
        den += wgt
    has = den > 1e-6
    colour = feats[0, 1:].reshape(3, -1).T.clone()
    colour[has] = _logit(num[has] / den[has, None])
    new = torch.cat([feats[:, :1], colour.T.reshape(1, 3, *feats.shape[2:])], 1)
    return VoxelGrid(new, grid.box_min, grid.box_max)


def view_cameras(k: int, distance: float, focal: float, size: int, elevation_deg: tuple[float, float] = (-5, 50),
                 at: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> PerspectiveCamera:
    """K cameras spread evenly over a band of the sphere around ``at`` (a Fibonacci spiral in elevation), looking
    at it: the views to super-resolve and distil."""
    return look_at_cameras_on_sphere(k, distance, focal, (size, size), elevation_deg, at)


def patch_loss(render: Tensor, target: Tensor, shift: int, kind: str = "l2") -> Tensor:
    """Shift-tolerant patch error: render (N, 3, p + 2s, p + 2s), target (N, 3, p, p) -> (N,), the smallest mean
    squared (``kind`` "l2") or absolute ("l1") error of the target against the render's p x p windows at shifts
    within +-s pixels."""
    p = target.shape[-1]
    errs = []
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            d = render[..., dy:dy + p, dx:dx + p] - target
            errs.append((d.abs() if kind == "l1" else d ** 2).mean(dim=(1, 2, 3)))
    return torch.stack(errs, 1).min(1).values


def _tv(x: Tensor) -> Tensor:
    return ((x[:, :, 1:] - x[:, :, :-1]) ** 2).mean() + ((x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2).mean() + \
        ((x[..., 1:] - x[..., :-1]) ** 2).mean()


def _patch_pixels(corner: Tensor, size: int) -> Tensor:
    """(N, 2) top-left pixel corners -> (N, size * size, 2) pixel-centre coordinates of each patch, row-major."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    offs = torch.stack([xx, yy], -1).reshape(-1, 2).float() + 0.5
    return corner[:, None, :].float() + offs[None]


class GridFit:
    """The explicit grid being fitted and its optimizer: ``step(targets)`` takes one optimizer step on random
    patches of the K target views, ``render()`` renders the grid at all K views. ``distill`` drives it."""

    def __init__(self, init: VoxelGrid, cameras: PerspectiveCamera, config: DistillConfig,
                 generator: torch.Generator):
        self.cfg, self.cameras, self.generator = config, cameras, generator
        self.field = ExplicitField()
        self.box = (init.box_min, init.box_max)
        feats = init.features.detach()
        self.resolution = feats.shape[-1]
        rc = config.colour_resolution
        self.density = feats[:, :1].clone().requires_grad_(True)
        colour = feats[:, 1:] if rc in (None, self.resolution) else \
            F.interpolate(feats[:, 1:], size=(rc, rc, rc), mode="trilinear", align_corners=False)
        self.colour = colour.clone().requires_grad_(True)
        colour_lr = config.lr if config.colour_lr is None else config.colour_lr
        self.opt = torch.optim.Adam([{"params": [self.density]}, {"params": [self.colour], "lr": colour_lr}],
                                    lr=config.lr)
        self.losses: list[float] = []

    @property
    def params(self) -> Tensor:
        """(1, 4, R, R, R): density and colour logits on the fine grid (colour upsampled if it has its own)."""
        colour = self.colour
        if colour.shape[-1] != self.resolution:
            r = self.resolution
            colour = F.interpolate(colour, size=(r, r, r), mode="trilinear", align_corners=False)
        return torch.cat([self.density, colour], 1)

    @property
    def grid(self) -> VoxelGrid:
        return VoxelGrid(self.params, *self.box)

    def step(self, targets: Tensor) -> float:
        cfg, k = self.cfg, len(self.cameras)
        _, _, h, w = targets.shape
        s, p = cfg.shift_tolerance, cfg.patch_size
        gen, device = self.generator, self.density.device
        view = torch.randint(0, k, (cfg.patches,), generator=gen)
        corner = torch.stack([torch.randint(0, w - p - 2 * s + 1, (cfg.patches,), generator=gen),
                              torch.randint(0, h - p - 2 * s + 1, (cfg.patches,), generator=gen)], -1)
        xy = _patch_pixels(corner, p + 2 * s).to(device)
        # Every patch is a camera of its own over the one grid: B = 1 scene, V = patches.
        out = render_grid(self.grid, self.field, self.cameras[view.tolist()], cfg.render, xy, gen)
        rendered = out.rgb.view(cfg.patches, p + 2 * s, p + 2 * s, 3).permute(0, 3, 1, 2)
        tgt = torch.stack([targets[v, :, y + s:y + s + p, x + s:x + s + p]
                           for v, (x, y) in zip(view.tolist(), corner.tolist())])
        loss = patch_loss(rendered, tgt, s, cfg.loss).mean()
        if out.fine is not None:  # the coarse pass too, as the HoloDiffusion loss does
            coarse_rgb = out.coarse.rgb.view(cfg.patches, p + 2 * s, p + 2 * s, 3).permute(0, 3, 1, 2)
            loss = loss + patch_loss(coarse_rgb, tgt, s, cfg.loss).mean()
        tv_c = cfg.tv_weight if cfg.tv_colour_weight is None else cfg.tv_colour_weight
        # Channel-mean TV, weighted per kind (equal weights: the plain TV of all four channels).
        if cfg.tv_weight > 0:
            loss = loss + cfg.tv_weight * _tv(self.density) / 4
        if tv_c > 0:
            loss = loss + tv_c * _tv(self.colour) * 3 / 4
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    @torch.no_grad()
    def render(self, cameras: PerspectiveCamera | None = None) -> Tensor:
        """(K, 3, H, W) renders of the grid in [0, 1] at ``cameras`` (default: the K fitted views)."""
        out = render_grid(self.grid, self.field, self.cameras if cameras is None else cameras, self.cfg.render)
        return out.rgb.permute(0, 3, 1, 2).clamp(0, 1)


SyncSampler = Callable[[Tensor, float, int, Callable[[Tensor, int, int], Tensor]], Tensor]
"""sync(renders (K, 3, H, W), strength, steps, hook) -> final views: the super-resolution sampler run from the
renders noised to ``strength`` (SDEdit), calling hook(x0 images, step, total) after every denoising step and
continuing from the images the hook returns."""


def distill(init: VoxelGrid, targets: Tensor, cameras: PerspectiveCamera, config: DistillConfig,
            generator: torch.Generator, resample: Callable[[Tensor, float, int], Tensor] | None = None,
            callback: IterCallback | None = None, preview_every: int = 0,
            sync: SyncSampler | None = None) -> DistillResult:
    """Fits an explicit grid to K target views.

    init: (1, 4, R, R, R) explicit grid (``initial_grid``). targets: (K, 3, H, W) in [0, 1] of ``cameras`` (K, at
    H x W). resample(renders (K, 3, H, W), strength, round) -> new targets: the super-resolution model's SDEdit
    (None: keep the targets). sync: the synchronised phase's sampler (``SyncSampler``; used when
    ``config.sync_steps`` > 0). Every random draw (patches, ray jitter) comes from ``generator``.
    """
    cfg = config
    k, _, h, w = targets.shape
    if len(cameras) != k:
        raise ValueError(f"{k} targets but {len(cameras)} cameras")
    s, p = cfg.shift_tolerance, cfg.patch_size
    if p + 2 * s > min(h, w):
        raise ValueError(f"patch_size + 2 * shift_tolerance ({p + 2 * s}) exceeds the view size ({h} x {w})")
    targets = targets.to(init.device)
    if cfg.colour_init == "views":
        init = backproject_colour(init, targets, cameras, cfg.render, cfg.backproject_power, cfg.backproject_band)
    fit = GridFit(init, cameras, cfg, generator)
    rounds = (cfg.iterations - 1) // cfg.resample_every if (cfg.resample_every and resample is not None) else 0
    last_resample = rounds * cfg.resample_every
    synced = bool(cfg.sync_steps and sync is not None)
    total = cfg.iterations + (cfg.sync_steps + 1) * cfg.sync_iterations if synced else cfg.iterations
    count = 0

    def report() -> None:
        preview = None
        if preview_every and (count % preview_every == 0 or count == total):
            preview = fit.render(cameras[:1])[0].permute(1, 2, 0).cpu()
        if callback is not None and callback(count, total, preview) is False:
            raise DistillCancelled(f"distillation stopped by the callback after step {count} of {total}")

    converged = False
    for it in range(1, cfg.iterations + 1):
        if rounds and it > 1 and (it - 1) % cfg.resample_every == 0:
            r = (it - 1) // cfg.resample_every
            a, b = cfg.resample_strength
            strength = a + (b - a) * (r - 1) / max(1, rounds - 1)
            targets = resample(fit.render(), strength, r).to(init.device)
        fit.step(targets)
        count += 1
        report()
        n, losses = cfg.window, fit.losses
        if it >= last_resample + 2 * n and len(losses) >= 2 * n:
            prev, cur = sum(losses[-2 * n:-n]) / n, sum(losses[-n:]) / n
            if prev - cur < cfg.tolerance * prev:
                converged = True
                break
    if synced:
        # Early stopping shortens the first phase only; the progress total drops what it skipped.
        total -= cfg.iterations - count

        def hook(x0: Tensor, step: int, steps: int) -> Tensor:
            nonlocal count
            x0 = x0.to(init.device)
            with torch.enable_grad():  # the sampler runs under no_grad
                for _ in range(cfg.sync_iterations):
                    fit.step(x0)
                    count += 1
                    report()
            return fit.render()

        targets = sync(fit.render(), cfg.sync_strength, cfg.sync_steps, hook).to(init.device)
        for _ in range(cfg.sync_iterations):  # the last denoised views, fitted once more
            fit.step(targets)
            count += 1
            report()
    grid = VoxelGrid(fit.params.detach(), *fit.box)  # colour on the fine grid, whatever it was fitted on
    return DistillResult(grid, targets.detach(), fit.losses, count, converged)


def _gradient_magnitude(images: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, H - 1, W - 1): per pixel, the channels' mean forward-difference gradient magnitude."""
    gx = images[..., :, 1:] - images[..., :, :-1]
    gy = images[..., 1:, :] - images[..., :-1, :]
    return (gx[..., :-1, :] ** 2 + gy[..., :, :-1] ** 2).sqrt().mean(1)


def sharpness(images: Tensor) -> float:
    """Mean image-gradient magnitude of (N, 3, H, W) images (finite differences, per pixel): higher is sharper."""
    return float(_gradient_magnitude(images).mean())


def rim_mask(alpha: Tensor, width: int = 2) -> Tensor:
    """(N, 1, H, W) coverage -> (N, H - 1, W - 1) bool, aligned with ``sharpness``'s gradients: the pixels within
    ``width`` pixels of the silhouette (where coverage crosses 0.5)."""
    inside = (alpha > 0.5).float()
    k = 2 * width + 1
    grown, shrunk = F.max_pool2d(inside, k, 1, width), -F.max_pool2d(-inside, k, 1, width)
    return (grown - shrunk)[:, 0, :-1, :-1] > 0


def sharpness_split(images: Tensor, rim: Tensor) -> tuple[float, float]:
    """``sharpness`` of (N, 3, H, W) images split by a ``rim_mask``: (rim part, the rest), each a sum over its
    pixels divided by all pixels, so that the two add up to ``sharpness``."""
    g = _gradient_magnitude(images)
    return float(g[rim].sum()) / g.numel(), float(g[~rim].sum()) / g.numel()


def psnr(a: Tensor, b: Tensor) -> float:
    mse = float(F.mse_loss(a, b))
    return 10 * math.log10(1.0 / max(mse, 1e-12))
