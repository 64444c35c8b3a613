"""Text-to-image steered by a control image: a ControlNet's residuals added to the U-Net at every step.

diffusers' ``StableDiffusionControlNetPipeline`` in its plainest form: the text-to-image
loop of :mod:`~diffusion_np.pipelines.text_to_image`, where each U-Net call becomes::

    down, mid = controlnet(x_t, t, c, control, conditioning_scale)     (models/controlnet.py)
    eps       = unet(x_t, t, c, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid)

With classifier-free guidance the batch holds every x_t twice (unconditional, then
conditional), and both halves get the control image, as in diffusers: the guidance then
contrasts the prompt with the empty caption, both under the same control.

``control_image`` is at the *image* resolution, channels-last, in [0, 1] (diffusers' control
image processor does not normalise to [-1, 1]); it also fixes the image size. Its channels
are the ControlNet's ``conditioning_channels`` (1 for the shapes masks, 3 for SD 1.5's
ControlNets). :func:`~diffusion_np.pipelines.image_io.load_control_image` reads a file.

``conditioning_scale`` multiplies every residual: 0 gives the base model's image, 1 what the
ControlNet was trained with, more binds the layout harder (and eventually overshoots).

Left out: guess mode, several ControlNets at once, control guidance start/end
(applying the ControlNet on part of the schedule only), and image-to-image with control.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_np.backend import get_xp
from diffusion_np.nn.module import inference_mode
from diffusion_np.pipelines.image_to_image import value_range
from diffusion_np.pipelines.text_to_image import PipelineOutput, TextToImagePipeline, forward_only
from diffusion_np.samplers.loop import sample

__all__ = ["ControlNetPipeline", "ControlledUNet", "check_conditioning_scale"]


def check_conditioning_scale(conditioning_scale) -> float:
    """The ControlNet's scale as a float; TypeError for a non-number, ValueError for a non-finite one."""
    if isinstance(conditioning_scale, bool) or not isinstance(conditioning_scale, (int, float, np.number)):
        raise TypeError(f"conditioning_scale must be a number, got {type(conditioning_scale).__name__}")
    if not math.isfinite(float(conditioning_scale)):
        raise ValueError(f"conditioning_scale must be finite, got {conditioning_scale!r}")
    return float(conditioning_scale)


class ControlledUNet:
    """``unet(x, t, c)`` with a ControlNet's residuals: what the sampling loop calls in place of the U-Net.

    ``control`` is (B, H, W, C) on the U-Net's device; a batch of ``k * B`` samples (the 2B of
    classifier-free guidance) gets the control images ``k`` times, in the same order.
    """

    def __init__(self, unet, controlnet, control, conditioning_scale: float = 1.0) -> None:
        self.unet, self.controlnet, self.control = unet, controlnet, control
        self.conditioning_scale = check_conditioning_scale(conditioning_scale)
        self.in_channels = unet.in_channels  # what the pipeline reads off a denoiser

    def __call__(self, x, t, context):
        control = self.control
        if x.shape[0] != control.shape[0]:
            copies = x.shape[0] // control.shape[0]
            control = get_xp(control).concatenate([control] * copies, axis=0)  # (k B, H, W, C)
        down, mid = self.controlnet(x, t, context, control, self.conditioning_scale)
        return self.unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)


