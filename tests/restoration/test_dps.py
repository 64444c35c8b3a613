"""Diffusion posterior sampling: the measurement gradient through the U-Net's (and the VAE decoder's)
hand-written backward against finite differences, and the restore loop on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_text_to_image_model

from diffusion_np.gradcheck import grad_rel_error, numerical_gradient
from diffusion_np.restoration import (
    Blur,
    Downsample,
    dps_restore,
    gaussian_kernel,
    make_degradation,
    measurement_gradient,
)


def tiny_model(latent: bool, dtype=np.float64, prediction_type: str = "epsilon"):
    """The tiny model of tests/helpers.py over two captions, in float64 by default, VAE scaling 0.5."""
    return tiny_text_to_image_model(["a red circle", "a blue square"], latent, dtype, prediction_type,
                                    scaling_factor=0.5)


@pytest.mark.parametrize("latent", [False, True], ids=["pixels", "latents"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_measurement_gradient_matches_finite_differences(latent, prediction_type):
    # d ||y - A(D(x0_hat(x_t)))||^2 / d x_t: A^T, the decoder's backward and the U-Net's input gradient
    model = tiny_model(latent, prediction_type=prediction_type)
    size = 8 if latent else 4
    rng = np.random.default_rng(4)
    op = Blur(gaussian_kernel(3, 0.8), size, 3, 0.05) if latent else Downsample(2, size, 3, 0.05)
    y = op.degrade(rng.uniform(-1, 1, (2, size, size, 3)), rng)
    context = rng.standard_normal((2, 6, 8))
    x_t = rng.standard_normal((2, 4, 4, model.unet.in_channels))

    def loss():
        return float(measurement_gradient(model.unet, context, x_t, 600, 0.3, y, op, model.vae,
                                          prediction_type).loss.sum())

    analytic = measurement_gradient(model.unet, context, x_t, 600, 0.3, y, op, model.vae, prediction_type).grad
    assert analytic.shape == x_t.shape
    assert grad_rel_error(analytic, numerical_gradient(loss, x_t, h=1e-5)) < 1e-6


def test_the_unet_input_gradient_is_not_just_the_direct_term():
    # x0_hat = (x_t - s eps) / a: without the U-Net's backward the gradient would be g / a alone
    model = tiny_model(False)
    rng = np.random.default_rng(5)
    op = make_degradation("denoise", 4, 3)
    y = rng.uniform(-1, 1, (1, 4, 4, 3))
    x_t = rng.standard_normal((1, 4, 4, 3))
    m = measurement_gradient(model.unet, rng.standard_normal((1, 6, 8)), x_t, 900, 0.05, y, op)
    direct = -2.0 * (y - m.image) / np.sqrt(0.05)
    assert grad_rel_error(m.grad, direct) > 1e-3


@pytest.mark.parametrize("latent", [False, True], ids=["pixels", "latents"])
def test_dps_restore_runs_and_moves_towards_the_measurement(latent):
    model = tiny_model(latent, dtype=np.float32)
    size = 8 if latent else 4
    op = make_degradation("inpaint", size, 3, hole=2)
    y = op.degrade(np.random.default_rng(6).uniform(-1, 1, (2, size, size, 3)).astype(np.float32), 0)
    free = dps_restore(model, op, y, steps=5, zeta=0.0, seed=1)
    guided = dps_restore(model, op, y, steps=5, zeta=0.5, seed=1)
    assert guided.images.shape == (2, size, size, 3) and guided.images.dtype == np.float32
    assert np.all(np.abs(guided.images) <= 1.0) and len(guided.residual_norms) == 5
    assert guided.residual_norms[-1] < free.residual_norms[-1]
    assert all(np.all(g == 0) for _, g in model.unet.named_grads())  # the weights' gradients were discarded


def test_dps_restore_refuses_a_degradation_for_other_images():
    model = tiny_model(False, dtype=np.float32)
    op = make_degradation("deblur", 8, 3)
    with pytest.raises(ValueError, match="the model makes 4x4x3"):
        dps_restore(model, op, np.zeros((1, 8, 8, 3), np.float32), steps=2)
    op = make_degradation("superres", 4, 3, factor=2)
    with pytest.raises(ValueError, match="measurement"):
        dps_restore(model, op, np.zeros((1, 4, 4, 3), np.float32), steps=2)
    with pytest.raises(ValueError, match="zeta"):
        dps_restore(model, op, np.zeros((1, 2, 2, 3), np.float32), steps=2, zeta=-1.0)


def test_time_travel_repeats_each_step_and_checks_its_argument():
    model = tiny_model(False, dtype=np.float32)
    op = make_degradation("denoise", 4, 3)
    y = np.zeros((1, 4, 4, 3), np.float32)
    out = dps_restore(model, op, y, steps=3, zeta=0.2, repeats=3, seed=2)
    assert len(out.residual_norms) == 3 and np.all(np.isfinite(out.images))
    with pytest.raises(ValueError, match="repeats"):
        dps_restore(model, op, y, steps=3, repeats=0)


def test_a_warm_start_runs_the_tail_of_the_schedule_from_the_given_images():
    model = tiny_model(True, dtype=np.float32)
    op = make_degradation("deblur", 8, 3)
    clean = np.random.default_rng(7).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    y = op.degrade(clean, 0)
    out = dps_restore(model, op, y, steps=10, zeta=0.1, init=clean, strength=0.3)
    assert len(out.residual_norms) == 3 and out.images.shape == clean.shape  # int(10 * 0.3) steps
    with pytest.raises(ValueError, match="init"):
        dps_restore(model, op, y, steps=10, init=clean[:, :4], strength=0.3)
    with pytest.raises(ValueError, match="strength"):
        dps_restore(model, op, y, steps=10, init=clean, strength=0.0)
