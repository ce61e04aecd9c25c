"""The ``holofusion`` command.

Each subcommand imports its stage lazily so that ``holofusion --help`` stays instant. Errors a user can fix
(``UserError``) print one line and exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage stays one ``--help`` away)."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number; got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1; got {value}")
        return value

    return parse


def _add_dataset(sub) -> None:
    p = sub.add_parser("dataset", help="make and inspect CO3Dv2-format datasets",
                       description="Make and inspect datasets in the CO3Dv2 on-disk format.")
    dsub = p.add_subparsers(dest="dataset_command", metavar="{synth,preview}", required=True,
                            parser_class=_Parser)
    s = dsub.add_parser("synth", help="write a procedural multi-view dataset in CO3Dv2 format",
                        description="Render procedural objects (SDFs with albedo) from many cameras and write a "
                                    "complete CO3Dv2-format dataset: images, masks, depth, cameras, point clouds, "
                                    "set lists. Deterministic for a given seed.")
    s.add_argument("--category", required=True,
                   help="category or comma-separated categories: apple, donut, hydrant, teddybear, or 'all'")
    s.add_argument("--sequences", type=_positive_int("--sequences"), required=True,
                   help="objects (sequences) per category")
    s.add_argument("--views", type=_positive_int("--views"), required=True, help="images per sequence")
    s.add_argument("--size", type=_positive_int("--size"), default=128, help="image size in pixels (square)")
    s.add_argument("--out", required=True, help="dataset root to create (must not exist, or be empty)")
    s.add_argument("--seed", type=int, default=0, help="base seed; sequence i of a category uses seed + i")
    s.add_argument("--workers", type=int, default=0,
                   help="worker processes (default: one per CPU core, at most 8)")
    s.set_defaults(func=_cmd_dataset_synth)

    v = dsub.add_parser("preview", help="contact sheet of views per category",
                        description="Draw a contact sheet: for each category in a CO3Dv2-format dataset, a row of "
                                    "views from several sequences.")
    v.add_argument("root", help="dataset root (CO3Dv2 layout)")
    v.add_argument("--out", required=True, help="PNG file to write")
    v.add_argument("--per-category", type=_positive_int("--per-category"), default=8,
                   help="images per category row")
    v.add_argument("--size", type=_positive_int("--size"), default=128, help="tile size in pixels")
    v.set_defaults(func=_cmd_dataset_preview)


def _cmd_dataset_synth(args) -> int:
    from .data.synth import synthesize

    synthesize(categories=args.category, sequences=args.sequences, views=args.views, size=args.size,
               out=args.out, seed=args.seed, workers=args.workers)
    return 0


def _cmd_dataset_preview(args) -> int:
    from .data.preview import contact_sheet

    path = contact_sheet(args.root, args.out, per_category=args.per_category, tile=args.size)
    print(f"wrote {path}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train models", description="Train HoloFusion's models.")
    tsub = p.add_subparsers(dest="train_command", metavar="{holodiffusion}", required=True, parser_class=_Parser)
    h = tsub.add_parser("holodiffusion", help="train the 3D diffusion model from posed images",
                        description="Train HoloDiffusion on CO3Dv2-format data: an autoencoder warm-up, latent "
                                    "diffusion on cached encoder grids, then the paper's bootstrapped photometric "
                                    "fine-tune. Checkpoints, a loss curve (loss.png) and sample sheets "
                                    "(samples.png) are written to --out; --resume continues exactly.")
    h.add_argument("--data", required=True, help="CO3Dv2-format dataset root")
    h.add_argument("--categories", required=True, help="comma-separated categories, e.g. apple,donut")
    h.add_argument("--config", default="cpu", help="built-in config (tiny, cpu, paper) or a JSON file "
                                                   "(default: cpu)")
    h.add_argument("--out", required=True, help="run folder for checkpoints, curves and sample sheets")
    h.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    h.add_argument("--max-steps", type=_positive_int("--max-steps"), default=None,
                   help="stop at this global step (the run can be resumed later)")
    h.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    h.set_defaults(func=_cmd_train_holodiffusion)


def _cmd_train_holodiffusion(args) -> int:
    from .train import train_holodiffusion

    trainer = train_holodiffusion(args.data, args.categories, args.config, args.out, args.resume, args.max_steps,
                                  args.device)
    if trainer.rank == 0:
        print(f"step {trainer.step} of {trainer.cfg.total_steps}; run folder {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="holofusion",
                     description="HoloFusion generative 3D: datasets, training, sampling and the Blender backend.")
    parser.add_argument("--version", action="version", version=f"holofusion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    _add_dataset(sub)
    _add_train(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"holofusion: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("holofusion: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
