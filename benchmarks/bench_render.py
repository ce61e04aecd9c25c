"""Renderer throughput: samples per second, forward and forward+backward, against a naive marcher in the same run.

    python benchmarks/bench_render.py [--scenes 2] [--views 2] [--pixels 32] [--repeats 3] [--threads N]

"Samples" counts rays x (n_coarse + n_fine), the samples composited in the final pass, for every variant, so the
ratios compare time per ray. The naive baseline is textbook hierarchical NeRF written in the obvious way: one
unchunked pass, `grid_sample` lookups, the decoder run on the coarse samples and then again on all coarse + fine
samples, `cumprod` transmittance and gathered colours. It is measured on the same rays, grid and decoder.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from holofusion.grid import VoxelGrid
from holofusion.nets.decoder import Decoder, DecoderConfig
from holofusion.render import RenderConfig, activate_density, importance_depths, ray_box_intersection, render_rays


def naive_render(grid: VoxelGrid, decoder: Decoder, origins: torch.Tensor, directions: torch.Tensor,
                 config: RenderConfig) -> torch.Tensor:
    """(B*V, N, 3) rays -> (B*V, N, 3) fine-pass colour, the straightforward way (deterministic samples)."""
    b = grid.batch_size
    bv, n, _ = origins.shape
    o = origins.reshape(-1, 3)
    d = directions.reshape(-1, 3)
    near, far, _ = ray_box_intersection(o, d, grid.box_min, grid.box_max)
    dnorm = d.norm(dim=-1, keepdim=True)
    unit = d / dnorm
    bg = o.new_tensor(config.background)

    def field(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pts = o[:, None] + t[..., None] * d[:, None]
        s = t.shape[1]
        coords = grid.normalize(pts).view(b, -1, 1, 1, 3)
        feats = F.grid_sample(grid.features, coords, align_corners=False).view(b, grid.channels, -1)
        feats = feats.transpose(1, 2).reshape(-1, s, grid.channels)
        raw, rgb, _ = decoder(feats, unit[:, None].expand(-1, s, -1))
        return activate_density(raw, config.density_activation), rgb

    def composite(t: torch.Tensor, sigma: torch.Tensor, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta = torch.cat([t[:, 1:] - t[:, :-1], (far - t[:, -1])[:, None]], dim=-1) * dnorm
        alpha = 1 - torch.exp(-sigma * delta)
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha + 1e-10], -1), -1)[:, :-1]
        w = alpha * trans
        return (w[..., None] * rgb).sum(1) + (1 - w.sum(-1, keepdim=True)) * bg, w

    steps = (torch.arange(config.n_coarse, dtype=o.dtype) + 0.5) / config.n_coarse
    t_c = near[:, None] + (far - near)[:, None] * steps
    sigma_c, rgb_c = field(t_c)
    _, w_c = composite(t_c, sigma_c, rgb_c)
    edges = torch.cat([near[:, None], 0.5 * (t_c[:, 1:] + t_c[:, :-1]), far[:, None]], -1)
    t_f = importance_depths(edges, w_c, config.n_fine)
    t_all, _ = torch.sort(torch.cat([t_c, t_f], -1), -1)
    sigma, rgb = field(t_all)
    colour, _ = composite(t_all, sigma, rgb)
    return colour.view(bv, n, 3)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=2)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--pixels", type=int, default=32, help="rays per camera = pixels^2")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--n-coarse", type=int, default=64)
    parser.add_argument("--n-fine", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    b, v, p = args.scenes, args.views, args.pixels
    feats = 0.5 * torch.randn(b, args.channels, *(args.resolution,) * 3, generator=gen)
    grid = VoxelGrid(feats.requires_grad_())
    decoder = Decoder(DecoderConfig(n_features_in=args.channels, n_features_out=8), gen)
    # Cameras on a ring at distance 10 looking at the origin: directions with camera-space z = 1.
    xs = torch.linspace(-0.35, 0.35, p)
    yy, xx = torch.meshgrid(xs, xs, indexing="ij")
    cam_dirs = torch.stack([xx, yy, torch.ones_like(xx)], -1).reshape(-1, 3)
    origins, directions = [], []
    for i in range(b * v):
        angle = 2 * torch.pi * i / (b * v)
        fwd = torch.tensor([-torch.sin(torch.tensor(angle)), 0.0, -torch.cos(torch.tensor(angle))])
        right = torch.tensor([fwd[2], 0.0, -fwd[0]])
        up = torch.linalg.cross(fwd, right)
        rot = torch.stack([right, up, fwd])  # rows: camera axes in world
        origins.append((-10 * fwd).expand(p * p, 3))
        directions.append(cam_dirs @ rot)
    origins_t = torch.stack(origins)
    directions_t = torch.stack(directions)
    n_samples = b * v * p * p * (args.n_coarse + args.n_fine)
    config = RenderConfig(n_coarse=args.n_coarse, n_fine=args.n_fine)

    def ours(cfg: RenderConfig, grad: bool) -> Callable[[], object]:
        def run() -> None:
            if grad:
                out = render_rays(grid, decoder, origins_t, directions_t, cfg, torch.Generator().manual_seed(1))
                ((out.rgb - 0.5).square().mean() + (out.coarse.rgb - 0.5).square().mean()).backward()
            else:
                with torch.no_grad():
                    render_rays(grid, decoder, origins_t, directions_t, cfg, torch.Generator().manual_seed(1))
        return run

    def naive(grad: bool) -> Callable[[], object]:
        def run() -> None:
            if grad:
                (naive_render(grid, decoder, origins_t, directions_t, config) - 0.5).square().mean().backward()
            else:
                with torch.no_grad():
                    naive_render(grid, decoder, origins_t, directions_t, config)
        return run

    with torch.no_grad():
        ref = naive_render(grid, decoder, origins_t, directions_t, config)
        mine = render_rays(grid, decoder, origins_t, directions_t, config).rgb
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {b} scenes x {v} views x {p * p} rays, "
          f"{args.n_coarse}+{args.n_fine} samples/ray, grid {args.channels} x {args.resolution}^3, "
          f"decoder hidden {decoder.config.hidden_dim}; mean |rgb - naive rgb| = {(ref - mine).abs().mean():.2e}")
    def cfg(**kw) -> RenderConfig:
        return RenderConfig(n_coarse=args.n_coarse, n_fine=args.n_fine, **kw)

    variants = {
        "naive (baseline)": (naive(False), naive(True)),
        "ours, defaults": (ours(config, False), ours(config, True)),
        "ours, chunk_rays=8192": (ours(cfg(chunk_rays=8192), False), ours(cfg(chunk_rays=8192), True)),
        "ours, project_first=False": (ours(cfg(project_first=False), False), ours(cfg(project_first=False), True)),
        "ours, lookup=grid_sample": (ours(cfg(lookup="grid_sample"), False), ours(cfg(lookup="grid_sample"), True)),
    }
    # Interleaved repeats, best of each: other processes on a small machine slow whichever variant they overlap.
    best = {name: [float("inf"), float("inf")] for name in variants}
    for rep in range(args.repeats + 1):
        for name, (fwd, both) in variants.items():
            t_f, t_b = timed(fwd), timed(both)
            if rep > 0:  # the first round is a warm-up (allocator, MKL handles)
                best[name] = [min(best[name][0], t_f), min(best[name][1], t_b)]
    base_f, base_b = best["naive (baseline)"]
    print(f"{'variant':28s} {'fwd Msamples/s':>15s} {'x naive':>8s} {'fwd+bwd Msamples/s':>19s} {'x naive':>8s}")
    for name, (t_f, t_b) in best.items():
        print(f"{name:28s} {n_samples / t_f / 1e6:15.3f} {base_f / t_f:8.2f} {n_samples / t_b / 1e6:19.3f} "
              f"{base_b / t_b:8.2f}")


if __name__ == "__main__":
    main()
