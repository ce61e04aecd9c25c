"""The speed and memory table of the issue's targets: `holofusion bench` (same options), here for symmetry with the
other benchmarks in this folder.

    python benchmarks/run.py [--models apple,...] [--presets draft,standard] [--repeats 5] [--device cpu|cuda]
"""

import sys

from holofusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
