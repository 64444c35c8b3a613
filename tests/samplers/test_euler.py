"""Euler and Euler-ancestral samplers: diffusers parity, sigma schedules, pitfall 7, a Gaussian oracle."""

import math

import numpy as np
import pytest
from fixtures.cases_samplers_kdiff import fake_model, parity_errors
from helpers import SOURCES, reference, sample_loop, sigma_gaussian_oracle
from hypothesis import given
from hypothesis import strategies as st

from diffusion_np.samplers.euler import EulerSampler
from diffusion_np.samplers.euler_ancestral import EulerAncestralSampler, ancestral_sigmas
from diffusion_np.samplers.timesteps import karras_sigmas, sigma_to_t
from diffusion_np.schedules import NoiseSchedule

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
CLASSES = {"euler": EulerSampler, "euler_ancestral": EulerAncestralSampler}


# ---- parity with diffusers -------------------------------------------------------------------
@pytest.fixture(params=SOURCES, scope="module")
def diffusers_cases(request):
    return {k: v for k, v in reference("samplers_kdiff", request.param).items() if str(v["kind"]) in CLASSES}


def test_euler_and_ancestral_full_loops_match_diffusers(diffusers_cases):
    assert len(diffusers_cases) >= 15
    for name, case in diffusers_cases.items():
        for what, (error, bar) in parity_errors(case, CLASSES[str(case["kind"])]).items():
            assert error <= bar, f"{name}: {what} differs from diffusers by {error:.2e} (bar {bar:.0e})"


# ---- sigma schedules --------------------------------------------------------------------------
configs = st.fixed_dictionaries(
    {
        "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]),
        "timestep_spacing": st.sampled_from(["linspace", "leading", "trailing"]),
        "use_karras_sigmas": st.booleans(),
    }
)


@given(config=configs, steps=st.integers(1, 120))
def test_euler_sigmas_strictly_decrease_to_zero(config, steps):
    sampler = EulerSampler(**config)
    sampler.set_timesteps(steps)
    sig = sampler.sigmas
    assert sig.shape == (steps + 1,) and sampler.timesteps.shape == (steps,)
    assert sig[-1] == 0.0 and np.all(sig[:-1] > 0)
    assert np.all(np.diff(sig) < 0)
    assert np.all(np.diff(sampler.timesteps) <= 0)


@given(steps=st.integers(2, 100), schedule=st.sampled_from(["linear", "scaled_linear"]))
def test_karras_sigmas_follow_edm_eq5(steps, schedule):
    sampler = EulerSampler(beta_schedule=schedule, use_karras_sigmas=True)  # linspace: full sigma range
    sampler.set_timesteps(steps)
    sig = sampler.sigmas[:-1]
    np.testing.assert_allclose(sig[0], sampler.train_sigmas[-1], rtol=1e-12)  # sigma_max
    np.testing.assert_allclose(sig[-1], sampler.train_sigmas[0], rtol=1e-12)  # sigma_min
    inv_rho = sig ** (1 / 7)  # evenly spaced in sigma^(1/rho), rho = 7
    np.testing.assert_allclose(np.diff(inv_rho), np.full(steps - 1, inv_rho[1] - inv_rho[0]), rtol=1e-9, atol=1e-12)
    # the model is told the timestep whose (log-interpolated) sigma is sigma_i
    t = sampler.timesteps
    lo = np.floor(t).astype(int).clip(max=len(sampler.train_sigmas) - 2)
    log_s = np.log(sampler.train_sigmas)
    np.testing.assert_allclose(np.exp(log_s[lo] + (t - lo) * (log_s[lo + 1] - log_s[lo])), sig, rtol=1e-9)


def test_karras_sigmas_closed_form_and_sigma_to_t_inverts_training_sigmas():
    np.testing.assert_allclose(karras_sigmas(3, 0.1, 10.0), [10.0, ((10**(1 / 7) + 0.1**(1 / 7)) / 2) ** 7, 0.1])
    sig = NoiseSchedule.from_config(**SD).sampling_sigmas
    k = np.array([0, 1, 17, 500, 998, 999])
    np.testing.assert_allclose(sigma_to_t(sig[k], np.log(sig)), k, atol=1e-9)
    # below sigma_min / above sigma_max clamp to the ends
    np.testing.assert_allclose(sigma_to_t(np.array([1e-4, 0.0, 1e3]), np.log(sig)), [0, 0, 999])


