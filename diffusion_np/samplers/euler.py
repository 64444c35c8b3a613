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
  log sigma between neighbouring training steps (:func:`sigma_to_t`).

Code -> paper notation::

    sigmas[i]          sigma_i (EDM), the noise level of step i; sigmas[N] = 0
    pred_original      D(x; sigma) (EDM), x_0 estimate
    derivative         d_i = (x - D) / sigma_i (EDM Algorithm 1, line 4 with sigma(t) = t, s = 1)
    init_noise_sigma   std of x_N (EDM Algorithm 1, line 2: x_0 ~ N(0, sigma_0^2 I) in its indexing)

This file also holds what the other k-diffusion-style samplers share
(Euler ancestral, Heun, DPM-Solver++): the training sigmas, Karras sigmas,
sigma -> t, and :class:`SigmaSampler`, which tracks the step index as diffusers does.

Left out: EDM's stochastic "churn" (s_churn, s_tmin, s_tmax, s_noise), exponential and
beta sigma schedules, log-linear sigma interpolation, continuous timesteps, custom
timestep / sigma lists, ``set_begin_index`` for image-to-image.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_np.backend import get_xp
from diffusion_np.samplers.base import Sampler, StepOutput
from diffusion_np.samplers.timesteps import make_timesteps

#: diffusers' stand-in for alpha_bar_{T-1} = 0 under zero terminal SNR, so that sigma_max is finite
ZERO_SNR_ALPHA_BAR = 2.0**-24

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def training_sigmas(alpha_bar: np.ndarray, rescale_betas_zero_snr: bool = False) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1, float64, increasing in t.

    With zero terminal SNR alpha_bar_{T-1} = 0 and sigma_{T-1} would be infinite;
    diffusers replaces that alpha_bar by 2^-24 (the smallest positive float16
    subnormal), giving sigma_max = 4096. We do the same so the schedules match.
    """
    ab = np.array(alpha_bar, dtype=np.float64)
    if rescale_betas_zero_snr:
        ab[-1] = ZERO_SNR_ALPHA_BAR
    return np.sqrt((1.0 - ab) / ab)


def karras_sigmas(num_inference_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """EDM Eq. (5): N noise levels evenly spaced in sigma^(1/rho), from sigma_max down to sigma_min.

    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0..N-1.
    rho = 7 is the paper's choice: it spends more steps at low noise, where detail forms.
    The trailing 0 is appended by the sampler, not here.
    """
    ramp = np.linspace(0.0, 1.0, num_inference_steps, dtype=np.float64)
    min_inv_rho = sigma_min ** (1.0 / rho)
    max_inv_rho = sigma_max ** (1.0 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: linear interpolation of log sigma.

    ``log_sigmas`` = log of :func:`training_sigmas` (increasing in t). For each sigma,
    find the neighbouring training steps lo, lo + 1 with log_sigmas[lo] <= log sigma, and
    return t = lo + w with w = (log_sigmas[lo] - log sigma) / (log_sigmas[lo] - log_sigmas[lo + 1]),
    clipped to [0, 1] (so sigmas outside the training range map to 0 or T-1).
    This is diffusers' ``_sigma_to_t`` (from k-diffusion), vectorised over sigmas.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))  # 1e-10 floor: sigma = 0 maps to t = 0, not log(0)
    dists = log_sigma[None, :] - log_sigmas[:, None]  # (T, n)
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0.0, 1.0)
    return (1.0 - w) * low_idx + w * high_idx


class SigmaSampler(Sampler):
    """Shared machinery of the sigma-parametrised samplers (Euler, Euler ancestral, Heun, DPM-Solver++).

    After ``set_timesteps(N)``: ``timesteps`` (what the model is told, float64 or int64),
    ``sigmas`` (float64 on the host, one more entry than the steps, ending at the final sigma).
    Like diffusers, the sampler counts its own steps: the first call of
    ``scale_model_input`` or ``step`` finds the index of t in ``timesteps``, and each
    ``step`` advances it by one. ``step`` checks that the t it is given is the one the
    counter expects, so a loop that skips or repeats a step fails loudly.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
    ) -> None:
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
            timestep_spacing, steps_offset, rescale_betas_zero_snr,
        )
        if final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}")
        self.use_karras_sigmas = use_karras_sigmas
        self.final_sigmas_type = final_sigmas_type
        self.rescale_betas_zero_snr = rescale_betas_zero_snr
        self.train_sigmas = training_sigmas(self.alpha_bar, self.rescale_betas_zero_snr)
        self.sigmas: np.ndarray | None = None
        self._step_index: int | None = None

    # ---- schedule -------------------------------------------------------------------------
    @property
    def init_noise_sigma(self) -> float:
        """Std of the initial sample: sigma_max for linspace/trailing, sqrt(sigma_max^2 + 1) for leading.

        This is diffusers' rule (``EulerDiscreteScheduler.init_noise_sigma``). With the +1 the
        model's first input x / sqrt(sigma_max^2 + 1) is exactly unit-variance noise; without
        it, it has std sigma_max / sqrt(sigma_max^2 + 1), within 0.3% of 1 for SD's sigma_max.
        Either way the initial noise must be scaled (REFERENCE pitfall 7).
        """
        self._require_timesteps()
        sigma_max = float(np.max(self.sigmas))
        if self.timestep_spacing in ("linspace", "trailing"):
            return sigma_max
        return math.sqrt(sigma_max**2 + 1.0)

    def _final_sigma(self) -> float:
        """0 (default: the last step lands on the clean sample) or the smallest training sigma."""
        return 0.0 if self.final_sigmas_type == "zero" else float(self.train_sigmas[0])

    def _euler_schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) as diffusers' Euler/Heun schedulers choose them (before any repetition)."""
        timesteps = make_timesteps(
            num_inference_steps, self.num_train_timesteps, self.timestep_spacing, self.steps_offset,
            round_linspace=False,
        )
        # sigma at fractional t: linear interpolation between the neighbouring training sigmas
        sigmas = np.interp(timesteps, np.arange(self.num_train_timesteps), self.train_sigmas)
        if self.use_karras_sigmas:
            # EDM Eq. (5) between the first and last sigma *of this spacing* (diffusers' choice:
            # for leading spacing that is sigma(t_0) < sigma_{T-1})
            sigmas = karras_sigmas(num_inference_steps, float(sigmas[-1]), float(sigmas[0]))
            timesteps = sigma_to_t(sigmas, np.log(self.train_sigmas))
        return timesteps, np.concatenate([sigmas, [self._final_sigma()]])

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the N steps: ``timesteps`` (N, float64) and ``sigmas`` (N + 1, float64, last = final sigma)."""
        self.timesteps, self.sigmas = self._euler_schedule(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self._step_index = None

    # ---- step bookkeeping -------------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        """Index into ``sigmas`` of the current step (None before the first call)."""
        return self._step_index

    def index_for_timestep(self, t) -> int:
        """Position of t in ``timesteps``; the second one when t appears twice (diffusers' rule)."""
        self._require_timesteps()
        indices = np.flatnonzero(self.timesteps == t)
        if indices.size == 0:
            raise ValueError(
                f"{type(self).__name__}: timestep {t} is not one of this sampler's timesteps "
                f"{np.asarray(self.timesteps).tolist()}; pass the values of sampler.timesteps"
            )
        # diffusers takes the second match so that a loop starting mid-schedule (img2img)
        # does not skip a sigma when timesteps repeat (Heun)
        return int(indices[1] if indices.size > 1 else indices[0])

    def _current_index(self, t) -> int:
        """The step counter, started from t on first use; checks that t is the expected timestep."""
        self._require_timesteps()
        if self._step_index is None:
            # a loop from the start begins at 0, even when t_0 repeats (DPM-Solver's Karras timesteps
            # can round several sigmas to T-1; diffusers then starts at index 1 and overruns at the end)
            self._step_index = 0 if self.timesteps[0] == t else self.index_for_timestep(t)
        i = self._step_index
        if i >= len(self.timesteps):
            raise RuntimeError(
                f"{type(self).__name__}: all {len(self.timesteps)} steps are done; call set_timesteps again"
            )
        if self.timesteps[i] != t:
            raise ValueError(
                f"{type(self).__name__}: expected timestep {self.timesteps[i]} (step {i}), got {t}; "
                "call scale_model_input/step with the entries of sampler.timesteps, in order"
            )
        return i

    # ---- what the model sees --------------------------------------------------------------
    def scale_model_input(self, sample, t):
        """x / sqrt(sigma^2 + 1): back from the sigma parametrisation to the x_t the model was trained on.

        sqrt(alpha_bar) = 1 / sqrt(sigma^2 + 1), so this is sqrt(alpha_bar_t) x = x_t (REFERENCE pitfall 7).
        """
        sigma = float(self.sigmas[self._current_index(t)])
        return sample / math.sqrt(sigma**2 + 1.0)

    def add_noise(self, original_samples, noise, t):
        """x = x_0 + sigma_t noise, the forward process in the sigma parametrisation.

        ``t`` is one entry of ``timesteps`` or an array of them (one per sample).
        """
        self._require_timesteps()
        t_host = np.atleast_1d(np.asarray(t))
        sig = self.sigmas[[self.index_for_timestep(ti) for ti in t_host]]
        if np.ndim(t) == 1:  # (B,) -> (B, 1, 1, ...)
            sig = sig.reshape((-1,) + (1,) * (original_samples.ndim - 1))
        else:
            sig = sig.reshape(())
        xp = get_xp(original_samples)
        return original_samples + xp.asarray(sig, dtype=original_samples.dtype) * noise

    def _x0_from_output(self, model_output, sample, sigma: float):
        """D(x; sigma): the x_0 estimate in the sigma parametrisation, for each prediction type.

        With x = x_0 + sigma eps and the model fed x_t = x / sqrt(sigma^2 + 1):
          epsilon:       x_0 = x - sigma eps
          v_prediction:  v = sqrt(ab) eps - sqrt(1 - ab) x_0 with sqrt(ab) = 1/sqrt(sigma^2+1),
                         sqrt(1-ab) = sigma/sqrt(sigma^2+1) gives
                         x_0 = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1)   (EDM's c_skip, c_out for v)
          sample:        x_0 = model_output
        """
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output
        if self.prediction_type == "v_prediction":
            return model_output * (-sigma / math.sqrt(sigma**2 + 1.0)) + sample / (sigma**2 + 1.0)
        return model_output


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
