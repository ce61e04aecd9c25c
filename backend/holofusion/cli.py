"""The ``holofusion`` command.

Each subcommand imports its stage lazily so that ``holofusion --help`` stays instant. Errors a user can fix
(``UserError``) print one line and exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import DEFAULT_MODEL, __version__
from .errors import UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage stays one ``--help`` away)."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _names(text: str) -> list[str]:
    """A comma-separated option's names (presets, categories, models), spaces and empty entries dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


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
    tsub = p.add_subparsers(dest="train_command", metavar="{holodiffusion,superres}", required=True,
                            parser_class=_Parser)
    h = tsub.add_parser("holodiffusion", help="train the 3D diffusion model from posed images",
                        description="Train HoloDiffusion on CO3Dv2-format data: an autoencoder warm-up, latent "
                                    "diffusion on cached encoder grids, then the paper's bootstrapped photometric "
                                    "fine-tune. Checkpoints, a loss curve (loss.png) and sample sheets "
                                    "(samples.png) are written to --out; --resume continues exactly.")
    h.add_argument("--data", required=True, help="CO3Dv2-format dataset root")
    h.add_argument("--categories", required=True, help="comma-separated categories, e.g. apple,donut")
    h.add_argument("--config", default=None, help="built-in config (tiny, cpu, paper) or a JSON file (default: cpu); "
                                                  "with --resume, only its schedule (ae_steps, latent_steps, "
                                                  "bootstrap_steps, latent_cooldown_steps, log/checkpoint/sample "
                                                  "cadence) is taken, to train a phase the run has not finished "
                                                  "longer or shorter, or to end it with a learning-rate cool-down")
    h.add_argument("--out", required=True, help="run folder for checkpoints, curves and sample sheets")
    h.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    h.add_argument("--max-steps", type=_positive_int("--max-steps"), default=None,
                   help="stop at this global step (the run can be resumed later)")
    h.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    h.add_argument("--init-from", default=None, metavar="RUN_OR_MODEL",
                   help="a run folder: start from its trained autoencoder and latent cache (skips the autoencoder "
                        "phase; encoder, decoder and grid settings must match); or a HoloDiffusion model file "
                        "(e.g. models/apple/holodiffusion.safetensors): continue training all its weights from its "
                        "step, with a fresh optimizer (in the latent phase, or first in the autoencoder phase if "
                        "the config's ae_steps reach past that step)")
    h.set_defaults(func=_cmd_train_holodiffusion)
    r = tsub.add_parser("superres", help="train the 2D super-resolution model on a trained HoloDiffusion model",
                        description="Train HoloFusion's super-resolution diffusion model: it learns to turn "
                                    "low-resolution renders of the HoloDiffusion model's own denoised grids of "
                                    "training objects into the real high-resolution images. Training pairs are "
                                    "rendered once and cached in --out; checkpoints, a loss curve (loss.png) and "
                                    "sample sheets (samples.png: coarse | super-resolved | real) are written there; "
                                    "--resume continues exactly.")
    r.add_argument("--holodiffusion", required=True, metavar="RUN",
                   help="trained HoloDiffusion run folder or model file whose renders it learns to repair")
    r.add_argument("--data", required=True, help="CO3Dv2-format dataset root (the categories of that model)")
    r.add_argument("--config", default="cpu", help="built-in config (tiny, cpu, paper) or a JSON file "
                                                   "(default: cpu)")
    r.add_argument("--out", required=True, help="run folder for checkpoints, curves and sample sheets")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--max-steps", type=_positive_int("--max-steps"), default=None,
                   help="stop at this step (the run can be resumed later)")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    r.add_argument("--init-from", default=None, metavar="RUN_OR_MODEL",
                   help="a super-resolution weights file or run folder: start from its weights and step count "
                        "with a fresh optimizer (model settings must match; set train.steps beyond its step)")
    r.set_defaults(func=_cmd_train_superres)


def _cmd_train_holodiffusion(args) -> int:
    from .train import train_holodiffusion

    trainer = train_holodiffusion(args.data, args.categories, args.config, args.out, args.resume, args.max_steps,
                                  args.device, init_from=args.init_from)
    if trainer.rank == 0:
        print(f"step {trainer.step} of {trainer.cfg.total_steps}; run folder {args.out}")
    return 0


