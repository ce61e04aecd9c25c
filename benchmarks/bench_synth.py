"""Dataset generation speed: images per minute at 128 px, files written, for `holofusion dataset synth`.

Target (issue 2): at least 1,000 images per minute at 128 px on a 2-core machine. The baseline in the same run is the
serial path (one process), so the ratio shows what the worker processes buy.

    python benchmarks/bench_synth.py [--sequences 4] [--views 32] [--size 128]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from holofusion.data.synth import synthesize


def run(workers: int, args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        synthesize("all", args.sequences, args.views, args.size, Path(tmp) / "ds", seed=args.seed, workers=workers,
                   progress=False)
        dt = time.perf_counter() - t0
    n = 4 * args.sequences * args.views
    return 60.0 * n / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=4, help="sequences per category")
    p.add_argument("--views", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    n = 4 * args.sequences * args.views
    print(f"dataset synth: 4 categories x {args.sequences} sequences x {args.views} views = {n} images at "
          f"{args.size} px, {cores} cores")
    serial = run(1, args)
    print(f"  serial (1 process, baseline): {serial:8.0f} images/min")
    parallel = run(min(cores, 8), args)
    print(f"  parallel ({min(cores, 8)} processes):        {parallel:8.0f} images/min   "
          f"ratio {parallel / serial:.2f}x   target >= 1000: {'met' if parallel >= 1000 else 'NOT met'}")


if __name__ == "__main__":
    main()
