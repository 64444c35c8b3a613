"""DDIMSampler: full-loop parity with diffusers' DDIMScheduler, DDIM Eq. 12/16 properties, pitfalls 1, 4, 9, 11."""

import math

import numpy as np
import pytest
from fixtures.cases_samplers_ddpm_ddim import CASES, fake_model_np, has_uneven_gaps
from helpers import SOURCES, reference
from hypothesis import given
from hypothesis import strategies as st

from diffusion_np.diffusion import posterior_coefficients, q_sample, v_target
from diffusion_np.samplers.ddim import DDIMSampler
from diffusion_np.samplers.ddpm import DDPMSampler
from diffusion_np.samplers.loop import sample

AREA = "samplers_ddpm_ddim"
DDIM_CASES = [name for name, case in CASES.items() if case[0] == "ddim"]
UNEVEN_CASES = [name for name in DDIM_CASES if has_uneven_gaps(name)]
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(params=SOURCES, scope="module")
def diffusers_cases(request):
    return reference(AREA, request.param)


def _replay(name, case, **options):
    """Our loop on the case's config (and ``options``), x_T and recorded per-step noise."""
    _, config, steps, step_kwargs = CASES[name]
    sampler = DDIMSampler(**config, **options)
    model = lambda x, t: fake_model_np(x, t, sampler.num_train_timesteps, False)  # noqa: E731
    x = sample(model, case["x_T"].shape, sampler, steps, noise=case["x_T"], step_noise=list(case["step_noise"]),
               progress=False, **step_kwargs)  # fmt: skip
    np.testing.assert_array_equal(sampler.timesteps, case["timesteps"], err_msg=f"{name}: timesteps")
    return x


def _rel_err(ours, ref):
    """max |ours - ref| relative to the reference sample's scale (at least 1)."""
    return float(np.max(np.abs(ours - ref)) / max(1.0, float(np.max(np.abs(ref)))))


@pytest.mark.parametrize("name", DDIM_CASES)
def test_ddim_full_loop_matches_diffusers(diffusers_cases, name):
    # float32 loops on both sides; diffusers keeps alpha_bar in float32, we in float64 (measured rel <= 3e-6)
    err = _rel_err(_replay(name, diffusers_cases[name]), diffusers_cases[name]["out"])
    assert err <= 1e-5, f"{name}: max abs diff relative to scale {err:.2e}"


# --- an independent float64 DDIM, written out from the paper, for where diffusers is not the reference ---


def _alpha_bar_f64(config):
    """alpha_bar from scratch (not diffusion_np.schedules): linear or scaled_linear, T = 1000."""
    if config.get("beta_schedule", "linear") == "linear":
        betas = np.linspace(1e-4, 0.02, 1000)
    else:
        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return np.cumprod(1.0 - betas)


def _ddim_eq12(config, timesteps, x_T, step_noise, eta, prev_of):
    """DDIM Eq. 12 with sigma of Eq. 16 in float64; prev_of(i, t) picks the previous timestep."""
    ab = _alpha_bar_f64(config)
    final = 1.0 if config.get("set_alpha_to_one", True) else ab[0]
    x = x_T.astype(np.float64)
    for i, t in enumerate(timesteps):
        out = fake_model_np(x, t, 1000, False)
        prev = prev_of(i, t)
        ab_t, ab_p = ab[t], (ab[prev] if prev >= 0 else final)
        if config.get("prediction_type", "epsilon") == "epsilon":
            eps = out
            x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        else:  # v_prediction
            x0 = math.sqrt(ab_t) * x - math.sqrt(1 - ab_t) * out
            eps = math.sqrt(ab_t) * out + math.sqrt(1 - ab_t) * x
        sigma = eta * math.sqrt((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p))
        x = math.sqrt(ab_p) * x0 + math.sqrt(1 - ab_p - sigma**2) * eps + sigma * step_noise[i]
    return x


