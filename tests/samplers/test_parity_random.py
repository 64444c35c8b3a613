"""Every sampler against diffusers on random configurations, so that no class of configuration goes unchecked.

The axes: beta schedule and range x prediction type x spacing x steps x ``steps_offset`` x T x zero
terminal SNR, and each sampler's own (DDPM's variance type, clipping and thresholding, DDIM's eta and
final alpha_bar, Karras sigmas, final sigma, solver orders and types, PNDM's warm-up, UniPC's correctors):
tests/fixtures/cases_samplers_random.py draws them, for DDPM, DDIM, Euler, Euler ancestral, Heun,
DPM-Solver++, PNDM and UniPC.

* golden: a seeded, stratified sample of 16 configurations per sampler, run through live diffusers
  by the fixture script (``samplers_random.npz``), replayed here without torch;
* live (``-m crosscheck``): hypothesis draws configurations from the same generator.

Both loops run in float64 on the same noise levels (diffusers' float32 schedules are compared on their
own, to float32 rounding; the module docstring of the fixture says why), so the bar on the final sample
is 1e-10 relative (measured about 1e-13).
"""

import json

import numpy as np
import pytest
from fixtures.cases_samplers_random import (
    CASES_PER_KIND,
    KINDS,
    SHAPE,
    SPACINGS,
    diffusers_loop,
    draw_config,
    our_loop,
    prediction_types,
    relative_error,
    supports_zero_snr,
)
from helpers import load_golden
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

GOLDEN = load_golden("samplers_random")
FINAL_BAR = 1e-10


def check_against(kind, config, N, step_kwargs, x_init, record):
    """Our loop on the recorded noise; the schedules to float32 rounding, the final sample to FINAL_BAR."""
    sampler, final = our_loop(kind, config, N, step_kwargs, x_init, record.get("noise"))
    what = f"{kind} {json.dumps(config)} N={N} {step_kwargs}"
    ours_t = np.asarray(sampler.timesteps, dtype=np.float64)
    assert ours_t.shape == record["timesteps"].shape, what
    # fractional timesteps (Euler, Heun) are float32 in diffusers: 3e-5 of rounding at t ~ 1000
    np.testing.assert_allclose(ours_t, record["timesteps"], rtol=0, atol=1e-4, err_msg=f"timesteps: {what}")
    # diffusers' float32 cumprod against ours (float64): measured 1.5e-6 at most
    np.testing.assert_allclose(sampler.alpha_bar[record["alphas_cumprod_at"]], record["alphas_cumprod"], rtol=0,
                               atol=5e-6, err_msg=f"alphas_cumprod: {what}")
    if "sigmas" in record:  # diffusers' float32 sigmas of our alpha_bar: measured 2.7e-6 relative
        np.testing.assert_allclose(sampler.sigmas, record["sigmas"], rtol=2e-5, atol=0, err_msg=f"sigmas: {what}")
    error = relative_error(final, record["final"])
    assert error <= FINAL_BAR, f"{what}: final sample differs from diffusers by {error:.2e} (relative)"


# ------------------------------------------------------------------------------ golden
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_every_sampler_matches_diffusers_on_golden_random_configs(name):
    case = GOLDEN[name]
    config, step_kwargs = json.loads(str(case["config"])), json.loads(str(case["step_kwargs"]))
    check_against(str(case["kind"]), config, int(case["steps"]), step_kwargs, case["x_init"], case)


def test_golden_configs_cover_every_sampler_spacing_prediction_type_and_zero_snr():
    """The golden sample is stratified: every sampler, with every spacing x prediction type it has,
    and zero terminal SNR where it has it (a class of configurations left out would go unchecked)."""
    seen = {}
    for case in GOLDEN.values():
        config = json.loads(str(case["config"]))
        seen.setdefault(str(case["kind"]), []).append(config)
    assert sorted(seen) == sorted(KINDS) and all(len(v) == CASES_PER_KIND for v in seen.values())
    for kind, configs in seen.items():
        pairs = {(c["timestep_spacing"], c["prediction_type"]) for c in configs}
        assert pairs == {(s, p) for s in SPACINGS for p in prediction_types(kind)}, kind
        assert any(c.get("rescale_betas_zero_snr") for c in configs) == supports_zero_snr(kind), kind
        assert {c["num_train_timesteps"] for c in configs} > {1000}, kind  # other T too
        assert len({c["steps_offset"] for c in configs}) > 1, kind


# ------------------------------------------------------------------------------ live
@st.composite
def random_cases(draw):
    kind = draw(st.sampled_from(list(KINDS)))
    config, N, step_kwargs = draw_config(kind, lambda options: draw(st.sampled_from(list(options))),
                                         lambda lo, hi: draw(st.integers(lo, hi)))
    return kind, config, N, step_kwargs


@pytest.mark.crosscheck
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_cases(), seed=st.integers(0, 2**16))
def test_every_sampler_matches_diffusers_on_random_configs(case, seed):
    kind, config, N, step_kwargs = case
    x_init = np.random.default_rng(seed).standard_normal(SHAPE)
    record = diffusers_loop(kind, config, N, step_kwargs, x_init, seed)
    # DDIM with eta = 1 from alpha_bar = 0 (zero terminal SNR): diffusers' float32 1 - alpha_bar_prev - sigma^2 can
    # round below 0 and its square root is NaN (seen: v-prediction, linspace, N = 41); nothing to compare there
    assume(np.isfinite(record["final"]).all())
    check_against(kind, config, N, step_kwargs, x_init, record)
