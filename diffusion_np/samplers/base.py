"""What every sampler shares: the schedule, the config, the timestep walk, add_noise, x0 clipping,
and the two families' machinery (the sigma samplers, and DPM-Solver++'s layout that UniPC reuses).

A sampler turns a network's prediction at x_t into x_{t_prev}. Its interface is
diffusers' scheduler interface, so a diffusers sampling loop ports line for line::

    sampler = DDIMSampler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sampler.set_timesteps(50)
    x = noise * sampler.init_noise_sigma
    for t in sampler.timesteps:
        model_output = model(sampler.scale_model_input(x, t), t)
        x = sampler.step(model_output, t, x).prev_sample

Schedule math lives in :mod:`diffusion_np.schedules` (betas, alpha_bar, the sigma table),
the conversion from a model output to (x0, eps) and the posterior in
:mod:`diffusion_np.diffusion`, the timestep and sigma spacings in
:mod:`diffusion_np.samplers.timesteps`; samplers only combine them. What two or more
samplers share lives here, so that no sampler file imports another:

* :class:`Sampler`: the base of all of them;
* :func:`clip_x0`, :func:`dynamic_threshold`, :class:`ClipsX0`: the x0 clipping of DDPM, DDIM, Heun
  and DDIM inversion;
* :class:`SigmaSampler`: Euler, Euler ancestral, Heun, DPM-Solver++ and UniPC walk the noise
  level sigma instead of t, and count their steps as diffusers does;
* :class:`DataPredictionSampler`: DPM-Solver++ and UniPC solve the probability-flow ODE on x_t
  with the model's x0 estimate, on diffusers' DPM-Solver timestep layout, and share its
  first-order step (DDIM in exponential-integrator form).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from diffusion_np.backend import get_xp
from diffusion_np.diffusion import check_prediction_type, gather, q_sample, x0_and_eps_at
from diffusion_np.samplers.timesteps import SPACINGS, karras_sigmas, make_timesteps, sigma_to_t
from diffusion_np.schedules import NoiseSchedule, vp_coefficients


class StepOutput(NamedTuple):
    """What ``step`` returns: the sample at the previous timestep and the model's x0 estimate."""

    prev_sample: object
    pred_original_sample: object


