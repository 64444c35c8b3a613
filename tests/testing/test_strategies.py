"""diffusion_np.testing: the strategies draw what they promise, and each invariant catches a wrong implementation."""

import doctest

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import diffusion_np.testing.invariants as invariants
from diffusion_np.diffusion import posterior_variance, q_sample, x0_and_eps
from diffusion_np.samplers.timesteps import SPACINGS, make_timesteps
from diffusion_np.schedules import NoiseSchedule
from diffusion_np.testing import (
    check_alpha_bar,
    check_conversions_roundtrip,
    check_forward_variance,
    check_posterior_variance,
    check_timesteps,
)
from diffusion_np.testing.strategies import (
    SCHEDULE_KINDS,
    images,
    inference_steps,
    noise_schedules,
    schedule_configs,
    timestep_sequences,
    trained_betas,
)

LINEAR = NoiseSchedule.from_config()

# --------------------------------------------------------------------------- strategies


@given(schedule_configs(zero_terminal_snr=None))
def test_schedule_configs_are_valid(config):
    assert config["beta_schedule"] in SCHEDULE_KINDS
    assert 1e-5 <= config["beta_start"] <= config["beta_end"] <= 0.05
    assert (2 if config["rescale_betas_zero_snr"] else 1) <= config["num_train_timesteps"] <= 1000
    schedule = NoiseSchedule.from_config(**config)
    check_alpha_bar(schedule.alpha_bar, allow_zero_terminal=config["rescale_betas_zero_snr"])


@given(noise_schedules(zero_terminal_snr=True))
def test_noise_schedules_with_zero_terminal_snr(schedule):
    assert schedule.alpha_bar[-1] == 0.0


@given(trained_betas())
def test_trained_betas_build_a_schedule(betas):
    np.testing.assert_array_equal(NoiseSchedule(betas).betas, betas)


@given(inference_steps())
def test_inference_steps_are_accepted(config):
    T, N, spacing, offset = config
    assert 1 <= N <= T and spacing in SPACINGS and offset in (0, 1)
    make_timesteps(N, T, spacing, offset)  # must not raise


@given(st.integers(1, 300).flatmap(lambda T: st.tuples(st.just(T), timestep_sequences(T))))
def test_timestep_sequences_are_valid(T_ts):
    T, ts = T_ts
    check_timesteps(ts, T, ts.size)


@given(images())
def test_images_are_small_float32_in_range(x):
    assert x.dtype == np.float32 and x.ndim == 4 and x.size <= 3 * 5 * 5 * 3
    assert np.all(np.abs(x) <= 1)


@given(images(quantized=True, dtype=np.float64))
def test_quantized_images_lie_on_the_256_levels(x):
    k = (x + 1) * 127.5
    np.testing.assert_allclose(k, np.round(k), atol=1e-9)


# --------------------------------------------------------------------------- invariants catch wrong code


