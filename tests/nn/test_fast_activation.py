"""The float32 normal CDF of exact GELU (nn/fast/activation.py) against the float64 reference."""

import numpy as np
import pytest
from scipy.special import ndtr

from diffusion_np.nn.activation import GELUCache, geglu_forward, gelu_backward, gelu_forward
from diffusion_np.nn.fast import activation as fast_activation
from diffusion_np.nn.fast import reference_mode


def test_normal_cdf_is_within_float32_rounding_of_the_float64_reference():
    x = np.linspace(-20, 20, 400_001).astype(np.float32)
    exact = ndtr(x.astype(np.float64))
    phi = fast_activation.normal_cdf(x)
    assert phi.dtype == np.float32 and phi.shape == x.shape
    # 4 float32 ulps at 0.5..1 (the reference's own float32 rounding reaches 1 ulp, 6e-8)
    assert np.abs(phi - exact).max() < 2.5e-7
    # the left tail is accurate in absolute terms only, as the reference's 0.5 (1 + erf) is
    tail = x < -6
    assert np.abs(phi - exact)[tail].max() < 1e-7
    # GELU = x Phi(x): its error stays at the float32 rounding of x Phi(x) itself
    reference32 = gelu_forward(x.astype(np.float64))[0]
    assert (np.abs(x * phi - reference32) / np.maximum(1.0, np.abs(x))).max() < 3e-7


def test_normal_cdf_edge_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, 1e-30, -1e-30, 40.0, -40.0], dtype=np.float32)
    np.testing.assert_array_equal(fast_activation.normal_cdf(x), [0.5, 0.5, 1, 0, 0.5, 0.5, 1, 0])


def test_gelu_uses_the_fast_cdf_in_float32_only_and_reference_mode_turns_it_off():
    rng = np.random.default_rng(0)
    x64 = rng.standard_normal((4, 7, 9)) * 3
    x32 = x64.astype(np.float32)
    assert fast_activation.applies_to(x32) and not fast_activation.applies_to(x64)
    y64, _ = gelu_forward(x64)
    with reference_mode():
        y64_ref, _ = gelu_forward(x64)
        y32_ref, cache32_ref = gelu_forward(x32)
    np.testing.assert_array_equal(y64, y64_ref)  # float64: the reference, bit for bit
    y32, cache32 = gelu_forward(x32)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y32_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cache32.a, cache32_ref.a, rtol=0, atol=3e-7)  # Phi, kept for the backward
    dout = rng.standard_normal(x32.shape).astype(np.float32)
    np.testing.assert_allclose(gelu_backward(dout, cache32), gelu_backward(dout, cache32_ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 16), (3, 8)])
def test_geglu_float32_matches_reference_mode(shape):
    hg = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 2
    out, cache = geglu_forward(hg)
    with reference_mode():
        out_ref, _ = geglu_forward(hg)
    assert isinstance(cache.gelu_cache, GELUCache)
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=2e-6)
