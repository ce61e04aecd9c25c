"""Procedural renderer speed: images per minute at 128 px, rendering alone (no files), per category and overall.

Each object is made from its seed and all its views are traced together (one vectorised sphere trace per object).
The baseline in the same run traces one view at a time (``chunk_views=1``), so the ratio shows what batching the
views buys. Object construction (``make_object``) is counted; the surface point cloud is timed separately because
the dataset writes one per sequence, not per image. `holofusion dataset synth` adds file writing (JPEG, PNGs,
annotations) on top: see benchmarks/bench_synth.py for the end-to-end figure.

    python benchmarks/bench_procedural.py [--objects 3] [--views 16] [--size 128] [--threads 1]
"""

import argparse
import time

import torch

from holofusion.data.procedural import CATEGORIES, make_object, render_views, sequence_cameras


def run(category: str, seeds: range, views: int, size: int, chunk_views: int) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds): CPU time is the steadier figure on a machine shared with other jobs."""
    t0, c0 = time.perf_counter(), time.process_time()
    for seed in seeds:
        obj = make_object(category, seed)
        cams = sequence_cameras(seed, views, (size, size), obj.bounding_radius)
        render_views(obj, cams, generator=torch.Generator().manual_seed(seed), chunk_views=chunk_views)
    return len(seeds) * views, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=3, help="objects (seeds) per category")
    p.add_argument("--views", type=int, default=16, help="views per object")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 = what each dataset worker process uses)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = range(args.objects)
    print(f"procedural render: {args.objects} objects x {args.views} views per category at {args.size} px, "
          f"{args.threads} torch thread(s)")
    totals = {"batched": [0, 0.0, 0.0], "per-view": [0, 0.0, 0.0]}

    def line(name: str, b, pv) -> str:
        return (f"  {name:10s} batched {60 * b[0] / b[1]:7.0f} images/min ({1000 * b[1] / b[0]:5.1f} ms/image wall, "
                f"{1000 * b[2] / b[0]:5.1f} CPU)   per-view baseline {60 * pv[0] / pv[1]:7.0f} images/min   "
                f"ratio {pv[1] / b[1]:.2f}x")

    for cat in CATEGORIES:
        b = run(cat, seeds, args.views, args.size, chunk_views=64)
        pv = run(cat, seeds, args.views, args.size, chunk_views=1)
        for key, r in (("batched", b), ("per-view", pv)):
            totals[key] = [x + y for x, y in zip(totals[key], r)]
        print(line(cat, b, pv))
    print(line("overall", totals["batched"], totals["per-view"]))
    t0 = time.perf_counter()
    for cat in CATEGORIES:
        make_object(cat, 0).sample_surface(4096, torch.Generator().manual_seed(0))
    print(f"  surface point cloud (4096 points): {1000 * (time.perf_counter() - t0) / len(CATEGORIES):.0f} ms per "
          f"object")
    print("  (rendering only; the synth command adds file writing, and runs one such process per core)")


if __name__ == "__main__":
    main()
