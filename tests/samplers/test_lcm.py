"""LCMSampler: diffusers parity (live over random configs; the golden cases are in test_parity_random.py),
the timestep grid, the boundary condition, the consistency-function oracle, validation."""

import math

import numpy as np
import pytest
from fixtures.cases_samplers_random import diffusers_loop, draw_config, our_loop, relative_error
from helpers import sample_loop
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_np.diffusion import consistency_scalings
from diffusion_np.samplers import SAMPLERS, LCMSampler
from diffusion_np.testing import check_timesteps


# ------------------------------------------------------------------------------ live parity, float64
@pytest.mark.crosscheck
@settings(max_examples=100, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_lcm_matches_diffusers_on_random_configs(data, seed):
    """Every axis of the shared generator (schedule, prediction type, zero SNR, clipping, thresholding) and
    LCM's own (original_inference_steps, timestep_scaling): same timesteps, final sample to 1e-10."""
    config, N, step_kwargs = draw_config("lcm", lambda options: data.draw(st.sampled_from(list(options))),
                                         lambda lo, hi: data.draw(st.integers(lo, hi)))
    x_init = np.random.default_rng(seed).standard_normal((2, 2, 2, 2))
    record = diffusers_loop("lcm", config, N, step_kwargs, x_init, seed)
    sampler, final = our_loop("lcm", config, N, step_kwargs, x_init, record["noise"])
    np.testing.assert_array_equal(sampler.timesteps, record["timesteps"])
    assert relative_error(final, record["final"]) <= 1e-10


@pytest.mark.crosscheck
@given(orig=st.integers(1, 100), strength=st.sampled_from([1.0, 0.75, 0.5, 0.3]), data=st.data())
def test_lcm_timesteps_and_strength_match_diffusers(orig, strength, data):
    import diffusers

    if int(orig * strength) < 1:
        return
    N = data.draw(st.integers(1, int(orig * strength)))
    ref = diffusers.LCMScheduler(original_inference_steps=orig)
    ref.set_timesteps(N, strength=strength)
    ours = LCMSampler(original_inference_steps=orig)
    ours.set_timesteps(N, strength=strength)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    custom = sorted(data.draw(st.sets(st.integers(0, 999), min_size=1, max_size=8)), reverse=True)
    ref.set_timesteps(timesteps=custom, strength=strength)
    ours.set_timesteps(timesteps=custom, strength=strength)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


@pytest.mark.crosscheck
@given(t=st.integers(0, 999), scaling=st.sampled_from([10.0, 1.0, 0.1, 3.5]))
def test_boundary_scalings_match_diffusers(t, scaling):
    import diffusers

    ref = diffusers.LCMScheduler(timestep_scaling=scaling)
    c_skip, c_out = ref.get_scalings_for_boundary_condition_discrete(t)  # a Python int: float64 arithmetic
    assert consistency_scalings(t, scaling) == pytest.approx((c_skip, c_out), rel=1e-15)


# ------------------------------------------------------------------------------ properties
@given(T=st.sampled_from([1000, 500, 100, 30]), data=st.data())
def test_lcm_timesteps_lie_on_the_distillation_grid(T, data):
    """N timesteps, strictly decreasing, in [0, T-1], each of the form k * j - 1 with k = T // N'; the first is
    the grid's top k N' - 1; N = N' visits the whole grid."""
    orig = data.draw(st.integers(1, T))
    N = data.draw(st.integers(1, orig))
    sampler = LCMSampler(num_train_timesteps=T, original_inference_steps=orig)
    sampler.set_timesteps(N)
    k = T // orig
    check_timesteps(sampler.timesteps, T, N)
    assert np.all((sampler.timesteps + 1) % k == 0)
    assert sampler.timesteps[0] == k * orig - 1
    sampler.set_timesteps(orig)
    np.testing.assert_array_equal(sampler.timesteps, sampler.origin_timesteps()[::-1])


def test_lcm_default_four_steps_are_luos():
    """SD's default: N' = 50, k = 20; 4 steps visit 999, 759, 499, 259 (diffusers' LCM pipelines)."""
    sampler = LCMSampler()
    sampler.set_timesteps(4)
    assert sampler.timesteps.tolist() == [999, 759, 499, 259]
    sampler.set_timesteps(1)
    assert sampler.timesteps.tolist() == [999]


@given(t=st.integers(0, 2000), scaling=st.floats(0.01, 100.0))
def test_boundary_condition(t, scaling):
    """c_skip(0) = 1, c_out(0) = 0 (f(x, 0) = x for any network); both in [0, 1]; c_skip decreasing and c_out
    increasing in t; c_skip + c_out^2 = (sd^2 + s^2) / (s^2 + sd^2) = 1."""
    c_skip, c_out = consistency_scalings(t, scaling)
    assert 0 <= c_skip <= 1 and 0 <= c_out <= 1
    assert c_skip + c_out**2 == pytest.approx(1.0, abs=1e-12)
    if t == 0:
        assert (c_skip, c_out) == (1.0, 0.0)
    c_skip_next, c_out_next = consistency_scalings(t + 1, scaling)
    assert c_skip_next < c_skip and c_out_next >= c_out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_point_mass_oracle_lands_on_x0(prediction_type, steps):
    """The exact denoiser of a point mass x0 returns x0 from any x_t. With timestep_scaling large, c_out = 1 and
    c_skip = 0 to rounding at every visited t >= 19: f = x0 whatever the noise, so every step count, every
    re-noising draw, ends on x0 (a consistency model's defining property)."""
    x0 = np.random.default_rng(0).standard_normal((3, 4, 4, 2))
    sampler = LCMSampler(prediction_type=prediction_type, timestep_scaling=1e9)
    sampler.set_timesteps(steps)
    ab = sampler.alpha_bar

    def oracle(x_t, t):
        a, s = math.sqrt(ab[t]), math.sqrt(1.0 - ab[t])
        eps = (x_t - a * x0) / s
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction_type]

    x_init = np.random.default_rng(1).standard_normal(x0.shape)
    out = sample_loop(sampler, oracle, x_init, rng=np.random.default_rng(2))
    np.testing.assert_allclose(out, x0, rtol=0, atol=1e-9)


