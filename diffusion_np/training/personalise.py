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
       x_0 = scaling_factor * z, z ~ q(z | image) (the frozen VAE's encoder); with ``invert_steps``
       (textual inversion's and DreamBooth's default) the concept images' means are replaced by latents the frozen
       decoder turns into them (:func:`invert_decoder`), found once
       captions: the concept's own; "" with probability p (classifier-free guidance)
    2. c = text_encoder(tokenizer(captions))              (TI: with the trainable row in the table)
    3. t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps
    4. loss = mean_c ||eps - eps_th(x_t, t, c)||^2 + lambda mean_p ||eps' - eps_th(x'_t, t', c')||^2
                                                                      (DreamBooth Eq. 2)
    5. backward: U-Net -> (LoRA: the adapters' dA, dB | DreamBooth: every U-Net weight)
                 -> (TI, LoRA's trained row: d context -> the text encoder's hand-written backward -> the row)

LoRA also adapts the VAE's decoder (rank-``vae_rank`` adapters on its convolutions,
:data:`VAE_TARGETS`; DreamBooth with ``vae_rank``), in the same optimizer step, by a second,
independent loss::

    6. concept images, flipped and shifted by up to 3 pixels (:func:`augment_flip_shift`), and base images;
       z ~ q(z | image) (the frozen encoder)
       loss_vae = mean_c ||D(z) - image||^2 + mean_b ||D(z') - D_0(z')||^2    (D_0: the frozen decoder)

The first term teaches the decoder to draw the concept from the latents the encoder gives it (which
the U-Net then learns to make: step 1's concept latents are the encoder's); the second keeps every base
image as the frozen decoder drew it. Without it the star stays out of reach: the U-Net can only learn
latents the decoder turns into a star, and the shipped decoder turns almost none of them into one.

