"""The HoloDiffusion encoder: unprojects 2D image features of posed source views into a feature voxel grid.

A small 2D CNN, trained jointly, turns each source image into a feature map. Every voxel centre is projected into
every source view (with ``PerspectiveCamera.project``'s convention) and the features there are read bilinearly; views
where the centre falls outside the image or behind the camera do not count. The per-view features are pooled into
their mean and spread (standard deviation) over views, mapped linearly, refined by a small residual 3D conv, and
squashed by tanh into the learned channels. A few more channels carry the *view-averaged raw colour* straight through
(scaled to [-1, 1]): the CPU trials showed that with every channel learned, the photometric loss alone lets colour
collapse to the average, while a pass-through colour path keeps it.

Optionally, ``global_channels`` hold one code per object, the same value in every voxel: an attention-weighted mean of
the pooled features over the grid, mapped linearly and squashed by tanh. They exist for the diffusion model: an
object-wide property such as an apple's colour sits in a few numbers instead of being spread over thousands of voxels
that a denoiser must agree on (without them, samples came out in mottled patches of every apple colour). The model
keeps them constant when it denoises (``HoloDiffusion.project_global``). Caution, measured on the four shipped models
and two fresh autoencoders: when the local channels carry colour too, the tanh saturates at +-1 for every object
within the first 150 steps (``code_spread`` in the training log), so the code becomes a constant bias and the colour
stays in the local channels (README, design notes).

Channel order: [learned local | global | raw colour].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cameras import PerspectiveCamera
from ..configbase import DictConfig

__all__ = ["EncoderConfig", "Encoder", "sample_views"]


@dataclass
class EncoderConfig(DictConfig):
    """Shape of the encoder."""

    channels: int = 16
    """Grid channels C in all, including the raw-colour ones."""
    raw_color_channels: int = 3
    """Channels (0 or 3, the last ones of the grid) holding the view-averaged RGB, scaled to [-1, 1]."""
    global_channels: int = 0
    """Channels (just before the raw-colour ones) holding one per-object code broadcast over the grid; 0 = none."""
    cnn_width: int = 32
    """Channels of the 2D CNN's hidden layers."""
    cnn_layers: int = 4
    """Conv layers of the 2D CNN (the second one halves the resolution)."""
    feature_dim: int = 32
    """Channels of the CNN's output feature map."""
    refine_layers: int = 1
    """Residual 3D conv blocks applied to the pooled grid before tanh."""
    backbone: str | None = None
    """Optional path of a user-supplied safetensors checkpoint for the 2D CNN (keys as in ``Encoder.cnn``)."""

    def __post_init__(self) -> None:
        if self.raw_color_channels not in (0, 3):
            raise ValueError(f"raw_color_channels must be 0 or 3; got {self.raw_color_channels}")
        if self.global_channels < 0:
            raise ValueError(f"global_channels must be >= 0; got {self.global_channels}")
        if self.channels <= self.raw_color_channels + self.global_channels:
            raise ValueError(f"channels ({self.channels}) must exceed raw_color_channels + global_channels "
                             f"({self.raw_color_channels} + {self.global_channels})")

    @property
    def local_channels(self) -> int:
        """Learned per-voxel channels (the first ones of the grid)."""
        return self.channels - self.raw_color_channels - self.global_channels

    def global_slice(self) -> slice:
        """Where the per-object global channels sit in the grid's channel axis."""
        return slice(self.local_channels, self.local_channels + self.global_channels)
        if self.cnn_layers < 2:
            raise ValueError(f"cnn_layers must be at least 2; got {self.cnn_layers}")




def sample_views(maps: Tensor, cameras: PerspectiveCamera, points: Tensor, views: int) -> tuple[Tensor, Tensor]:
    """Reads per-view feature maps at the projections of 3D points.

    Args:
        maps: (B*V, F, h, w) feature maps of images of size ``cameras.image_size`` (any h, w: the map covers the
            whole image, so pixel (u, v) of the image is read at (u * w / W, v * h / H)).
        cameras: B*V cameras, view v of scene b at index b*V + v.
        points: (P, 3) world points shared by all scenes, or (B, P, 3).
        views: V.
    Returns:
        features (B, V, P, F) and validity (B, V, P) (1 where the point projects inside the image, in front).
    """
    bv = maps.shape[0]
    b = bv // views
    pts = points if points.dim() == 3 else points[None].expand(b, -1, -1)
    pts = pts.repeat_interleave(views, 0).to(cameras.dtype)
    uv, z = cameras.project(pts, return_depth=True)  # (B*V, P, 2) pixels, (B*V, P)
    H, W = cameras.image_size
    # grid_sample with align_corners=False puts -1 and +1 on the outer edges of the border pixels: exactly the
    # screen convention, where (0, 0) is the top-left pixel's corner and (W, H) the bottom-right one's.
    grid = torch.stack([uv[..., 0] / W * 2 - 1, uv[..., 1] / H * 2 - 1], -1).to(maps.dtype)
    feats = F.grid_sample(maps, grid[:, :, None, :], mode="bilinear", padding_mode="border", align_corners=False)
    feats = feats[..., 0].transpose(1, 2)  # (B*V, P, F)
    valid = (z > 1e-6) & (grid.abs() <= 1).all(-1)
    return feats.reshape(b, views, *feats.shape[1:]), valid.reshape(b, views, -1).to(maps.dtype)


