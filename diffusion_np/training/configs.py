"""The configs of the text-to-image tasks: every JSON value that rebuilds a task and its networks.

One dataclass per task, stored as ``config.json`` in every checkpoint:

* :class:`DigitsConfig`: ``digits``, pixel-space diffusion on 8x8 digits;
* :class:`ShapesVAEConfig`: ``shapes-vae``, the :class:`~diffusion_np.models.AutoencoderKL` on shapes;
* :class:`ShapesConfig`: ``shapes``, latent diffusion with the frozen VAE of a ``shapes-vae`` run.

Fields left as None (the ``unet``, ``text_encoder``, ``tokenizer``, ``vae`` model configs)
are filled in ``__post_init__`` from the ``preset`` (:mod:`~diffusion_np.training.presets`),
and then stored, so a checkpoint is self-contained: it rebuilds its model without the
presets, the data or the VAE run it came from. Every field is a JSON value (tuples
become lists), so a config compares equal to its saved copy.

Left out: the training-loop settings (steps, learning rate, batch size): those are the
trainer's :class:`~diffusion_np.training.trainer.TrainConfig`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffusion_np.data.digits import digit_captions
from diffusion_np.data.shapes import all_prompts
from diffusion_np.models.tokenizer import WordTokenizer
from diffusion_np.pretrained import PREFIX as PRETRAINED_PREFIX
from diffusion_np.training.presets import PRESETS, get_preset
from diffusion_np.training.vae_helpers import latent_scaling_factor, load_vae

__all__ = ["PREDICTION_TYPES", "DigitsConfig", "ShapesConfig", "ShapesVAEConfig"]

#: what the U-Net of a text-to-image task can predict: the noise, or v (Salimans & Ho 2022)
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _json(value):
    """A JSON round trip: tuples become lists, so a config compares equal to its saved copy."""
    return json.loads(json.dumps(value))


# ============================================================================ shared checks
def _check_common(config) -> None:
    if config.preset not in PRESETS[config.task]:
        raise ValueError(f"unknown preset {config.preset!r}; choose one of {', '.join(PRESETS[config.task])}")
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {config.prediction_type!r}")
    if config.min_snr_gamma is not None and not config.min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0 (or None: no weighting), got {config.min_snr_gamma}")
    if not 0.0 <= config.caption_dropout < 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1), got {config.caption_dropout}")
    if not config.guidance_scale >= 1.0:
        raise ValueError(f"guidance_scale must be >= 1, got {config.guidance_scale}")


def _fill_text_model(config, captions: list[str], max_length: int) -> None:
    """Fill ``tokenizer`` and ``text_encoder`` of a config from its preset (when not given)."""
    preset = get_preset(config.task, config.preset)
    if config.tokenizer is None:
        config.tokenizer = WordTokenizer.from_captions(captions, max_length=max_length).to_dict()
    if config.text_encoder is None:
        tokenizer = WordTokenizer.from_dict(config.tokenizer)
        config.text_encoder = dict(preset["text_encoder"], vocab_size=tokenizer.vocab_size,
                                   max_position_embeddings=tokenizer.max_length)
    config.text_encoder = _json(config.text_encoder)
    config.tokenizer = _json(config.tokenizer)


# ============================================================================ digits
@dataclass
class DigitsConfig:
    """Everything that rebuilds a :class:`~diffusion_np.training.tasks.DigitsTask`; ``unet``, ``text_encoder`` and
    ``tokenizer`` are filled from ``preset`` when None (and stored, so a checkpoint is self-contained).

    8x8 pixels, the digits' native size: upsampling to 16x16 adds no information and
    makes every U-Net step about 3.5x slower (0.75 s vs 2.7 s at batch 64 measured here),
    so a 10-minute demo gets 3.5x more steps at 8x8.
    """

    preset: str = "demo"
    prediction_type: str = "epsilon"
    min_snr_gamma: float | None = None
    caption_dropout: float = 0.1
    guidance_scale: float = 1.5  # of the previews; pretrained:digits reads 1.000 at w = 3 and 5 (model card)
    image_size: int = 8
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    data_seed: int = 0  # seed of the train/test split
    unet: dict | None = None
    text_encoder: dict | None = None
    tokenizer: dict | None = None

    task = "digits"

    def __post_init__(self) -> None:
        _check_common(self)
        if self.image_size not in (8, 16, 32):
            raise ValueError(f"image_size must be 8, 16 or 32, got {self.image_size}")
        _fill_text_model(self, digit_captions(np.arange(10)), max_length=8)
        if self.unet is None:
            unet = get_preset("digits", self.preset)["unet"]
            self.unet = dict(unet, in_channels=1, out_channels=1, sample_size=self.image_size,
                             cross_attention_dim=self.text_encoder["hidden_size"])
        self.unet = _json(self.unet)


# ============================================================================ shapes VAE
@dataclass
class ShapesVAEConfig:
    """Everything that rebuilds a :class:`~diffusion_np.training.tasks.ShapesVAETask`; ``vae`` (diffusers' AutoencoderKL
    fields) is filled from ``preset`` when None.

    ``kl_weight`` is beta of ``AutoencoderKL.loss`` (reconstruction summed per image):
    SD's 1e-6 leans on LPIPS and a GAN to shape the latents; with the reconstruction term
    alone a somewhat larger beta keeps the latents closer to N(0, I) at no visible cost.

    ``recon`` is "mse", not SD's L1: a shape covers 3-12% of a black image, and with L1
    (whose optimum is a median) the demo run stayed at an all-black reconstruction for
    all its 500 steps (held-out MSE 0.129, that of predicting black everywhere); the
    squared error pays 1-4 per wrong object pixel and leaves that plateau quickly.
    """

    preset: str = "demo"
    kl_weight: float = 1e-5
    recon: str = "mse"
    data_seed: int = 0
    vae: dict | None = None

    task = "shapes-vae"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS["shapes-vae"]:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS['shapes-vae'])}")
        if not self.kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.recon not in ("l1", "mse"):
            raise ValueError(f"recon must be 'l1' or 'mse', got {self.recon!r}")
        if self.vae is None:
            self.vae = get_preset("shapes-vae", self.preset)["vae"]
        self.vae = _json(self.vae)


# ============================================================================ shapes (latent diffusion)
@dataclass
class ShapesConfig:
    """Everything that rebuilds a :class:`~diffusion_np.training.tasks.ShapesTask`.

    ``vae`` is the path of a ``shapes-vae`` run. ``vae_config`` and ``scaling_factor``
    are read and computed from it when None (:func:`~diffusion_np.training.vae_helpers.latent_scaling_factor`) and then
    stored, so the checkpoint rebuilds the model without that directory (its
    ``vae.safetensors`` holds the VAE weights). The schedule is SD's scaled-linear one.
    """

    vae: str | None = None
    preset: str = "demo"
    prediction_type: str = "epsilon"
    min_snr_gamma: float | None = None
    caption_dropout: float = 0.1
    guidance_scale: float = 3.0
    latent_pool: int | None = None  # None: the preset's; 0: encode fresh images every step
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    data_seed: int = 0
    scaling_factor: float | None = None
    vae_config: dict | None = None
    unet: dict | None = None
    text_encoder: dict | None = None
    tokenizer: dict | None = None

    task = "shapes"

    def __post_init__(self) -> None:
        _check_common(self)
        if self.latent_pool is None:
            self.latent_pool = get_preset("shapes", self.preset)["latent_pool"]
        if not (isinstance(self.latent_pool, int) and self.latent_pool >= 0):
            raise ValueError(f"latent_pool must be an integer >= 0, got {self.latent_pool!r}")
        if self.vae is not None and not str(self.vae).startswith(PRETRAINED_PREFIX):
            self.vae = str(Path(self.vae).resolve())
        if self.vae_config is None or self.scaling_factor is None:
            if self.vae is None:
                raise ValueError("shapes needs the VAE of a shapes-vae run: pass its directory (--vae DIR)")
            vae = load_vae(self.vae)
            if self.vae_config is None:
                self.vae_config = vae.config
            if self.scaling_factor is None:
                self.scaling_factor, _ = latent_scaling_factor(vae)
        self.vae_config = _json(dict(self.vae_config, scaling_factor=self.scaling_factor))
        # all 180 prompts: the held-out combinations use the same words, in new combinations
        _fill_text_model(self, all_prompts("all"), max_length=12)
        if self.unet is None:
            vae_cfg = self.vae_config
            latent_side = vae_cfg["sample_size"] // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
            self.unet = dict(get_preset("shapes", self.preset)["unet"], in_channels=vae_cfg["latent_channels"],
                             out_channels=vae_cfg["latent_channels"], sample_size=latent_side,
                             cross_attention_dim=self.text_encoder["hidden_size"])
        self.unet = _json(self.unet)
