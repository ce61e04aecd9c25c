"""Noise schedule and samplers: diffusers as the reference implementation, a Gaussian toy with an exact denoiser as
the reference distribution, callbacks, cancellation and per-object noise.

The toy: data x0 ~ N(mu, s^2) per coordinate. Then x_t = alpha_t x0 + sigma_t eps is Gaussian too, and the exact
posterior mean E[x0 | x_t] = mu + alpha_t s^2 (x_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2) is the ideal denoiser:
every sampler driven by it should produce N(mu, s^2). For this data the probability-flow ODE keeps the standardised
value (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) constant, so a deterministic sampler in the many-step limit
maps x_T to mu + s x_T exactly (up to the tiny alpha_T), object by object.
"""

from __future__ import annotations

import math

import pytest
import torch

from holofusion.diffusion import (
    SAMPLERS,
    NoiseSchedule,
    SamplingCancelled,
    per_object_noise,
    sample,
    sample_ancestral,
    sample_ddim,
    sample_dpmpp_2m,
)

MU, S = 1.5, 0.5


def _diffusers():
    """diffusers is the reference implementation (a test-only dependency)."""
    import diffusers  # in the `test` extra: a missing reference must fail, not skip

    return diffusers


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_denoiser(schedule: NoiseSchedule, mu: float = MU, s: float = S, calls: list | None = None):
    """The exact x0 posterior mean for data N(mu, s^2); records (t, x_t) of every call in ``calls``."""
    abar = schedule.alphas_cumprod

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append((int(t[0]), x.clone()))
        a2 = abar[t.long()].to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        a = a2.sqrt()
        return mu + a * s**2 * (x - a * mu) / (a2 * s**2 + 1 - a2)

    return denoise


def exact_flow_map(schedule: NoiseSchedule, x_T: torch.Tensor, mu: float = MU, s: float = S) -> torch.Tensor:
    a2 = float(schedule.alphas_cumprod[-1])
    return mu + s * (x_T - math.sqrt(a2) * mu) / math.sqrt(a2 * s**2 + 1 - a2)


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def toy_noise(objects: int = 8, dim: int = 500, seed: int = 0) -> torch.Tensor:
    """objects x dim samples: 4000 draws of the 1-D toy, with one generator per object (not per draw)."""
    return per_object_noise((objects, dim), generators(range(seed, seed + objects)))


# --------------------------------------------------------------------------------------------------------------------
# schedule


def test_cosine_alphas_cumprod_decrease_from_one_to_zero():
    abar = NoiseSchedule(1000, "cosine").alphas_cumprod
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    assert bool((abar[1:] < abar[:-1]).all())
    assert 0.999 < float(abar[0]) < 1.0
    assert 0.0 < float(abar[-1]) < 1e-6  # ~pure noise at T-1: trailing sampling starts from N(0, 1)
    lin = NoiseSchedule(1000, "linear").alphas_cumprod
    assert bool((lin[1:] < lin[:-1]).all())


@pytest.mark.parametrize("kind, diffusers_name", [("cosine", "squaredcos_cap_v2"), ("linear", "linear")])
def test_betas_match_diffusers(kind, diffusers_name):
    DDPMScheduler = _diffusers().DDPMScheduler

    for n in (1000, 100):
        ours = NoiseSchedule(n, kind).betas
        ref = DDPMScheduler(num_train_timesteps=n, beta_schedule=diffusers_name, beta_start=1e-4, beta_end=0.02).betas
        # diffusers stores float32; ours is float64
        torch.testing.assert_close(ours.float(), ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 25, 50, 64, 333, 999, 1000])
def test_trailing_timesteps_match_diffusers(steps):
    d = _diffusers()
    DDIMScheduler, DPMSolverMultistepScheduler = d.DDIMScheduler, d.DPMSolverMultistepScheduler

    ours = NoiseSchedule(1000).timesteps(steps)
    assert len(ours) == steps and ours[0] == 999 and ours == sorted(set(ours), reverse=True)
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    assert ours == ddim.timesteps.tolist()
    dpm = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                      timestep_spacing="trailing")
    dpm.set_timesteps(steps)
    assert ours == dpm.timesteps.tolist()


def test_timesteps_reject_bad_counts():
    with pytest.raises(ValueError):
        NoiseSchedule(1000).timesteps(0)
    with pytest.raises(ValueError):
        NoiseSchedule(1000).timesteps(1001)
    with pytest.raises(ValueError):
        NoiseSchedule(1000, "sigmoid")


