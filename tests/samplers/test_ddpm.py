"""DDPMSampler: full-loop parity with diffusers' DDPMScheduler, DDPM Eq. 6/7 and Improved DDPM Eq. 15, pitfalls."""

import math

import numpy as np
import pytest
from fixtures.cases_samplers_ddpm_ddim import CASES, fake_model_np, learned_variance
from helpers import SOURCES, reference
from hypothesis import given
from hypothesis import strategies as st

from diffusion_np.diffusion import q_sample
from diffusion_np.samplers.base import dynamic_threshold
from diffusion_np.samplers.ddim import DDIMSampler
from diffusion_np.samplers.ddpm import DDPMSampler
from diffusion_np.samplers.loop import sample

AREA = "samplers_ddpm_ddim"
FINAL_NOISE_CASE = "ddpm_final_noise_trailing_eps_large_5"
PARITY_CASES = [name for name, case in CASES.items() if case[0] == "ddpm"]
VARIANCE_TYPES = ["fixed_small", "fixed_large", "learned_range", "learned"]


@pytest.fixture(params=SOURCES, scope="module")
def diffusers_cases(request):
    return reference(AREA, request.param)


def _replay(name, case, **options):
    """Our loop on the case's config (and ``options``), x_T and diffusers' recorded per-step noise."""
    _, config, steps, _ = CASES[name]
    sampler = DDPMSampler(**config, **options)
    learned = learned_variance(config)
    model = lambda x, t: fake_model_np(x, t, sampler.num_train_timesteps, learned)  # noqa: E731
    x = sample(model, case["x_T"].shape, sampler, steps, noise=case["x_T"], step_noise=list(case["step_noise"]),
               progress=False)  # fmt: skip
    np.testing.assert_array_equal(sampler.timesteps, case["timesteps"], err_msg=f"{name}: timesteps")
    return x, sampler


def _rel_err(ours, ref):
    return float(np.max(np.abs(ours - ref)) / max(1.0, float(np.max(np.abs(ref)))))


@pytest.mark.parametrize("name", PARITY_CASES)
def test_ddpm_full_loop_matches_diffusers(diffusers_cases, name):
    # float32 loops on both sides; diffusers keeps alpha_bar in float32, we in float64 (measured rel <= 3e-6)
    x, _ = _replay(name, diffusers_cases[name])
    err = _rel_err(x, diffusers_cases[name]["out"])
    assert err <= 1e-5, f"{name}: max abs diff relative to scale {err:.2e}"


def test_ddpm_clean_last_step_leaves_out_the_noise_diffusers_adds_at_t_above_0(diffusers_cases):
    # trailing spacing ends at t = 199 > 0: diffusers' "if t > 0" (our default) adds sqrt(beta'_t) z with
    # beta'_t = 1 - alpha_bar_t under fixed_large; clean_last_step=True adds none on the last step
    case = diffusers_cases[FINAL_NOISE_CASE]
    x, sampler = _replay(FINAL_NOISE_CASE, case, clean_last_step=True)
    t_last = int(case["timesteps"][-1])
    assert t_last > 0
    extra = math.sqrt(1.0 - sampler.alpha_bar[t_last]) * case["step_noise"][-1]
    assert _rel_err(x + extra, case["out"]) <= 1e-5
    assert _rel_err(x, case["out"]) > 1e-3


# --- DDPM Eq. 6/7 and variances ---


@pytest.mark.parametrize("t,expected", [(0, 0.0), (487, 0.00979), (999, 0.02)])
def test_ddpm_fixed_small_reference_values(t, expected):
    sampler = DDPMSampler()  # linear 1e-4 .. 0.02
    sampler.set_timesteps(1000)  # every training step: previous of t is t - 1
    assert sampler.variance(t) == pytest.approx(expected, abs=1e-5)  # REFERENCE.md truncates to 5 decimals
    if t == 0:
        assert sampler.variance(0) == 1e-20  # the floor that keeps log(var) finite for learned_range


