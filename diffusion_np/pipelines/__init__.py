"""Pipelines: text-to-image, image-to-image (SDEdit), inpainting, DDIM inversion, ControlNet; pixels or latents.

Each pipeline is built from a U-Net, a text encoder, a tokenizer, a sampler and an
optional VAE (``vae=None``: the U-Net works on pixels), and is called with prompts::

    pipe = TextToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler(clip_sample=False))
    out = pipe("a small red circle in the top left", guidance_scale=5.0, num_inference_steps=50)
    save_image("out.png", out.images)

Images go in and come out as channels-last float32 in [-1, 1]; :mod:`.image_io` reads
and writes PNG files.
"""

from diffusion_np.pipelines.controlnet import ControlNetPipeline
from diffusion_np.pipelines.image_io import (
    from_uint8,
    load_control_image,
    load_image,
    load_mask,
    make_grid,
    save_image,
    to_uint8,
)
from diffusion_np.pipelines.image_to_image import ImageToImagePipeline, img2img_timesteps
from diffusion_np.pipelines.inpaint import InpaintPipeline, downsample_mask
from diffusion_np.pipelines.inversion import DDIMInversionPipeline, InversionOutput, reconstruction_error
from diffusion_np.pipelines.text_to_image import GuidedDenoiser, PipelineOutput, TextToImagePipeline

__all__ = [
    "ControlNetPipeline",
    "DDIMInversionPipeline",
    "GuidedDenoiser",
    "ImageToImagePipeline",
    "InpaintPipeline",
    "InversionOutput",
    "PipelineOutput",
    "TextToImagePipeline",
    "downsample_mask",
    "from_uint8",
    "img2img_timesteps",
    "load_control_image",
    "load_image",
    "load_mask",
    "make_grid",
    "reconstruction_error",
    "save_image",
    "to_uint8",
]