@pytest.mark.parametrize("name", UNEVEN_CASES)
def test_pitfall_01_stride_rule_is_diffusers_and_the_sequence_rule_walks_the_sequence(diffusers_cases, name):
    _, config, steps, step_kwargs = CASES[name]
    case = diffusers_cases[name]
    ts, T = case["timesteps"], 1000
    # the sequence has uneven gaps here, so t - T // N is not its next entry
    assert set((-np.diff(ts)).tolist()) != {T // steps}, ts
    sequence_prev = lambda i, t: int(ts[i + 1]) if i + 1 < len(ts) else -1  # noqa: E731
    stride_prev = lambda i, t: int(t) - T // steps  # noqa: E731
    args = (config, ts, case["x_T"], case["step_noise"], step_kwargs["eta"])
    by_sequence, by_stride = _ddim_eq12(*args, sequence_prev), _ddim_eq12(*args, stride_prev)
    # diffusers is Eq. 12 with prev = t - T // N, and so is our default; the sequence rule is Eq. 12 walking
    # the sequence, and the two differ visibly
    assert _rel_err(case["out"], by_stride) <= 1e-5
    assert _rel_err(_replay(name, case), by_stride) <= 1e-5
    by_our_sequence = _replay(name, case, prev_timestep_rule="sequence")
    assert _rel_err(by_our_sequence, by_sequence) <= 1e-5
    assert _rel_err(by_our_sequence, case["out"]) > 1e-3


@pytest.mark.parametrize("rule", ["stride", "sequence"])
@pytest.mark.parametrize(
    "config,steps,eta",
    [
        ({"timestep_spacing": "linspace", "clip_sample": False}, 50, 0.0),
        ({"timestep_spacing": "trailing", "clip_sample": False, "prediction_type": "v_prediction"}, 7, 1.0),
        ({**SD, "timestep_spacing": "linspace", "clip_sample": False, "set_alpha_to_one": False}, 13, 0.7),
    ],
)
def test_ddim_matches_independent_eq12_on_uneven_sequences(config, steps, eta, rule):
    rng = np.random.default_rng(5)
    x_T = rng.standard_normal((2, 3, 3, 2)).astype(np.float32)
    sampler = DDIMSampler(**config, prev_timestep_rule=rule)
    sampler.set_timesteps(steps)
    noise = rng.standard_normal((len(sampler.timesteps),) + x_T.shape).astype(np.float32)
    ours = sample(lambda x, t: fake_model_np(x, t, 1000, False), x_T.shape, sampler, steps, noise=x_T,
                  step_noise=list(noise), progress=False, eta=eta)  # fmt: skip
    ts = sampler.timesteps
    if rule == "sequence":
        prev_of = lambda i, t: int(ts[i + 1]) if i + 1 < len(ts) else -1  # noqa: E731
    else:
        prev_of = lambda i, t: int(t) - 1000 // steps  # noqa: E731
    ref = _ddim_eq12(config, ts, x_T, noise, eta, prev_of)
    assert _rel_err(ours, ref) <= 1e-5  # our float32 loop against a float64 one


def test_stride_rule_last_step_of_trailing_goes_to_alpha_bar_of_t_minus_T_over_N():
    # trailing, T = 1000, N = 7: the sequence ends at t = 142, and 142 - 142 = 0 >= 0, so the last step lands on
    # alpha_bar[0], not on the final alpha_bar (1 with set_alpha_to_one), as in diffusers; the sequence rule
    # lands on the final alpha_bar
    stride = DDIMSampler(timestep_spacing="trailing", clip_sample=False)
    sequence = DDIMSampler(timestep_spacing="trailing", clip_sample=False, prev_timestep_rule="sequence")
    for s in (stride, sequence):
        s.set_timesteps(7)
    t = int(stride.timesteps[-1])
    assert t == 142 and stride.previous_timestep(t) == 0 and sequence.previous_timestep(t) == -1
    assert stride.alpha_bar_prev(t) == stride.alpha_bar[0] and sequence.alpha_bar_prev(t) == 1.0
    assert stride.previous_timestep(int(stride.timesteps[0])) == 999 - 142 != int(stride.timesteps[1])


# --- DDIM Eq. 16 variance and pitfall 9 ---


@pytest.mark.parametrize("t,prev,expected", [(420, 400, 0.14771), (980, 960, 0.32460), (487, 486, 0.00979),
                                             (999, 998, 0.02)])  # fmt: skip
def test_ddim_variance_reference_values(t, prev, expected):
    sampler = DDIMSampler(prev_timestep_rule="sequence")  # linear 1e-4 .. 0.02, T = 1000
    sampler.timesteps = np.array([t, prev])  # a custom two-step sequence
    assert sampler.variance(t) == pytest.approx(expected, abs=1e-5)  # REFERENCE.md truncates to 5 decimals


@given(t=st.integers(1, 999), data=st.data())
def test_pitfall_09_ddim_eta1_variance_is_ddpm_fixed_small_not_fixed_large(t, data):
    prev = data.draw(st.integers(0, t - 1))
    ddim, small, large = (
        DDIMSampler(prev_timestep_rule="sequence"),
        DDPMSampler(variance_type="fixed_small"),
        DDPMSampler(variance_type="fixed_large"),
    )
    for s in (ddim, small, large):
        s.timesteps = np.array([t, prev])
    assert ddim.variance(t) == pytest.approx(small.variance(t), rel=1e-12)
    assert ddim.variance(t) < large.variance(t)
    # and the noise a step actually adds at eta = 1 has std sqrt(variance) (pitfall 10)
    x = np.random.default_rng(t).standard_normal((1, 2, 2, 3))
    eps, z = np.tanh(x), np.ones_like(x)
    added = ddim.step(eps, t, x, eta=1.0, noise=z).prev_sample - ddim.step(eps, t, x, eta=1.0, noise=0 * z).prev_sample
    np.testing.assert_allclose(added, math.sqrt(small.variance(t)), rtol=1e-7, atol=1e-12)


@given(seed=st.integers(0, 2**16), step=st.integers(0, 9))
def test_ddim_eta0_is_deterministic(seed, step):
    sampler = DDIMSampler(clip_sample=False)
    sampler.set_timesteps(10)
    t = sampler.timesteps[step]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    eps = np.tanh(x)
    a = sampler.step(eps, t, x, eta=0.0, noise=rng.standard_normal(x.shape).astype(np.float32)).prev_sample
    b = sampler.step(eps, t, x, eta=0.0, noise=rng.standard_normal(x.shape).astype(np.float32)).prev_sample
    np.testing.assert_array_equal(a, b)


@given(
    seed=st.integers(0, 2**16), eta=st.floats(0.0, 1.0), spacing=st.sampled_from(["leading", "linspace", "trailing"])
)
def test_ddim_no_noise_at_the_last_step_with_set_alpha_to_one(seed, eta, spacing):
    sampler = DDIMSampler(set_alpha_to_one=True, clip_sample=False, timestep_spacing=spacing)
    sampler.set_timesteps(10)
    t = sampler.timesteps[-1]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, 2, 3))
    out = [sampler.step(np.tanh(x), t, x, eta=eta, noise=rng.standard_normal(x.shape)) for _ in range(2)]
    np.testing.assert_array_equal(out[0].prev_sample, out[1].prev_sample)
    np.testing.assert_allclose(out[0].prev_sample, out[0].pred_original_sample, rtol=1e-12)  # alpha_bar_prev = 1