def _cmd_train_superres(args) -> int:
    from .train_superres import train_superres

    trainer = train_superres(args.holodiffusion, args.data, args.config, args.out, args.resume, args.max_steps,
                             args.device, init_from=args.init_from)
    print(f"step {trainer.step} of {trainer.cfg.total_steps}; run folder {args.out}")
    return 0


_SAMPLERS = ("dpm++", "ddim", "ancestral")


def _add_autoguidance(p) -> None:
    p.add_argument("--autoguidance", type=float, default=None, metavar="W",
                   help="weight of the model folder's guide.safetensors, a weaker denoiser the samples are pushed "
                        "away from (default: the guide's own weight, what the presets use: `holofusion models` "
                        "lists it; 1: none)")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample coarse grids and turntables from a trained HoloDiffusion model",
                       description="Sample objects from a trained HoloDiffusion model. For each seed writes "
                                   "<category>_<seed>.safetensors (the normalised latent grid and the denormalised "
                                   "feature grid, with the model path, seed, steps, sampler, category and box in its "
                                   "metadata) and <category>_<seed>.png (a turntable strip). The same seed gives "
                                   "the same grid, bit for bit, whatever --count is.")
    p.add_argument("--model", required=True, help="run folder (its model.safetensors), a .safetensors model file, a model folder or a "
                        "shipped model's name")
    p.add_argument("--category", default=None,
                   help="category to sample (default: the model's only category; required if it has several)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first object (default: 0)")
    p.add_argument("--count", type=_positive_int("--count"), default=1,
                   help="objects to sample, seeds --seed, --seed+1, ... (default: 1)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=25, help="sampler steps (default: 25)")
    p.add_argument("--sampler", choices=_SAMPLERS, default="dpm++", help="sampler (default: dpm++)")
    _add_autoguidance(p)
    p.add_argument("--views", type=_positive_int("--views"), default=8, help="turntable views (default: 8)")
    p.add_argument("--size", type=_positive_int("--size"), default=128, help="turntable view size in pixels "
                                                                             "(default: 128)")
    p.add_argument("--out", required=True, help="folder to write into (created if missing)")
    p.add_argument("--sheet", action="store_true",
                   help="also write <category>_sheet.png: every seed's turntable in one picture, four to a row")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(args) -> int:
    from .evaluate import write_samples

    paths = write_samples(args.model, args.out, args.category, args.seed, args.count, args.steps, args.sampler,
                          args.views, args.size, args.device, sheet=args.sheet, autoguidance=args.autoguidance)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="measure a model's surface level, colour maps and object frame against its "
                                         "training objects",
                       description="Surface: encode training objects of the model's categories from their views and "
                                   "find the level (opacity length) whose surfaces lie closest to their point "
                                   "clouds. Colour: for each preset, a per-channel map of the colour's logit that "
                                   "carries the colours of the objects the preset makes onto those of the training "
                                   "objects (models learn colours brighter than the objects from images blended with "
                                   "a white background). By default the preset's own samples are measured, on seeds "
                                   "that evaluations do not use (--seed); --source reconstructions measures "
                                   "reconstructions of training objects instead. Frame: the centre and spread every "
                                   "training object's point cloud shares (CO3D-style data are normalised that way), "
                                   "which generated objects are then centred on (and, with --frame-scale, scaled "
                                   "to); data whose objects keep their own sizes get none. All are stored in the model file, "
                                   "where holofusion generate, evaluate, the backend and the Blender extension use "
                                   "them. Held-out objects are not used. The trainer measures the surface itself "
                                   "when its autoencoder is done; colours need the super-resolution model too, so "
                                   "run this once both are trained.")
    p.add_argument("--model", required=True, help="model folder or shipped model's name (colour maps of presets with "
                                                  "super-resolution need its superres.safetensors), a run folder or "
                                                  "a .safetensors model file; rewritten in place with the results "
                                                  "in its metadata")
    p.add_argument("--data", required=True, help="CO3Dv2-format dataset root with the model's training objects "
                                                 "(colours from samples read only their point clouds)")
    p.add_argument("--objects", type=_positive_int("--objects"), default=None,
                   help="training objects to measure against (default: 16 for the surface level and for colours "
                        "from reconstructions; every training object for colours from samples)")
    p.add_argument("--only", choices=("surface", "colour", "frame"), default=None,
                   help="measure only the surface level, the colour maps or the object frame (default: all three; a "
                        "new surface level drops colour maps not measured at it; the frame reads only point clouds)")
    p.add_argument("--frame-scale", action="store_true",
                   help="with the frame: scale each generated object to the training objects' spread as well as "
                        "centring it (default: centre only; a model whose samples miss the data's surface detail "
                        "can come out closer to real objects at its own size)")
    p.add_argument("--frame-centre", choices=("centroid", "box"), default=None,
                   help="with the frame: which centre of an object is placed on the training objects' (default: "
                        "centroid, the area-weighted one of its surface; box: the midpoint of its extent between "
                        "the 2 %% and 98 %% quantiles per axis, which detail inside the object does not move)")
    p.add_argument("--frame-presets", default=None,
                   help="with the frame: comma-separated presets whose objects it places (default: every preset; "
                        "a preset whose stages already put objects where the data have them can do worse moved)")
    p.add_argument("--presets", default=None,
                   help="comma-separated presets to measure colour maps for (default: draft, and standard where "
                        "the folder has a super-resolution model)")
    p.add_argument("--source", choices=("samples", "reconstructions"), default="samples",
                   help="what the colour maps measure: the preset's own samples (default; standard runs all three "
                        "stages per sample, about 25 s each on a 2-core CPU) or the preset's reconstructions of "
                        "training objects (needs their views)")
    p.add_argument("--samples", type=_positive_int("--samples"), default=64,
                   help="samples per preset for colours from samples (default: 64; with 16, which objects happened "
                        "to be drawn moved the shipped hydrant's standard map by 0.07 in red)")
    p.add_argument("--seed", type=int, default=10000,
                   help="first seed of those samples (default: 10000; evaluations measure seeds from 0, so keep "
                        "them apart)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args) -> int:
    from .colour import calibrate_colour, calibrate_colour_on_samples, measurable_presets, training_colours
    from .evaluate import _load_model, calibrate_surface, model_file, training_reconstructions
    from .frame import training_frame
    from .pipeline import MAX_SEED, PRESETS, HoloFusionPipeline
    from .weights import load_weights, save_weights

    path = model_file(args.model)
    if path.name == "holodiffusion.safetensors":  # a model folder: its super-resolution models come along
        pipe = HoloFusionPipeline.from_pretrained(str(path.parent), args.device)
    else:
        pipe = HoloFusionPipeline(_load_model(args.model, args.device))
    names = ["draft"] + (["standard"] if pipe.sr is not None else [])
    if args.presets is not None:
        names = _names(args.presets)
    presets = measurable_presets(pipe, names, "--presets")  # before the slow part
    do_surface, do_colour, do_frame = (args.only in (None, which) for which in ("surface", "colour", "frame"))
    for flag, given in (("--frame-scale", args.frame_scale), ("--frame-presets", args.frame_presets is not None),
                        ("--frame-centre", args.frame_centre is not None)):
        if given and not do_frame:
            raise UserError(f"{flag} sets how the object frame is used, and --only {args.only} does not measure "
                            "one; drop one of them")
    frame_use: dict[str, Any] = {"scale": args.frame_scale}
    if args.frame_presets is not None:
        chosen = _names(args.frame_presets)
        unknown = [x for x in chosen if x not in PRESETS]
        if unknown or not chosen:
            raise UserError(f"--frame-presets {args.frame_presets!r}: "
                            f"{'unknown preset ' + repr(unknown[0]) if unknown else 'no preset named'}; "
                            f"choose from {', '.join(PRESETS)}")
        frame_use["presets"] = [x for x in PRESETS if x in chosen]  # in the presets' own order, once each
    from_samples = do_colour and args.source == "samples"
    if from_samples and not 0 <= args.seed <= args.seed + args.samples - 1 <= MAX_SEED:
        raise UserError(f"--seed {args.seed} with --samples {args.samples}: seeds are whole numbers from 0 to "
                        f"{MAX_SEED}")
    state, meta = load_weights(path)
    info = dict(meta["info"])
    recon = None
    if do_frame:  # first: it reads point clouds alone, so data it refuses are told of in seconds
        try:
            frame = {**training_frame(pipe.hd, args.data, args.objects, rule=args.frame_centre or "centroid"),
                     **frame_use}
        except UserError as e:
            if args.only == "frame":
                raise
            frame = None
            print(f"no object frame: {e}")
        info.pop("frame", None)
        if frame is not None:
            info["frame"] = frame
            print(f"object frame: centre {frame['centre']}, spread {frame['spread']} (varies by "
                  f"{frame['spread_variation']:.2%} over {frame['objects']} training objects); generated objects "
                  f"are {'centred and scaled to it' if frame['scale'] else 'centred on it'}"
                  f"{' by the midpoint of their extent' if frame.get('centre_rule') == 'box' else ''}"
                  f"{' under ' + ', '.join(frame['presets']) if 'presets' in frame else ''}")
        pipe.hd.info = {**pipe.hd.info, "frame": frame}
    if do_surface or (do_colour and not from_samples):
        recon = training_reconstructions(pipe.hd, args.data, args.objects or 16)
    if do_surface:
        surface = calibrate_surface(pipe.hd, args.data, reconstructions=recon)
        old = (info.get("surface") or {}).get("opacity_length", "not calibrated")
        if surface["opacity_length"] != old:
            info.pop("colour", None)  # colour maps are measured at a level: a new one makes them stale
        info["surface"] = pipe.hd.info["surface"] = surface
        table = "  ".join(f"{k}: {v:.4f}" for k, v in surface["chamfer"].items())
        print(f"Chamfer to the true surfaces by opacity length: {table}")
        print(f"surface level: opacity length {surface['opacity_length']:g} (was {old})")
    if do_colour:
        if from_samples:
            truth = training_colours(pipe.hd, args.data, args.objects)
            maps = calibrate_colour_on_samples(pipe, range(args.seed, args.seed + args.samples), truth, presets)
        elif recon[2] is None:
            raise UserError(f"--data {args.data!r}: the training point clouds carry no colours to calibrate on; "
                            "use --only surface")
        else:
            maps = calibrate_colour(pipe, recon[0], recon[2], presets)
        info["colour"] = {**(info.get("colour") or {}), **maps}
        for name, r in maps.items():
            print(f"colour of {name} ({r['source']}): logit scale {r['scale']} shift {r['shift']}; mean colour "
                  f"error (R, G, B) {r['error_before']} -> {r['error_after']} on {r['objects']} objects")
    save_weights(path, state, meta["kind"], meta["config"], info)
    print(f"wrote {path}")
    return 0


def _add_guide(sub) -> None:
    p = sub.add_parser("guide", help="give a model folder an autoguidance model (guide.safetensors)",
                       description="Write a weaker HoloDiffusion denoiser on the same autoencoder into a model "
                                   "folder as guide.safetensors, its denoiser in 8 bits: an earlier checkpoint "
                                   "of the model's own training (what worked on the apple; a small U-Net trained "
                                   "briefly with --init-from the model made floaters). Sampling then pushes each "
                                   "prediction away from the guide's (autoguidance, Karras et al. 2024) with the "
                                   "guide's weight (--weight), which every preset uses; evaluate and sample take "
                                   "--autoguidance W to try others (1: none).")
    p.add_argument("--model", required=True, help="model folder (holding holodiffusion.safetensors) or a shipped "
                                                  "model's name")
    p.add_argument("--from", dest="source", required=True,
                   help="the guide: a HoloDiffusion .safetensors file or a run folder (its model.safetensors) "
                        "with the model's autoencoder and normalisation")
    p.add_argument("--weight", type=float, default=2.0, metavar="W",
                   help="how far the presets push each prediction away from the guide's, x0 = guide + W (model - "
                        "guide); measure it with `holofusion evaluate --autoguidance W` first (default: 2, chosen "
                        "on the apple; the hydrant, the donut and the teddybear ship 4)")
    p.set_defaults(func=_cmd_guide)


def _cmd_guide(args) -> int:
    from .evaluate import model_file
    from .holodiffusion import GUIDE_FILE, save_guide

    model = model_file(args.model)  # a model folder's (or a shipped model's) holodiffusion.safetensors
    if model.name != "holodiffusion.safetensors":
        raise UserError(f"--model {args.model!r} is not a model folder holding holodiffusion.safetensors")
    out = save_guide(str(model_file(args.source)), str(model), str(model.with_name(GUIDE_FILE)), args.weight)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; the presets sample with weight {args.weight:g})")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a HoloDiffusion model against held-out objects",
                       description="Sample --samples objects of a category, extract their coloured surfaces and "
                                   "compare them with the point clouds of the category's held-out (test, else val) "
                                   "objects: COV, MMD and 1-NNA for a coloured and a geometry-only Chamfer "
                                   "distance, and the diversity ratio. Writes the metrics JSON and a sample sheet "
                                   "PNG beside it, and prints a table. FID/KID need Inception-v3 weights, which "
                                   "this version does not support.")
    p.add_argument("--model", required=True,
                   help="run folder (its model.safetensors), a .safetensors model file, a model folder or a "
                        "shipped model's name; with --preset standard or high, a model folder holding "
                        "holodiffusion.safetensors and superres.safetensors, or a shipped model's name")
    p.add_argument("--data", required=True, help="CO3Dv2-format dataset root holding the category")
    p.add_argument("--category", default=None,
                   help="category to evaluate (default: the model's only category; required if it has several)")
    p.add_argument("--samples", type=_positive_int("--samples"), required=True, help="objects to sample")
    p.add_argument("--preset", choices=("draft", "standard", "high"), default="draft",
                   help="draft (default): the coarse samples; standard / high: the whole pipeline, super-resolution "
                        "and distillation, measured on the distilled objects (the preset sets the sampler steps)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=25,
                   help="sampler steps of the draft preset (default: 25)")
    p.add_argument("--sampler", choices=_SAMPLERS, default="dpm++", help="sampler of the draft preset (default: dpm++)")
    _add_autoguidance(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample (default: 0)")
    p.add_argument("--points", type=_positive_int("--points"), default=2048,
                   help="points per surface and per reference cloud (default: 2048)")
    p.add_argument("--lattice", type=_positive_int("--lattice"), default=64,
                   help="density lattice per axis for surface extraction (default: 64)")
    p.add_argument("--opacity-length", type=float, default=None,
                   help="surface level: where a slab this thick (world units) is half opaque, sigma = ln 2 / length "
                        "(default: the model's calibrated level, see holofusion calibrate; 1.0 for a model without "
                        "one)")
    p.add_argument("--keep-floaters", action="store_true",
                   help="measure every surface found, floaters included (default: drop regions under 10 %% of the "
                        "largest, as the mesh chain does, so the measured surface is the object a user gets)")
    p.add_argument("--colour-weight", type=float, default=None,
                   help="weight of RGB against xyz in the coloured distance (default: chosen so that colour and "
                        "shape differences between the reference objects weigh the same)")
    p.add_argument("--batch", type=_positive_int("--batch"), default=8, help="objects sampled at once (default: 8)")
    p.add_argument("--out", default=None,
                   help="metrics JSON to write (default: eval_<category>.json beside the model, i.e. in its run "
                        "folder); the sample sheet goes beside it as <name>_samples.png. With --preset standard or "
                        "high, each object is kept in <name>.objects/ as it is measured: run the same command again "
                        "after an interruption and it continues where it stopped")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="Inception-v3 weights for FID/KID: not supported in this version (exits with a message)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from .evaluate import SurfaceConfig, evaluate_model, format_table

    if args.lattice < 2:
        raise UserError(f"--lattice must be at least 2; got {args.lattice}")
    if args.opacity_length is not None and not args.opacity_length > 0:
        raise UserError(f"--opacity-length must be positive; got {args.opacity_length}")
    if args.colour_weight is not None and not args.colour_weight >= 0:
        raise UserError(f"--colour-weight must be zero or positive; got {args.colour_weight}")
    report, path, sheet = evaluate_model(args.model, args.data, args.category, args.samples, args.steps,
                                         args.sampler, args.points, args.out, args.inception, args.seed, args.batch,
                                         SurfaceConfig(lattice=args.lattice,
                                                       min_component=0.0 if args.keep_floaters
                                                       else SurfaceConfig.min_component),
                                         args.colour_weight, device=args.device,
                                         opacity_length=args.opacity_length, preset=args.preset,
                                         autoguidance=args.autoguidance)
    print(format_table(report))
    print(f"wrote {path}")
    print(f"wrote {sheet}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="holofusion",
                     description="HoloFusion generative 3D: datasets, training, sampling and evaluation.")
    parser.add_argument("--version", action="version", version=f"holofusion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    _add_dataset(sub)
    _add_train(sub)
    _add_sample(sub)
    _add_evaluate(sub)
    _add_calibrate(sub)
    _add_guide(sub)
    _add_generate(sub)
    _add_serve(sub)
    _add_worker(sub)
    _add_models(sub)
    _add_demo(sub)
    _add_bench(sub)
    return parser


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate textured objects as .glb files",
                       description="Generate objects with HoloFusion and write each as a binary glTF (.glb: mesh, "
                                   "UVs and a baked base-colour texture, in metres, +Y up, resting on the ground) "
                                   "with a preview PNG beside it. With --count K, K objects with consecutive seeds "
                                   "are written as <stem>-<seed>.glb.")
    p.add_argument("--model", default=None,
                   help=f"shipped model name (see `holofusion models`) or a model folder (default: {DEFAULT_MODEL}, "
                        "or with --category the shipped model that knows that category)")
    p.add_argument("--category", default=None, help="category to generate (default: the model's own, or any)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first object (default: 0)")
    p.add_argument("--preset", default="standard",
                   help="draft (coarse stage only, seconds), standard, or high (more views, a finer grid, and the "
                        "model's 4x super-resolution where it has one; `holofusion models` marks it) "
                        "(default: standard)")
    p.add_argument("--count", type=_positive_int("--count"), default=1, help="objects, consecutive seeds "
                                                                              "(default: 1)")
    p.add_argument("--out", default="object.glb", help="output .glb path (default: object.glb)")
    p.add_argument("--texture-size", type=_positive_int("--texture-size"), default=1024,
                   help="side of the baked texture in texels (default: 1024)")
    p.add_argument("--faces", type=_positive_int("--faces"), default=20000,
                   help="decimate the mesh to about this many triangles (default: 20000)")
    p.add_argument("--size", type=float, default=None, metavar="METRES",
                   help="largest side of the object in metres (default: a real-world size per category, "
                        "e.g. 0.08 for an apple)")
    p.add_argument("--opacity-length", type=float, default=None, metavar="L",
                   help="surface threshold: where a slab L world units thick is half opaque (default: the model's "
                        "calibrated level, 1.0 for a model without one; larger values put the surface further out, "
                        "in fainter density)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--server", default=None, metavar="CONNECTION_FILE",
                   help="run on a backend (holofusion serve) instead of in this process: its connection file")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from .generate import GenerateJob, generate

    model = args.model
    if model is None and not args.server:  # a backend picks the model itself (the same rule)
        from .generate import known_categories, list_models, model_for

        rows = list_models()
        model = model_for(args.category, rows)
        if model is None:
            raise UserError(f"--category {args.category!r}: no shipped model knows it (known: "
                            f"{known_categories(rows)}); pass --model with a folder that does")
    job = GenerateJob(model=model, category=args.category, seed=args.seed, preset=args.preset,
                      count=args.count, out=args.out, texture_size=args.texture_size, faces=args.faces,
                      size_m=args.size, opacity_length=args.opacity_length, device=args.device)
    if args.server:
        from .client import BackendError, BackendLost
        from .generate import generate_remote

        try:
            records = generate_remote(job, args.server)
        except (BackendError, BackendLost) as e:
            raise UserError(f"backend: {e}") from None
        for rec in records:
            print(f"wrote {rec['path']} (seed {rec['seed']}, {rec['faces']} faces; job {rec['job_id']})")
        return 0
    for rec in generate(job):
        print(f"wrote {rec['path']} (seed {rec['seed']}, {rec['faces']} faces) and {rec['preview']}")
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the backend the Blender extension talks to",
                       description="Run the HoloFusion backend: a ZeroMQ broker speaking the protocol in "
                                   "docs/PROTOCOL.md, with one client endpoint and any number of GPU/CPU workers "
                                   "behind it (--workers local ones; more with `holofusion worker --connect` on other "
                                   "machines). It writes a connection file (address and a fresh key, owner-only "
                                   "permissions) and prints its path; every result is stored before it is sent. "
                                   "Stop it with Ctrl-C.")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default: 127.0.0.1); any other (e.g. 0.0.0.0, for remote clients "
                        "and workers) turns on CURVE encryption")
    p.add_argument("--port", type=int, default=0, help="client port (default: 0, a free one; see the connection file)")
    p.add_argument("--worker-port", type=int, default=0,
                   help="port workers connect to (default: 0, a free one; see the connection file)")
    p.add_argument("--connection-file", default=None, metavar="PATH",
                   help="where to write the connection file (default: ~/.config/holofusion/backend-<pid>.json)")
    p.add_argument("--device", default="auto", help="device of the local workers: auto, cpu, cuda or cuda:N "
                                                    "(default: auto; with cuda, worker i uses cuda:i)")
    p.add_argument("--workers", type=int, default=1,
                   help="local worker processes, one per device (default: 1; 0: only remote workers)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per local CPU worker (default: the cores shared among the workers)")
    p.add_argument("--worker-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="a worker silent this long is dropped and its job re-queued once (default: 5)")
    p.add_argument("--curve", action="store_true", help="encrypt with CURVE on loopback too")
    p.add_argument("--store", default=None, metavar="DIR",
                   help="folder for finished results (default: ~/.config/holofusion/store)")
    p.add_argument("--models", default=None, metavar="DIR",
                   help="folder of model folders (default: the shipped models/)")
    p.set_defaults(func=_cmd_serve)


def _port(flag: str, value: int) -> int:
    if not 0 <= value <= 65535:
        raise UserError(f"{flag} {value}: choose 0 (any free port) or 1..65535")
    return value


def _cmd_serve(args) -> int:
    from .server.app import ServeConfig, serve

    if args.worker_timeout <= 0:
        raise UserError(f"--worker-timeout {args.worker_timeout}: must be above 0 seconds")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1")
    serve(ServeConfig(host=args.host, port=_port("--port", args.port), connection_file=args.connection_file,
                      device=args.device, store=args.store, models=args.models, workers=args.workers,
                      worker_port=_port("--worker-port", args.worker_port), worker_timeout_s=args.worker_timeout,
                      curve=args.curve, threads=args.threads))
    return 0


def _add_worker(sub) -> None:
    p = sub.add_parser("worker", help="serve a backend's queue from this machine's device",
                       description="Run one generation worker for a backend (holofusion serve), on this machine's "
                                   "device: it connects to the backend's worker port, takes one job at a time and "
                                   "sends the finished objects back to be stored. Start one per GPU. The key comes "
                                   "from the connection file, or from the HOLOFUSION_KEY environment variable when "
                                   "--connect is an address.")
    p.add_argument("--connect", required=True, metavar="CONNECTION_FILE_OR_ADDRESS",
                   help="the backend's connection file (copied from its machine), or tcp://HOST:WORKER_PORT")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--models", default=None, metavar="DIR",
                   help="folder of model folders (default: the shipped models/); the same models as the backend's")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--name", default=None, help="name shown in the backend's status (default: host:pid:device)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="backend silence after which the worker drops its job and reconnects (default: 5)")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_worker)