def test_zero_snr_sigma_max_is_finite_as_in_diffusers():
    sampler = EulerSampler(**SD, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                           timestep_spacing="trailing")
    sampler.set_timesteps(10)
    np.testing.assert_allclose(sampler.sigmas[0], math.sqrt((1 - 2.0**-24) / 2.0**-24))  # ~4096
    assert sampler.init_noise_sigma == sampler.sigmas[0]
    # the schedule keeps its honest sigma = inf; the samplers' table replaces only that entry
    schedule = sampler.schedule
    assert schedule.sigmas[-1] == np.inf and schedule.sampling_sigmas[-1] == sampler.sigmas[0]
    np.testing.assert_array_equal(schedule.sampling_sigmas[:-1], schedule.sigmas[:-1])


# ---- pitfall 7: both scalings ------------------------------------------------------------------
def test_pitfall7_init_noise_sigma_and_scale_model_input():
    # linspace/trailing: x_N ~ N(0, sigma_max^2); SD's sigma_max = 14.6146 (REFERENCE)
    sampler = EulerSampler(**SD)
    sampler.set_timesteps(50)
    assert sampler.init_noise_sigma == pytest.approx(14.6146, abs=1e-4)
    # leading (SD 1.5's config, steps_offset=1): first t is 981, and the extra +1 keeps Var[x_t] = 1
    leading = EulerSampler(**SD, timestep_spacing="leading", steps_offset=1)
    leading.set_timesteps(50)
    assert leading.timesteps[0] == 981
    sigma_981 = leading.train_sigmas[981]
    assert leading.init_noise_sigma == pytest.approx(math.sqrt(sigma_981**2 + 1), rel=1e-12)
    # the model sees x / sqrt(sigma^2 + 1) = sqrt(alpha_bar_t) x, which has unit variance at the start
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32) * np.float32(sampler.init_noise_sigma)
    x_in = sampler.scale_model_input(x, sampler.timesteps[0])
    assert x_in.dtype == np.float32
    np.testing.assert_allclose(x_in, x / math.sqrt(14.6146**2 + 1), rtol=1e-5)
    assert abs(float(x_in.std()) - 1.0) < 0.05
    # forgetting scale_model_input breaks sampling: with a Gaussian oracle the std comes out far from s
    s, x_init = 0.5, np.random.default_rng(1).standard_normal((2000, 4))
    right = EulerSampler(**SD, use_karras_sigmas=True)
    right.set_timesteps(200)
    good = sample_loop(right, sigma_gaussian_oracle(right, s), x_init)
    right.set_timesteps(200)
    bad = sample_loop(right, sigma_gaussian_oracle(right, s), x_init, scale_input=False)
    assert abs(good.std() / s - 1) < 0.05
    assert abs(bad.std() / s - 1) > 0.5


# ---- ancestral ----------------------------------------------------------------------------------
@given(
    sigma_from=st.floats(1e-3, 1e3),
    frac=st.one_of(st.just(0.0), st.floats(1e-6, 1.0, exclude_max=True)),  # no sigma_to^2 underflow
    eta=st.floats(0.0, 1.0),
)
def test_ancestral_split_preserves_sigma_to(sigma_from, frac, eta):
    sigma_to = sigma_from * frac
    sigma_up, sigma_down = ancestral_sigmas(sigma_from, sigma_to, eta)
    assert 0.0 <= sigma_up <= sigma_to and 0.0 <= sigma_down <= sigma_to
    assert sigma_up**2 + sigma_down**2 == pytest.approx(sigma_to**2, rel=1e-12, abs=1e-300)
    if eta == 1.0 and sigma_to > 0:  # k-diffusion: sigma_down = sigma_to^2 / sigma_from
        assert sigma_down == pytest.approx(sigma_to**2 / sigma_from, rel=1e-9)
    if eta == 0.0:
        assert sigma_up == 0.0 and sigma_down == pytest.approx(sigma_to, rel=1e-15)


def test_ancestral_eta0_is_euler_and_no_noise_at_the_last_step():
    x_init = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    euler, ancestral = EulerSampler(**SD), EulerAncestralSampler(**SD, eta=0.0)
    euler.set_timesteps(9)
    ancestral.set_timesteps(9)
    np.testing.assert_array_equal(sample_loop(euler, fake_model, x_init), sample_loop(ancestral, fake_model, x_init))
    # last step: sigma_to = 0, so the injected noise must not matter
    ancestral = EulerAncestralSampler(**SD)
    ancestral.set_timesteps(3)
    x, out = x_init, []
    for t in ancestral.timesteps[:-1]:
        x = ancestral.step(fake_model(ancestral.scale_model_input(x, t), t), t, x, noise=np.zeros_like(x)).prev_sample
    t = ancestral.timesteps[-1]
    model_output = fake_model(ancestral.scale_model_input(x, t), t)
    for noise in (np.zeros_like(x), np.full_like(x, 1e6)):
        ancestral._step_index = len(ancestral.timesteps) - 1
        out.append(ancestral.step(model_output, t, x, noise=noise).prev_sample)
    np.testing.assert_array_equal(out[0], out[1])


