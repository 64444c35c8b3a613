"""Train a ControlNet on the shapes: a control image puts the shape anywhere, at any size.

The ``shapes-controlnet`` task. The base model (``pretrained:shapes`` by default, or a
``shapes`` run) stays frozen: its U-Net, text encoder and VAE. A
:class:`~diffusion_np.models.controlnet.ControlNetModel` made from its U-Net
(:meth:`~diffusion_np.models.controlnet.ControlNetModel.from_unet`: the copy starts as the
base encoder, every zero conv at 0, so step 0 samples exactly as the base) learns to read a
one-channel control image, the mask or the edge map of the shape
(:class:`~diffusion_np.data.shapes.ControlShapesDataset`). The geometry is free, so the
control image shows positions and sizes the captions cannot name; the caption names the
colour, the shape, and the nearest of the named sizes and positions.

One training step (Zhang et al. 2023, Sec. 3.3: the diffusion loss with the control as an
extra condition, only the ControlNet's parameters trained), as diffusers'
``examples/controlnet/train_controlnet.py``::

    1. (x_0, caption, control) ~ data;  caption <- "" with probability p         (p = 0.5, the paper's Sec. 3.3)
       x_0 = scaling_factor * z,  z ~ q(z | image)                                 (frozen VAE)
    2. c = text_encoder(tokenizer(caption))                                          (frozen, no backward)
    3. t ~ Uniform({0, ..., T-1}),  eps ~ N(0, I),  x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps
    4. down, mid = controlnet(x_t, t, c, control)
    5. loss = || eps - unet(x_t, t, c, down, mid) ||^2                              (frozen U-Net)
    6. backward: unet.backward(residuals_only=True) -> (dskips, dmid);  controlnet.backward(dskips, dmid)

Replacing half the captions by "" (the paper's choice) makes the ControlNet find the layout
in the control image itself rather than lean on the words; the frozen base still draws the
colour and the shape the caption asks for. Step 6 never enters the frozen encoder: the
residuals join the U-Net after its down path and middle block, so their gradients come
from the up path alone.

Latents: as the ``shapes`` task, a pool of ``latent_pool`` images with their control images
and captions is encoded once (the posteriors' means and standard deviations), and every
batch samples ``z = mean + std * eps`` from it.

Checkpoints hold the ControlNet only (``controlnet.safetensors``); the config names the base
(``base``), which is loaded again with it: keep a ``shapes`` run that serves as a base where
it is. The ControlNet's config is filled from the base U-Net and the preset, and stored.

Left out: training the base jointly, several control kinds in one ControlNet, a learning rate
per part, and the paper's "sudden convergence" study.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffusion_np.backend import asnumpy, to_device
from diffusion_np.data.shapes import CONTROL_KINDS, ControlShapesDataset, caption, control_images, nearest_labels
from diffusion_np.diffusion import q_sample, training_target
from diffusion_np.io.checkpoint import CheckpointError
from diffusion_np.metrics.control import score_control
from diffusion_np.models.config import ControlNetConfig
from diffusion_np.models.controlnet import ControlNetModel
from diffusion_np.nn.losses import mse_loss_backward, mse_loss_forward
from diffusion_np.nn.module import Module, inference_mode
from diffusion_np.pipelines.controlnet import ControlNetPipeline, check_conditioning_scale
from diffusion_np.pretrained import PREFIX as PRETRAINED_PREFIX
from diffusion_np.training.argtypes import at_least_one, field_defaults, fraction, nonnegative_int
from diffusion_np.training.model import TextToImageModel
from diffusion_np.training.plots import save_image_grid
from diffusion_np.training.presets import PRESETS, get_preset
from diffusion_np.training.tasks import drop_captions

__all__ = ["ShapesControlNetConfig", "ShapesControlNetTask", "evaluate_controlnet", "heldout_controls"]

#: the stream of :func:`heldout_controls` (training draws its pool from data_seed + 1, far from it)
HELDOUT_STREAM = 7_001


@dataclass
class ShapesControlNetConfig:
    """Everything that rebuilds a :class:`ShapesControlNetTask`; ``controlnet`` (the fields of
    :class:`~diffusion_np.models.config.ControlNetConfig`) and ``latent_pool`` are filled from the
    base U-Net and the ``preset`` when None, and stored.

    ``base``: ``pretrained:shapes`` or the directory of a ``shapes`` run (made absolute).
    ``control``: "mask" or "edges" (:data:`~diffusion_np.data.shapes.CONTROL_KINDS`).
    ``guidance_scale`` and ``conditioning_scale``: what previews, ``sample`` and ``evaluate`` use.
    """

    base: str = PRETRAINED_PREFIX + "shapes"
    preset: str = "demo"
    control: str = "mask"
    caption_dropout: float = 0.5
    guidance_scale: float = 4.0
    conditioning_scale: float = 1.0
    latent_pool: int | None = None
    data_seed: int = 0
    controlnet: dict | None = None

    task = "shapes-controlnet"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS[self.task]:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS[self.task])}")
        if self.control not in CONTROL_KINDS:
            raise ValueError(f"control must be one of {CONTROL_KINDS}, got {self.control!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not self.guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")
        check_conditioning_scale(self.conditioning_scale)
        if self.latent_pool is None:
            self.latent_pool = get_preset(self.task, self.preset)["latent_pool"]
        if not (isinstance(self.latent_pool, int) and self.latent_pool >= 1):
            raise ValueError(f"latent_pool must be an integer >= 1, got {self.latent_pool!r}")
        if not str(self.base).startswith(PRETRAINED_PREFIX):
            self.base = str(Path(self.base).resolve())
        if self.controlnet is not None:
            ControlNetConfig(**self.controlnet)  # a stored config is checked field by field


class ShapesControlNetTask:
    """A ControlNet for the frozen shapes model, trained on free-geometry control images (module docstring)."""

    name = "shapes-controlnet"
    description = ("a ControlNet for pretrained:shapes (or --base): a mask or edge map places the shape anywhere, "
                   "at any size")
    Config = ShapesControlNetConfig
    train_defaults = PRESETS["shapes-controlnet"]["demo"]["train"]

    def __init__(self, config: ShapesControlNetConfig, rng: np.random.Generator) -> None:
        self.config = config
        try:
            base = TextToImageModel.load(config.base)  # its EMA weights
        except CheckpointError as err:
            raise CheckpointError(f"the base model of shapes-controlnet: {err}") from None
        if base.vae is None:
            raise ValueError(f"{config.base} is a pixel-space model; shapes-controlnet needs the latent shapes model")
        base.unet.freeze()
        base.text_encoder.freeze().inference(True)  # forward only: no backward into the text
        self.base = base
        preset = get_preset(self.name, config.preset)
        self.model = ControlNetModel.from_unet(  # the copy starts as the base encoder, the zero convs at 0
            base.unet, conditioning_channels=1, rng=rng,
            conditioning_embedding_out_channels=preset["conditioning_embedding_out_channels"])
        stored = self.model.config if config.controlnet is None else ControlNetConfig(**config.controlnet).to_dict()
        if stored != self.model.config:
            raise CheckpointError(f"the stored ControlNet config does not fit the base {config.base}'s U-Net")
        config.controlnet = _json(self.model.config)
        self._pool = None

    def modules(self) -> dict[str, Module]:
        return {"controlnet": self.model}

    @property
    def image_size(self) -> int:
        return int(self.base.unet.config["sample_size"]) * int(self.base.vae.downscale)

    # ------------------------------------------------------------------ data
    def _control_pool(self):
        """(mean, std, captions, controls) of ``latent_pool`` images with free geometry, encoded once."""
        if self._pool is None:
            data = ControlShapesDataset(self.config.control, seed=self.config.data_seed + 1,
                                        image_size=self.image_size)
            images, captions, _, controls = data.sample(self.config.latent_pool)
            means, stds = [], []
            with inference_mode(self.base.vae):
                for i in range(0, len(images), 64):
                    posterior = self.base.vae.encode(to_device(images[i:i + 64], self.base.device))
                    means.append(asnumpy(posterior.mean))
                    stds.append(np.exp(0.5 * asnumpy(posterior.logvar)))  # std = exp(logvar / 2)
            self._pool = (np.concatenate(means), np.concatenate(stds).astype(np.float32), captions, controls)
        return self._pool

    def loss_and_backward(self, batch_size: int, rng: np.random.Generator) -> float:
        """Steps 1-6 of the module docstring; gradients land in the ControlNet only."""
        base, controlnet, c = self.base, self.model, self.config
        schedule, vae, device = base.noise_schedule, base.vae, base.device
        # 1. a batch of the pool: latents sampled from the posteriors, control images, captions ("" for p of them)
        mean, std, captions, controls = self._control_pool()
        idx = rng.integers(0, len(mean), batch_size)
        z = mean[idx] + std[idx] * rng.standard_normal(mean[idx].shape).astype(np.float32)
        x0 = ((z - vae.shift_factor) * vae.scaling_factor).astype(np.float32)  # (B, h, w, 4)
        captions = drop_captions([captions[i] for i in idx.tolist()], c.caption_dropout, rng)
        # 2. the frozen text encoder, forward only
        context = base.text_encoder(to_device(base.tokenizer.encode(captions).ids, device))  # (B, L, D)
        # 3. timesteps, noise, x_t
        t = rng.integers(0, schedule.num_train_timesteps, batch_size)  # (B,)
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        x0, eps, t_dev = to_device(x0, device), to_device(eps, device), to_device(t, device)
        control = to_device(controls[idx], device)  # (B, H, W, 1)
        x_t = q_sample(x0, t_dev, eps, schedule.alpha_bar)
        target = training_target(x0, eps, t_dev, schedule.alpha_bar, base.prediction_type)
        # 4. the ControlNet's residuals, 5. the frozen U-Net with them
        down, mid = controlnet(x_t, t_dev, context, control)
        pred = base.unet(x_t, t_dev, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        loss, cache = mse_loss_forward(pred, target)
        # 6. back through the U-Net's up path to the residuals, then through the ControlNet
        g = base.unet.backward(mse_loss_backward(cache), residuals_only=True)
        controlnet.backward(g.dskips, g.dmid)
        return float(asnumpy(loss))  # the one deliberate device -> host copy of a step

    # ------------------------------------------------------------------ sampling
    def make_sampler(self, name: str = "ddim"):
        """Sampler ``name`` on the base model's schedule (:meth:`TextToImageModel.make_sampler`)."""
        return self.base.make_sampler(name)

    def to(self, device: str) -> ShapesControlNetTask:
        """Move the ControlNet and the frozen base networks to ``device`` ("numpy", "cupy", "strict")."""
        for module in (self.model, *self.base.modules().values()):
            module.to(device)
        return self

    def pipeline(self, sampler: str = "ddim") -> ControlNetPipeline:
        b = self.base
        return ControlNetPipeline(b.unet, self.model, b.text_encoder, b.tokenizer, b.make_sampler(sampler), b.vae)

    def generate(self, prompts: list[str], controls, sampler: str = "ddim", steps: int = 50,
                 guidance_scale: float | None = None, seed: int = 0, conditioning_scale: float | None = None,
                 progress: bool = False) -> np.ndarray:
        """Images (B, H, W, 3) in [-1, 1] on the host for ``prompts`` under ``controls`` ((B, H, W, 1) in [0, 1],
        or one (H, W, 1) for all); the scales default to the config's."""
        check_control_image(controls, self.image_size)
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        s = self.config.conditioning_scale if conditioning_scale is None else conditioning_scale
        out = self.pipeline(sampler)(list(prompts), controls, conditioning_scale=s, guidance_scale=w,
                                     num_inference_steps=steps, seed=seed, progress=progress)
        return out.images

    def preview(self, n: int, seed: int):
        """``n`` held-out (prompts, controls, target masks, labels) for previews and ``sample``."""
        return heldout_controls(n, seed, self.config.control, self.image_size)

    def sample(self, sampler: str, steps: int, n: int, seed: int, progress: bool = False) -> np.ndarray:
        """``n`` held-out control images beside the images generated from them: (n, H, 2W, 3)."""
        prompts, controls, _, _ = self.preview(n, seed)
        self._sampled_prompts = prompts  # the titles of save_png
        images = self.generate(prompts, controls, sampler, steps, seed=seed, progress=progress)
        shown = np.repeat(controls * 2.0 - 1.0, 3, axis=-1)  # [0, 1] grey -> [-1, 1] RGB
        return np.concatenate([shown, images], axis=2)  # control | image

    def save_png(self, samples, path, title: str = "") -> None:
        """A grid of :meth:`sample`'s output, titled with the prompts of the last :meth:`sample` call."""
        prompts = getattr(self, "_sampled_prompts", None) or [""] * len(samples)
        save_image_grid(asnumpy(samples), path, [p.removeprefix("a ") for p in prompts], ncols=min(4, len(samples)),
                        title=title)

    def save_preview(self, path, seed: int, title: str) -> None:
        preview = get_preset(self.name, self.config.preset)["preview"]
        prompts, controls, masks, labels = self.preview(preview["n"], seed)
        images = self.generate(prompts, controls, "ddim", preview["steps"], seed=seed)
        iou = score_control(images, masks, labels)["control_iou"]
        samples = np.concatenate([np.repeat(controls * 2.0 - 1.0, 3, axis=-1), images], axis=2)
        save_image_grid(samples, path, [p.removeprefix("a ") for p in prompts], ncols=min(4, len(samples)),
                        title=f"{title}, control | image, ddim {preview['steps']} steps, IoU {iou:.2f}")

    @classmethod
    def train_defaults_for(cls, config) -> dict:
        return get_preset(cls.name, config.preset)["train"]

    @staticmethod
    def add_arguments(parser) -> None:
        s = argparse.SUPPRESS
        d = field_defaults(ShapesControlNetConfig)
        parser.add_argument("--base", metavar="DIR", default=s,
                            help=f"the frozen base model: pretrained:shapes or a shapes run directory "
                                 f"(default {d.base})")
        parser.add_argument("--preset", choices=tuple(PRESETS["shapes-controlnet"]), default=s,
                            help=f"conditioning-embedding widths and training schedule: tiny (seconds, tests), demo "
                                 f"(minutes), full (the shipped weights) (default {d.preset})")
        parser.add_argument("--control", choices=CONTROL_KINDS, default=s,
                            help=f"what the control image shows: the shape's mask or its outline (default {d.control})")
        parser.add_argument("--caption-dropout", type=fraction, default=s, metavar="P",
                            help=f"share of captions replaced by \"\" (default {d.caption_dropout})")
        parser.add_argument("--guidance-scale", type=at_least_one, default=s, metavar="W",
                            help=f"classifier-free guidance of the previews (default {d.guidance_scale})")
        parser.add_argument("--latent-pool", type=nonnegative_int, default=s, metavar="N",
                            help="images (with their control images) encoded once, sampled for every batch "
                                 "(default: the preset's)")


