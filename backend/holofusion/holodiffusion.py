"""HoloDiffusion (Karnewar et al., CVPR 2023): a diffusion model over feature voxel grids learned from posed images.

Parts: an ``Encoder`` unprojects source views into a grid, a ``Decoder`` + ray marcher renders grids, and a 3D U-Net
denoises grids. The diffusion runs in a *normalised latent space*: the encoder's grid minus a per-channel mean, over a
per-channel spread, both measured on encoder grids of the training data. The denoiser's output is tied to that space
by the latent loss (the CPU trials saw the denoiser's outputs drift to 2.75x the encoder's spread without it).

Training objectives (see ``train.py`` for the schedule of phases):
- ``autoencoder_loss``: render the encoder's own grid at held-out target views (the photometric warm-up that makes
  the latent space carry colour and shape);
- ``latent_loss``: v-prediction MSE on cached, normalised encoder grids (Salimans & Ho 2022), with the category
  dropped at random for classifier-free guidance;
- ``bootstrap_loss``: the paper's bootstrapped latent diffusion (sec. 3.3): noise the encoded grid to t and denoise it;
  with probability 0.5 noise that result again at t' and denoise once more; render the final grid at target views;
  photometric loss only, gradients through both passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cameras import PerspectiveCamera
from .diffusion import NoiseSchedule, StepCallback, per_object_noise, sample
from .grid import VoxelGrid
from .nets.decoder import Decoder, DecoderConfig
from .nets.encoder import Encoder, EncoderConfig
from .nets.unet3d import UNet3D, UNet3DConfig
from .render import RenderConfig, RenderOutput, render_grid

__all__ = ["GUIDE_FILE", "GUIDE_WEIGHT", "HoloDiffusionConfig", "HoloDiffusion", "Targets", "load_holodiffusion",
           "save_guide"]


GLOBAL_NOISE = ("voxel", "object")


@dataclass
class HoloDiffusionConfig:
    """Everything needed to rebuild a HoloDiffusion model (stored in the weights file's metadata)."""

    categories: list[str] = field(default_factory=list)
    """Categories the model was trained on; more than one enables category conditioning."""
    grid_size: int = 16
    """S: the coarse grid has S^3 cells."""
    box_half_size: float = 4.0
    """The grid covers [-h, h]^3 in world units (HoloDiffusion: 4 for CO3D's unit-spread worlds)."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    unet: UNet3DConfig = field(default_factory=UNet3DConfig)
    render: RenderConfig = field(default_factory=lambda: RenderConfig(n_coarse=32, n_fine=16))
    schedule_steps: int = 1000
    """T, the number of diffusion steps."""
    schedule: str = "cosine"
    """Noise schedule: "cosine" or "linear"."""
    cfg_drop: float = 0.1
    """Probability of dropping the category during training (classifier-free guidance)."""
    global_noise: str = "voxel"
    """How diffusion noises the encoder's global channels (one code per object, the same in every voxel): "voxel"
    draws independent noise per voxel, as for the local channels; "object" draws one value per object and channel,
    so that code is diffused like any other variable. With "voxel" the code's mean over S^3 voxels carries S^1.5
    times the signal-to-noise of one voxel, so sampling decides it in the last few percent of the noise levels,
    from an initial mean of std S^-1.5; a denoiser that reads it a little low there (measured on the apple model:
    slope 0.67 where 0.81 is optimal at t = 980) shrinks the spread of the codes, and with it the spread of the
    objects' colours, to half the data's. "voxel" is kept for models trained with it (the default for old files)."""
    offset_noise: float = 0.0
    """Weight c of a per-object offset in the local channels' diffusion noise: noise = (e + c * d) / norm, d one
    N(0, 1) value per object and channel (the voxel mean of e times S^1.5: no new random numbers), norm keeping unit
    variance per voxel. White noise leaves an object's mean in each channel with noise of std S^-1.5 (1/64 at 16^3),
    so its overall colour is settled late and from almost nothing, as the global code was with "voxel" noise: the
    apple model's samples kept 0.54 to 0.74 of the data's spread of those means (0.8 to 0.9 at 2 to 8 cells).
    "Offset noise" (Guttenberg 2023) diffuses them like the rest; 0 is white noise (the default for old files)."""
    pyramid_noise: float = 0.0
    """Weight c of the same kind of offset at the scales between a voxel and the grid (multi-resolution noise,
    Whitaker 2023): for each block size b in ``pyramid_blocks`` one N(0, 1) value per b^3 block and local channel
    (the block's voxel mean of the noise times b^1.5, no new random numbers) is added with weight c, on top of
    ``offset_noise``'s whole-grid term, and the sum rescaled to unit variance per voxel. White noise settles an
    object's parts at those scales (its girth, the size of its head) late and from little, as it did its overall
    colour; 0 (the default, and every model file from before it) adds nothing."""
    pyramid_blocks: tuple[int, ...] = (4, 8)
    """Block sizes (in voxels) of ``pyramid_noise`` (when it is on): powers of two smaller than the grid."""
    seed: int = 0
    """Seed of the initial weights."""

    def __post_init__(self) -> None:
        self.categories = list(self.categories)
        c = self.encoder.channels
        if self.decoder.n_features_in != c:
            raise ValueError(f"decoder.n_features_in ({self.decoder.n_features_in}) must equal encoder.channels ({c})")
        if self.unet.in_channels != c or self.unet.grid_size != self.grid_size:
            raise ValueError(f"unet in_channels/grid_size ({self.unet.in_channels}, {self.unet.grid_size}) must "
                             f"equal encoder.channels and grid_size ({c}, {self.grid_size})")
        if self.global_noise not in GLOBAL_NOISE:
            raise ValueError(f"global_noise must be one of {', '.join(GLOBAL_NOISE)}; got {self.global_noise!r}")
        if not 0.0 <= self.offset_noise <= 10.0:
            raise ValueError(f"offset_noise must be in [0, 10]; got {self.offset_noise}")
        if not 0.0 <= self.pyramid_noise <= 10.0:
            raise ValueError(f"pyramid_noise must be in [0, 10]; got {self.pyramid_noise}")
        self.pyramid_blocks = tuple(int(b) for b in self.pyramid_blocks)
        bad = [b for b in self.pyramid_blocks if b < 2 or b >= self.grid_size or self.grid_size % b or b & (b - 1)]
        if self.pyramid_noise > 0 and (bad or not self.pyramid_blocks
                                       or len(set(self.pyramid_blocks)) != len(self.pyramid_blocks)):
            raise ValueError(f"pyramid_blocks must be distinct powers of two from 2 up to half the grid "
                             f"({self.grid_size // 2}) that divide grid_size {self.grid_size}; got "
                             f"{list(self.pyramid_blocks)}")
        if self.unet.num_classes not in (0, len(self.categories)):
            raise ValueError(f"unet.num_classes ({self.unet.num_classes}) must be 0 or the number of categories "
                             f"({len(self.categories)})")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HoloDiffusionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        v = dict(values)
        for name, sub in (("encoder", EncoderConfig), ("decoder", DecoderConfig), ("unet", UNet3DConfig),
                          ("render", RenderConfig)):
            if isinstance(v.get(name), dict):
                v[name] = sub.from_dict(v[name])
        return cls(**v)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("encoder", "decoder", "unet", "render"):
            d[name] = d[name].to_dict()
        d["render"]["background"] = list(d["render"]["background"])
        return d


@dataclass
class Targets:
    """Held-out target views for a photometric loss: B scenes x M views, R rays each.

    xy (B*M, R, 2) pixel coordinates, rgb (B*M, R, 3) and mask (B*M, R) at those pixels, cameras of B*M views.
    """

    cameras: PerspectiveCamera
    xy: Tensor
    rgb: Tensor
    mask: Tensor


GUIDE_MAY_DIFFER = ("unet", "cfg_drop", "seed", "global_noise", "offset_noise", "pyramid_noise", "pyramid_blocks")
"""Model settings an autoguidance model may have of its own: the denoiser's, and the noise it was trained with
(sampling draws the guided model's noise; a guide trained on other noise is one more way of being weaker).
Everything else (the autoencoder, the grid, the schedule) must match, so that both read and predict the same
latents."""


class HoloDiffusion(nn.Module):
    """The HoloDiffusion model: encoder, decoder (+ renderer settings) and denoiser, with the latent normalisation."""

    def __init__(self, config: HoloDiffusionConfig):
        super().__init__()
        self.config = config
        c = config.encoder.channels
        # Weights are drawn from a private RNG stream so building a model never disturbs the caller's RNG and the
        # same config always gives the same initial weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.encoder = Encoder(config.encoder)
            self.unet = UNet3D(config.unet)
        self.decoder = Decoder(config.decoder, generator=torch.Generator().manual_seed(config.seed + 1))
        self.register_buffer("latent_mean", torch.zeros(c))
        self.register_buffer("latent_std", torch.ones(c))
        self.schedule = NoiseSchedule(config.schedule_steps, config.schedule)
        # A weaker denoiser on the same latent space for autoguidance (``attach_guide``). Kept in a tuple so that
        # it is not a submodule: the model's own weights, state dict and digest stay the same with or without it.
        self._guide: tuple[HoloDiffusion, ...] = ()

    # ------------------------------------------------------------------ grids
    @property
    def device(self) -> torch.device:
        return self.latent_mean.device

    def cell_centers(self) -> Tensor:
        return self.to_grid(torch.zeros(1, 1, *(self.config.grid_size,) * 3, device=self.device)).cell_centers()

    def to_grid(self, features: Tensor) -> VoxelGrid:
        h = self.config.box_half_size
        return VoxelGrid(features, (-h, -h, -h), (h, h, h))

    def normalize(self, z: Tensor) -> Tensor:
        """Encoder grid (B, C, S, S, S) -> latent x (about zero mean, unit spread per channel)."""
        return (z - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)

    def encode(self, images: Tensor, cameras: PerspectiveCamera) -> Tensor:
        """(B, V, 3, H, W) images on white + B*V cameras -> encoder grid z (B, C, S, S, S) (not normalised)."""
        return self.encoder(images, cameras, self.cell_centers(), self.config.grid_size)

    def render(self, z: Tensor, cameras: PerspectiveCamera, xy: Tensor | None = None,
               generator: torch.Generator | None = None, config: RenderConfig | None = None) -> RenderOutput:
        """Renders encoder-space grids z (B, C, S, S, S) from B*V cameras (see ``render_grid``)."""
        return render_grid(self.to_grid(z), self.decoder, cameras, config or self.config.render, xy, generator)

    def category_index(self, categories: Sequence[str | None] | None, batch: int) -> Tensor | None:
        """Category names -> (B,) indices; None entries (or an unconditional model) -> the "no category" token."""
        if self.config.unet.num_classes == 0:
            return None
        null = self.config.unet.num_classes
        names = list(categories) if categories is not None else [None] * batch
        idx = []
        for name in names:
            if name is None:
                idx.append(null)
            elif name in self.config.categories:
                idx.append(self.config.categories.index(name))
            else:
                raise ValueError(f"category {name!r} is not one this model knows ({', '.join(self.config.categories)})")
        return torch.tensor(idx, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ denoiser (x0 prediction via v)
    def denoise(self, x_t: Tensor, t: Tensor, category: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        """The clean latent x0 predicted from x_t at steps t (B,). The U-Net outputs v; x0 = alpha x_t - sigma v.

        ``guidance`` > 1 applies classifier-free guidance (Ho & Salimans 2022) between the category and no category.
        """
        v = self.unet(x_t, t, category)
        if guidance != 1.0 and category is not None:
            null = torch.full_like(category, self.config.unet.num_classes)
            v_null = self.unet(x_t, t, null)
            v = v_null + guidance * (v - v_null)
        return self.project_global(self.schedule.x0_from_v(x_t, t, v))

    def project_global(self, x: Tensor) -> Tensor:
        """Replaces the per-object global channels (if any) by their mean over the grid.

        Clean latents hold one value per object there; a denoiser's estimate is noisy voxel by voxel, but its mean
        over S^3 voxels is not, so the projection gives every voxel the same object-wide code (one colour for the
        whole apple instead of patches)."""
        g = self.config.encoder.global_slice()
        if g.start == g.stop:
            return x
        mean = x[:, g].mean(dim=(2, 3, 4), keepdim=True).expand_as(x[:, g])
        return torch.cat([x[:, :g.start], mean, x[:, g.stop:]], 1)

    def shape_noise(self, noise: Tensor) -> Tensor:
        """Gives standard normal noise (B, C, S, S, S) the structure of the latent space: with ``global_noise =
        "object"`` each global channel becomes one N(0, 1) value per object (the voxel mean of the given noise times
        S^1.5, so no further random numbers are drawn and every stream stays as it was), the same in every voxel."""
        g = self.config.encoder.global_slice()
        c = self.config.offset_noise
        if self.config.pyramid_noise > 0:
            noise = torch.cat([self._multiscale(noise[:, :g.start]), noise[:, g.start:]], 1)
        elif c > 0:  # _multiscale with no blocks, kept as it was so that shipped models draw bit-identical noise
            # Local channels: e + c * d with d = mean(e) * S^1.5, so e - mean(e) + (1 + c S^1.5) mean(e); its
            # variance per voxel is 1 + 2c S^-1.5 + c^2, divided out to keep the schedule's unit-variance noise.
            loc = noise[:, :g.start]
            root = float(loc[0, 0].numel()) ** 0.5
            mean = loc.mean(dim=(2, 3, 4), keepdim=True)
            loc = (loc + c * root * mean) / (1.0 + 2.0 * c / root + c * c) ** 0.5
            noise = torch.cat([loc, noise[:, g.start:]], 1)
        if self.config.global_noise != "object" or g.start == g.stop:
            return noise
        n = noise[:, g]
        per_object = n.mean(dim=(2, 3, 4), keepdim=True) * float(n[0, 0].numel()) ** 0.5
        return torch.cat([noise[:, :g.start], per_object.expand_as(n), noise[:, g.stop:]], 1)

    def _multiscale(self, e: Tensor) -> Tensor:
        """e + sum_k w_k m_k over the pyramid's blocks and the whole grid (offset_noise), rescaled to unit variance.

        m_b, the block mean of e times b^1.5 (repeated over the block), is N(0, 1) per voxel; Cov(e, m_b) = b^-1.5
        and, for nested blocks a < b, Cov(m_a, m_b) = (a / b)^1.5, which gives the variance divided out."""
        s = e.shape[-1]
        terms = [(b, self.config.pyramid_noise) for b in sorted(self.config.pyramid_blocks)]
        if self.config.offset_noise > 0:
            terms.append((s, self.config.offset_noise))
        out, var = e, 1.0
        for i, (b, w) in enumerate(terms):
            n = s // b
            blocks = e.reshape(*e.shape[:2], n, b, n, b, n, b).mean(dim=(3, 5, 7)) * float(b) ** 1.5
            up = blocks.repeat_interleave(b, 2).repeat_interleave(b, 3).repeat_interleave(b, 4)
            out = out + w * up
            var += w * w + 2.0 * w * float(b) ** -1.5
            var += sum(2.0 * w * w2 * (b2 / b) ** 1.5 for b2, w2 in terms[:i])
        return out / var ** 0.5

    # ------------------------------------------------------------------ losses
    def photometric_loss(self, z: Tensor, targets: Targets, generator: torch.Generator | None,
                         mask_weight: float = 0.1) -> tuple[Tensor, dict[str, float]]:
        """RGB error of the coarse and fine renders of z at the target rays, plus a silhouette term."""
        out = self.render(z, targets.cameras, targets.xy, generator)
        loss = F.mse_loss(out.coarse.rgb, targets.rgb)
        stats = {"rgb_coarse": loss.item()}
        if out.fine is not None:
            fine = F.mse_loss(out.fine.rgb, targets.rgb)
            loss = loss + fine
            stats["rgb_fine"] = fine.item()
        if mask_weight > 0:
            m = F.mse_loss(out.final.alpha[..., 0], targets.mask)
            loss = loss + mask_weight * m
            stats["mask"] = m.item()
        return loss, stats

    def autoencoder_loss(self, images: Tensor, cameras: PerspectiveCamera, targets: Targets,
                         generator: torch.Generator | None, mask_weight: float = 0.1,
                         latent_noise: float = 0.0, colour_noise: float = 0.0,
                         latent_l2: float = 0.0, global_noise: float | None = None) -> tuple[Tensor, dict]:
        """Photometric loss of the encoder's own grid. ``latent_noise`` adds Gaussian noise of that std (in the
        encoder's [-1, 1] units) to the grid first, so the decoder learns to render slightly-off grids, like the
        denoiser's outputs, as clean objects instead of colour speckles. ``colour_noise`` is the std used instead on
        the raw-colour channels: voxel-by-voxel colour is what a denoiser gets wrong first (mottled samples), and a
        decoder that cannot trust it takes the object's base colour from the global code. ``global_noise`` is the
        std on the global code's channels (None: ``latent_noise``). ``latent_l2`` weighs a
        penalty on the squared local channels: features the decoder does not need (empty space, what one set of
        source views happened to see) go to zero instead of staying as view-dependent texture that a denoiser
        cannot predict from the object and so leaves as noise."""
        z = self.encode(images, cameras)
        l2 = z[:, :self.config.encoder.local_channels].pow(2).mean() if latent_l2 > 0 else None
        g = self.config.encoder.global_slice()
        # How much the global code differs between the batch's objects: near 0 means it has saturated into a
        # constant (what happened to the shipped autoencoders), which the training log should show early.
        spread = z[:, g, 0, 0, 0].std(0).mean().item() if g.stop > g.start and z.shape[0] > 1 else None
        if global_noise is None:
            global_noise = latent_noise
        if latent_noise > 0 or colour_noise > 0 or global_noise > 0:
            if generator is None:
                raise ValueError("latent, global or colour noise > 0 draws noise: pass a generator")
            noise = torch.randn(z.shape, generator=generator)
            enc = self.config.encoder
            g = enc.global_slice()
            # The global channels get one draw per object and channel, so they stay constant over the grid, as
            # they are in every grid the denoiser produces.
            noise[:, g] = noise[:, g, :1, :1, :1].expand_as(noise[:, g])
            std = torch.full((z.shape[1],), float(latent_noise))
            std[g] = float(global_noise)
            if enc.raw_color_channels:
                std[-enc.raw_color_channels:] = max(float(colour_noise), float(latent_noise))
            z = z + (std.view(1, -1, 1, 1, 1) * noise).to(z.device)
        loss, stats = self.photometric_loss(z, targets, generator, mask_weight)
        if spread is not None:
            stats["code_spread"] = spread
        if l2 is not None:
            loss = loss + latent_l2 * l2
            stats["latent_l2"] = l2.item()
        return loss, stats

    def latent_loss(self, x0: Tensor, category: Tensor | None, generator: torch.Generator) -> tuple[Tensor, dict]:
        """v-prediction loss on normalised latents x0 (B, C, S, S, S)."""
        b = x0.shape[0]
        t = torch.randint(0, self.schedule.num_steps, (b,), generator=generator).to(x0.device)
        noise = self.shape_noise(torch.randn(x0.shape, generator=generator)).to(x0.device)
        x_t = self.schedule.q_sample(x0, t, noise)
        category = self._drop_category(category, generator)
        v = self.unet(x_t, t, category)
        loss = F.mse_loss(v, self.schedule.v_target(x0, t, noise))
        return loss, {"v": loss.item()}

    def _drop_category(self, category: Tensor | None, generator: torch.Generator) -> Tensor | None:
        if category is None or self.config.cfg_drop <= 0:
            return category
        drop = torch.rand(category.shape[0], generator=generator).to(category.device) < self.config.cfg_drop
        return torch.where(drop, torch.full_like(category, self.config.unet.num_classes), category)

    def bootstrap_loss(self, images: Tensor, cameras: PerspectiveCamera, targets: Targets,
                       category: Tensor | None, generator: torch.Generator, mask_weight: float = 0.1,
                       bootstrap_prob: float = 0.5, latent_weight: float = 1.0,
                       force_branch: str | None = None) -> tuple[Tensor, dict]:
        """The paper's bootstrapped latent diffusion step (HoloDiffusion sec. 3.3), plus (optionally) the latent
        v-loss on the first pass, which keeps the denoiser's output in the encoder's space.

        ``force_branch``: "single" or "double" picks the branch instead of drawing it (for tests).
        """
        x0 = self.normalize(self.encode(images, cameras))
        b = x0.shape[0]
        category = self._drop_category(category, generator)
        t = torch.randint(0, self.schedule.num_steps, (b,), generator=generator).to(x0.device)
        noise = self.shape_noise(torch.randn(x0.shape, generator=generator)).to(x0.device)
        x_t = self.schedule.q_sample(x0, t, noise)
        v = self.unet(x_t, t, category)
        x0_hat = self.project_global(self.schedule.x0_from_v(x_t, t, v))
        double = bool(torch.rand((), generator=generator) < bootstrap_prob)
        if force_branch is not None:
            double = force_branch == "double"
        if double:
            # Noise the model's own estimate again and denoise once more: the model learns to denoise the kind of
            # grids it will meet while sampling. Gradients flow through both passes.
            t2 = torch.randint(0, self.schedule.num_steps, (b,), generator=generator).to(x0.device)
            noise2 = self.shape_noise(torch.randn(x0.shape, generator=generator)).to(x0.device)
            x_t2 = self.schedule.q_sample(x0_hat, t2, noise2)
            x0_hat = self.denoise(x_t2, t2, category)
        loss, stats = self.photometric_loss(self.denormalize(x0_hat), targets, generator, mask_weight)
        if latent_weight > 0:
            lv = F.mse_loss(v, self.schedule.v_target(x0.detach(), t, noise))
            loss = loss + latent_weight * lv
            stats["v"] = lv.item()
        stats["double"] = float(double)
        return loss, stats

    # ------------------------------------------------------------------ sampling
    @property
    def guide(self) -> HoloDiffusion | None:
        """The attached autoguidance model, if any."""
        return self._guide[0] if self._guide else None

    @property
    def guide_weight(self) -> float:
        """The weight w the presets sample with: the attached guide's own (``save_guide``'s ``weight``, in its
        file's metadata: measured per model, since how far to push depends on how much weaker the guide is),
        ``GUIDE_WEIGHT`` for a guide that names none, 1 (no guidance) without a guide."""
        if self.guide is None:
            return 1.0
        return float((getattr(self.guide, "info", None) or {}).get("weight", GUIDE_WEIGHT))

    def attach_guide(self, guide: HoloDiffusion | None) -> None:
        """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): while
        sampling, the prediction is pushed away from that of a weaker denoiser, x0 = x0_weak + w (x0 - x0_weak).
        Where both make the same errors the difference cancels; what the good model knows beyond the weak one is
        amplified, so samples move towards the data without the loss of variety of classifier-free guidance. The
        weak model has to err the way this one does: its own earlier weights did (README, "Autoguidance"); a small
        U-Net trained briefly on the same latents, or perturbed attention, made floaters.

        ``guide`` must share this model's latent space (the same autoencoder, normalisation, grid and schedule);
        ``None`` detaches it. Raises ``ValueError`` naming what differs."""
        if guide is None:
            self._guide = ()
            return
        ours, theirs = self.config.to_dict(), guide.config.to_dict()
        differ = sorted(k for k in ours if k not in GUIDE_MAY_DIFFER and ours[k] != theirs.get(k))
        mine, its = self.state_dict(), guide.state_dict()
        differ += sorted({k.split(".")[0] for k in mine if not k.startswith("unet.")
                          and (k not in its or not torch.equal(mine[k].cpu(), its[k].cpu()))})
        if differ:
            raise ValueError(f"the guide does not share this model's latent space: its {', '.join(differ)} differ "
                             "(use an earlier checkpoint of this model's own run, or a denoiser trained with "
                             "--init-from this model and only the denoiser's settings changed)")
        self._guide = (guide.to(self.device).eval(),)

    @torch.no_grad()
    def sample(self, seeds: Sequence[int], categories: Sequence[str | None] | str | None = None, steps: int = 25,
               sampler: str = "dpm++", guidance: float = 1.0, callback: StepCallback | None = None,
               autoguidance: float = 1.0) -> Tensor:
        """Samples one normalised latent per seed: (len(seeds), C, S, S, S). Object i depends on seeds[i] alone.

        ``sampler="ancestral"`` with ``steps=1000`` is the original release's sampler. ``autoguidance`` w != 1 mixes
        in the attached guide's prediction (``attach_guide``); 1 leaves it out. Use ``denormalize`` to turn the
        result into a grid the decoder renders.
        """
        if autoguidance != 1.0 and self.guide is None:
            raise ValueError(f"autoguidance {autoguidance} needs a guide model (attach_guide; a model folder's "
                             "guide.safetensors); use 1 for none")
        n = len(seeds)
        if isinstance(categories, str) or categories is None:
            categories = [categories] * n
        c, s = self.config.encoder.channels, self.config.grid_size
        gens = [torch.Generator().manual_seed(int(sd)) for sd in seeds]
        x = self.shape_noise(per_object_noise((n, c, s, s, s), gens, self.device))
        cat = self.category_index(categories, n)

        def denoise(x_t: Tensor, t: Tensor) -> Tensor:
            x0 = self.denoise(x_t, t, cat, guidance)
            if autoguidance != 1.0:
                weak = self.guide.denoise(x_t, t, cat)
                x0 = weak + autoguidance * (x0 - weak)
            return x0

        return sample(denoise, x, self.schedule, sampler, steps, gens, callback, shape_noise=self.shape_noise)


GUIDE_FILE = "guide.safetensors"
"""A model folder's autoguidance model, beside its ``holodiffusion.safetensors``."""

GUIDE_WEIGHT = 2.0
"""Autoguidance weight of a guide whose file names none (chosen on 100 held-out apples, README "Autoguidance")."""


def check_guide_weight(weight: float, what: str) -> float:
    """``weight`` as a float if it is a usable autoguidance weight (finite, at least 1; 1: the guide does nothing),
    else a ``UserError`` that starts with ``what`` (the option or setting the user gave it as)."""
    import math

    from .errors import UserError

    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 1):
        raise UserError(f"{what} must be a number of at least 1 (1: the guide does nothing; the shipped guides use "
                        f"2 and 4); got {weight}")
    return float(weight)


def save_guide(source: str, model: str, out: str, weight: float = GUIDE_WEIGHT) -> Path:
    """Writes ``source`` (a HoloDiffusion model file or run folder: an earlier or smaller denoiser trained on
    ``model``'s autoencoder) as ``model``'s autoguidance file ``out``, its denoiser's kernels in 8 bits and its
    biases and norms in float16 (``quantize_int8``: a quarter of the bytes; a guide's rounding matters far less than
    its being a weaker model, and the shipped guides were measured so); the autoencoder and normalisation stay
    float32, bit-identical to the model's, which ``attach_guide`` checks. ``weight`` (at least 1) goes into the
    file's metadata: the presets sample ``model`` with it (``HoloDiffusion.guide_weight``). Raises ``UserError`` if
    the guide does not fit ``model`` or the weight is not a number of at least 1."""
    from .errors import UserError
    from .weights import quantize_int8, read_metadata, save_weights

    weight = check_guide_weight(weight, "the guide's weight (--weight)")
    if Path(source).is_dir():  # a training run folder: its EMA model file
        source = str(Path(source) / "model.safetensors")
    guide, main = load_holodiffusion(source, guide=False), load_holodiffusion(model, guide=False)
    try:
        main.attach_guide(guide)
    except ValueError as e:
        raise UserError(f"{source!r} cannot guide {model!r}: {e}") from None
    state = quantize_int8(guide.state_dict(), "unet.")
    info = dict(read_metadata(source)["info"], guide_for=Path(model).parent.name, guide_source=Path(source).name,
                stored="denoiser kernels int8 per output channel", weight=weight)
    return save_weights(out, state, "holodiffusion", guide.config.to_dict(), info)


def load_holodiffusion(path: str, device: str | torch.device = "cpu", guide: bool = True) -> HoloDiffusion:
    """A trained model from a weights file or a training run folder (its ``model.safetensors``: EMA denoiser).

    A model folder's ``holodiffusion.safetensors`` comes with the folder's ``guide.safetensors`` attached
    (``HoloDiffusion.attach_guide``) where there is one and ``guide`` is true.

    Raises ``UserError`` with a clear sentence for a missing file, a file that is not safetensors, a safetensors
    file that is not a HoloDiffusion model, or a guide that does not fit the model.
    """
    from .errors import UserError
    from .weights import load_model

    model, meta = load_model(path, "holodiffusion", lambda cfg: HoloDiffusion(HoloDiffusionConfig.from_dict(cfg)),
                             device, "a HoloDiffusion model")
    model.info = meta["info"]
    beside = Path(path).with_name(GUIDE_FILE)
    if guide and Path(path).name == "holodiffusion.safetensors" and beside.is_file():
        try:
            model.attach_guide(load_holodiffusion(str(beside), device, guide=False))
        except ValueError as e:
            raise UserError(f"{str(beside)!r}: {e}") from None
    return model