def test_ddim_last_step_without_set_alpha_to_one_lands_on_alpha_bar_0_and_adds_its_noise():
    # Stable Diffusion's config: the last step goes to the noise level of t = 0, as diffusers does
    sampler = DDIMSampler(**SD, set_alpha_to_one=False, clip_sample=False, steps_offset=1)
    sampler.set_timesteps(50)
    t = int(sampler.timesteps[-1])
    ab_t, ab_0 = sampler.alpha_bar[t], sampler.alpha_bar[0]
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 4))
    eps = np.tanh(x)
    x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    np.testing.assert_allclose(sampler.step(eps, t, x).prev_sample,
                               math.sqrt(ab_0) * x0 + math.sqrt(1 - ab_0) * eps, rtol=1e-12)  # fmt: skip
    z = np.ones_like(x)
    added = sampler.step(eps, t, x, eta=1.0, noise=z).prev_sample - sampler.step(eps, t, x, eta=1.0, noise=0 * z)[0]
    np.testing.assert_allclose(added, math.sqrt(posterior_coefficients(ab_t, ab_0).variance), rtol=1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_pitfall_11_every_prediction_type_recovers_eps(prediction_type):
    # given the exact (x0, eps) behind x_t, deterministic DDIM must land exactly on q(x_prev | x0) with the same eps;
    # with prediction_type="sample" that needs eps recomputed from x0 (pitfall 11)
    sampler = DDIMSampler(prediction_type=prediction_type, clip_sample=False)
    sampler.set_timesteps(20)
    t, prev = int(sampler.timesteps[3]), int(sampler.timesteps[4])
    rng = np.random.default_rng(1)
    x0, eps = rng.standard_normal((2, 3, 3, 4)), rng.standard_normal((2, 3, 3, 4))
    x_t = q_sample(x0, t, eps, sampler.alpha_bar)
    output = {"epsilon": eps, "sample": x0, "v_prediction": v_target(x0, eps, t, sampler.alpha_bar)}[prediction_type]
    result = sampler.step(output, t, x_t, eta=0.0)
    np.testing.assert_allclose(result.pred_original_sample, x0, atol=1e-10)
    np.testing.assert_allclose(result.prev_sample, q_sample(x0, prev, eps, sampler.alpha_bar), atol=1e-10)


def test_use_clipped_model_output_recomputes_eps_from_the_clipped_x0():
    sampler = DDIMSampler(clip_sample=True)
    sampler.set_timesteps(10)
    t, prev = int(sampler.timesteps[5]), int(sampler.timesteps[6])
    ab_t, ab_p = sampler.alpha_bar[t], sampler.alpha_bar[prev]
    x = 3.0 * np.random.default_rng(2).standard_normal((1, 4, 4, 2))
    eps = np.tanh(x)
    x0 = np.clip((x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t), -1, 1)
    eps_clipped = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    plain = sampler.step(eps, t, x).prev_sample
    clipped = sampler.step(eps, t, x, use_clipped_model_output=True).prev_sample
    np.testing.assert_allclose(plain, math.sqrt(ab_p) * x0 + math.sqrt(1 - ab_p) * eps, rtol=1e-12)
    np.testing.assert_allclose(clipped, math.sqrt(ab_p) * x0 + math.sqrt(1 - ab_p) * eps_clipped, rtol=1e-12)
    assert not np.allclose(plain, clipped)


def test_pitfall_04_zero_terminal_snr_needs_v_prediction():
    with pytest.raises(ValueError, match="v_prediction"):
        DDIMSampler(rescale_betas_zero_snr=True, prediction_type="epsilon")
    sampler = DDIMSampler(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
                          clip_sample=False)  # fmt: skip
    sampler.set_timesteps(10)
    assert sampler.timesteps[0] == 999 and sampler.alpha_bar[999] == 0.0
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 3)).astype(np.float32)
    out = sampler.step(np.tanh(x), 999, x, eta=1.0, noise=np.zeros_like(x))
    np.testing.assert_allclose(out.pred_original_sample, -np.tanh(x))  # x0 = -v where alpha_bar = 0
    assert np.all(np.isfinite(out.prev_sample))


