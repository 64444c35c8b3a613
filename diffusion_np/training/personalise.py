"""Personalisation: teach ``pretrained:shapes`` a new concept from 8 images (LoRA, textual inversion, DreamBooth).

The concepts are those of :mod:`diffusion_np.data.shapes` the shipped model never saw: a new
shape (``star``) and a new colour (``orange``). Each method learns from the images of
:func:`~diffusion_np.data.shapes.concept_images` (8 by default) and is asked afterwards for the
concept in combinations it never saw with it (:func:`~diffusion_np.data.shapes.concept_split`).

The new word. The base tokenizer has one id per word; an unknown word is ``<unk>``. So the
concept's word is appended to the vocabulary (:func:`add_concept_token`): a new id and a new row
of the text encoder's token table (the reasoning is in :mod:`diffusion_np.data.shapes`). What the
three methods do with that row and with the rest:

=====================  ================================  =================================  ==============
method                 the new token's row               trained                            frozen
=====================  ================================  =================================  ==============
LoRA (Hu et al. 2021)  starts as ``init_word``'s row,    rank-r adapters ``B A`` on the     everything else
                       trained beside the adapters       U-Net's attention projections and
                       (``train_token``; off: a fixed    its ResNet blocks' 3x3 convolutions
                       random identifier)
textual inversion      starts as ``init_word``'s row     that row only (Gal et al. 2022,    everything else
(Gal et al. 2022)                                        Eq. 2)
DreamBooth             random, fixed (an identifier)     the whole U-Net                    text encoder, VAE
(Ruiz et al. 2023)
=====================  ================================  =================================  ==============

One training step, for all three (the ``shapes`` task's step with a frozen base)::

    1. B_c images of the concept, B_p class images (B_c + B_p = B, B_p = round(prior_share B));
       x_0 = scaling_factor * z: class images z ~ q(z | image) (the frozen VAE), concept images
       z = their inverted latent + the encoder's std * noise (:func:`invert_decoder`), found once
       captions: the concept's own; "" with probability p (classifier-free guidance)
    2. c = text_encoder(tokenizer(captions))              (TI: with the trainable row in the table)
    3. t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps
    4. loss = mean_c ||eps - eps_th(x_t, t, c)||^2 + lambda mean_p ||eps' - eps_th(x'_t, t', c')||^2
                                                                      (DreamBooth Eq. 2)
    5. backward: U-Net -> (LoRA: the adapters' dA, dB | DreamBooth: every U-Net weight)
                 -> (TI, LoRA's trained row: d context -> the text encoder's hand-written backward -> the row)

The second term of step 4 is DreamBooth's prior preservation: the class images were generated
by the frozen base model *before* training (128 images of the base prompts, DPM-Solver++ 20
steps, guidance 4), and keep the fine-tuned model drawing them as it did. It serves LoRA the
same way (its adapters change every prompt's images, not only the concept's); textual
inversion needs none (no base prompt reaches its row), so its ``prior_weight`` is 0.

Checkpoints (the :class:`~diffusion_np.training.trainer.Trainer`'s, with resume and Ctrl-C):
the config names the base (``pretrained:shapes`` or a ``shapes`` run) and one safetensors file,
``personal.safetensors``, holds what was learned: ``token_embedding.<word>`` (1, D) and, for
LoRA, ``unet.<layer path>.lora_A.weight`` / ``lora_B.weight`` (diffusers' key names, our
layout); for DreamBooth ``unet.<every U-Net parameter>``. :func:`apply_personalisation` puts a
LoRA or an embedding checkpoint onto any loaded model (``sample``/``evaluate`` ``--lora``,
``--embedding``).

Left out: training the text encoder with LoRA or DreamBooth, several tokens per concept,
pivotal tuning (token and LoRA together), and LoRA on the VAE.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from diffusion_np.backend import asnumpy, get_xp, to_device
from diffusion_np.data.shapes import CONCEPTS, all_prompts, caption, concept_images, concept_split, parse_caption
from diffusion_np.diffusion import min_snr_weights, q_sample, training_target
from diffusion_np.io.checkpoint import CheckpointError, load_checkpoint
from diffusion_np.io.diffusers import read_safetensors
from diffusion_np.io.lora import load_lora, parse_lora_spec
from diffusion_np.metrics.evaluate import generate_images
from diffusion_np.metrics.shapes import prompt_accuracy
from diffusion_np.models.tokenizer import SPECIAL_TOKENS, WordTokenizer
from diffusion_np.nn.lora import ATTENTION_TARGETS, add_lora, lora_layers, set_lora_scale
from diffusion_np.nn.losses import mse_loss_backward, mse_loss_forward
from diffusion_np.nn.module import Module, inference_mode
from diffusion_np.pretrained import PREFIX as PRETRAINED_PREFIX
from diffusion_np.training.argtypes import (
    at_least_one,
    field_defaults,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_int,
)
from diffusion_np.training.model import TextToImageModel
from diffusion_np.training.plots import save_image_grid
from diffusion_np.training.tasks import drop_captions
from diffusion_np.training.trainer import task_from_checkpoint

__all__ = [
    "FINETUNE_PREFIX",
    "METHODS",
    "FinetuneConfig",
    "PersonalWeights",
    "add_concept_token",
    "apply_personalisation",
    "class_prompts",
    "evaluate_personalised",
    "evaluate_personalised_checkpoint",
    "format_personalised_report",
    "is_finetune_checkpoint",
    "load_personalised",
    "parse_lora_spec",
    "save_embedding",
]

#: the fine-tuning methods; the task names are ``FINETUNE_PREFIX + method``
METHODS = ("lora", "textual-inversion", "dreambooth")
FINETUNE_PREFIX = "finetune-"
#: the weights file of a fine-tuning checkpoint
WEIGHTS = "personal"
#: LoRA's default targets: the attention projections and the ResNet blocks' two 3x3 convolutions. On the
#: attention alone (rank 4, 43k numbers) the star was not learned: the U-Net must draw a new *shape*,
#: which its convolutions do, not only read a new word
LORA_TARGETS = (*ATTENTION_TARGETS, "conv1", "conv2")
#: the word a textual inversion's row starts from, per concept (diffusers' ``--initializer_token``)
INIT_WORDS = {"star": "triangle", "orange": "red"}


# ============================================================================ the new token
def _token_table(model: TextToImageModel):
    return model.text_encoder.text_model.embeddings.token_embedding


def add_concept_token(model: TextToImageModel, word: str, row=None) -> int:
    """Append ``word`` to ``model``'s tokenizer and a row to its text encoder's token table; return its id.

    ``row`` (D,) is the new row's value (default: zeros; the callers set it). Every other id
    and row stays as it was, so every prompt without ``word`` encodes exactly as before.
    The text encoder's config gets ``vocab_size + 1`` (so :meth:`TextToImageModel.save` rebuilds it).
    """
    if not isinstance(word, str) or re.fullmatch(r"[a-z0-9]+", word) is None:
        raise ValueError(f"add_concept_token: word must be one lower-case word of letters and digits, got {word!r}")
    tok = model.tokenizer
    if word in tok.token_to_id:
        raise ValueError(f"add_concept_token: {word!r} is already in the vocabulary (id {tok.token_to_id[word]})")
    table = _token_table(model)
    weight = table.weight  # (V, D)
    xp = get_xp(weight)
    new_row = xp.zeros((1, weight.shape[1]), dtype=weight.dtype) if row is None else \
        xp.asarray(to_device(asnumpy(row), "numpy")).reshape(1, -1).astype(weight.dtype)
    if new_row.shape[1] != weight.shape[1]:
        raise ValueError(f"add_concept_token: row must have {weight.shape[1]} values, got {new_row.shape[1]}")
    table.params["weight"] = xp.concatenate([weight, new_row], axis=0)  # (V + 1, D)
    if "weight" in table.grads:
        table.grads["weight"] = table.params["weight"] * 0
    table.num_embeddings += 1
    old = model.text_encoder.config
    new = dataclasses.replace(old, vocab_size=old.vocab_size + 1)
    for _, module in model.text_encoder.named_modules():  # every module holding the shared config
        if getattr(module, "config", None) is old:
            object.__setattr__(module, "config", new)
    model.tokenizer = WordTokenizer(tok.id_to_token[len(SPECIAL_TOKENS):] + [word], max_length=tok.max_length,
                                    lowercase=tok.lowercase)
    return model.tokenizer.token_to_id[word]


def _identifier_row(model: TextToImageModel, rng: np.random.Generator) -> np.ndarray:
    """A random row (D,) at the scale of the trained word rows: N(mean, std^2) per dimension of the
    word rows (ids 4..): unlike every word, yet no larger than one (LoRA and DreamBooth's identifier)."""
    words = asnumpy(_token_table(model).weight)[len(SPECIAL_TOKENS):]  # (n_words, D)
    return (words.mean(axis=0) + words.std(axis=0) * rng.standard_normal(words.shape[1])).astype(np.float32)


# ============================================================================ what is trained
class PersonalWeights(Module):
    """What a fine-tuning run learns and saves: the concept token's row and the trained U-Net part.

    Parameters: ``token_embedding.<word>`` -> here ``token_row`` (1, D) (trainable for textual
    inversion only), and children named by their place in the U-Net (``unet.<path>.lora_A`` for
    LoRA, ``unet`` for DreamBooth): the very modules of the model, not copies, so an optimizer
    step on them is a step on the model. :meth:`sync` writes the row into the text encoder's table.
    """

    def __init__(self, model: TextToImageModel, word: str, row, method: str, train_token: bool = False) -> None:
        super().__init__()
        self.word, self.method = word, method
        self.token_id = add_concept_token(model, word, row)
        object.__setattr__(self, "_model", model)  # not a child: its weights are not ours to save
        table = _token_table(model)
        self.add_param("token_row", table.weight[self.token_id:self.token_id + 1].copy(),
                       trainable=method == "textual-inversion" or train_token)
        if method == "dreambooth":
            self._modules["unet"] = model.unet

    def add_lora_children(self, adapter_name: str = "default") -> None:
        """Hold the A and B of every adapted U-Net layer as ``unet.<path>.lora_A`` / ``lora_B``."""
        for path, layer in lora_layers(self._model.unet).items():
            self._modules[f"unet.{path}.lora_A"] = layer.lora_A[adapter_name]
            self._modules[f"unet.{path}.lora_B"] = layer.lora_B[adapter_name]

    def sync(self) -> None:
        """Copy ``token_row`` into the text encoder's table (after an optimizer step, a load, an EMA swap)."""
        _token_table(self._model).weight[self.token_id] = self.token_row[0]

    def pull_grad(self) -> None:
        """Textual inversion: add the table's gradient at the token's row into ``token_row``'s, and clear the
        table's (Gal et al. Eq. 2: only v* is optimised)."""
        table = _token_table(self._model)
        self.add_grad("token_row", table.grads["weight"][self.token_id:self.token_id + 1])
        table.grads["weight"][...] = 0


# ============================================================================ the task
@dataclass
class FinetuneConfig:
    """Everything that rebuilds a fine-tuning run.

    ``concept``: ``star`` or ``orange``; ``base``: ``pretrained:shapes`` or a ``shapes`` run.
    ``num_images``: concept images (4..16). ``rank``, ``alpha`` (None: = rank), ``targets``: the
    LoRA adapters. ``init_word``: textual inversion's starting row (None: :data:`INIT_WORDS`).
    ``invert_steps``: :func:`invert_decoder`'s steps for the concept latents.
    ``prior_weight`` (lambda of DreamBooth Eq. 2; 0: no class images; None: 0 for textual
    inversion, 1 otherwise), ``prior_share`` (share of
    each batch from the class images), ``class_images`` (how many the frozen base generates).
    """

    concept: str = "star"
    base: str = PRETRAINED_PREFIX + "shapes"
    num_images: int = 8
    rank: int = 8
    alpha: float | None = None
    targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    init_word: str | None = None
    train_token: bool = True
    prior_weight: float | None = None
    prior_share: float = 0.5
    class_images: int = 128
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0
    guidance_scale: float = 4.0
    invert_steps: int = 500
    data_seed: int = 0

    def __post_init__(self) -> None:
        if self.concept not in CONCEPTS:
            raise ValueError(f"concept must be one of {tuple(CONCEPTS)}, got {self.concept!r}")
        if not (isinstance(self.num_images, int) and 4 <= self.num_images <= 16):
            raise ValueError(f"num_images must be an integer from 4 to 16, got {self.num_images!r}")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.prior_weight is not None and not self.prior_weight >= 0:
            raise ValueError(f"prior_weight must be >= 0, got {self.prior_weight}")
        if not 0.0 <= self.prior_share < 1.0:
            raise ValueError(f"prior_share must be in [0, 1), got {self.prior_share}")
        if not (isinstance(self.invert_steps, int) and self.invert_steps >= 0):
            raise ValueError(f"invert_steps must be an integer >= 0, got {self.invert_steps!r}")
        if not (isinstance(self.class_images, int) and self.class_images >= 1):
            raise ValueError(f"class_images must be a positive integer, got {self.class_images!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not self.guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")
        if not str(self.base).startswith(PRETRAINED_PREFIX):
            self.base = str(Path(self.base).resolve())
        self.targets = list(self.targets)


def invert_decoder(vae, images, latent, steps: int = 300, lr: float = 0.05):
    """Latents (B, h, w, 4) whose decoding is ``images`` (B, H, W, 3): Adam on ``||decode(z) - x||^2``
    from ``latent`` (the encoder's mean), through the frozen decoder's hand-written backward.

    Why: the shipped VAE was trained on circles, squares and triangles in six colours, and its
    encoder maps a star to the latent of a circle, orange to yellow (with the encoder's means,
    the analyser reads 2% of star reconstructions as stars and 43% of orange ones as orange).
    Its decoder can still draw them: 300 steps of this find latents whose decodings it reads
    as stars 92% of the time and as orange 100% (24 images each). A diffusion model can only
    learn to make latents the decoder turns into the concept, so these are its training data.
    (Stable Diffusion's VAE, trained on billions of images, encodes new concepts well enough;
    a VAE trained on a toy world does not.)
    """
    z = latent.copy()
    xp = get_xp(z)
    m, v = xp.zeros_like(z), xp.zeros_like(z)
    b1, b2 = 0.9, 0.999  # Adam (Kingma & Ba 2015, Algorithm 1), on the latents alone
    for k in range(1, steps + 1):
        recon = vae.decode(z)
        dz = vae.decode_backward(2.0 * (recon - images) / float(np.prod(images.shape[1:])))  # d mean_pixels / dz
        m = b1 * m + (1 - b1) * dz
        v = b2 * v + (1 - b2) * dz * dz
        z -= lr * (m / (1 - b1**k)) / (xp.sqrt(v / (1 - b2**k)) + 1e-8)
    return z


class _FinetuneTask:
    """What the three methods share (module docstring); subclasses set ``method`` and the defaults."""

    method = ""
    Config = FinetuneConfig

    def __init__(self, config: FinetuneConfig, rng: np.random.Generator) -> None:
        self.config = config
        try:
            base = TextToImageModel.load(config.base)
        except CheckpointError as err:
            raise CheckpointError(f"the base model of finetune {self.method}: {err}") from None
        if base.vae is None:
            raise ValueError(f"{config.base} is a pixel-space model; personalisation needs the latent shapes model")
        if config.concept in base.tokenizer.token_to_id:
            raise ValueError(f"the base model already knows the word {config.concept!r}")
        base.freeze()
        base.vae.freeze()  # not a child of the bundle; invert_decoder runs its backward
        self.train_token = self.method == "textual-inversion" or (self.method == "lora" and config.train_token)
        # lambda of Eq. 2: none for textual inversion (no base prompt reaches its row), 1 otherwise
        self.prior_weight = config.prior_weight if config.prior_weight is not None else \
            (0.0 if self.method == "textual-inversion" else 1.0)
        if self.train_token:
            init = config.init_word or INIT_WORDS[config.concept]
            if init not in base.tokenizer.token_to_id:
                raise ValueError(f"init_word {init!r} is not in the base model's vocabulary")
            row = asnumpy(_token_table(base).weight[base.tokenizer.token_to_id[init]])
        else:
            row = _identifier_row(base, rng)
        self.base = base
        self.model = PersonalWeights(base, config.concept, row, self.method, self.train_token)
        if self.method == "lora":
            add_lora(base.unet, target=config.targets, rank=config.rank, alpha=config.alpha, rng=rng)
            self.model.add_lora_children()
        elif self.method == "dreambooth":
            for _, module in base.unet.named_modules():  # unfreeze the U-Net: every weight trains
                for name, value in module.params.items():
                    module.grads[name] = value * 0
        if self.train_token:
            table = _token_table(base)
            table.grads["weight"] = table.weight * 0  # the table's gradient, of which one row is kept
        else:
            base.text_encoder.inference(True)  # forward only
        self._data = None
        self._prior = None

    name = ""
    description = ""

    def modules(self) -> dict[str, Module]:
        return {WEIGHTS: self.model}

    def to(self, device: str) -> _FinetuneTask:
        """Move the base's networks (VAE included) and the learned part to ``device`` ("numpy", "cupy", "strict")."""
        for module in (*self.base.modules().values(), self.model):
            module.to(device)
        return self

    def personalised(self) -> TextToImageModel:
        """The base model with what was learned in place (the row synced): sample from this."""
        self.model.sync()
        return self.base

    # ------------------------------------------------------------------ data
    def _encode(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Posterior (mean, std) of ``images`` under the frozen VAE, on the host."""
        vae = self.base.vae
        means, stds = [], []
        with inference_mode(vae):
            for i in range(0, len(images), 64):
                posterior = vae.encode(to_device(images[i:i + 64], self.base.device))
                means.append(asnumpy(posterior.mean))
                stds.append(np.exp(0.5 * asnumpy(posterior.logvar)))
        return np.concatenate(means), np.concatenate(stds).astype(np.float32)

    def concept_data(self):
        """(latent, std, captions) of the concept's ``num_images`` images, once: the latents found by
        :func:`invert_decoder` from the encoder's means, the encoder's standard deviations."""
        if self._data is None:
            images, captions, _ = concept_images(self.config.concept, self.config.num_images, self.config.data_seed)
            mean, std = self._encode(images)
            latent = invert_decoder(self.base.vae, to_device(images, self.base.device),
                                    to_device(mean, self.base.device), self.config.invert_steps)
            self._data = (asnumpy(latent), std, captions)
        return self._data

    def prior_data(self):
        """(mean, std, captions) of the class images the frozen base draws for base prompts (module docstring)."""
        if self._prior is None:
            c = self.config
            prompts = class_prompts(c.class_images, c.data_seed)
            frozen = TextToImageModel.load(c.base)  # the base as shipped, whatever this run has learned since
            images = frozen.generate(prompts, "dpm++", 20, 4.0, seed=c.data_seed + 1)
            self._prior = (*self._encode(images), prompts)
        return self._prior

    def loss_and_backward(self, batch_size: int, rng: np.random.Generator) -> float:
        """Steps 1-5 of the module docstring."""
        base, c, schedule, vae = self.base, self.config, self.base.noise_schedule, self.base.vae
        device = base.device
        self.model.sync()
        # 1. concept and class latents, captions
        n_prior = int(round(c.prior_share * batch_size)) if self.prior_weight > 0 else 0
        n_concept = batch_size - n_prior
        mean, std, captions = self.concept_data()
        idx = rng.integers(0, len(mean), n_concept)
        means, stds, texts = [mean[idx]], [std[idx]], [captions[i] for i in idx.tolist()]
        if n_prior:
            p_mean, p_std, p_captions = self.prior_data()
            p_idx = rng.integers(0, len(p_mean), n_prior)
            means.append(p_mean[p_idx])
            stds.append(p_std[p_idx])
            texts += [p_captions[i] for i in p_idx.tolist()]
        mean, std = np.concatenate(means), np.concatenate(stds)
        z = mean + std * rng.standard_normal(mean.shape).astype(np.float32)
        x0 = ((z - vae.shift_factor) * vae.scaling_factor).astype(np.float32)  # (B, h, w, 4)
        texts = drop_captions(texts, c.caption_dropout, rng)
        # 2. the text encoder (a cache only for textual inversion)
        context = base.text_encoder(to_device(base.tokenizer.encode(texts).ids, device))  # (B, L, D)
        # 3. timesteps, noise, x_t
        t = rng.integers(0, schedule.num_train_timesteps, batch_size)
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        x0, eps, t_dev = to_device(x0, device), to_device(eps, device), to_device(t, device)
        x_t = q_sample(x0, t_dev, eps, schedule.alpha_bar)
        target = training_target(x0, eps, t_dev, schedule.alpha_bar, base.prediction_type)
        # 4. mean over the concept + lambda mean over the class images: per-sample weights B / B_c and
        #    lambda B / B_p under the batch mean (times min-SNR weights, as the base was trained)
        weights = np.full(batch_size, batch_size / n_concept, dtype=np.float32)
        if n_prior:
            weights[n_concept:] = self.prior_weight * batch_size / n_prior
        weights = to_device(weights, device)
        if c.min_snr_gamma is not None:
            weights = weights * min_snr_weights(t_dev, schedule.snr, c.min_snr_gamma, base.prediction_type)
        pred = base.unet(x_t, t_dev, context)
        loss, cache = mse_loss_forward(pred, target, weights)
        # 5. backward: the U-Net's trainable part; for textual inversion on to the token's row
        g = base.unet.backward(mse_loss_backward(cache))
        if self.train_token:
            base.text_encoder.backward(g.dcontext)
            self.model.pull_grad()
        return float(asnumpy(loss))

    # ------------------------------------------------------------------ sampling
    def preview_prompts(self, n: int) -> list[str]:
        """The concept's unseen combinations first, then its shown ones, cycled."""
        shown, unseen = concept_split(self.config.concept)
        prompts = caption(unseen[:: max(1, len(unseen) // 6)][:6]) + caption(shown[:2])
        return [prompts[i % len(prompts)] for i in range(n)]

    def make_sampler(self, name: str = "ddim"):
        return self.base.make_sampler(name)

    def sample(self, sampler: str, steps: int, n: int, seed: int, progress: bool = False) -> np.ndarray:
        return self.personalised().generate(self.preview_prompts(n), sampler, steps, self.config.guidance_scale,
                                            seed, progress)

    def save_png(self, samples, path, title: str = "") -> None:
        save_image_grid(asnumpy(samples), path, self.preview_prompts(len(samples)), ncols=min(8, len(samples)),
                        title=title)

    def save_preview(self, path, seed: int, title: str) -> None:
        samples = self.sample("dpm++", 20, 8, seed)
        self.save_png(samples, path, f"{title}, dpm++ 20 steps, guidance {self.config.guidance_scale}")

    @classmethod
    def add_arguments(cls, parser) -> None:
        s = argparse.SUPPRESS
        d = field_defaults(FinetuneConfig)
        parser.add_argument("--concept", choices=tuple(CONCEPTS), default=s,
                            help=f"the new concept to learn (default {d.concept})")
        parser.add_argument("--checkpoint", "--base", dest="base", metavar="DIR", default=s,
                            help=f"the base model: pretrained:shapes or a shapes run directory (default {d.base})")
        parser.add_argument("--num-images", type=positive_int, default=s, metavar="N",
                            help=f"images of the concept, 4 to 16 (default {d.num_images})")
        if cls.method == "lora":
            parser.add_argument("--rank", type=positive_int, default=s, metavar="R",
                                help=f"rank of the adapters (default {d.rank})")
            parser.add_argument("--alpha", type=nonnegative_float, default=s, metavar="A",
                                help="the adapters' scale is alpha / rank (default: alpha = rank)")
        if cls.method == "textual-inversion":
            parser.add_argument("--init-word", metavar="WORD", default=s,
                                help=f"the word whose row the new token starts from (default {INIT_WORDS})")
        parser.add_argument("--prior-weight", type=nonnegative_float, default=s, metavar="L",
                            help="lambda of the prior-preservation loss on class images from the frozen model; "
                                 "0: none (default: the method's)")
        parser.add_argument("--prior-share", type=fraction, default=s, metavar="P",
                            help=f"share of each batch from the class images (default {d.prior_share})")
        parser.add_argument("--class-images", type=positive_int, default=s, metavar="N",
                            help=f"class images the frozen model generates first (default {d.class_images})")
        parser.add_argument("--guidance-scale", type=at_least_one, default=s, metavar="W",
                            help=f"classifier-free guidance of previews and evaluation (default {d.guidance_scale})")
        parser.add_argument("--invert-steps", type=nonnegative_int, default=s, metavar="N",
                            help=f"Adam steps that find the concept images' latents through the frozen decoder "
                                 f"(default {d.invert_steps}; 0: the encoder's means)")
        parser.add_argument("--data-seed", type=int, default=s, metavar="N",
                            help=f"seed of the concept images and class images (default {d.data_seed})")


class LoRAFinetuneTask(_FinetuneTask):
    name = "finetune-lora"
    method = "lora"
    description = "LoRA adapters on the frozen U-Net's attention and ResNet convs learn a new concept from a few images"
    train_defaults = dict(steps=900, batch_size=16, lr=3e-3, ema_decay=0.0, grad_clip=1.0,
                          checkpoint_every=100, sample_every=0)


class TextualInversionTask(_FinetuneTask):
    name = "finetune-textual-inversion"
    method = "textual-inversion"
    description = "textual inversion: one new token's embedding learns a concept, everything else frozen"
    train_defaults = dict(steps=400, batch_size=16, lr=5e-3, ema_decay=0.0, grad_clip=1.0,
                          checkpoint_every=100, sample_every=0)

    def __init__(self, config: FinetuneConfig, rng: np.random.Generator) -> None:
        super().__init__(config, rng)


class DreamBoothTask(_FinetuneTask):
    name = "finetune-dreambooth"
    method = "dreambooth"
    description = "DreamBooth: the whole U-Net learns a concept, with prior preservation on class images"
    train_defaults = dict(steps=300, batch_size=16, lr=1e-4, ema_decay=0.0, grad_clip=1.0,
                          checkpoint_every=100, sample_every=0)


def class_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` base prompts (the 162 of the training split, shuffled by ``seed``, cycled): the class images' prompts."""
    prompts = all_prompts("train")
    order = np.random.default_rng([seed, 5]).permutation(len(prompts))
    return [prompts[order[i % len(order)]] for i in range(n)]


# ============================================================================ applying a result
def is_finetune_checkpoint(checkpoint) -> bool:
    """Is a loaded :class:`~diffusion_np.io.checkpoint.Checkpoint` a fine-tuning run's?"""
    return str(checkpoint.config.get("task", "")).startswith(FINETUNE_PREFIX)


def _finetune_checkpoint(path):
    """The checkpoint of a fine-tuning run at ``path`` (a run, its checkpoint/, an export, pretrained:NAME),
    or None when ``path`` is a file (a diffusers/kohya LoRA or an embedding file)."""
    if isinstance(path, (str, Path)) and Path(path).is_file():
        return None
    checkpoint = load_checkpoint(path)
    name = checkpoint.config.get("task", "")
    if not str(name).startswith(FINETUNE_PREFIX):
        raise CheckpointError(f"{path} is a {name or 'non-training'} checkpoint, not a fine-tuning run "
                              f"(finetune lora/textual-inversion/dreambooth)")
    return checkpoint


def apply_personalisation(model: TextToImageModel, loras=(), embedding=None, use_ema: bool = True) -> list[str]:
    """Put fine-tuning results onto a loaded ``model``, in place; returns one line per thing applied.

    ``loras``: ``[(path, scale), ...]``, each a ``finetune lora`` checkpoint (its token and its
    adapters, as adapter ``lora<i>`` with user scale ``scale``), or a diffusers/kohya LoRA file
    (:func:`diffusion_np.io.lora.load_lora`). ``embedding``: a ``finetune textual-inversion``
    checkpoint, or a safetensors file ``{word: (1, D)}`` (diffusers' ``learned_embeds``).
    A fine-tuning checkpoint is checked whole (its word new to the model, every adapted layer
    present with the stored shapes) before any of it is applied.
    """
    done = []
    for i, (path, scale) in enumerate(loras):
        name = f"lora{i}"
        checkpoint = _finetune_checkpoint(path)
        if checkpoint is None:  # a LoRA file as people share them
            layers = load_lora(path, unet=model.unet, text_encoder=model.text_encoder, adapter_name=name,
                               scale=float(scale))
            done.append(f"LoRA {path} (scale {scale:g}): " + ", ".join(f"{len(v)} {k} layers" for k, v in
                                                                    layers.items()))
            continue
        config, weights = _stored(checkpoint, use_ema)
        if checkpoint.config["task"] != "finetune-lora":
            raise CheckpointError(f"--lora {path} is a {checkpoint.config['task']} run; a LoRA run is "
                                  "finetune-lora (a textual inversion goes with --embedding, a DreamBooth run "
                                  "is a whole model: pass it as --checkpoint)")
        _check_lora_fits(model, path, config, weights)
        add_concept_token(model, config["concept"], weights["token_row"])
        adapted = add_lora(model.unet, target=config["targets"], rank=config["rank"], alpha=config["alpha"],
                           adapter_name=name)
        layers = lora_layers(model.unet)
        for layer_path in adapted:
            layers[layer_path].lora_A[name].load_state_dict({"weight": weights[f"unet.{layer_path}.lora_A.weight"]})
            layers[layer_path].lora_B[name].load_state_dict({"weight": weights[f"unet.{layer_path}.lora_B.weight"]})
        set_lora_scale(model.unet, name, float(scale))
        done.append(f"LoRA {path} (scale {scale:g}): the word {config['concept']!r}, {len(adapted)} U-Net layers")
    if embedding is not None:
        word, row = _read_embedding(embedding, use_ema)
        add_concept_token(model, word, row)
        done.append(f"embedding {embedding}: the word {word!r}")
    return done


def _stored(checkpoint, use_ema: bool) -> tuple[dict, dict]:
    """(task_config, {name: array}) of a fine-tuning checkpoint: its EMA weights when asked and present."""
    weights = dict(checkpoint.weights[WEIGHTS])
    state = checkpoint.training_state
    if use_ema and state is not None and "ema" in state:
        weights.update(state["ema"]["shadow"])
    return checkpoint.config["task_config"], weights


def _check_lora_fits(model: TextToImageModel, path, config: dict, weights: dict) -> None:
    """Every problem of putting a ``finetune lora`` checkpoint on ``model``, in one CheckpointError."""
    problems = []
    if config["concept"] in model.tokenizer.token_to_id:
        problems.append(f"the model already has the word {config['concept']!r}")
    width = _token_table(model).weight.shape[1]
    if tuple(weights["token_row"].shape) != (1, width):
        problems.append(f"token_row is {tuple(weights['token_row'].shape)}, the model's rows are (1, {width})")
    modules = dict(model.unet.named_modules())
    for key, value in weights.items():
        m = re.fullmatch(r"unet\.(.+)\.lora_([AB])\.weight", key)
        if m is None:
            continue
        layer = modules.get(m[1] + ".")
        weight = getattr(layer, "params", {}).get("weight")
        if weight is None or weight.ndim not in (2, 4):
            problems.append(f"{key}: the U-Net has no Linear or Conv2d layer {m[1]}")
            continue
        r = config["rank"]
        if weight.ndim == 2:  # Linear (out, in): A (r, in), B (out, r)
            want = (r, weight.shape[1]) if m[2] == "A" else (weight.shape[0], r)
        else:  # Conv2d (kh, kw, C_in, C_out): A (kh, kw, C_in, r), B (1, 1, r, C_out)
            kh, kw, c_in, c_out = weight.shape
            want = (kh, kw, c_in, r) if m[2] == "A" else (1, 1, r, c_out)
        if tuple(value.shape) != want:
            problems.append(f"{key}: shape {tuple(value.shape)}, the layer needs {want}")
    if problems:
        raise CheckpointError(f"--lora {path} does not fit the model: " + "; ".join(problems))


def _read_embedding(path, use_ema: bool) -> tuple[str, np.ndarray]:
    """(word, row (D,)) of a textual-inversion checkpoint or of a ``{word: (1, D)}`` safetensors file."""
    checkpoint = _finetune_checkpoint(path)
    if checkpoint is None:
        tensors = read_safetensors(Path(path))
        if len(tensors) != 1:
            raise CheckpointError(f"--embedding {path} must hold one tensor named by its word, got {sorted(tensors)}")
        (word, row), = tensors.items()
        return word, np.asarray(row, dtype=np.float32).reshape(-1)
    if checkpoint.config["task"] != "finetune-textual-inversion":
        raise CheckpointError(f"--embedding {path} is a {checkpoint.config['task']} run, not "
                              "finetune-textual-inversion")
    config, weights = _stored(checkpoint, use_ema)
    return config["concept"], np.asarray(weights["token_row"], dtype=np.float32).reshape(-1)


def save_embedding(task: _FinetuneTask, path) -> Path:
    """Write the learned row as diffusers' ``learned_embeds.safetensors``: ``{word: (1, D)}``."""
    path = Path(path)
    save_file({task.model.word: np.ascontiguousarray(asnumpy(task.model.token_row))}, str(path))
    return path


def load_personalised(checkpoint, use_ema: bool = True) -> TextToImageModel:
    """The personalised model of a fine-tuning checkpoint (a run, an export, ``pretrained:NAME``):
    its base with what it learned applied."""
    loaded = _finetune_checkpoint(checkpoint)
    if loaded is None:
        raise CheckpointError(f"{checkpoint} is a file; a fine-tuning checkpoint is a directory")
    return task_from_checkpoint(loaded, use_ema=use_ema).personalised()


# ============================================================================ evaluation
def evaluate_personalised(model: TextToImageModel, base: TextToImageModel, concept: str, sampler: str = "dpm++",
                          steps: int = 20, guidance_scale: float = 4.0, seed: int = 0, per_shown: int = 4,
                          unseen: int = 64, batch_size: int = 64, progress: bool = False) -> dict:
    """Prompt accuracy of a personalised ``model`` on its concept and on the base prompts, beside ``base``'s.

    * ``concept_accuracy``: the shown combinations of :func:`~diffusion_np.data.shapes.concept_split`,
      ``per_shown`` images each (the prompts trained on);
    * ``concept_unseen_accuracy``: ``unseen`` images cycling over the combinations never shown with
      the concept (other colours / shapes, sizes, positions);
    * ``retention_prompt_accuracy_all``: the 180 base prompts (162 + 18), one image each, and
      ``base_prompt_accuracy_all``: the same prompts and noise with ``base``.

    "Accuracy" is the share of images with all four attributes right
    (:func:`~diffusion_np.metrics.shapes.prompt_accuracy`). Each set has its own noise stream.
    """
    shown, never = concept_split(concept)
    sets = {
        "concept": caption(np.repeat(shown, per_shown, axis=0)),
        "concept_unseen": [caption(never[i % len(never)]) for i in range(unseen)],
        "retention": all_prompts("all"),
    }
    gen = dict(sampler=sampler, steps=steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
               progress=progress)
    metrics = {}
    for stream, (key, prompts) in enumerate(sets.items()):
        images = generate_images(model, prompts, stream=stream, desc=key, **gen)
        acc = prompt_accuracy(images, parse_caption(prompts))
        label = "retention_prompt" if key == "retention" else key
        metrics[f"{label}_accuracy" if key != "retention" else "retention_prompt_accuracy_all"] = acc["all"]
        metrics[f"{key}_per_attribute"] = acc["per_attribute"]
        metrics[f"{key}_images"] = len(prompts)
    images = generate_images(base, sets["retention"], stream=2, desc="base", **gen)
    acc = prompt_accuracy(images, parse_caption(sets["retention"]))
    metrics["base_prompt_accuracy_all"] = acc["all"]
    metrics["base_per_attribute"] = acc["per_attribute"]
    return metrics


def evaluate_personalised_checkpoint(checkpoint, loras=(), embedding=None, sampler: str = "ddim", steps: int = 50,
                                     guidance_scale: float | None = None, seed: int = 0, use_ema: bool = True,
                                     progress: bool = False) -> dict:
    """What ``diffusion-np evaluate`` reports for a personalised model: a fine-tuning run's
    ``checkpoint``, or a base ``checkpoint`` with ``loras`` / ``embedding`` applied
    (:func:`apply_personalisation`). The concept is the (first) fine-tuning run's.

    Returns a JSON-ready dict: ``task`` ("personalised"), ``method``, ``concept``, the sampling
    settings, ``metrics`` (:func:`evaluate_personalised`), ``wall_time_s``.
    """
    start = time.perf_counter()
    runs = []
    loaded = None if Path(str(checkpoint)).is_file() else load_checkpoint(checkpoint)
    if loaded is not None and is_finetune_checkpoint(loaded):
        if loras or embedding is not None:
            raise ValueError("--lora and --embedding go with a base --checkpoint, not with a fine-tuning run")
        model = load_personalised(checkpoint, use_ema)
        base_name = loaded.config["task_config"]["base"]
        runs.append(loaded)
    else:
        model = TextToImageModel.load(checkpoint, use_ema=use_ema)
        base_name = checkpoint
        apply_personalisation(model, loras, embedding, use_ema)
        for path in [p for p, _ in loras] + ([embedding] if embedding is not None else []):
            run = _finetune_checkpoint(path)
            if run is not None:
                runs.append(run)
    if not runs:
        raise ValueError("evaluate for a personalised model needs a fine-tuning run (--checkpoint RUN, --lora RUN or "
                         "--embedding RUN): its concept is what is scored")
    concept = runs[0].config["task_config"]["concept"]
    w = float(guidance_scale) if guidance_scale is not None else float(runs[0].config["task_config"]["guidance_scale"])
    base = TextToImageModel.load(base_name)
    metrics = evaluate_personalised(model, base, concept, sampler, steps, w, seed, progress=progress)
    return {
        "task": "personalised",
        "checkpoint": str(checkpoint),
        "lora": [f"{p}:{s:g}" for p, s in loras],
        "embedding": None if embedding is None else str(embedding),
        "method": [run.config["task"].removeprefix("finetune-") for run in runs],
        "concept": concept,
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": w,
        "seed": seed,
        "metrics": metrics,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }


def format_personalised_report(result: dict) -> str:
    """The table ``diffusion-np evaluate`` prints for :func:`evaluate_personalised_checkpoint`."""
    r, m = result, result["metrics"]
    extra = "".join(f" --lora {spec}" for spec in r["lora"]) + (f" --embedding {r['embedding']}"
                                                                 if r["embedding"] else "")
    lines = [f"personalised ({', '.join(r['method'])}, concept {r['concept']!r}): {r['checkpoint']}{extra}",
             f"{r['sampler']}, {r['steps']} steps, guidance {r['guidance_scale']:g}, seed {r['seed']}, "
             f"{r['wall_time_s']:.1f} s", "",
             f"{'prompts':36s} {'images':>6s} {'all':>6s} {'colour':>7s} {'shape':>7s} {'size':>7s} {'position':>8s}"]
    rows = (("concept, trained prompts", "concept_accuracy", "concept"),
            ("concept, unseen combinations", "concept_unseen_accuracy", "concept_unseen"),
            ("180 base prompts, personalised", "retention_prompt_accuracy_all", "retention"),
            ("180 base prompts, base model", "base_prompt_accuracy_all", "base"))
    for label, key, part in rows:
        per = m[f"{part}_per_attribute"]
        n = m.get(f"{part}_images", m["retention_images"])
        lines.append(f"{label:36s} {n:6d} {m[key]:6.3f} {per['colour']:7.3f} {per['shape']:7.3f} {per['size']:7.3f} "
                     f"{per['position']:8.3f}")
    return "\n".join(lines)