class Encoder(nn.Module):
    """(B, V, 3, H, W) source images on white + B*V cameras -> (B, C, S, S, S) grid in [-1, 1]."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = cfg = config
        layers: list[nn.Module] = []
        c = 3
        for i in range(cfg.cnn_layers):
            out = cfg.feature_dim if i == cfg.cnn_layers - 1 else cfg.cnn_width
            layers.append(nn.Conv2d(c, out, 3, stride=2 if i == 1 else 1, padding=1))
            if i < cfg.cnn_layers - 1:
                layers.append(nn.ReLU(inplace=True))
            c = out
        self.cnn = nn.Sequential(*layers)
        pooled = 2 * (cfg.feature_dim + 3)  # mean and spread of CNN features and raw RGB
        learned = cfg.local_channels
        self.proj = nn.Conv3d(pooled, learned, 1)
        if cfg.global_channels:
            # Attention pooling over voxels: a score per voxel (the object's voxels, seen consistently by every view,
            # can stand out from empty space), softmax over the grid, then a linear map of the weighted mean.
            self.global_score = nn.Conv3d(pooled, 1, 1)
            self.global_proj = nn.Linear(pooled, cfg.global_channels)
        self.refine = nn.ModuleList(
            nn.Sequential(nn.Conv3d(learned, learned, 3, padding=1), nn.SiLU(), nn.Conv3d(learned, learned, 3, padding=1))
            for _ in range(cfg.refine_layers))
        if cfg.backbone:
            self.load_backbone(cfg.backbone)

    def load_backbone(self, path: str) -> None:
        from safetensors.torch import load_file

        from ..errors import UserError

        try:
            state = load_file(path)
        except Exception as e:  # safetensors raises several types for a file that is not safetensors
            raise UserError(f"encoder backbone {path!r} is not a readable safetensors file ({e})") from None
        missing, unexpected = self.cnn.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"encoder backbone {path!r} does not fit the CNN: missing {missing}, unexpected "
                            f"{unexpected}")

    def forward(self, images: Tensor, cameras: PerspectiveCamera, cell_centers: Tensor, grid_size: int) -> Tensor:
        """images (B, V, 3, H, W); cameras B*V; cell_centers (S^3, 3) in (z, y, x)-major order -> (B, C, S, S, S)."""
        b, v = images.shape[:2]
        flat = images.flatten(0, 1)
        maps = torch.cat([self.cnn(flat * 2 - 1), F.avg_pool2d(flat, 2)], 1)  # CNN features + raw RGB, half res
        feats, valid = sample_views(maps, cameras, cell_centers, v)  # (B, V, P, F+3), (B, V, P)
        w = valid[..., None]
        count = w.sum(1).clamp_min(1.0)
        mean = (feats * w).sum(1) / count
        std = (((feats - mean[:, None]) ** 2 * w).sum(1) / count + 1e-6).sqrt()
        s = grid_size
        pooled = torch.cat([mean, std], -1).transpose(1, 2).reshape(b, -1, s, s, s)
        h = self.proj(pooled)
        for block in self.refine:
            h = h + block(h)
        h = torch.tanh(h)
        if self.config.global_channels:
            weights = torch.softmax(self.global_score(pooled).flatten(2), -1)  # (B, 1, S^3)
            code = torch.tanh(self.global_proj((pooled.flatten(2) * weights).sum(-1)))  # (B, G)
            h = torch.cat([h, code[:, :, None, None, None].expand(-1, -1, s, s, s)], 1)
        if self.config.raw_color_channels:
            rgb = mean[..., -3:].transpose(1, 2).reshape(b, 3, s, s, s)
            h = torch.cat([h, rgb * 2 - 1], 1)
        return h
