"""Training HoloDiffusion from posed images: `holofusion train holodiffusion`.

Three phases, by global step (the CPU trials in shared notes showed why: trained as released, photometric-only, the
model collapsed to one average object within 45 minutes; an autoencoder first, then diffusion in its latent space,
recovered diversity):

1. ``autoencoder`` (``ae_steps``): encoder + decoder learn to reconstruct held-out target views from the source
   views' grid (photometric + silhouette loss). The latent space learns to carry shape and colour.
2. ``latent`` (``latent_steps``): encoder grids of every training object (``cache_subsets`` different source-view
   subsets each) are cached once and normalised per channel; the 3D U-Net learns v-prediction on them (no rendering:
   fast steps, large batches), with an EMA of its weights for sampling.
3. ``bootstrap`` (``bootstrap_steps``): the paper's bootstrapped photometric objective fine-tunes everything jointly.

Every random draw of step k comes from a generator seeded by (seed, k, micro-batch), so a run resumed from a
checkpoint takes exactly the steps the uninterrupted run would have, and a DDP run (``torchrun``) whose ranks split
the micro-batches of a step computes the same update as one process doing them all.
"""

from __future__ import annotations

import copy
import json
import shutil
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from .cameras import PerspectiveCamera, fly_around_cameras
from .configbase import DictConfig
from .configs import resolve_config
from .data.co3d import Co3dDataset
from .errors import UserError
from .holodiffusion import HoloDiffusion, HoloDiffusionConfig, Targets
from .runloop import CHECKPOINT, MODEL, TRAIN_STATE, RunLoop
from .weights import load_weights, save_weights

__all__ = ["TrainConfig", "Trainer", "train_holodiffusion", "PHASES"]

PHASES = ("autoencoder", "latent", "bootstrap")
LATENTS = "latents.safetensors"


@dataclass
class TrainConfig(DictConfig):
    """How HoloDiffusion is trained (see the module docstring for the phases)."""

    image_size: int = 64
    """Side of the square crops the encoder and the loss see, in pixels."""
    n_source: int = 8
    """Source views per object, unprojected by the encoder."""
    n_target: int = 3
    """Target views per object, never seen by the encoder; the photometric loss renders them."""
    rays_per_target: int = 256
    """Rays rendered per target view."""
    object_ray_fraction: float = 0.5
    """Share of each target's rays drawn from the object's mask (the rest uniformly over the image)."""
    box_ray_fraction: float = 0.0
    """Share of each target's rays drawn uniformly from the object's bounding box in that view (the mask's, grown
    by a tenth on each side): where holes and gaps between parts are. Seen through, they are a percent or two of a
    whole image, too few for the mask loss to clear the density a coarse grid leaves in them (a donut's hole)."""
    batch_scenes: int = 4
    """Objects per micro-batch in the photometric phases."""
    micro_batches: int = 1
    """Micro-batches per optimizer step (gradient accumulation; DDP ranks split them, so it must divide by the
    world size)."""
    latent_batch: int = 32
    """Latent grids per micro-batch in the latent phase."""
    ae_steps: int = 3000
    latent_steps: int = 40000
    bootstrap_steps: int = 2000
    lr: float = 5e-4
    """Learning rate of the autoencoder phase."""
    latent_lr: float = 2e-4
    """Learning rate of the U-Net in the latent phase."""
    latent_cooldown_steps: int = 0
    """The last this many latent steps decay the learning rate linearly to zero (0: constant to the end). At a
    constant rate Adam leaves the weights jittering around the optimum and the short EMA keeps some of it; a
    cool-down settles them (the warm-up/stable/decay schedule), and a run extended with --resume may add one."""
    bootstrap_lr: float = 5e-5
    """Learning rate of everything in the bootstrap phase."""
    warmup_steps: int = 200
    """Linear learning-rate warm-up at the start of each phase."""
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cache_subsets: int = 4
    """Encoder grids cached per training object (each from a different random set of source views)."""
    mask_weight: float = 0.1
    ae_latent_noise: float = 0.0
    """Std of Gaussian noise added to the encoder's grid in the autoencoder phase (see
    ``HoloDiffusion.autoencoder_loss``); 0 trains on clean grids."""
    ae_colour_noise: float = 0.0
    """Std of that noise on the raw-colour channels (the larger of the two applies there)."""
    ae_global_noise: float | None = None
    """Std of that noise on the global code's channels (None: ``ae_latent_noise``). 0 was tried to keep the code
    from saturating into a constant, as it did in the shipped autoencoders, and did not (README, design notes)."""
    ae_latent_l2: float = 0.0
    """Weight of the penalty on the squared local latent channels in the autoencoder phase (see
    ``HoloDiffusion.autoencoder_loss``)."""
    bootstrap_prob: float = 0.5
    """Probability of the second (bootstrapped) denoising pass."""
    bootstrap_latent_weight: float = 1.0
    """Weight of the latent v-loss kept during the bootstrap phase (ties the denoiser to the encoder's space)."""
    subset: str | None = "fewview_dev"
    """Set list to train from (None: split by frame type)."""
    max_sequences: int | None = None
    """Training sequences per category (None: all)."""
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 250
    sample_every: int = 1000
    """Steps between sample sheets (0: only at the end)."""
    sample_seeds: int = 16
    sample_views: int = 4
    sample_steps: int = 20
    sample_size: int = 64
    view_distance: float = 9.0
    """Camera distance of the turntable renders in sample sheets (world units)."""
    view_focal: float = 2.0
    """NDC focal length of the turntable renders."""
    view_elevation: float = 20.0
    """Elevation of the turntable renders in degrees."""


    @property
    def total_steps(self) -> int:
        return self.ae_steps + self.latent_steps + self.bootstrap_steps

    def phase(self, step: int) -> str:
        if step < self.ae_steps:
            return "autoencoder"
        if step < self.ae_steps + self.latent_steps:
            return "latent"
        return "bootstrap"

    def phase_start(self, phase: str) -> int:
        return {"autoencoder": 0, "latent": self.ae_steps, "bootstrap": self.ae_steps + self.latent_steps}[phase]


