"""DPM-Solver++ (1 and 2M): diffusers parity, its spacing, pitfall 8 (end at sigma = 0), DDIM equivalence, oracles."""

import math

import numpy as np
import pytest
from fixtures.cases_samplers_kdiff import parity_errors
from helpers import SOURCES, reference, sample_loop
from hypothesis import given
from hypothesis import strategies as st

from diffusion_np.diffusion import x0_and_eps
from diffusion_np.samplers.dpm_solver import DPMSolverMultistepSampler
from diffusion_np.samplers.unipc import UniPCSampler

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(params=SOURCES, scope="module")
def diffusers_cases(request):
    return {k: v for k, v in reference("samplers_kdiff", request.param).items() if str(v["kind"]).startswith("dpm")}


def test_dpm_solver_full_loops_match_diffusers(diffusers_cases):
    assert len(diffusers_cases) >= 16
    for name, case in diffusers_cases.items():
        for what, (error, bar) in parity_errors(case, DPMSolverMultistepSampler).items():
            assert error <= bar, f"{name}: {what} differs from diffusers by {error:.2e} (bar {bar:.0e})"


def test_dpm_solver_spacing_lays_out_n_plus_1_points():
    # diffusers' DPM-Solver convention: N + 1 points, the last (t = 0) dropped
    sampler = DPMSolverMultistepSampler(timestep_spacing="linspace")
    sampler.set_timesteps(10)  # round(linspace(0, 999, 11)): 499.5 rounds to even, 599.4 down
    assert sampler.timesteps.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    sampler = DPMSolverMultistepSampler(timestep_spacing="leading", steps_offset=1)
    sampler.set_timesteps(10)  # step ratio 1000 // 11 = 90
    assert sampler.timesteps.tolist() == [901, 811, 721, 631, 541, 451, 361, 271, 181, 91]
    sampler = DPMSolverMultistepSampler(timestep_spacing="trailing")
    sampler.set_timesteps(10)
    assert sampler.timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert sampler.timesteps.dtype == np.int64


@given(
    steps=st.integers(1, 200),
    spacing=st.sampled_from(["linspace", "leading", "trailing"]),
    karras=st.booleans(),
    schedule=st.sampled_from(["linear", "scaled_linear"]),
)
def test_dpm_sigmas_strictly_decrease_to_exactly_zero(steps, spacing, karras, schedule):
    sampler = DPMSolverMultistepSampler(beta_schedule=schedule, timestep_spacing=spacing, use_karras_sigmas=karras)
    sampler.set_timesteps(steps)
    sig = sampler.sigmas
    assert sig.shape == (steps + 1,) and sig[-1] == 0.0
    assert np.all(np.diff(sig) < 0)
    if karras and steps > 1:  # EDM Eq. (5) over the whole training range, whatever the spacing
        np.testing.assert_allclose([sig[0], sig[-2]], [sampler.train_sigmas[-1], sampler.train_sigmas[0]],
                                   rtol=1e-12)


def test_pitfall8_dpm_solver_ends_at_sigma_zero_and_returns_x0():
    """With an exact x0 oracle, the last (first-order) step to sigma = 0 lands exactly on x0.

    Stopping at sigma_min instead (final_sigmas_type="sigma_min") leaves sigma_min's worth of noise.
    """
    x0 = np.random.default_rng(0).standard_normal((3, 4, 4, 2))
    x_init = np.random.default_rng(1).standard_normal(x0.shape)

    def oracle(sampler):  # eps of a point mass at x0: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
        ab = sampler.alpha_bar
        return lambda x_t, t: (x_t - math.sqrt(ab[t]) * x0) / math.sqrt(1.0 - ab[t])

    for order in (1, 2):
        sampler = DPMSolverMultistepSampler(**SD, solver_order=order)
        sampler.set_timesteps(20)
        assert sampler.sigmas[-1] == 0.0
        out = sample_loop(sampler, oracle(sampler), x_init)
        np.testing.assert_allclose(out, x0, rtol=0, atol=1e-12)
    noisy = DPMSolverMultistepSampler(**SD, final_sigmas_type="sigma_min")
    noisy.set_timesteps(20)
    assert noisy.sigmas[-1] == pytest.approx(0.02917, abs=1e-5)  # sigma_min of SD's schedule (REFERENCE)
    residual = sample_loop(noisy, oracle(noisy), x_init) - x0
    assert residual.std() > 0.01  # about sigma_min * alpha of noise is left in the "clean" sample


def test_first_order_step_is_ddim():
    """DPM-Solver++(1) from s to t equals DDIM (eta = 0): x_t = sqrt(ab_t) x0_pred + sqrt(1 - ab_t) eps_pred."""
    sampler = DPMSolverMultistepSampler(**SD, solver_order=1, prediction_type="v_prediction")
    sampler.set_timesteps(10)
    rng = np.random.default_rng(0)
    x, model_output = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))
    t, t_next = sampler.timesteps[3], sampler.timesteps[4]
    sampler._step_index = 3
    out = sampler.step(model_output, t, x)
    x0, eps = x0_and_eps(model_output, x, t, sampler.alpha_bar, "v_prediction")
    ab_next = sampler.alpha_bar[t_next]
    np.testing.assert_allclose(out.prev_sample, math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * eps, rtol=1e-12)
    np.testing.assert_allclose(out.pred_original_sample, x0, rtol=1e-12)