class Sampler:
    """Base class: builds the NoiseSchedule from diffusers' keyword names and validates them.

    Subclasses implement ``step`` and, where they differ, ``set_timesteps``,
    ``scale_model_input`` and ``init_noise_sigma``.
    """

    #: how many model evaluations one step makes (Heun: 2)
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        check_prediction_type(prediction_type)
        if timestep_spacing not in SPACINGS:  # checked here, not first at set_timesteps
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {timestep_spacing!r}")
        if isinstance(steps_offset, (bool, np.bool_)) or not isinstance(steps_offset, (int, np.integer)):
            raise TypeError(f"steps_offset must be an int >= 0, got {steps_offset!r}")
        if steps_offset < 0:  # a negative offset would index alpha_bar from its end (timestep -3 is step T - 3)
            raise ValueError(f"steps_offset must be >= 0, got {steps_offset}")
        if rescale_betas_zero_snr and prediction_type == "epsilon":
            # x0 = (x_T - sqrt(1 - ab_T) eps) / sqrt(ab_T) divides by zero when ab_T = 0 (REFERENCE pitfall 4)
            raise ValueError(
                "rescale_betas_zero_snr=True makes alpha_bar_{T-1} = 0, where an epsilon prediction cannot "
                "recover x0; use prediction_type='v_prediction' (Lin et al. 2023, Sec. 3.2)"
            )
        self.schedule = NoiseSchedule.from_config(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray | None = None

    @property
    def alpha_bar(self) -> np.ndarray:
        """alpha_bar_t for t = 0..T-1 (float64)."""
        return self.schedule.alpha_bar

    @property
    def init_noise_sigma(self) -> float:
        """Scale of the initial noise x_T = init_noise_sigma * N(0, I) (1 for DDPM/DDIM)."""
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the N timesteps to visit (``self.timesteps``, decreasing)."""
        self.timesteps = make_timesteps(
            num_inference_steps, self.num_train_timesteps, self.timestep_spacing, self.steps_offset
        )
        self.num_inference_steps = num_inference_steps

    def previous_timestep(self, t) -> int:
        """The next entry of ``self.timesteps`` after t, or -1 after the last (REFERENCE pitfall 1)."""
        index = self._position(t)
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def _position(self, t) -> int:
        """The index of t in ``self.timesteps``; ValueError if t is not one of them."""
        self._require_timesteps()
        matches = np.flatnonzero(self.timesteps == t)
        if matches.size == 0:
            raise ValueError(f"timestep {t} is not in this sampler's timesteps {self.timesteps.tolist()}")
        return int(matches[0])

    def scale_model_input(self, sample, t):
        """What the model sees at t; identity except for sigma-parametrised samplers."""
        return sample

    def add_noise(self, original_samples, noise, t):
        """q(x_t | x_0) sample: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (DDPM Eq. 4)."""
        return q_sample(original_samples, t, noise, self.alpha_bar)

    def step(self, model_output, t, sample, noise=None) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_output(self, model_output, sample) -> None:
        """ValueError unless the model output has the sample's shape."""
        if tuple(model_output.shape) != tuple(sample.shape):
            raise ValueError(
                f"{type(self).__name__}.step: model_output must have the sample's shape {tuple(sample.shape)}, "
                f"got {tuple(model_output.shape)}"
            )

    def _require_timesteps(self) -> None:
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before stepping")

    def _noise_like(self, sample, noise, rng):
        """The injected noise, or a fresh draw from ``rng`` on the host moved to sample's device."""
        if noise is not None:
            if tuple(noise.shape) != tuple(sample.shape):
                raise ValueError(f"noise must have the sample's shape {tuple(sample.shape)}, got {tuple(noise.shape)}")
            return noise
        rng = rng if rng is not None else np.random.default_rng()
        return get_xp(sample).asarray(rng.standard_normal(sample.shape), dtype=sample.dtype)


# ----------------------------------------------------------------------------- x0 clipping
def dynamic_threshold(x0, ratio: float = 0.995, max_value: float = 1.0):
    """Dynamic thresholding of an x_0 estimate (Saharia et al. 2022, Imagen, Sec. 2.3).

    Per sample, s = the ``ratio`` quantile of |x0| over all its elements, kept in
    [1, max_value]; then x0 <- clip(x0, -s, s) / s. With s = 1 this is plain
    clipping to [-1, 1]. Shape (B, ...) in, same shape out; the quantile uses
    linear interpolation, as ``torch.quantile`` does.
    """
    xp = get_xp(x0)
    B = x0.shape[0]
    flat = x0.reshape(B, -1)  # (B, H*W*C): the quantile runs over each sample's elements
    s = xp.quantile(xp.abs(flat), ratio, axis=1)  # (B,)
    s = xp.clip(s, 1.0, max_value).astype(x0.dtype)[:, None]  # (B, 1); s >= 1 never amplifies
    return (xp.clip(flat, -s, s) / s).reshape(x0.shape)


def clip_x0(x0, clip_sample: bool, clip_sample_range: float, thresholding: bool = False, ratio: float = 0.995,
            max_value: float = 1.0):
    """Step 3 of diffusers' DDPM/DDIM steps: threshold (if asked), else clip (if asked), else leave x0."""
    if thresholding:
        return dynamic_threshold(x0, ratio, max_value)
    if clip_sample:
        return get_xp(x0).clip(x0, -clip_sample_range, clip_sample_range)
    return x0


class ClipsX0:
    """diffusers' x0-clipping keywords, checked and kept, and :func:`clip_x0` with them (DDPM, DDIM,
    Heun and DDIM inversion: a mixin beside their base class)."""

    def _keep_clip_config(self, clip_sample: bool, clip_sample_range: float, thresholding: bool = False,
                          dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0) -> None:
        """ValueError for a non-positive clip range or max value, or a quantile ratio outside (0, 1]."""
        if not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range!r}")
        if not 0 < dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must lie in (0, 1], got {dynamic_thresholding_ratio}")
        if not sample_max_value > 0:
            raise ValueError(f"sample_max_value must be > 0, got {sample_max_value}")
        self.clip_sample, self.clip_sample_range = bool(clip_sample), float(clip_sample_range)
        self.thresholding, self.dynamic_thresholding_ratio = bool(thresholding), dynamic_thresholding_ratio
        self.sample_max_value = sample_max_value

    def _clip(self, x0):
        """Threshold or clip x0 as configured (wrong for latents: REFERENCE pitfall 6)."""
        return clip_x0(x0, self.clip_sample, self.clip_sample_range, self.thresholding,
                       self.dynamic_thresholding_ratio, self.sample_max_value)  # fmt: skip


