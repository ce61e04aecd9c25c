"""Pictures of training: loss curves (matplotlib, headless) and sample sheets (PIL)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["loss_curve", "sample_sheet"]

_SKIP = {"step", "phase", "double", "grad_norm"}


def _atomic_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def loss_curve(history: Sequence[dict[str, float]], path: str | os.PathLike,
               phase_names: Sequence[str] = ()) -> None:
    """One panel per loss term over steps (log scale, smoothed), phases shaded."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in history[-1] if k not in _SKIP]
    keys += sorted({k for h in history for k in h} - set(keys) - _SKIP)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    steps = np.array([h["step"] for h in history])
    phases = np.array([h.get("phase", 0) for h in history])
    for ax, key in zip(axes[0], keys):
        have = np.array([key in h for h in history])
        xs = steps[have]
        ys = np.array([h[key] for h in history if key in h], dtype=float)
        ax.plot(xs, ys, color="0.75", lw=0.6)
        if len(ys) >= 20:
            k = max(5, len(ys) // 50)
            smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
            ax.plot(xs[k - 1:], smooth, color="C0", lw=1.4)
        for p in np.unique(phases):
            sel = steps[phases == p]
            ax.axvspan(sel.min(), sel.max(), color=f"C{int(p) + 1}", alpha=0.08,
                       label=phase_names[int(p)] if int(p) < len(phase_names) else None)
        if (ys > 0).all():
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.partial.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def sample_sheet(rgb: torch.Tensor, path: str | os.PathLike, title: str = "", per_row: int = 4) -> None:
    """Sheet of N objects x V views: rgb (N, V, H, W, 3) in [0, 1]; each object a strip of its V views."""
    n, v, h, w, _ = rgb.shape
    img = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    cols = min(per_row, n)
    rows = (n + cols - 1) // cols
    pad, top = 4, 16 if title else 0
    sheet = Image.new("RGB", (cols * (v * w + pad) + pad, top + rows * (h + pad) + pad), "white")
    for i in range(n):
        r, c = divmod(i, cols)
        strip = np.concatenate(list(img[i]), axis=1)
        sheet.paste(Image.fromarray(strip), (pad + c * (v * w + pad), top + pad + r * (h + pad)))
    if title:
        ImageDraw.Draw(sheet).text((pad, 2), title, fill=(0, 0, 0))
    _atomic_png(sheet, Path(path))
