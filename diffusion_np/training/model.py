"""The text-to-image model bundle: U-Net + text encoder (trained together), tokenizer, frozen VAE.

:class:`TextToImageModel` is what the ``digits`` and ``shapes`` tasks
(:mod:`~diffusion_np.training.tasks`) train and what ``pretrained:digits`` and
``pretrained:shapes`` load. The U-Net and the text encoder are one
:class:`~diffusion_np.nn.module.Module`, so the trainer's AdamW, gradient clipping and
EMA treat them as one set of weights; the VAE sits beside them, frozen.

The backward is what "trained jointly" means: the gradient of the diffusion loss with
respect to the text embeddings ``c`` is the sum of what every cross-attention layer
sends back through its keys and values, and the text encoder turns it into its own
parameter gradients. (Stable Diffusion froze a pre-trained CLIP instead; we have no
pre-trained one, and the captions' vocabulary is tiny.)

Checkpoints: the trainer writes ``unet.safetensors``, ``text_encoder.safetensors``
(and ``vae.safetensors``) and the task config, which holds every model config and the
tokenizer's vocabulary. :meth:`TextToImageModel.save` writes the same weights without
a training state (config ``"kind": BUNDLE_FORMAT``), and :meth:`TextToImageModel.load`
reads either.

Left out: a pre-trained or frozen text encoder; sampling itself lives in
:class:`~diffusion_np.pipelines.TextToImagePipeline`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffusion_np.backend import device_of, to_device
from diffusion_np.diffusion import check_prediction_type
from diffusion_np.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from diffusion_np.models.text_encoder import TextEncoder, TextEncoderConfig
from diffusion_np.models.tokenizer import WordTokenizer
from diffusion_np.models.unet import UNet2DConditionModel
from diffusion_np.models.vae import AutoencoderKL
from diffusion_np.nn.module import Module
from diffusion_np.pipelines.text_to_image import TextToImagePipeline
from diffusion_np.samplers import SAMPLERS
from diffusion_np.schedules import NoiseSchedule
from diffusion_np.training.trainer import task_from_checkpoint

__all__ = ["BUNDLE_FORMAT", "TextToImageModel"]

#: the bundle's own checkpoint kind (a weights-only export, no training state)
BUNDLE_FORMAT = "text_to_image"


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
        #: sampler name -> extra keywords of that sampler (a consistency-distilled model's LCM grid)
        self.sampler_options: dict[str, dict] = {}

    # ------------------------------------------------------------------ forward / backward
    def encode_text(self, captions: list[str]):
        """Captions -> (B, L, hidden_size) embeddings (keeps the text encoder's cache for a backward)."""
        ids = self.tokenizer.encode(captions).ids  # (B, L) int64 on the host
        return self.text_encoder(to_device(ids, self.device))

    def forward(self, x_t, t, input_ids):
        context = self.text_encoder(input_ids)  # (B, L) -> (B, L, D)
        return self.unet(x_t, t, context)  # (B, h, w, C)

    def backward(self, dout):
        g = self.unet.backward(dout)  # g.dcontext: the sum over every cross-attention layer
        self.text_encoder.backward(g.dcontext)  # ... becomes the text encoder's parameter gradients
        return g.dx

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
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
        kwargs = dict(self.schedule_config, prediction_type=self.prediction_type)
        if name in ("ddpm", "ddim"):
            kwargs["clip_sample"] = bool(clip_sample) and self.vae is None
        kwargs.update(self.sampler_options.get(name, {}))
        return SAMPLERS[name](**kwargs)

    def pipeline(self, sampler: str = "ddim"):
        """A :class:`~diffusion_np.pipelines.TextToImagePipeline` over these networks."""
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
        """Everything that rebuilds the networks: model configs, vocabulary, schedule (JSON values:
        tuples become lists, so the config compares equal to its saved copy)."""
        return json.loads(json.dumps({
            "unet": self.unet.config,
            "text_encoder": self.text_encoder.config.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "vae": None if self.vae is None else self.vae.config,
            "schedule": dict(self.schedule_config, prediction_type=self.prediction_type),
        }))

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
        """Read :meth:`save`'s output, or a ``digits``/``shapes`` training checkpoint or a distilled student
        (``lcm``, ``progressive``; its EMA weights by default, with the sampler options it was distilled for).
        ``directory`` may also be a run directory holding ``checkpoint/`` or the name of shipped weights:
        ``TextToImageModel.load("pretrained:shapes")``."""
        checkpoint = load_checkpoint(directory)  # also a run directory or "pretrained:NAME"
        if checkpoint.config.get("kind") == BUNDLE_FORMAT:
            model = cls.from_config(checkpoint.config)
            checkpoint.load_weights(model.modules())
            return model
        if checkpoint.config.get("task") in ("digits", "shapes", "lcm", "progressive"):  # or a distilled student
            return task_from_checkpoint(checkpoint, use_ema=use_ema).model
        raise CheckpointError(f"{directory} holds neither a text-to-image model nor a digits/shapes (or distilled) "
                              "training run")
