"""DDIM sampling: the non-Markovian reverse step of Song et al. 2021.

Implements "Denoising Diffusion Implicit Models" (DDIM), Eq. 12 with the noise
level of Eq. 16, with diffusers' ``DDIMScheduler`` keywords and defaults.
eta = 0 gives the deterministic DDIM sampler; eta = 1 the DDPM ancestral sampler
with its "fixed_small" posterior variance (REFERENCE pitfall 9; not "fixed_large").

DDIM Eq. 12, from x_t to x_prev (prev = the next entry of the timestep sequence)::

    x_prev = sqrt(alpha_bar_prev) * x0_pred                          "predicted x_0"
           + sqrt(1 - alpha_bar_prev - sigma_t^2) * eps_pred         "direction pointing to x_t"
           + sigma_t * z                                              "random noise", z ~ N(0, I)

    x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps_pred) / sqrt(alpha_bar_t)

DDIM Eq. 16, the noise level that interpolates between DDIM (eta = 0) and DDPM (eta = 1)::

    sigma_t(eta) = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_prev)

After the last step, alpha_bar_prev is 1 with ``set_alpha_to_one=True`` (x_0 is
clean, sigma = 0, so no noise is added), or alpha_bar[0] with False (Stable
Diffusion's config). In the second case Eq. 16 gives sigma > 0 on the last step
and, like diffusers, we add that noise when eta > 0: the step lands on the noise
level of timestep 0, not on clean data.

Which timestep a step goes to (``prev_timestep_rule``):

* ``"stride"`` (the default, diffusers' ``DDIMScheduler``): prev = t - T // N, the stride of
  "leading" spacing, whatever the spacing. Where every gap of the sequence is T // N
  ("leading", "trailing" when N divides T) that is the next entry of ``timesteps``. Where the
  gaps are uneven ("linspace", "trailing" with N not dividing T) a step lands on a noise level
  the sequence does not visit, and the next step is asked at its own timestep all the same;
  the last step of a sequence that ends at t >= T // N goes to alpha_bar[t - T // N], not to
  the final alpha_bar. This is the rule Stable Diffusion pipelines run with, so it is the default.
* ``"sequence"``: prev = the next entry of ``timesteps`` (the final alpha_bar after the last),
  which is what DDIM Eq. 12 means for a sub-sequence tau of [1, ..., T] (Song et al. Sec. 4.2):
  every step starts where the previous one ended (REFERENCE pitfall 1 calls ``t - T // N`` the
  shortcut that is wrong for uneven gaps). It differs from diffusers wherever the gaps are uneven (by 3e-3
  to 3e-1 relative on a sample, on the random configurations of the parity tests); with
  uniform gaps the two are the same.

``clip_sample=True`` (the diffusers default) is right for pixels in [-1, 1] and
wrong for latents (REFERENCE pitfall 6). With ``prediction_type="sample"`` or
``"v_prediction"`` eps_pred is recomputed from the prediction (pitfall 11);
``use_clipped_model_output=True`` recomputes it from the clipped x0_pred (GLIDE).

Code -> paper notation (as in diffusers' DDIM ``step``)::

    eps_pred        epsilon_theta^(t)(x_t)
    x0_pred         f_theta^(t)(x_t), "predicted x_0"
    std             sigma_t(eta)
    eta             eta
    direction       "direction pointing to x_t"
    prev_sample     x_{t-1} (x at the previous timestep of the sequence)

Left out: custom timestep lists, per-sample timesteps (DDIM inversion is :mod:`.ddim_inverse`).
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_np.diffusion import posterior_coefficients, x0_and_eps, x0_and_eps_at
from diffusion_np.samplers.base import ClipsX0, Sampler, StepOutput
from diffusion_np.samplers.timesteps import PREV_TIMESTEP_RULES


class DDIMSampler(ClipsX0, Sampler):
    """DDIM sampler (Song et al. 2021, Eq. 12 and 16), diffusers ``DDIMScheduler`` keywords.

    Parameters beyond :class:`~diffusion_np.samplers.base.Sampler`'s
    ----------------------------------------------------------------
    clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value
        As in :class:`~diffusion_np.samplers.ddpm.DDPMSampler` (:func:`~diffusion_np.samplers.base.clip_x0`).
    set_alpha_to_one : bool
        alpha_bar after the last step: 1 (True, the paper) or alpha_bar[0] (False, Stable Diffusion).
    prev_timestep_rule : "stride" | "sequence"
        Where a step goes: t - T // N ("stride", diffusers') or the next entry of ``timesteps``
        ("sequence", the paper's sub-sequence); see the module docstring for where they differ.
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
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        prev_timestep_rule: str = "stride",
    ) -> None:
        if prev_timestep_rule not in PREV_TIMESTEP_RULES:
            raise ValueError(f"prev_timestep_rule must be one of {PREV_TIMESTEP_RULES}, got {prev_timestep_rule!r}")
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            prediction_type, timestep_spacing, steps_offset, rescale_betas_zero_snr,
        )  # fmt: skip
        self._keep_clip_config(
            clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value
        )
        self.set_alpha_to_one = set_alpha_to_one
        self.prev_timestep_rule = prev_timestep_rule

    @property
    def final_alpha_bar(self) -> float:
        """alpha_bar after the last step: 1 or alpha_bar[0], by ``set_alpha_to_one``."""
        return 1.0 if self.set_alpha_to_one else float(self.alpha_bar[0])

    def previous_timestep(self, t) -> int:
        """The timestep the step at t goes to, by ``prev_timestep_rule``; negative after the last step."""
        if self.prev_timestep_rule == "sequence":
            return super().previous_timestep(t)
        self._position(t)  # t must be one of the timesteps all the same
        return int(t) - self.num_train_timesteps // self.num_inference_steps

    def alpha_bar_prev(self, t) -> float:
        """alpha_bar at ``previous_timestep(t)``, or ``final_alpha_bar`` where that is negative."""
        prev_t = self.previous_timestep(t)
        return float(self.alpha_bar[prev_t]) if prev_t >= 0 else self.final_alpha_bar

    def variance(self, t) -> float:
        """sigma_t^2 / eta^2 of DDIM Eq. 16 for the step t -> prev: (1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev).

        That is DDPM's posterior variance beta tilde of the jump (DDPM Eq. 7, DDPM's fixed_small):
        :func:`~diffusion_np.diffusion.posterior_coefficients`.
        """
        return posterior_coefficients(float(self.alpha_bar[int(t)]), self.alpha_bar_prev(t)).variance

    def step(
        self,
        model_output,
        t,
        sample,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        noise=None,
        rng: np.random.Generator | None = None,
    ) -> StepOutput:
        """One DDIM step x_t -> x_prev (Eq. 12).

        Parameters
        ----------
        model_output : array (B, ..., C)
            The network's output at (sample, t), of this sampler's ``prediction_type``.
        t : int
            The current timestep, an entry of ``self.timesteps``.
        sample : array (B, ..., C)
            x_t.
        eta : float >= 0
            Noise weight of Eq. 16: 0 deterministic DDIM, 1 DDPM-like.
        use_clipped_model_output : bool
            Recompute eps_pred from the clipped x0_pred.
        noise : array like ``sample``, optional
            z; drawn from ``rng`` (host side) when not given. Used only when sigma_t > 0.
        rng : numpy Generator, optional

        Returns
        -------
        StepOutput(prev_sample=x_prev, pred_original_sample=x0_pred after clipping)
        """
        self._require_timesteps()
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self._check_output(model_output, sample)
        t = int(t)

        # 1. the previous timestep: t - T // N, or the next entry of the sequence (module docstring)
        ab_t = float(self.alpha_bar[t])
        ab_prev = self.alpha_bar_prev(t)

        # 2. x0_pred and eps_pred from the model output (eps recomputed for "sample"/v: pitfall 11)
        x0_pred, eps_pred = x0_and_eps(model_output, sample, t, self.alpha_bar, self.prediction_type)

        # 3. clip or threshold x0_pred (wrong for latents: pitfall 6)
        x0_pred = self._clip(x0_pred)

        # 4. sigma_t(eta), Eq. 16
        std = eta * math.sqrt(posterior_coefficients(ab_t, ab_prev).variance)
        if use_clipped_model_output:  # eps consistent with the clipped x0 (GLIDE): x0 read as a "sample" output
            eps_pred = x0_and_eps_at(x0_pred, sample, math.sqrt(ab_t), math.sqrt(1.0 - ab_t), "sample")[1]

        # 5. "direction pointing to x_t", Eq. 12; its coefficient is real for eta <= 1
        dir_var = 1.0 - ab_prev - std**2
        if dir_var < -1e-12:  # beyond rounding (eta = 1 with alpha_bar_t = 0 gives 0 up to ~1e-16)
            raise ValueError(
                f"eta={eta} is too large at t={t}: 1 - alpha_bar_prev - sigma_t^2 = {dir_var:.3g} < 0 (use eta <= 1)"
            )
        direction = math.sqrt(max(dir_var, 0.0)) * eps_pred

        # 6. x_prev without noise, Eq. 12
        prev_sample = math.sqrt(ab_prev) * x0_pred + direction

        # 7. add sigma_t z (none when sigma_t = 0: eta = 0, or the last step with set_alpha_to_one)
        if std > 0:
            prev_sample = prev_sample + std * self._noise_like(sample, noise, rng)
        return StepOutput(prev_sample, x0_pred)