# ----------------------------------------------------------------------------- the sigma samplers
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


class SigmaSampler(Sampler):
    """Shared machinery of the sigma-parametrised samplers (Euler, Euler ancestral, Heun, DPM-Solver++, UniPC).

    The noise level of training timestep t is sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
    (``train_sigmas``: the schedule's ``sampling_sigmas``, finite at zero terminal SNR).
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
        self.train_sigmas = self.schedule.sampling_sigmas  # sigma_t for t = 0..T-1, increasing
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
        return original_samples + gather(self.sigmas, self._indices(t), original_samples) * noise

    def _indices(self, t):
        """Positions in ``timesteps`` of t, one entry or an array of them (one per sample)."""
        self._require_timesteps()
        if np.ndim(t) == 1:
            return np.array([self.index_for_timestep(ti) for ti in np.asarray(t)])
        return self.index_for_timestep(t)

    def _x0_from_output(self, model_output, sample, sigma: float):
        """D(x; sigma): the x_0 estimate in the sigma parametrisation, for each prediction type.

        The model was fed x_t = sqrt(alpha_bar) x = x / sqrt(sigma^2 + 1) (``scale_model_input``),
        at alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t; :func:`x0_and_eps_at` there gives
          epsilon:       x_0 = (x_t - sigma_t eps) / alpha_t = x - sigma eps
          v_prediction:  x_0 = alpha_t x_t - sigma_t v = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1)
                         (EDM's c_skip and c_out for v)
          sample:        x_0 = model_output
        """
        alpha_t, sigma_t = vp_coefficients(sigma)
        return x0_and_eps_at(model_output, sample * alpha_t, alpha_t, sigma_t, self.prediction_type)[0]


# ----------------------------------------------------------------------------- DPM-Solver++ and UniPC
class DataPredictionSampler(SigmaSampler):
    """What DPM-Solver++ and UniPC share: diffusers lays the two out alike.

    * the timesteps: N + 1 points laid out and the last dropped, with ``lambda_min_clipped``
      cutting off the noisiest steps, and Karras sigmas over the whole training range
      (:mod:`diffusion_np.samplers.dpm_solver` writes the layout out);
    * the sample is x_t itself: ``init_noise_sigma = 1``, ``scale_model_input`` is the identity,
      ``add_noise`` is q(x_t | x_0) at the step's sigma;
    * the data prediction x_theta(x_t, t), the model's x_0 estimate (:func:`x0_and_eps_at` at the
      step's sigma), kept for the last ``solver_order`` steps;
    * the first-order update, DPM-Solver++(1) (DDIM with eta = 0, in exponential-integrator form).

    Each subclass writes its own ``step``.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -math.inf,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
            timestep_spacing, steps_offset, rescale_betas_zero_snr, use_karras_sigmas, final_sigmas_type,
        )
        if solver_order not in (1, 2):
            raise ValueError(
                f"{type(self).__name__}: solver_order must be 1 or 2 (order 3 is not implemented), got {solver_order!r}"
            )
        self.solver_order = solver_order
        self.lower_order_final = lower_order_final
        self.lambda_min_clipped = lambda_min_clipped
        self.beta_schedule = beta_schedule
        self._reset_state()

    def _reset_state(self) -> None:
        self._model_outputs: list = [None] * self.solver_order  # x_0 estimates of the last steps, newest last
        self._lower_order_nums = 0

    # ---- schedule -------------------------------------------------------------------------
    def _dpm_timesteps(self, N: int) -> np.ndarray:
        """diffusers' DPM-Solver spacing (N + 1 points, last dropped; written out in dpm_solver.py), int64."""
        T = self.num_train_timesteps
        if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or not 1 <= N <= T:
            raise ValueError(f"num_inference_steps must be an integer in [1, {T}], got {N!r}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {self.timestep_spacing!r}")
        # lambda_t = -log sigma_t decreases with t: count the noisiest steps with lambda < lambda_min_clipped
        # (searchsorted needs increasing values, hence the flip) and leave them out
        lambdas = -np.log(self.train_sigmas)
        clipped_idx = int(np.searchsorted(lambdas[::-1], self.lambda_min_clipped))
        last_timestep = T - clipped_idx
        if self.timestep_spacing == "linspace":
            t = np.linspace(0, last_timestep - 1, N + 1).round()[::-1][:-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            step_ratio = last_timestep // (N + 1)
            t = (np.arange(N + 1) * step_ratio)[::-1][:-1].astype(np.int64) + self.steps_offset
            if t[0] > T - 1:
                raise ValueError(
                    f"steps_offset={self.steps_offset} with {N} leading steps of {step_ratio} reaches timestep "
                    f"{t[0]}, past the last training timestep {T - 1}; lower steps_offset or use 'trailing'"
                )
        else:  # trailing
            # [:N]: float roundoff in arange's step can add an (N+1)-th entry ~1e-13 that becomes timestep -1
            # (T=1000, N=61; diffusers 0.42 keeps it, and then indexes sigma_{-1} = sigma_max)
            t = np.arange(last_timestep, 0, -T / N)[:N].round().astype(np.int64) - 1
        if t.min() < 0:  # trailing from a clipped last timestep: arange's step T / N overshoots to 0
            raise ValueError(
                f"timestep_spacing='trailing' with lambda_min_clipped={self.lambda_min_clipped} ends the range at "
                f"timestep {last_timestep - 1}, and {N} steps of {T / N:.3g} then reach timestep {int(t.min())}; "
                "use fewer steps or 'linspace'"
            )
        values, counts = np.unique(t, return_counts=True)
        if np.any(counts > 1):  # N + 1 points need at least N + 1 timesteps to be distinct
            raise ValueError(
                f"num_inference_steps={N} is too many for {self.timestep_spacing!r} spacing over "
                f"{last_timestep} timesteps: this layout (N + 1 points, the last dropped) repeats timesteps "
                f"{values[counts > 1][:3].tolist()}; use at most {last_timestep - 1} steps or 'trailing'"
            )
        return t.copy()

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the steps: ``timesteps`` (int64) and ``sigmas`` (float64, one more, last = 0 by default)."""
        timesteps = self._dpm_timesteps(num_inference_steps)
        if self.use_karras_sigmas:
            # EDM Eq. (5) over the whole training range, then t from log-sigma interpolation
            sigmas = karras_sigmas(num_inference_steps, float(self.train_sigmas[0]), float(self.train_sigmas[-1]))
            t = sigma_to_t(sigmas, np.log(self.train_sigmas))
            # diffusers rounds, except for the cosine schedule, where the int64 cast truncates
            timesteps = (t if self.beta_schedule in ("squaredcos_cap_v2", "cosine") else t.round()).astype(np.int64)
        else:
            sigmas = self.train_sigmas[timesteps]
        self.sigmas = np.concatenate([sigmas, [self._final_sigma()]])
        self.timesteps = timesteps
        self.num_inference_steps = len(timesteps)
        self._step_index = None
        self._reset_state()

    # ---- the sample is x_t itself ----------------------------------------------------------
    @property
    def init_noise_sigma(self) -> float:
        """1: DPM-Solver works on x_t, whose prior is N(0, I) (diffusers sets 1.0 too)."""
        return 1.0

    def scale_model_input(self, sample, t):
        """The identity: x_t is already what the model was trained on (t is checked, not used)."""
        self._current_index(t)
        return sample

    def add_noise(self, original_samples, noise, t):
        """x_t = alpha_t x_0 + sigma_t noise at the sigma of timestep t (DDPM Eq. 4 at that noise level)."""
        index = self._indices(t)
        alpha = 1.0 / np.sqrt(self.sigmas**2 + 1.0)  # alpha_t = 1 / sqrt(sigma^2 + 1) for every step
        return gather(alpha, index, original_samples) * original_samples + gather(
            self.sigmas * alpha, index, original_samples
        ) * noise

    # ---- the solver --------------------------------------------------------------------------
    def _data_prediction(self, model_output, sample, s: float):
        """x_theta(x_t, t), the x_0 estimate, from the model output (diffusers' ``convert_model_output``)."""
        alpha_t, sigma_t = vp_coefficients(s)
        return x0_and_eps_at(model_output, sample, alpha_t, sigma_t, self.prediction_type)[0]

    def _first_order_update(self, x0_pred, sample, s: float, s_next: float):
        """DPM-Solver++(1): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D, e^{-h} = s_next / s."""
        alpha_t, sigma_t = vp_coefficients(s_next)
        _, sigma_s = vp_coefficients(s)
        exp_neg_h = s_next / s  # e^{-(lambda_t - lambda_s)}, exactly 0 at the final sigma = 0
        return (sigma_t / sigma_s) * sample - (alpha_t * (exp_neg_h - 1.0)) * x0_pred
