"""Inpainting with an ordinary text-to-image model: repaint the masked pixels, keep the rest.

No special inpainting network is needed (Lugmayr et al. 2022, "RePaint: Inpainting using
Denoising Diffusion Probabilistic Models", Sec. 4.1). At every step the known region of
the sample is replaced by the input image noised to the *current* noise level, so the
model only has to fill the hole, and it sees the known region at the noise level it
expects. With m = 1 on the pixels to repaint and 0 on those to keep (our convention, and
diffusers'; RePaint's paper uses the opposite one)::

    x_T = init_noise_sigma * z,  known part = add_noise(x_0, z', t_first)
    for each step t -> t_prev (where the step lands: DDIM's previous_timestep(t), else the next timestep):
        x_unknown = sampler.step(model(x_t, t), t, x_t)               the model's proposal at t_prev
        x_known   = sampler.add_noise(x_0, z'', t_prev)                 q(x_{t_prev} | x_0), fresh z''
        x_{t_prev} = m * x_unknown + (1 - m) * x_known                  RePaint Algorithm 1, lines 4-6

After the last step x_known is x_0 itself. The fresh noise z', z'' for the known region
(RePaint Algorithm 1, line 4: epsilon ~ N(0, I) at every step) comes from a second generator
spawned from the seed, so the sampler's own random stream is the one text-to-image draws:
with a mask of all ones the result *is* text-to-image's.

Resampling (RePaint Sec. 4.2, Algorithm 1, lines 7-8): the replacement joins two parts that
were not generated together, and the model only partly harmonises them in one step. With
``resample_steps = U > 1`` every step is repeated U times: after the replacement, x_{t_prev}
is pushed back to t with the forward kernel of the jump::

    x_t ~ q(x_t | x_{t_prev}) = N(sqrt(alpha_bar_t / alpha_bar_prev) x_{t_prev}, (1 - alpha_bar_t / alpha_bar_prev) I)

and the step is taken again (not at the last step, which lands on x_0). N steps cost
U (N - 1) + 1 model calls.
This needs a sampler whose step depends only on (x_t, t): DDPM and DDIM. The sigma-based
samplers (Euler, Euler ancestral, Heun, DPM-Solver++) count their steps and Heun and
DPM-Solver++ keep history between steps, so a step cannot be redone; they are refused.
We jump back one step at a time (RePaint's jump length j = 1).

Latent space: the image is encoded, and the mask is brought to the latent resolution by
**max-pooling** over each f x f block (f = the VAE's downsampling factor): a latent pixel is
repainted if any pixel it covers is. This regenerates a thin band of known pixels around
the hole in latent space (a latent pixel mixes its whole block, so a half-known block
cannot be kept), and that band is restored at the end: the final image is the decoded
sample inside the mask and the input image, exactly, outside it (also in pixel space).

Masks: 1 (white) = repaint, 0 (black) = keep; values in [0, 1] are binarised at 0.5.

Left out: RePaint's jump lengths j > 1, dedicated inpainting U-Nets with 9 input channels
(SD-inpainting's masked-image conditioning), mask blurring/feathering, and ``strength`` < 1.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_np.backend import asnumpy, default_rng
from diffusion_np.pipelines.image_to_image import ImageToImagePipeline, check_num_inference_steps, value_range
from diffusion_np.pipelines.text_to_image import PipelineOutput, decode_latents, encode_images, forward_only
from diffusion_np.samplers.ddim import DDIMSampler
from diffusion_np.samplers.ddpm import DDPMSampler
from diffusion_np.samplers.loop import Trajectory, _progress

#: samplers whose step can be repeated at the same timestep (RePaint resampling)
RESAMPLING_SAMPLERS = (DDPMSampler, DDIMSampler)


def downsample_mask(mask, factor: int):
    """(B, H, W, 1) mask -> (B, H / f, W / f, 1) by max-pooling f x f blocks: repaint if any pixel is."""
    B, H, W, C = mask.shape
    if H % factor or W % factor:
        raise ValueError(f"mask of size {H}x{W} cannot be pooled by {factor}")
    blocks = mask.reshape(B, H // factor, factor, W // factor, factor, C)  # (B, h, f, w, f, 1)
    return blocks.max(axis=(2, 4))  # (B, h, w, 1)


def check_resampling(sampler, resample_steps: int) -> int:
    """resample_steps as an int; ValueError if < 1, or > 1 with a sampler where RePaint is not defined."""
    if isinstance(resample_steps, bool) or not isinstance(resample_steps, (int, np.integer)) or resample_steps < 1:
        raise ValueError(f"resample_steps must be an int >= 1 (1 = no resampling), got {resample_steps!r}")
    if resample_steps > 1 and not isinstance(sampler, RESAMPLING_SAMPLERS):
        raise ValueError(
            f"RePaint resampling (resample_steps={resample_steps}) needs a sampler whose step depends only on "
            f"(x_t, t), so that a step can be redone after jumping back: DDPMSampler or DDIMSampler. "
            f"{type(sampler).__name__} counts its steps (and may keep history between them); "
            "use resample_steps=1 with it"
        )
    return int(resample_steps)


def forward_jump(sampler, x_prev, t_prev: int, t: int, z):
    """RePaint's jump back: a sample of q(x_t | x_{t_prev}), the forward process from t_prev up to t > t_prev.

    x_t = sqrt(alpha_bar_t / alpha_bar_prev) x_prev + sqrt(1 - alpha_bar_t / alpha_bar_prev) z
    (DDPM Eq. 2 composed over the jump; the ratio of alpha_bars is the product of the alphas between).
    """
    ratio = float(sampler.alpha_bar[int(t)]) / float(sampler.alpha_bar[int(t_prev)])
    return math.sqrt(ratio) * x_prev + math.sqrt(1.0 - ratio) * z


class InpaintPipeline(ImageToImagePipeline):
    """Inpainting by replacing the known region at every step (RePaint); constructor as
    :class:`~diffusion_np.pipelines.text_to_image.TextToImagePipeline`. See the module docstring."""

    @forward_only
    def __call__(
        self,
        prompt: str | list[str],
        image,
        mask,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float = 5.0,
        num_inference_steps: int = 50,
        seed: int | None = 0,
        num_images_per_prompt: int = 1,
        resample_steps: int = 1,
        noise=None,
        return_trajectory: bool = False,
        progress: bool = True,
        **step_kwargs,
    ) -> PipelineOutput:
        """Repaint the masked part of ``image`` following ``prompt``.

        Parameters
        ----------
        prompt, negative_prompt, guidance_scale, num_inference_steps, seed, num_images_per_prompt,
        return_trajectory, progress
            As for :class:`~diffusion_np.pipelines.text_to_image.TextToImagePipeline`.
        image : array (H, W, C) or (B, H, W, C), float in [-1, 1]
            As for :class:`~diffusion_np.pipelines.image_to_image.ImageToImagePipeline`.
        mask : array (H, W), (H, W, 1), (B, H, W) or (B, H, W, 1), values in [0, 1]
            1 = repaint, 0 = keep (binarised at 0.5); one for all images or one per prompt.
            See :func:`diffusion_np.pipelines.image_io.load_mask`.
        resample_steps : int >= 1
            RePaint's U: each step is taken U times (DDPM and DDIM samplers only); 1 = no resampling.
        noise : array (B, h, w, C), optional
            The initial z, in the U-Net's space; drawn from the seed if None.
        **step_kwargs
            Passed to ``sampler.step`` (e.g. ``eta=1.0`` for DDIM).
        """
        U = check_resampling(self.sampler, resample_steps)
        N = check_num_inference_steps(num_inference_steps)
        prompts, denoiser = self._prepare(prompt, negative_prompt, guidance_scale, num_images_per_prompt)
        images = self._prepare_images(image, prompts, num_images_per_prompt)  # (B, H, W, C)
        repaint_pixels = self._prepare_mask(mask, images, num_images_per_prompt)  # (B, H, W, 1) bool
        xp, dtype = self._xp_dtype()
        B, H, W, _ = images.shape
        f = self.vae_scale_factor
        shape = (B, H // f, W // f, int(self.unet.in_channels))
        # the mask at the sample's resolution (max-pool: repaint a latent pixel if any of its pixels is)
        repaint = repaint_pixels if f == 1 else downsample_mask(repaint_pixels, f)  # (B, h, w, 1)

        x0 = encode_images(self.vae, images)  # (B, h, w, C): latents, or the pixels
        if tuple(x0.shape) != shape:
            raise ValueError(
                f"the encoded image has shape {tuple(x0.shape)} but the U-Net expects {shape}: "
                "check the VAE's latent_channels against unet.in_channels"
            )

        # two random streams: the sampler's (exactly text-to-image's) and one for the known region
        rng = default_rng(seed)
        known_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])

        def known_noise():
            return xp.asarray(known_rng.standard_normal(shape), dtype=dtype)

        sampler = self.sampler
        sampler.set_timesteps(N)
        timesteps = sampler.timesteps

        # 1. x_T: pure noise where we repaint, the image noised to the first timestep where we keep
        if noise is None:
            noise = rng.standard_normal(shape)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        x = xp.asarray(noise, dtype=dtype) * float(sampler.init_noise_sigma)
        x = xp.where(repaint, x, sampler.add_noise(x0, known_noise(), timesteps[0]))

        trajectory = Trajectory(timesteps, [x], []) if return_trajectory else None
        for i, t in enumerate(_progress(timesteps, progress)):
            # where the step lands: the next timestep (None: the step ends at x_0), or for DDIM its
            # previous_timestep (t - T // N by default, a level that uneven spacings never visit)
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
            if t_prev is not None and isinstance(sampler, DDIMSampler):
                t_prev = sampler.previous_timestep(t)
            passes = U if t_prev is not None else 1  # nothing to resample after the last step
            for u in range(passes):
                # 2. the model's proposal for x_{t_prev} (RePaint Algorithm 1, line 5)
                model_output = denoiser(sampler.scale_model_input(x, t), t)
                z = xp.asarray(rng.standard_normal(shape), dtype=dtype)
                out = sampler.step(model_output, t, x, noise=z, **step_kwargs)
                # 3. the known region at the noise level of t_prev (line 4), with fresh noise
                x_known = x0 if t_prev is None else sampler.add_noise(x0, known_noise(), t_prev)
                # 4. join them (line 6)
                x = xp.where(repaint, out.prev_sample, x_known)
                # 5. RePaint resampling: back to t with the forward kernel, and redo the step (lines 7-8)
                if u + 1 < passes:
                    x = forward_jump(sampler, x, t_prev, t, known_noise())
            if trajectory is not None:
                trajectory.x_t.append(x)
                trajectory.x0_pred.append(out.pred_original_sample)

        # 6. decode, then paste the known pixels back exactly
        decoded = xp.clip(decode_latents(self.vae, x), -1.0, 1.0)  # (B, H, W, C)
        result = xp.where(repaint_pixels, decoded, images)
        return PipelineOutput(asnumpy(result).astype(np.float32, copy=False), prompts, x, trajectory, self.vae)

    def _prepare_mask(self, mask, images, num_images_per_prompt: int):
        """Check the mask and bring it to (B, H, W, 1) bool on the device, True = repaint."""
        xp, _ = self._xp_dtype()
        B, H, W, _ = images.shape
        n_prompts = B // num_images_per_prompt
        if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
            raise TypeError(f"mask must be an array (H, W) or (B, H, W, 1), got {type(mask).__name__}")
        m = xp.asarray(mask)
        if m.ndim == 2:
            m = m[None, :, :, None]  # (H, W) -> (1, H, W, 1)
        elif m.ndim == 3 and tuple(m.shape) == (H, W, 1):
            m = m[None]  # (H, W, 1) -> (1, H, W, 1)
        elif m.ndim == 3:
            m = m[..., None]  # (B, H, W) -> (B, H, W, 1)
        if m.ndim != 4 or m.shape[-1] != 1 or tuple(m.shape[1:3]) != (H, W) or m.shape[0] not in (1, n_prompts):
            raise ValueError(
                f"mask must be (H, W), (H, W, 1), (B, H, W) or (B, H, W, 1) with H, W = {H}, {W} (the image's) "
                f"and B = 1 or one per prompt ({n_prompts}), got {tuple(mask.shape)}"
            )
        if m.dtype == bool:
            m = m.astype(np.float32)
        if not (np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer)):
            raise TypeError(f"mask must hold numbers in [0, 1] or bools, got dtype {m.dtype}")
        lo, hi = value_range(m)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"mask values must lie in [0, 1] (1 = repaint, 0 = keep), got [{lo:.4g}, {hi:.4g}]; "
                "for a 0..255 picture use image_io.load_mask"
            )
        m = m >= 0.5  # binarise: True = repaint
        if m.shape[0] == 1:
            m = xp.broadcast_to(m, (n_prompts, H, W, 1))
        return xp.repeat(m, num_images_per_prompt, axis=0)  # (B, H, W, 1), prompt by prompt
