"""Noise schedules, training targets and samplers for denoising diffusion (variance-preserving, discrete time).

Notation (Ho et al. 2020; Salimans & Ho 2022): for t in {0, ..., T-1}, ``x_t = alpha_t x_0 + sigma_t eps`` with
``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``; the velocity target is ``v = alpha_t eps - sigma_t x_0``.

A *denoiser* here is any function ``denoise(x_t, t) -> x0_hat`` (t an integer tensor of shape (B,)); how a network
is preconditioned to produce x0 lives with the model, not here. Samplers are plain functions
``sample_*(denoise, x_T, schedule, steps, generators, callback)``: every object in a batch draws its noise from its
own ``torch.Generator`` so that an object depends on its seed alone, whatever else shares the batch. The callback
receives ``(step, total, x0_hat)`` after each step and stops the run by returning False (``SamplingCancelled``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "NoiseSchedule",
    "SamplingCancelled",
    "Denoiser",
    "StepCallback",
    "SAMPLERS",
    "per_object_noise",
    "sample",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_ancestral",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int, Tensor], bool | None]
NoiseShaper = Callable[[Tensor], Tensor]
"""Maps standard normal noise to the structure a model's forward process uses (e.g. one value per object)."""
SAMPLERS = ("ddim", "dpm++", "ancestral")


class SamplingCancelled(RuntimeError):
    """Raised when a step callback returns False."""


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete variance-preserving schedule of ``num_steps`` steps.

    ``kind`` is "cosine" (Nichol & Dhariwal 2021, s = 0.008, betas clipped at 0.999) or "linear" (Ho et al. 2020,
    betas 1e-4 .. 0.02).
    """

    num_steps: int = 1000
    kind: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "linear"):
            raise ValueError(f"schedule kind {self.kind!r} is unknown; use 'cosine' or 'linear'")
        if self.num_steps < 2:
            raise ValueError(f"num_steps must be at least 2; got {self.num_steps}")

    @property
    def betas(self) -> Tensor:
        n = self.num_steps
        if self.kind == "linear":
            return torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
        s = 0.008
        f = torch.cos((torch.arange(n + 1, dtype=torch.float64) / n + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)

    @property
    def alphas_cumprod(self) -> Tensor:
        """(T,) abar_t, float64."""
        return torch.cumprod(1 - self.betas, 0)

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t and sigma_t for integer steps ``t`` (B,), shaped to broadcast against ``like`` (B, ...)."""
        abar = self.alphas_cumprod.to(like.device)[t.long()].to(like.dtype)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar.sqrt().reshape(shape), (1 - abar).sqrt().reshape(shape)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Forward process: x_t = alpha_t x0 + sigma_t eps."""
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise

    def v_target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t, x0)
        return a * noise - s * x0

    def x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t, x_t)
        return a * x_t - s * v

    def timesteps(self, steps: int, start: int | None = None) -> list[int]:
        """``steps`` decreasing integer steps from T-1 (or ``start``) to 0, evenly spaced ("trailing" spacing, which
        starts sampling at pure noise; Lin et al. 2024, "Common diffusion noise schedules and sample steps are
        flawed"). A ``start`` below T-1 continues from a partly noised image (SDEdit, Meng et al. 2022)."""
        n = self.num_steps if start is None else int(start) + 1
        if start is not None and not 0 <= start < self.num_steps:
            raise ValueError(f"start must be in 0..{self.num_steps - 1}; got {start}")
        if not 1 <= steps <= n:
            raise ValueError(f"steps must be in 1..{n}; got {steps}")
        return [int(round(n - i * n / steps)) - 1 for i in range(steps)]


def per_object_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device=None,
                     dtype=torch.float32) -> Tensor:
    """Standard normal noise of ``shape`` = (B, ...), object b drawn from ``generators[b]`` alone.

    Noise is drawn on the CPU and moved, so the same seed gives the same object on every device.
    """
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per object: {shape[0]} objects, {len(generators)} generators")
    out = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in generators])
    return out.to(device=device, dtype=dtype)


def _fresh_noise(x: Tensor, generators: Sequence[torch.Generator], shape_noise: NoiseShaper | None) -> Tensor:
    noise = per_object_noise(x.shape, generators, x.device, x.dtype)
    return shape_noise(noise) if shape_noise is not None else noise


def _report(callback: StepCallback | None, i: int, total: int, x0: Tensor) -> None:
    if callback is not None and callback(i + 1, total, x0) is False:
        raise SamplingCancelled(f"sampling stopped by the callback after step {i + 1} of {total}")


def _t(step: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)


