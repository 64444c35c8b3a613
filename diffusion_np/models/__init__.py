"""The networks of Stable Diffusion, shaped like the real ones, with hand-written backward passes.

* :class:`UNet2DConditionModel` (unet.py, built from unet_blocks.py, resnet.py, transformer.py)
* :class:`ControlNetModel` (controlnet.py): a trainable copy of the U-Net's encoder that steers it
* :class:`UNetConfig`, :class:`VAEConfig`, :class:`ControlNetConfig` (config.py): their validated sizes
* :class:`AutoencoderKL` (vae.py), the VAE of latent diffusion
* :class:`TextEncoder` (a CLIP-shaped text transformer) and :class:`WordTokenizer`
* :class:`ToyDenoiser`, the MLP for 2-D toy data

Parameter names are diffusers' / transformers' state_dict keys.
"""

from diffusion_np.models.clip_tokenizer import CLIPTokenizer
from diffusion_np.models.config import ControlNetConfig, UNetConfig, VAEConfig
from diffusion_np.models.controlnet import ControlNetConditioningEmbedding, ControlNetModel
from diffusion_np.models.resnet import ResnetBlock2D
from diffusion_np.models.text_encoder import TextEncoder, TextEncoderConfig
from diffusion_np.models.tokenizer import WordTokenizer
from diffusion_np.models.toy_mlp import ToyDenoiser
from diffusion_np.models.transformer import BasicTransformerBlock, FeedForward, Transformer2DModel
from diffusion_np.models.unet import UNet2DConditionModel
from diffusion_np.models.unet_blocks import DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D
from diffusion_np.models.vae import AutoencoderKL, DiagonalGaussian

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussian",
    "BasicTransformerBlock",
    "CLIPTokenizer",
    "ControlNetConditioningEmbedding",
    "ControlNetConfig",
    "ControlNetModel",
    "DownBlock2D",
    "FeedForward",
    "ResnetBlock2D",
    "TextEncoder",
    "TextEncoderConfig",
    "ToyDenoiser",
    "Transformer2DModel",
    "UNet2DConditionModel",
    "UNetConfig",
    "UNetMidBlock2DCrossAttn",
    "UpBlock2D",
    "VAEConfig",
    "WordTokenizer",
]
