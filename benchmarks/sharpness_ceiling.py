"""How much sharper than a coarse render can a view of these objects be? The ceiling for `eval_stages.py`'s ratio.

    python benchmarks/sharpness_ceiling.py --model apple --data data_apple [--objects 6] [--views 4] [--sr-steps 10]

For each held-out (test split) object of ``--data``: the model's autoencoder encodes 8 of its real views into a
coarse grid; at 4 other views (``--views``), at the super-resolution model's output size, it compares the mean
image-gradient magnitude (``holofusion.distill.sharpness``) of
- the real images (what a perfect super-resolution of this object would show),
- the coarse grid's renders (what the draft preset shows),
- the super-resolution model's views of those renders (one sample per view),
and prints each over the coarse renders' (ratio > 1: sharper than coarse). The real images' ratio is the most
the distilled renders could reach on this data: the synthetic objects are smooth, lit surfaces, so their images
are only so much sharper than a 16³ grid's render. Also the PSNR of the coarse renders and of the super-resolved
views against the real images.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from holofusion.data.co3d import Co3dDataset
from holofusion.distill import sharpness
from holofusion.pipeline import HoloFusionPipeline
from holofusion.superres import Condition
from holofusion.train_superres import coarse_conditions


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / max(float(((a - b) ** 2).mean()), 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model name or folder (with a super-resolution model)")
    ap.add_argument("--data", required=True, help="a CO3Dv2-format root with the model's category")
    ap.add_argument("--category", default=None)
    ap.add_argument("--objects", type=int, default=6)
    ap.add_argument("--views", type=int, default=4, help="compared views per object")
    ap.add_argument("--sr-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = HoloFusionPipeline.from_pretrained(args.model)
    if pipe.sr is None:
        raise SystemExit(f"{args.model}: no super-resolution model")
    hd, sr = pipe.hd, pipe.sr
    category = args.category or pipe.categories[0]
    n_source = 8
    low = Co3dDataset(args.data, category, split="test", image_size=int(hd.info.get("image_size") or 64))
    high = Co3dDataset(args.data, category, split="test", image_size=sr.config.high_size)
    real, coarse, conds = [], [], []
    seqs = [s for s in high.sequences if len(high.frames(*s)) >= n_source + args.views][:args.objects]
    if not seqs:
        raise SystemExit(f"{args.data}: no test sequence of {category} with {n_source + args.views} frames")
    for cat, seq in seqs:
        numbers = [f.frame_number for f in high.frames(cat, seq)][:n_source + args.views]
        src = low.load_views(cat, seq, numbers[:n_source])
        tgt = high.load_views(cat, seq, numbers[n_source:])
        with torch.no_grad():
            z = hd.normalize(hd.encode(src.images[None].to(hd.device), src.cameras.to(hd.device, torch.float32)))
            cams = tgt.cameras.to(hd.device, torch.float32)
            coarse.append(hd.render(hd.denormalize(z), cams).rgb.permute(0, 3, 1, 2).clamp(0, 1).cpu())
            conds.append(coarse_conditions(hd, z.expand(args.views, -1, -1, -1, -1), cams, sr.config.low_size))
        real.append(tgt.images.cpu())
    real_t, coarse_t = torch.cat(real), torch.cat(coarse)
    cond = Condition(torch.cat([c.rgb for c in conds]), torch.cat([c.alpha for c in conds]),
                     None if conds[0].features is None else torch.cat([c.features for c in conds]))
    views = sr.sample(cond, list(range(len(cond))), steps=args.sr_steps).cpu()
    base = sharpness(coarse_t)
    report = {"model": args.model, "category": category, "objects": len(seqs), "views_per_object": args.views,
              "size": sr.config.high_size, "sharpness_coarse": base, "sharpness_real": sharpness(real_t),
              "sharpness_sr": sharpness(views), "ratio_real": sharpness(real_t) / base,
              "ratio_sr": sharpness(views) / base, "psnr_coarse_vs_real": _psnr(coarse_t, real_t),
              "psnr_sr_vs_real": _psnr(views, real_t)}
    print(f"{len(seqs)} held-out {category} objects x {args.views} views at {sr.config.high_size} px")
    print(f"  sharpness: coarse {base:.4f}   real {report['sharpness_real']:.4f} (x{report['ratio_real']:.2f})   "
          f"super-resolved {report['sharpness_sr']:.4f} (x{report['ratio_sr']:.2f})")
    print(f"  PSNR against the real images: coarse {report['psnr_coarse_vs_real']:.2f} dB, super-resolved "
          f"{report['psnr_sr_vs_real']:.2f} dB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
