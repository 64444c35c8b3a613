"""Euler sampler for the probability-flow ODE in the sigma parametrisation (diffusers' EulerDiscreteScheduler).

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
Models", EDM) rewrite a variance-preserving model as a variance-exploding one.
Divide x_t by sqrt(alpha_bar_t)::

    x = x_t / sqrt(alpha_bar_t) = x_0 + sigma eps,     sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)

so a training timestep t is just a noise level sigma_t, and sampling walks sigma
from sigma_max down to 0. The denoiser D(x; sigma) is the model's x_0 estimate,
and the probability-flow ODE becomes (EDM Eq. 1 and 3 with sigma(t) = t, s(t) = 1)::

    dx / dsigma = (x - D(x; sigma)) / sigma                                (= eps, the noise direction)

Euler's method on this ODE (EDM Algorithm 1, lines 4-5, without the Heun correction of lines 6-8)::

    d      = (x - x0_pred) / sigma_i
    x_next = x + d (sigma_{i+1} - sigma_i)

Two scalings come with the change of variable (REFERENCE pitfall 7):

* the network was trained on x_t, not on x, so it is fed
  ``scale_model_input(x, t) = x / sqrt(sigma^2 + 1)`` (= sqrt(alpha_bar_t) x = x_t);
* the initial sample has std sigma_max, not 1: ``x = noise * init_noise_sigma``.
  diffusers uses sigma_max for "linspace"/"trailing" spacing and
  sqrt(sigma_max^2 + 1) for "leading" (the largest sigma in ``sigmas`` either way).

Noise levels (``sigmas``, N + 1 values, the last one 0):

* default: sigma interpolated linearly in t at the (possibly fractional) timesteps
  (diffusers keeps linspace's fractional timesteps, ``make_timesteps(round_linspace=False)``);
* ``use_karras_sigmas=True``: EDM Eq. (5) with rho = 7 between the first and last of those
  sigmas, and the timesteps fed to the model recovered from each sigma by interpolating
  log sigma between neighbouring training steps (:func:`~diffusion_np.samplers.timesteps.karras_sigmas`,
  :func:`~diffusion_np.samplers.timesteps.sigma_to_t`).

The training sigmas are the schedule's (``NoiseSchedule.sampling_sigmas``); with zero terminal
SNR sigma_{T-1} would be infinite, and diffusers' stand-in alpha_bar = 2^-24 makes sigma_max = 4096.

Code -> paper notation::

    sigmas[i]          sigma_i (EDM), the noise level of step i; sigmas[N] = 0
    pred_original      D(x; sigma) (EDM), x_0 estimate
    derivative         d_i = (x - D) / sigma_i (EDM Algorithm 1, line 4 with sigma(t) = t, s = 1)
    init_noise_sigma   std of x_N (EDM Algorithm 1, line 2: x_0 ~ N(0, sigma_0^2 I) in its indexing)

What the sigma samplers share (Euler ancestral, Heun, DPM-Solver++ and UniPC too) is
:class:`~diffusion_np.samplers.base.SigmaSampler`: the sigma schedule, the step counter
diffusers keeps, the two scalings and the x_0 estimate D(x; sigma). This file is Euler's step.

Left out: EDM's stochastic "churn" (s_churn, s_tmin, s_tmax, s_noise), exponential and
beta sigma schedules, log-linear sigma interpolation, continuous timesteps, custom
timestep / sigma lists, ``set_begin_index`` for image-to-image.
"""

from __future__ import annotations

from diffusion_np.samplers.base import SigmaSampler, StepOutput


class EulerSampler(SigmaSampler):
    """Euler's method on the probability-flow ODE (diffusers' ``EulerDiscreteScheduler``).

    Parameters follow diffusers: ``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule``, ``trained_betas``, ``prediction_type``, ``use_karras_sigmas``,
    ``timestep_spacing`` (default ``"linspace"``), ``steps_offset``,
    ``rescale_betas_zero_snr`` (needs v-prediction here), ``final_sigmas_type``.

    Loop (one model call per step)::

        sampler.set_timesteps(N)
        x = noise * sampler.init_noise_sigma
        for t in sampler.timesteps:
            x = sampler.step(model(sampler.scale_model_input(x, t), t), t, x).prev_sample
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ) -> None:
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
            timestep_spacing, steps_offset, rescale_betas_zero_snr, use_karras_sigmas, final_sigmas_type,
        )

    def step(self, model_output, t, sample, noise=None, rng=None) -> StepOutput:
        """One Euler step from sigmas[i] to sigmas[i+1] (EDM Algorithm 1, lines 4-5).

        ``noise`` and ``rng`` are accepted for a uniform loop and unused (the ODE is deterministic).
        """
        self._check_output(model_output, sample)
        i = self._current_index(t)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        # 1. x_0 estimate D(x; sigma)
        pred_original = self._x0_from_output(model_output, sample, sigma)
        # 2. ODE derivative d = (x - D) / sigma = dx/dsigma
        derivative = (sample - pred_original) / sigma
        # 3. Euler step in sigma: x_next = x + d (sigma_next - sigma)
        prev_sample = sample + derivative * (sigma_next - sigma)
        self._step_index = i + 1
        return StepOutput(prev_sample, pred_original)