def test_ddim_keeps_float32():
    sampler = DDIMSampler()
    sampler.set_timesteps(10)
    x = np.ones((1, 2, 2, 3), np.float32)
    out = sampler.step(np.tanh(x), sampler.timesteps[0], x, eta=1.0, rng=np.random.default_rng(0))
    assert out.prev_sample.dtype == np.float32 and out.pred_original_sample.dtype == np.float32


def test_ddim_bad_input():
    sampler = DDIMSampler()
    x = np.zeros((1, 2, 2, 3), np.float32)
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        sampler.step(x, 900, x)
    sampler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 901 is not in this sampler's timesteps"):
        sampler.step(x, 901, x)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sampler.step(x, 900, x, eta=-0.1)
    with pytest.raises(ValueError, match="eta=3.0 is too large"):
        sampler.step(x, 900, x, eta=3.0)
    with pytest.raises(
        ValueError, match=r"model_output must have the sample's shape \(1, 2, 2, 3\), got \(1, 2, 2, 6\)"
    ):
        sampler.step(np.zeros((1, 2, 2, 6), np.float32), 900, x)
    with pytest.raises(ValueError, match="noise must have the sample's shape"):
        sampler.step(x, 900, x, eta=1.0, noise=np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="clip_sample_range must be > 0"):
        DDIMSampler(clip_sample_range=0.0)
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio must lie in"):
        DDIMSampler(dynamic_thresholding_ratio=1.5)
    with pytest.raises(ValueError, match="prev_timestep_rule must be one of"):
        DDIMSampler(prev_timestep_rule="next")