def evaluate_controlnet(task: ShapesControlNetTask, n: int, sampler: str = "ddim", steps: int = 50,
                        guidance_scale: float | None = None, seed: int = 0, batch_size: int = 64,
                        progress: bool = False, device: str = "numpy") -> dict:
    """Generate ``n`` images under held-out control images (:func:`heldout_controls` of ``seed``) and score
    them with :func:`~diffusion_np.metrics.control.score_control` (what ``evaluate`` reports).

    Batch ``b`` is seeded with ``SeedSequence([seed, 0, b])``, as ``metrics.evaluate.generate_images``.
    """
    task.to(device)
    prompts, controls, masks, labels = heldout_controls(n, seed, task.config.control, task.image_size)
    starts = range(0, n, batch_size)
    batch_seeds = np.random.SeedSequence([seed, 0]).spawn(len(starts))
    images = []
    for start, seq in zip(tqdm(starts, desc="held-out controls", unit="batch", disable=not progress, leave=False),
                          batch_seeds):
        end = start + batch_size
        images.append(task.generate(prompts[start:end], controls[start:end], sampler, steps, guidance_scale,
                                    int(seq.generate_state(1)[0])))
    return score_control(np.concatenate(images), masks, labels)


def heldout_controls(n: int, seed: int = 0, kind: str = "mask", image_size: int = 32):
    """``n`` control images never trained on: ``(prompts, controls (n, S, S, 1), target masks (n, S, S) bool,
    labels (n, 4))`` from :class:`~diffusion_np.data.shapes.ControlShapesDataset` on the seed stream
    ``(seed, HELDOUT_STREAM)``; the target mask is the shape's coverage >= 1/2 for either kind."""
    colour_shape, centre, radius = ControlShapesDataset(kind, image_size=image_size).sample_geometry(
        n, np.random.SeedSequence([seed, HELDOUT_STREAM]))
    labels = nearest_labels(colour_shape, centre, radius, image_size)
    controls = control_images(colour_shape[:, 1], centre, radius, kind, image_size)  # (n, S, S, 1)
    masks = control_images(colour_shape[:, 1], centre, radius, "mask", image_size)[..., 0] >= 0.5  # (n, S, S)
    return caption(labels), controls, masks, labels


def check_control_image(controls, image_size: int) -> None:
    """A control image for the shapes ControlNet: (H, W, 1) or (B, H, W, 1) with H = W = ``image_size``,
    or a ValueError naming the size and channels it got."""
    shape = tuple(getattr(controls, "shape", ()))
    if len(shape) not in (3, 4) or shape[-3:] != (image_size, image_size, 1):
        raise ValueError(f"the control image must be {image_size}x{image_size} with 1 channel (a grey-scale mask or "
                         f"edge map, white on black), got shape {shape}")


def _json(value):
    """A JSON round trip: tuples become lists, so the config compares equal to its saved copy."""
    return json.loads(json.dumps(value))
