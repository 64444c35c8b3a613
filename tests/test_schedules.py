"""Properties of the beta schedules and of the timestep spacings, plus parity with diffusers."""

import matplotlib

matplotlib.use("Agg")  # headless: this test only checks that plot() builds its three axes

import numpy as np
import pytest
from helpers import SOURCES, reference
from hypothesis import given
from hypothesis import strategies as st

from diffusion_np.diffusion import posterior_variance
from diffusion_np.samplers.timesteps import make_timesteps
from diffusion_np.schedules import BETA_SCHEDULES, NoiseSchedule, make_betas, rescale_zero_terminal_snr
from diffusion_np.testing import check_alpha_bar, check_timesteps
from diffusion_np.testing.strategies import inference_steps, noise_schedules, schedule_configs

# --------------------------------------------------------------------------- alpha_bar properties


@given(noise_schedules())
def test_alpha_bar_strictly_decreasing_in_unit_interval(schedule):
    check_alpha_bar(schedule.alpha_bar)


@given(schedule_configs())
def test_derived_quantities_follow_alpha_bar(config):
    s = NoiseSchedule.from_config(**config)
    np.testing.assert_allclose(s.alpha_bar, np.cumprod(1 - s.betas), rtol=1e-14)
    np.testing.assert_allclose(s.snr, s.alpha_bar / (1 - s.alpha_bar), rtol=1e-12)
    np.testing.assert_allclose(s.sigmas, 1 / np.sqrt(s.snr), rtol=1e-12)
    np.testing.assert_allclose(s.sqrt_alpha_bar**2 + s.sqrt_one_minus_alpha_bar**2, 1.0, rtol=1e-14)


@given(schedule_configs(min_T=2))
def test_zero_terminal_snr(config):
    plain = NoiseSchedule.from_config(**config)
    rescaled = NoiseSchedule.from_config(**{**config, "rescale_betas_zero_snr": True})
    assert rescaled.alpha_bar[-1] == 0.0  # exactly: the last step is pure noise
    assert rescaled.snr[-1] == 0.0
    np.testing.assert_allclose(rescaled.alpha_bar[0], plain.alpha_bar[0], rtol=1e-12)  # first step kept
    check_alpha_bar(rescaled.alpha_bar, allow_zero_terminal=True)


def test_zero_terminal_alpha_bar_is_refused_unless_allowed():
    ab = NoiseSchedule.from_config(rescale_betas_zero_snr=True).alpha_bar
    with pytest.raises(AssertionError, match=r"alpha_bar\[999\] = 0.0 .*allow_zero_terminal=True"):
        check_alpha_bar(ab)


def test_zero_terminal_snr_needs_two_steps():
    with pytest.raises(ValueError, match="at least 2 timesteps"):
        rescale_zero_terminal_snr([0.1])


def test_cosine_is_an_alias_of_squaredcos_cap_v2():
    np.testing.assert_array_equal(make_betas("cosine"), make_betas("squaredcos_cap_v2"))


# --------------------------------------------------------------------------- golden values (REFERENCE.md)


def test_stable_diffusion_scaled_linear_goldens():
    s = NoiseSchedule.from_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    np.testing.assert_allclose(s.alpha_bar[:5], [0.99915, 0.99830, 0.99744, 0.99658, 0.99571], atol=6e-6)
    np.testing.assert_allclose(s.alpha_bar[-1], 0.0046601, rtol=1e-4)
    np.testing.assert_allclose(s.sigmas.max(), 14.6146, rtol=1e-5)
    np.testing.assert_allclose(s.sigmas.min(), 0.02917, rtol=1e-3)


def test_ddpm_linear_fixed_small_variance_goldens():
    ab = NoiseSchedule.from_config().alpha_bar
    var = posterior_variance(ab)
    assert var[0] == 0.0
    np.testing.assert_allclose(var[[487, 999]], [0.00979, 0.02], rtol=1e-3)


# --------------------------------------------------------------------------- parity with diffusers


@pytest.fixture(params=SOURCES, scope="module")
def diffusers_cases(request):
    return reference("schedules", request.param)


BETA_CONFIGS = {  # the same configs as tests/fixtures/cases_schedules.py
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "sigmoid": {"beta_schedule": "sigmoid", "beta_start": 0.0001, "beta_end": 0.02},
    "linear_zero_snr": {"beta_schedule": "linear", "rescale_betas_zero_snr": True},
    "scaled_linear_zero_snr": {
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True
    },
    "linear_T10": {"beta_schedule": "linear", "num_train_timesteps": 10, "beta_start": 0.01, "beta_end": 0.3},
    "cosine_T7": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 7},
}


@pytest.mark.parametrize("name", sorted(BETA_CONFIGS))
def test_betas_and_alpha_bar_match_diffusers(diffusers_cases, name):
    ref = diffusers_cases[f"beta_{name}"]
    s = NoiseSchedule.from_config(**BETA_CONFIGS[name])
    # diffusers computes in float32; ours is float64, so the comparison is at float32 precision
    # (alphas_cumprod accumulates float32 rounding over 1000 products: rtol 2e-5). Its zero-SNR
    # betas are 1 - ratio of float32 alpha_bars, ~1e-4 recovered from numbers near 1: absolute
    # error up to 2e-6 there (test_rescale_matches_diffusers_in_float64 checks the math exactly).
    rtol, atol = (2e-5, 5e-6) if name.endswith("zero_snr") else (2e-6, 1e-9)
    np.testing.assert_allclose(s.betas, ref["betas"], rtol=rtol, atol=atol, err_msg=f"{name}: betas")
    np.testing.assert_allclose(s.alpha_bar, ref["alphas_cumprod"], rtol=2e-5, atol=1e-7, err_msg=f"{name}: alpha_bar")


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_rescale_matches_diffusers_in_float64(diffusers_cases, name):
    ref = diffusers_cases[f"rescale_{name}"]
    np.testing.assert_allclose(rescale_zero_terminal_snr(ref["betas"]), ref["rescaled"], rtol=1e-10, atol=1e-14)


