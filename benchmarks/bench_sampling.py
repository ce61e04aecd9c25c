"""HoloDiffusion sampling: seconds per object at 10, 25, 50 and 1000 steps, against the 1000-step ancestral sampler
of the original release measured in the same run, with a quality number beside each speed.

    python benchmarks/bench_sampling.py [--config paper] [--objects 2] [--steps 10,25,50] [--sampler dpm++]
                                        [--reference-steps 250] [--max-seconds 300] [--threads 1]
    python benchmarks/bench_sampling.py --model RUN --data DATA [--category apple] [--eval-samples 16]

Without ``--model`` the network is the ``--config`` architecture (default ``paper``: HoloDiffusion's released size)
with random weights (the zero-initialised output layers included); time per step does not depend on the weights.
With ``--model`` a trained run (or weights file) is timed instead, and its samples are scored with
``holofusion.evaluate`` against the held-out objects of ``--data``.

Quality, always: RMSE of each few-step latent against a ``--reference-steps`` DPM-Solver++(2M) latent from the same
seeds (the same starting noise), as a fraction of the reference's RMS: how far a short run lands from the
well-converged deterministic solution. The 1000-step ancestral row is stochastic, so its distance measures the
sampler's own noise, not an error. With ``--model``: also COV / MMD / 1-NNA (coloured Chamfer) of ``--eval-samples``
samples per step count (``holofusion.evaluate.evaluate_model``). On random weights the RMSE says little about
quality (a random network's output jumps between neighbouring steps, so no solver converges smoothly on it): read
it for a trained ``--model``.

A run whose estimated time exceeds ``--max-seconds`` (the 1000-step run of the paper U-Net on a CPU: ~20 min per
object) is timed for ``--extrapolate-steps`` steps only and extrapolated linearly (per-step cost is constant); such
rows are marked and have no quality number. Objects are sampled together in one batch; seconds per object is the
batch's time over the number of objects (a batch of one is slower per object on a CPU).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass

import torch

from holofusion.configs import resolve_config
from holofusion.diffusion import SamplingCancelled
from holofusion.holodiffusion import HoloDiffusion, HoloDiffusionConfig, load_holodiffusion


@dataclass
class Row:
    sampler: str
    steps: int
    seconds: float  # per object, full run (measured or extrapolated)
    timed_steps: int
    latent: torch.Tensor | None  # None when extrapolated
    quality: dict | None = None

    @property
    def extrapolated(self) -> bool:
        return self.timed_steps < self.steps


def sample_timed(model: HoloDiffusion, seeds: list[int], category: str | None, steps: int, sampler: str,
                 run_steps: int) -> tuple[float, int, torch.Tensor | None]:
    """(seconds, steps run, latent or None): stops after ``run_steps`` steps through the step callback."""
    done = 0

    def callback(step: int, total: int, x0: torch.Tensor) -> bool:
        nonlocal done
        done = step
        return run_steps >= total or step < run_steps

    t0 = time.perf_counter()
    try:
        x = model.sample(seeds, category, steps=steps, sampler=sampler, callback=callback)
    except SamplingCancelled:
        x = None
    return time.perf_counter() - t0, done, x


def seconds_per_step(model: HoloDiffusion, batch: int, repeats: int = 2) -> float:
    """One warm-up denoiser call, then the mean of ``repeats`` timed calls on a batch of noise."""
    c, s = model.config.encoder.channels, model.config.grid_size
    x = torch.randn(batch, c, s, s, s, generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), model.schedule.num_steps // 2, dtype=torch.long)
    with torch.no_grad():
        model.denoise(x, t)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.denoise(x, t)
    return (time.perf_counter() - t0) / repeats


def rel_rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def evaluate_row(args, steps: int, sampler: str) -> dict | None:
    """COV / MMD / 1-NNA of ``--eval-samples`` samples at this step count (None if the evaluation API is missing)."""
    try:
        from holofusion.evaluate import evaluate_model
    except ImportError as e:
        print(f"  (holofusion.evaluate is not available: {e}; only the RMSE column is computed)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        report, _, _ = evaluate_model(args.model, args.data, args.category, args.eval_samples, steps=steps,
                                      sampler=sampler, out=f"{tmp}/eval.json", seed=args.seed, progress=False)
    m = report.get("coloured") or report.get("geometry")
    kind = "coloured" if report.get("coloured") else "geometry"
    return {"kind": kind, "cov": m["cov"], "mmd": m["mmd"], "1nna": m["1nna"],
            "diversity": m["diversity_ratio"], "empty": report["empty_samples"]}


def _fmt(v: float | None, spec: str) -> str:
    """The report stores inf / nan (e.g. MMD with an empty sample) as null."""
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="paper", help="built-in config whose architecture is timed (random weights)")
    p.add_argument("--model", default=None, help="a trained run folder or weights file instead of --config")
    p.add_argument("--data", default=None, help="dataset for the evaluation metrics (needs --model)")
    p.add_argument("--category", default=None, help="category to sample and evaluate (default: the model's only one)")
    p.add_argument("--objects", type=int, default=2, help="objects sampled together for timing and RMSE")
    p.add_argument("--steps", default="10,25,50", help="few-step counts, comma-separated")
    p.add_argument("--sampler", default="dpm++", choices=["dpm++", "ddim"], help="sampler of the few-step rows")
    p.add_argument("--reference-steps", type=int, default=250, help="steps of the DPM++ reference (0: no RMSE)")
    p.add_argument("--eval-samples", type=int, default=16, help="samples per step count for the metrics")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="longest run to time in full; longer ones are timed for --extrapolate-steps steps")
    p.add_argument("--extrapolate-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.data and not args.model:
        p.error("--data needs --model (the metrics score a trained model)")
    torch.set_num_threads(args.threads)

    if args.model:
        model = load_holodiffusion(args.model)
        what = f"trained model {args.model}"
    else:
        model = HoloDiffusion(HoloDiffusionConfig.from_dict(resolve_config(args.config, ["apple"])["model"])).eval()
        # The U-Net's output layers start at zero (v = 0, a linear denoiser): give them small random weights too, so
        # that the RMSE column measures the solvers on a non-linear denoiser.
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for p_ in model.unet.parameters():
                if not p_.any():
                    p_.copy_(0.02 * torch.randn(p_.shape, generator=g))
        what = f"{args.config} config, random weights"
    cfg = model.config
    category = args.category if args.category is not None else (cfg.categories[0] if len(cfg.categories) > 1
                                                                  else None)
    n_params = sum(p.numel() for p in model.unet.parameters()) / 1e6
    seeds = list(range(args.seed, args.seed + args.objects))
    few = [int(s) for s in args.steps.split(",") if s.strip()]
    print(f"HoloDiffusion sampling: {what}; U-Net {n_params:.1f} M parameters on a {cfg.encoder.channels} x "
          f"{cfg.grid_size}^3 grid; CPU, {args.threads} thread(s); {args.objects} object(s) per batch")
    per_step = seconds_per_step(model, args.objects)
    print(f"one denoiser call on the batch: {per_step:.3f} s ({per_step / args.objects:.3f} s per object)")

    def run(steps: int, sampler: str) -> Row:
        estimate = per_step * steps
        run_steps = steps if estimate <= args.max_seconds else min(steps, args.extrapolate_steps)
        dt, done, x = sample_timed(model, seeds, category, steps, sampler, run_steps)
        seconds = dt / done * steps / args.objects
        return Row(sampler, steps, seconds, done, x)

    rows = [run(s, args.sampler) for s in few]
    base = run(1000, "ancestral")
    rows.append(base)

    ref = None
    if args.reference_steps:
        t0 = time.perf_counter()
        ref = model.sample(seeds, category, steps=args.reference_steps, sampler="dpm++")
        print(f"reference: dpm++ {args.reference_steps} steps, {(time.perf_counter() - t0) / args.objects:.1f} s "
              "per object")
    if args.model and args.data:
        for r in rows:
            est = per_step / args.objects * r.steps * args.eval_samples
            if est > args.max_seconds * 4:
                print(f"  metrics at {r.sampler} {r.steps} skipped: ~{est:.0f} s of sampling (raise --max-seconds)")
                continue
            r.quality = evaluate_row(args, r.steps, r.sampler)

    ref_name = f"rel. RMSE vs dpm++-{args.reference_steps}" if ref is not None else ""
    head = f"{'sampler':<10} {'steps':>6} {'s/object':>10} {'x 1000-step time':>17} {'speed-up':>9}  {ref_name:>26}"
    if any(r.quality for r in rows):
        head += f"  {'COV':>6} {'MMD':>9} {'1-NNA':>6} {'diversity':>9} {'empty':>5}"
    print(head)
    for r in rows:
        mark = "*" if r.extrapolated else " "
        line = (f"{r.sampler:<10} {r.steps:>6} {r.seconds:>9.2f}{mark} {r.seconds / base.seconds:>17.4f} "
                f"{base.seconds / r.seconds:>8.1f}x")
        q = rel_rmse(r.latent, ref) if ref is not None and r.latent is not None else math.nan
        line += f"  {'-' if math.isnan(q) else f'{q:.4f}':>26}"
        if r.quality:
            m = r.quality
            line += (f"  {_fmt(m['cov'], '.1%'):>6} {_fmt(m['mmd'], '.4g'):>9} {_fmt(m['1nna'], '.1%'):>6} "
                     f"{_fmt(m['diversity'], '.3f'):>9} {m['empty']:>5}")
        print(line)
    notes = []
    for r in rows:
        if r.extrapolated:
            notes.append(f"* {r.sampler} {r.steps}: timed for {r.timed_steps} steps and extrapolated linearly (a full "
                         f"run was estimated at {per_step * r.steps:.0f} s > --max-seconds {args.max_seconds:.0f}); "
                         "no quality number")
    if ref is not None:
        notes.append("rel. RMSE: over the latent (normalised grid) of the same seeds; the ancestral row is stochastic, "
                     "so its distance is sampling noise, not error")
    if any(r.quality for r in rows):
        kinds = {r.quality["kind"] for r in rows if r.quality}
        notes.append(f"metrics: holofusion.evaluate on {args.eval_samples} samples, {'/'.join(sorted(kinds))} Chamfer; "
                     "COV higher, MMD lower, 1-NNA nearer 50% is better")
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
