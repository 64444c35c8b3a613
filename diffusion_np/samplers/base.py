"""What every sampler shares: the schedule, the config, the timestep walk, add_noise.

A sampler turns a network's prediction at x_t into x_{t_prev}. Its interface is
diffusers' scheduler interface, so a diffusers sampling loop ports line for line::

    sampler = DDIMSampler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sampler.set_timesteps(50)
    x = noise * sampler.init_noise_sigma
    for t in sampler.timesteps:
        model_output = model(sampler.scale_model_input(x, t), t)
        x = sampler.step(model_output, t, x).prev_sample

Schedule math lives in :mod:`diffusion_np.schedules` and the conversions between
epsilon / x0 / v in :mod:`diffusion_np.diffusion`; samplers only combine them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from diffusion_np.diffusion import check_prediction_type, q_sample
from diffusion_np.samplers.timesteps import make_timesteps
from diffusion_np.schedules import NoiseSchedule


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
        self.steps_offset = steps_offset
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

    def _require_timesteps(self) -> None:
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before stepping")

    def _noise_like(self, sample, noise, rng):
        """The injected noise, or a fresh draw from ``rng`` on the host moved to sample's device."""
        if noise is not None:
            if tuple(noise.shape) != tuple(sample.shape):
                raise ValueError(f"noise must have the sample's shape {tuple(sample.shape)}, got {tuple(noise.shape)}")
            return noise
        from diffusion_np.backend import get_xp

        rng = rng if rng is not None else np.random.default_rng()
        return get_xp(sample).asarray(rng.standard_normal(sample.shape), dtype=sample.dtype)