def test_forward_process_and_v_target_are_consistent():
    sch = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = sch.q_sample(x0, t, eps)
    torch.testing.assert_close(sch.x0_from_v(x_t, t, sch.v_target(x0, t, eps)), x0, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# samplers against diffusers


def _run_diffusers(scheduler, denoise, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, list]:
    calls = []
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        calls.append((int(t), x.clone()))
        x0 = denoise(x, t.expand(x.shape[0]))
        x = scheduler.step(x0, t, x).prev_sample
    return x, calls


def _compare(ours_calls, ours_out, ref_calls, ref_out):
    assert [t for t, _ in ours_calls] == [t for t, _ in ref_calls]
    for (t, a), (_, b) in zip(ours_calls, ref_calls):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"x_t at t={t}: {m}")
    torch.testing.assert_close(ours_out, ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_ddim_matches_diffusers(steps):
    """DDIM, eta = 0, x0 prediction, trailing spacing. Conventions: diffusers' ``set_alpha_to_one=True`` is our final
    step to abar = 1 (the last step returns x0 itself); ``clip_sample=False`` (we never clip). diffusers steps to
    t - T // steps, which is the next trailing timestep only when ``steps`` divides T, hence 10, 25, 50."""
    DDIMScheduler = _diffusers().DDIMScheduler

    sch = NoiseSchedule(1000, "cosine")
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing",
                        prediction_type="sample", clip_sample=False, set_alpha_to_one=True, thresholding=False)
    x_T = toy_noise(2, 64)
    ours_calls: list = []
    ours = sample_ddim(gaussian_denoiser(sch, calls=ours_calls), x_T.clone(), sch, steps)
    ref_out, ref_calls = _run_diffusers(ref, gaussian_denoiser(sch), x_T.clone(), steps)
    _compare(ours_calls, ours, ref_calls, ref_out)


@pytest.mark.parametrize("steps", [5, 10, 20, 25])
def test_dpmpp_2m_matches_diffusers(steps):
    """DPM-Solver++(2M), x0 prediction, trailing spacing, midpoint form (diffusers' default ``solver_type``).
    ``final_sigmas_type="zero"``: diffusers' last step is first order to sigma = 0, i.e. it returns the last x0
    prediction, which is exactly our last step; the whole trajectory coincides."""
    DPMSolverMultistepScheduler = _diffusers().DPMSolverMultistepScheduler

    sch = NoiseSchedule(1000, "cosine")
    ref = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                      timestep_spacing="trailing", prediction_type="sample",
                                      algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                      final_sigmas_type="zero", lower_order_final=True, thresholding=False,
                                      use_karras_sigmas=False)
    x_T = toy_noise(2, 64)
    ours_calls: list = []
    ours = sample_dpmpp_2m(gaussian_denoiser(sch, calls=ours_calls), x_T.clone(), sch, steps)
    ref_out, ref_calls = _run_diffusers(ref, gaussian_denoiser(sch), x_T.clone(), steps)
    _compare(ours_calls, ours, ref_calls, ref_out)


# --------------------------------------------------------------------------------------------------------------------
# samplers on the Gaussian toy


def test_ancestral_1000_steps_gives_the_data_distribution():
    sch = NoiseSchedule()
    x_T = toy_noise()  # 4000 draws
    y = sample_ancestral(gaussian_denoiser(sch), x_T, sch, None, generators(range(100, 108)))
    n = y.numel()
    # 4 standard errors: mean s / sqrt(n), std s / sqrt(2 n)
    assert abs(float(y.mean()) - MU) < 4 * S / math.sqrt(n)
    assert abs(float(y.std()) - S) < 4 * S / math.sqrt(2 * n)
    # stochastic: the result is not the deterministic flow map of its starting noise
    assert float((y - exact_flow_map(sch, x_T)).std()) > 0.1 * S


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_deterministic_samplers_converge_to_the_flow_map(sampler):
    sch = NoiseSchedule()
    x_T = toy_noise()
    exact = exact_flow_map(sch, x_T)
    err = {steps: float((sample(gaussian_denoiser(sch), x_T, sch, sampler, steps) - exact).pow(2).mean().sqrt())
           for steps in (10, 25, 50, 1000)}
    if sampler == "ddim":  # first order: the error halves as the steps double
        assert err[10] > err[25] > err[50] > err[1000]
        assert err[1000] < 2e-3
    else:  # second order: far smaller, but its sign flips with the step count, so it need not fall monotonically
        assert max(err[25], err[50]) < 0.05 * err[10]
        assert err[1000] < 1e-4


# Relative std error allowed at 10 and 25 steps. Measured on this toy: DDIM 15% / 6.5% (one big first step from
# abar ~ 2e-9 is what costs it), DPM-Solver++(2M) 5% / 0.4%.
FEW_STEP_STD_TOL = {("ddim", 10): 0.20, ("ddim", 25): 0.09, ("dpm++", 10): 0.08, ("dpm++", 25): 0.02}