def test_ancestral_draws_from_rng_reproducibly():
    x_init = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    runs = []
    for seed in (5, 5, 6):
        sampler = EulerAncestralSampler(**SD)
        sampler.set_timesteps(5)
        runs.append(sample_loop(sampler, fake_model, x_init, rng=np.random.default_rng(seed)))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])
    assert runs[0].dtype == np.float32


# ---- a meaningful end-to-end check: Gaussian data, exact model ----------------------------------
@pytest.mark.parametrize(
    "cls,kwargs,steps,tol",
    [
        # first-order methods: bias ~ C/N (about 1.5% at these N); 32000 values give a std error of 0.4%
        (EulerSampler, {"use_karras_sigmas": True}, 200, 0.03),
        (EulerAncestralSampler, {}, 400, 0.035),
    ],
)
def test_gaussian_oracle_recovers_data_std(cls, kwargs, steps, tol):
    s = 0.5
    sampler = cls(**SD, **kwargs)
    sampler.set_timesteps(steps)
    x_init = np.random.default_rng(0).standard_normal((4000, 8))
    out = sample_loop(sampler, sigma_gaussian_oracle(sampler, s), x_init, rng=np.random.default_rng(1))
    assert abs(out.std() / s - 1) < tol, out.std()
    assert abs(out.mean()) < 4 * s / math.sqrt(out.size) + 0.01


def test_add_noise_is_x0_plus_sigma_noise():
    sampler = EulerSampler(**SD)
    sampler.set_timesteps(10)
    x0 = np.ones((2, 3), np.float32)
    noise = np.full((2, 3), 2.0, np.float32)
    t = sampler.timesteps[[0, 4]]
    out = sampler.add_noise(x0, noise, t)
    np.testing.assert_allclose(out, np.broadcast_to(1 + 2 * sampler.sigmas[[0, 4]][:, None], (2, 3)), rtol=1e-6)
    np.testing.assert_allclose(sampler.add_noise(x0, noise, t[1]), 1 + 2 * sampler.sigmas[4], rtol=1e-6)


# ---- misuse --------------------------------------------------------------------------------------
def test_bad_usage_raises_clear_errors():
    x = np.zeros((1, 2), np.float32)
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        EulerSampler().step(x, 999.0, x)
    with pytest.raises(ValueError, match="epsilon prediction cannot"):
        EulerSampler(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="final_sigmas_type must be one of"):
        EulerSampler(final_sigmas_type="one")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        EulerAncestralSampler(eta=-1.0)
    sampler = EulerSampler(**SD)
    sampler.set_timesteps(2)
    with pytest.raises(ValueError, match="is not one of this sampler's timesteps"):
        sampler.step(x, 500.5, x)
    sampler.step(x, sampler.timesteps[0], x)
    with pytest.raises(ValueError, match=r"expected timestep 0\.0 \(step 1\)"):
        sampler.step(x, sampler.timesteps[0], x)
    sampler.step(x, sampler.timesteps[1], x)
    with pytest.raises(RuntimeError, match="all 2 steps are done"):
        sampler.step(x, sampler.timesteps[1], x)
    ancestral = EulerAncestralSampler(**SD)
    ancestral.set_timesteps(2)
    with pytest.raises(ValueError, match="noise must have the sample's shape"):
        ancestral.step(x, ancestral.timesteps[0], x, noise=np.zeros((2, 2), np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [EulerSampler, EulerAncestralSampler])
def test_cupy_matches_numpy(cls):
    import cupy

    x_init = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    noises = np.random.default_rng(1).standard_normal((6, 2, 4, 4, 3)).astype(np.float32)
    outs = []
    for xp in (np, cupy):
        sampler = cls(**SD)
        sampler.set_timesteps(6)
        x = xp.asarray(x_init) * sampler.init_noise_sigma
        for i, t in enumerate(sampler.timesteps):
            model_output = xp.tanh(0.5 * sampler.scale_model_input(x, t) + float(t) / 1000)
            x = sampler.step(model_output, t, x, noise=xp.asarray(noises[i])).prev_sample
        assert isinstance(x, xp.ndarray) and x.dtype == np.float32
        outs.append(cupy.asnumpy(x) if xp is cupy else x)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