@torch.no_grad()
def sample_ddim(denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, steps: int = 25,
                generators: Sequence[torch.Generator] | None = None, callback: StepCallback | None = None,
                eta: float = 0.0, start: int | None = None, shape_noise: NoiseShaper | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12). ``eta = 0`` is deterministic; ``eta > 0`` needs ``generators``.
    ``start``: x is a sample at that step rather than pure noise (see ``NoiseSchedule.timesteps``).
    ``shape_noise`` maps each fresh standard normal draw to the noise the model was trained with."""
    ts = schedule.timesteps(steps, start)
    abar = schedule.alphas_cumprod
    for i, t in enumerate(ts):
        x0 = denoise(x, _t(t, x))
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        eps = (x - a_t.sqrt().to(x.dtype) * x0) / (1 - a_t).sqrt().to(x.dtype)
        sig = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp_min(0).sqrt()
        x = a_prev.sqrt().to(x.dtype) * x0 + (1 - a_prev - sig**2).clamp_min(0).sqrt().to(x.dtype) * eps
        if eta > 0 and i + 1 < len(ts):
            if generators is None:
                raise ValueError("DDIM with eta > 0 draws noise: pass one generator per object")
            x = x + sig.to(x.dtype) * _fresh_noise(x, generators, shape_noise)
        _report(callback, i, len(ts), x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, steps: int = 20,
                    generators: Sequence[torch.Generator] | None = None,
                    callback: StepCallback | None = None, start: int | None = None) -> Tensor:
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022, Algorithm 2).

    Deterministic; ``generators`` is accepted for a uniform sampler signature and unused. ``start`` as in DDIM.
    """
    ts = schedule.timesteps(steps, start)
    abar = schedule.alphas_cumprod
    alpha = abar.sqrt()
    sigma = (1 - abar).sqrt()
    lam = torch.log(alpha / sigma)
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        x0 = denoise(x, _t(t, x))
        if i + 1 == len(ts):
            # Last step lands on t = 0 where sigma is ~0: return the data prediction itself.
            x = x0
        else:
            s = ts[i + 1]
            h = lam[s] - lam[t]
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)).to(x.dtype) * x0 - (1 / (2 * r)).to(x.dtype) * x0_prev
            x = (sigma[s] / sigma[t]).to(x.dtype) * x - (alpha[s] * torch.expm1(-h)).to(x.dtype) * d
            x0_prev, h_prev = x0, h
        _report(callback, i, len(ts), x0)
    return x


@torch.no_grad()
def sample_ancestral(denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, steps: int | None = None,
                     generators: Sequence[torch.Generator] | None = None,
                     callback: StepCallback | None = None, start: int | None = None,
                     shape_noise: NoiseShaper | None = None) -> Tensor:
    """The DDPM ancestral sampler (Ho et al. 2020, Algorithm 2) with the posterior mean computed from x0_hat.

    With ``steps`` = T (the default) this is the reference 1000-step sampler of the original HoloDiffusion release;
    fewer steps use the respaced schedule (Nichol & Dhariwal 2021).
    """
    if generators is None:
        raise ValueError("the ancestral sampler draws noise: pass one generator per object")
    ts = schedule.timesteps(steps or (schedule.num_steps if start is None else start + 1), start)
    abar = schedule.alphas_cumprod
    for i, t in enumerate(ts):
        x0 = denoise(x, _t(t, x))
        if i + 1 == len(ts):
            x = x0
        else:
            s = ts[i + 1]
            a_t, a_s = abar[t], abar[s]
            beta = 1 - a_t / a_s  # the respaced step's beta
            c0 = (a_s.sqrt() * beta / (1 - a_t)).to(x.dtype)
            ct = ((1 - beta).sqrt() * (1 - a_s) / (1 - a_t)).to(x.dtype)
            var = (beta * (1 - a_s) / (1 - a_t)).clamp_min(1e-20)
            x = c0 * x0 + ct * x + var.sqrt().to(x.dtype) * _fresh_noise(x, generators, shape_noise)
        _report(callback, i, len(ts), x0)
    return x


def sample(denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, sampler: str = "dpm++", steps: int = 20,
           generators: Sequence[torch.Generator] | None = None, callback: StepCallback | None = None,
           start: int | None = None, shape_noise: NoiseShaper | None = None) -> Tensor:
    """Runs the named sampler: "ddim" (10-50 steps), "dpm++" (DPM-Solver++(2M), 10-25 steps) or "ancestral".

    ``start``: x is a noised sample at that step (SDEdit) rather than pure noise at T-1. ``shape_noise``: see
    ``sample_ddim`` (the caller shapes the initial x itself)."""
    if sampler == "ddim":
        return sample_ddim(denoise, x, schedule, steps, generators, callback, start=start, shape_noise=shape_noise)
    if sampler == "dpm++":
        return sample_dpmpp_2m(denoise, x, schedule, steps, generators, callback, start=start)
    if sampler == "ancestral":
        return sample_ancestral(denoise, x, schedule, steps, generators, callback, start=start,
                                shape_noise=shape_noise)
    raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