def _cmd_worker(args) -> int:
    import os

    from .server.worker import WorkerConfig, run_worker

    target = args.connect
    curve = os.environ.get("HOLOFUSION_CURVE_SERVERKEY")
    if target.startswith("tcp://"):
        key = os.environ.get("HOLOFUSION_KEY")
        if not key:
            raise UserError("--connect tcp://...: set HOLOFUSION_KEY to the backend's key (the \"key\" of its "
                            "connection file), or pass the connection file itself")
        address = target
    else:
        from .client import BackendError, BackendLost, read_connection_file

        try:
            info = read_connection_file(target)
        except (BackendError, BackendLost) as e:
            raise UserError(f"--connect: {e}") from None
        if "worker_port" not in info:
            raise UserError(f"--connect: {target!r} names no worker_port; it was written by an older backend")
        address, key = f"tcp://{info['ip']}:{info['worker_port']}", info["key"]
        curve = info.get("curve_serverkey") or curve
    if args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout}: must be above 0 seconds")
    run_worker(WorkerConfig(address=address, key=key, device=args.device, models=args.models, name=args.name,
                            threads=args.threads, timeout_s=args.timeout, parent_pid=args.parent_pid,
                            curve_serverkey=curve))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the quick start: a scene made through the Blender extension, headless",
                       description="Build the Blender extension, start a backend on the shipped model, and drive the "
                                   "real Blender (the bpy module) headless: the extension is installed from its zip, "
                                   "populates a small scene, and out/scene.blend, the first object's .glb and a "
                                   "Cycles render out/preview.png are written.")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--count", type=int, default=6, help="objects in the scene (default: 6)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    p.add_argument("--preset", default="draft", choices=["draft", "standard", "high"],
                   help="generation preset (default: draft)")
    p.add_argument("--model", default=None, help=f"model name (default: {DEFAULT_MODEL})")
    p.add_argument("--categories", default="",
                   help="comma-separated categories to cycle through, each made by the shipped model that serves it, "
                        "e.g. apple,donut,hydrant,teddybear (default: the model's own)")
    p.add_argument("--samples", type=int, default=32, help="Cycles samples for the preview (default: 32)")
    p.add_argument("--resolution", type=int, default=640, help="preview width in pixels (default: 640)")
    p.add_argument("--device", default="auto", help="backend device: auto, cpu, cuda (default: auto)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    cats = tuple(_names(args.categories))
    facts = run_demo(DemoConfig(out=args.out, count=args.count, seed=args.seed, preset=args.preset,
                                model=args.model, categories=cats, samples=args.samples,
                                resolution=args.resolution, device=args.device))
    print(f"wrote {facts['scene']}, {facts['glb']} and {facts['preview']} ({facts['objects']} objects, seeds "
          f"{', '.join(map(str, facts['seeds']))})")
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the models holofusion generate can use",
                       description="List the shipped models (folders under models/): their categories and the "
                                   "presets they support.")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args) -> int:
    from .generate import format_models, list_models

    print(format_models(list_models()))
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time and peak memory per stage and preset, on this machine",
                       description="Generate objects the way `holofusion generate` does and print one table: for "
                                   "each model and preset, seconds and peak memory of each stage (coarse, superres, "
                                   "distill, asset) and of the whole object from the request to its .glb on disk "
                                   "(medians over --repeats seeds), the ratio to the draft preset, and the targets "
                                   "(draft <= 10 s, standard <= 90 s, 4 GB on a 2-core CPU). Then the paper-scale "
                                   "configuration with random weights.")
    p.add_argument("--models", default=None, help="comma-separated model names or folders (default: every shipped "
                                                  "model)")
    p.add_argument("--presets", default="draft,standard", help="comma-separated presets (default: draft,standard)")
    p.add_argument("--repeats", type=_positive_int("--repeats"), default=5,
                   help="objects per model and preset, seeds 0, 1, ... (default: 5)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--threads", type=_positive_int("--threads"), default=None,
                   help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--no-paper", dest="paper", action="store_false",
                   help="skip the paper-scale configuration with random weights")
    p.add_argument("--paper-presets", default="draft,standard",
                   help="presets for the paper-scale configuration (default: draft,standard)")
    p.add_argument("--paper-repeats", type=_positive_int("--paper-repeats"), default=1,
                   help="objects per paper-scale preset (default: 1)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import torch

    from .bench import format_table, run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_bench(_names(args.models) if args.models else None, _names(args.presets), args.repeats, args.device,
                     args.paper, _names(args.paper_presets), args.paper_repeats)
    print(format_table(rows, args.device))
    return 0


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
