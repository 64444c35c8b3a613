"""Image-to-image by SDEdit: noise an image part of the way, then denoise it with a prompt.

SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations", Sec. 3 and Algorithm 1): a diffusion model maps *any* x_t at
noise level t to a sample of the data distribution. Start from the input image x_0
noised to an intermediate level t_0 instead of from pure noise::

    x_{t_0} ~ q(x_{t_0} | x_0) = N(sqrt(alpha_bar_{t_0}) x_0, (1 - alpha_bar_{t_0}) I)      (DDPM Eq. 4)

and run the reverse process from t_0 to 0. The noise wipes out fine detail and keeps the
coarse layout and colours; the model fills the detail back in, following the prompt.
``strength`` in (0, 1] says how far up the schedule t_0 lies: small = close to the input,
1 = the whole schedule, which forgets the input entirely (text-to-image).

Which timesteps (diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``)::

    sampler.set_timesteps(N)
    init_timestep = min(int(N * strength), N)          the number of steps to run
    t_start       = max(N - init_timestep, 0)          steps skipped at the noisy end
    timesteps     = sampler.timesteps[t_start * sampler.order:]

``sampler.order`` is 2 for Heun, whose ``timesteps`` hold every step after the first
twice; ``timesteps[0]`` is then the second copy, where a fresh first-order call starts.
The start point is ``sampler.add_noise(x_0, z, timesteps[0])``, so it lives in the
sampler's own parametrisation (x_t for DDPM/DDIM/DPM-Solver, x_t / sqrt(alpha_bar) for Euler).
At strength 1 (t_start = 0) we start from ``init_noise_sigma * z`` exactly as text-to-image does
(and as diffusers' inpainting pipeline does at strength 1), rather than from
add_noise(x_0, z, t_T), which would leak sqrt(alpha_bar_T) x_0 (7% of the image with SD's
schedule) into the start: with the same seed, strength 1 *is* text-to-image.

In latent space the image is encoded first (the posterior mean,
``vae.encode_latents(x, sample_posterior=False)``) and the result decoded at the end.

Left out: SDEdit's repeated editing (K rounds), stroke-based guidance masks, and diffusers'
``denoising_start`` / ``denoising_end`` for chaining two models.
"""

from __future__ import annotations

import numpy as np

from diffusion_np.backend import asnumpy, default_rng, get_xp
from diffusion_np.pipelines.text_to_image import PipelineOutput, TextToImagePipeline, encode_images, forward_only
from diffusion_np.samplers.base import Sampler
from diffusion_np.samplers.loop import denoise


def value_range(x) -> tuple[float, float]:
    """(min, max) of ``x`` as Python floats, in one deliberate device -> host copy (checks before the loop)."""
    lo, hi = asnumpy(get_xp(x).stack([x.min(), x.max()]))
    return float(lo), float(hi)


def check_strength(strength: float) -> float:
    """strength as a float; ValueError unless 0 < strength <= 1."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)):
        raise TypeError(f"strength must be a number in (0, 1], got {type(strength).__name__}")
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(
            f"strength must lie in (0, 1], got {strength!r}: it is the fraction of the schedule to re-run, "
            "from close to the input image (small) to all of it (1, the input is forgotten)"
        )
    return float(strength)


def check_num_inference_steps(num_inference_steps: int) -> int:
    """num_inference_steps as an int; ValueError unless it is an int >= 1."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or num_inference_steps < 1:  # fmt: skip
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    return int(num_inference_steps)


def img2img_timesteps(sampler: Sampler, num_inference_steps: int, strength: float) -> tuple[np.ndarray, int]:
    """The timesteps SDEdit runs, and where they start in ``sampler.timesteps``.

    Calls ``sampler.set_timesteps(num_inference_steps)`` and keeps the last
    ``min(int(N * strength), N)`` steps, diffusers' rule (see the module docstring).
    Returns ``(timesteps, start)`` with ``timesteps = sampler.timesteps[start:]``.
    """
    strength = check_strength(strength)
    N = check_num_inference_steps(num_inference_steps)
    sampler.set_timesteps(N)
    init_timestep = min(int(N * strength), N)  # int() truncates, as diffusers does
    t_start = max(N - init_timestep, 0)
    start = t_start * sampler.order
    timesteps = sampler.timesteps[start:]
    if len(timesteps) == 0:
        raise ValueError(
            f"strength={strength} with num_inference_steps={N} runs int({N} * {strength}) = 0 steps; "
            "raise strength or num_inference_steps"
        )
    return timesteps, start


