"""DDIM inversion: diffusers' DDIMInverseScheduler over random configs, exact round trips, errors."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.cases_samplers_random import trailing_is_clean
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from diffusion_np.samplers import DDIMInverseSampler, DDIMSampler
from diffusion_np.samplers.loop import denoise


def stand_in(x, t):
    """A fixed, x-dependent stand-in denoiser (deterministic in x and t)."""
    return np.tanh(0.7 * x + 0.001 * float(t)) + 0.05 * np.cos(0.01 * float(t))


def x_free(x, t):
    """A model whose output depends on t only: DDIM steps with it are exactly invertible."""
    return np.full_like(x, np.sin(0.013 * float(t) + 0.4))


def _invert(sampler, model, x0, steps):
    sampler.set_timesteps(steps)
    x, _ = denoise(model, sampler, x0, sampler.timesteps, np.random.default_rng(0), progress=False)
    return x


configs = st.fixed_dictionaries({
    "num_train_timesteps": st.sampled_from([50, 100, 1000]),
    "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]),
    "prediction_type": st.sampled_from(["epsilon", "v_prediction", "sample"]),
    "timestep_spacing": st.sampled_from(["leading", "trailing"]),
    "steps_offset": st.sampled_from([0, 1]),
    "set_alpha_to_one": st.booleans(),
    "clip_sample": st.booleans(),
})  # fmt: skip


@pytest.mark.crosscheck
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, steps=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_matches_diffusers_ddim_inverse_scheduler_over_random_configs(config, steps, seed):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    if config["prediction_type"] == "sample" and config["set_alpha_to_one"]:
        config["set_alpha_to_one"] = False  # refused (0 / 0 at the first step; diffusers returns NaN)
    steps = min(steps, config["num_train_timesteps"] // 2)  # T // N >= 2 keeps leading + offset 1 below T
    # diffusers' trailing arange can hold an (N+1)-th entry that becomes timestep -1 (T=100, N=29): not drawn
    assume(config["timestep_spacing"] != "trailing" or trailing_is_clean(config["num_train_timesteps"], steps))
    ours = DDIMInverseSampler(**config)
    theirs = diffusers.DDIMInverseScheduler(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    # the step math in float64 on both sides: their table replaced by ours (the schedules' own parity is
    # tested elsewhere); their float32 table agrees with ours to ~1e-7 relative
    np.testing.assert_allclose(ours.alpha_bar, theirs.alphas_cumprod.double().numpy(), rtol=2e-6, atol=1e-7)
    theirs.alphas_cumprod = torch.from_numpy(ours.alpha_bar.copy())
    theirs.initial_alpha_cumprod = torch.tensor(ours.initial_alpha_bar, dtype=torch.float64)

    x = np.random.default_rng(seed).standard_normal((2, 4, 4, 3))
    x_theirs = torch.from_numpy(x.copy())
    for t in ours.timesteps:
        x = ours.step(stand_in(x, t), t, x).prev_sample
        out = stand_in(x_theirs.numpy(), t)
        x_theirs = theirs.step(torch.from_numpy(out), torch.tensor(int(t)), x_theirs).prev_sample
    ref = x_theirs.numpy()
    assert np.max(np.abs(x - ref)) <= 1e-10 * max(1.0, np.max(np.abs(ref)))


@settings(max_examples=40, deadline=None)
@given(
    T=st.sampled_from([100, 1000]), steps=st.integers(1, 40), offset=st.sampled_from([0, 1]),
    schedule=st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_inversion_then_ddim_is_exact_when_the_model_ignores_x(T, steps, offset, schedule, seed):
    # DDIM's eta = 0 step is an invertible map of x_t for a fixed eps; inversion is its exact inverse
    # when eps does not change between the two levels, here because the model ignores x.
    kwargs = dict(num_train_timesteps=T, beta_schedule=schedule, steps_offset=offset, clip_sample=False)
    inverse, forward = DDIMInverseSampler(**kwargs), DDIMSampler(**kwargs)
    x0 = np.random.default_rng(seed).standard_normal((2, 3, 3, 2))
    xT = _invert(inverse, x_free, x0, steps)
    forward.set_timesteps(steps)
    np.testing.assert_array_equal(inverse.timesteps, forward.timesteps[::-1])
    back, _ = denoise(x_free, forward, xT, forward.timesteps, np.random.default_rng(0), progress=False, eta=0.0)
    np.testing.assert_allclose(back, x0, rtol=0, atol=1e-9)


def test_reconstruction_of_gaussian_data_improves_with_steps():
    # x0 ~ N(0, s^2 I): the exact denoiser is eps*(x_t) = sqrt(1 - ab) x_t / (ab s^2 + 1 - ab).
    s = 0.5
    inverse = DDIMInverseSampler(clip_sample=False)
    forward = DDIMSampler(clip_sample=False)

    def exact(x, t):
        ab = inverse.alpha_bar[int(t)]
        return np.sqrt(1 - ab) * x / (ab * s**2 + 1 - ab)

    x0 = s * np.random.default_rng(3).standard_normal((64, 2))
    errors = []
    for steps in (5, 20, 100):
        xT = _invert(inverse, exact, x0, steps)
        forward.set_timesteps(steps)
        back, _ = denoise(exact, forward, xT, forward.timesteps, np.random.default_rng(0), progress=False)
        errors.append(float(np.sqrt(np.mean((back - x0) ** 2))))
    # first order in the step size: 5x the steps, about 1/5 the error (measured 0.284, 0.073, 0.0144)
    assert errors[0] > 3 * errors[1] and errors[1] > 3.5 * errors[2], errors
    assert errors[2] < 0.05 * s, errors
    # and the inverted noise is (close to) unit Gaussian, as the ODE maps N(0, s^2) to N(0, 1)
    assert abs(float(np.std(xT)) - 1.0) < 0.2


def test_from_sampler_copies_the_schedule_and_maps_linspace_to_trailing():
    forward = DDIMSampler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          set_alpha_to_one=False, clip_sample=False, prediction_type="v_prediction")
    inverse = DDIMInverseSampler.from_sampler(forward)
    np.testing.assert_array_equal(inverse.alpha_bar, forward.alpha_bar)
    assert (inverse.prediction_type, inverse.steps_offset, inverse.set_alpha_to_one, inverse.clip_sample) == (
        "v_prediction", 1, False, False)
    assert DDIMInverseSampler.from_sampler(DDIMSampler(timestep_spacing="linspace")).timestep_spacing == "trailing"


def test_first_step_starts_from_a_clean_image_with_set_alpha_to_one():
    sampler = DDIMInverseSampler(clip_sample=False)
    sampler.set_timesteps(10)
    assert sampler.timesteps.tolist() == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]
    x0 = np.ones((1, 2, 2, 1))
    eps = np.full_like(x0, 0.5)
    ab = sampler.alpha_bar[0]
    out = sampler.step(eps, 0, x0)
    np.testing.assert_allclose(out.pred_original_sample, x0)  # alpha_bar = 1 before the first step
    np.testing.assert_allclose(out.prev_sample, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps)


def test_bad_input():
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMInverseSampler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="alpha_bar = 1"):
        DDIMInverseSampler(prediction_type="sample")
    with pytest.raises(ValueError, match="clip_sample_range"):
        DDIMInverseSampler(clip_sample_range=0)
    sampler = DDIMInverseSampler()
    x = np.zeros((1, 2, 2, 1))
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sampler.step(x, 0, x)
    sampler.set_timesteps(4)
    with pytest.raises(ValueError, match="not in this sampler's timesteps"):
        sampler.step(x, 1, x)
    with pytest.raises(ValueError, match="model_output must have the sample's shape"):
        sampler.step(np.zeros((1, 2, 2, 2)), 0, x)


def test_keeps_float32():
    sampler = DDIMInverseSampler()
    sampler.set_timesteps(5)
    x = np.ones((1, 2, 2, 1), dtype=np.float32)
    assert sampler.step(0.1 * x, sampler.timesteps[2], x).prev_sample.dtype == np.float32
