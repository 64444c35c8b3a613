"""DDPM ancestral sampling: one step of the learned reverse process p(x_{t_prev} | x_t).

Implements the sampler of Ho et al. 2020, "Denoising Diffusion Probabilistic
Models" (DDPM), Algorithm 2, with the learned-variance option of Nichol &
Dhariwal 2021 ("Improved DDPM", Eq. 15), x0 clipping, and the dynamic
thresholding of Saharia et al. 2022 (Imagen, Sec. 2.3). Keyword names and
defaults are those of diffusers' ``DDPMScheduler``, so configs port as they are.

DDPM Algorithm 2 (paper indices t = T..1; ours are 0-based, t = T-1..0)::

    1: x_T ~ N(0, I)
    2: for t = T, ..., 1 do
    3:     z ~ N(0, I) if t > 1, else z = 0
    4:     x_{t-1} = mean_theta(x_t, t) + sigma_t z
    5: end for
    6: return x_0

We write the mean through the model's estimate of x_0 instead of Eq. 11's eps
form: it is the same number, and it lets x_0 be clipped first. With fewer
inference steps than training steps, "t-1" becomes the previous entry of the
timestep sequence (``t_prev``; REFERENCE pitfall 5), and the one-step betas are
replaced by those of the jump t -> t_prev::

    beta'_t  = 1 - alpha_bar_t / alpha_bar_prev              (= beta_t when t_prev = t - 1)
    alpha_bar_prev = alpha_bar[t_prev], or 1 after the last step (t_prev = -1)

Posterior q(x_{t_prev} | x_t, x_0) = N(mean, var) (DDPM Eq. 6 and 7; computed once, in
:func:`diffusion_np.diffusion.posterior_mean_variance`, and evaluated here at x_0 = x0_pred)::

    mean = sqrt(alpha_bar_prev) beta'_t / (1 - alpha_bar_t)       * x_0
         + sqrt(alpha_bar_t / alpha_bar_prev) (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t
    var  = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta'_t     ("fixed_small", beta tilde)

Variance choices (``variance_type``; DDPM Sec. 3.2 found both fixed ones work)::

    "fixed_small"    var = beta tilde (the true posterior variance), floored at 1e-20
    "fixed_large"    var = beta'_t
    "learned_range"  Improved DDPM Eq. 15: the model outputs v in [-1, 1] per element,
                     log var = f log beta'_t + (1 - f) log beta tilde,  f = (v + 1) / 2
    "learned"        the model outputs the variance itself

With a learned variance the network predicts twice the channels: the first half
is the eps/x0/v prediction, the second half v. We are channels-last, so the
halves are split on the LAST axis: model output (B, H, W, 2C) for a sample
(B, H, W, C) (diffusers, channels-first, splits axis 1).

The noise added is std * z with std = sqrt(var) (REFERENCE pitfall 10: var is not
the std). When, by ``clean_last_step``:

* False (the default, diffusers' ``DDPMScheduler``): at every step with t > 0, Algorithm 2
  line 3 read literally (z = 0 only at paper t = 1, our t = 0). A sequence that ends at t > 0
  ("trailing" spacing, ``steps_offset`` > 0) then gets noise on its last step too: of
  variance beta'_t = 1 - alpha_bar_t with "fixed_large", an interpolation towards it with
  "learned_range", and 1e-20 (the floor, std 1e-10) with "fixed_small".
* True: never on the last step of the sequence, whatever its t. That step goes to x_0
  (alpha_bar_prev = 1), where the posterior q(x_0 | x_t, x_0) is a point mass, so the
  sample ends on the mean, clean. It differs from diffusers only where the sequence ends
  at t > 0, by up to sqrt(1 - alpha_bar_t) z there.

``clip_sample=True`` (diffusers' default) clips the x_0 estimate to
[-clip_sample_range, clip_sample_range]: right for pixels in [-1, 1], wrong for
Stable Diffusion's latents, whose values routinely exceed 1 (REFERENCE pitfall 6):
pass ``clip_sample=False`` there.

Code -> paper notation::

    alpha_bar_t, alpha_bar_prev   bar{alpha}_t, bar{alpha}_{t-1}
    beta_t (local)                beta_t of the jump t -> t_prev (beta'_t above)
    x0_pred                       hat{x}_0 = f_theta(x_t, t) (DDPM Eq. 15 solved for x_0)
    coef_x0, coef_xt              the two coefficients of tilde{mu}_t in Eq. 7
    var, std                      sigma_t^2, sigma_t
    noise                         z

Left out: diffusers' "fixed_small_log" and "fixed_large_log" variants (RL and
GLIDE specific), custom timestep lists, batches with a different t per sample.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_np.backend import get_xp
from diffusion_np.diffusion import posterior_coefficients, posterior_mean_variance, x0_and_eps
from diffusion_np.samplers.base import ClipsX0, Sampler, StepOutput

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range", "learned")


class DDPMSampler(ClipsX0, Sampler):
    """Ancestral DDPM sampler (DDPM Algorithm 2), diffusers ``DDPMScheduler`` keywords.

    Parameters beyond :class:`~diffusion_np.samplers.base.Sampler`'s
    ----------------------------------------------------------------
    variance_type : "fixed_small" | "fixed_large" | "learned_range" | "learned"
    clip_sample : bool
        Clip x0_pred to [-clip_sample_range, clip_sample_range]. Default True as in
        diffusers; set False for latent diffusion (REFERENCE pitfall 6).
    clip_sample_range : float
    thresholding : bool
        Dynamic thresholding (Imagen) instead of clipping; needs pixel-space x0.
    dynamic_thresholding_ratio, sample_max_value : float
        The quantile and the largest threshold s of :func:`~diffusion_np.samplers.base.dynamic_threshold`.
    clean_last_step : bool
        False (diffusers): noise at every step with t > 0; True: none on the last step of the
        sequence, whatever its t (see the module docstring).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        clean_last_step: bool = False,
    ) -> None:
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            prediction_type, timestep_spacing, steps_offset, rescale_betas_zero_snr,
        )  # fmt: skip
        if not isinstance(clean_last_step, (bool, np.bool_)):
            raise TypeError(f"clean_last_step must be True or False, got {clean_last_step!r}")
        self.clean_last_step = bool(clean_last_step)
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        self._keep_clip_config(
            clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value
        )
        self.variance_type = variance_type

    def alpha_bar_prev(self, t) -> float:
        """alpha_bar at the step after t in the sequence; 1 after the last step (x_0 is clean)."""
        prev_t = self.previous_timestep(t)
        return float(self.alpha_bar[prev_t]) if prev_t >= 0 else 1.0

    def variance(self, t, predicted_variance=None):
        """sigma_t^2 of the step t -> t_prev for this sampler's ``variance_type``.

        A float for the fixed types; an array like ``predicted_variance`` for the
        learned ones. ``fixed_small`` is floored at 1e-20, as diffusers does, so that
        its log (used by learned_range) stays finite at the last step, where it is 0.
        """
        t = int(t)
        # DDPM Eq. 7 for the jump t -> t_prev: beta tilde and beta'_t = 1 - alpha_bar_t / alpha_bar_prev
        posterior = posterior_coefficients(float(self.alpha_bar[t]), self.alpha_bar_prev(t))
        beta_t = posterior.beta
        var_small = max(posterior.variance, 1e-20)  # beta tilde, floored at 1e-20 (it is 0 at the last step)
        if self.variance_type == "fixed_small":
            return var_small
        if self.variance_type == "fixed_large":
            return beta_t
        if predicted_variance is None:
            raise ValueError(f"variance_type={self.variance_type!r} needs the model's predicted variance")
        if self.variance_type == "learned":
            return predicted_variance
        # learned_range, Improved DDPM Eq. 15: interpolate between the two fixed choices in log space
        xp = get_xp(predicted_variance)
        frac = (predicted_variance + 1.0) / 2.0
        return xp.exp(frac * math.log(beta_t) + (1.0 - frac) * math.log(var_small))

    def step(self, model_output, t, sample, noise=None, rng: np.random.Generator | None = None) -> StepOutput:
        """One ancestral step x_t -> x_{t_prev} (DDPM Algorithm 2, lines 3-4).

        Parameters
        ----------
        model_output : array (B, ..., C), or (B, ..., 2C) with a learned variance
            The network's output at (sample, t), of this sampler's ``prediction_type``.
        t : int
            The current timestep, an entry of ``self.timesteps``.
        sample : array (B, ..., C)
            x_t.
        noise : array like ``sample``, optional
            z for this step; drawn from ``rng`` (host side) when not given. Unused where no noise is added.
        rng : numpy Generator, optional

        Returns
        -------
        StepOutput(prev_sample=x_{t_prev}, pred_original_sample=x0_pred after clipping)
        """
        self._require_timesteps()
        model_output, predicted_variance = self._split_output(model_output, sample)

        # 1. the previous timestep: the next entry of the sequence, not t - 1 (pitfall 5); -1 after the last
        t = int(t)
        prev_t = self.previous_timestep(t)

        # 2. x0_pred from the model output (DDPM Eq. 15 for eps; directly for "sample"; Salimans & Ho for v)
        x0_pred, _ = x0_and_eps(model_output, sample, t, self.alpha_bar, self.prediction_type)

        # 3. clip or threshold x0_pred (wrong for latents: pitfall 6)
        x0_pred = self._clip(x0_pred)

        # 4. posterior mean tilde{mu}_t(x_t, x0_pred) of q(x_{t_prev} | x_t, x0_pred), DDPM Eq. 7
        mean = posterior_mean_variance(x0_pred, sample, t, self.alpha_bar, t_prev=prev_t).mean

        # 5. add sigma_t z where t > 0 (Algorithm 2 line 3), or on every step but the last with
        #    clean_last_step (pitfall 10: std = sqrt(var))
        if t == 0 or (self.clean_last_step and prev_t < 0):
            return StepOutput(mean, x0_pred)
        z = self._noise_like(sample, noise, rng)
        var = self.variance(t, predicted_variance)
        std = get_xp(var).sqrt(var) if not isinstance(var, float) else math.sqrt(var)
        return StepOutput(mean + std * z, x0_pred)

    def _split_output(self, model_output, sample):
        """(prediction, predicted variance or None), splitting 2C output channels on the last axis."""
        C = sample.shape[-1]
        learned = self.variance_type in ("learned", "learned_range")
        expected = tuple(sample.shape[:-1]) + ((2 * C,) if learned else (C,))
        if tuple(model_output.shape) != expected:
            why = f"twice the sample's {C} channels on the last axis for variance_type={self.variance_type!r}"
            raise ValueError(
                f"DDPMSampler.step: model_output must have shape {expected} "
                f"({why if learned else 'the shape of sample'}), got {tuple(model_output.shape)}"
            )
        if not learned:
            return model_output, None
        return model_output[..., :C], model_output[..., C:]  # (B, ..., C) each
