"""Training the super-resolution model: `holofusion train superres`.

The model learns to turn low-resolution renders *of the HoloDiffusion model's own grids* into the real
high-resolution photographs, so it learns to repair that model's artefacts (HoloFusion, sec. 3.2). The training pairs
are made once, at the start of the run, and cached in the run folder (``pairs.safetensors``):

for each training object and each of ``cache_views`` held-out views: encode ``n_source`` other views with the
HoloDiffusion encoder, noise the normalised grid to a random step t < ``cond_noise`` * T, denoise it once with the
trained (EMA) denoiser, and render the result at the held-out view at ``low_size`` (RGB, alpha, features); the target
is the real photograph of that view at ``high_size``. Denoising from noise, rather than rendering the clean encoder
grid, makes the conditions look like the grids the sampler produces (smoother, colours a little off).

Then every step is a plain v-prediction step of the 2D U-Net on a batch of cached pairs (no rendering): fast. As in
the HoloDiffusion trainer, step k draws every random number from a generator seeded by (seed, k), so ``--resume``
continues exactly; the run folder gets ``checkpoint.safetensors`` + ``train_state.pt``, ``model.safetensors`` (EMA
weights, what sampling uses), ``loss.png`` and ``samples.png`` (condition | super-resolved | real, for training and
held-out objects).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from .cameras import PerspectiveCamera
from .configbase import DictConfig
from .configs import SUPERRES_BUILTIN, resolve_config
from .data.co3d import Co3dDataset
from .errors import UserError
from .holodiffusion import HoloDiffusion, load_holodiffusion
from .runloop import CHECKPOINT, MODEL, TRAIN_STATE, RunLoop
from .superres import Condition, SuperRes, SuperResConfig
from .train import step_generator
from .weights import load_weights, save_weights

__all__ = ["SuperResTrainConfig", "SuperResTrainer", "train_superres", "coarse_conditions"]

PAIRS = "pairs.safetensors"


@dataclass
class SuperResTrainConfig(DictConfig):
    """How the super-resolution model is trained."""

    steps: int = 6000
    batch: int = 8
    """Pairs per step."""
    crop: int | None = None
    """Train on a random crop x crop window of each pair (pixels at high_size; a multiple of the U-Net's
    downsampling) instead of the whole view; None: whole views. Sampling always makes whole views."""
    lr: float = 2e-4
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    n_source: int = 8
    """Source views the HoloDiffusion encoder sees when the pairs are made."""
    cache_views: int = 8
    """Held-out views (pairs) per training object."""
    cond_noise: float = 0.6
    """The conditioning grids are denoised from a step drawn uniformly below cond_noise * T."""
    subset: str | None = "fewview_dev"
    max_sequences: int | None = None
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 250
    sample_every: int = 1000
    """Steps between sample sheets (0: only at the end)."""
    sample_views: int = 6
    """Pairs shown per split (training, held-out) in the sample sheet."""
    sample_steps: int = 10

    @property
    def total_steps(self) -> int:
        return self.steps


@torch.no_grad()
def coarse_conditions(hd: HoloDiffusion, latents: Tensor, cameras: PerspectiveCamera, low_size: int) -> Condition:
    """Low-resolution renders of normalised latents (B, C, S, S, S) from B*V cameras (any image size; resized to
    ``low_size``): the condition the super-resolution model sees. Deterministic (no ray jitter)."""
    cams = cameras.resize((low_size, low_size)).to(hd.device, torch.float32)
    out = hd.render(hd.denormalize(latents), cams)
    return Condition.from_render(out.rgb, out.alpha, out.features)


class SuperResTrainer(RunLoop):
    """Owns the super-resolution model, its EMA, the optimizer and the cached training pairs of one run."""

    phase_names = ("superres",)

    def __init__(self, holodiffusion: str, data: str | os.PathLike, config: dict[str, Any], out: str | os.PathLike,
                 device: str = "cpu", resume: bool = False, progress: bool = True, init_from: str | None = None):
        self.out = Path(out)
        self.device = torch.device(device)
        self.rank, self.progress = 0, progress
        stored = self.out / CHECKPOINT
        if resume and stored.is_file():
            _, meta = load_weights(stored)
            config = meta["config"]
            holodiffusion = meta["info"]["holodiffusion"]
        elif resume:
            raise UserError(f"--resume: {str(self.out)!r} holds no checkpoint to resume from")
        elif self.out.exists() and any(self.out.iterdir()):
            raise UserError(f"run folder {str(self.out)!r} already exists; pass --resume to continue it or choose "
                            "a new --out")
        self.hd_path = str(holodiffusion)
        self.hd = load_holodiffusion(self.hd_path, self.device)
        model_cfg = dict(config["model"])
        # The condition carries whatever features the coarse model's decoder renders.
        model_cfg["cond_features"] = self.hd.config.decoder.n_features_out
        try:
            self.model_config = SuperResConfig.from_dict(model_cfg)
            self.cfg = SuperResTrainConfig.from_dict(config["train"])
        except (ValueError, TypeError) as e:
            raise UserError(f"bad config: {e}") from None
        down = 2 ** (len(self.model_config.block_channels) - 1)
        if self.cfg.crop is not None and not (down <= self.cfg.crop <= self.model_config.high_size and
                                              self.cfg.crop % down == 0):
            raise UserError(f"bad config: crop {self.cfg.crop} must be a multiple of {down} (the U-Net's "
                            f"downsampling) between {down} and high_size {self.model_config.high_size}")
        self.config = {"model": self.model_config.to_dict(), "train": self.cfg.to_dict()}
        self.categories = list(self.hd.config.categories)
        self.data_root = str(data)
        self.out.mkdir(parents=True, exist_ok=True)
        kw = dict(subset=self.cfg.subset, max_sequences=self.cfg.max_sequences, cache=True)
        self.sources = Co3dDataset(data, self.categories, split="train", image_size=self.info_image_size, **kw)
        self.targets = Co3dDataset(data, self.categories, split="train", image_size=self.model_config.high_size, **kw)
        need = self.cfg.n_source + self.cfg.cache_views
        self.sequences = [s for s in self.sources.sequences if len(self.sources.frames(*s)) >= need]
        if not self.sequences:
            raise UserError(f"{data}: no training sequence of {', '.join(self.categories)} has the {need} frames the "
                            "pairs need (n_source + cache_views)")
        self.model = SuperRes(self.model_config).to(self.device)
        self.ema = copy.deepcopy(self.model.unet).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.unet.parameters(), lr=self.cfg.lr, weight_decay=0.0)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.pairs: dict[str, Tensor] | None = None
        self.init_from: dict[str, Any] | None = None
        if resume:
            self._load()
        elif init_from:
            self._init_from(Path(init_from))

    def _init_from(self, source: Path) -> None:
        """Starts from a trained super-resolution model (a weights file, or a run folder's ``model.safetensors``):
        its EMA weights become both the network and its EMA, the step count continues from the file's, and the
        optimizer starts afresh (its warm-up included). Runs can so be carried across machines as one weights
        file, where the run folder (optimizer state, pair cache) is not kept; the pairs are rebuilt from the data,
        and the same data and HoloDiffusion model give the same pairs."""
        path = source / MODEL if source.is_dir() else source
        if not path.is_file():
            raise UserError(f"--init-from: {str(source)!r} is neither a super-resolution weights file nor a run "
                            f"folder holding {MODEL}")
        state, meta = load_weights(path, self.device)
        if meta["kind"] != "superres":
            raise UserError(f"--init-from: {str(path)!r} holds a {meta['kind']!r} model, not a super-resolution model")
        ours = self.model_config.to_dict()
        if meta["config"] != ours:
            diff = sorted(k for k in ours if meta["config"].get(k) != ours[k])
            raise UserError(f"--init-from: {str(path)!r} was built with other model settings ({', '.join(diff)}); "
                            "use the config it was trained with")
        self.model.load_state_dict(state)
        self.ema.load_state_dict(self.model.unet.state_dict())
        done = int(meta["info"].get("step", 0))
        if done >= self.cfg.steps:
            raise UserError(f"--init-from: {str(path)!r} was trained for {done} steps, and this config stops at "
                            f"{self.cfg.steps}; set train.steps higher in a config file to train it longer")
        self.step = done
        self.init_from = {"source": str(path), "step": done}

    @property
    def info_image_size(self) -> int:
        """The image size the HoloDiffusion encoder was trained at (stored in its run's config when known)."""
        return int(self.hd.info.get("image_size") or _hd_train_image_size(self.hd_path) or 64)

    # ------------------------------------------------------------------ pairs
    @torch.no_grad()
    def build_pairs(self) -> None:
        path = self.out / PAIRS
        if path.is_file():
            state, _ = load_weights(path)
            self.pairs = state
            self.model.residual_scale.copy_(state["residual_scale"])
            return
        cfg, hd = self.cfg, self.hd
        conds, alphas, feats, targets = [], [], [], []
        bar = tqdm(total=len(self.sequences), desc="rendering training pairs", unit="object",
                   disable=not self.progress, leave=False)
        for i, (cat, seq) in enumerate(self.sequences):
            gen = step_generator(cfg.seed, i, 0, salt=5151)
            frames = self.sources.frames(cat, seq)
            pick = torch.randperm(len(frames), generator=gen)[:cfg.n_source + cfg.cache_views].tolist()
            numbers = [frames[j].frame_number for j in pick]
            src = self.sources.load_views(cat, seq, numbers[:cfg.n_source])
            tgt = self.targets.load_views(cat, seq, numbers[cfg.n_source:])
            z = hd.normalize(hd.encode(src.images[None].to(hd.device), src.cameras.to(hd.device, torch.float32)))
            v = cfg.cache_views
            t = torch.randint(0, max(1, int(cfg.cond_noise * hd.schedule.num_steps)), (v,), generator=gen)
            noise = torch.randn((v, *z.shape[1:]), generator=gen)
            x_t = hd.schedule.q_sample(z.expand(v, -1, -1, -1, -1), t.to(hd.device), noise.to(hd.device))
            cat_idx = hd.category_index([cat] * v, v)
            x0 = hd.denoise(x_t, t.to(hd.device), cat_idx)
            c = coarse_conditions(hd, x0, tgt.cameras, self.model_config.low_size)  # one camera per grid
            conds.append(c.rgb.cpu())
            alphas.append(c.alpha.cpu())
            if c.features is not None:
                feats.append(c.features.cpu())
            targets.append(tgt.images.cpu())
            bar.update(1)
        bar.close()
        pairs = {"rgb": torch.cat(conds), "alpha": torch.cat(alphas), "target": torch.cat(targets)}
        if feats:
            pairs["features"] = torch.cat(feats)
        # Residual spread -> unit: the diffusion then sees data of the spread its schedule assumes.
        up = self.model.upsampled(Condition(pairs["rgb"], pairs["alpha"], pairs.get("features")))
        resid = (pairs["target"] * 2 - 1) - up[:, :3]
        pairs["residual_scale"] = (1.0 / resid.std().clamp_min(1e-3)).reshape(())
        self.model.residual_scale.copy_(pairs["residual_scale"])
        self.pairs = pairs
        save_weights(path, pairs, "superres-pairs", self.config, {"objects": len(self.sequences)})

    def _condition(self, idx: Tensor) -> Condition:
        p = self.pairs
        feats = p["features"][idx].to(self.device) if "features" in p else None
        return Condition(p["rgb"][idx].to(self.device), p["alpha"][idx].to(self.device), feats)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step
        if self.pairs is None:
            self.build_pairs()
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr * warm
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        gen = step_generator(cfg.seed, step, 0)
        idx = torch.randint(0, len(self.pairs["rgb"]), (cfg.batch,), generator=gen)
        loss, stats = self.model.loss(self.pairs["target"][idx].to(self.device), self._condition(idx), gen,
                                      cfg.crop)
        loss.backward()
        if cfg.grad_clip > 0:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.unet.parameters(), cfg.grad_clip))
        self.opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (2 + step) / (11 + step))
            for e, p in zip(self.ema.parameters(), self.model.unet.parameters()):
                e.lerp_(p, 1 - decay)
        self.step += 1
        stats.update(loss=loss.item(), step=step, phase=0)
        return stats

    # ------------------------------------------------------------------ checkpoints
    def _info(self) -> dict[str, Any]:
        info = {"step": self.step, "holodiffusion": self.hd_path, "data": self.data_root,
                "categories": self.categories, "objects": len(self.sequences)}
        if self.init_from is not None:
            info["init_from"] = self.init_from
        return info

    def save(self) -> None:
        self.save_run("superres", self._info())

    def _load(self) -> None:
        self.load_run()
        if (self.out / PAIRS).is_file():
            self.build_pairs()

    # ------------------------------------------------------------------ pictures
    def write_pictures(self) -> None:
        from .plots import sample_sheet

        self.write_curve()
        sample_sheet(self.samples(), self.out / "samples.png", per_row=2,
                     title=f"step {self.step}: coarse render | super-resolved | real (top: training, bottom: held-out)")

    @torch.no_grad()
    def samples(self) -> Tensor:
        """(2n, 3, H, W, 3): n training pairs and n held-out views (val split), each as condition upsampled |
        super-resolved (EMA weights) | real."""
        cfg = self.cfg
        model = copy.deepcopy(self.model)
        model.unet.load_state_dict(self.ema.state_dict())
        model.eval()
        n = cfg.sample_views
        idx = torch.randperm(len(self.pairs["rgb"]), generator=torch.Generator().manual_seed(77))[:n]
        conds, reals = [self._condition(idx)], [self.pairs["target"][idx]]
        held = self.held_out_pairs(n)
        if held is not None:
            conds.append(held[0])
            reals.append(held[1])
        cond = Condition(torch.cat([c.rgb for c in conds]), torch.cat([c.alpha for c in conds]),
                         None if conds[0].features is None else torch.cat([c.features for c in conds]))
        sr = model.sample(cond, seeds=list(range(len(cond))), steps=cfg.sample_steps)
        up = (model.upsampled(cond)[:, :3] * 0.5 + 0.5).clamp(0, 1)
        real = torch.cat(reals).to(sr.device)
        rows = torch.stack([up, sr, real], 1)  # (N, 3, 3, H, W)
        return rows.permute(0, 1, 3, 4, 2).cpu()

    @torch.no_grad()
    def held_out_pairs(self, n: int) -> tuple[Condition, Tensor] | None:
        """Conditions and real images of n objects the models never trained on (the val split), if there are any."""
        cfg, hd = self.cfg, self.hd
        kw = dict(subset=cfg.subset, cache=False)
        try:
            src_ds = Co3dDataset(self.data_root, self.categories, split="val", image_size=self.info_image_size, **kw)
            tgt_ds = Co3dDataset(self.data_root, self.categories, split="val",
                                 image_size=self.model_config.high_size, **kw)
        except UserError:
            return None
        seqs = [s for s in src_ds.sequences if len(src_ds.frames(*s)) > cfg.n_source][:n]
        if not seqs:
            return None
        conds, reals = [], []
        for cat, seq in seqs:
            numbers = [f.frame_number for f in src_ds.frames(cat, seq)[:cfg.n_source + 1]]
            src = src_ds.load_views(cat, seq, numbers[:-1])
            tgt = tgt_ds.load_views(cat, seq, numbers[-1:])
            z = hd.normalize(hd.encode(src.images[None].to(hd.device), src.cameras.to(hd.device, torch.float32)))
            conds.append(coarse_conditions(hd, z, tgt.cameras, self.model_config.low_size))
            reals.append(tgt.images)
        feats = None if conds[0].features is None else torch.cat([c.features for c in conds])
        return Condition(torch.cat([c.rgb for c in conds]), torch.cat([c.alpha for c in conds]), feats), \
            torch.cat(reals)


