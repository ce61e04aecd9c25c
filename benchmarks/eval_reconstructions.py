"""The ceiling of a HoloDiffusion model's metrics: its autoencoder's reconstructions of the held-out objects, measured
as if they were samples.

    python benchmarks/eval_reconstructions.py --model models/apple/holodiffusion.safetensors --data data_apple
                                              [--category apple] [--views 8] [--points 1024] [--json out.json]

Each held-out (test) object is encoded from ``--views`` of its frames and its surface extracted exactly as
``holofusion evaluate`` extracts a sample's (the model's calibrated level, floaters dropped, the decoder's rendered
colour). These reconstructions stand in for samples in COV, MMD, 1-NNA and the diversity ratio against the same
objects' point clouds. A sampler can only reach what its latent space can express, so where the reconstructions
fail a target, training the denoiser longer will not meet it; where they pass and samples do not, the denoiser is
what is left. Also printed: how often a reconstruction's nearest reference is its own object, and the mean ratio of
reconstruction to reference RMS radius (a scale bias alone moves 1-NNA: 6 % makes it 100 %).

Against their own objects the comparison is paired: each reconstruction has its twin among the references, which
pulls 1-NNA below the 50 % of two samples of one distribution. ``--against DIR`` also measures them against as many
other held-out objects (e.g. the evaluation set ``holofusion dataset synth ... --seed 100000`` makes), unpaired, as
samples are measured: that 1-NNA is the honest ceiling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from holofusion.cameras import PerspectiveCamera
from holofusion.data.co3d import Co3dDataset
from holofusion.evaluate import (
    ColouredPoints,
    SurfaceConfig,
    _load_model,
    _resolve_category,
    chamfer_matrix,
    colour_weight_for,
    generative_metrics,
    model_surface_points,
    opacity_length_of,
    reference_points,
    rms_radius,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HoloDiffusion model file or run folder")
    ap.add_argument("--data", required=True, help="CO3Dv2-format dataset root with the category's test objects")
    ap.add_argument("--category", default=None, help="category (default: the model's only one)")
    ap.add_argument("--views", type=int, default=8, help="frames each object is encoded from (default: 8)")
    ap.add_argument("--points", type=int, default=1024, help="points per surface and reference (default: 1024)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--against", default=None, metavar="DIR",
                    help="also measure against other held-out objects of this dataset (unpaired)")
    ap.add_argument("--json", default=None, help="write the numbers here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = _load_model(args.model, "cpu")
    name, _ = _resolve_category(model, args.category)
    refs, split, _, _, names = reference_points(args.data, name, args.points)
    ds = Co3dDataset(args.data, name, subset="fewview_dev", split=split,
                     image_size=int(model.info.get("image_size", 64)))
    by_name = {seq: (cat, seq) for cat, seq in ds.sequences}
    zs = []
    with torch.no_grad():
        for j, seq in enumerate(names):
            cat, _ = by_name[seq]
            frames = ds.frames(cat, seq)
            pick = torch.randperm(len(frames), generator=torch.Generator().manual_seed(j))[:args.views].tolist()
            v = ds.load_views(cat, seq, [frames[i].frame_number for i in pick])
            zs.append(model.encode(v.images[None], PerspectiveCamera.stack([v.cameras])))
        level = opacity_length_of(model)
        recon = model_surface_points(model, torch.cat(zs), SurfaceConfig(points=args.points, opacity_length=level),
                                     [torch.Generator().manual_seed(1000 + j) for j in range(len(zs))])
    n = len(recon)
    w = colour_weight_for(refs)

    coloured, geometry = chamfer_matrix(ColouredPoints.cat([recon, refs]), None, w)
    report = {"model": str(Path(args.model).resolve()), "category": name, "objects": n, "split": split,
              "views": args.views, "opacity_length": level, "colour_weight": w}
    for key, d in (("coloured", coloured), ("geometry", geometry)):
        report[key] = generative_metrics(d[:n, :n], d[n:, n:], d[:n, n:], recon.empty)
    own = coloured[:n, n:].argmin(dim=1) == torch.arange(n)
    report["own_object_nearest"] = float(own.float().mean())
    ok = ~recon.empty
    ratio = [rms_radius(recon[j:j + 1]) / rms_radius(refs[j:j + 1]) for j in range(n) if ok[j]]
    report["radius_ratio"] = sum(ratio) / max(len(ratio), 1)

    print(f"{name}: reconstructions of {n} {split} objects from {args.views} views each, surface level "
          f"{level:g}, {args.points} points")
    print(f"{'distance':<10} {'COV':>7} {'MMD':>10} {'1-NNA':>7} {'diversity':>10}")
    for key in ("coloured", "geometry"):
        m = report[key]
        print(f"{key:<10} {100 * m['cov']:6.1f}% {m['mmd']:10.4g} {100 * m['1nna']:6.1f}% {m['diversity_ratio']:10.3g}")
    print(f"own object nearest: {100 * report['own_object_nearest']:.1f}%   radius ratio: {report['radius_ratio']:.3f}")
    if args.against:
        others, other_split, _, _, _ = reference_points(args.against, name, args.points)
        m = min(n, len(others))
        others, sub = others[:m], recon[:m]
        coloured, geometry = chamfer_matrix(ColouredPoints.cat([sub, others]), None, w)
        report["unpaired"] = {"data": str(Path(args.against).resolve()), "objects": m, "split": other_split}
        print(f"unpaired: {m} reconstructions against {m} other {other_split} objects of {args.against}")
        for key, d in (("coloured", coloured), ("geometry", geometry)):
            r = report["unpaired"][key] = generative_metrics(d[:m, :m], d[m:, m:], d[:m, m:], sub.empty)
            print(f"{key:<10} {100 * r['cov']:6.1f}% {r['mmd']:10.4g} {100 * r['1nna']:6.1f}% "
                  f"{r['diversity_ratio']:10.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