def test_gaussian_oracle_second_order_recovers_data_std():
    # data N(0, s^2 I), exact eps*(x_t) = x_t sqrt(1-ab) / (ab s^2 + 1 - ab); 32000 values: std error 0.4%
    s = 0.5

    def model(x_t, t):
        ab = sampler.alpha_bar[t]
        return x_t * (math.sqrt(1.0 - ab) / (ab * s**2 + 1.0 - ab))

    x_init = np.random.default_rng(0).standard_normal((4000, 8))
    errors = {}
    for order in (1, 2):
        sampler = DPMSolverMultistepSampler(**SD, solver_order=order, use_karras_sigmas=True)
        sampler.set_timesteps(30)
        errors[order] = abs(sample_loop(sampler, model, x_init).std() / s - 1)
    assert errors[2] < 0.015, errors
    assert errors[2] < errors[1] / 5, errors  # the multistep correction is what buys the accuracy


def test_dpm_solver_works_on_x_t_and_keeps_float32():
    sampler = DPMSolverMultistepSampler(**SD)
    sampler.set_timesteps(5)
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    assert sampler.init_noise_sigma == 1.0
    assert sampler.scale_model_input(x, sampler.timesteps[0]) is x
    for t in sampler.timesteps:
        x = sampler.step(np.tanh(0.5 * x + float(t) / 1000), t, x).prev_sample
        assert x.dtype == np.float32
    # add_noise at an inference timestep: sqrt(ab) x0 + sqrt(1 - ab) noise
    t = sampler.timesteps[2]
    ab = sampler.alpha_bar[t]
    np.testing.assert_allclose(sampler.add_noise(np.ones(3), np.full(3, 2.0), t),
                               np.full(3, math.sqrt(ab) + 2 * math.sqrt(1 - ab)), rtol=1e-12)


def test_dpm_solver_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="solver_order must be 1 or 2"):
        DPMSolverMultistepSampler(solver_order=3)
    with pytest.raises(ValueError, match="only 'dpmsolver\\+\\+'"):
        DPMSolverMultistepSampler(algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="epsilon prediction cannot"):
        DPMSolverMultistepSampler(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 1000\]"):
        DPMSolverMultistepSampler().set_timesteps(0)
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        DPMSolverMultistepSampler(timestep_spacing="uniform").set_timesteps(10)


def test_layouts_that_would_repeat_or_leave_the_timestep_range_are_refused():
    # diffusers runs each of these and steps twice at one timestep, or at timestep T or -1 (sigma_max again)
    with pytest.raises(ValueError, match="num_inference_steps=30 is too many for 'linspace'"):
        DPMSolverMultistepSampler(num_train_timesteps=30).set_timesteps(30)  # 31 points on 30 timesteps
    with pytest.raises(ValueError, match="steps_offset=1 with 29 leading steps of 1 reaches timestep 30"):
        DPMSolverMultistepSampler(num_train_timesteps=30, timestep_spacing="leading", steps_offset=1).set_timesteps(29)
    clipped = DPMSolverMultistepSampler(num_train_timesteps=30, beta_schedule="squaredcos_cap_v2",
                                        timestep_spacing="trailing", lambda_min_clipped=-5.1)  # fmt: skip
    with pytest.raises(ValueError, match="reach timestep -1"):
        clipped.set_timesteps(22)  # the range ends at 29, and 22 steps of 30/22 overshoot 0


@pytest.mark.parametrize("cls", [DPMSolverMultistepSampler, UniPCSampler])
def test_a_step_of_length_zero_is_the_identity(cls):
    # trailing ends at t = 0, and final_sigmas_type="sigma_min" ends at sigma_0 too: h = 0 on the last step,
    # where a second-order update would divide by h (diffusers' gives the identity in the limit)
    sampler = cls(num_train_timesteps=30, timestep_spacing="trailing", final_sigmas_type="sigma_min",
                  lower_order_final=False, solver_order=2)  # fmt: skip
    sampler.set_timesteps(24)
    assert sampler.sigmas[-1] == sampler.sigmas[-2]
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 3))
    for t in sampler.timesteps:
        before = x
        x = sampler.step(np.tanh(0.5 * x + float(t) / 30), t, x).prev_sample
    assert np.all(np.isfinite(x))
    if cls is DPMSolverMultistepSampler:  # (UniPC's last call still corrects the step before it)
        np.testing.assert_array_equal(x, before)


@pytest.mark.gpu
def test_cupy_matches_numpy():
    import cupy

    x_init = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    outs = []
    for xp in (np, cupy):
        sampler = DPMSolverMultistepSampler(**SD, use_karras_sigmas=True)
        sampler.set_timesteps(6)
        x = xp.asarray(x_init)
        for t in sampler.timesteps:
            x = sampler.step(xp.tanh(0.5 * sampler.scale_model_input(x, t) + float(t) / 1000), t, x).prev_sample
        assert isinstance(x, xp.ndarray) and x.dtype == np.float32
        outs.append(cupy.asnumpy(x) if xp is cupy else x)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
