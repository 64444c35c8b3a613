"""Heun sampler: diffusers parity, the repeated-timestep protocol, second-order accuracy, a Gaussian oracle."""

import math

import numpy as np
import pytest
from fixtures.cases_samplers_kdiff import fake_model, parity_errors
from helpers import SOURCES, reference, sample_loop, sigma_gaussian_oracle
from hypothesis import given
from hypothesis import strategies as st

from diffusion_np.samplers.euler import EulerSampler
from diffusion_np.samplers.heun import HeunSampler

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(params=SOURCES, scope="module")
def diffusers_cases(request):
    return {k: v for k, v in reference("samplers_kdiff", request.param).items() if str(v["kind"]) == "heun"}


def test_heun_full_loops_match_diffusers(diffusers_cases):
    assert len(diffusers_cases) >= 9
    for name, case in diffusers_cases.items():
        for what, (error, bar) in parity_errors(case, HeunSampler).items():
            assert error <= bar, f"{name}: {what} differs from diffusers by {error:.2e} (bar {bar:.0e})"


@given(
    steps=st.integers(1, 60),
    spacing=st.sampled_from(["linspace", "leading", "trailing"]),
    karras=st.booleans(),
)
def test_heun_repeats_timesteps_and_sigmas(steps, spacing, karras):
    heun = HeunSampler(timestep_spacing=spacing, use_karras_sigmas=karras)  # diffusers default betas
    heun.set_timesteps(steps)
    euler = EulerSampler(beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing, use_karras_sigmas=karras)
    euler.set_timesteps(steps)
    # t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}  and  s_0, s_1, s_1, ..., s_{N-1}, s_{N-1}, 0
    assert heun.timesteps.shape == (2 * steps - 1,) and heun.sigmas.shape == (2 * steps,)
    np.testing.assert_array_equal(heun.timesteps[::2], euler.timesteps)
    np.testing.assert_array_equal(heun.timesteps[1::2], euler.timesteps[1:])
    np.testing.assert_array_equal(heun.sigmas[::2], euler.sigmas[:-1])
    np.testing.assert_array_equal(heun.sigmas[1::2], euler.sigmas[1:])
    # the distinct sigmas strictly decrease and end at 0
    assert heun.sigmas[-1] == 0.0 and np.all(np.diff(euler.sigmas) < 0)


def test_heun_alternates_predictor_and_corrector():
    sampler = HeunSampler(**SD)
    sampler.set_timesteps(4)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32) * np.float32(sampler.init_noise_sigma)
    calls, states = 0, []
    for t in sampler.timesteps:
        states.append(sampler.state_in_first_order)
        x_in = sampler.scale_model_input(x, t)
        calls += 1
        x = sampler.step(fake_model(x_in, t), t, x).prev_sample
    assert calls == 2 * 4 - 1  # N steps, 2N - 1 model evaluations
    assert states == [True, False, True, False, True, False, True]
    assert x.dtype == np.float32
    # after the final Euler step to sigma = 0 the predictor state is left, as in diffusers; set_timesteps clears it
    assert not sampler.state_in_first_order
    sampler.set_timesteps(4)
    assert sampler.state_in_first_order and sampler.step_index is None


def test_heun_is_second_order_where_euler_is_first():
    """Exact ODE solution for N(0, s^2) data: x(sigma) = x(sigma_0) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_0^2)."""
    s, x_init = 0.5, np.ones(1)

    def error(cls, steps):
        sampler = cls(**SD)
        sampler.set_timesteps(steps)
        s0 = sampler.sigmas[0]
        exact = sampler.init_noise_sigma * s / math.sqrt(s**2 + s0**2)
        return abs(float(sample_loop(sampler, sigma_gaussian_oracle(sampler, s), x_init)[0]) - exact)

    euler = [error(EulerSampler, n) for n in (10, 20, 40)]
    heun = [error(HeunSampler, n) for n in (10, 20)]
    assert 1.6 < euler[0] / euler[1] < 2.4 and 1.6 < euler[1] / euler[2] < 2.4  # halving the step halves the error
    assert heun[0] / heun[1] > 3.5  # ... and quarters it for Heun
    assert heun[1] < euler[2] / 5  # Heun with 39 model calls beats Euler with 40 by far


def test_gaussian_oracle_recovers_data_std():
    # 30 Karras steps: discretisation bias < 0.2%; 32000 values give a std error of 0.4%
    s = 0.5
    sampler = HeunSampler(**SD, use_karras_sigmas=True)
    sampler.set_timesteps(30)
    out = sample_loop(sampler, sigma_gaussian_oracle(sampler, s), np.random.default_rng(0).standard_normal((4000, 8)))
    assert abs(out.std() / s - 1) < 0.015, out.std()


def test_heun_clip_sample_and_bad_usage():
    sampler = HeunSampler(**SD, clip_sample=True, clip_sample_range=0.25, prediction_type="sample")
    sampler.set_timesteps(3)
    x = np.full((1, 2), 3.0, np.float32)
    out = sampler.step(np.full_like(x, 10.0), sampler.timesteps[0], x)
    np.testing.assert_array_equal(out.pred_original_sample, np.full_like(x, 0.25))
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        HeunSampler(prediction_type="noise")
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        HeunSampler().scale_model_input(x, 999.0)
    sampler.set_timesteps(3)
    with pytest.raises(ValueError, match="expected timestep"):
        sampler.step(x, sampler.timesteps[0], x)
        sampler.step(x, sampler.timesteps[0], x)  # the corrector expects t_1, not t_0 again


@pytest.mark.gpu
def test_cupy_matches_numpy():
    import cupy

    x_init = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    outs = []
    for xp in (np, cupy):
        sampler = HeunSampler(**SD, use_karras_sigmas=True)
        sampler.set_timesteps(5)
        x = xp.asarray(x_init) * sampler.init_noise_sigma
        for t in sampler.timesteps:
            x = sampler.step(xp.tanh(0.5 * sampler.scale_model_input(x, t) + float(t) / 1000), t, x).prev_sample
        assert isinstance(x, xp.ndarray) and x.dtype == np.float32
        outs.append(cupy.asnumpy(x) if xp is cupy else x)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
