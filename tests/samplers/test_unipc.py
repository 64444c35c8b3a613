"""UniPCSampler: diffusers parity (golden and live over random configs), UniP = DPM-Solver++, UniC, validation."""

import math

import numpy as np
import pytest
from fixtures.cases_samplers_kdiff import fake_model
from fixtures.cases_samplers_multistep import CASES, replay
from helpers import SOURCES, reference, sample_loop
from hypothesis import given
from hypothesis import strategies as st

from diffusion_np.samplers.dpm_solver import DPMSolverMultistepSampler
from diffusion_np.samplers.unipc import UniPCSampler
from diffusion_np.testing import check_timesteps
from diffusion_np.testing.strategies import inference_steps

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def gaussian_model(sampler, s):
    """Exact eps of data N(0, s^2 I): eps*(x_t) = x_t sqrt(1 - ab) / (ab s^2 + 1 - ab)."""
    ab = sampler.alpha_bar
    return lambda x_t, t: x_t * (math.sqrt(1.0 - ab[t]) / (ab[t] * s**2 + 1.0 - ab[t]))


# ------------------------------------------------------------------------------ golden parity
@pytest.fixture(params=SOURCES, scope="module")
def diffusers_cases(request):
    return {k: v for k, v in reference("samplers_multistep", request.param).items() if str(v["kind"]) == "unipc"}


def test_unipc_full_loops_match_diffusers(diffusers_cases):
    """float32 loops; diffusers' sigmas are float32, ours float64 (measured <= 1.1e-6 relative)."""
    assert len(diffusers_cases) == sum(kind == "unipc" for kind, _, _ in CASES.values())
    for name, case in diffusers_cases.items():
        sampler, err = replay(case, UniPCSampler)
        # diffusers' sigmas come from a float32 cumprod: relative 1e-5 at sigma_min, 1e-6 of sigma_max
        np.testing.assert_allclose(sampler.sigmas, case["sigmas"], rtol=2e-5, atol=0, err_msg=f"{name}: sigmas")
        assert err <= 1e-5, f"{name}: final sample differs from diffusers by {err:.2e} (relative)"