class ImageToImagePipeline(TextToImagePipeline):
    """SDEdit with classifier-free guidance; same constructor as :class:`TextToImagePipeline`."""

    @forward_only
    def __call__(
        self,
        prompt: str | list[str],
        image,
        strength: float = 0.8,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float = 5.0,
        num_inference_steps: int = 50,
        seed: int | None = 0,
        num_images_per_prompt: int = 1,
        noise=None,
        return_trajectory: bool = False,
        progress: bool = True,
        **step_kwargs,
    ) -> PipelineOutput:
        """Edit ``image`` towards ``prompt``.

        Parameters
        ----------
        prompt, negative_prompt, guidance_scale, seed, num_images_per_prompt, return_trajectory, progress
            As for :class:`TextToImagePipeline`.
        image : array (H, W, C) or (B, H, W, C), float in [-1, 1]
            One image for every prompt, or one per prompt (B = len(prompt)); see
            :func:`diffusion_np.pipelines.image_io.load_image`. H and W must be divisible by
            ``vae_scale_factor * unet_factor``.
        strength : float in (0, 1]
            Fraction of the schedule to run (see the module docstring).
        num_inference_steps : int
            N of the *full* schedule; about ``strength * N`` steps are run.
        noise : array (B, h, w, C), optional
            z of the start point, in the U-Net's space; drawn from the seed if None.
        **step_kwargs
            Passed to ``sampler.step`` (e.g. ``eta=1.0`` for DDIM).
        """
        strength = check_strength(strength)
        prompts, denoiser = self._prepare(prompt, negative_prompt, guidance_scale, num_images_per_prompt)
        images = self._prepare_images(image, prompts, num_images_per_prompt)  # (B, H, W, C) on the device
        xp, dtype = self._xp_dtype()
        B, H, W, _ = images.shape
        f = self.vae_scale_factor
        shape = (B, H // f, W // f, int(self.unet.in_channels))

        # 1. the timesteps to run: the last int(N * strength) of the schedule
        timesteps, start = img2img_timesteps(self.sampler, num_inference_steps, strength)

        # 2. z, drawn first from the seed (as text-to-image draws its initial noise)
        rng = default_rng(seed)
        if noise is None:
            noise = rng.standard_normal(shape)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        noise = xp.asarray(noise, dtype=dtype)

        # 3. the start point: x_0 noised to timesteps[0] (DDPM Eq. 4), or pure noise at strength 1
        if start == 0:
            x = noise * float(self.sampler.init_noise_sigma)
        else:
            x0 = encode_images(self.vae, images)  # (B, h, w, C) latents, or the pixels
            if tuple(x0.shape) != shape:
                raise ValueError(
                    f"the encoded image has shape {tuple(x0.shape)} but the U-Net expects {shape}: "
                    "check the VAE's latent_channels against unet.in_channels"
                )
            x = self.sampler.add_noise(x0, noise, timesteps[0])

        # 4. the reverse process from there
        x0, trajectory = denoise(
            denoiser, self.sampler, x, timesteps, rng, progress=progress, return_trajectory=return_trajectory,
            **step_kwargs,
        )  # fmt: skip
        return self._output(x0, prompts, trajectory)

    def _prepare_images(self, image, prompts: list[str], num_images_per_prompt: int):
        """Check the input image(s) and repeat them to one per generated image: (B, H, W, C) on the device."""
        xp, dtype = self._xp_dtype()
        if not hasattr(image, "shape") or not hasattr(image, "dtype"):
            raise TypeError(f"image must be an array (H, W, C) or (B, H, W, C), got {type(image).__name__}")
        if not np.issubdtype(image.dtype, np.floating):
            raise TypeError(
                f"image must be float in [-1, 1], got dtype {image.dtype}; convert uint8 pixels with "
                "diffusion_np.pipelines.image_io.from_uint8 (x / 127.5 - 1)"
            )
        if image.ndim == 3:
            image = image[None]
        n_prompts = len(prompts) // num_images_per_prompt
        if image.ndim != 4 or image.shape[0] not in (1, n_prompts):
            raise ValueError(
                f"image must be (H, W, C), or (B, H, W, C) with B = 1 or one per prompt ({n_prompts}), "
                f"got {tuple(image.shape)}"
            )
        channels = self._image_channels()
        if image.shape[-1] != channels:
            raise ValueError(f"image must have {channels} channels (channels last), got shape {tuple(image.shape)}")
        self._check_size(int(image.shape[1]), int(image.shape[2]))
        image = xp.asarray(image, dtype=dtype)
        lo, hi = value_range(image)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1.0 or hi > 1.0:
            raise ValueError(
                f"image values must lie in [-1, 1], got [{lo:.4g}, {hi:.4g}]; use image_io.load_image, or "
                "x / 127.5 - 1 for uint8 pixels"
            )
        if image.shape[0] == 1:
            image = xp.broadcast_to(image, (n_prompts,) + image.shape[1:])
        return xp.repeat(image, num_images_per_prompt, axis=0)  # (P * n, H, W, C), prompt by prompt

    def _image_channels(self) -> int:
        """Channels of the input image: the U-Net's in pixel space, the VAE's in latent space."""
        return int(self.unet.in_channels if self.vae is None else self.vae.in_channels)