def _hd_train_image_size(path: str) -> int | None:
    """The training image size of a HoloDiffusion run folder (from its checkpoint's config), if it is one."""
    p = Path(path)
    ckpt = p / "checkpoint.safetensors" if p.is_dir() else p.with_name("checkpoint.safetensors")
    if not ckpt.is_file():
        return None
    try:
        from .weights import read_metadata

        return int(read_metadata(ckpt)["config"]["train"]["image_size"])
    except (UserError, KeyError, TypeError, ValueError):
        return None


def train_superres(holodiffusion: str, data: str, config: str, out: str, resume: bool = False,
                   max_steps: int | None = None, device: str = "cpu", progress: bool = True,
                   init_from: str | None = None) -> SuperResTrainer:
    """The `holofusion train superres` command (also usable from Python)."""
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"--data {data!r} is not a folder")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    fresh = not resume or not (Path(out) / CHECKPOINT).is_file()
    cfg = resolve_config(config, builtins=SUPERRES_BUILTIN) if fresh else {}
    if fresh:
        hd = load_holodiffusion(holodiffusion)  # a clear error before anything is written
        missing = [c for c in hd.config.categories if not (root / c / "frame_annotations.jgz").is_file()]
        if missing:
            raise UserError(f"--data {data!r} has no category {', '.join(missing)}, which the HoloDiffusion model "
                            f"{holodiffusion!r} was trained on")
    if resume and init_from:
        raise UserError("--init-from starts a new run; --resume continues one: pass one of them")
    trainer = SuperResTrainer(holodiffusion, data, cfg, out, device, resume, progress, init_from)
    trainer.fit(max_steps)
    return trainer