The second term of step 4 is DreamBooth's prior preservation: the class images were generated
by the frozen base model *before* training (256 images of the base prompts, DPM-Solver++ 20
steps, guidance 4), and keep the fine-tuned model drawing them as it did (lambda 1, the paper's).
It serves LoRA the same way, with lambda 2 (its adapters change every prompt's images, not only
the concept's); textual inversion needs none (no base prompt reaches its row), so its
``prior_weight`` is 0.

Checkpoints (the :class:`~diffusion_np.training.trainer.Trainer`'s, with resume and Ctrl-C):
the config names the base (``pretrained:shapes`` or a ``shapes`` run) and one safetensors file,
``personal.safetensors``, holds what was learned: ``token_embedding.<word>`` (1, D) and, for
LoRA, ``unet.<layer path>.lora_A.weight`` / ``lora_B.weight`` (diffusers' key names, our
layout); for DreamBooth ``unet.<every U-Net parameter>``. :func:`apply_personalisation` puts a
LoRA or an embedding checkpoint onto any loaded model (``sample``/``evaluate`` ``--lora``,
``--embedding``).

Left out: training the text encoder with LoRA or DreamBooth, several tokens per concept, and
adapting the VAE's encoder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from diffusion_np.backend import asnumpy, get_xp, to_device
from diffusion_np.data.shapes import (
    CONCEPTS,
    all_prompts,
    caption,
    combos,
    concept_images,
    concept_split,
    parse_caption,
    render,
)
from diffusion_np.diffusion import min_snr_weights, q_sample, training_target
from diffusion_np.io.checkpoint import CheckpointError, load_checkpoint
from diffusion_np.io.diffusers import read_safetensors
from diffusion_np.io.lora import load_lora, parse_lora_spec
from diffusion_np.metrics.evaluate import generate_images
from diffusion_np.metrics.shapes import prompt_accuracy
from diffusion_np.models.tokenizer import SPECIAL_TOKENS, WordTokenizer
from diffusion_np.nn.lora import ATTENTION_TARGETS, add_lora, disable_lora, lora_layers, set_lora_scale
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
#: the VAE decoder's layers that LoRA adapts (``vae_rank``): its 3x3 convolutions but the two
#: upsamplers' (an adapted upsampler runs its nearest-neighbour upsampling and convolution one after the other,
#: which rounds differently from the fused path, and at scale 0 the images must be the base model's bit for bit).
#: The shipped VAE never saw a star or orange: its encoder keeps them apart from the base shapes and colours
#: (a star's latent is further from the circle's than a square's is), but its decoder draws them as those
#: (10% of the 60 star combinations' reconstructions read as stars); adapters here teach it to draw what the
#: encoder keeps apart
VAE_TARGETS = ("decoder.conv_in", "decoder.*conv1", "decoder.*conv2", "decoder.conv_out")
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

    def add_lora_children(self, component: str = "unet", adapter_name: str = "default") -> None:
        """Hold the A and B of every adapted layer of ``component`` (``"unet"`` or ``"vae"``) as
        ``<component>.<path>.lora_A`` / ``lora_B``."""
        for path, layer in lora_layers(getattr(self._model, component)).items():
            self._modules[f"{component}.{path}.lora_A"] = layer.lora_A[adapter_name]
            self._modules[f"{component}.{path}.lora_B"] = layer.lora_B[adapter_name]

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
    ``vae_rank``: rank of the decoder's adapters (0: the VAE stays as shipped; None: 8 for LoRA, 0 for
    textual inversion, which learns its row alone, and for DreamBooth, whose learning rate, right for
    a whole U-Net, barely moves adapters: 300 steps at 1e-4 drew no star), ``vae_batch``: images per
    step of the decoder's loss (half concept, half base).
    ``invert_steps``: :func:`invert_decoder`'s steps for the concept latents (None: 0 when the
    decoder is adapted, 500 when it is not).
    ``prior_weight`` (lambda of DreamBooth Eq. 2; 0: no class images; None: 0 for textual
    inversion, 1 for DreamBooth, 2 for LoRA), ``prior_target`` (the class images' target: ``"noise"``,
    DreamBooth's, or ``"frozen"``, the frozen base U-Net's own prediction at the same x_t; None:
    ``"frozen"`` for LoRA, ``"noise"`` for DreamBooth), ``prior_share`` (share of
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
    prior_target: str | None = None
    class_images: int = 256
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0
    guidance_scale: float = 4.0
    vae_rank: int | None = None
    vae_batch: int = 12
    invert_steps: int | None = None
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
        if self.prior_target not in (None, "noise", "frozen"):
            raise ValueError(f"prior_target must be 'noise' or 'frozen', got {self.prior_target!r}")
        if not 0.0 <= self.prior_share < 1.0:
            raise ValueError(f"prior_share must be in [0, 1), got {self.prior_share}")
        if self.invert_steps is not None and not (isinstance(self.invert_steps, int) and self.invert_steps >= 0):
            raise ValueError(f"invert_steps must be an integer >= 0, got {self.invert_steps!r}")
        if self.vae_rank is not None and not (isinstance(self.vae_rank, int) and self.vae_rank >= 0):
            raise ValueError(f"vae_rank must be an integer >= 0, got {self.vae_rank!r}")
        if not (isinstance(self.vae_batch, int) and self.vae_batch >= 2):
            raise ValueError(f"vae_batch must be an integer >= 2, got {self.vae_batch!r}")
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
    a VAE trained on a toy world does not.) LoRA adapts the decoder instead (``vae_rank``, the
    module docstring's step 6), which leaves the diffusion model the encoder's latents to learn;
    textual inversion, which trains one row and nothing else, and DreamBooth use these.
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


def _vae_rank(method: str, config: dict) -> int:
    """The decoder adapters' rank of a run: its ``vae_rank``, or the method's default when it is None
    (8 for LoRA, 0 otherwise); 0 for a run saved before the decoder was adapted (no such field)."""
    if "vae_rank" not in config:
        return 0
    return config["vae_rank"] if config["vae_rank"] is not None else (8 if method == "lora" else 0)


def augment_flip_shift(images, n: int, rng: np.random.Generator, max_shift: int = 3, fill: float = -1.0):
    """``n`` copies (n, H, W, C) of random ``images`` (B, H, W, C), each flipped left-right with
    probability 1/2 and shifted by up to ``max_shift`` pixels along each axis (``fill`` where
    the shift uncovers the border: the shapes' black background). The decoder's training images.

    One gather: the output pixel (i, j) of copy k is the padded source's (i + dy_k, j') with
    j' = j + dx_k, or W - 1 - j + dx_k when copy k is flipped.
    """
    source = rng.integers(0, len(images), n)  # (n,)
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), constant_values=fill)
    dy, dx = (rng.integers(0, 2 * max_shift + 1, (2, n)))  # (n,) each, offsets into the padded image
    flip = rng.random(n) < 0.5  # (n,)
    cols = np.where(flip[:, None], np.arange(w)[::-1], np.arange(w)) + dx[:, None]  # (n, W)
    rows = np.arange(h) + dy[:, None]  # (n, H)
    return padded[source[:, None, None], rows[:, :, None], cols[:, None, :]]  # (n, H, W, C)


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
        # lambda of Eq. 2: none for textual inversion (no base prompt reaches its row), 1 for DreamBooth (the
        # paper's), 2 for LoRA (its ResNet adapters touch every prompt: at 1, 3-6% of the base prompts failed,
        # small squares drawn as stars; at 3 it learned the star less well)
        self.prior_weight = config.prior_weight if config.prior_weight is not None else \
            {"textual-inversion": 0.0, "dreambooth": 1.0, "lora": 2.0}[self.method]
        # the class images' target: the frozen U-Net's prediction for LoRA (it halved the base prompts LoRA
        # forgot, and the star composed better), the noise of DreamBooth's Eq. 2 for DreamBooth
        self.prior_target = config.prior_target or ("frozen" if self.method == "lora" else "noise")
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
            self.model.add_lora_children("unet")
        elif self.method == "dreambooth":
            for _, module in base.unet.named_modules():  # unfreeze the U-Net: every weight trains
                for name, value in module.params.items():
                    module.grads[name] = value * 0
        self.vae_rank = _vae_rank(self.method, dataclasses.asdict(config))
        self.invert_steps = config.invert_steps if config.invert_steps is not None else (0 if self.vae_rank else 500)
        if self.vae_rank:  # step 6: the decoder's adapters
            add_lora(base.vae, target=VAE_TARGETS, rank=self.vae_rank, rng=rng)
            self.model.add_lora_children("vae")
        if self.train_token:
            table = _token_table(base)
            table.grads["weight"] = table.weight * 0  # the table's gradient, of which one row is kept
        else:
            base.text_encoder.inference(True)  # forward only
        self._data = None
        self._prior = None
        self._prior_latents = None
        self._decoder_data = None
        self._frozen_unet = None

    name = ""
    description = ""

    def modules(self) -> dict[str, Module]:
        return {WEIGHTS: self.model}

    def to(self, device: str) -> _FinetuneTask:
        """Move the base's networks (VAE included), the learned part and the frozen U-Net, once loaded, to
        ``device`` ("numpy", "cupy", "strict")."""
        frozen = () if self._frozen_unet is None else (self._frozen_unet,)
        for module in (*self.base.modules().values(), self.model, *frozen):
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
        """(mean, std, captions) of the concept's ``num_images`` images under the encoder, once; with
        ``invert_steps``, the means replaced by the latents :func:`invert_decoder` finds from them."""
        if self._data is None:
            images, captions, _ = concept_images(self.config.concept, self.config.num_images, self.config.data_seed)
            mean, std = self._encode(images)
            if self.invert_steps:  # through the decoder as shipped, whatever its adapters hold by now
                with self._frozen_decoder() as vae:
                    mean = asnumpy(invert_decoder(vae, to_device(images, self.base.device),
                                                  to_device(mean, self.base.device), self.invert_steps))
            self._data = (mean, std, captions)
        return self._data

    def share_data(self, other: _FinetuneTask) -> _FinetuneTask:
        """Use ``other``'s concept latents, class images and decoder data (made once, for runs that differ in
        what they train, not in their data: a rank sweep); returns self."""
        self._data, self._prior, self._prior_latents = other.concept_data(), other.prior_data(), other._prior_latents
        self._decoder_data = other.decoder_data() if self.vae_rank and other.vae_rank else None
        return self

    def frozen_unet(self):
        """The base's U-Net as shipped, forward only (``prior_target="frozen"``), loaded once."""
        if self._frozen_unet is None:
            self._frozen_unet = TextToImageModel.load(self.config.base).unet.to(self.base.device).inference()
        return self._frozen_unet

    def _frozen_decoder(self):
        """``with self._frozen_decoder() as vae:`` the VAE as shipped (its adapters, if any, switched off)."""
        return disable_lora(self.base.vae) if self.vae_rank else contextlib.nullcontext(self.base.vae)

    def decoder_data(self):
        """Step 6's data, once: ``(concept, base)``, each ``(mean, std, target)`` on the host.

        concept: the ``num_images`` images and 248 flipped/shifted copies (:func:`augment_flip_shift`),
        the target the image itself. base: the encoder's latents of 256 renders of the base training
        prompts and the latents the frozen U-Net made for the class images (:meth:`prior_data`, std 0),
        the target the frozen decoder's drawing of each (the adapters switched off while it is made, so a
        resumed run finds the same targets): the decoder must keep drawing what the base model makes.
        """
        if self._decoder_data is None:
            c = self.config
            rng = np.random.default_rng([c.data_seed, 6])
            images, _, _ = concept_images(c.concept, c.num_images, c.data_seed)
            images = np.concatenate([images, augment_flip_shift(images, 256 - len(images), rng)])
            base_labels = combos("train")
            base_images = render(base_labels[rng.integers(0, len(base_labels), 256)], rng)
            (c_mean, c_std), (b_mean, b_std) = self._encode(images), self._encode(base_images)
            self.prior_data()
            b_mean = np.concatenate([b_mean, self._prior_latents.astype(np.float32)])
            b_std = np.concatenate([b_std, np.zeros_like(self._prior_latents, dtype=np.float32)])
            with self._frozen_decoder() as vae, inference_mode(vae):
                frozen = np.concatenate([asnumpy(vae.decode(to_device(b_mean[i:i + 64], self.base.device)))
                                         for i in range(0, len(b_mean), 64)])
            self._decoder_data = ((c_mean, c_std, images.astype(np.float32)), (b_mean, b_std, frozen))
        return self._decoder_data

    def decoder_loss_and_backward(self, rng: np.random.Generator) -> float:
        """Step 6 of the module docstring: the decoder's adapters' loss, their gradients accumulated."""
        vae, device, n = self.base.vae, self.base.device, self.config.vae_batch
        parts = self.decoder_data()
        sizes = (n - n // 2, n // 2)  # concept, base
        picks = [rng.integers(0, len(mean), k) for (mean, _, _), k in zip(parts, sizes)]
        mean = np.concatenate([part[0][i] for part, i in zip(parts, picks)])  # (n, h, w, 4)
        std = np.concatenate([part[1][i] for part, i in zip(parts, picks)])
        target = np.concatenate([part[2][i] for part, i in zip(parts, picks)])  # (n, H, W, 3)
        z = mean + std * rng.standard_normal(mean.shape).astype(np.float32)
        # each half's mean: per-sample weights n / n_half under the batch mean
        weights = np.concatenate([np.full(k, n / k, dtype=np.float32) for k in sizes])
        loss, cache = mse_loss_forward(vae.decode(to_device(z, device)), to_device(target, device),
                                       to_device(weights, device))
        vae.decode_backward(mse_loss_backward(cache))
        return float(asnumpy(loss))

    def prior_data(self):
        """(mean, std, captions) of the class images the frozen base draws for base prompts (module docstring)."""
        if self._prior is None:
            c = self.config
            prompts = class_prompts(c.class_images, c.data_seed)
            frozen = TextToImageModel.load(c.base)  # the base as shipped, whatever this run has learned since
            out = frozen.pipeline("dpm++")(prompts, guidance_scale=4.0, num_inference_steps=20, seed=c.data_seed + 1)
            self._prior = (*self._encode(out.images), prompts)
            # the latents the frozen U-Net made, in the VAE's units (decode_latents' input before its scaling)
            self._prior_latents = asnumpy(out.latents) / frozen.vae.scaling_factor + (frozen.vae.shift_factor or 0.0)
        return self._prior

    def loss_and_backward(self, batch_size: int, rng: np.random.Generator) -> float:
        """Steps 1-5 of the module docstring, and 6 when the decoder is adapted."""
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
        if n_prior and self.prior_target == "frozen":  # the class half's target: what the frozen U-Net predicts
            target[n_concept:] = self.frozen_unet()(x_t[n_concept:], t_dev[n_concept:], context[n_concept:])
        pred = base.unet(x_t, t_dev, context)
        loss, cache = mse_loss_forward(pred, target, weights)
        # 5. backward: the U-Net's trainable part; for textual inversion on to the token's row
        g = base.unet.backward(mse_loss_backward(cache))
        if self.train_token:
            base.text_encoder.backward(g.dcontext)
            self.model.pull_grad()
        loss = float(asnumpy(loss))
        # 6. the decoder's adapters (their own loss; the sum is what the optimizer minimises)
        if self.vae_rank:
            loss += self.decoder_loss_and_backward(rng)
        return loss

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
                                 "0: none (default: 2 for LoRA, 1 for DreamBooth, 0 for textual inversion)")
        parser.add_argument("--prior-target", choices=("noise", "frozen"), default=s,
                            help="the class images' target: the noise (DreamBooth's Eq. 2) or the frozen base "
                                 "U-Net's prediction at the same noisy latent (default: frozen for LoRA, noise "
                                 "for DreamBooth)")
        parser.add_argument("--prior-share", type=fraction, default=s, metavar="P",
                            help=f"share of each batch from the class images (default {d.prior_share})")
        parser.add_argument("--class-images", type=positive_int, default=s, metavar="N",
                            help=f"class images the frozen model generates first (default {d.class_images})")
        parser.add_argument("--guidance-scale", type=at_least_one, default=s, metavar="W",
                            help=f"classifier-free guidance of previews and evaluation (default {d.guidance_scale})")
        parser.add_argument("--vae-rank", type=nonnegative_int, default=s, metavar="R",
                            help="rank of the adapters on the VAE decoder's convolutions, trained beside the rest "
                                 "to draw the concept from the encoder's latents (default: 8 for LoRA, 0 for "
                                 "the others; 0: the VAE as shipped)")
        parser.add_argument("--vae-batch", type=positive_int, default=s, metavar="N",
                            help=f"images per step of the decoder's loss, half concept, half base (default "
                                 f"{d.vae_batch})")
        parser.add_argument("--invert-steps", type=nonnegative_int, default=s, metavar="N",
                            help="Adam steps that find the concept images' latents through the frozen decoder "
                                 "(default: 0 when the decoder is adapted, 500 otherwise; 0: the encoder's means)")
        parser.add_argument("--data-seed", type=int, default=s, metavar="N",
                            help=f"seed of the concept images and class images (default {d.data_seed})")


