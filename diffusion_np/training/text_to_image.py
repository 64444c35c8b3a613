"""Train the tiny Stable Diffusion end to end: text-conditioned digits, a shapes VAE, latent text-to-image.

Three tasks on the :mod:`~diffusion_np.training.trainer` protocol:

* ``digits``: pixel-space diffusion on scikit-learn's 8x8 digits, conditioned on
  "the digit seven" through a small CLIP-shaped text encoder and the U-Net's cross-attention.
* ``shapes-vae``: the :class:`~diffusion_np.models.AutoencoderKL` on 32x32 RGB shapes,
  4-channel latents at 8x8 (3 levels, f = 4).
* ``shapes``: latent diffusion (Rombach et al. 2022) on the shapes captions with the
  frozen VAE of a ``shapes-vae`` run.

One training step of the text-to-image tasks is DDPM Algorithm 1 with a text condition,
as in diffusers' ``examples/text_to_image/train_text_to_image.py``::

    1. (x_0, caption) ~ data;  caption <- "" with probability p = 0.1     (Ho & Salimans 2022, Sec. 3.2)
       latent tasks: x_0 = scaling_factor * z,  z ~ q(z | image)            (Rombach et al. Sec. 4.3.2)
    2. c   = text_encoder(tokenizer(caption))                              (B, L, D)
    3. t ~ Uniform({0, ..., T-1}),  eps ~ N(0, I)
    4. x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps                            (DDPM Eq. 4)
    5. loss = mean_b w_b || target_b - unet(x_t, t, c)_b ||^2               (DDPM Eq. 14)
          target = eps ("epsilon") or v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 ("v_prediction",
          Salimans & Ho 2022); w_b = 1 or min-SNR-gamma (Hang et al. 2023)
    6. backward: unet.backward -> (dx_t, dc);  text_encoder.backward(dc)

Step 6 is what "trained jointly" means: the gradient of the diffusion loss with
respect to the text embeddings ``c`` is the sum of what every cross-attention layer
sends back through its keys and values, and the text encoder turns it into its own
parameter gradients. (Stable Diffusion froze a pre-trained CLIP instead; we have no
pre-trained one, and the captions' vocabulary is tiny.) The U-Net and the text encoder
are one :class:`TextToImageModel`, so the trainer's AdamW, gradient clipping and EMA
treat them as one set of weights; the VAE sits beside them, frozen.

The empty caption "" (``<bos> <eos> <pad>...``) that replaces 10% of the captions
teaches the same network the unconditional prediction classifier-free guidance needs
at sampling time (:class:`~diffusion_np.pipelines.TextToImagePipeline`).

Latents for ``shapes``: encoding each batch costs a VAE encoder forward per step, so
by default the task encodes a fixed pool of ``latent_pool`` training images once (on
the first step), keeps each posterior's mean and standard deviation, and draws
``z = mean + std * eps`` afresh for every batch, as SD's training samples the
posterior. The shapes are drawn in code with random jitter, so a pool of a few
thousand images holds every training combination many times. ``latent_pool=0``
encodes fresh images every step instead.

The scaling factor (Rombach et al. Sec. 4.3.2 and Appendix D.1: "we rescale the latents
by the component-wise standard deviation" estimated on a batch, which gave SD's 0.18215)
is computed by :func:`latent_scaling_factor` as 1 / std of sampled latents of 256
training images, once, when the ``shapes`` config is made, and stored in it (and in
the VAE's config), so checkpoints and resumes use the same value.

Checkpoints: the trainer writes ``unet.safetensors``, ``text_encoder.safetensors``
(and ``vae.safetensors``) and the task config, which holds every model config and the
tokenizer's vocabulary. :meth:`TextToImageModel.save` writes the same weights without
a training state, and :meth:`TextToImageModel.load` reads either.

Left out: a pre-trained or frozen text encoder, offset noise, input perturbation,
SNR-dependent timestep sampling, fine-tuning the VAE decoder, gradient accumulation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffusion_np.backend import asnumpy, device_of, to_device
from diffusion_np.data.digits import DIGIT_WORDS, digit_captions, load_digits
from diffusion_np.data.shapes import ShapesDataset, all_prompts, parse_caption
from diffusion_np.diffusion import check_prediction_type, min_snr_weights, q_sample, training_target
from diffusion_np.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from diffusion_np.models.text_encoder import TextEncoder, TextEncoderConfig
from diffusion_np.models.tokenizer import WordTokenizer
from diffusion_np.models.unet import UNet2DConditionModel
from diffusion_np.models.vae import AutoencoderKL
from diffusion_np.nn.losses import mse_loss_backward, mse_loss_forward
from diffusion_np.nn.module import Module
from diffusion_np.pretrained import PREFIX as PRETRAINED_PREFIX
from diffusion_np.schedules import NoiseSchedule
from diffusion_np.training.presets import PRESETS, get_preset

__all__ = [
    "DigitsConfig",
    "DigitsTask",
    "ShapesConfig",
    "ShapesTask",
    "ShapesVAEConfig",
    "ShapesVAETask",
    "TextToImageModel",
    "drop_captions",
    "latent_scaling_factor",
    "load_vae",
    "vae_reconstruction_mse",
]

PREDICTION_TYPES = ("epsilon", "v_prediction")
#: the bundle's own checkpoint kind (a weights-only export, no training state)
BUNDLE_FORMAT = "text_to_image"


def _json(value):
    """A JSON round trip: tuples become lists, so a config compares equal to its saved copy."""
    return json.loads(json.dumps(value))


# ============================================================================ the model bundle
class TextToImageModel(Module):
    """A text-conditioned denoiser: U-Net + text encoder (trained together), tokenizer, optional frozen VAE.

    ``forward(x_t (B, h, w, C), t (B,), input_ids (B, L)) -> (B, h, w, C)`` runs the
    text encoder, then the U-Net with the embeddings as its cross-attention context;
    ``backward(dout)`` goes back through both and returns d loss / d x_t. The VAE is
    not a child module: optimizers, EMA and ``state_dict`` see the U-Net and the text
    encoder only.

    Parameters
    ----------
    unet : UNet2DConditionModel
    text_encoder : TextEncoder
        Its ``hidden_size`` must equal the U-Net's ``cross_attention_dim``.
    tokenizer : WordTokenizer
    schedule : dict
        Noise-schedule keywords (``num_train_timesteps``, ``beta_start``, ``beta_end``,
        ``beta_schedule``) and ``prediction_type``.
    vae : AutoencoderKL, optional
        None: the U-Net works on pixels.
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: TextEncoder, tokenizer: WordTokenizer,
                 schedule: dict, vae: AutoencoderKL | None = None) -> None:
        super().__init__()
        if text_encoder.config.hidden_size != unet.cross_attention_dim:
            raise ValueError(
                f"TextToImageModel: the text encoder's hidden_size ({text_encoder.config.hidden_size}) must equal "
                f"the U-Net's cross_attention_dim ({unet.cross_attention_dim})"
            )
        if text_encoder.config.max_position_embeddings < tokenizer.max_length:
            raise ValueError(
                f"TextToImageModel: the tokenizer's rows ({tokenizer.max_length} ids) are longer than the text "
                f"encoder's max_position_embeddings ({text_encoder.config.max_position_embeddings})"
            )
        if vae is not None and vae.latent_channels != unet.in_channels:
            raise ValueError(f"TextToImageModel: the VAE has {vae.latent_channels} latent channels but the U-Net "
                             f"takes {unet.in_channels}")
        check_prediction_type(schedule.get("prediction_type", "epsilon"))
        self.unet = unet  # children: the trainable weights
        self.text_encoder = text_encoder
        object.__setattr__(self, "vae", vae)  # not a child: frozen, skipped by optimizers and the EMA
        self.tokenizer = tokenizer
        self.schedule_config = dict(schedule)
        self.prediction_type = self.schedule_config.pop("prediction_type", "epsilon")
        self.noise_schedule = NoiseSchedule.from_config(**self.schedule_config)

    # ------------------------------------------------------------------ forward / backward
    def encode_text(self, captions: list[str]):
        """Captions -> (B, L, hidden_size) embeddings (keeps the text encoder's cache for a backward)."""
        ids = self.tokenizer.encode(captions).ids  # (B, L) int64 on the host
        return self.text_encoder(to_device(ids, self.device))

    def forward(self, x_t, t, input_ids):
        context = self.text_encoder(input_ids)  # (B, L) -> (B, L, D)
        return self.unet(x_t, t, context)  # (B, h, w, C)

    def backward(self, dout):
        dx_t, dcontext = self.unet.backward(dout)  # dcontext: the sum over every cross-attention layer
        self.text_encoder.backward(dcontext)  # ... becomes the text encoder's parameter gradients
        return dx_t

    @property
    def device(self) -> str:
        return device_of(self.unet.conv_in.weight)

    # ------------------------------------------------------------------ sampling
    def make_sampler(self, name: str = "ddim", clip_sample: bool = False):
        """Sampler ``name`` (a key of ``SAMPLERS``) on this model's schedule and prediction type.

        ``clip_sample`` (DDPM/DDIM only, pixel space only: latents are not bounded) clips
        the predicted x0 to [-1, 1] at every step. It is off by default because it fights
        classifier-free guidance: diffusers' DDIM clips x0 but keeps the (guided) noise
        prediction it came from, so the next x_t mixes a clipped image with a noise that
        no longer matches it. On the shipped digits model (DDIM 50 steps, 100 samples) the
        conditional accuracy is 0.99 / 0.27 / 0.07 / 0.01 with clipping at guidance
        1.5 / 2 / 3 / 5, and 1.00 at 2, 3 and 5 without it. The final images are clipped
        to [-1, 1] either way.
        """
        from diffusion_np.samplers import SAMPLERS

        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
        kwargs = dict(self.schedule_config, prediction_type=self.prediction_type)
        if name in ("ddpm", "ddim"):
            kwargs["clip_sample"] = bool(clip_sample) and self.vae is None
        return SAMPLERS[name](**kwargs)

    def pipeline(self, sampler: str = "ddim"):
        """A :class:`~diffusion_np.pipelines.TextToImagePipeline` over these networks."""
        from diffusion_np.pipelines.text_to_image import TextToImagePipeline

        return TextToImagePipeline(self.unet, self.text_encoder, self.tokenizer, self.make_sampler(sampler), self.vae)

    def generate(self, prompts: list[str], sampler: str = "ddim", steps: int = 50, guidance_scale: float = 3.0,
                 seed: int = 0, progress: bool = False, negative_prompt: str | None = None) -> np.ndarray:
        """Images (B, H, W, C) in [-1, 1] on the host, one per prompt, with classifier-free guidance
        (the unconditional branch is ``negative_prompt``, or the empty caption the model was trained with)."""
        negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
        out = self.pipeline(sampler)(list(prompts), negative_prompt=negative, guidance_scale=guidance_scale,
                                     num_inference_steps=steps, seed=seed, progress=progress)
        return out.images

    # ------------------------------------------------------------------ saving
    def modules(self) -> dict[str, Module]:
        """``{"unet", "text_encoder"[, "vae"]}``: one safetensors file each in a checkpoint."""
        modules = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.vae is not None:
            modules["vae"] = self.vae
        return modules

    def model_config(self) -> dict:
        """Everything that rebuilds the networks: model configs, vocabulary, schedule."""
        return _json({
            "unet": self.unet.config,
            "text_encoder": self.text_encoder.config.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "vae": None if self.vae is None else self.vae.config,
            "schedule": dict(self.schedule_config, prediction_type=self.prediction_type),
        })

    def save(self, directory, dtype=None) -> Path:
        """Write the current weights (no training state) and :meth:`model_config` to ``directory``."""
        config = {"kind": BUNDLE_FORMAT, **self.model_config()}
        return save_checkpoint(directory, self.modules(), config, dtype=dtype)

    @classmethod
    def from_config(cls, config: dict, rng=None) -> TextToImageModel:
        """Networks built from :meth:`model_config` (randomly initialised from ``rng``)."""
        rng = rng if rng is not None else np.random.default_rng(0)
        unet = UNet2DConditionModel.from_config(config["unet"], rng=rng)
        text_encoder = TextEncoder(TextEncoderConfig(**config["text_encoder"]), rng=rng)
        tokenizer = WordTokenizer.from_dict(config["tokenizer"])
        vae = None if config.get("vae") is None else AutoencoderKL.from_config(config["vae"], rng=rng)
        return cls(unet, text_encoder, tokenizer, config["schedule"], vae)

    @classmethod
    def load(cls, directory, use_ema: bool = True) -> TextToImageModel:
        """Read :meth:`save`'s output, or a ``digits``/``shapes`` training checkpoint (its EMA
        weights by default). ``directory`` may also be a run directory holding ``checkpoint/``
        or the name of shipped weights: ``TextToImageModel.load("pretrained:shapes")``."""
        from diffusion_np.training.trainer import task_from_checkpoint

        checkpoint = load_checkpoint(directory)  # also a run directory or "pretrained:NAME"
        if checkpoint.config.get("kind") == BUNDLE_FORMAT:
            model = cls.from_config(checkpoint.config)
            checkpoint.load_weights(model.modules())
            return model
        if checkpoint.config.get("task") in ("digits", "shapes"):
            return task_from_checkpoint(checkpoint, use_ema=use_ema).model
        raise CheckpointError(f"{directory} holds neither a text-to-image model nor a digits/shapes training run")