def box_pixels(masks: Tensor, count: int, gen: torch.Generator, grow: float = 0.1) -> Tensor:
    """``count`` flat pixel indices per view drawn uniformly from the bounding box of each mask (n, H, W), grown by
    ``grow`` of its size on each side and clipped to the image; an empty mask's box is the whole image."""
    n, h, w = masks.shape

    def extent(hit: Tensor, size: int) -> tuple[Tensor, Tensor]:
        idx = torch.arange(size)
        lo = torch.where(hit, idx, size).min(1).values
        hi = torch.where(hit, idx, -1).max(1).values
        empty = ~hit.any(1)
        lo, hi = torch.where(empty, 0, lo), torch.where(empty, size - 1, hi)
        pad = ((hi - lo + 1).float() * grow).round().long()
        return (lo - pad).clamp(0, size - 1), (hi + pad).clamp(0, size - 1)

    y0, y1 = extent(masks.any(2), h)
    x0, x1 = extent(masks.any(1), w)
    u = torch.rand(n, count, 2, generator=gen)
    x = x0[:, None] + (u[..., 0] * (x1 - x0 + 1)[:, None]).long()
    y = y0[:, None] + (u[..., 1] * (y1 - y0 + 1)[:, None]).long()
    x, y = torch.minimum(x, x1[:, None]), torch.minimum(y, y1[:, None])
    return y * w + x


