"""DDIM inversion of a real image, and regeneration (or an edit) from the inverted noise.

Editing a photograph with a diffusion model starts by finding the noise that the model
would turn into that photograph. DDIM with eta = 0 is deterministic, so running its
update the other way (:class:`~diffusion_np.samplers.ddim_inverse.DDIMInverseSampler`)
gives such a noise::

    x_0   = encode(image)                                  the latents, or the pixels
    x_T   = invert(x_0, prompt)                            N inversion steps upwards
    x_0'  = DDIM(x_T, prompt)            ~ x_0             N DDIM steps back down (a reconstruction)
    x_0'' = DDIM(x_T, edited prompt)                       the same noise, another caption (an edit)

Why the reconstruction is not exact, and what guidance does to it: each inversion step
asks the model at the *target* level t with the sample still at the level below, so it
assumes eps_theta barely changes over one step. More steps make the assumption better;
classifier-free guidance with w > 1 makes it worse, because the guided eps
eps_u + w (eps_c - eps_u) amplifies the change of eps_c - eps_u between the levels by w.
Edits therefore usually invert with w = 1 (Mokady et al. 2023, "Null-text Inversion for
Editing Real Images using Guided Diffusion Models", Sec. 3.1), and this pipeline's default
is w = 1. :func:`reconstruction_error` measures both effects.

Left out: null-text optimisation, prompt-to-prompt attention control, eta > 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from diffusion_np.backend import asnumpy, default_rng
from diffusion_np.pipelines.image_to_image import ImageToImagePipeline, check_num_inference_steps
from diffusion_np.pipelines.text_to_image import PipelineOutput, encode_images, forward_only
from diffusion_np.samplers.ddim import DDIMSampler
from diffusion_np.samplers.ddim_inverse import DDIMInverseSampler
from diffusion_np.samplers.loop import Trajectory, denoise


class InversionOutput(NamedTuple):
    """What :meth:`DDIMInversionPipeline.invert` returns.

    ``noise`` is x_T in the U-Net's space (B, h, w, C): pass it as ``noise=`` to the
    text-to-image pipeline, or to this pipeline's ``__call__``, to regenerate. ``x0`` is the
    encoded image it started from; ``trajectory`` every x_t on the way up (when asked).
    """

    noise: object
    x0: object
    prompts: list
    trajectory: Trajectory | None


class DDIMInversionPipeline(ImageToImagePipeline):
    """Invert images with DDIM and regenerate them; constructor as :class:`TextToImagePipeline`,
    but ``sampler`` must be a :class:`DDIMSampler`: eta = 0 DDIM is the ODE that is inverted."""

    def __init__(self, unet, text_encoder, tokenizer, sampler: DDIMSampler, vae=None) -> None:
        if not isinstance(sampler, DDIMSampler):
            raise TypeError(
                f"sampler must be a DDIMSampler (DDIM inversion inverts the eta = 0 DDIM update), "
                f"got {type(sampler).__name__}"
            )
        super().__init__(unet, text_encoder, tokenizer, sampler, vae)
        self.inverse_sampler = DDIMInverseSampler.from_sampler(sampler)

    @forward_only
    def invert(
        self,
        prompt: str | list[str],
        image,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        return_trajectory: bool = False,
        progress: bool = True,
    ) -> InversionOutput:
        """x_T for ``image`` under ``prompt``: N DDIM inversion steps from the encoded image.

        Parameters
        ----------
        prompt : str or list of str
            The caption the image is inverted under (one per image).
        image : array (H, W, C) or (B, H, W, C), float in [-1, 1]
            As for :class:`ImageToImagePipeline`.
        guidance_scale : float >= 1
            w of classifier-free guidance during inversion; 1 (no guidance) inverts best.
        num_inference_steps : int
            N, the same N the regeneration should use.
        """
        steps = check_num_inference_steps(num_inference_steps)
        prompts, denoiser = self._prepare(prompt, None, guidance_scale, 1)
        images = self._prepare_images(image, prompts, 1)  # (B, H, W, C) on the device
        x0 = encode_images(self.vae, images)  # (B, h, w, C)
        self.inverse_sampler.set_timesteps(steps)
        # the inverse sampler is deterministic: the loop's per-step draws are ignored
        noise, trajectory = denoise(
            denoiser, self.inverse_sampler, x0, self.inverse_sampler.timesteps, default_rng(0),
            progress=progress, return_trajectory=return_trajectory,
        )  # fmt: skip
        return InversionOutput(noise, x0, prompts, trajectory)

    @forward_only
    def __call__(
        self,
        prompt: str | list[str],
        image,
        edit_prompt: str | list[str] | None = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        edit_guidance_scale: float | None = None,
        return_trajectory: bool = False,
        progress: bool = True,
    ) -> PipelineOutput:
        """Invert ``image`` under ``prompt`` at ``guidance_scale``, then run DDIM (eta = 0) from the
        inverted noise under ``edit_prompt`` (an edit) or ``prompt`` again (a reconstruction), at
        ``edit_guidance_scale`` (default: ``guidance_scale``; only equal scales can reconstruct)."""
        inverted = self.invert(prompt, image, guidance_scale, num_inference_steps, progress=progress)
        target = inverted.prompts if edit_prompt is None else edit_prompt
        w_down = guidance_scale if edit_guidance_scale is None else edit_guidance_scale
        prompts, denoiser = self._prepare(target, None, w_down, 1)
        if len(prompts) != len(inverted.prompts):
            raise ValueError(
                f"edit_prompt must give one caption per inverted image ({len(inverted.prompts)}), got {len(prompts)}"
            )
        self.sampler.set_timesteps(num_inference_steps)
        x0, trajectory = denoise(
            denoiser, self.sampler, inverted.noise, self.sampler.timesteps, default_rng(0), progress=progress,
            return_trajectory=return_trajectory, eta=0.0,
        )  # fmt: skip
        return self._output(x0, prompts, trajectory)


def reconstruction_error(pipe: DDIMInversionPipeline, prompt, image, steps, guidance_scales=(1.0,),
                         progress: bool = False) -> list[dict]:
    """Invert and regenerate ``image`` for every (N, w) and measure how far the result is.

    Returns one row per pair: ``steps``, ``guidance_scale``, ``mse`` (mean squared error in
    [-1, 1] pixel units, over all images) and ``psnr`` (dB, peak-to-peak 2: 10 log10(4 / mse)).
    """
    reference = np.asarray(asnumpy(image), dtype=np.float64)
    rows = []
    for n in steps:
        for w in guidance_scales:
            out = pipe(prompt, image, guidance_scale=w, num_inference_steps=n, progress=progress)
            mse = float(np.mean((out.images.astype(np.float64) - reference) ** 2))
            psnr = math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)
            rows.append({"steps": int(n), "guidance_scale": float(w), "mse": mse, "psnr": psnr})
    return rows
