"""Distil a text-to-image model to a few steps: latent consistency distillation (LCM).

The ``lcm`` task (``diffusion-np distill lcm --teacher pretrained:shapes --out runs/shapes-lcm``).
A *teacher* (``pretrained:shapes``, ``pretrained:digits`` or a run of either) stays frozen; a
*student* U-Net, initialised as the teacher's, learns the consistency function of the teacher's
classifier-free-guided probability-flow ODE (Luo et al. 2023, "Latent Consistency Models",
Algorithm 1; Song et al. 2023, "Consistency Models", Algorithm 2, consistency distillation)::

    f_theta(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t)          (LCM Eq. 9; c_skip(0) = 1, c_out(0) = 0)

f maps every point of one ODE trajectory to the same clean x_0, so one evaluation samples and
:class:`~diffusion_np.samplers.LCMSampler` refines it in 2-8 steps. The boundary condition
f(x, 0) = x holds by construction (:func:`~diffusion_np.diffusion.consistency_scalings`).

One distillation step, as diffusers' ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``
runs it (the skipping interval k = T // N' on the grid t = k j - 1 of N' = ``original_inference_steps``
DDIM timesteps, the grid :class:`~diffusion_np.samplers.LCMSampler` samples on)::

    1. (x_0, caption) ~ data                              (latents of the teacher's VAE, or pixels)
    2. j ~ U{1..N'};  t_{n+k} = k j - 1,  t_n = max(t_{n+k} - k, 0)
    3. x_{t_{n+k}} = sqrt(ab) x_0 + sqrt(1 - ab) eps                                 (DDPM Eq. 4)
    4. the teacher's guided DDIM step over the skip (LCM Eq. 8, "augmented PF-ODE" solver Psi):
         out = out_u + w (out_c - out_u)                  (classifier-free guidance, w fixed)
         x_{t_n} = sqrt(ab_n) x0(out) + sqrt(1 - ab_n) eps(out)                     (DDIM Eq. 12)
    5. target = f_{theta^-}(x_{t_n}, t_n, c)              (the EMA target network, no gradient)
    6. loss = d(f_theta(x_{t_{n+k}}, t_{n+k}, c), target)    d: pseudo-Huber (c = 0.001) or L2
    7. backward through the student only: d f / d out = c_out(t_{n+k}) d x0 / d out
    8. (after the optimizer step) theta^- <- mu theta^- + (1 - mu) theta       (mu = 0.95, LCM Sec. 4.2)

Why a skipping interval (LCM Sec. 4.3): adjacent timesteps t and t - 1 give a target that
differs from the student's own prediction only by a tiny ODE step, so the consistency signal
(what the one step adds) drowns in the network's error; skipping k = 20 timesteps with one DDIM
step of the teacher makes each target carry a larger piece of the trajectory, and the grid
the sampler later visits is exactly the one trained on.

Guidance distillation: the teacher's two evaluations (with the caption and with "") and the
guidance weight w are folded into the target, so the student learns the *guided* trajectory
and samples with one evaluation per step and no guidance (``guidance_scale`` 1). The weight
is fixed (``teacher_guidance_scale``, the teacher's evaluation setting); LCM draws it per sample
and embeds it as a condition of the U-Net, which a fixed w does not need.

The target network theta^- is an EMA of the student (Song et al. 2023, Sec. 3: the target is
"stop-grad" of a slowly moving copy, which keeps the fixed point of the bootstrapped loss from
chasing itself); it is part of the checkpoint's training state (``--resume`` continues it
exactly) and not of the exported weights. The student, the teacher's text encoder and VAE
make the checkpoint (:class:`~diffusion_np.training.model.TextToImageModel`): an export
samples on its own with ``--sampler lcm``.

Left out: the guidance scale as a condition (w embedding), LCM-LoRA (a LoRA student), skipping
intervals other than one DDIM step of the N' grid, and the real-data-free (teacher-sampled) variant.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffusion_np.backend import asnumpy, get_xp, to_device
from diffusion_np.diffusion import broadcast_like, consistency_scalings, q_sample, x0_and_eps
from diffusion_np.io.checkpoint import CheckpointError, load_checkpoint
from diffusion_np.models.unet import UNet2DConditionModel
from diffusion_np.nn.losses import (
    mse_loss_backward,
    mse_loss_forward,
    pseudo_huber_loss_backward,
    pseudo_huber_loss_forward,
)
from diffusion_np.nn.module import Module
from diffusion_np.pretrained import PREFIX as PRETRAINED_PREFIX
from diffusion_np.training.argtypes import at_least_one, field_defaults, fraction, nonnegative_int, positive_float
from diffusion_np.training.model import TextToImageModel
from diffusion_np.training.presets import PRESETS, get_preset
from diffusion_np.training.trainer import task_from_checkpoint

__all__ = [
    "DISTILL_LOSSES",
    "DistilledStudent",
    "LCMDistillConfig",
    "LCMDistillTask",
    "check_distill_config",
    "student_of",
    "x0_output_coefficient",
]

#: the distance of step 6
DISTILL_LOSSES = ("huber", "l2")
#: the teachers a student can learn from: the text-to-image tasks
TEACHER_TASKS = ("shapes", "digits")


@dataclass
class LCMDistillConfig:
    """Everything that rebuilds an :class:`LCMDistillTask`.

    ``teacher``: ``pretrained:shapes``, ``pretrained:digits``, or a run of either (made absolute).
    ``teacher_guidance_scale``: the w of the teacher's guided step, distilled into the student.
    ``guidance_scale``: what previews, ``sample`` and ``evaluate`` use with the student (1: none).
    ``original_inference_steps``: N', the grid; the skipping interval is T // N'.
    ``timestep_scaling``: s of the boundary scalings (:func:`~diffusion_np.diffusion.consistency_scalings`).
    ``loss``: "huber" (pseudo-Huber with ``huber_c``) or "l2"; ``target_decay``: mu of the target EMA.
    ``latent_pool``: images of a latent teacher encoded once (None: the preset's).
    ``teacher_task``: filled from the teacher's checkpoint ("shapes" or "digits").
    """

    teacher: str = PRETRAINED_PREFIX + "shapes"
    preset: str = "full"
    teacher_guidance_scale: float = 4.0
    guidance_scale: float = 1.0
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    loss: str = "huber"
    huber_c: float = 0.001
    target_decay: float = 0.95
    latent_pool: int | None = None
    teacher_task: str | None = None

    task = "lcm"

    def __post_init__(self) -> None:
        check_distill_config(self)
        if self.loss not in DISTILL_LOSSES:
            raise ValueError(f"loss must be one of {DISTILL_LOSSES}, got {self.loss!r}")
        if not self.huber_c > 0:
            raise ValueError(f"huber_c must be > 0, got {self.huber_c}")
        if not 0.0 <= self.target_decay < 1.0:
            raise ValueError(f"target_decay must be in [0, 1), got {self.target_decay}")
        if not self.timestep_scaling > 0:
            raise ValueError(f"timestep_scaling must be > 0, got {self.timestep_scaling}")
        if not (isinstance(self.original_inference_steps, int) and self.original_inference_steps >= 1):
            raise ValueError(f"original_inference_steps must be an integer >= 1, got {self.original_inference_steps!r}")


def check_distill_config(config) -> None:
    """The fields every distillation config shares, checked (a ValueError naming the field) and filled in place:
    ``preset``, ``teacher_guidance_scale`` and ``guidance_scale`` (>= 1), ``latent_pool`` (the preset's when
    None), ``teacher_task``, and ``teacher`` (made absolute unless a ``pretrained:`` name)."""
    if config.preset not in PRESETS[config.task]:
        raise ValueError(f"unknown preset {config.preset!r}; choose one of {', '.join(PRESETS[config.task])}")
    for name in ("teacher_guidance_scale", "guidance_scale"):
        if not getattr(config, name) >= 1.0:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.latent_pool is None:
        config.latent_pool = get_preset(config.task, config.preset)["latent_pool"]
    if not (isinstance(config.latent_pool, int) and config.latent_pool >= 1):
        raise ValueError(f"latent_pool must be an integer >= 1, got {config.latent_pool!r}")
    if config.teacher_task is not None and config.teacher_task not in TEACHER_TASKS:
        raise ValueError(f"teacher_task must be one of {TEACHER_TASKS}, got {config.teacher_task!r}")
    if not str(config.teacher).startswith(PRETRAINED_PREFIX):
        config.teacher = str(Path(config.teacher).resolve())


def student_of(teacher: TextToImageModel, prediction_type: str, rng: np.random.Generator) -> TextToImageModel:
    """A student: a trainable copy of the teacher's U-Net (both methods start the student as the teacher), with
    the teacher's frozen text encoder, tokenizer, schedule and VAE, predicting ``prediction_type``."""
    unet = UNet2DConditionModel.from_config(teacher.unet.config, rng=rng)
    unet.load_state_dict(teacher.unet.state_dict())
    schedule = dict(teacher.schedule_config, prediction_type=prediction_type)
    return TextToImageModel(unet, teacher.text_encoder, teacher.tokenizer, schedule, teacher.vae)


class DistilledStudent:
    """What the distillation tasks share: the student samples and draws the prompts of its data task
    (``self.data_task``: the teacher's ``shapes`` or ``digits`` task), with ``config.guidance_scale``."""

    #: the sampler of previews and of ``make_sampler()`` without a name
    default_sampler = "lcm"

    def modules(self) -> dict[str, Module]:
        return self.model.modules()  # the student U-Net, the teacher's text encoder [and VAE]: samples on its own

    def make_sampler(self, name: str | None = None):
        return self.model.make_sampler(name or self.default_sampler)

    def preview_prompts(self, n: int) -> list[str]:
        return self.data_task.preview_prompts(n)

    def sample(self, sampler: str, steps: int, n: int, seed: int, progress: bool = False) -> np.ndarray:
        """``n`` images of the teacher's preview prompts, guided with ``config.guidance_scale`` (1: none)."""
        return self.model.generate(self.preview_prompts(n), sampler, steps, self.config.guidance_scale, seed,
                                   progress)

    def save_png(self, samples, path, title: str = "") -> None:
        self.data_task.save_png(samples, path, title)

    @classmethod
    def train_defaults_for(cls, config) -> dict:
        """TrainConfig defaults of ``config.preset``."""
        return get_preset(cls.name, config.preset)["train"]

    def _move(self, device: str, *frozen: Module) -> None:
        """The student (with the shared text encoder), the VAE and the ``frozen`` networks to ``device``."""
        for module in (self.model, *frozen):
            module.to(device)
        if self.model.vae is not None:
            self.model.vae.to(device)


def x0_output_coefficient(alpha_bar_t, prediction_type: str):
    """b of x0_pred = a x_t + b out, the derivative of the x0 estimate with respect to the network output.

    From :func:`~diffusion_np.diffusion.x0_and_eps_at`: "epsilon" -sqrt(1 - ab) / sqrt(ab), "sample" 1,
    "v_prediction" -sqrt(1 - ab). ``alpha_bar_t`` is a float or a (B,) array; so is the result.
    """
    ab = np.asarray(alpha_bar_t, dtype=np.float64)
    if prediction_type == "epsilon":
        return -np.sqrt(1.0 - ab) / np.sqrt(ab)
    if prediction_type == "sample":
        return np.ones_like(ab)
    if prediction_type == "v_prediction":
        return -np.sqrt(1.0 - ab)
    raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")


class LCMDistillTask(DistilledStudent):
    """Latent consistency distillation of a frozen text-to-image teacher (module docstring)."""

    name = "lcm"
    description = ("latent consistency distillation (LCM) of pretrained:shapes or pretrained:digits (--teacher): "
                   "a student that samples in 1-8 steps with --sampler lcm")
    Config = LCMDistillConfig
    train_defaults = PRESETS["lcm"]["full"]["train"]

    def __init__(self, config: LCMDistillConfig, rng: np.random.Generator) -> None:
        self.config = config
        try:
            checkpoint = load_checkpoint(config.teacher)
        except CheckpointError as err:
            raise CheckpointError(f"the teacher of lcm: {err}") from None
        kind = checkpoint.config.get("task")
        if kind not in TEACHER_TASKS:
            raise CheckpointError(f"the teacher {config.teacher} is a {kind!r} run; lcm distils "
                                  f"{' or '.join(TEACHER_TASKS)} models")
        if config.teacher_task not in (None, kind):
            raise CheckpointError(f"the teacher {config.teacher} is a {kind} model, the config says "
                                  f"{config.teacher_task}")
        config.teacher_task = kind
        self.teacher_task = self.data_task = task_from_checkpoint(checkpoint)  # the teacher's EMA weights, its data
        if kind == "shapes":
            self.teacher_task.config.latent_pool = config.latent_pool
        teacher = self.teacher_task.model
        teacher.unet.freeze().inference(True)  # forward only: no backward into the teacher
        teacher.text_encoder.freeze().inference(True)
        T = teacher.noise_schedule.num_train_timesteps
        if config.original_inference_steps > T:
            raise ValueError(f"original_inference_steps must be <= the teacher's {T} timesteps, "
                             f"got {config.original_inference_steps}")
        self.teacher = teacher
        self.model = student_of(teacher, teacher.prediction_type, rng)  # the teacher's U-Net copied (LCM Sec. 4.2)
        student = self.model.unet
        self.model.sampler_options["lcm"] = {"original_inference_steps": config.original_inference_steps,
                                             "timestep_scaling": config.timestep_scaling}
        # the EMA target network theta^-, starting at theta (step 8)
        self.target = UNet2DConditionModel.from_config(teacher.unet.config, rng=np.random.default_rng(0))
        self.target.load_state_dict(student.state_dict())
        self.target.freeze().inference(True)
        self._target_synced = True  # theta^- is current for the student's weights

    # ------------------------------------------------------------------ the target network
    def update_target(self) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta, in place (step 8)."""
        mu = self.config.target_decay
        student = dict(self.model.unet.named_parameters())
        for name, p in self.target.named_parameters():
            p *= mu
            p += (1.0 - mu) * student[name]

    def state_dict(self) -> dict:
        """The target network (the trainer keeps it in the checkpoint's training state)."""
        return {"target": self.target.state_dict(), "synced": int(self._target_synced)}

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])
        self._target_synced = bool(state["synced"])

    # ------------------------------------------------------------------ one step
    def grid(self) -> tuple[int, int]:
        """(k, N'): the skipping interval T // N' and the number of grid timesteps."""
        n = self.config.original_inference_steps
        return self.teacher.noise_schedule.num_train_timesteps // n, n

    def loss_and_backward(self, batch_size: int, rng: np.random.Generator) -> float:
        """Steps 1-7 of the module docstring (step 8 for the previous update first)."""
        c, teacher, unet = self.config, self.teacher, self.model.unet
        if not self._target_synced:
            self.update_target()  # 8. for the optimizer step that followed the last call
        self._target_synced = False
        ab = teacher.noise_schedule.alpha_bar
        device = self.model.device
        # 1. data and both captions: (c, "") through the frozen text encoder at once
        x0, captions = self.teacher_task._batch(batch_size, rng)  # (B, h, w, C) float32 on the host
        context = teacher.encode_text([""] * batch_size + list(captions))  # (2B, L, D): unconditional rows first
        context_c = context[batch_size:]  # (B, L, D), the student's and the target's condition
        # 2. t_{n+k} = k j - 1 on the grid, t_n = one skip lower (0 below the grid's first point)
        k, n_grid = self.grid()
        t_start = k * rng.integers(1, n_grid + 1, batch_size) - 1  # (B,)
        t_prev = np.maximum(t_start - k, 0)  # (B,)
        # 3. x_{t_{n+k}}
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        x0, eps = to_device(x0, device), to_device(eps, device)
        ts, tp = to_device(t_start, device), to_device(t_prev, device)
        x_t = q_sample(x0, ts, eps, ab)  # (B, h, w, C)
        xp = get_xp(x_t)
        # 4. the teacher's guided DDIM step t_{n+k} -> t_n (forward only)
        out = teacher.unet(xp.concatenate([x_t, x_t]), xp.concatenate([ts, ts]), context)  # (2B, h, w, C)
        guided = out[:batch_size] + c.teacher_guidance_scale * (out[batch_size:] - out[:batch_size])
        x0_g, eps_g = x0_and_eps(guided, x_t, ts, ab, teacher.prediction_type)
        x_prev = (broadcast_like(np.sqrt(ab[t_prev]), x_t) * x0_g
                  + broadcast_like(np.sqrt(1.0 - ab[t_prev]), x_t) * eps_g)  # DDIM Eq. 12, eta = 0
        # 5. the target f_{theta^-}(x_{t_n}, t_n)
        skip_n, out_n = (broadcast_like(v, x_t) for v in consistency_scalings(t_prev, c.timestep_scaling))
        x0_target = x0_and_eps(self.target(x_prev, tp, context_c), x_prev, tp, ab, teacher.prediction_type)[0]
        target = skip_n * x_prev + out_n * x0_target
        # 6. the student's f_theta(x_{t_{n+k}}, t_{n+k})
        skip, c_out = consistency_scalings(t_start, c.timestep_scaling)  # (B,) each
        out_s = unet(x_t, ts, context_c)
        pred = broadcast_like(skip, x_t) * x_t + broadcast_like(c_out, x_t) * x0_and_eps(
            out_s, x_t, ts, ab, teacher.prediction_type)[0]
        if c.loss == "huber":
            loss, cache = pseudo_huber_loss_forward(pred, target, c.huber_c)
            dpred = pseudo_huber_loss_backward(cache)
        else:
            loss, cache = mse_loss_forward(pred, target)
            dpred = mse_loss_backward(cache)
        # 7. d f / d out = c_out * d x0 / d out; through the student U-Net only (its text context is frozen)
        scale = c_out * x0_output_coefficient(ab[t_start], teacher.prediction_type)  # (B,)
        unet.backward(dpred * broadcast_like(scale, dpred))
        return float(asnumpy(loss))  # the one deliberate device -> host copy of a step

    # ------------------------------------------------------------------ pictures
    def save_preview(self, path, seed: int, title: str) -> None:
        preview = get_preset(self.name, self.config.preset)["preview"]
        samples = self.sample("lcm", preview["steps"], preview["n"], seed)
        self.save_png(samples, path, f"{title}, lcm {preview['steps']} steps")

    def to(self, device: str) -> LCMDistillTask:
        """The student, the target network, the teacher's U-Net (and the shared text encoder and VAE) to ``device``."""
        self._move(device, self.target, self.teacher.unet)
        return self

    @staticmethod
    def add_arguments(parser) -> None:
        s = argparse.SUPPRESS
        d = field_defaults(LCMDistillConfig)
        parser.add_argument("--teacher", metavar="DIR", default=s,
                            help=f"the frozen teacher: pretrained:shapes, pretrained:digits or a run of either "
                                 f"(default {d.teacher})")
        parser.add_argument("--preset", choices=tuple(PRESETS["lcm"]), default=s,
                            help=f"training schedule: tiny (seconds, tests), demo (minutes), full (the shipped "
                                 f"weights) (default {d.preset})")
        parser.add_argument("--teacher-guidance-scale", type=at_least_one, default=s, metavar="W",
                            help=f"the guidance weight of the teacher's step, distilled into the student "
                                 f"(default {d.teacher_guidance_scale})")
        parser.add_argument("--loss", choices=DISTILL_LOSSES, default=s,
                            help=f"distance between student and target (default {d.loss})")
        parser.add_argument("--huber-c", type=positive_float, default=s, metavar="C",
                            help=f"c of the pseudo-Huber loss (default {d.huber_c})")
        parser.add_argument("--target-decay", type=fraction, default=s, metavar="MU",
                            help=f"decay of the EMA target network (default {d.target_decay})")
        parser.add_argument("--original-inference-steps", type=nonnegative_int, default=s, metavar="N",
                            help=f"N', the DDIM grid; the skipping interval is T // N' "
                                 f"(default {d.original_inference_steps})")
        parser.add_argument("--latent-pool", type=nonnegative_int, default=s, metavar="N",
                            help="latent teachers: images encoded once, sampled for every batch "
                                 "(default: the preset's)")