def test_pitfall_05_ddpm_with_fewer_steps_uses_the_sequences_previous_timestep():
    sampler = DDPMSampler(prediction_type="sample", clip_sample=False)
    sampler.set_timesteps(10)  # 900, 800, ..., 0
    t, prev = 900, 800
    ab, ab_p = sampler.alpha_bar[t], sampler.alpha_bar[prev]
    rng = np.random.default_rng(0)
    x0, x_t = rng.standard_normal((2, 2, 2, 3)), rng.standard_normal((2, 2, 2, 3))
    beta = 1 - ab / ab_p  # the jump 900 -> 800, not beta_900
    mean = math.sqrt(ab_p) * beta / (1 - ab) * x0 + math.sqrt(ab / ab_p) * (1 - ab_p) / (1 - ab) * x_t  # Eq. 7
    got = sampler.step(x0, t, x_t, noise=np.zeros_like(x_t)).prev_sample
    np.testing.assert_allclose(got, mean, rtol=1e-12)
    assert sampler.variance(t) == pytest.approx((1 - ab_p) / (1 - ab) * beta, rel=1e-12)
    ab_one_step = sampler.alpha_bar[t - 1]  # what the shortcut "t - 1" would use
    assert abs(sampler.variance(t) - (1 - ab_one_step) / (1 - ab) * sampler.schedule.betas[t]) > 0.1


def test_ddpm_posterior_mean_of_a_noiseless_x_t_is_sqrt_alpha_bar_prev_x0():
    # DDPM Eq. 7 with x_t = sqrt(ab_t) x0 and the true x0: the coefficients combine to
    # sqrt(ab_prev) beta' / (1 - ab_t) + sqrt(ab_t / ab_prev) (1 - ab_prev) sqrt(ab_t) / (1 - ab_t) = sqrt(ab_prev)
    sampler = DDPMSampler(prediction_type="sample", clip_sample=False)
    sampler.set_timesteps(7)
    x0 = np.ones((1, 1, 1, 1))
    for t in sampler.timesteps:
        x_t = q_sample(x0, int(t), np.zeros_like(x0), sampler.alpha_bar)
        mean = sampler.step(x0, t, x_t, noise=np.zeros_like(x0)).prev_sample
        np.testing.assert_allclose(mean, math.sqrt(sampler.alpha_bar_prev(t)) * x0, rtol=1e-12)


@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_learned_variance_reads_the_second_half_of_the_last_axis(variance_type):
    sampler = DDPMSampler(variance_type=variance_type, clip_sample=False)
    sampler.set_timesteps(10)
    t = 500
    ab, ab_p = sampler.alpha_bar[t], sampler.alpha_bar_prev(t)
    beta = 1 - ab / ab_p
    small = (1 - ab_p) / (1 - ab) * beta
    x = np.zeros((1, 2, 2, 3))
    v = np.array([-1.0, 0.0, 1.0]) * np.ones((1, 2, 2, 3))  # per channel: the fixed_small end, the middle, beta
    out = np.concatenate([np.zeros_like(x), v if variance_type == "learned_range" else np.full_like(x, 0.04)], -1)
    added = sampler.step(out, t, x, noise=np.ones_like(x)).prev_sample - sampler.step(out, t, x, noise=0 * x)[0]
    if variance_type == "learned_range":  # Improved DDPM Eq. 15: log var = f log beta + (1 - f) log beta_tilde
        expected = np.sqrt(np.array([small, math.sqrt(small * beta), beta]))
    else:
        expected = np.full(3, 0.2)
    np.testing.assert_allclose(added[0, 0, 0], expected, rtol=1e-10)


@given(
    variance_type=st.sampled_from(VARIANCE_TYPES),
    spacing=st.sampled_from(["leading", "linspace", "trailing"]),
    steps=st.integers(1, 60),
    offset=st.integers(0, 1),
    seed=st.integers(0, 2**16),
)
def test_pitfall_10_no_noise_at_the_last_step_and_std_is_sqrt_var(variance_type, spacing, steps, offset, seed):
    sampler, clean = (DDPMSampler(variance_type=variance_type, timestep_spacing=spacing, steps_offset=offset,
                                  clip_sample=False, clean_last_step=c) for c in (False, True))  # fmt: skip
    sampler.set_timesteps(steps)
    clean.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, 2, 3))
    learned = variance_type in ("learned_range", "learned")
    out = np.concatenate([np.tanh(x), np.full_like(x, 0.3)], -1) if learned else np.tanh(x)
    last = sampler.timesteps[-1]
    noises = [rng.standard_normal(x.shape) for _ in range(2)]
    a, b = (clean.step(out, last, x, noise=z).prev_sample for z in noises)
    np.testing.assert_array_equal(a, b)  # clean_last_step: whatever the noise, the same x_0
    a, b = (sampler.step(out, last, x, noise=z).prev_sample for z in noises)
    if last == 0:  # the default adds noise where t > 0 (Algorithm 2 line 3), so none at t = 0
        np.testing.assert_array_equal(a, b)
    else:  # a sequence ending at t > 0 gets sqrt(var) z on its last step too, as in diffusers
        var = sampler.variance(last, out[..., 3:] if learned else None)
        np.testing.assert_allclose(a - b, np.sqrt(var) * (noises[0] - noises[1]), rtol=1e-6, atol=1e-12)
    if steps > 1:  # a middle step adds std * z with std = sqrt(var), not var
        t = sampler.timesteps[0]
        z = np.ones_like(x)
        added = sampler.step(out, t, x, noise=z).prev_sample - sampler.step(out, t, x, noise=0 * z).prev_sample
        var = sampler.variance(t, out[..., 3:] if learned else None)
        np.testing.assert_allclose(added, np.sqrt(var) * z, rtol=1e-7, atol=1e-15)


