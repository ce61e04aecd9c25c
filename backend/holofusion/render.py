"""Emission-absorption ray marching of feature voxel grids (pure torch, batched over scenes and cameras, chunked).

Rays follow `holofusion.cameras`: a point on a ray is `origin + t * direction` where the direction's camera-space z
component is 1, so `t` *is* z-depth and `|direction| >= 1` converts t-spacing to distance. Each ray is clipped to the
grid's box (slab method); a ray missing the box gets background colour, alpha 0 and depth 0.

Quadrature: sample i (sorted depths t_i) stands for the interval between the midpoints to its neighbours, the first
interval starting at `near` and the last ending at `far`, so the intervals tile [near, far] exactly:
    tau_i = sigma_i * delta_i * |d|,  T_i = exp(-sum_{j<i} tau_j),  w_i = T_i * (1 - exp(-tau_i))
    rgb = sum_i w_i c_i + T_final * background,  alpha = 1 - T_final,  features = sum_i w_i f_i (background 0)
    depth = sum_i w_i t_i / alpha  (expected z-depth of what the ray hit; 0 where alpha <= DEPTH_ALPHA_EPS)
(Max 1995, "Optical models for direct volume rendering"; the NeRF form, Mildenhall et al. 2020, eq. 3.)

Sampling: `n_coarse` stratified samples in [near, far], then `n_fine` samples by inverse-CDF from the coarse weights
(NeRF's hierarchical sampling, sec. 5.2). The fine pass composites the union of both sets. Unlike NeRF there is one
field, so the coarse samples' decoder outputs are reused rather than evaluated again: the fine pass costs only
`n_fine` new field evaluations per ray. All random draws come from the `generator` argument; with `generator=None`
the jitter is replaced by bin midpoints and the inverse-CDF by evenly spaced quantiles, so renders are deterministic.

Speed (the renderer dominates training on a 2-core CPU; see benchmarks/bench_render.py): rays are marched in chunks of
about a thousand, which keep the working set near the cache; the trilinear lookup is a gather with a sparse
backward rather than `grid_sample`'s scalar 3-D CPU loop; and a `Decoder`'s first (linear) layer is applied to the
grid's cells once per render instead of to every sample (`RenderConfig.project_first`), its bias and ReLU fused
into the lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from holofusion.configbase import DictConfig
from holofusion.grid import SampleMode, VoxelGrid, gather_trilinear
from holofusion.nets.decoder import Decoder

__all__ = [
    "RenderConfig",
    "PassOutput",
    "RenderOutput",
    "FieldFn",
    "activate_density",
    "ray_box_intersection",
    "stratified_depths",
    "importance_depths",
    "composite",
    "march",
    "render_rays",
    "render_grid",
    "DEPTH_ALPHA_EPS",
]

DensityActivation = Literal["softplus", "relu", "exp"]
_ACTIVATIONS = ("softplus", "relu", "exp")

DEPTH_ALPHA_EPS = 1e-6
"""Rays whose alpha is at most this report depth 0 (CO3D's "no depth" value) instead of a ratio of tiny numbers."""

_EXP_MAX = 15.0  # exp(15) ~ 3e6 per world unit is opaque within a micron; beyond it only risks inf * 0 = nan

FieldFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
"""field_fn(points (R, S, 3) world, unit directions (R, 3)) -> (density (R, S) >= 0 per world unit,
rgb (R, S, 3) in [0, 1], features (R, S, F))."""


@dataclass
class RenderConfig(DictConfig):
    """How rays are sampled and composited."""

    n_coarse: int = 64
    """Stratified samples per ray between the ray's near and far (box entry and exit)."""
    n_fine: int = 64
    """Extra samples per ray drawn from the coarse weights; 0 skips the fine pass (`RenderOutput.fine` is None)."""
    chunk_rays: int = 1024
    """Rays marched at once over all scenes and cameras; bounds inference memory at any image size. About 1024
    keeps a chunk's working set near the cache of a small CPU: 2x faster forward+backward than 8192 on 2 cores."""
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """RGB in [0, 1] behind the volume (white, as HoloDiffusion renders CO3D)."""
    density_activation: DensityActivation = "softplus"
    """Map from the decoder's raw density to sigma >= 0: softplus (smooth, never dead), relu (exact zeros) or exp
    (raw clamped at 15 before exp)."""
    min_near: float = 0.0
    """Smallest depth t at which a ray may start (a camera inside the box starts here)."""
    pdf_floor: float = 1e-5
    """Added to every coarse weight before inverse-CDF sampling, so empty rays sample uniformly instead of 0/0."""
    project_first: bool = True
    """Let render_rays apply a `Decoder`'s first (linear) layer to the grid cells before interpolating, when there
    are fewer cells than samples and hidden_dim <= C; same result up to rounding, faster on CPU."""
    lookup: SampleMode = "auto"
    """Trilinear kernel (see VoxelGrid.sample): "auto" (grid_sample on CUDA, gather on CPU), "gather", "grid_sample"."""
    return_samples: bool = False
    """Also return per-sample weights and depths (for distortion / entropy regularisers); costs memory."""

    def __post_init__(self) -> None:
        if int(self.n_coarse) < 1:
            raise ValueError(f"RenderConfig.n_coarse must be >= 1, got {self.n_coarse!r}")
        if int(self.n_fine) < 0:
            raise ValueError(f"RenderConfig.n_fine must be >= 0, got {self.n_fine!r}")
        if int(self.chunk_rays) < 1:
            raise ValueError(f"RenderConfig.chunk_rays must be >= 1, got {self.chunk_rays!r}")
        if self.density_activation not in _ACTIVATIONS:
            raise ValueError(
                f"RenderConfig.density_activation must be one of {_ACTIVATIONS}, got {self.density_activation!r}"
            )
        bg = tuple(float(v) for v in self.background)
        if len(bg) != 3:
            raise ValueError(f"RenderConfig.background must be 3 numbers (r, g, b), got {self.background!r}")
        self.background = bg  # type: ignore[assignment]
        if self.lookup not in ("auto", "gather", "grid_sample"):
            raise ValueError(f"RenderConfig.lookup must be 'auto', 'gather' or 'grid_sample', got {self.lookup!r}")
        if self.min_near < 0 or self.pdf_floor <= 0:
            raise ValueError(
                f"RenderConfig needs min_near >= 0 and pdf_floor > 0, got {self.min_near}, {self.pdf_floor}"
            )




@dataclass
class PassOutput:
    """One pass's composited result for rays of leading shape (...): (R,), (B*V, N) or (B*V, H, W)."""

    rgb: Tensor
    """(..., 3) colour over the background."""
    alpha: Tensor
    """(..., 1) opacity = 1 - final transmittance; exactly 0 for empty space and for rays missing the box."""
    depth: Tensor
    """(..., 1) expected z-depth of what the ray hit (weights normalised by alpha); 0 where alpha <= 1e-6."""
    features: Tensor
    """(..., F) composited decoder features; the background contributes 0."""
    weights: Tensor | None = None
    """(..., S) compositing weight per sample in depth order (only with RenderConfig.return_samples)."""
    depths: Tensor | None = None
    """(..., S) sorted sample depths t (only with RenderConfig.return_samples)."""

    def map(self, fn: Callable[[Tensor], Tensor]) -> PassOutput:
        """Apply `fn` to every tensor field (reshape, slice...)."""
        return PassOutput(
            *(fn(v) if v is not None else None for v in (self.rgb, self.alpha, self.depth, self.features)),
            None if self.weights is None else fn(self.weights),
            None if self.depths is None else fn(self.depths),
        )

    @staticmethod
    def cat(parts: list[PassOutput], dim: int) -> PassOutput:
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return PassOutput(
            torch.cat([p.rgb for p in parts], dim),
            torch.cat([p.alpha for p in parts], dim),
            torch.cat([p.depth for p in parts], dim),
            torch.cat([p.features for p in parts], dim),
            None if first.weights is None else torch.cat([p.weights for p in parts], dim),  # type: ignore[misc]
            None if first.depths is None else torch.cat([p.depths for p in parts], dim),  # type: ignore[misc]
        )


@dataclass
class RenderOutput:
    """Coarse and fine results; the `rgb`/`alpha`/`depth`/`features` properties read the final (fine) pass."""

    coarse: PassOutput
    """The stratified pass (n_coarse samples per ray)."""
    fine: PassOutput | None
    """The pass over coarse + importance samples; None when n_fine = 0."""

    @property
    def final(self) -> PassOutput:
        """The fine pass, or the coarse pass when there is none."""
        return self.fine if self.fine is not None else self.coarse

    @property
    def rgb(self) -> Tensor:
        return self.final.rgb

    @property
    def alpha(self) -> Tensor:
        return self.final.alpha

    @property
    def depth(self) -> Tensor:
        return self.final.depth

    @property
    def features(self) -> Tensor:
        return self.final.features

    def map(self, fn: Callable[[Tensor], Tensor]) -> RenderOutput:
        return RenderOutput(self.coarse.map(fn), None if self.fine is None else self.fine.map(fn))


class CameraLike(Protocol):
    """What render_grid needs from `holofusion.cameras.PerspectiveCamera`."""

    image_size: Any

    def __len__(self) -> int: ...

    def rays(self, xy: Tensor | None = None) -> tuple[Tensor, Tensor]: ...


# --------------------------------------------------------------------------------------------------------------------
# building blocks


def activate_density(raw: Tensor, activation: DensityActivation = "softplus") -> Tensor:
    """Raw decoder density -> sigma >= 0 per world unit (see RenderConfig.density_activation)."""
    if activation == "softplus":
        return F.softplus(raw)
    if activation == "relu":
        return F.relu(raw)
    if activation == "exp":
        return raw.clamp_max(_EXP_MAX).exp()
    raise ValueError(f"density activation must be one of {_ACTIVATIONS}, got {activation!r}")


def ray_box_intersection(
    origins: Tensor,
    directions: Tensor,
    box_min: tuple[float, float, float],
    box_max: tuple[float, float, float],
    min_near: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Slab-method clip of rays o + t d to an axis-aligned box (Kay & Kajiya 1986).

    origins, directions: (..., 3). Returns near (...), far (...) in units of t, and hit (...) bool. The part of the ray
    before `min_near` is cut off; rays that miss get near = far = min_near, so any samples on them have zero length.
    """
    lo = origins.new_tensor(box_min)
    hi = origins.new_tensor(box_max)
    # A direction component of 0 would give (lo - o) / 0 = nan for an origin on that slab's plane; such an axis
    # instead admits every t when the origin lies within the slab and none otherwise.
    parallel = directions == 0
    d = torch.where(parallel, torch.ones_like(directions), directions)
    t0 = (lo - origins) / d
    t1 = (hi - origins) / d
    within = (origins >= lo) & (origins <= hi)
    inf = torch.full_like(t0, torch.inf)
    t_enter = torch.where(parallel, torch.where(within, -inf, inf), torch.minimum(t0, t1))
    t_exit = torch.where(parallel, torch.where(within, inf, -inf), torch.maximum(t0, t1))
    near = t_enter.amax(dim=-1).clamp_min(min_near)
    far = t_exit.amin(dim=-1)
    hit = far > near
    near = torch.where(hit, near, torch.full_like(near, min_near))
    far = torch.where(hit, far, near)
    return near, far, hit


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """U[0, 1) jitter drawn on the generator's device (so a CPU generator gives the same draws for CUDA inputs),
    or 0.5 everywhere without a generator."""
    if generator is None:
        return torch.full(shape, 0.5, device=like.device, dtype=like.dtype)
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return u.to(like.device, non_blocking=True)


def stratified_depths(near: Tensor, far: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """(R,) near, far -> (R, n) sorted depths, one per equal bin of [near, far]: jittered, or bin midpoints."""
    r = near.shape[0]
    steps = torch.arange(n, device=near.device, dtype=near.dtype) + _uniform((r, n), generator, near)
    return torch.addcmul(near.unsqueeze(-1), (far - near).unsqueeze(-1), steps, value=1.0 / n)


def importance_depths(
    bounds: Tensor, weights: Tensor, n: int, generator: torch.Generator | None = None, pdf_floor: float = 1e-5
) -> Tensor:
    """Inverse-CDF samples from a piecewise-constant pdf (NeRF hierarchical sampling, Mildenhall et al. 2020, sec. 5.2).

    bounds: (R, K+1) sorted interval edges; weights: (R, K) mass of each interval (gradients are not propagated).
    Returns (R, n) sorted depths. Quantiles are stratified, u_j = (j + U) / n, or (j + 0.5) / n without a generator.
    Each interval's mass is first raised to the largest of its neighbours' (the max-filter of mip-NeRF, Barron et al.
    2021, eq. 18): a surface often starts inside the interval *before* the first coarse sample that sees it, and
    without the filter that interval gets no fine samples, leaving depth up to half a coarse step late.
    """
    r, k = weights.shape
    w = weights.detach().unsqueeze(1)
    w = F.max_pool1d(w, kernel_size=3, stride=1, padding=1).squeeze(1) + pdf_floor
    cdf = torch.cumsum(w, dim=-1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf / cdf[:, -1:]], dim=-1)  # (R, K+1), 0 .. 1
    u = (torch.arange(n, device=w.device, dtype=w.dtype) + _uniform((r, n), generator, w)) * (1.0 / n)
    upper = torch.searchsorted(cdf, u, right=True).clamp_(1, k)
    lower = upper - 1
    c0 = cdf.gather(1, lower)
    c1 = cdf.gather(1, upper)
    b0 = bounds.gather(1, lower)
    b1 = bounds.gather(1, upper)
    frac = ((u - c0) / (c1 - c0).clamp_min(1e-12)).clamp_(0.0, 1.0)
    return torch.addcmul(b0, frac, b1 - b0).detach()


def _interval_bounds(t: Tensor, near: Tensor, far: Tensor) -> Tensor:
    """(R, S) sorted depths -> (R, S+1) edges: near, midpoints between neighbours, far."""
    mids = 0.5 * (t[:, 1:] + t[:, :-1])
    return torch.cat([near.unsqueeze(-1), mids, far.unsqueeze(-1)], dim=-1)


def _weights(sigma: Tensor, bounds: Tensor, dir_norm: Tensor) -> tuple[Tensor, Tensor]:
    """sigma (R, S), edges (R, S+1), |d| (R, 1) -> weights (R, S), optical depth of the whole ray (R,)."""
    delta = (bounds[:, 1:] - bounds[:, :-1]) * dir_norm
    tau = sigma * delta
    # Transmittance from a cumulative sum in log space: no cumprod of (1 - alpha + eps) and its eps bias.
    acc = torch.cumsum(tau, dim=-1)
    trans = torch.exp(-torch.cat([torch.zeros_like(acc[:, :1]), acc[:, :-1]], dim=-1))
    return -torch.expm1(-tau) * trans, acc[:, -1]


def _dense_grad(x: Tensor) -> Tensor:
    """Identity whose incoming gradient is made contiguous: a loss like `features.sum()` sends back an expanded
    (stride 0) gradient, on which bmm's CPU backward falls back to one small matmul per ray."""
    if x.requires_grad:
        x.register_hook(lambda g: g.contiguous())
    return x


def composite(
    t: Tensor,
    weights: Tensor,
    total_tau: Tensor,
    colour_parts: list[tuple[Tensor, Tensor, Tensor]],
    background: Tensor,
    return_samples: bool,
) -> PassOutput:
    """Sum colours and features with their weights.

    t, weights: (R, S) in depth order; total_tau: (R,) optical depth of the ray; background: (3,).
    colour_parts: (weights (R, S_k), rgb (R, S_k, 3), features (R, S_k, F)) blocks whose weights add up to the
    total, so samples need not be gathered into depth order before summing (a scatter of (R, S) weights is cheaper
    than a gather of (R, S, 3 + F) colours).
    """
    alpha = -torch.expm1(-total_tau).unsqueeze(-1)
    rgb = feat = None
    for w, c, f in colour_parts:
        wk = w.unsqueeze(1)
        rgb_k = _dense_grad(torch.bmm(wk, c).squeeze(1))
        feat_k = _dense_grad(torch.bmm(wk, f).squeeze(1))
        rgb = rgb_k if rgb is None else rgb + rgb_k
        feat = feat_k if feat is None else feat + feat_k
    assert rgb is not None and feat is not None
    rgb = torch.addcmul(rgb, 1.0 - alpha, background)
    expected = (weights * t).sum(dim=-1, keepdim=True)
    depth = torch.where(alpha > DEPTH_ALPHA_EPS, expected / alpha.clamp_min(DEPTH_ALPHA_EPS), torch.zeros_like(alpha))
    return PassOutput(rgb, alpha, depth, feat, weights if return_samples else None, t if return_samples else None)


def march(
    field_fn: FieldFn,
    origins: Tensor,
    directions: Tensor,
    near: Tensor,
    far: Tensor,
    config: RenderConfig,
    generator: torch.Generator | None = None,
) -> RenderOutput:
    """March R rays through a field, coarse then fine (see the module docstring). No chunking here.

    origins, directions: (R, 3) world; directions need not be unit (t is z-depth for camera rays).
    near, far: (R,) depth range of each ray; near == far gives an empty ray (background, alpha 0, depth 0).
    field_fn: see `FieldFn`; it receives unit directions.
    Returns tensors of leading shape (R,).
    """
    if origins.dim() != 2 or origins.shape[-1] != 3 or directions.shape != origins.shape:
        raise ValueError(
            f"origins and directions must both be (R, 3), got {tuple(origins.shape)}, {tuple(directions.shape)}"
        )
    near = near.detach()
    far = far.detach()
    dir_norm = directions.norm(dim=-1, keepdim=True)  # (R, 1)
    unit = directions / dir_norm.clamp_min(1e-12)
    background = origins.new_tensor(config.background)

    def evaluate(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        points = torch.addcmul(origins.unsqueeze(1), t.unsqueeze(-1), directions.unsqueeze(1))  # (R, S, 3)
        return field_fn(points, unit)

    t_c = stratified_depths(near, far, config.n_coarse, generator)
    sigma_c, rgb_c, feat_c = evaluate(t_c)
    bounds_c = _interval_bounds(t_c, near, far)
    w_c, tau_c = _weights(sigma_c, bounds_c, dir_norm)
    coarse = composite(t_c, w_c, tau_c, [(w_c, rgb_c, feat_c)], background, config.return_samples)
    if config.n_fine == 0:
        return RenderOutput(coarse, None)

    t_f = importance_depths(bounds_c, w_c, config.n_fine, generator, config.pdf_floor)
    sigma_f, rgb_f, feat_f = evaluate(t_f)
    t_all, order = torch.sort(torch.cat([t_c, t_f], dim=-1), dim=-1)
    sigma = torch.cat([sigma_c, sigma_f], dim=-1).gather(1, order)
    w, tau = _weights(sigma, _interval_bounds(t_all, near, far), dir_norm)
    # Weights back into [coarse | fine] order, to sum against the colour blocks where they lie.
    w_unsorted = torch.zeros_like(w).scatter(1, order, w)
    n_c = config.n_coarse
    parts = [(w_unsorted[:, :n_c], rgb_c, feat_c), (w_unsorted[:, n_c:], rgb_f, feat_f)]
    fine = composite(t_all, w, tau, parts, background, config.return_samples)
    return RenderOutput(coarse, fine)


# --------------------------------------------------------------------------------------------------------------------
# grids


def _grid_field(grid: VoxelGrid, decoder: Decoder, config: RenderConfig, project: bool) -> FieldFn:
    """A FieldFn over rays laid out scene-major: ray r belongs to scene r // (R / B).

    With `project`, the decoder's first layer is applied to the cells once (`Decoder.project`) and the samples
    interpolate its output: the same values, minus one (samples x C x hidden) matmul and its backward.
    """
    b = grid.batch_size
    table = decoder.project(grid.gather_table()) if project else None
    lookup = config.lookup
    if lookup == "auto":
        lookup = "grid_sample" if grid.features.is_cuda else "gather"

    def field(points: Tensor, unit_dirs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r, s, _ = points.shape
        dirs = unit_dirs.unsqueeze(1)
        points = points.reshape(b, -1, 3)
        if table is not None and lookup == "gather":
            # The first layer's bias and ReLU run inside the lookup, on its fresh output (see gather_trilinear).
            idx, w = grid.corners(points)
            hidden = gather_trilinear(table, idx, w.to(table.dtype), decoder.first_bias, relu=True)
            raw, rgb, feat = decoder.decode_hidden(hidden.view(r, s, -1), dirs)
        else:
            looked_up = grid.sample(points, mode=lookup, table=table)
            looked_up = looked_up.reshape(r, s, looked_up.shape[-1])  # grid_sample's (CUDA) output is transposed
            if table is not None:
                raw, rgb, feat = decoder.decode_projected(looked_up, dirs)
            else:
                raw, rgb, feat = decoder(looked_up, dirs)
        return activate_density(raw, config.density_activation), rgb, feat

    return field


def render_rays(
    grid: VoxelGrid,
    decoder: Decoder,
    origins: Tensor,
    directions: Tensor,
    config: RenderConfig,
    generator: torch.Generator | None = None,
) -> RenderOutput:
    """Render rays through a batch of grids.

    grid: B scenes. origins, directions: (B*V, N, 3) world rays of B*V cameras; camera i belongs to scene i // V.
    decoder: maps (R, S, C) features and (R, 1, 3) unit directions to (density_raw, rgb, features), e.g. `Decoder`.
    Returns tensors of leading shape (B*V, N). Rays are marched in chunks of about `config.chunk_rays` (at least one
    ray per camera per chunk). Without a generator the result does not depend on the chunk size; with one, the
    draws follow the chunking, so the same seed and chunk size reproduce a render exactly.
    """
    if origins.dim() != 3 or origins.shape[-1] != 3 or directions.shape != origins.shape:
        raise ValueError(
            f"origins and directions must both be (B*V, N, 3), got {tuple(origins.shape)}, {tuple(directions.shape)}"
        )
    b = grid.batch_size
    bv, n = origins.shape[:2]
    if bv % b != 0:
        raise ValueError(f"{bv} cameras cannot be split evenly over {b} scenes (camera i belongs to scene i // V)")
    expected_c = getattr(getattr(decoder, "config", None), "n_features_in", grid.channels)
    if expected_c != grid.channels:
        raise ValueError(f"the decoder reads {expected_c} feature channels but the grid has {grid.channels}")
    n_samples = bv * n * (config.n_coarse + config.n_fine)
    project = (
        config.project_first
        and isinstance(decoder, Decoder)
        and b * grid.resolution[0] * grid.resolution[1] * grid.resolution[2] < n_samples
        and decoder.config.hidden_dim <= grid.channels
    )
    field = _grid_field(grid, decoder, config, project)
    per_camera = max(1, config.chunk_rays // bv)
    origins = origins.to(grid.dtype)
    directions = directions.to(grid.dtype)
    parts: list[RenderOutput] = []
    for start in range(0, n, per_camera):
        stop = min(n, start + per_camera)
        o = origins[:, start:stop].reshape(-1, 3)  # scene-major because cameras are grouped by scene
        d = directions[:, start:stop].reshape(-1, 3)
        with torch.no_grad():
            near, far, _ = ray_box_intersection(o, d, grid.box_min, grid.box_max, config.min_near)
        out = march(field, o, d, near, far, config, generator)
        parts.append(out.map(lambda x: x.view(bv, stop - start, *x.shape[1:])))
    if len(parts) == 1:
        return parts[0]
    coarse = PassOutput.cat([p.coarse for p in parts], dim=1)
    fine = None if parts[0].fine is None else PassOutput.cat([p.fine for p in parts], dim=1)  # type: ignore[misc]
    return RenderOutput(coarse, fine)


def render_grid(
    grid: VoxelGrid,
    decoder: Decoder,
    cameras: CameraLike,
    config: RenderConfig,
    xy: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> RenderOutput:
    """Render B scenes from B*V cameras; camera i belongs to scene i // V.

    cameras: `holofusion.cameras.PerspectiveCamera` with B*V entries (on the grid's device).
    xy: (B*V, N, 2) pixel coordinates (top-left pixel corner (0, 0), centres at +0.5), or None for whole images.
    Returns tensors of leading shape (B*V, N) for xy, or images (B*V, H, W) for xy = None (e.g. rgb (B*V, H, W, 3)).
    """
    origins, directions = cameras.rays(xy)
    out = render_rays(grid, decoder, origins, directions, config, generator)
    if xy is not None:
        return out
    h, w = (int(s) for s in cameras.image_size)
    bv = origins.shape[0]
    return out.map(lambda x: x.view(bv, h, w, *x.shape[2:]))