def test_module_docstring_example_runs():
    result = doctest.testmod(invariants, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0


def test_alpha_bar_cumsum_instead_of_cumprod_fails():
    betas = LINEAR.betas
    check_alpha_bar(np.cumprod(1 - betas))
    with pytest.raises(AssertionError, match=r"alpha_bar must lie in \(0, 1\]; alpha_bar\[312\] = -0.0039"):
        check_alpha_bar(1 - np.cumsum(betas))
    with pytest.raises(AssertionError, match=r"alpha_bar must lie in \(0, 1\]; alpha_bar\[1\] = 1.99"):
        check_alpha_bar(np.cumsum(1 - betas))


def test_alpha_bar_not_decreasing_fails():
    with pytest.raises(AssertionError, match=r"strictly decreasing; alpha_bar\[2\] = 0.9 >= alpha_bar\[1\] = 0.9"):
        check_alpha_bar(np.array([0.99, 0.9, 0.9, 0.5]))


def _q_var_not_std(x0, t, noise, ab):  # 1 - ab where sqrt(1 - ab) belongs
    ab_t = ab[t].reshape(-1, 1)
    return np.sqrt(ab_t) * x0 + (1 - ab_t) * noise


def _q_ab_not_sqrt(x0, t, noise, ab):  # ab where sqrt(ab) belongs
    ab_t = ab[t].reshape(-1, 1)
    return ab_t * x0 + np.sqrt(1 - ab_t) * noise


def _q_cubed_noise(x0, t, noise, ab):  # right at noise = 1, wrong in distribution
    ab_t = ab[t].reshape(-1, 1)
    return np.sqrt(ab_t) * x0 + np.sqrt(1 - ab_t) * noise**3


@pytest.mark.parametrize(
    "q_fn,match",
    [
        (_q_var_not_std, r"Var\[q\(x_t \| x_0\)\] at t=10: the formula gives \(noise coefficient\)\^2 = "),
        (_q_ab_not_sqrt, r"E\[q\(x_t \| x_0\)\] at t=10: the formula gives x_0 coefficient"),
        (_q_cubed_noise, r"Var\[q\(x_t \| x_0\)\] at t=10: sample variance .* the chi-square bound"),
    ],
)
def test_wrong_forward_process_fails(q_fn, match):
    with pytest.raises(AssertionError, match=match):
        check_forward_variance(LINEAR.alpha_bar, [10, 500], q_sample_fn=q_fn)


def test_forward_variance_check_passes_a_correct_formula_on_every_seed():
    for seed in range(20):  # false-alarm rate 1e-6 per timestep: these must all pass
        check_forward_variance(LINEAR.alpha_bar, [0, 250, 999], rng=np.random.default_rng(seed), n_samples=2000)


def test_wrong_posterior_variance_fails():
    ab = LINEAR.alpha_bar
    with pytest.raises(AssertionError, match=r"posterior variance at t=0: got 0.0001, expected .* \(DDPM Eq. 7\)"):
        check_posterior_variance(ab, LINEAR.betas)  # fixed_large is not the posterior variance
    swapped = np.concatenate([[0.0], LINEAR.betas[1:] * (1 - ab[1:]) / (1 - ab[:-1])])  # ab_t and ab_{t-1} swapped
    with pytest.raises(AssertionError, match="posterior variance at t=1: got 0.00026"):
        check_posterior_variance(ab, swapped)
    shifted = np.concatenate([[0.0], posterior_variance(ab)[:-1]])  # off by one step
    with pytest.raises(AssertionError, match="posterior variance at t=1"):
        check_posterior_variance(ab, shifted)


def test_posterior_variance_check_accepts_the_1e20_floor():
    check_posterior_variance(LINEAR.alpha_bar, np.maximum(posterior_variance(LINEAR.alpha_bar), 1e-20))


@pytest.mark.parametrize(
    "ts,T,N,match",
    [
        (np.array([14, 13, 0, -1]), 15, 4, r"timesteps must lie in \[0, 14\]; timesteps\[3\] = -1"),
        (np.array([5, 7, 1]), 10, 3, r"strictly decreasing; timesteps\[1\] = 7 >= timesteps\[0\] = 5"),
        (np.array([9, 9, 1]), 10, 3, r"strictly decreasing; timesteps\[1\] = 9 >= timesteps\[0\] = 9"),
        (np.array([9, 5]), 10, 3, r"expected 3 timesteps, got 2"),
        (np.array([9.0, 5.0]), 10, 2, r"timesteps must be integers, got dtype float64"),
        (np.array([1000, 500]), 1000, 2, r"timesteps must lie in \[0, 999\]; timesteps\[0\] = 1000"),
    ],
)
def test_wrong_timesteps_fail(ts, T, N, match):
    with pytest.raises(AssertionError, match=match):
        check_timesteps(ts, T, N)


def _x0_eps_v_sign_swapped(model_output, sample, t, ab, prediction_type):
    if prediction_type != "v_prediction":
        return x0_and_eps(model_output, sample, t, ab, prediction_type)
    x0, eps = x0_and_eps(model_output, sample, t, ab, prediction_type)
    a = np.sqrt(ab[t]).reshape(-1, 1)
    return x0, a * -model_output + np.sqrt(1 - ab[t]).reshape(-1, 1) * sample  # eps = -sqrt(ab) v + ...


def _x0_eps_missing_sqrt(model_output, sample, t, ab, prediction_type):
    if prediction_type != "epsilon":
        return x0_and_eps(model_output, sample, t, ab, prediction_type)
    a = ab[t].reshape(-1, 1)
    return (sample - (1 - a) * model_output) / np.sqrt(a), model_output  # (1 - ab) for sqrt(1 - ab)


@pytest.mark.parametrize(
    "fn,match",
    [
        (_x0_eps_v_sign_swapped, r"v_prediction round trip at t=\d+: recovered eps"),
        (_x0_eps_missing_sqrt, r"epsilon round trip at t=\d+: recovered x0"),
    ],
)
def test_wrong_conversions_fail(fn, match):
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 4, 3))
    t = np.array([100, 600, 900, 20])
    check_conversions_roundtrip(LINEAR.alpha_bar, t, x0, noise)
    with pytest.raises(AssertionError, match=match):
        check_conversions_roundtrip(LINEAR.alpha_bar, t, x0, noise, to_x0_eps=fn)


def test_conversions_skip_epsilon_at_zero_terminal_snr():
    ab = NoiseSchedule.from_config(rescale_betas_zero_snr=True).alpha_bar
    x0, noise = np.random.default_rng(0).standard_normal((2, 3, 2))
    check_conversions_roundtrip(ab, np.array([999, 5, 999]), x0, noise)  # must not divide by zero
    check_conversions_roundtrip(ab, 999, x0, noise)


def test_q_sample_passes_its_own_check():
    check_forward_variance(LINEAR.alpha_bar, np.arange(0, 1000, 111), q_sample_fn=q_sample)