# ============================================================================ shared pieces
def drop_captions(captions: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """Replace each caption by "" with probability ``p`` (classifier-free guidance training).

    One uniform draw per caption from ``rng``, whatever ``p`` is, so the random stream
    does not depend on ``p``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout must be in [0, 1], got {p}")
    keep = rng.random(len(captions)) >= p  # (B,) True: keep the caption
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def _schedule_fields() -> dict:
    return dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


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


class _TextToImageTask:
    """What ``digits`` and ``shapes`` share: the training step, sampling and pictures."""

    name = ""
    Config = None

    def __init__(self, config, rng: np.random.Generator) -> None:
        self.config = config
        self.model = TextToImageModel.from_config(
            {"unet": config.unet, "text_encoder": config.text_encoder, "tokenizer": config.tokenizer,
             "vae": None, "schedule": self._schedule()},
            rng=rng,
        )

    def _schedule(self) -> dict:
        c = self.config
        return dict(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
                    beta_schedule=c.beta_schedule, prediction_type=c.prediction_type)

    def modules(self) -> dict[str, Module]:
        return self.model.modules()

    def _batch(self, batch_size: int, rng: np.random.Generator):
        """(x_0 (B, h, w, C) float32 on the host, captions): what the U-Net learns to make."""
        raise NotImplementedError

    def loss_and_backward(self, batch_size: int, rng: np.random.Generator) -> float:
        """Steps 1-6 of the module docstring; gradients land in the U-Net and the text encoder."""
        model, schedule, c = self.model, self.model.noise_schedule, self.config
        device = model.device
        x0, captions = self._batch(batch_size, rng)  # 1. data (B, h, w, C), B captions
        captions = drop_captions(captions, c.caption_dropout, rng)  # 1. "" for 10%: the unconditional model
        ids = to_device(model.tokenizer.encode(captions).ids, device)  # 2. (B, L)
        t = rng.integers(0, schedule.num_train_timesteps, batch_size)  # 3. (B,)
        eps = rng.standard_normal(x0.shape).astype(np.float32)  # 3.
        x0, eps, t_dev = to_device(x0, device), to_device(eps, device), to_device(t, device)
        x_t = q_sample(x0, t_dev, eps, schedule.alpha_bar)  # 4.
        target = training_target(x0, eps, t_dev, schedule.alpha_bar, c.prediction_type)
        weights = None
        if c.min_snr_gamma is not None:
            weights = min_snr_weights(t_dev, schedule.snr, c.min_snr_gamma, c.prediction_type)
        pred = model(x_t, t_dev, ids)  # 2. + 5. text encoder, then U-Net
        loss, cache = mse_loss_forward(pred, target, weights)  # 5.
        model.backward(mse_loss_backward(cache))  # 6. through the U-Net into the text encoder
        return float(asnumpy(loss))  # the one deliberate device -> host copy of a step

    # ------------------------------------------------------------------ sampling and pictures
    def preview_prompts(self, n: int) -> list[str]:
        raise NotImplementedError

    def sample(self, sampler: str, steps: int, n: int, seed: int, progress: bool = False) -> np.ndarray:
        """``n`` images for :meth:`preview_prompts` ``(n)``, guided with ``config.guidance_scale``."""
        return self.model.generate(self.preview_prompts(n), sampler, steps, self.config.guidance_scale, seed,
                                   progress)

    def save_png(self, samples, path, title: str = "") -> None:
        samples = asnumpy(samples)
        save_image_grid(samples, path, self.preview_prompts(len(samples)), ncols=self._ncols(len(samples)),
                        title=title)

    def _ncols(self, n: int) -> int:
        return min(n, 8)

    def save_preview(self, path, seed: int, title: str) -> None:
        preview = get_preset(self.name, self.config.preset)["preview"]
        samples = self.sample("ddim", preview["steps"], preview["n"], seed)
        self.save_png(samples, path, f"{title}, ddim {preview['steps']} steps, guidance {self.config.guidance_scale}")

    @classmethod
    def train_defaults_for(cls, config) -> dict:
        """TrainConfig defaults of ``config.preset``."""
        return get_preset(cls.name, config.preset)["train"]


def _add_common_arguments(parser, defaults, task: str) -> None:
    s = argparse.SUPPRESS
    parser.add_argument("--preset", choices=tuple(PRESETS[task]), default=s,
                        help=f"model sizes and training schedule: tiny (seconds, tests), demo (~10 min on 2 cores), "
                             f"full (shipped weights); other options override it (default {defaults.preset})")
    if task == "shapes-vae":
        return
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=s,
                        help=f"what the U-Net predicts: the noise or v (default {defaults.prediction_type})")
    parser.add_argument("--min-snr-gamma", type=_positive_float, default=s, metavar="G",
                        help="weight each sample's loss by min-SNR-gamma (Hang et al. 2023; 5 is usual) "
                             "(default: no weighting)")
    parser.add_argument("--caption-dropout", type=_fraction, default=s, metavar="P",
                        help=f"share of captions replaced by \"\" for classifier-free guidance "
                             f"(default {defaults.caption_dropout})")
    parser.add_argument("--guidance-scale", type=_at_least_one, default=s, metavar="W",
                        help="classifier-free guidance weight of the preview samples "
                             f"(default {defaults.guidance_scale})")


# ============================================================================ digits
@dataclass
class DigitsConfig:
    """Everything that rebuilds a :class:`DigitsTask`; ``unet``, ``text_encoder`` and
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


class DigitsTask(_TextToImageTask):
    """Pixel-space diffusion on 8x8 digits, conditioned on "the digit seven"."""

    name = "digits"
    description = "a text-conditioned U-Net and text encoder on 8x8 digits (\"the digit seven\"), in pixel space"
    Config = DigitsConfig
    train_defaults = PRESETS["digits"]["demo"]["train"]

    def __init__(self, config: DigitsConfig, rng: np.random.Generator) -> None:
        super().__init__(config, rng)
        self._data = None

    @property
    def data(self):
        """(images (N, S, S, 1) in [-1, 1], captions) of the training split, loaded on first use."""
        if self._data is None:
            images, captions, _ = load_digits("train", image_size=self.config.image_size, seed=self.config.data_seed)
            self._data = (images, captions)
        return self._data

    def _batch(self, batch_size: int, rng: np.random.Generator):
        images, captions = self.data
        idx = rng.integers(0, len(images), batch_size)  # with replacement, as DigitsDataset.sample
        return images[idx], [captions[i] for i in idx.tolist()]

    def preview_prompts(self, n: int) -> list[str]:
        """Digits 0, 1, ..., 9, 0, 1, ...: a grid with 10 columns shows each digit in a column."""
        return digit_captions(np.arange(n) % 10)

    def _ncols(self, n: int) -> int:
        return min(n, 10)

    def save_png(self, samples, path, title: str = "") -> None:
        samples = asnumpy(samples)
        titles = [DIGIT_WORDS[i % 10] if i < 10 else "" for i in range(len(samples))]  # column heads only
        save_image_grid(samples, path, titles, ncols=self._ncols(len(samples)), title=title)

    @staticmethod
    def add_arguments(parser) -> None:
        d = _field_defaults(DigitsConfig)
        _add_common_arguments(parser, d, "digits")
        parser.add_argument("--image-size", type=int, choices=(8, 16, 32), default=argparse.SUPPRESS,
                            help=f"side of the images: 8 is the digits' own size (default {d.image_size})")


# ============================================================================ shapes VAE
@dataclass
class ShapesVAEConfig:
    """Everything that rebuilds a :class:`ShapesVAETask`; ``vae`` (diffusers' AutoencoderKL
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


class ShapesVAETask:
    """:class:`~diffusion_np.models.AutoencoderKL` on 32x32 shapes: 4 x 8 x 8 latents."""

    name = "shapes-vae"
    description = "the VAE (AutoencoderKL) on 32x32 RGB shapes, 4-channel latents at 8x8"
    Config = ShapesVAEConfig
    train_defaults = PRESETS["shapes-vae"]["demo"]["train"]

    def __init__(self, config: ShapesVAEConfig, rng: np.random.Generator) -> None:
        self.config = config
        self.model = AutoencoderKL.from_config(config.vae, rng=rng)
        self._dataset = ShapesDataset("train", seed=config.data_seed)

    def modules(self) -> dict[str, Module]:
        return {"vae": self.model}

    def loss_and_backward(self, batch_size: int, rng: np.random.Generator) -> float:
        """Reconstruction (summed per image) + kl_weight * KL on fresh shapes; see ``AutoencoderKL.loss``."""
        images, _, _ = self._dataset.sample(batch_size, rng)  # (B, 32, 32, 3), drawn from the trainer's rng
        images = to_device(images, device_of(self.model.quant_conv.weight))
        loss, _ = self.model.loss(images, beta=self.config.kl_weight, recon=self.config.recon, rng=rng)
        self.model.loss_backward()
        return float(asnumpy(loss))  # the one deliberate device -> host copy of a step

    def sample(self, sampler: str, steps: int, n: int, seed: int, progress: bool = False) -> np.ndarray:
        """For a VAE, "samples" are reconstructions: ``n`` held-out shapes beside their
        reconstructions, (n, 32, 64, 3) (``sampler`` and ``steps`` are unused)."""
        images, _, _ = ShapesDataset("heldout", seed=seed).sample(n)
        recon = reconstruct(self.model, images)
        return np.concatenate([images, recon], axis=2)  # (n, 32, 64, 3): original | reconstruction

    def save_png(self, samples, path, title: str = "") -> None:
        save_image_grid(asnumpy(samples), path, ["original | reconstruction"] * len(samples),
                        ncols=min(4, len(samples)), title=title)

    def save_preview(self, path, seed: int, title: str) -> None:
        n = get_preset(self.name, self.config.preset)["preview"]["n"]
        mse = vae_reconstruction_mse(self.model, n=64, split="heldout", seed=seed)
        self.save_png(self.sample("ddim", 0, n, seed), path, f"{title}, held-out recon MSE {mse:.4f}")

    @classmethod
    def train_defaults_for(cls, config) -> dict:
        return get_preset(cls.name, config.preset)["train"]

    @staticmethod
    def add_arguments(parser) -> None:
        d = _field_defaults(ShapesVAEConfig)
        _add_common_arguments(parser, d, "shapes-vae")
        parser.add_argument("--kl-weight", type=_nonnegative_float, default=argparse.SUPPRESS, metavar="BETA",
                            help=f"weight of the KL term (default {d.kl_weight})")
        parser.add_argument("--recon", choices=("l1", "mse"), default=argparse.SUPPRESS,
                            help=f"reconstruction loss (default {d.recon})")


def reconstruct(vae: AutoencoderKL, images, batch: int = 64) -> np.ndarray:
    """``decode(mode of q(z | x))`` of host images (N, H, W, 3), in chunks; host float32 out."""
    device = device_of(vae.quant_conv.weight)
    out = []
    for i in range(0, len(images), batch):
        x = to_device(np.ascontiguousarray(images[i:i + batch]), device)
        out.append(asnumpy(vae.decode(vae.encode(x).mode())))
    return np.concatenate(out).astype(np.float32)


def vae_reconstruction_mse(vae: AutoencoderKL, n: int = 256, split: str = "heldout", seed: int = 12345) -> float:
    """Mean squared error (per value, images in [-1, 1]) between ``n`` shapes of ``split`` and
    their reconstructions through the posterior mode.

    ``split="heldout"`` draws the 18 combinations the training split never shows; any
    split with a ``seed`` other than the training one gives images never seen in training.
    """
    images, _, _ = ShapesDataset(split, seed=seed).sample(n)
    return float(np.mean((reconstruct(vae, images) - images) ** 2))


def latent_scaling_factor(vae: AutoencoderKL, n: int = 256, seed: int = 0) -> tuple[float, float]:
    """(1 / std, std) of sampled latents z ~ q(z | x) of ``n`` training shapes.

    As Rombach et al. (Sec. 4.3.2, Appendix D.1) set SD's 0.18215: the standard
    deviation over every entry of a batch of unscaled latents, inverted, so the diffusion
    model sees latents of about unit variance. ``seed`` fixes the images and the posterior noise.
    """
    rng = np.random.default_rng(seed)
    images, _, _ = ShapesDataset("train", seed=seed).sample(n)
    device = device_of(vae.quant_conv.weight)
    latents = []
    for i in range(0, n, 64):
        posterior = vae.encode(to_device(images[i:i + 64], device))
        latents.append(asnumpy(posterior.sample(rng)))
    std = float(np.concatenate(latents).astype(np.float64).std())
    return 1.0 / std, std


def load_vae(path) -> AutoencoderKL:
    """The VAE of a ``shapes-vae`` run (its EMA weights), or the frozen VAE inside a ``shapes``
    checkpoint such as ``"pretrained:shapes"``; ``path`` may be a run directory or its ``checkpoint/``."""
    from diffusion_np.training.trainer import task_from_checkpoint

    checkpoint = load_checkpoint(path)
    task = checkpoint.config.get("task")
    if task not in ("shapes-vae", "shapes"):
        raise CheckpointError(f"{path} holds no shapes VAE (its task is {task!r}, not shapes-vae or shapes)")
    model = task_from_checkpoint(checkpoint).model
    return model if task == "shapes-vae" else model.vae


# ============================================================================ shapes (latent diffusion)
@dataclass
class ShapesConfig:
    """Everything that rebuilds a :class:`ShapesTask`.

    ``vae`` is the path of a ``shapes-vae`` run. ``vae_config`` and ``scaling_factor``
    are read and computed from it when None (:func:`latent_scaling_factor`) and then
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


class ShapesTask(_TextToImageTask):
    """Latent text-to-image on shapes: U-Net + text encoder trained jointly, the VAE frozen."""

    name = "shapes"
    description = "latent text-to-image on 32x32 shapes (frozen VAE from --vae, U-Net + text encoder trained jointly)"
    Config = ShapesConfig
    train_defaults = PRESETS["shapes"]["demo"]["train"]

    def __init__(self, config: ShapesConfig, rng: np.random.Generator) -> None:
        super().__init__(config, rng)
        vae = AutoencoderKL.from_config(config.vae_config, rng=np.random.default_rng(0))
        if config.vae is not None:
            try:
                vae.load_state_dict(load_vae(config.vae).state_dict())
            except CheckpointError as err:
                warnings.warn(f"the VAE of {config.vae} cannot be read ({err}): the VAE keeps a random "
                              "initialisation until a checkpoint's weights are loaded", stacklevel=2)
        object.__setattr__(self.model, "vae", vae)
        self._dataset = ShapesDataset("train", seed=config.data_seed)
        self._pool = None

    def _latent_pool(self):
        """(mean, std, captions) of the posteriors of ``latent_pool`` training images, encoded once."""
        if self._pool is None:
            images, captions, _ = ShapesDataset("train", seed=self.config.data_seed + 1).sample(self.config.latent_pool)
            means, stds = [], []
            for i in range(0, len(images), 64):
                posterior = self.model.vae.encode(to_device(images[i:i + 64], self.model.device))
                means.append(asnumpy(posterior.mean))
                stds.append(np.exp(0.5 * asnumpy(posterior.logvar)))  # std = exp(logvar / 2)
            self._pool = (np.concatenate(means), np.concatenate(stds).astype(np.float32), captions)
        return self._pool

    def _batch(self, batch_size: int, rng: np.random.Generator):
        """Latents ``scaling_factor * z``, z ~ q(z | image), and the images' captions."""
        vae = self.model.vae
        if self.config.latent_pool == 0:  # encode fresh images
            images, captions, _ = self._dataset.sample(batch_size, rng)
            posterior = vae.encode(to_device(images, self.model.device))
            mean, std = asnumpy(posterior.mean), np.exp(0.5 * asnumpy(posterior.logvar))
        else:
            pool_mean, pool_std, pool_captions = self._latent_pool()
            idx = rng.integers(0, len(pool_mean), batch_size)
            mean, std, captions = pool_mean[idx], pool_std[idx], [pool_captions[i] for i in idx.tolist()]
        z = mean + std * rng.standard_normal(mean.shape).astype(np.float32)  # reparameterised posterior sample
        return ((z - vae.shift_factor) * vae.scaling_factor).astype(np.float32), captions

    def preview_prompts(self, n: int) -> list[str]:
        """A fixed spread of training prompts (seeded), each repeated twice."""
        prompts = all_prompts("train")
        order = np.random.default_rng(0).permutation(len(prompts))
        return [prompts[order[(i // 2) % len(prompts)]] for i in range(n)]

    def save_preview(self, path, seed: int, title: str) -> None:
        from diffusion_np.metrics.shapes import prompt_accuracy

        preview = get_preset(self.name, self.config.preset)["preview"]
        samples = self.sample("ddim", preview["steps"], preview["n"], seed)
        accuracy = prompt_accuracy(samples, parse_caption(self.preview_prompts(len(samples))))["all"]
        self.save_png(samples, path, f"{title}, ddim {preview['steps']} steps, guidance "
                                     f"{self.config.guidance_scale}, prompt accuracy {accuracy:.2f}")

    @staticmethod
    def add_arguments(parser) -> None:
        s = argparse.SUPPRESS
        d = _field_defaults(ShapesConfig)
        parser.add_argument("--vae", metavar="DIR", default=s,
                            help="run directory (or checkpoint/) of a trained shapes-vae: the frozen autoencoder "
                                 "(required for a new run)")
        _add_common_arguments(parser, d, "shapes")
        parser.add_argument("--latent-pool", type=_nonnegative_int, default=s, metavar="N",
                            help="encode N training images once and sample their posteriors for every batch; "
                                 "0: encode fresh images every step (default: the preset's, demo 4096)")


# ============================================================================ pictures
def save_image_grid(images, path, titles=None, ncols: int = 8, title: str = "") -> Path:
    """A PNG grid of images (B, H, W, 1 or 3) in [-1, 1], each with an optional small title.

    A bare Figure with the Agg canvas: pyplot's global state is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    B, H, W, _ = images.shape
    ncols = max(1, min(ncols, B))
    nrows = -(-B // ncols)
    cell = 1.3 * max(1.0, W / H)
    fig = Figure(figsize=(cell * ncols, 1.5 * nrows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    draw_image_grid(fig, images, titles, ncols)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)


def draw_image_grid(container, images, titles=None, ncols: int = 8) -> None:
    """Draw images (B, H, W, 1 or 3) in [-1, 1] as a grid of axes on a matplotlib Figure or
    SubFigure, each with an optional small title (long ones wrap onto two lines)."""
    images = np.clip((asnumpy(images) + 1.0) / 2.0, 0.0, 1.0)  # [-1, 1] -> [0, 1]
    B, C = images.shape[0], images.shape[-1]
    ncols = max(1, min(ncols, B))
    nrows = -(-B // ncols)
    for i in range(B):
        ax = container.add_subplot(nrows, ncols, i + 1)
        ax.axis("off")
        if C == 1:
            ax.imshow(images[i, :, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(images[i], interpolation="nearest")
        if titles is not None and titles[i]:
            words = titles[i].split()
            half = (len(words) + 1) // 2 if len(words) > 4 else len(words)
            ax.set_title(" ".join(words[:half]) + ("\n" + " ".join(words[half:]) if half < len(words) else ""),
                         fontsize=6)


# ============================================================================ argument types
def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _at_least_one(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number >= 1, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _field_defaults(config_class) -> argparse.Namespace:
    """The dataclass's field defaults (for --help texts) without running its __post_init__."""
    return argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(config_class)})