class LoRAFinetuneTask(_FinetuneTask):
    name = "finetune-lora"
    method = "lora"
    description = ("LoRA adapters on the frozen U-Net's attention and ResNet convs (and on the VAE decoder's convs) "
                   "learn a new concept from a few images")
    train_defaults = dict(steps=800, batch_size=16, lr=3e-3, ema_decay=0.0, grad_clip=1.0,
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
        vae_rank = _vae_rank("lora", config)
        parts = [("unet", config["targets"], config["rank"], config["alpha"])] + \
            ([("vae", VAE_TARGETS, vae_rank, None)] if vae_rank else [])
        counts = []
        for component, targets, rank, alpha in parts:
            module = getattr(model, component)
            adapted = add_lora(module, target=targets, rank=rank, alpha=alpha, adapter_name=name)
            layers = lora_layers(module)
            for layer_path in adapted:
                for half in ("A", "B"):
                    getattr(layers[layer_path], f"lora_{half}")[name].load_state_dict(
                        {"weight": weights[f"{component}.{layer_path}.lora_{half}.weight"]})
            set_lora_scale(module, name, float(scale))
            counts.append(f"{len(adapted)} {'U-Net' if component == 'unet' else 'VAE decoder'} layers")
        done.append(f"LoRA {path} (scale {scale:g}): the word {config['concept']!r}, " + ", ".join(counts))
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
    ranks = {"unet": config["rank"], "vae": _vae_rank("lora", config)}
    if ranks["vae"] and model.vae is None:
        problems.append("the run adapts a VAE decoder and the model has no VAE (a pixel-space model)")
    modules = {c: dict(getattr(model, c).named_modules()) for c in ranks if getattr(model, c) is not None}
    for key, value in weights.items():
        m = re.fullmatch(r"(unet|vae)\.(.+)\.lora_([AB])\.weight", key)
        if m is None or m[1] not in modules:
            continue
        component, layer_path, half = m.groups()
        weight = getattr(modules[component].get(layer_path + "."), "params", {}).get("weight")
        if weight is None or weight.ndim not in (2, 4):
            name = "U-Net" if component == "unet" else "VAE"
            problems.append(f"{key}: the {name} has no Linear or Conv2d layer {layer_path}")
            continue
        r = ranks[component]
        if weight.ndim == 2:  # Linear (out, in): A (r, in), B (out, r)
            want = (r, weight.shape[1]) if half == "A" else (weight.shape[0], r)
        else:  # Conv2d (kh, kw, C_in, C_out): A (kh, kw, C_in, r), B (1, 1, r, C_out)
            kh, kw, c_in, c_out = weight.shape
            want = (kh, kw, c_in, r) if half == "A" else (1, 1, r, c_out)
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
