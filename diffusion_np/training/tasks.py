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
    6. backward: unet.backward -> BlockGrads(dx_t, dcontext);  text_encoder.backward(dcontext)

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

The scaling factor of the latents is :func:`~diffusion_np.training.vae_helpers.latent_scaling_factor`.
The model bundle, its checkpoints and its backward through the text encoder are
:mod:`~diffusion_np.training.model`; the configs are :mod:`~diffusion_np.training.configs`.

Left out: a pre-trained or frozen text encoder, offset noise, input perturbation,
SNR-dependent timestep sampling, fine-tuning the VAE decoder, gradient accumulation.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

from diffusion_np.backend import asnumpy, device_of, to_device
from diffusion_np.data.digits import DIGIT_WORDS, digit_captions, load_digits
from diffusion_np.data.shapes import ShapesDataset, all_prompts, parse_caption
from diffusion_np.diffusion import min_snr_weights, q_sample, training_target
from diffusion_np.io.checkpoint import CheckpointError
from diffusion_np.metrics.shapes import prompt_accuracy
from diffusion_np.models.vae import AutoencoderKL
from diffusion_np.nn.losses import mse_loss_backward, mse_loss_forward
from diffusion_np.nn.module import Module
from diffusion_np.training.argtypes import (
    at_least_one,
    field_defaults,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
)
from diffusion_np.training.configs import PREDICTION_TYPES, DigitsConfig, ShapesConfig, ShapesVAEConfig
from diffusion_np.training.model import TextToImageModel
from diffusion_np.training.plots import save_image_grid
from diffusion_np.training.presets import PRESETS, get_preset
from diffusion_np.training.vae_helpers import load_vae, reconstruct, vae_reconstruction_mse

__all__ = ["DigitsTask", "ShapesTask", "ShapesVAETask", "drop_captions"]


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
    parser.add_argument("--min-snr-gamma", type=positive_float, default=s, metavar="G",
                        help="weight each sample's loss by min-SNR-gamma (Hang et al. 2023; 5 is usual) "
                             "(default: no weighting)")
    parser.add_argument("--caption-dropout", type=fraction, default=s, metavar="P",
                        help=f"share of captions replaced by \"\" for classifier-free guidance "
                             f"(default {defaults.caption_dropout})")
    parser.add_argument("--guidance-scale", type=at_least_one, default=s, metavar="W",
                        help="classifier-free guidance weight of the preview samples "
                             f"(default {defaults.guidance_scale})")


# ============================================================================ digits
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
        d = field_defaults(DigitsConfig)
        _add_common_arguments(parser, d, "digits")
        parser.add_argument("--image-size", type=int, choices=(8, 16, 32), default=argparse.SUPPRESS,
                            help=f"side of the images: 8 is the digits' own size (default {d.image_size})")


# ============================================================================ shapes VAE
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
        self.model.loss_backward(input_grad=False)  # the images are data: no gradient for them
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
        d = field_defaults(ShapesVAEConfig)
        _add_common_arguments(parser, d, "shapes-vae")
        parser.add_argument("--kl-weight", type=nonnegative_float, default=argparse.SUPPRESS, metavar="BETA",
                            help=f"weight of the KL term (default {d.kl_weight})")
        parser.add_argument("--recon", choices=("l1", "mse"), default=argparse.SUPPRESS,
                            help=f"reconstruction loss (default {d.recon})")


# ============================================================================ shapes (latent diffusion)
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
        preview = get_preset(self.name, self.config.preset)["preview"]
        samples = self.sample("ddim", preview["steps"], preview["n"], seed)
        accuracy = prompt_accuracy(samples, parse_caption(self.preview_prompts(len(samples))))["all"]
        self.save_png(samples, path, f"{title}, ddim {preview['steps']} steps, guidance "
                                     f"{self.config.guidance_scale}, prompt accuracy {accuracy:.2f}")

    @staticmethod
    def add_arguments(parser) -> None:
        s = argparse.SUPPRESS
        d = field_defaults(ShapesConfig)
        parser.add_argument("--vae", metavar="DIR", default=s,
                            help="run directory (or checkpoint/) of a trained shapes-vae: the frozen autoencoder "
                                 "(required for a new run)")
        _add_common_arguments(parser, d, "shapes")
        parser.add_argument("--latent-pool", type=nonnegative_int, default=s, metavar="N",
                            help="encode N training images once and sample their posteriors for every batch; "
                                 "0: encode fresh images every step (default: the preset's, demo 4096)")
