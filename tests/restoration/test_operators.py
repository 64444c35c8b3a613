"""Degradation operators: A and its backward (the adjoint), finite differences, input checks; the baselines."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_np.gradcheck import grad_rel_error, numerical_gradient
from diffusion_np.restoration import (
    TASKS,
    Blur,
    Denoise,
    Downsample,
    Inpaint,
    baseline,
    bicubic_upsample,
    box_mask,
    gaussian_kernel,
    harmonic_inpaint,
    make_degradation,
    signal_power,
    wiener_deconvolution,
    wiener_filter,
)

S, C = 8, 3


def operators():
    rng = np.random.default_rng(0)
    skewed = rng.uniform(0.1, 1.0, (3, 3))  # not symmetric: the adjoint must flip the taps
    return [
        Blur(gaussian_kernel(5, 1.0), S, C, 0.05),
        Blur(skewed / skewed.sum(), S, C),
        Downsample(2, S, C, 0.05),
        Downsample(4, S, C),
        Denoise(S, C, 0.3),
        Inpaint(box_mask(S, 3), S, C, 0.05),
    ]


@pytest.mark.parametrize("op", operators(), ids=repr)
def test_backward_is_the_adjoint(op):
    # <A x, d> = <x, A^T d> for random x and d (the dot-product test), in float64
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, S, S, C))
    d = rng.standard_normal((2, op.out_size, op.out_size, C))
    assert np.isclose(np.sum(op.forward(x) * d), np.sum(x * op.backward(d)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", operators(), ids=repr)
def test_backward_matches_finite_differences(op):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, S, S, C))
    dout = rng.standard_normal((2, op.out_size, op.out_size, C))  # a random upstream gradient
    numeric = numerical_gradient(lambda: float(np.sum(op.forward(x) * dout)), x)
    assert grad_rel_error(op.backward(dout), numeric) < 1e-7


def test_blur_keeps_flat_images_and_blurs_a_point():
    op = Blur(gaussian_kernel(5, 1.0), S, 1)
    flat = np.full((1, S, S, 1), 0.3)
    np.testing.assert_allclose(op(flat), flat, atol=1e-12)
    point = np.zeros((1, S, S, 1))
    point[0, 4, 4, 0] = 1.0
    np.testing.assert_allclose(op(point)[0, 2:7, 2:7, 0], gaussian_kernel(5, 1.0), atol=1e-12)


def test_downsample_averages_blocks_and_naive_inverse_repeats_them():
    op = Downsample(4, S, 1)
    x = np.arange(S * S, dtype=np.float64).reshape(1, S, S, 1)
    y = op(x)
    assert y.shape == (1, 2, 2, 1)
    assert y[0, 0, 0, 0] == pytest.approx(x[0, :4, :4, 0].mean())
    up = op.naive_inverse(y)
    assert up.shape == x.shape and np.all(up[0, :4, :4, 0] == y[0, 0, 0, 0])


def test_noise_has_the_stated_std_and_inpaint_keeps_the_hole_empty():
    x = np.zeros((4, 32, 32, 3))
    y = Denoise(32, 3, 0.3).degrade(x, rng=0)
    assert np.std(y) == pytest.approx(0.3, rel=0.05)
    op = Inpaint(box_mask(32, 12), 32, 3, 0.05)
    y = op.degrade(np.ones((1, 32, 32, 3)), rng=0)
    assert np.all(y[0, 10:22, 10:22] == 0.0) and np.std(y[0, :8] - 1.0) == pytest.approx(0.05, rel=0.2)


@pytest.mark.parametrize("task", TASKS)
def test_make_degradation_scales_with_the_image(task):
    for size in (8, 32):
        op = make_degradation(task, size, 3)
        x = np.zeros((1, size, size, 3), dtype=np.float32)
        assert op.degrade(x, 0).dtype == np.float32
        assert op(x).shape == (1, op.out_size, op.out_size, 3)


# ----------------------------------------------------------------------------- clear errors
def test_a_kernel_that_is_not_normalised_is_refused():
    with pytest.raises(ValueError, match="normalised.*sum to 2"):
        Blur(2.0 * gaussian_kernel(5, 1.0), S, C)
    with pytest.raises(ValueError, match="odd side"):
        Blur(np.ones((4, 4)) / 16, S, C)
    with pytest.raises(ValueError, match="larger than"):
        Blur(gaussian_kernel(9, 1.0), S, C)


@pytest.mark.parametrize("op", operators(), ids=repr)
def test_images_and_measurements_of_the_wrong_size_or_channels_are_refused(op):
    with pytest.raises(ValueError, match="8x8 pixels"):
        op.forward(np.zeros((1, 16, 16, C)))
    with pytest.raises(ValueError, match="C=3"):
        op.forward(np.zeros((1, S, S, 1)))
    with pytest.raises(ValueError, match="measurement"):
        op.check_measurement(np.zeros((1, op.out_size + 1, op.out_size + 1, C)))
    with pytest.raises(ValueError, match="C=3"):
        op.backward(np.zeros((1, op.out_size, op.out_size, 4)))


def test_bad_constructor_arguments_are_named():
    with pytest.raises(ValueError, match="factor"):
        Downsample(3, S, C)
    with pytest.raises(ValueError, match="mask must be"):
        Inpaint(np.ones((4, 4)), S, C)
    with pytest.raises(ValueError, match="nothing to inpaint"):
        Inpaint(np.ones((S, S)), S, C)
    with pytest.raises(ValueError, match="noise_std"):
        Denoise(S, C, -1.0)
    with pytest.raises(ValueError, match="task must be"):
        make_degradation("sharpen", S, C)


# ----------------------------------------------------------------------------- baselines
def test_wiener_inverts_a_noiseless_blur():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (2, S, S, C))
    kernel = gaussian_kernel(3, 0.6)  # its transfer function has no zero on an 8x8 grid
    y = Blur(kernel, S, C)(x)
    power = np.full((S, S), 1e12)  # a signal far stronger than the (zero) noise
    np.testing.assert_allclose(wiener_deconvolution(y, kernel, 0.0, power), x, atol=1e-4)


def test_wiener_with_the_signal_power_beats_the_blurred_image():
    rng = np.random.default_rng(4)
    x = np.clip(rng.standard_normal((16, S, S, 1)).cumsum(axis=1).cumsum(axis=2) * 0.1, -1, 1)  # smooth-ish
    op = make_degradation("deblur", S, 1)
    y = op.degrade(x, 0)
    restored = baseline(op, y, signal_power(x))
    assert np.mean((restored - x) ** 2) < np.mean((y - x) ** 2)


def test_bicubic_keeps_constants_and_linear_ramps():
    y = np.full((1, 4, 4, 2), 0.25)
    np.testing.assert_allclose(bicubic_upsample(y, 2), 0.25, atol=1e-6)
    ramp = np.arange(8, dtype=np.float64)[None, :, None, None] * np.ones((1, 8, 8, 1))
    up = bicubic_upsample(ramp, 2)[0, 4:12, 0, 0]  # two input pixels away from the repeated edge
    np.testing.assert_allclose(np.diff(up), 0.5, atol=1e-6)


def test_harmonic_inpainting_keeps_observed_pixels_and_fills_a_ramp_exactly():
    ramp = np.linspace(-1, 1, S)[None, None, :, None] * np.ones((1, S, S, 1))  # harmonic: its own fill
    mask = box_mask(S, 3)
    filled = harmonic_inpaint(ramp * mask[None, :, :, None], mask, iterations=2000)
    np.testing.assert_allclose(filled, ramp, atol=1e-4)


def test_wiener_filter_reduces_noise():
    x = np.zeros((2, 16, 16, 1))
    y = Denoise(16, 1, 0.3).degrade(x, 1)
    assert np.mean(wiener_filter(y, 0.3) ** 2) < 0.3 * np.mean(y**2)