@pytest.mark.parametrize("sampler_cls", [DDPMSampler, DDIMSampler])
def test_pitfall_06_default_clip_sample_destroys_latents(sampler_cls):
    # latents (e.g. SD's VAE latents times 0.18215) routinely exceed 1: clipping x0_pred to [-1, 1] damages them
    rng = np.random.default_rng(0)
    x0 = 3.0 * rng.standard_normal((1, 4, 4, 4))
    eps = rng.standard_normal(x0.shape)
    results = {}
    for clip in (True, False):
        sampler = sampler_cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=clip)
        sampler.set_timesteps(10)
        t = int(sampler.timesteps[2])
        x_t = q_sample(x0, t, eps, sampler.alpha_bar)
        results[clip] = sampler.step(eps, t, x_t, noise=np.zeros_like(x0)).pred_original_sample
    assert sampler_cls().clip_sample is True  # the diffusers default
    assert np.abs(results[True]).max() == 1.0
    np.testing.assert_allclose(results[False], x0, atol=1e-10)  # the true model output recovers x0 ...
    assert np.abs(results[True] - x0).max() > 1.0  # ... unless it is clipped


def test_pitfall_04_zero_terminal_snr_needs_v_prediction():
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=True .* use prediction_type='v_prediction'"):
        DDPMSampler(rescale_betas_zero_snr=True)
    sampler = DDPMSampler(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    sampler.set_timesteps(5)
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 3))
    out = sampler.step(np.tanh(x), 999, x, noise=np.zeros_like(x))
    assert np.all(np.isfinite(out.prev_sample))


def test_dynamic_threshold():
    rng = np.random.default_rng(0)
    x = (4.0 * rng.standard_normal((3, 5, 5, 2))).astype(np.float32)
    x[1] *= 0.1  # a sample whose quantile is below 1: plain clipping to [-1, 1]
    y = dynamic_threshold(x, ratio=0.9, max_value=2.5)
    s = np.clip(np.quantile(np.abs(x.reshape(3, -1)), 0.9, axis=1), 1.0, 2.5)
    np.testing.assert_allclose(y, np.clip(x, -s[:, None, None, None], s[:, None, None, None]) / s[:, None, None, None],
                               rtol=1e-6)  # fmt: skip
    assert y.dtype == np.float32 and np.abs(y).max() <= 1.0
    np.testing.assert_array_equal(y[1], np.clip(x[1], -1, 1))
    np.testing.assert_array_equal(dynamic_threshold(x, 0.995, 1.0), np.clip(x, -1, 1))  # max_value 1 is clipping


def test_ddpm_keeps_float32():
    sampler = DDPMSampler()
    sampler.set_timesteps(10)
    x = np.ones((1, 2, 2, 3), np.float32)
    out = sampler.step(np.tanh(x), sampler.timesteps[0], x, rng=np.random.default_rng(0))
    assert out.prev_sample.dtype == np.float32 and out.pred_original_sample.dtype == np.float32


def test_ddpm_bad_input():
    with pytest.raises(ValueError, match="variance_type must be one of"):
        DDPMSampler(variance_type="fixed_medium")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DDPMSampler(prediction_type="x0")
    with pytest.raises(ValueError, match="sample_max_value must be > 0"):
        DDPMSampler(sample_max_value=0.0)
    sampler = DDPMSampler()
    x = np.zeros((1, 2, 2, 3), np.float32)
    with pytest.raises(RuntimeError, match="DDPMSampler: call set_timesteps"):
        sampler.step(x, 900, x)
    sampler.set_timesteps(10)
    with pytest.raises(ValueError, match=r"model_output must have shape \(1, 2, 2, 3\) \(the shape of sample\)"):
        sampler.step(np.zeros((1, 2, 2, 6), np.float32), 900, x)
    learned = DDPMSampler(variance_type="learned_range")
    learned.set_timesteps(10)
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 6\) \(twice the sample's 3 channels on the last axis"):
        learned.step(x, 900, x)
    with pytest.raises(ValueError, match="timestep 901 is not in"):
        sampler.step(x, 901, x)