def test_every_named_schedule_has_a_diffusers_case():
    assert set(BETA_SCHEDULES) - {"cosine"} <= set(BETA_CONFIGS)


# --------------------------------------------------------------------------- invalid configs


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta_schedule": "quadratic"}, r"unknown beta_schedule 'quadratic'; allowed: linear, scaled_linear"),
        ({"num_train_timesteps": 0}, r"num_train_timesteps must be an integer >= 1, got 0"),
        ({"num_train_timesteps": 10.5}, r"num_train_timesteps must be an integer >= 1"),
        ({"beta_start": 0.0}, r"beta_start and beta_end must lie in \(0, 1\)"),
        ({"beta_end": 1.5}, r"beta_start and beta_end must lie in \(0, 1\)"),
        ({"beta_start": 0.02, "beta_end": 0.01}, r"beta_end \(0.01\) must be >= beta_start \(0.02\)"),
        ({"trained_betas": [0.1, 1.2]}, r"trained_betas: every beta must lie in \(0, 1\)"),
        ({"trained_betas": []}, r"trained_betas must be a non-empty 1-D sequence"),
        ({"beta_start": float("nan")}, r"beta_start and beta_end must lie in \(0, 1\)"),
    ],
)
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_config(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta_start": [0.1]}, r"beta_start must be a number in \(0, 1\), got \[0.1\]"),  # was NumPy's TypeError
        ({"beta_end": "0.02"}, r"beta_end must be a number in \(0, 1\)"),
        ({"beta_start": None}, r"beta_start must be a number"),
        ({"num_train_timesteps": True}, r"num_train_timesteps must be an integer >= 1, got True"),  # was T = 1
    ],
)
def test_config_values_of_the_wrong_type_are_refused_by_name(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        NoiseSchedule.from_config(**kwargs)


def test_plot_returns_three_axes():
    import matplotlib.pyplot as plt

    axes = NoiseSchedule.from_config().plot(label="linear")
    assert len(axes) == 3
    assert [len(ax.get_lines()) for ax in axes] == [1, 1, 1]
    NoiseSchedule.from_config(rescale_betas_zero_snr=True).plot(axes=axes)  # overlay, with log SNR = -inf at the end
    assert [len(ax.get_lines()) for ax in axes] == [2, 2, 2]
    plt.close("all")


# --------------------------------------------------------------------------- timesteps


@given(inference_steps())
def test_timesteps_are_valid_for_every_config(config):
    T, N, spacing, offset = config
    check_timesteps(make_timesteps(N, T, spacing, offset), T, N)
    check_timesteps(make_timesteps(N, T, spacing, offset, round_linspace=False), T, N, integer=False)


@given(st.integers(1, 1000).flatmap(lambda T: st.tuples(st.just(T), st.integers(1, T))))
def test_trailing_has_exactly_n_steps(T_N):
    # np.arange(T, 0, -T/N) can produce an (N+1)-th entry that rounds to -1 (T=15, N=13)
    T, N = T_N
    check_timesteps(make_timesteps(N, T, "trailing"), T, N)


def test_trailing_regression_15_13():
    np.testing.assert_array_equal(make_timesteps(13, 15, "trailing"), [14, 13, 12, 11, 9, 8, 7, 6, 5, 4, 2, 1, 0])


def test_timestep_goldens_from_reference():
    linspace = make_timesteps(50, 1000, "linspace")
    np.testing.assert_array_equal(linspace[:3], [999, 979, 958])
    np.testing.assert_array_equal(linspace[-2:], [20, 0])
    np.testing.assert_array_equal(make_timesteps(50, 1000, "leading", steps_offset=1), np.arange(981, 0, -20))
    np.testing.assert_array_equal(make_timesteps(50, 1000, "trailing"), np.arange(999, 0, -20))
    # pitfall 1: linspace gaps are uneven, so t - T // N is not the next entry
    assert set(-np.diff(linspace)) == {20, 21}


@pytest.mark.parametrize(
    "name",
    [
        "linspace_1000_50", "leading_1000_50", "leading_1000_50_offset1", "trailing_1000_50", "linspace_1000_7",
        "leading_1000_7_offset1", "trailing_1000_7", "linspace_10_10", "trailing_10_3",
    ],
)
def test_timesteps_match_diffusers(diffusers_cases, name):
    spacing, T, N = name.split("_")[:3]
    offset = 1 if name.endswith("offset1") else 0
    np.testing.assert_array_equal(
        make_timesteps(int(N), int(T), spacing, offset), diffusers_cases[f"timesteps_{name}"]["timesteps"]
    )


@pytest.mark.parametrize(
    "args,match",
    [
        ((1000, 1000, "leading", 1), r"steps_offset=1 .*reaches timestep 1000, past the last training timestep 999"),
        ((0, 1000, "leading", 0), r"num_inference_steps must be an integer >= 1, got 0"),
        ((11, 10, "linspace", 0), r"num_inference_steps \(11\) cannot exceed num_train_timesteps \(10\)"),
        ((5, 10, "uniform", 0), r"timestep_spacing must be one of \('linspace', 'leading', 'trailing'\)"),
    ],
)
def test_invalid_timestep_configs_raise(args, match):
    N, T, spacing, offset = args
    with pytest.raises(ValueError, match=match):
        make_timesteps(N, T, spacing, offset)
