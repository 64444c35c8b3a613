"""Progressive distillation (Salimans & Ho 2022): each round halves the number of sampling steps.

The ``progressive`` task (``diffusion-np distill progressive --teacher pretrained:shapes --student-steps 16
--out runs/pd-16``, then ``--teacher runs/pd-16 --student-steps 8`` and so on). A frozen teacher
sampled with 2N deterministic DDIM steps is matched by a student that takes N: one student step
learns to land where two teacher steps land (Salimans & Ho 2022, Algorithm 2)::

    1. (x, caption) ~ data;  i ~ U{1..N}
    2. t = t_i, t' = the teacher's midpoint, t'' = t_{i-1}   (the 2N- and N-step "trailing" grids:
       t_i = round(i T / N) - 1, t' = round((2i - 1) T / 2N) - 1; t_0 = -1 is clean data, alpha = 1)
    3. z_t = alpha_t x + sigma_t eps
    4. two DDIM steps of the teacher (guided with w in the first round, where the teacher is the base
       model; a distilled teacher samples without guidance):
         z_t'  = alpha_t'  x_hat(z_t)  + sigma_t'  eps_hat(z_t)
         z_t'' = alpha_t'' x_hat(z_t') + sigma_t'' eps_hat(z_t')
    5. the student's target: the x whose single DDIM step from z_t lands on z_t''
         x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)
    6. loss = max(SNR_t, 1) || x~ - x_hat_theta(z_t) ||^2          ("truncated SNR" weighting, Sec. 4)
    7. backward through the student only: d x_hat / d out (v-prediction: -sigma_t)

alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t). The student predicts v
(``prediction_type="v_prediction"``, Salimans & Ho Sec. 4): at a handful of steps the first
step starts at SNR ~ 0, where an epsilon prediction says nothing about x (x = (z - sigma eps) / alpha
divides by alpha ~ 0) and v = alpha eps - sigma x still does. The student starts from the teacher's
weights (the first round's teacher predicts epsilon, so its output is read anew, and the first
steps re-learn what it means). Each round is one run; its student is the next round's teacher.
The student samples with :class:`~diffusion_np.samplers.DDIMSampler` on the trailing grid
(``prev_timestep_rule="sequence"``, ``set_alpha_to_one=True``): ``--sampler ddim --steps N``.

Left out: the paper's cosine schedule and continuous time (we keep the teacher's discrete
schedule), the stochastic sampler, and distilling the guidance weight as a condition (Meng et al. 2023).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from diffusion_np.backend import asnumpy, get_xp, to_device
from diffusion_np.diffusion import broadcast_like, q_sample, x0_and_eps
from diffusion_np.io.checkpoint import CheckpointError, load_checkpoint
from diffusion_np.nn.losses import mse_loss_backward, mse_loss_forward
from diffusion_np.pretrained import PREFIX as PRETRAINED_PREFIX
from diffusion_np.training.argtypes import at_least_one, field_defaults, nonnegative_int, positive_int
from diffusion_np.training.distill import (
    TEACHER_TASKS,
    DistilledStudent,
    check_distill_config,
    student_of,
    x0_output_coefficient,
)
from diffusion_np.training.presets import PRESETS, get_preset
from diffusion_np.training.trainer import task_from_checkpoint

__all__ = ["ProgressiveConfig", "ProgressiveDistillTask", "halving_grid"]

#: how a progressive student samples: DDIM on the trailing grid it was distilled on
STUDENT_DDIM = {"timestep_spacing": "trailing", "prev_timestep_rule": "sequence", "set_alpha_to_one": True}


def halving_grid(i, n: int, T: int):
    """(t, t', t'') of step 2 for student step i in 1..N (ints or arrays): the N-step trailing grid and the
    2N-step one's midpoint; t'' = -1 (clean data) for i = 1."""
    i = np.asarray(i)
    t = np.round(i * T / n).astype(np.int64) - 1
    t_mid = np.round((2 * i - 1) * T / (2 * n)).astype(np.int64) - 1
    t_next = np.round((i - 1) * T / n).astype(np.int64) - 1
    return t, t_mid, t_next


@dataclass
class ProgressiveConfig:
    """Everything that rebuilds a :class:`ProgressiveDistillTask`.

    ``teacher``: ``pretrained:shapes`` / ``pretrained:digits`` / a run of either (the first round, sampled with
    2N guided DDIM steps) or a ``progressive`` run with 2N steps (a later round, no guidance).
    ``student_steps``: N. ``teacher_guidance_scale``: w of a base teacher's steps. ``guidance_scale``: what the
    student samples with (1: none). ``teacher_task``: the root data task, filled from the teacher.
    """

    teacher: str = PRETRAINED_PREFIX + "shapes"
    student_steps: int = 16
    preset: str = "full"
    teacher_guidance_scale: float = 4.0
    guidance_scale: float = 1.0
    prediction_type: str = "v_prediction"
    latent_pool: int | None = None
    teacher_task: str | None = None

    task = "progressive"

    def __post_init__(self) -> None:
        check_distill_config(self)
        if not (isinstance(self.student_steps, int) and self.student_steps >= 1):
            raise ValueError(f"student_steps must be an integer >= 1, got {self.student_steps!r}")
        if self.prediction_type not in ("v_prediction", "epsilon", "sample"):
            raise ValueError(f"prediction_type must be 'v_prediction', 'epsilon' or 'sample', "
                             f"got {self.prediction_type!r}")


class ProgressiveDistillTask(DistilledStudent):
    """One round of progressive distillation: a student with N steps from a teacher with 2N (module docstring)."""

    name = "progressive"
    description = ("progressive distillation (Salimans & Ho 2022): one round halves the steps; a v-prediction "
                   "student of --teacher (pretrained:shapes, or the previous round's run)")
    Config = ProgressiveConfig
    train_defaults = PRESETS["progressive"]["full"]["train"]
    default_sampler = "ddim"  # on the trailing grid it was distilled on (STUDENT_DDIM)

    def __init__(self, config: ProgressiveConfig, rng: np.random.Generator) -> None:
        self.config = config
        try:
            checkpoint = load_checkpoint(config.teacher)
        except CheckpointError as err:
            raise CheckpointError(f"the teacher of progressive: {err}") from None
        kind = checkpoint.config.get("task")
        if kind not in (*TEACHER_TASKS, "progressive"):
            raise CheckpointError(f"the teacher {config.teacher} is a {kind!r} run; progressive distils "
                                  f"{', '.join(TEACHER_TASKS)} models or a progressive round")
        teacher_task = task_from_checkpoint(checkpoint)
        if kind == "progressive":  # a later round: the teacher is the last student, sampled as it was trained
            if teacher_task.config.student_steps != 2 * config.student_steps:
                raise CheckpointError(f"the teacher {config.teacher} samples in {teacher_task.config.student_steps} "
                                      f"steps; a round halves them, so --student-steps must be "
                                      f"{teacher_task.config.student_steps // 2}")
            self.data_task, self.teacher_w = teacher_task.data_task, teacher_task.config.guidance_scale
        else:
            self.data_task, self.teacher_w = teacher_task, config.teacher_guidance_scale
        root = self.data_task.name
        if config.teacher_task not in (None, root):
            raise CheckpointError(f"the teacher {config.teacher} learned {root}, the config says {config.teacher_task}")
        config.teacher_task = root
        if root == "shapes":
            self.data_task.config.latent_pool = config.latent_pool
        teacher = teacher_task.model
        teacher.unet.freeze().inference(True)
        teacher.text_encoder.freeze().inference(True)
        self.teacher = teacher
        self.model = student_of(teacher, config.prediction_type, rng)  # Salimans & Ho: it starts as the teacher
        self.model.sampler_options["ddim"] = dict(STUDENT_DDIM)

    def _teacher_ddim(self, z, t, t_next, context_u, context_c):
        """One deterministic DDIM step of the teacher from z at t to t_next (per-sample arrays; -1: clean),
        guided with ``teacher_w`` when it is > 1."""
        teacher, ab = self.teacher, self.teacher.noise_schedule.alpha_bar
        xp, td = get_xp(z), to_device(t, self.model.device)
        if self.teacher_w > 1.0:
            out = teacher.unet(xp.concatenate([z, z]), xp.concatenate([td, td]),
                               xp.concatenate([context_u, context_c]))  # (2B, h, w, C)
            B = z.shape[0]
            out = out[:B] + self.teacher_w * (out[B:] - out[:B])
        else:
            out = teacher.unet(z, td, context_c)
        x_hat, eps_hat = x0_and_eps(out, z, td, ab, teacher.prediction_type)
        ab_next = np.where(t_next >= 0, ab[np.maximum(t_next, 0)], 1.0)  # (B,); alpha = 1 on clean data
        return broadcast_like(np.sqrt(ab_next), z) * x_hat + broadcast_like(np.sqrt(1.0 - ab_next), z) * eps_hat

    def loss_and_backward(self, batch_size: int, rng: np.random.Generator) -> float:
        """Steps 1-7 of the module docstring."""
        n, unet = self.config.student_steps, self.model.unet
        ab = self.teacher.noise_schedule.alpha_bar
        T = len(ab)
        device = self.model.device
        # 1. data, both captions through the frozen text encoder
        x0, captions = self.data_task._batch(batch_size, rng)
        context = self.teacher.encode_text([""] * batch_size + list(captions))  # (2B, L, D)
        context_u, context_c = context[:batch_size], context[batch_size:]
        # 2. the student's step i and the teacher's two steps t -> t' -> t''
        t, t_mid, t_next = halving_grid(rng.integers(1, n + 1, batch_size), n, T)  # (B,) each
        # 3. z_t
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        x0, eps, td = to_device(x0, device), to_device(eps, device), to_device(t, device)
        z_t = q_sample(x0, td, eps, ab)
        # 4. two teacher steps (forward only)
        z_mid = self._teacher_ddim(z_t, t, t_mid, context_u, context_c)
        z_next = self._teacher_ddim(z_mid, t_mid, t_next, context_u, context_c)
        # 5. the x whose one DDIM step from z_t lands on z_t''
        alpha, sigma = np.sqrt(ab[t]), np.sqrt(1.0 - ab[t])  # (B,)
        ab_next = np.where(t_next >= 0, ab[np.maximum(t_next, 0)], 1.0)
        alpha_n, sigma_n = np.sqrt(ab_next), np.sqrt(1.0 - ab_next)
        ratio = sigma_n / sigma
        target = (z_next - broadcast_like(ratio, z_t) * z_t) / broadcast_like(alpha_n - ratio * alpha, z_t)
        # 6. the student's x estimate, truncated-SNR weights max(SNR_t, 1)
        out = unet(z_t, td, context_c)
        x_hat = x0_and_eps(out, z_t, td, ab, self.config.prediction_type)[0]
        weights = np.maximum(ab[t] / (1.0 - ab[t]), 1.0).astype(np.float32)  # (B,)
        loss, cache = mse_loss_forward(x_hat, target, to_device(weights, device))
        # 7. d x_hat / d out, into the student only
        dx = mse_loss_backward(cache)
        unet.backward(dx * broadcast_like(x0_output_coefficient(ab[t], self.config.prediction_type), dx))
        return float(asnumpy(loss))  # the one deliberate device -> host copy of a step

    # ------------------------------------------------------------------ pictures
    def save_preview(self, path, seed: int, title: str) -> None:
        preview = get_preset(self.name, self.config.preset)["preview"]
        steps = self.config.student_steps
        self.save_png(self.sample("ddim", steps, preview["n"], seed), path, f"{title}, ddim {steps} steps")

    def to(self, device: str) -> ProgressiveDistillTask:
        """The student, the teacher's U-Net (and the shared text encoder and VAE) to ``device``."""
        self._move(device, self.teacher.unet)
        return self

    @staticmethod
    def add_arguments(parser) -> None:
        s = argparse.SUPPRESS
        d = field_defaults(ProgressiveConfig)
        parser.add_argument("--teacher", metavar="DIR", default=s,
                            help=f"the frozen teacher: pretrained:shapes / pretrained:digits (first round) or the "
                                 f"previous round's run (default {d.teacher})")
        parser.add_argument("--student-steps", type=positive_int, default=s, metavar="N",
                            help=f"the student's steps, half the teacher's (default {d.student_steps})")
        parser.add_argument("--preset", choices=tuple(PRESETS["progressive"]), default=s,
                            help=f"training schedule of the round: tiny (tests), demo, full (default {d.preset})")
        parser.add_argument("--teacher-guidance-scale", type=at_least_one, default=s, metavar="W",
                            help=f"guidance of a base teacher's steps, distilled into the student "
                                 f"(default {d.teacher_guidance_scale})")
        parser.add_argument("--latent-pool", type=nonnegative_int, default=s, metavar="N",
                            help="latent teachers: images encoded once, sampled for every batch "
                                 "(default: the preset's)")