def step_generator(seed: int, step: int, micro: int, salt: int = 0) -> torch.Generator:
    """The generator of one micro-batch of one step: independent of everything that happened before."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 131 + micro * 7 + salt)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer(RunLoop):
    """Owns the model, the EMA denoiser, the optimizer and the data of one training run."""

    phase_names = PHASES

    def __init__(self, data: str | os.PathLike, categories: list[str], config: dict[str, Any], out: str | os.PathLike,
                 device: str = "cpu", resume: bool = False, progress: bool = True, init_from: str | None = None):
        self.out = Path(out)
        self.device = torch.device(device)
        self.rank, self.world = _dist_info()
        self.progress = progress and self.rank == 0
        stored = self.out / CHECKPOINT
        self.surface: dict[str, Any] | None = None
        """The autoencoder's calibrated surface level (``evaluate.calibrate_surface``), once its phase is over."""
        if resume and stored.is_file():
            _, meta = load_weights(stored)
            self.surface = meta["info"].get("surface")
            schedule = {k: v for k, v in (config or {}).get("train", {}).items() if k in SCHEDULE_KEYS}
            config = meta["config"]  # a resumed run keeps the config it started with, but for its schedule
            categories = config["model"]["categories"]
            if schedule:
                config = _reschedule(config, schedule, int(meta["info"].get("step", 0)))
        elif resume:
            raise UserError(f"--resume: {str(self.out)!r} holds no checkpoint to resume from")
        elif self.out.exists() and any(self.out.iterdir()):
            raise UserError(f"run folder {str(self.out)!r} already exists; pass --resume to continue it or choose "
                            "a new --out")
        try:
            self.model_config = HoloDiffusionConfig.from_dict(config["model"])
            self.cfg = TrainConfig.from_dict(config["train"])
        except (ValueError, TypeError) as e:
            raise UserError(f"bad config: {e}") from None
        self.config = {"model": self.model_config.to_dict(), "train": self.cfg.to_dict()}
        if self.cfg.micro_batches % self.world:
            raise UserError(f"micro_batches ({self.cfg.micro_batches}) must be divisible by the number of DDP "
                            f"processes ({self.world})")
        self.categories = list(categories)
        self.data_root = str(data)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.dataset = Co3dDataset(data, self.categories, subset=self.cfg.subset, split="train",
                                   image_size=self.cfg.image_size, max_sequences=self.cfg.max_sequences, cache=True)
        need = self.cfg.n_source + self.cfg.n_target
        self.sequences = [s for s in self.dataset.sequences if len(self.dataset.frames(*s)) >= need]
        if not self.sequences:
            raise UserError(f"{data}: no training sequence of {', '.join(self.categories)} has the {need} frames a "
                            f"batch needs (n_source + n_target)")
        self.model = HoloDiffusion(self.model_config).to(self.device)
        if self.device.type == "cpu":
            # oneDNN's 3D convolutions and their gradients run about 1.4x faster on channels-last grids (a latent
            # step of the cpu config: 1.25 s against 1.75 s on one core); loading weights keeps this layout.
            self.model.unet.to(memory_format=torch.channels_last_3d)
        self.ema = copy.deepcopy(self.model.unet).requires_grad_(False)
        ae_params = list(self.model.encoder.parameters()) + list(self.model.decoder.parameters())
        self.opt = torch.optim.AdamW([{"params": ae_params, "name": "autoencoder"},
                                      {"params": list(self.model.unet.parameters()), "name": "unet"}],
                                     lr=self.cfg.lr, weight_decay=0.0)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.latents: Tensor | None = None
        self._keep_normalisation = False
        self.latent_categories: Tensor | None = None
        self.data_stats: dict[str, float] | None = None
        if resume:
            self._load()
        elif init_from:
            self._init_from(Path(init_from))

    # ------------------------------------------------------------------ data
    def scene_batch(self, gen: torch.Generator) -> tuple[Tensor, PerspectiveCamera, Targets, Tensor | None]:
        """B objects: source images (B, V, 3, H, W), their B*V cameras, target rays, category indices."""
        cfg = self.cfg
        idx = torch.randperm(len(self.sequences), generator=gen)[:cfg.batch_scenes].tolist()
        src_imgs, src_cams, tgt_imgs, tgt_masks, tgt_cams, cats = [], [], [], [], [], []
        for i in idx:
            cat, seq = self.sequences[i]
            frames = self.dataset.frames(cat, seq)
            pick = torch.randperm(len(frames), generator=gen)[:cfg.n_source + cfg.n_target].tolist()
            views = self.dataset.load_views(cat, seq, [frames[j].frame_number for j in pick])
            src_imgs.append(views.images[:cfg.n_source])
            src_cams.append(views.cameras[:cfg.n_source])
            tgt_imgs.append(views.images[cfg.n_source:])
            tgt_masks.append(views.masks[cfg.n_source:])
            tgt_cams.append(views.cameras[cfg.n_source:])
            cats.append(cat)
        images = torch.stack(src_imgs).to(self.device)
        cams = PerspectiveCamera.stack(src_cams).to(self.device, torch.float32)
        targets = self._rays(torch.cat(tgt_imgs), torch.cat(tgt_masks), PerspectiveCamera.stack(tgt_cams), gen)
        return images, cams, targets, self.model.category_index(cats, len(cats))

    def _rays(self, images: Tensor, masks: Tensor, cams: PerspectiveCamera, gen: torch.Generator) -> Targets:
        """Random pixels of each target view: ``object_ray_fraction`` of them inside the mask,
        ``box_ray_fraction`` inside the mask's bounding box, the rest anywhere."""
        n, _, h, w = images.shape
        r = self.cfg.rays_per_target
        n_obj = int(round(r * self.cfg.object_ray_fraction))
        n_box = min(int(round(r * self.cfg.box_ray_fraction)), r - n_obj)
        flat_mask = (masks.reshape(n, -1) > 0.5).float() + 1e-6  # never all zero
        parts = [torch.multinomial(flat_mask, n_obj, replacement=True, generator=gen)]
        if n_box:  # drawn only when asked for, so that runs without box rays keep their random stream
            parts.append(box_pixels(masks.reshape(n, h, w) > 0.5, n_box, gen))
        parts.append(torch.randint(0, h * w, (n, r - n_obj - n_box), generator=gen))
        pix = torch.cat(parts, 1)  # (n, r)
        xy = torch.stack([(pix % w).float() + 0.5, (pix // w).float() + 0.5], -1)
        rgb = torch.gather(images.reshape(n, 3, -1), 2, pix[:, None].expand(-1, 3, -1)).transpose(1, 2)
        mask = torch.gather(masks.reshape(n, -1), 1, pix)
        return Targets(cams.to(self.device, torch.float32), xy.to(self.device), rgb.to(self.device),
                       mask.to(self.device))

    # ------------------------------------------------------------------ latent cache
    @torch.no_grad()
    def build_latent_cache(self) -> None:
        """Encodes every training object ``cache_subsets`` times and fixes the latent normalisation."""
        path = self.out / LATENTS
        if path.is_file():
            state, _ = load_weights(path)
            self.latents, self.latent_categories = state["latents"], state["categories"]
            self.model.latent_mean.copy_(state["mean"])
            self.model.latent_std.copy_(state["std"])
            return
        cfg = self.cfg
        zs, cats = [], []
        jobs = [(i, s) for i in range(len(self.sequences)) for s in range(cfg.cache_subsets)]
        bar = tqdm(total=len(jobs), desc="caching latents", unit="grid", disable=not self.progress, leave=False)
        for start in range(0, len(jobs), 8):
            chunk = jobs[start:start + 8]
            imgs, cams, names = [], [], []
            for i, s in chunk:
                gen = step_generator(cfg.seed, i, s, salt=977)
                cat, seq = self.sequences[i]
                frames = self.dataset.frames(cat, seq)
                pick = torch.randperm(len(frames), generator=gen)[:cfg.n_source].tolist()
                views = self.dataset.load_views(cat, seq, [frames[j].frame_number for j in pick])
                imgs.append(views.images)
                cams.append(views.cameras)
                names.append(cat)
            z = self.model.encode(torch.stack(imgs).to(self.device),
                                  PerspectiveCamera.stack(cams).to(self.device, torch.float32))
            zs.append(z.cpu())
            idx = self.model.category_index(names, len(names))
            cats.append(idx.cpu() if idx is not None else torch.zeros(len(names), dtype=torch.long))
            bar.update(len(chunk))
        bar.close()
        z = torch.cat(zs)
        if self._keep_normalisation:  # a denoiser trained on this normalisation came with the weights
            mean, std = self.model.latent_mean.cpu().clone(), self.model.latent_std.cpu().clone()
        else:
            mean = z.mean(dim=(0, 2, 3, 4))
            std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
        self.model.latent_mean.copy_(mean.to(self.device))
        self.model.latent_std.copy_(std.to(self.device))
        self.latents = ((z - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)).contiguous()
        self.latent_categories = torch.cat(cats)
        if self.rank == 0:
            save_weights(path, {"latents": self.latents, "categories": self.latent_categories, "mean": mean,
                                "std": std}, "latent-cache", self.config, {"objects": len(self.sequences)})

    # ------------------------------------------------------------------ one step
    def _set_lr(self, phase: str, step: int) -> None:
        cfg = self.cfg
        warm = min(1.0, (step - cfg.phase_start(phase) + 1) / max(1, cfg.warmup_steps))
        lrs = {"autoencoder": (cfg.lr, 0.0), "latent": (0.0, cfg.latent_lr),
               "bootstrap": (cfg.bootstrap_lr, cfg.bootstrap_lr)}[phase]
        if phase == "latent" and cfg.latent_cooldown_steps > 0:
            left = cfg.phase_start("latent") + cfg.latent_steps - step
            warm *= min(1.0, left / cfg.latent_cooldown_steps)
        for group, lr in zip(self.opt.param_groups, lrs):
            group["lr"] = lr * warm

    def _micro_loss(self, phase: str, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        cfg, m = self.cfg, self.model
        if phase == "latent":
            idx = torch.randint(0, len(self.latents), (cfg.latent_batch,), generator=gen)
            x0 = self.latents[idx].to(self.device)
            if self.device.type == "cpu":
                x0 = x0.contiguous(memory_format=torch.channels_last_3d)
            cat = self.latent_categories[idx].to(self.device) if m.config.unet.num_classes else None
            return m.latent_loss(x0, cat, gen)
        images, cams, targets, cat = self.scene_batch(gen)
        if phase == "autoencoder":
            return m.autoencoder_loss(images, cams, targets, gen, cfg.mask_weight, cfg.ae_latent_noise,
                                      cfg.ae_colour_noise, cfg.ae_latent_l2, cfg.ae_global_noise)
        return m.bootstrap_loss(images, cams, targets, cat, gen, cfg.mask_weight, cfg.bootstrap_prob,
                                cfg.bootstrap_latent_weight)

    def train_step(self) -> dict[str, float]:
        """One optimizer step (all micro-batches of this rank, gradients averaged over every rank)."""
        cfg, step = self.cfg, self.step
        phase = cfg.phase(step)
        if phase != "autoencoder" and self.latents is None:
            self.build_latent_cache()
        if phase != "autoencoder" and self.surface is None:
            self.calibrate_surface()
        self._set_lr(phase, step)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        per_rank = cfg.micro_batches // self.world
        totals: dict[str, float] = {}
        for k in range(per_rank):
            micro = self.rank * per_rank + k
            loss, stats = self._micro_loss(phase, step_generator(cfg.seed, step, micro))
            (loss / cfg.micro_batches).backward()
            stats["loss"] = loss.item()
            for key, v in stats.items():
                totals[key] = totals.get(key, 0.0) + v / per_rank
        trained = [p for g in self.opt.param_groups if g["lr"] > 0 for p in g["params"]]
        if self.world > 1:
            for p in trained:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)  # sum over ranks of (micro losses / micro_batches): the global mean
        if cfg.grad_clip > 0 and trained:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip))
        self.opt.step()
        if phase != "autoencoder":
            self._ema_update()
        self.step += 1
        totals["step"] = step
        totals["phase"] = PHASES.index(phase)
        return totals

    @torch.no_grad()
    def calibrate_surface(self) -> None:
        """Measures where the trained autoencoder puts surfaces (``holofusion calibrate``), so the model file carries
        the level that meshes and evaluations use. Done once the autoencoder is final (the latent phase leaves it
        as it is) and again after the bootstrap phase, which changes it."""
        from .evaluate import calibrate_surface

        if self.rank != 0:
            return
        self.model.eval()
        try:
            self.surface = calibrate_surface(self.model, self.data_root, progress=False, categories=self.categories,
                                             image_size=self.cfg.image_size, n_source=self.cfg.n_source)
        except UserError as e:  # an autoencoder too young to have surfaces: the model keeps the default level
            self.surface = {"failed": str(e)}
        self.surface["step"] = self.step

    @torch.no_grad()
    def _ema_update(self) -> None:
        # Early in the latent phase a short EMA horizon lets the average catch up with a fast-changing network.
        k = self.step - self.cfg.ae_steps + 1
        decay = min(self.cfg.ema_decay, (1 + k) / (10 + k))
        for e, p in zip(self.ema.parameters(), self.model.unet.parameters()):
            e.lerp_(p, 1 - decay)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        if self.rank != 0:
            return
        info = {"step": self.step, "phase": self.cfg.phase(max(self.step - 1, 0)), "data": self.data_root,
                "image_size": self.cfg.image_size, "n_source": self.cfg.n_source,
                "categories": self.categories, "objects": len(self.sequences)}
        if self.step == self.cfg.total_steps and self.cfg.bootstrap_steps > 0 and \
                (self.surface or {}).get("step") != self.step:
            self.calibrate_surface()  # the bootstrap phase trained the autoencoder too
        if self.surface is not None:
            info["surface"] = self.surface
        self.save_run("holodiffusion", info)

    def _load(self) -> None:
        self.load_run()
        if self.cfg.phase(self.step) != "autoencoder" or self.step > self.cfg.ae_steps:
            if (self.out / LATENTS).is_file():
                self.build_latent_cache()  # reads the cached file

    def _init_from(self, source: Path) -> None:
        """Starts from another run's trained autoencoder (encoder + decoder) and its latent cache: a new denoiser
        can then be compared with the old one on the same latent space without repeating the autoencoder phase.

        ``source`` may also be a HoloDiffusion model file (e.g. a shipped ``models/<name>/holodiffusion.safetensors``):
        then every weight is taken, the denoiser's too (as the network and as its EMA), and training continues at
        the file's step with a fresh optimizer: in the latent phase the latent cache is rebuilt from the data with
        that encoder (the same data and encoder give the same cache and normalisation); a config whose ``ae_steps``
        exceeds the file's step trains the autoencoder on from there first. A config that changes only the
        denoiser's settings (``DENOISER_ONLY``) takes the file's autoencoder and normalisation alone and trains a
        new denoiser from the start of the latent phase (``_init_autoencoder_from_model``)."""
        if source.is_file():
            self._init_from_model(source)
            return
        path = source / CHECKPOINT
        if not path.is_file():
            raise UserError(f"--init-from: {str(source)!r} holds no {CHECKPOINT}")
        state, meta = load_weights(path, self.device)
        theirs, ours = dict(meta["config"]["model"]), self.model_config.to_dict()
        for cfg in (theirs, ours):
            for key in DENOISER_ONLY:
                cfg.pop(key, None)
        if theirs != ours:
            diff = sorted(k for k in ours if theirs.get(k) != ours[k])
            raise UserError(f"--init-from: {str(source)!r} has a different encoder/decoder/grid ({', '.join(diff)})")
        if meta["info"].get("step", 0) < meta["config"]["train"]["ae_steps"]:
            raise UserError(f"--init-from: {str(source)!r} has not finished its autoencoder phase yet")
        keep = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder."))}
        self.model.load_state_dict(keep, strict=False)
        self.surface = meta["info"].get("surface")  # same autoencoder, same surface
        self.step = self.cfg.ae_steps
        if (source / LATENTS).is_file() and self.rank == 0:
            shutil.copyfile(source / LATENTS, self.out / LATENTS)
        if self.rank == 0:
            (self.out / "init_from.json").write_text(json.dumps({"source": str(source), "step": meta["info"]["step"]}))

    def _init_from_model(self, source: Path) -> None:
        state, meta = load_weights(source, self.device)
        if meta["kind"] != "holodiffusion":
            raise UserError(f"--init-from: {str(source)!r} holds a {meta['kind']!r} model, not a HoloDiffusion model")
        # The diffusion's noise structure may change (the weights fit either; the denoiser then adapts to it).
        theirs = HoloDiffusionConfig.from_dict(meta["config"]).to_dict()
        ours = self.model_config.to_dict()
        for key in NOISE_KEYS:
            theirs[key] = ours[key]
        step = int(meta["info"].get("step", 0))
        if theirs != ours:
            diff = sorted(k for k in ours if theirs.get(k) != ours[k])
            if set(diff) <= set(DENOISER_ONLY) and step >= self.cfg.ae_steps:
                self._init_autoencoder_from_model(source, state, meta)
                return
            raise UserError(f"--init-from: {str(source)!r} was built with other model settings ({', '.join(diff)}); "
                            "use the config it was trained with, or change only the denoiser's settings "
                            f"({', '.join(DENOISER_ONLY)}) to train a new denoiser on its autoencoder")
        self.model.load_state_dict(state)
        self.ema.load_state_dict(self.model.unet.state_dict())
        if step < self.cfg.ae_steps:
            # The config's autoencoder phase reaches beyond the file's step (an unfinished autoencoder, or one to
            # train further with other settings): it goes on from there; the latent normalisation and the surface
            # level are measured again when it ends, and the denoiser that came with the file is a warm start.
            self.step = step
        else:
            self._keep_normalisation = True
            self.surface = meta["info"].get("surface")
            self.step = min(step, self.cfg.ae_steps + self.cfg.latent_steps - 1)
        if self.rank == 0:
            (self.out / "init_from.json").write_text(json.dumps({"source": str(source), "step": meta["info"]["step"],
                                                                "weights": "all"}))

    def _init_autoencoder_from_model(self, source: Path, state: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """A new denoiser (other ``unet`` settings) on a model file's finished autoencoder and latent
        normalisation: the file's latent space, unchanged, so that the two denoisers' predictions can be mixed
        (autoguidance, ``HoloDiffusion.sample``) and their samples decoded by the same decoder."""
        keep = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder.", "latent_"))}
        self.model.load_state_dict(keep, strict=False)
        self._keep_normalisation = True
        self.surface = meta["info"].get("surface")
        self.step = self.cfg.ae_steps
        if self.rank == 0:
            (self.out / "init_from.json").write_text(json.dumps({"source": str(source), "step": meta["info"]["step"],
                                                                "weights": "autoencoder"}))

    # ------------------------------------------------------------------ pictures
    def write_pictures(self) -> None:
        if self.rank != 0:
            return
        from .plots import loss_curve, sample_sheet

        loss_curve(self.history, self.out / "loss.png", phase_names=PHASES)
        sample_sheet(self.reconstructions(), self.out / "reconstructions.png",
                     title=f"step {self.step}: target view | render of the encoder's grid")
        if self.cfg.phase(max(self.step - 1, 0)) == "autoencoder":
            return
        sheet, stats = self.samples()
        sample_sheet(sheet, self.out / "samples.png", title=f"step {self.step}")
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **stats}) + "\n")

    @torch.no_grad()
    def reconstructions(self, n: int = 8) -> Tensor:
        """Held-out target views of n training objects beside renders of their encoder grids: (n, 2, H, W, 3)."""
        self.model.eval()
        gen = step_generator(self.cfg.seed, 0, 0, salt=4243)
        idx = torch.randperm(len(self.sequences), generator=gen)[:n].tolist()
        rows = []
        for i in idx:
            cat, seq = self.sequences[i]
            frames = self.dataset.frames(cat, seq)
            views = self.dataset.load_views(cat, seq, [f.frame_number for f in frames[:self.cfg.n_source + 1]])
            src = views.images[None, :-1].to(self.device)
            z = self.model.encode(src, views.cameras[:-1].to(self.device, torch.float32))
            out = self.model.render(z, views.cameras[-1:].to(self.device, torch.float32))
            rows.append(torch.stack([views.images[-1].permute(1, 2, 0), out.rgb[0].cpu()]))
        self.model.train()
        return torch.stack(rows)

    @torch.no_grad()
    def samples(self) -> tuple[Tensor, dict[str, float]]:
        """Renders fresh samples (EMA denoiser) and measures their spread of colour and size against the data's."""
        cfg = self.cfg
        model = copy.deepcopy(self.model)
        model.unet.load_state_dict(self.ema.state_dict())
        model.eval()
        seeds = list(range(cfg.sample_seeds))
        cats = [self.categories[i % len(self.categories)] for i in seeds] if len(self.categories) > 1 else None
        x = model.sample(seeds, cats, steps=cfg.sample_steps)
        cams = fly_around_cameras(cfg.sample_views, cfg.view_distance, cfg.view_elevation, cfg.view_focal,
                                  (cfg.sample_size, cfg.sample_size)).to(self.device)
        out = model.render(model.denormalize(x), PerspectiveCamera.stack([cams] * len(seeds)))
        rgb = out.rgb.reshape(len(seeds), cfg.sample_views, cfg.sample_size, cfg.sample_size, 3)
        alpha = out.alpha.reshape(len(seeds), -1)
        stats = {"sample_" + k: v for k, v in _spread(rgb.reshape(len(seeds), -1, 3), alpha).items()}
        if self.data_stats is None:
            self.data_stats = self._data_spread()
        stats.update({"data_" + k: v for k, v in self.data_stats.items()})
        for k in ("colour_spread", "size_spread"):
            stats[k + "_ratio"] = stats["sample_" + k] / max(stats["data_" + k], 1e-8)
        return rgb.cpu(), stats

    def _data_spread(self) -> dict[str, float]:
        gen = torch.Generator().manual_seed(12345)
        idx = torch.randperm(len(self.sequences), generator=gen)[:64].tolist()
        rgbs, alphas = [], []
        for i in idx:
            cat, seq = self.sequences[i]
            f = self.dataset.load_frame(self.dataset.frames(cat, seq)[0])
            rgbs.append(f.image.permute(1, 2, 0).reshape(-1, 3))
            alphas.append(f.mask.reshape(-1))
        return _spread(torch.stack(rgbs), torch.stack(alphas))


