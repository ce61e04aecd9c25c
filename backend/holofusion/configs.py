"""Built-in training configurations and the reader for user config files.

A configuration is ``{"model": {...HoloDiffusionConfig...}, "train": {...TrainConfig...}}``. A user file (JSON) may
set any subset; what it leaves out comes from ``"base"`` (a built-in name, default "cpu"). Unknown keys are errors.

- ``tiny``: seconds per step on a CPU, for tests (8^3 x 8 grid, 32 px images).
- ``cpu``: the shipped model's size: trains on a 2-core CPU over sessions (16^3 x 16 grid, 64 px images).
- ``paper``: HoloDiffusion's released size: 16^3 x 64 channels, a 64-wide 3D U-Net, 128 px renders (GPU).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["BUILTIN", "SUPERRES_BUILTIN", "resolve_config"]

_RENDER_FAST = {"n_coarse": 24, "n_fine": 12, "chunk_rays": 1024}

BUILTIN: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {
            "grid_size": 8, "box_half_size": 3.5,
            "encoder": {"channels": 8, "global_channels": 2, "cnn_width": 16, "cnn_layers": 3, "feature_dim": 16,
                        "refine_layers": 1},
            "decoder": {"n_features_in": 8, "hidden_dim": 32, "n_hidden_layers": 2, "n_harmonics_dir": 2,
                        "view_hidden_dim": 16},
            "unet": {"in_channels": 8, "grid_size": 8, "base_channels": 16, "channel_mults": [1, 2],
                     "res_blocks": 1, "attention_max_size": 4, "global_context": True},
            "render": {"n_coarse": 12, "n_fine": 6, "chunk_rays": 4096},
            "global_noise": "object", "offset_noise": 0.2,
        },
        "train": {"image_size": 32, "n_source": 3, "n_target": 2, "rays_per_target": 96, "batch_scenes": 2,
                  "latent_batch": 8, "ae_steps": 30, "latent_steps": 30, "bootstrap_steps": 10, "warmup_steps": 5,
                  "cache_subsets": 2, "log_every": 5, "checkpoint_every": 20, "sample_every": 0,
                  "sample_seeds": 4, "sample_views": 2, "sample_steps": 5},
    },
    "cpu": {
        "model": {
            "grid_size": 16, "box_half_size": 3.5,
            # 10 learned local channels and 6 per-object global channels (meant for object-wide colour, nets/encoder),
            # no raw-colour channels: with them the denoiser had to reproduce view-averaged colour in empty space,
            # which is texture of the source views rather than of the object, could not, and left it as mottled
            # noise. The global code was meant to carry the colour instead, but in every shipped autoencoder its tanh
            # saturated (a constant per channel): colour is carried by the local channels (README, design notes).
            "encoder": {"channels": 16, "global_channels": 6, "raw_color_channels": 0, "cnn_width": 32,
                        "cnn_layers": 4, "feature_dim": 32, "refine_layers": 1},
            "decoder": {"n_features_in": 16, "hidden_dim": 64, "n_hidden_layers": 2, "n_harmonics_dir": 2,
                        "view_hidden_dim": 16},
            # base 16: a latent step at batch 16 takes about 1 s on 2 cores (base 32: 3.4 s); attention at 4^3
            # gives the global path that decides object-wide colour.
            "unet": {"in_channels": 16, "grid_size": 16, "base_channels": 16, "channel_mults": [1, 2, 4],
                     "res_blocks": 1, "attention_max_size": 4, "global_context": True},
            "render": _RENDER_FAST,
            # One noise value per object for the global code (see HoloDiffusionConfig.global_noise): with noise
            # per voxel, samples kept half the data's spread of colours.
            "global_noise": "object",
            # A per-object offset in the local channels' noise (HoloDiffusionConfig.offset_noise): 1,200 steps of
            # it on the apple model took 100 held-out apples from coloured COV 34 % / 1-NNA 99 % / diversity 0.76
            # to 38 % / 96 % / 0.89.
            "offset_noise": 0.2,
        },
        "train": {"image_size": 64, "n_source": 8, "n_target": 3, "rays_per_target": 256, "batch_scenes": 4,
                  "latent_batch": 16, "ae_steps": 2000, "latent_steps": 30000, "bootstrap_steps": 2000,
                  # Noise on the autoencoder's grids teaches the decoder to render slightly-off grids (what the
                  # denoiser makes) cleanly, and pushes object-wide colour into the noise-robust global code.
                  "ae_latent_noise": 0.15, "ae_latent_l2": 0.01, "latent_lr": 3e-4,
                  "cache_subsets": 4, "log_every": 20, "checkpoint_every": 250, "sample_every": 1000},
    },
    "paper": {
        "model": {
            "grid_size": 16, "box_half_size": 4.0,
            "encoder": {"channels": 64, "cnn_width": 64, "cnn_layers": 5, "feature_dim": 64, "refine_layers": 2},
            "decoder": {"n_features_in": 64, "hidden_dim": 128, "n_hidden_layers": 3, "n_harmonics_dir": 4,
                        "view_hidden_dim": 32, "n_features_out": 16},
            "unet": {"in_channels": 64, "grid_size": 16, "base_channels": 64, "channel_mults": [1, 2, 4],
                     "res_blocks": 2, "attention_max_size": 8},
            "render": {"n_coarse": 64, "n_fine": 32, "chunk_rays": 8192},
            "global_noise": "object", "offset_noise": 0.2,
        },
        "train": {"image_size": 128, "n_source": 23, "n_target": 10, "rays_per_target": 1024, "batch_scenes": 8,
                  "latent_batch": 64, "ae_steps": 20000, "latent_steps": 200000, "bootstrap_steps": 20000,
                  "cache_subsets": 8, "log_every": 50, "checkpoint_every": 1000, "sample_every": 5000},
    },
}


# The super-resolution stage (``holofusion train superres``): {"model": SuperResConfig, "train": SuperResTrainConfig}.
# ``cpu`` upsamples 32 px renders of the cpu HoloDiffusion model to 64 px, 2x; ``cpu128`` to 128 px, 4x, trained on
# 64 px windows; ``paper`` is the paper's 64 -> 256 px.
SUPERRES_BUILTIN: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"low_size": 8, "high_size": 16, "block_channels": [16, 32], "layers_per_block": 1},
        "train": {"steps": 300, "batch": 4, "cache_views": 2, "n_source": 3, "warmup_steps": 5, "log_every": 5,
                  "checkpoint_every": 20, "sample_every": 0, "sample_views": 3, "sample_steps": 4},
    },
    "cpu": {
        "model": {"low_size": 32, "high_size": 64, "block_channels": [32, 64, 64], "layers_per_block": 1},
        "train": {"steps": 6000, "batch": 8, "cache_views": 8, "n_source": 8, "log_every": 20,
                  "checkpoint_every": 250, "sample_every": 1000},
    },
    # 32 -> 128 px (4x, the paper's factor) at the cpu model's cost per step: trained on 64 px windows of the
    # 128 px views (the U-Net is convolutional); one more level so that its field of view spans a window.
    "cpu128": {
        "model": {"low_size": 32, "high_size": 128, "block_channels": [32, 64, 64, 96], "layers_per_block": 1},
        "train": {"steps": 6000, "batch": 8, "crop": 64, "cache_views": 8, "n_source": 8, "log_every": 20,
                  "checkpoint_every": 250, "sample_every": 1000},
    },
    "paper": {
        "model": {"low_size": 64, "high_size": 256, "block_channels": [64, 128, 256, 256], "layers_per_block": 2,
                  "attention": True, "norm_groups": 32},
        "train": {"steps": 100000, "batch": 16, "cache_views": 16, "n_source": 16, "log_every": 50,
                  "checkpoint_every": 1000, "sample_every": 5000},
    },
}


def _merge(base: dict, override: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{where}.{k}")
        else:
            out[k] = v
    return out


def resolve_config(name_or_file: str, categories: list[str] | None = None,
                   builtins: dict[str, dict[str, Any]] = BUILTIN) -> dict[str, Any]:
    """A built-in name or a JSON file -> the full ``{"model", "train"}`` dict (validated by the caller's dataclasses).

    ``categories`` fills a HoloDiffusion model's category list and class count (conditioning on when more than
    one). ``builtins``: the named configs of the stage (``BUILTIN`` or ``SUPERRES_BUILTIN``).
    """
    if name_or_file in builtins:
        cfg = copy.deepcopy(builtins[name_or_file])
    else:
        path = Path(name_or_file)
        if not path.is_file():
            raise UserError(f"--config {name_or_file!r} is neither a built-in config ({', '.join(builtins)}) nor a "
                            "file")
        try:
            user = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{name_or_file}: not valid JSON ({e})") from None
        if not isinstance(user, dict):
            raise UserError(f"{name_or_file}: expected a JSON object with 'model' and/or 'train'")
        unknown = sorted(set(user) - {"base", "model", "train"})
        if unknown:
            raise UserError(f"{name_or_file}: unknown key(s) {', '.join(unknown)}; accepted: base, model, train")
        base = user.get("base", "cpu")
        if base not in builtins:
            raise UserError(f"{name_or_file}: base {base!r} is not a built-in config ({', '.join(builtins)})")
        cfg = _merge(builtins[base], {k: v for k, v in user.items() if k != "base"}, "config")
    if categories is not None:
        cfg["model"]["categories"] = list(categories)
        cfg["model"]["unet"]["num_classes"] = len(categories) if len(categories) > 1 else 0
    return cfg
