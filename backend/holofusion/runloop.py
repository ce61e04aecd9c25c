"""The loop every trainer shares: steps under a progress bar (loss, phase, seconds per step), checkpoints, a loss
curve and pictures on a schedule, and a final checkpoint with pictures, so a run stopped at any checkpoint resumes
exactly and always leaves its latest curve and sheets on disk."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm import tqdm

from .weights import atomic_torch_save, load_torch_state, load_weights, save_weights

__all__ = ["RunLoop", "CHECKPOINT", "TRAIN_STATE", "MODEL"]

CHECKPOINT = "checkpoint.safetensors"
TRAIN_STATE = "train_state.pt"
MODEL = "model.safetensors"


class RunLoop(ABC):
    """Mixin for trainers. A subclass sets ``cfg`` (with ``total_steps``, ``log_every``, ``checkpoint_every`` and
    ``sample_every``), ``step``, ``history``, ``progress``, ``rank``, ``out`` and ``phase_names``, and implements
    ``train_step() -> stats``, ``save()`` and ``write_pictures()``.

    For the checkpoint helpers: ``model`` (whose ``unet`` is the denoiser), ``ema`` (an EMA copy of it), ``opt`` and
    ``config``. A run folder holds ``checkpoint.safetensors`` (model + EMA, config in the metadata),
    ``train_state.pt`` (optimizer, step, loss history; read back with ``weights_only=True``) and
    ``model.safetensors`` (the EMA weights in the model's place: what inference loads)."""

    cfg: Any
    step: int
    history: list[dict[str, float]]
    progress: bool
    rank: int
    phase_names: tuple[str, ...] = ("train",)

    @abstractmethod
    def train_step(self) -> dict[str, float]:
        """Provided by each trainer."""

    @abstractmethod
    def save(self) -> None:
        """Provided by each trainer."""

    @abstractmethod
    def write_pictures(self) -> None:
        """Provided by each trainer."""

    def fit(self, max_steps: int | None = None) -> None:
        """Trains up to ``max_steps`` (global step count; None: the config's total)."""
        cfg = self.cfg
        end = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        t_last = time.perf_counter()
        while self.step < end:
            stats = self.train_step()
            self.history.append(stats)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == end:
                now = time.perf_counter()
                bar.set_postfix(phase=self.phase_names[int(stats.get("phase", 0))], loss=f"{stats['loss']:.4f}",
                                s_per_step=f"{(now - t_last) / cfg.log_every:.2f}")
                t_last = now
            if self.step % cfg.checkpoint_every == 0 or self.step == end:
                self.save()
                if (cfg.sample_every and self.step % cfg.sample_every == 0) or self.step == end:
                    self.write_pictures()
                else:
                    self.write_curve()
        bar.close()

    def inference_state(self) -> dict[str, Tensor]:
        """The model's weights with the EMA denoiser in place of the raw one (what sampling uses)."""
        state = self.model.state_dict()
        for k, v in self.ema.state_dict().items():
            state[f"unet.{k}"] = v
        return state

    def save_run(self, kind: str, info: dict[str, Any]) -> None:
        """Writes the three files of a checkpoint (each atomically)."""
        out = Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        state = dict(self.model.state_dict())
        state.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        save_weights(out / CHECKPOINT, state, f"{kind}-checkpoint", self.config, info)
        atomic_torch_save({"optimizer": self.opt.state_dict(), "step": self.step,
                           "history": [[float(v) for v in h.values()] for h in self.history],
                           "history_keys": [list(h.keys()) for h in self.history]}, out / TRAIN_STATE)
        save_weights(out / MODEL, self.inference_state(), kind, self.config["model"], info)

    def load_run(self) -> None:
        """Restores model, EMA, optimizer, step and history from the run folder's checkpoint."""
        out = Path(self.out)
        state, _ = load_weights(out / CHECKPOINT, self.device)
        self.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("ema.")})
        self.ema.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
        ts = load_torch_state(out / TRAIN_STATE)
        self.opt.load_state_dict(ts["optimizer"])
        self.step = int(ts["step"])
        self.history = [dict(zip(k, v)) for k, v in zip(ts["history_keys"], ts["history"])]

    def write_curve(self) -> None:
        if self.rank == 0:
            from .plots import loss_curve

            loss_curve(self.history, self.out / "loss.png", phase_names=self.phase_names)