NOISE_KEYS = ("global_noise", "offset_noise", "pyramid_noise", "pyramid_blocks")
"""Model settings of the diffusion's noise structure: a continuation (--init-from a model file) may change them."""

DENOISER_ONLY = ("unet", *NOISE_KEYS, "cfg_drop")
"""Model settings of the denoiser alone: a run branched from another run's autoencoder (--init-from) may change
them."""

SCHEDULE_KEYS = ("ae_steps", "latent_steps", "bootstrap_steps", "latent_cooldown_steps", "log_every", "checkpoint_every",
                 "sample_every")
"""What a resumed run may change (train a phase longer or shorter): never a boundary it has already crossed."""


def _reschedule(config: dict[str, Any], schedule: dict[str, Any], step: int) -> dict[str, Any]:
    old = TrainConfig.from_dict(config["train"])
    new = TrainConfig.from_dict({**config["train"], **schedule})
    crossed = []
    if step > old.ae_steps and new.ae_steps != old.ae_steps:
        crossed.append(f"ae_steps (the autoencoder phase ended at step {old.ae_steps})")
    if step > old.ae_steps + old.latent_steps and new.latent_steps != old.latent_steps:
        crossed.append(f"latent_steps (the latent phase ended at step {old.ae_steps + old.latent_steps})")
    if new.phase_start(new.phase(max(step - 1, 0))) != old.phase_start(old.phase(max(step - 1, 0))) or \
            new.phase(max(step - 1, 0)) != old.phase(max(step - 1, 0)):
        crossed.append(f"the phase step {step} is in")
    if step > new.total_steps:
        crossed.append(f"the total ({new.total_steps}) is below the step reached ({step})")
    if crossed:
        raise UserError(f"--resume with a new schedule cannot change {'; '.join(crossed)}")
    return {**config, "train": new.to_dict()}


