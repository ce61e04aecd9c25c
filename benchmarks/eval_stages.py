"""Do the super-resolution and distillation stages earn their cost? Measured on fresh samples of a trained model.

    python benchmarks/eval_stages.py --model FOLDER --data DIR [--category apple] [--objects 8] [--held-out 4]
                                     [--preset standard] [--picture docs/images/stages.png] [--json stages.json]

For each object (seeds 1000, 1001, ...): the coarse HoloDiffusion grid; K + M views super-resolved; the grid
distilled from the first K only. Then:
- sharpness: mean image-gradient magnitude of the distilled renders over that of the coarse renders, at the M
  held-out views, same cameras and size (ratio > 1: sharper); beside it the held-out super-resolved views' own
  ratio, the most a fit to such views could reach; each also split into the rim (within 2 px of the coarse
  silhouette) and the rest, the object's surface (``sharpness_ratio_rim_*``, ``sharpness_ratio_inside_*``);
  with ``--view-size N`` also both rendered at N px, the size an artist views the object at (the super-resolved
  views exist only at the model's size);
- consistency: PSNR of the distilled renders against the M held-out super-resolved views, which the fit never saw
  (beside it, the coarse renders' PSNR against the same views), and against the mean of ``--sr-samples`` other
  seeds' super-resolved views there (the model's expected view); beside them, one seed's view against another's,
  the agreement of two samples of the super-resolution model itself;
- geometry kept: Chamfer distance (mean, not squared) between the coarse and the distilled surfaces, over the object's
  size (bounding-box diagonal);
- geometry metrics: COV / MMD / 1-NNA (geometry-only Chamfer, ``holofusion.evaluate``) of the coarse surfaces and of
  the distilled ones against the held-out objects of ``--data``;
and a side-by-side picture: coarse render | super-resolved view | distilled render, at held-out views.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from holofusion.distill import ExplicitField, psnr, rim_mask, sharpness, sharpness_split
from holofusion.evaluate import (ColouredPoints, SurfaceConfig, chamfer_matrix, generative_metrics, reference_points,
                                 surface_points)
from holofusion.pipeline import PRESETS, HoloFusionPipeline, with_distill
from holofusion.plots import sample_sheet
from holofusion.render import RenderConfig, render_grid
from holofusion.superres import Condition


def _subset(cond: Condition, idx: list[int]) -> Condition:
    return Condition(cond.rgb[idx], cond.alpha[idx], None if cond.features is None else cond.features[idx])


def _value(text: str):
    """A --set value: JSON (numbers, lists, null), else the plain string (loss=l1)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", default=None)
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--held-out", type=int, default=4)
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--points", type=int, default=1024)
    ap.add_argument("--picture", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sr-samples", type=int, default=4, help="other seeds' super-resolved views per held-out view")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="override a DistillConfig field of the preset, e.g. --set iterations=300 --set tolerance=0")
    ap.add_argument("--first-seed", type=int, default=1000)
    ap.add_argument("--sr-strength", type=float, default=None, help="override the preset's sr_strength")
    ap.add_argument("--view-size", type=int, default=None,
                    help="also measure the sharpness ratio with both renders at this size (px)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = HoloFusionPipeline.from_pretrained(args.model)
    category = args.category or pipe.categories[0]
    base = PRESETS[args.preset]
    if args.set:
        base = with_distill(base, **{k: _value(v) for k, v in (a.split("=", 1) for a in args.set)})
    if args.sr_strength is not None:
        base = replace(base, sr_strength=args.sr_strength)
    k, m = base.views, args.held_out
    pre = replace(base, views=k + m)
    look = RenderConfig(n_coarse=64, n_fine=32, chunk_rays=4096)
    scfg = SurfaceConfig(lattice=64, points=args.points, opacity_length=pipe.opacity_length())
    rows, coarse_sets, fine_sets, tiles = [], [], [], []
    for i in range(args.objects):
        seed = args.first_seed + i
        coarse = pipe.coarse(seed, args.category, pre.coarse_steps, None)
        cams, cond = pipe.conditions(coarse, pre)
        views = pipe.first_views(cond, seed, pre, None)
        # Held-out views interleaved along the spiral (every (K+M)/M-th), not its last M, which would all sit at
        # the top of the band where no fitted view is near.
        held_idx = [int((j + 0.5) * (k + m) / m) for j in range(m)]
        fit_idx = [j for j in range(k + m) if j not in held_idx]
        fit_cond = _subset(cond, fit_idx)

        # The pipeline's own distillation stage, on the fitted views only.
        grid, iterations = pipe.distill(coarse, views[fit_idx], cams[fit_idx], fit_cond, seed, pre, None)
        with torch.no_grad():
            held = cams[held_idx]
            c_out = render_grid(coarse, pipe.hd.decoder, held, look)
            c_img = c_out.rgb.permute(0, 3, 1, 2).clamp(0, 1)
            d_img = render_grid(grid, ExplicitField(), held, look).rgb.permute(0, 3, 1, 2).clamp(0, 1)
        target = views[held_idx]
        # Where the gradient is: within 2 px of the coarse silhouette (the rim) or elsewhere (surface detail).
        rim = rim_mask(c_out.alpha.reshape(m, 1, *c_img.shape[-2:]))
        extra = {}
        for name, img in (("coarse", c_img), ("distilled", d_img), ("held_out_sr", target)):
            extra[f"sharpness_rim_{name}"], extra[f"sharpness_inside_{name}"] = sharpness_split(img, rim)
        if args.view_size:
            big = held.resize((args.view_size, args.view_size))
            with torch.no_grad():
                cb = render_grid(coarse, pipe.hd.decoder, big, look).rgb.permute(0, 3, 1, 2).clamp(0, 1)
                db = render_grid(grid, ExplicitField(), big, look).rgb.permute(0, 3, 1, 2).clamp(0, 1)
            extra.update(sharpness_coarse_view_size=sharpness(cb), sharpness_distilled_view_size=sharpness(db))
        # The super-resolution model's own spread: other seeds' views at the held-out cameras. Their mean estimates
        # what a view-consistent object should agree with; one seed against another is the agreement of two samples.
        held_cond = _subset(cond, held_idx)
        sr = pipe.sr_for(pre)
        init = (sr.upsampled(held_cond)[:, :3] * 0.5 + 0.5).clamp(0, 1) if pre.sr_strength < 1 else None
        others = torch.stack([sr.sample(held_cond, [seed * 7919 + r * 101 + j for j in range(m)],
                                             steps=pre.sr_steps, init=init, strength=pre.sr_strength)
                              for r in range(args.sr_samples)])
        sr_mean = others.mean(0)
        gen = [torch.Generator().manual_seed(seed)]
        cs = surface_points(coarse, pipe.hd.decoder, "softplus", scfg, gen)
        ds = surface_points(grid, ExplicitField(), "softplus", scfg, [torch.Generator().manual_seed(seed)])
        coarse_sets.append(cs)
        fine_sets.append(ds)
        if not (cs.empty[0] or ds.empty[0]):
            a, b = cs.points[0], ds.points[0]
            d = torch.cdist(a, b)
            cham = 0.5 * (float(d.min(1).values.mean()) + float(d.min(0).values.mean()))
            size = float((a.max(0).values - a.min(0).values).norm())
        else:
            cham, size = math.inf, 1.0
        rows.append({"seed": seed, "sharpness_coarse": sharpness(c_img), "sharpness_distilled": sharpness(d_img),
                     "sharpness_held_out_sr": sharpness(target),
                     "psnr_distilled_vs_held_out_sr": psnr(d_img, target), "psnr_coarse_vs_held_out_sr":
                     psnr(c_img, target), "psnr_distilled_vs_sr_mean": psnr(d_img, sr_mean),
                     "psnr_coarse_vs_sr_mean": psnr(c_img, sr_mean), "psnr_sr_seed_vs_seed": psnr(others[0], target),
                     "chamfer_over_size": cham / size, "distill_iterations": iterations, **extra})
        print(json.dumps(rows[-1]))
        if len(tiles) < 4:
            tiles.append(torch.stack([c_img[0], target[0], d_img[0]]).permute(0, 2, 3, 1).cpu())
    refs, split, _, _, _ = reference_points(Path(args.data), category, args.points)
    summary = {"objects": args.objects, "preset": args.preset, "overrides": args.set, "fit_views": k,
               "held_out_views": m}
    for key in rows[0]:
        if key != "seed":
            summary[key] = float(np.mean([r[key] for r in rows]))
    summary["sharpness_ratio"] = summary["sharpness_distilled"] / max(summary["sharpness_coarse"], 1e-12)
    if args.view_size:
        summary["view_size"] = args.view_size
        summary["sharpness_ratio_view_size"] = summary["sharpness_distilled_view_size"] / max(
            summary["sharpness_coarse_view_size"], 1e-12)
    # The ceiling: the super-resolved views themselves over the coarse renders.
    summary["sharpness_ratio_sr"] = summary["sharpness_held_out_sr"] / max(summary["sharpness_coarse"], 1e-12)
    for part in ("rim", "inside"):
        for name in ("distilled", "held_out_sr"):
            summary[f"sharpness_ratio_{part}_{name}"] = summary[f"sharpness_{part}_{name}"] / max(
                summary[f"sharpness_{part}_coarse"], 1e-12)
    for name, sets in (("coarse", coarse_sets), ("distilled", fine_sets)):
        s = ColouredPoints.cat(sets)
        both = ColouredPoints.cat([s, refs])
        _, geo = chamfer_matrix(both, None, 1.0)
        n = len(s)
        summary[f"geometry_{name}"] = generative_metrics(geo[:n, :n], geo[n:, n:], geo[:n, n:], s.empty)
    summary["reference_split"] = split
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "objects": rows}, indent=2) + "\n")
    if args.picture:
        sample_sheet(torch.stack(tiles), args.picture, per_row=2,
                     title="coarse render | super-resolved view | distilled render (views the fit never saw)")


if __name__ == "__main__":
    main()
