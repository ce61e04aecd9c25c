"""HoloFusion's 2D super-resolution diffusion model (Karnewar et al., ICCV 2023, sec. 3.2).

A view of a coarse HoloDiffusion grid, rendered at low resolution, is the *condition*; the model samples a detailed
high-resolution image of the same view. The network is diffusers' ``UNet2DModel``; it sees the noisy image and the
condition upsampled to the output size (the render's RGB, its alpha and any rendered feature channels, all scaled to
about [-1, 1]) stacked along the channels.

What diffuses is the *residual* between the high-resolution image and the upsampled coarse render, scaled to unit
spread (``residual_scale``, measured on the training pairs): the render already holds the object's placement and
colours, so the model spends its capacity on what the coarse stage cannot show (edges, stems, speckles) and on the
coarse model's own artefacts, which it learns to repair because its training conditions are renders of that model's
denoised grids (``train_superres.py``).

Sampling is seeded per view (one ``torch.Generator`` each) and may start from a noised image instead of pure noise
(SDEdit, Meng et al. 2022): the distillation stage uses that to pull a render of its current grid toward the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configbase import DictConfig
from .diffusion import NoiseSchedule, StepCallback, per_object_noise, sample

__all__ = ["SuperResConfig", "SuperRes", "Condition", "load_superres"]


@dataclass
class SuperResConfig(DictConfig):
    """Shape of the super-resolution model."""

    low_size: int = 32
    """Side in pixels of the coarse render it is conditioned on."""
    high_size: int = 64
    """Side in pixels of the images it samples."""
    cond_features: int = 0
    """Rendered feature channels in the condition (the HoloDiffusion decoder's ``n_features_out``)."""
    block_channels: tuple[int, ...] = (32, 64, 64)
    """Channels per U-Net level; each level after the first halves the resolution."""
    layers_per_block: int = 1
    """Residual blocks per U-Net level."""
    attention: bool = False
    """Self-attention at the coarsest level (and in the middle block)."""
    norm_groups: int = 8
    """Groups of the U-Net's group norms (must divide every entry of block_channels)."""
    schedule_steps: int = 1000
    """T, the number of diffusion steps."""
    schedule: str = "cosine"
    """Noise schedule: "cosine" or "linear"."""
    seed: int = 0
    """Seed of the initial weights."""

    def __post_init__(self) -> None:
        self.block_channels = tuple(int(c) for c in self.block_channels)
        if self.low_size < 4 or self.high_size < self.low_size:
            raise ValueError(f"need 4 <= low_size <= high_size; got {self.low_size}, {self.high_size}")
        if any(c % self.norm_groups for c in self.block_channels):
            raise ValueError(f"norm_groups {self.norm_groups} must divide every block channel {self.block_channels}")
        down = 2 ** (len(self.block_channels) - 1)
        if self.high_size % down:
            raise ValueError(f"high_size {self.high_size} is not divisible by {down} ({len(self.block_channels)} "
                             "levels)")

    @property
    def cond_channels(self) -> int:
        """RGB + alpha + features."""
        return 4 + self.cond_features

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_channels"] = list(self.block_channels)
        return d


@dataclass
class Condition:
    """Low-resolution renders of N views: rgb (N, 3, h, w) and alpha (N, 1, h, w) in [0, 1], features (N, F, h, w)
    (F may be 0)."""

    rgb: Tensor
    alpha: Tensor
    features: Tensor | None = None

    @classmethod
    def from_render(cls, rgb: Tensor, alpha: Tensor, features: Tensor | None = None) -> Condition:
        """From the renderer's image layout: rgb (N, h, w, 3), alpha (N, h, w, 1), features (N, h, w, F)."""
        feats = None if features is None or features.shape[-1] == 0 else features.permute(0, 3, 1, 2)
        return cls(rgb.permute(0, 3, 1, 2), alpha.permute(0, 3, 1, 2), feats)

    def stacked(self) -> Tensor:
        """(N, 4 + F, h, w): rgb and alpha mapped to [-1, 1], features as rendered."""
        parts = [self.rgb * 2 - 1, self.alpha * 2 - 1]
        if self.features is not None:
            parts.append(self.features)
        return torch.cat(parts, 1)

    def __len__(self) -> int:
        return self.rgb.shape[0]


class SuperRes(nn.Module):
    """Condition (N views at low_size) -> images (N, 3, high_size, high_size) in [0, 1]."""

    def __init__(self, config: SuperResConfig):
        super().__init__()
        from diffusers import UNet2DModel

        self.config = cfg = config
        levels = len(cfg.block_channels)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if cfg.attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        # diffusers draws initial weights from the global RNG: fork it so building a model never disturbs the
        # caller's stream and the same config always gives the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.unet = UNet2DModel(
                sample_size=cfg.high_size, in_channels=3 + cfg.cond_channels, out_channels=3,
                block_out_channels=cfg.block_channels, down_block_types=tuple(down), up_block_types=tuple(up),
                layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_groups, add_attention=cfg.attention,
                attention_head_dim=8)
        self.register_buffer("residual_scale", torch.ones(()))
        self.schedule = NoiseSchedule(cfg.schedule_steps, cfg.schedule)

    @property
    def device(self) -> torch.device:
        return self.residual_scale.device

    # ------------------------------------------------------------------ the diffused variable
    def upsampled(self, cond: Condition) -> Tensor:
        """(N, 4 + F, H, W): the condition at the output size (bilinear, as the coarse render would look)."""
        s = self.config.high_size
        return F.interpolate(cond.stacked(), size=(s, s), mode="bilinear", align_corners=False)

    def to_latent(self, images: Tensor, up: Tensor) -> Tensor:
        """Images (N, 3, H, W) in [0, 1] -> the scaled residual against the upsampled render."""
        return ((images * 2 - 1) - up[:, :3]) * self.residual_scale

    def from_latent(self, x: Tensor, up: Tensor) -> Tensor:
        return ((x / self.residual_scale + up[:, :3]) * 0.5 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ network
    def denoise(self, x_t: Tensor, t: Tensor, up: Tensor) -> Tensor:
        """x0 of the residual from x_t at steps t (N,); the U-Net predicts v (Salimans & Ho 2022)."""
        v = self.unet(torch.cat([x_t, up], 1), t).sample
        return self.schedule.x0_from_v(x_t, t, v)

    def loss(self, images: Tensor, cond: Condition, generator: torch.Generator,
             crop: int | None = None) -> tuple[Tensor, dict[str, float]]:
        """v-prediction MSE for target images (N, 3, H, W) in [0, 1] of the condition's views; with ``crop``, on one
        random crop x crop window per view (the same window of the target and of the upsampled condition)."""
        up = self.upsampled(cond)
        x0 = self.to_latent(images, up)
        n = x0.shape[0]
        if crop is not None and crop < x0.shape[-1]:
            # The U-Net is convolutional: trained on windows, it samples whole views (SR3, Saharia et al. 2022,
            # trains on patches the same way). A 128 px model then costs a 64 px model's step.
            h, w = x0.shape[-2:]
            ys = torch.randint(0, h - crop + 1, (n,), generator=generator).tolist()
            xs = torch.randint(0, w - crop + 1, (n,), generator=generator).tolist()
            x0 = torch.stack([x0[i, :, y:y + crop, x:x + crop] for i, (y, x) in enumerate(zip(ys, xs))])
            up = torch.stack([up[i, :, y:y + crop, x:x + crop] for i, (y, x) in enumerate(zip(ys, xs))])
        t = torch.randint(0, self.schedule.num_steps, (n,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = self.schedule.q_sample(x0, t, noise)
        v = self.unet(torch.cat([x_t, up], 1), t).sample
        loss = F.mse_loss(v, self.schedule.v_target(x0, t, noise))
        return loss, {"v": loss.item()}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, cond: Condition, seeds: Sequence[int], steps: int = 10, sampler: str = "dpm++",
               init: Tensor | None = None, strength: float = 1.0, callback: StepCallback | None = None,
               x0_hook: Callable[[Tensor, int, int], Tensor] | None = None) -> Tensor:
        """Super-resolved images (N, 3, H, W) in [0, 1], view i drawn from its own generator seeded by seeds[i].

        ``init`` (N, 3, H, W) in [0, 1] with ``strength`` < 1: start from that image noised to step
        ``strength * (T - 1)`` (SDEdit) instead of from pure noise, keeping what the noise level does not hide.
        """
        if len(seeds) != len(cond):
            raise ValueError(f"need one seed per view: {len(cond)} views, {len(seeds)} seeds")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1]; got {strength}")
        up = self.upsampled(cond).to(self.device)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        s = self.config.high_size
        noise = per_object_noise((len(seeds), 3, s, s), gens, self.device)
        start = None
        x = noise
        if init is not None and strength < 1:
            start = max(0, int(round(strength * (self.schedule.num_steps - 1))))
            x0 = self.to_latent(init.to(self.device), up)
            x = self.schedule.q_sample(x0, torch.full((len(seeds),), start, device=self.device), noise)
            steps = max(1, min(steps, start + 1))
        calls = 0

        def denoise(x_t: Tensor, t: Tensor) -> Tensor:
            nonlocal calls
            x0 = self.denoise(x_t, t, up)
            if x0_hook is None:
                return x0
            calls += 1
            return self.to_latent(x0_hook(self.from_latent(x0, up), calls, steps).to(self.device), up)

        x = sample(denoise, x, self.schedule, sampler, steps, gens, callback, start=start)
        return self.from_latent(x, up)


def load_superres(path: str, device: str | torch.device = "cpu") -> tuple[SuperRes, dict[str, Any]]:
    """A trained super-resolution model from a weights file or a run folder (its ``model.safetensors``, the EMA
    weights) and the file's ``info`` (which HoloDiffusion model it was trained on, steps, ...)."""
    from .weights import load_model

    model, meta = load_model(path, "superres", lambda cfg: SuperRes(SuperResConfig.from_dict(cfg)), device,
                             "a super-resolution model")
    return model, meta["info"]