class ControlNetPipeline(TextToImagePipeline):
    """Text-to-image with a control image (module docstring).

    Parameters
    ----------
    unet, text_encoder, tokenizer, sampler, vae
        As for :class:`~diffusion_np.pipelines.TextToImagePipeline` (the base model, frozen).
    controlnet : ControlNetModel
        Made for this U-Net (same down path, ``cross_attention_dim`` and ``in_channels``); its
        conditioning embedding must downsample as much as the VAE does (8 for SD, 4 for shapes).
    """

    def __init__(self, unet, controlnet, text_encoder, tokenizer, sampler, vae=None) -> None:
        super().__init__(unet, text_encoder, tokenizer, sampler, vae)
        if controlnet.in_channels != unet.in_channels or controlnet.cross_attention_dim != unet.cross_attention_dim:
            raise ValueError(
                f"the ControlNet takes {controlnet.in_channels} input channels and text of width "
                f"{controlnet.cross_attention_dim}, the U-Net {unet.in_channels} and {unet.cross_attention_dim}: "
                "it was made for another model"
            )
        if controlnet.conditioning_downscale != self.vae_scale_factor:
            raise ValueError(
                f"the ControlNet's conditioning embedding downsamples the control image by "
                f"{controlnet.conditioning_downscale}, but the images are {self.vae_scale_factor}x the U-Net's sample: "
                "it was made for another VAE"
            )
        self.controlnet = controlnet

    @forward_only
    def __call__(
        self,
        prompt: str | list[str],
        control_image,
        conditioning_scale: float = 1.0,
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
        """Generate images for ``prompt`` laid out as ``control_image`` says.

        Parameters
        ----------
        prompt, negative_prompt, guidance_scale, num_inference_steps, seed, num_images_per_prompt, noise,
        return_trajectory, progress, **step_kwargs
            As for :class:`TextToImagePipeline`.
        control_image : array (H, W, C) or (B, H, W, C), float in [0, 1]
            One control image for every prompt, or one per prompt; C is the ControlNet's
            ``conditioning_channels``; H and W are the image size (divisible by ``vae_scale_factor * unet_factor``).
        conditioning_scale : float
            Multiplies the ControlNet's residuals (0: the base model alone).
        """
        scale = check_conditioning_scale(conditioning_scale)
        prompts, denoiser = self._prepare(prompt, negative_prompt, guidance_scale, num_images_per_prompt)
        controls = self._prepare_control(control_image, prompts, num_images_per_prompt)  # (B, H, W, C)
        denoiser.unet = ControlledUNet(self.unet, self.controlnet, controls, scale)  # the guided calls go through it
        shape = self._sample_shape(len(prompts), int(controls.shape[1]), int(controls.shape[2]))
        xp, dtype = self._xp_dtype()
        with inference_mode(self.controlnet):
            result = sample(
                denoiser, shape, self.sampler, num_inference_steps, seed=seed, noise=noise, progress=progress,
                xp=xp, dtype=dtype, return_trajectory=return_trajectory, **step_kwargs,
            )  # fmt: skip
        x0, trajectory = result if return_trajectory else (result, None)
        return self._output(x0, prompts, trajectory)

    def _prepare_control(self, control_image, prompts: list[str], num_images_per_prompt: int):
        """Check the control image(s), repeat them to one per generated image: (B, H, W, C) on the device."""
        channels = self.controlnet.conditioning_channels
        if not hasattr(control_image, "shape") or not hasattr(control_image, "dtype"):
            raise TypeError(f"control_image must be an array (H, W, {channels}) or (B, H, W, {channels}), "
                            f"got {type(control_image).__name__}")
        if not np.issubdtype(control_image.dtype, np.floating):
            raise TypeError(f"control_image must be float in [0, 1], got dtype {control_image.dtype}; "
                            "image_io.load_control_image reads a file")
        if control_image.ndim == 3:
            control_image = control_image[None]
        n_prompts = len(prompts) // num_images_per_prompt
        if control_image.ndim != 4 or control_image.shape[0] not in (1, n_prompts):
            raise ValueError(f"control_image must be (H, W, C), or (B, H, W, C) with B = 1 or one per prompt "
                             f"({n_prompts}), got {tuple(control_image.shape)}")
        if control_image.shape[-1] != channels:
            raise ValueError(f"control_image must have {channels} channel(s), the ControlNet's conditioning_channels "
                             f"(channels last), got shape {tuple(control_image.shape)}")
        self._check_size(int(control_image.shape[1]), int(control_image.shape[2]))
        xp, dtype = self._xp_dtype()
        control_image = xp.asarray(control_image, dtype=dtype)
        lo, hi = value_range(control_image)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(f"control_image values must lie in [0, 1] (not [-1, 1]), got [{lo:.4g}, {hi:.4g}]")
        if control_image.shape[0] == 1:
            control_image = xp.broadcast_to(control_image, (n_prompts,) + control_image.shape[1:])
        return xp.repeat(control_image, num_images_per_prompt, axis=0)  # (P * n, H, W, C), prompt by prompt
