"""Euler ancestral sampler (diffusers' EulerAncestralDiscreteScheduler, k-diffusion's ``sample_euler_ancestral``).

Each step goes from sigma_from to sigma_to in two moves (Crowson's k-diffusion; the
split is the one that makes the step an ancestral, DDPM-like sample)::

    sigma_up   = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2))
    sigma_down = sqrt(sigma_to^2 - sigma_up^2)

1. a deterministic Euler step of the probability-flow ODE down to sigma_down
   (see :mod:`diffusion_np.samplers.euler`): x' = x + d (sigma_down - sigma_from), d = (x - x0_pred) / sigma_from;
2. fresh noise back up to sigma_to: x_next = x' + sigma_up z, z ~ N(0, I).

Since variances add, x_next has noise level sqrt(sigma_down^2 + sigma_up^2) = sigma_to.
With eta = 1 (diffusers' only setting), sigma_down = sigma_to^2 / sigma_from, and the step
is the DDPM posterior sample in sigma form; eta = 0 gives plain Euler. At the last step
sigma_to = 0, so sigma_up = sigma_down = 0 and no noise is added (REFERENCE pitfall 10).

Code -> k-diffusion / REFERENCE notation::

    sigmas[i], sigmas[i+1]   sigma_from, sigma_to
    derivative               d = (x - denoised) / sigma
    noise                    z, drawn from ``rng`` or injected with ``noise=`` (tests pass torch's draws)

Timesteps, sigmas, ``init_noise_sigma`` and ``scale_model_input`` are Euler's
(:class:`~diffusion_np.samplers.base.SigmaSampler`). diffusers' ancestral scheduler has no
Karras option; neither does this one.

Left out: s_noise scaling and a noise sampler other than Gaussian.
"""

from __future__ import annotations

import math

from diffusion_np.samplers.base import SigmaSampler, StepOutput


def ancestral_sigmas(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_up, sigma_down) with sigma_up^2 + sigma_down^2 = sigma_to^2 (k-diffusion ``get_ancestral_step``).

    sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2));
    the min only bites for eta > 1. Python floats in, Python floats out (float64 on the host).
    """
    if sigma_to == 0.0:
        return 0.0, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    # max(..., 0): sigma_to^2 - sigma_up^2 can round to -1e-17 when sigma_up = sigma_to
    sigma_down = math.sqrt(max(sigma_to**2 - sigma_up**2, 0.0))
    return sigma_up, sigma_down


class EulerAncestralSampler(SigmaSampler):
    """Euler step to sigma_down plus fresh noise of std sigma_up (diffusers' ``EulerAncestralDiscreteScheduler``).

    Parameters follow diffusers: ``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule``, ``trained_betas``, ``prediction_type``, ``timestep_spacing``
    (default ``"linspace"``), ``steps_offset``, ``rescale_betas_zero_snr`` (needs v-prediction),
    plus ``eta`` (k-diffusion's; 1.0 is diffusers' behaviour, 0.0 is plain Euler).
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
        eta: float = 1.0,
    ) -> None:
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
            timestep_spacing, steps_offset, rescale_betas_zero_snr,
        )
        if not eta >= 0.0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)

    def step(self, model_output, t, sample, noise=None, rng=None) -> StepOutput:
        """One ancestral step from sigmas[i] to sigmas[i+1].

        ``noise``: the z ~ N(0, I) to add (sample's shape); otherwise drawn from ``rng``
        (a ``numpy.random.Generator``) on the host and moved to the sample's device.
        """
        self._check_output(model_output, sample)
        i = self._current_index(t)
        sigma_from, sigma_to = float(self.sigmas[i]), float(self.sigmas[i + 1])
        # 1. x_0 estimate D(x; sigma)
        pred_original = self._x0_from_output(model_output, sample, sigma_from)
        # 2. split sigma_to into a deterministic part (sigma_down) and fresh noise (sigma_up)
        sigma_up, sigma_down = ancestral_sigmas(sigma_from, sigma_to, self.eta)
        # 3. Euler step of the ODE to sigma_down
        derivative = (sample - pred_original) / sigma_from
        prev_sample = sample + derivative * (sigma_down - sigma_from)
        # 4. add noise up to sigma_to (sigma_up = 0 at the last step: nothing is drawn then)
        if sigma_up > 0.0:
            prev_sample = prev_sample + self._noise_like(sample, noise, rng) * sigma_up
        self._step_index = i + 1
        return StepOutput(prev_sample, pred_original)
