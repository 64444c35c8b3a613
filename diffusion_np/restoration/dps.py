"""Diffusion posterior sampling (Chung et al. 2023, "Diffusion Posterior Sampling for General
Noisy Inverse Problems", ICLR; Algorithm 1): repair an image with a diffusion model as the prior.

We know the damage, y = A(x) + n (:mod:`diffusion_np.restoration.operators`), and want a
sample of p(x | y) ∝ p(y | x) p(x). The diffusion model knows p(x): its score at every noise
level. Bayes' rule splits the posterior's score into the prior's and the likelihood's::

    grad_{x_t} log p(x_t | y) = grad_{x_t} log p(x_t) + grad_{x_t} log p(y | x_t)

The first term is what the sampler already follows. The second is intractable, and DPS
approximates p(y | x_t) by p(y | x0_hat(x_t)), with x0_hat the model's own estimate of the
clean image (Tweedie's formula; DPS Eq. 10-11)::

    x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)
    grad_{x_t} log p(y | x_t)  ≈  -(1 / sigma_y^2) grad_{x_t} ||y - A(D(x0_hat(x_t)))||^2

(D = the VAE decoder for a latent model, the identity in pixel space). The gradient goes
*through the network*: x0_hat depends on x_t directly and through eps_theta, so

    d x0_hat / d x_t = (I - sqrt(1 - abar_t) J_eps) / sqrt(abar_t),     J_eps = d eps_theta / d x_t

and the vector-Jacobian product with J_eps is exactly what the U-Net's hand-written backward
returns as ``BlockGrads.dx`` -- the same backward that training uses, here used for something
else: not to change the weights (their gradients are computed and thrown away) but to move the
*sample* towards agreement with the measurement. For the latent model the decoder's backward
(``AutoencoderKL.decode_backward``) comes first. :func:`measurement_gradient` is that chain.

Algorithm 1 of the paper, with DDIM as the unconditional step (eta = 1 is DDPM's ancestral
step on a shorter schedule; the paper runs 1000 DDPM steps)::

    x_T ~ N(0, I)
    for t in timesteps (T ... 0):
        1. eps = eps_theta(x_t, t, c);  x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        2. x'_prev = DDIM step(eps, t, x_t, eta)                        the prior's move
        3. r = y - A(D(x0_hat));  g = grad_{x_t} ||r||^2                through A^T, D^T and the U-Net
        4. x_prev = x'_prev - (zeta / ||r||) g                          the likelihood's move

The step size zeta_i = zeta / ||r|| of the paper's code (Appendix C.2) normalises the step, so
zeta is a distance in the units of ||x_t|| and does not depend on sigma_y (it is tuned per task,
the way the paper tunes it; ``benchmarks/restore.py`` reports the values used).

**Time travel** (``repeats`` = k > 1; the "self-recurrence" of Bansal et al. 2023, "Universal
Guidance for Diffusion Models", Alg. 1, and the resampling of RePaint, Lugmayr et al. 2022): after
steps 1-4, x_prev is noised back up to t with the forward process,
x_t = sqrt(abar_t / abar_prev) x_prev + sqrt(1 - abar_t / abar_prev) z, and the step is repeated,
k times in all. It gives the guidance k tries at every noise level for 1 U-Net call each. Why the
latent model needs it: at high noise the U-Net absorbs most of a push on x_t into its noise
estimate (d x0_hat / d x_t is small there), so one small step per level is not enough to move
the object to where the measurement has it, and a large step leaves the noise shell (the residual
explodes); by the time x0_hat is sharp, the sample has settled on an object in the wrong place.
Measured on the shapes model (``benchmarks/restore.py``, 8 images): deblurring with 50 steps, zeta 0.5
reaches PSNR 33.5 dB with k = 4 (27.5 dB for Wiener deconvolution).

**A warm start** (``init`` and ``strength``; Chung et al. 2022, "Come-Closer-Diffuse-Faster", the
same authors' earlier observation): instead of pure noise, start from a rough repair (the classical
baseline) noised to the level of the last ``strength`` share of the schedule, x_t = sqrt(abar_t) x_init
+ sqrt(1 - abar_t) z, as SDEdit does. The layout comes from the rough repair, the details from DPS,
and fewer steps are run. ``benchmarks/restore.py`` reports both starts.

The condition c is a caption, by default "" (the unconditional model that classifier-free
guidance training left us); guidance is left out (the gradient would have to go through two
U-Net calls). Left out as well: the Poisson noise model, non-linear operators (they work the
same way but have no classical baseline here), and resampling (ReSample, Song et al. 2024).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from diffusion_np.backend import asnumpy, default_rng, get_xp
from diffusion_np.diffusion import check_prediction_type, x0_and_eps_at
from diffusion_np.nn.module import inference_mode
from diffusion_np.pipelines.image_to_image import img2img_timesteps
from diffusion_np.pipelines.text_to_image import encode_images
from diffusion_np.restoration.operators import Degradation
from diffusion_np.samplers.ddim import DDIMSampler

__all__ = ["DPSOutput", "MeasurementGradient", "dps_restore", "measurement_gradient"]


class MeasurementGradient(NamedTuple):
    """What :func:`measurement_gradient` returns (arrays on the model's device)."""

    loss: object  # (B,) ||y - A(D(x0_hat))||^2 of each image
    grad: object  # (B, h, w, C) its gradient with respect to x_t
    model_output: object  # (B, h, w, C) eps_theta(x_t, t, c) (or v, x0: the model's prediction type)
    x0_pred: object  # (B, h, w, C) x0_hat(x_t), in the U-Net's space
    image: object  # (B, H, W, C) D(x0_hat): the estimate as an image


def measurement_gradient(unet, context, x_t, t, alpha_bar_t: float, y, degradation: Degradation, vae=None,
                         prediction_type: str = "epsilon") -> MeasurementGradient:
    """||y - A(D(x0_hat(x_t)))||^2 per image and its gradient with respect to x_t (module docstring).

    Parameters
    ----------
    unet : UNet2DConditionModel (not in inference mode: its backward is needed)
    context : (B, L, D) the text embeddings the U-Net attends to
    x_t : (B, h, w, C) the current sample; t its timestep; alpha_bar_t = abar_t
    y : the measurement, (B, s, s, C_img) as ``degradation`` makes it
    degradation : the operator A (its backward is A^T)
    vae : AutoencoderKL, optional; with it, D = ``vae.decode_latents``
    prediction_type : "epsilon", "v_prediction" or "sample"

    Notes
    -----
    The parameter gradients the backward adds into ``unet.grads`` (and ``vae.grads``) are a
    by-product; :func:`dps_restore` zeroes them at the end.
    """
    check_prediction_type(prediction_type)
    degradation.check_measurement(y)
    a, s = math.sqrt(alpha_bar_t), math.sqrt(1.0 - alpha_bar_t)  # alpha_t, sigma_t as Python floats
    # 1. the model's estimate of the clean sample, and the image it decodes to
    out = unet(x_t, t, context)  # (B, h, w, C)
    x0, _ = x0_and_eps_at(out, x_t, a, s, prediction_type)
    image = x0 if vae is None else vae.decode_latents(x0)  # (B, H, W, C_img)
    # 2. the residual and the loss ||r||^2 of each image
    r = y - degradation.forward(image)  # (B, s, s, C_img)
    loss = (r * r).sum(axis=(1, 2, 3))  # (B,)
    # 3. backwards: d||r||^2 / d image = -2 A^T r, then through the decoder
    g = degradation.backward(-2.0 * r)  # (B, H, W, C_img)
    if vae is not None:
        g = vae.decode_backward(g) * (1.0 / vae.scaling_factor)  # decode_latents(z) = decode(z / sf + shift)
    # 4. through x0 = c_x x_t + c_out out: d/dx_t = c_x g + J^T (c_out g), J^T by the U-Net's backward
    c_x, c_out = {"epsilon": (1.0 / a, -s / a), "v_prediction": (a, -s), "sample": (0.0, 1.0)}[prediction_type]
    grad = unet.backward(c_out * g).dx
    if c_x != 0.0:
        grad = grad + c_x * g
    return MeasurementGradient(loss, grad, out, x0, image)


class DPSOutput(NamedTuple):
    """What :func:`dps_restore` returns: ``images`` (B, H, W, C) float32 in [-1, 1] on the host,
    and the mean residual norm ||y - A(x0_hat)|| over the images at every step (for plots)."""

    images: np.ndarray
    residual_norms: list


def dps_restore(model, degradation: Degradation, y, steps: int = 100, zeta: float = 1.0, eta: float = 1.0,
                prompt: str = "", seed: int = 0, progress: bool = False, repeats: int = 1, init=None,
                strength: float = 1.0) -> DPSOutput:
    """Repair the measurements ``y`` with diffusion posterior sampling (Algorithm 1 above).

    Parameters
    ----------
    model : TextToImageModel
        The prior (``pretrained:digits`` in pixel space, ``pretrained:shapes`` with its VAE).
    degradation : Degradation
        A and sigma_y; its image size and channels must be the model's.
    y : (B, s, s, C) the measurements (host or device arrays)
    steps : number of DDIM steps
    zeta : the step size of the likelihood's move (see the module docstring)
    eta : DDIM's noise (1: ancestral, as the paper's DDPM)
    prompt : the caption c, "" for the unconditional model
    seed : seeds x_T and the per-step noise (drawn on the host)
    progress : show a progress bar
    repeats : k of time travel (module docstring), 1 = plain DPS; k U-Net forwards and backwards per step
    init : (B, H, W, C) images in [-1, 1], optional: start from them instead of pure noise (module
        docstring, "a warm start"), e.g. the classical baseline's repair
    strength : with ``init``, the share of the ``steps`` schedule that is run (SDEdit's strength)
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    for name, value in (("zeta", zeta), ("eta", eta)):
        if not (isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    unet, vae = model.unet, model.vae
    size = int(unet.config["sample_size"]) * (1 if vae is None else int(vae.downscale))
    channels = int(unet.in_channels if vae is None else vae.out_channels)
    if degradation.image_size != size or degradation.channels != channels:
        raise ValueError(f"the degradation is for {degradation.image_size}x{degradation.image_size}x"
                         f"{degradation.channels} images, but the model makes {size}x{size}x{channels}")
    xp = get_xp(unet.conv_in.weight)
    dtype = unet.conv_in.weight.dtype
    y = xp.asarray(y, dtype=dtype)
    degradation.check_measurement(y)
    B = y.shape[0]

    with inference_mode(model.text_encoder):
        context = xp.asarray(model.encode_text([prompt] * B), dtype=dtype)  # (B, L, D)
    sampler = model.make_sampler("ddim")
    assert isinstance(sampler, DDIMSampler)
    rng = default_rng(seed)
    side = int(unet.config["sample_size"])
    x = xp.asarray(rng.standard_normal((B, side, side, int(unet.in_channels))), dtype=dtype)  # x_T
    if init is None:
        sampler.set_timesteps(int(steps))
        timesteps = sampler.timesteps
    else:  # a warm start: the initial repair noised to the first of the last strength * N timesteps
        init = xp.asarray(init, dtype=dtype)
        degradation.check_image(init, "init")
        timesteps, _ = img2img_timesteps(sampler, int(steps), strength)
        with inference_mode(vae):
            x = sampler.add_noise(encode_images(vae, init), x, timesteps[0])
    norms = []
    for t in (tqdm(timesteps, desc="DPS", leave=False) if progress else timesteps):
        ab_t, ab_prev = float(sampler.alpha_bar[int(t)]), sampler.alpha_bar_prev(int(t))
        for r in range(int(repeats)):
            # 1 and 3: x0_hat, the residual and grad_{x_t} ||r||^2 (one U-Net forward and backward)
            m = measurement_gradient(unet, context, x, int(t), ab_t, y, degradation, vae, model.prediction_type)
            # 2. the prior's move: an ordinary DDIM step with the same model output
            z = xp.asarray(rng.standard_normal(x.shape), dtype=dtype)
            x_prev = sampler.step(m.model_output, int(t), x, eta=float(eta), noise=z).prev_sample
            # 4. the likelihood's move, normalised by ||r|| per image (the paper's zeta_i = zeta / ||r||)
            norm = xp.sqrt(m.loss)  # (B,)
            x_prev = x_prev - (float(zeta) / (norm + 1e-8))[:, None, None, None] * m.grad  # 1e-8: r = 0 exactly
            if r < repeats - 1:  # time travel: noise x_prev back up to t, q(x_t | x_prev), and try again
                z = xp.asarray(rng.standard_normal(x.shape), dtype=dtype)
                x = math.sqrt(ab_t / ab_prev) * x_prev + math.sqrt(1.0 - ab_t / ab_prev) * z
        x = x_prev
        norms.append(norm.mean())  # stays on the device: one copy to the host at the end, not one per step
    unet.zero_grad()  # the weights' gradients were a by-product
    with inference_mode(unet, vae):
        images = x if vae is None else vae.decode_latents(x)
    images = np.clip(asnumpy(images).astype(np.float32), -1.0, 1.0)
    if vae is not None:
        vae.zero_grad()
    return DPSOutput(images, [float(v) for v in asnumpy(xp.stack(norms))])
