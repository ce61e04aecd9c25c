"""HoloFusion pipeline: seconds and peak memory of each stage for each preset, and each preset's time against the
draft preset measured in the same run.

    python benchmarks/bench_pipeline.py --model models/apple [--seeds 2] [--presets draft,standard,high]
                                        [--device cpu|cuda] [--threads 2]

Per stage (coarse, superres, distill, asset = mesh + UV atlas + bake): wall seconds from the pipeline's own progress
callback, and peak memory while the stage ran: on CUDA ``torch.cuda.max_memory_allocated`` (reset per stage), on the
CPU the process's resident set sampled every 5 ms by a background thread (so it includes the interpreter and the
loaded models: read the rise above the "before" line).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

from holofusion.mesh.asset import AssetConfig, make_asset
from holofusion.pipeline import PRESETS, HoloFusionPipeline


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory (MiB) since the last ``reset``: CUDA allocations, or the CPU process's resident set."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self._stop = cuda, 0.0, False
        if not cuda:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.005)

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.peak = rss_mb() if not self.cuda else 0.0

    def read(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else max(self.peak, rss_mb())

    def close(self) -> None:
        self._stop = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--presets", default="draft,standard,high")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    pipe = HoloFusionPipeline.from_pretrained(args.model, args.device)
    mem = PeakMemory(cuda)
    print(f"model {args.model} on {args.device} ({args.threads} threads); before: {rss_mb():.0f} MiB resident")
    results: dict[str, dict[str, list[float]]] = {}
    for preset in args.presets.split(","):
        if PRESETS[preset].superres and pipe.sr is None:
            print(f"{preset}: skipped (the model has no super-resolution stage)")
            continue
        rows: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            marks: dict[str, list[float]] = {}
            peaks: dict[str, float] = {}
            current = [None]

            def callback(stage, step, total, preview):
                if stage != current[0]:
                    if current[0] is not None:
                        peaks[current[0]] = mem.read()
                    mem.reset()
                    current[0] = stage
                    marks[stage] = [time.perf_counter(), 0.0]
                marks[stage][1] = time.perf_counter()
                return True

            mem.reset()
            t0 = time.perf_counter()
            out = pipe(seed, None, preset, callback)
            peaks[current[0]] = mem.read()
            starts = [t0] + [marks[s][1] for s in marks][:-1]
            for (stage, (_, end)), start in zip(marks.items(), starts):
                rows.setdefault(f"{stage}_s", []).append(end - start)
                rows.setdefault(f"{stage}_MiB", []).append(peaks[stage])
            mem.reset()
            t1 = time.perf_counter()
            grid, field = out.field()
            make_asset(grid, field, AssetConfig())
            rows.setdefault("asset_s", []).append(time.perf_counter() - t1)
            rows.setdefault("asset_MiB", []).append(mem.read())
            rows.setdefault("total_s", []).append(time.perf_counter() - t0)
        results[preset] = rows
        cells = "  ".join(f"{k} {statistics.median(v):.2f}" for k, v in rows.items())
        print(f"{preset:<9} {cells}")
    if "draft" in results:
        base = statistics.median(results["draft"]["total_s"])
        for preset, rows in results.items():
            print(f"{preset:<9} total {statistics.median(rows['total_s']) / base:.1f}x the draft preset")
    mem.close()


if __name__ == "__main__":
    main()
