"""`holofusion bench`: seconds and peak memory of each stage and of the whole object, for each preset, on the shipped
models and on the paper-scale configuration with random weights, on this machine's device.

Every object goes the way `holofusion generate` makes it (``generate.generate``: pipeline, mesh chain, .glb written
to disk) and is timed from the request to the file on disk. Stages are cut where the pipeline's progress callback
moves to the next one (coarse, superres, distill, asset = mesh + UV atlas + bake + GLB). Peak memory per stage: on
the CPU the process's resident set sampled every 5 ms by a background thread (it includes the interpreter and the
loaded models, which is what a user's machine must hold), on CUDA ``torch.cuda.max_memory_allocated``. Each row is
the median over ``--repeats`` seeds (0, 1, ...), and every preset's time is also given as a ratio to the ``draft``
preset measured in the same run.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .generate import GenerateJob, generate
from .pipeline import MODELS_DIR, PRESETS, HoloFusionPipeline

__all__ = ["BenchRow", "PeakMemory", "bench_model", "paper_scale_models", "format_table", "run_bench"]

STAGES = ("coarse", "superres", "distill", "asset")
TARGETS_S = {"draft": 10.0, "standard": 90.0}
"""Seconds per object, request to .glb, the shipped models must meet on a 2-core CPU (the README's promise)."""
TARGET_MIB = 4096.0


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory (MiB) since the last ``reset``: CUDA allocations, or the CPU process's resident set."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self._stop = cuda, 0.0, False
        self._thread = None
        if not cuda:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.005)

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = rss_mib()

    def read(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else max(self.peak, rss_mib())

    def close(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join()


@dataclass
class BenchRow:
    """One model and preset: per object, seconds and peak MiB of each stage and of the whole (request to .glb)."""

    model: str
    preset: str
    seconds: dict[str, list[float]] = field(default_factory=dict)
    peak_mib: dict[str, list[float]] = field(default_factory=dict)
    total_s: list[float] = field(default_factory=list)
    error: str | None = None

    def median(self, what: dict[str, list[float]], stage: str) -> float | None:
        return statistics.median(what[stage]) if what.get(stage) else None

    @property
    def total(self) -> float | None:
        return statistics.median(self.total_s) if self.total_s else None

    @property
    def peak(self) -> float | None:
        peaks = [max(v) for v in self.peak_mib.values() if v]
        return max(peaks) if peaks else None


class _StageClock:
    """generate()'s observer: cuts stages at each change of stage name, reads peak memory at every cut."""

    def __init__(self, row: BenchRow, memory: PeakMemory):
        self.row, self.memory = row, memory
        self.stage: str | None = None
        self.start = 0.0

    def begin(self) -> None:
        """The request: the first stage's time and memory count from here."""
        self.memory.reset()
        self.stage, self.start = None, time.perf_counter()

    def __call__(self, stage: str, step: int, total: int) -> None:
        if stage != self.stage:
            if self.stage is not None:
                self.cut()
                self.memory.reset()
            self.stage = stage

    def cut(self) -> None:
        now = time.perf_counter()
        if self.stage is not None:
            self.row.seconds.setdefault(self.stage, []).append(now - self.start)
            self.row.peak_mib.setdefault(self.stage, []).append(self.memory.read())
        self.start = now


def bench_model(model: str, preset: str, repeats: int, device: str, memory: PeakMemory, label: str | None = None,
                job_options: dict | None = None) -> BenchRow:
    """``repeats`` objects (seeds 0, 1, ...) of ``model`` at ``preset``, each timed from the request to its .glb.
    ``job_options``: other ``GenerateJob`` fields (texture size, faces, ...; default: `holofusion generate`'s)."""
    row = BenchRow(label or Path(model).name, preset)
    clock = _StageClock(row, memory)
    with tempfile.TemporaryDirectory() as tmp:
        # One generate call per object, the pipeline loaded once before (a backend keeps it loaded).
        pipe = HoloFusionPipeline.from_pretrained(model, device)
        for seed in range(repeats):
            job = GenerateJob(model=model, seed=seed, preset=preset, out=str(Path(tmp) / f"{seed}.glb"),
                              device=device, **(job_options or {}))
            clock.begin()
            try:
                [rec] = generate(job, progress=False, observer=clock, pipeline=pipe)
            except UserError as e:
                # The stages before the failing one keep their times (random weights may leave nothing to mesh).
                row.error = f"{clock.stage or 'request'}: {str(e).split(' (')[0]}"
                clock.stage = None
                break
            clock.cut()
            clock.stage = None
            row.total_s.append(rec["glb_s"])
    return row


def paper_scale_models(folder: Path, device: str = "cpu") -> Path:
    """HoloDiffusion's and HoloFusion's published sizes (the ``paper`` configs: 16^3 x 64 grids, a 64-wide 3D U-Net,
    64 -> 256 px super-resolution) with random weights, written as a model folder: what a GPU user trains, timed
    before anyone has trained it."""
    from .configs import SUPERRES_BUILTIN, resolve_config
    from .holodiffusion import HoloDiffusion, HoloDiffusionConfig
    from .superres import SuperRes, SuperResConfig
    from .weights import save_weights

    folder.mkdir(parents=True, exist_ok=True)
    cfg = resolve_config("paper", ["apple"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hd = HoloDiffusion(HoloDiffusionConfig.from_dict(cfg["model"]))
    save_weights(folder / "holodiffusion.safetensors", hd.state_dict(), "holodiffusion", hd.config.to_dict(),
                 {"random_weights": True, "image_size": cfg["train"]["image_size"]})
    sr_cfg = SuperResConfig.from_dict({**SUPERRES_BUILTIN["paper"]["model"],
                                       "cond_features": hd.config.decoder.n_features_out})
    sr = SuperRes(sr_cfg)
    save_weights(folder / "superres.safetensors", sr.state_dict(), "superres", sr_cfg.to_dict(),
                 {"random_weights": True})
    return folder


def format_table(rows: list[BenchRow], device: str) -> str:
    """One table: a row per model and preset; per stage median seconds and peak MiB; the whole object; the ratio to
    the same model's draft preset; the target where there is one."""
    head = ["model", "preset"] + [f"{s} s / MiB" for s in STAGES] + ["total s", "peak MiB", "x draft", "target"]
    body = []
    drafts = {r.model: r.total for r in rows if r.preset == "draft" and r.total}
    for r in rows:
        cells = [r.model, r.preset]
        for s in STAGES:
            t, m = r.median(r.seconds, s), r.median(r.peak_mib, s)
            cells.append("-" if t is None else f"{t:.2f} / {m:.0f}")
        if r.error:
            cells += [f"failed: {r.error}", "", "", ""]
        else:
            base = drafts.get(r.model)
            target = TARGETS_S.get(r.preset) if not r.model.startswith("paper") else None
            verdict = "" if target is None else (f"<= {target:.0f} s, <= {TARGET_MIB / 1024:.0f} GB: " +
                                                 ("met" if r.total <= target and r.peak <= TARGET_MIB else "NOT met"))
            cells += [f"{r.total:.2f}", f"{r.peak:.0f}", f"{r.total / base:.1f}" if base else "-", verdict]
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    n = max((len(r.total_s) for r in rows), default=0)
    return "\n".join([f"holofusion bench on {device}, {torch.get_num_threads()} threads: medians of up to {n} "
                      "objects (seeds 0, 1, ...), request to .glb on disk", line(head),
                      line(["-" * w for w in widths])] + [line(c) for c in body])


def run_bench(models: list[str] | None, presets: list[str], repeats: int, device: str, paper: bool,
              paper_presets: list[str], paper_repeats: int, progress: bool = True,
              job_options: dict | None = None) -> list[BenchRow]:
    """The `holofusion bench` command: every model x preset, then the paper-scale configuration."""
    from tqdm import tqdm

    for p in presets + (paper_presets if paper else []):
        if p not in PRESETS:
            raise UserError(f"--presets: {p!r} is unknown; choose from {', '.join(PRESETS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if models is None:
        models = sorted(d.name for d in MODELS_DIR.iterdir() if (d / "holodiffusion.safetensors").is_file())
    memory = PeakMemory(device.startswith("cuda"))
    rows: list[BenchRow] = []
    work = [(m, p, repeats, None) for m in models for p in presets]
    with tempfile.TemporaryDirectory() as tmp:
        if paper:
            folder = paper_scale_models(Path(tmp) / "paper", device)
            work += [(str(folder), p, paper_repeats, "paper (random)") for p in paper_presets]
        try:
            bar = tqdm(work, desc="bench", unit="row", disable=not progress)
            for model, preset, n, label in bar:
                rows.append(bench_model(model, preset, n, device, memory, label, job_options))
                if progress:  # each row as it ends: a long run stopped early keeps what it measured
                    bar.write(format_table(rows[-1:], device).splitlines()[-1])
        finally:
            memory.close()
    return rows