# ------------------------------------------------------------------------------ live parity, float64
@st.composite
def unipc_configs(draw):
    """Random diffusers configs, leaving out the two where diffusers itself returns NaN/inf:
    B(h) = -h (bh1) on a last step to sigma = 0 (-inf * 0), and order 2 into sigma = 0
    (lower_order_final=False: it divides by h = inf); ours is first order there and finite."""
    T = draw(st.sampled_from([1000, 1000, 500, 100]))
    spacing = draw(st.sampled_from(["linspace", "leading", "trailing"]))
    N = draw(st.integers(1, min(T // 2, 60)))
    prediction_type = draw(st.sampled_from(["epsilon", "v_prediction", "sample"]))
    final = draw(st.sampled_from(["zero", "sigma_min"]))
    solver_type = draw(st.sampled_from(["bh1", "bh2"]) if final == "sigma_min" else st.just("bh2"))
    order = draw(st.sampled_from([1, 2]))
    lower_order_final = draw(st.booleans()) if final == "sigma_min" or order == 1 else True
    zero_snr = prediction_type != "epsilon" and spacing == "trailing" and draw(st.booleans())
    karras = not zero_snr and 2 <= N <= 30 and draw(st.integers(0, 3)) == 0  # N = 1: a single Karras sigma
    config = {
        "num_train_timesteps": T,
        "beta_schedule": draw(st.sampled_from(["linear", "scaled_linear"] if karras else
                                              ["linear", "scaled_linear", "squaredcos_cap_v2"])),
        "beta_start": draw(st.sampled_from([0.0001, 0.00085])),
        "beta_end": draw(st.sampled_from([0.012, 0.02])),
        "prediction_type": prediction_type,
        "timestep_spacing": spacing,
        "steps_offset": draw(st.integers(0, 1)) if spacing == "leading" else 0,
        "solver_order": order,
        "solver_type": solver_type,
        "lower_order_final": lower_order_final,
        "final_sigmas_type": final,
        "rescale_betas_zero_snr": zero_snr,
        "use_karras_sigmas": karras,
        "disable_corrector": draw(st.lists(st.integers(0, N), max_size=2)),
    }
    return config, N


@pytest.mark.crosscheck
@given(case=unipc_configs(), seed=st.integers(0, 2**16))
def test_unipc_matches_diffusers_float64_on_random_configs(case, seed):
    """Same timesteps; sigmas equal to float32 rounding; then both loops in float64 on our sigmas."""
    import diffusers
    import torch

    config, N = case
    ref = diffusers.UniPCMultistepScheduler(**config)
    ref.set_timesteps(N)
    ours = UniPCSampler(**config)
    ours.set_timesteps(N)
    ref_t = ref.timesteps.numpy()
    if len(ref_t) != N or len(set(ref_t.tolist())) != N:
        return  # diffusers' trailing arange with an (N+1)-th entry, or Karras timesteps rounding together
    np.testing.assert_array_equal(ours.timesteps, ref_t)
    # float32 sigmas: relative 1e-5 where alpha_bar is tiny (cosine: sigma_max = 2e4); near t = 0,
    # 1 - alpha_bar keeps few digits, hence also an absolute part relative to sigma_max (as kdiff)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=2e-5, atol=5e-6 * float(ours.sigmas.max()))
    ref.sigmas = torch.from_numpy(ours.sigmas.copy())  # the step math in float64 on the same noise levels
    x_init = np.random.default_rng(seed).standard_normal((2, 3, 4, 4))
    x = torch.from_numpy(x_init.copy())
    T = config["num_train_timesteps"]
    for t in ref.timesteps:
        x = ref.step(fake_model(x, t, T), t, x).prev_sample
    final = sample_loop(ours, lambda x, t: fake_model(x, t, T), x_init)
    scale = max(1.0, float(np.abs(x.numpy()).max()))
    assert float(np.abs(final - x.numpy()).max()) / scale <= 1e-10


# ------------------------------------------------------------------------------ properties
@given(cfg=inference_steps(max_T=1000, spacings=("linspace", "leading")), karras=st.booleans())
def test_unipc_schedule_is_dpm_solvers(cfg, karras):
    """UniPC lays out the steps as DPM-Solver++ does (N distinct timesteps, sigmas to exactly 0)."""
    T, N, spacing, offset = cfg
    kwargs = {"num_train_timesteps": T, "timestep_spacing": spacing, "steps_offset": offset,
              "use_karras_sigmas": karras and T >= 2 and N >= 2}
    if spacing == "leading" and N * (T // (N + 1)) + offset > T - 1:
        return
    unipc, dpm = UniPCSampler(**kwargs), DPMSolverMultistepSampler(**kwargs)
    try:
        dpm.set_timesteps(N)
    except ValueError as err:  # N + 1 points on T <= N timesteps can repeat one: refused, never stepped twice
        assert f"num_inference_steps={N} is too many" in str(err) and spacing != "trailing" and N >= T
        with pytest.raises(ValueError, match="is too many"):
            unipc.set_timesteps(N)
        return
    unipc.set_timesteps(N)
    np.testing.assert_array_equal(unipc.sigmas, dpm.sigmas)
    assert unipc.sigmas[-1] == 0.0 and len(unipc.sigmas) == N + 1
    if T >= 2 * N:  # N + 1 points on fewer than 2N training steps can round together (diffusers' layout)
        assert np.all(np.diff(unipc.sigmas) < 0)
        if not kwargs["use_karras_sigmas"]:  # Karras timesteps may round together
            check_timesteps(unipc.timesteps, T, N)


@given(steps=st.integers(1, 40), prediction_type=st.sampled_from(["epsilon", "v_prediction", "sample"]),
       spacing=st.sampled_from(["linspace", "leading", "trailing"]))
def test_predictor_alone_is_dpm_solver_2m(steps, prediction_type, spacing):
    """UniP-2 with B(h) = e^{-h} - 1 and rho = 1/2 is DPM-Solver++(2M): with every corrector off the two
    samplers agree step for step."""
    kwargs = {**SD, "prediction_type": prediction_type, "timestep_spacing": spacing}
    unipc = UniPCSampler(**kwargs, disable_corrector=list(range(steps)))
    dpm = DPMSolverMultistepSampler(**kwargs)
    x_init = np.random.default_rng(steps).standard_normal((2, 3, 2))
    model = lambda x, t: np.tanh(0.5 * x + float(t) / 1000)  # noqa: E731
    for sampler in (unipc, dpm):
        sampler.set_timesteps(steps)
    np.testing.assert_allclose(sample_loop(unipc, model, x_init), sample_loop(dpm, model, x_init),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2])
def test_point_mass_oracle_lands_on_x0(order, solver_type):
    """A constant x0 estimate makes every D zero: predictor and corrector are exact and the loop ends on x0."""
    x0 = np.random.default_rng(0).standard_normal((3, 4, 4, 2))
    x_init = np.random.default_rng(1).standard_normal(x0.shape)
    sampler = UniPCSampler(**SD, solver_order=order, solver_type=solver_type)
    sampler.set_timesteps(15)
    ab = sampler.alpha_bar
    oracle = lambda x_t, t: (x_t - math.sqrt(ab[t]) * x0) / math.sqrt(1.0 - ab[t])  # noqa: E731
    np.testing.assert_allclose(sample_loop(sampler, oracle, x_init), x0, rtol=0, atol=1e-10)


def test_gaussian_oracle_the_corrector_helps():
    """Data N(0, s^2 I): the exact eps is linear in x_t, so the probability-flow ODE maps x_T = 1 to
    s / sqrt(ab_T s^2 + 1 - ab_T) exactly. At 20 Karras steps the corrector cuts the error of the same
    predictor (measured: UniPC-1 0.028 vs DDIM 0.086, UniPC-2 0.0054 vs DPM-Solver++(2M) 0.013)."""
    s = 0.5
    errors = {}
    for name, sampler in (("ddim", DPMSolverMultistepSampler(**SD, solver_order=1, use_karras_sigmas=True)),
                          ("unipc-1", UniPCSampler(**SD, solver_order=1, use_karras_sigmas=True)),
                          ("dpm++2m", DPMSolverMultistepSampler(**SD, use_karras_sigmas=True)),
                          ("unipc-2", UniPCSampler(**SD, use_karras_sigmas=True))):
        sampler.set_timesteps(20)
        ab_T = 1.0 / (sampler.sigmas[0] ** 2 + 1.0)
        exact = s / math.sqrt(ab_T * s**2 + 1.0 - ab_T)
        errors[name] = abs(float(sample_loop(sampler, gaussian_model(sampler, s), np.ones(1))[0]) / exact - 1.0)
    assert errors["unipc-1"] < errors["ddim"] / 2.5, errors
    assert errors["unipc-2"] < errors["dpm++2m"] / 2, errors


def test_last_step_into_sigma_zero_is_first_order_and_finite():
    """lower_order_final=False asks for order 2 at the end; into sigma = 0 (h = inf) only order 1 exists."""
    x_init = np.random.default_rng(0).standard_normal((2, 4, 4, 3))
    model = lambda x, t: np.tanh(0.5 * x + float(t) / 1000)  # noqa: E731
    outs = []
    for lower_order_final in (True, False):
        sampler = UniPCSampler(**SD, lower_order_final=lower_order_final)
        sampler.set_timesteps(6)
        outs.append(sample_loop(sampler, model, x_init))
    assert np.all(np.isfinite(outs[1]))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_state_resets_and_determinism():
    sampler = UniPCSampler(**SD)
    x_init = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    model = lambda x, t: np.tanh(0.5 * x + float(t) / 1000)  # noqa: E731
    sampler.set_timesteps(7)
    first = sample_loop(sampler, model, x_init)
    sampler.set_timesteps(7)
    second = sample_loop(sampler, model, x_init)
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.float32 and first.shape == x_init.shape
    assert sampler.init_noise_sigma == 1.0


def test_unipc_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="predict_x0=False"):
        UniPCSampler(predict_x0=False)
    with pytest.raises(ValueError, match="solver_p"):
        UniPCSampler(solver_p=object())
    with pytest.raises(ValueError, match="thresholding=True"):
        UniPCSampler(thresholding=True)
    with pytest.raises(ValueError, match="solver_type must be one of"):
        UniPCSampler(solver_type="bh3")
    with pytest.raises(ValueError, match="solver_order must be 1 or 2"):
        UniPCSampler(solver_order=3)
    with pytest.raises(ValueError, match="disable_corrector must be a list"):
        UniPCSampler(disable_corrector=3)
    with pytest.raises(ValueError, match="epsilon prediction cannot"):
        UniPCSampler(rescale_betas_zero_snr=True)
    assert UniPCSampler(solver_type="midpoint").solver_type == "bh2"  # diffusers' mapping
    sampler = UniPCSampler(**SD)
    x = np.zeros((1, 2, 2, 1))
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        sampler.step(x, 999, x)
    sampler.set_timesteps(3)
    with pytest.raises(ValueError, match="model_output must have the sample's shape"):
        sampler.step(np.zeros((1, 2, 2, 2)), sampler.timesteps[0], x)
    with pytest.raises(ValueError, match="expected timestep"):
        sampler.step(x, sampler.timesteps[1], x)


@pytest.mark.gpu
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
def test_cupy_matches_numpy(solver_type):
    import cupy

    x_init = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    outs = []
    for xp in (np, cupy):
        sampler = UniPCSampler(**SD, solver_type=solver_type, final_sigmas_type="sigma_min", use_karras_sigmas=True)
        sampler.set_timesteps(6)
        x = xp.asarray(x_init)
        for t in sampler.timesteps:
            x = sampler.step(xp.tanh(0.5 * sampler.scale_model_input(x, t) + float(t) / 1000), t, x).prev_sample
        assert isinstance(x, xp.ndarray) and x.dtype == np.float32
        outs.append(cupy.asnumpy(x) if xp is cupy else x)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