def test_one_step_is_the_consistency_function_and_renoising_follows_q():
    """Step 1 returns f(x_T, T) as pred_original_sample; prev_sample = sqrt(ab_next) f + sqrt(1 - ab_next) z
    (the forward process q from the denoised estimate); the last step returns f itself."""
    sampler = LCMSampler()
    sampler.set_timesteps(2)
    t0, t1 = sampler.timesteps
    x = np.random.default_rng(0).standard_normal((2, 3, 3, 4))
    out = np.tanh(0.5 * x)
    z = np.random.default_rng(1).standard_normal(x.shape)
    step = sampler.step(out, t0, x, noise=z)
    c_skip, c_out = consistency_scalings(int(t0))
    ab = sampler.alpha_bar
    f = c_skip * x + c_out * (x - math.sqrt(1 - ab[t0]) * out) / math.sqrt(ab[t0])
    np.testing.assert_allclose(step.pred_original_sample, f, rtol=1e-14)
    np.testing.assert_allclose(step.prev_sample, sampler.add_noise(f, z, int(t1)), rtol=1e-14)
    last = sampler.step(out, t1, x, noise=z)
    np.testing.assert_array_equal(last.prev_sample, last.pred_original_sample)


def test_lcm_deterministic_for_a_seed_and_keeps_dtype():
    sampler = SAMPLERS["lcm"]()
    x_init = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    model = lambda x, t: np.tanh(0.5 * x + float(t) / 1000)  # noqa: E731
    sampler.set_timesteps(4)
    first = sample_loop(sampler, model, x_init, rng=np.random.default_rng(5))
    second = sample_loop(sampler, model, x_init, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.float32 and sampler.init_noise_sigma == 1.0


def test_lcm_refuses_bad_input():
    with pytest.raises(ValueError, match="original_inference_steps must lie in"):
        LCMSampler(original_inference_steps=1001)
    with pytest.raises(TypeError, match="original_inference_steps must be an int"):
        LCMSampler(original_inference_steps=2.5)
    with pytest.raises(ValueError, match="timestep_scaling must be > 0"):
        LCMSampler(timestep_scaling=0.0)
    with pytest.raises(ValueError, match="epsilon prediction cannot"):
        LCMSampler(rescale_betas_zero_snr=True)
    sampler = LCMSampler()
    x = np.zeros((1, 2, 2, 1))
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        sampler.step(x, 999, x)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer in"):
        sampler.set_timesteps(51)
    with pytest.raises(ValueError, match="exactly one of"):
        sampler.set_timesteps()
    with pytest.raises(ValueError, match="strictly decreasing"):
        sampler.set_timesteps(timesteps=[10, 500])
    with pytest.raises(ValueError, match="strength must lie"):
        sampler.set_timesteps(4, strength=0.0)
    sampler.set_timesteps(4)
    with pytest.raises(ValueError, match="not in this sampler's timesteps"):
        sampler.step(x, 500, x)
    with pytest.raises(ValueError, match="model_output must have the sample's shape"):
        sampler.step(np.zeros((1, 2, 2, 2)), 999, x)