def _spread(rgb: Tensor, alpha: Tensor) -> dict[str, float]:
    """Colour spread (std over objects of the mean object colour) and size spread (std of covered area over its
    mean) of N objects' pixels rgb (N, P, 3) with coverage alpha (N, P)."""
    a = alpha.clamp(0, 1)
    area = a.mean(1)
    colour = (rgb * a[..., None]).sum(1) / a.sum(1).clamp_min(1e-6)[:, None]
    return {"colour_spread": float(colour.std(0).mean()), "size_spread": float(area.std() / area.mean().clamp_min(1e-6))}


def train_holodiffusion(data: str, categories: str, config: str | None, out: str, resume: bool = False,
                        max_steps: int | None = None, device: str = "cpu", progress: bool = True,
                        init_from: str | None = None) -> Trainer:
    """The `holofusion train holodiffusion` command (also usable from Python)."""
    cats = [c.strip() for c in categories.split(",") if c.strip()]
    if not cats:
        raise UserError("--categories is empty; name at least one category, e.g. apple or apple,donut")
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"--data {data!r} is not a folder")
    missing = [c for c in cats if not (root / c / "frame_annotations.jgz").is_file()]
    if missing:
        have = sorted(p.name for p in root.iterdir() if (p / "frame_annotations.jgz").is_file())
        raise UserError(f"--data {data!r} has no category {', '.join(missing)} (it has: {', '.join(have) or 'none'})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    resuming = resume and (Path(out) / CHECKPOINT).is_file()
    # A resumed run keeps its stored config; a --config given with --resume may only change its schedule.
    cfg = resolve_config(config or "cpu", cats) if not resuming or config else None
    trainer = Trainer(data, cats, cfg or {}, out, device, resume, progress, init_from)
    trainer.fit(max_steps)
    if dist.is_initialized():
        dist.barrier()
    return trainer