@pytest.mark.parametrize("sampler, steps", sorted(FEW_STEP_STD_TOL))
def test_few_step_samplers_are_close_to_the_data_distribution(sampler, steps):
    sch = NoiseSchedule()
    x_T = toy_noise()
    # compare with what the exact map does to these very draws, so the tolerance measures the solver, not the draws
    target = exact_flow_map(sch, x_T)
    y = sample(gaussian_denoiser(sch), x_T, sch, sampler, steps)
    assert abs(float(y.mean()) - float(target.mean())) < 0.01
    assert abs(float(y.std()) / float(target.std()) - 1) < FEW_STEP_STD_TOL[(sampler, steps)]
    assert abs(float(target.std()) - S) < 4 * S / math.sqrt(2 * y.numel())  # the draws themselves are fair


# --------------------------------------------------------------------------------------------------------------------
# callbacks, cancellation, per-object noise


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_callback_sees_every_step(sampler):
    sch = NoiseSchedule()
    seen = []

    def callback(step, total, x0):
        seen.append((step, total, tuple(x0.shape)))
        return None  # None means "go on", like True

    sample(gaussian_denoiser(sch), toy_noise(2, 5), sch, sampler, 7, generators([1, 2]), callback)
    assert seen == [(i, 7, (2, 5)) for i in range(1, 8)]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_callback_returning_false_stops_the_run(sampler):
    sch = NoiseSchedule()
    calls = []
    steps_seen = []

    def callback(step, total, x0):
        steps_seen.append(step)
        return step < 3

    with pytest.raises(SamplingCancelled, match="after step 3 of 10"):
        sample(gaussian_denoiser(sch, calls=calls), toy_noise(2, 5), sch, sampler, 10, generators([1, 2]), callback)
    assert steps_seen == [1, 2, 3]
    assert len(calls) == 3  # no denoiser evaluation after the cancelling step


def test_per_object_noise_depends_on_its_generator_only():
    a = per_object_noise((2, 3, 4), generators([11, 22]))
    b = per_object_noise((1, 3, 4), generators([22]))
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="one generator per object"):
        per_object_noise((3, 4), generators([1, 2]))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampled_object_depends_on_its_seed_only(sampler):
    sch = NoiseSchedule()
    den = gaussian_denoiser(sch)

    def run(seeds):
        gens = generators(seeds)
        return sample(den, per_object_noise((len(seeds), 6), gens), sch, sampler, 20, gens)

    pair, alone = run([5, 9]), run([9])
    assert torch.equal(pair[1], alone[0])
    assert torch.equal(run([5, 9]), pair)  # and the same seeds give the same result


def test_sampler_argument_errors():
    sch = NoiseSchedule()
    den = gaussian_denoiser(sch)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(den, torch.zeros(1, 2), sch, "euler", 5)
    with pytest.raises(ValueError, match="generator"):
        sample_ancestral(den, torch.zeros(1, 2), sch, 5)
    with pytest.raises(ValueError, match="generator"):
        sample_ddim(den, torch.zeros(1, 2), sch, 5, eta=1.0)


def test_ddim_with_eta_one_is_stochastic_and_reproducible():
    sch = NoiseSchedule()
    den = gaussian_denoiser(sch)
    x_T = toy_noise()
    a = sample_ddim(den, x_T, sch, 50, generators(range(8)), eta=1.0)
    b = sample_ddim(den, x_T, sch, 50, generators(range(8)), eta=1.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, sample_ddim(den, x_T, sch, 50))
    assert abs(float(a.mean()) - MU) < 0.05 and abs(float(a.std()) - S) < 0.1 * S


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_fresh_noise_of_stochastic_samplers_goes_through_shape_noise(sampler):
    """A model whose forward process noises some channels object-wide must get fresh noise of that structure in
    every stochastic step: here a shaper that removes the noise altogether makes the result independent of the
    generators, which it is not without the shaper."""
    sch = NoiseSchedule()
    den = gaussian_denoiser(sch)
    x_T = toy_noise()

    def run(seeds, shaper):
        if sampler == "ancestral":
            return sample_ancestral(den, x_T, sch, 40, generators(seeds), shape_noise=shaper)
        return sample_ddim(den, x_T, sch, 40, generators(seeds), eta=1.0, shape_noise=shaper)

    assert not torch.equal(run(range(8), None), run(range(50, 58), None))
    assert torch.equal(run(range(8), torch.zeros_like), run(range(50, 58), torch.zeros_like))
    if sampler == "ancestral":  # and sample() passes it on
        assert torch.equal(sample(den, x_T, sch, sampler, 40, generators(range(8)), shape_noise=torch.zeros_like),
                           run(range(50, 58), torch.zeros_like))
