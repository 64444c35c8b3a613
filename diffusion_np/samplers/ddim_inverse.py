"""DDIM inversion: run the deterministic DDIM update backwards, from an image to its noise.

DDIM with eta = 0 (Song et al. 2021, Eq. 12) is a discretised ODE (their Eq. 14): each step
maps x_t to x_prev by a deterministic function. Read the other way round, the same update
carries a clean x_0 up to a noise x_T that DDIM sampling brings back to (nearly) x_0. This
is the first step of real-image editing (prompt-to-prompt, null-text inversion): invert
the photograph, then sample again with an edited prompt.

One inversion step, from the less noisy level s to the noisier level t (s < t)::

    eps      = eps_theta(x_s, t)                                  the model, asked at the target t
    x0_pred  = (x_s - sqrt(1 - alpha_bar_s) eps) / sqrt(alpha_bar_s)
    x_t      = sqrt(alpha_bar_t) x0_pred + sqrt(1 - alpha_bar_t) eps            DDIM Eq. 12, eta = 0

It is exact only if eps_theta(x_s, t) equals the eps the forward DDIM step will see at
(x_t, t): the approximation "eps barely changes over one step" that makes many steps
better than few. Classifier-free guidance breaks it further: the guided eps
eps_u + w (eps_c - eps_u) is not the derivative of any one ODE's trajectory through x_s
and x_t, and its error grows with w, which is why editing methods invert with w = 1 and
then repair the unconditional branch (Mokady et al. 2023, null-text inversion).

Timesteps and levels, as diffusers' ``DDIMInverseScheduler`` (whose keywords and defaults
this class takes)::

    timesteps   the DDIM sequence in increasing order (leading or trailing spacing)
    level s     t - T // N: the noise level the sample is at before the step at t;
                s < 0 (the first step) is alpha_bar = 1 with ``set_alpha_to_one=True``
                (a clean image), alpha_bar[0] otherwise

so the step at t lands on alpha_bar_t, and the last step on the last (noisiest) timestep.
With ``clip_sample=True`` (the default, for pixels in [-1, 1]) x0_pred is clipped, as in
DDIM; switch it off for latents (REFERENCE pitfall 6).

Left out: "linspace" spacing (diffusers' inverse scheduler has none), thresholding, eta > 0
(stochastic inversion is not an inverse).
"""

from __future__ import annotations

import math

from diffusion_np.diffusion import x0_and_eps_at
from diffusion_np.samplers.base import ClipsX0, Sampler, StepOutput

#: the spacings diffusers' DDIMInverseScheduler offers
INVERSE_SPACINGS = ("leading", "trailing")


class DDIMInverseSampler(ClipsX0, Sampler):
    """DDIM inversion (Song et al. 2021, Eq. 12 with eta = 0, stepped upwards), diffusers
    ``DDIMInverseScheduler`` keywords. ``step`` returns the noisier sample as ``prev_sample``
    (diffusers' name), so :func:`diffusion_np.samplers.loop.denoise` runs it unchanged.

    Parameters beyond :class:`~diffusion_np.samplers.base.Sampler`'s
    ----------------------------------------------------------------
    clip_sample, clip_sample_range
        Clip x0_pred to [-range, range] (pixels); off for latents.
    set_alpha_to_one : bool
        alpha_bar before the first step: 1 (True: the input is a clean image) or alpha_bar[0].
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        if timestep_spacing not in INVERSE_SPACINGS:
            raise ValueError(
                f"timestep_spacing must be one of {INVERSE_SPACINGS} for DDIM inversion, got {timestep_spacing!r}"
            )
        if prediction_type == "sample" and set_alpha_to_one:
            # the first step starts at alpha_bar = 1, where eps = (x - x0) / sqrt(1 - alpha_bar) is 0 / 0
            # (diffusers returns NaN there)
            raise ValueError(
                "prediction_type='sample' cannot start from alpha_bar = 1: a clean image says nothing about "
                "eps; use set_alpha_to_one=False, or an epsilon / v_prediction model"
            )
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            prediction_type, timestep_spacing, steps_offset, rescale_betas_zero_snr,
        )  # fmt: skip
        self._keep_clip_config(clip_sample, clip_sample_range)
        self.set_alpha_to_one = bool(set_alpha_to_one)

    @classmethod
    def from_sampler(cls, sampler: Sampler, **overrides) -> DDIMInverseSampler:
        """The inverse of a forward sampler: same schedule, prediction type, spacing and offset.

        ``linspace`` spacing becomes ``trailing`` (the same first and last timestep, evenly spaced).
        """
        spacing = sampler.timestep_spacing if sampler.timestep_spacing in INVERSE_SPACINGS else "trailing"
        config = dict(
            num_train_timesteps=sampler.num_train_timesteps,
            trained_betas=sampler.schedule.betas,
            prediction_type=sampler.prediction_type,
            timestep_spacing=spacing,
            steps_offset=sampler.steps_offset,
            clip_sample=getattr(sampler, "clip_sample", False),
            clip_sample_range=getattr(sampler, "clip_sample_range", 1.0),
            set_alpha_to_one=getattr(sampler, "set_alpha_to_one", True),
        )
        config.update(overrides)
        return cls(**config)

    @property
    def initial_alpha_bar(self) -> float:
        """alpha_bar before the first step: 1 or alpha_bar[0], by ``set_alpha_to_one``."""
        return 1.0 if self.set_alpha_to_one else float(self.alpha_bar[0])

    def set_timesteps(self, num_inference_steps: int) -> None:
        """The DDIM sequence in increasing order (``self.timesteps``)."""
        super().set_timesteps(num_inference_steps)
        self.timesteps = self.timesteps[::-1].copy()

    def source_level(self, t) -> int:
        """s = t - T // N, the timestep whose noise level the sample is at before the step at t (< 0: none)."""
        self._require_timesteps()
        return int(t) - self.num_train_timesteps // self.num_inference_steps

    def step(self, model_output, t, sample, noise=None, rng=None) -> StepOutput:
        """One inversion step x_s -> x_t (module docstring); ``noise`` and ``rng`` are ignored.

        Parameters
        ----------
        model_output : array (B, ..., C)
            The network's output at (sample, t), of this sampler's ``prediction_type``.
        t : int
            The target timestep, an entry of ``self.timesteps``.
        sample : array (B, ..., C)
            x_s, at the level before t.

        Returns
        -------
        StepOutput(prev_sample=x_t (noisier), pred_original_sample=x0_pred after clipping)
        """
        self._require_timesteps()
        self._check_output(model_output, sample)
        t = int(t)
        if t not in self.timesteps:
            raise ValueError(f"timestep {t} is not in this sampler's timesteps {self.timesteps.tolist()}")
        # 1. the two levels: from s = t - T // N (clamped as diffusers does) up to t
        s = min(self.source_level(t), self.num_train_timesteps - 1)
        ab_s = float(self.alpha_bar[s]) if s >= 0 else self.initial_alpha_bar
        ab_t = float(self.alpha_bar[t])

        # 2. x0_pred and eps_pred at level s
        x0_pred, eps_pred = x0_and_eps_at(model_output, sample, math.sqrt(ab_s), math.sqrt(1.0 - ab_s),
                                          self.prediction_type)  # fmt: skip

        # 3. clip x0_pred (pixels only: pitfall 6)
        x0_pred = self._clip(x0_pred)

        # 4. DDIM Eq. 12 with eta = 0, towards level t
        next_sample = math.sqrt(ab_t) * x0_pred + math.sqrt(1.0 - ab_t) * eps_pred
        return StepOutput(next_sample, x0_pred)
