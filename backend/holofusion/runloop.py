"""The loop every trainer shares: steps under a progress bar (loss, phase, seconds per step), checkpoints, a loss
curve and pictures on a schedule, and a final checkpoint with pictures, so a run stopped at any checkpoint resumes
exactly and always leaves its latest curve and sheets on disk."""

from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

__all__ = ["RunLoop"]


class RunLoop:
    """Mixin for trainers. A subclass sets ``cfg`` (with ``total_steps``, ``log_every``, ``checkpoint_every`` and
    ``sample_every``), ``step``, ``history``, ``progress``, ``rank``, ``out`` and ``phase_names``, and implements
    ``train_step() -> stats``, ``save()`` and ``write_pictures()``."""

    cfg: Any
    step: int
    history: list[dict[str, float]]
    progress: bool
    rank: int
    phase_names: tuple[str, ...] = ("train",)

    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def save(self) -> None:
        raise NotImplementedError

    def write_pictures(self) -> None:
        raise NotImplementedError

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

    def write_curve(self) -> None:
        if self.rank == 0:
            from .plots import loss_curve

            loss_curve(self.history, self.out / "loss.png", phase_names=self.phase_names)
