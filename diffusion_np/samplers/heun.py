"""Heun's second-order sampler for the probability-flow ODE (EDM Algorithm 1; diffusers' HeunDiscreteScheduler).

Heun's method (the explicit trapezoidal rule) on dx/dsigma = (x - D(x; sigma)) / sigma,
from sigma_i to sigma_{i+1} (Karras et al. 2022, Algorithm 1, lines 4-8)::

    d_i    = (x_i - D(x_i; sigma_i)) / sigma_i                   Euler slope at the start
    x'     = x_i + (sigma_{i+1} - sigma_i) d_i                   Euler predictor
    d'     = (x' - D(x'; sigma_{i+1})) / sigma_{i+1}             slope at the predicted end
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d') / 2       trapezoidal corrector

The last step goes to sigma = 0, where d' would divide by zero: it stays a plain
Euler step (EDM Algorithm 1, line 6: "if sigma(t_{i+1}) != 0"). N steps therefore
cost 2N - 1 model evaluations.

How the two model calls fit diffusers' one-call-per-``step`` loop: ``timesteps``
repeats every timestep after the first, and ``sigmas`` every sigma between the first
and the 0::

    timesteps  t_0, t_1, t_1, t_2, t_2, ..., t_{N-1}, t_{N-1}               (2N - 1 entries)
    sigmas     s_0, s_1, s_1, s_2, s_2, ..., s_{N-1}, s_{N-1}, 0            (2N entries)

The loop calls the model at each entry; the sampler alternates between a
*first-order* call (Euler predictor: it stores d_i, the step size dt and x_i, and
returns x' for the loop to feed to the model at t_{i+1}) and a *second-order* call
(corrector: it averages the stored d_i with d', restarts from the stored x_i, and
clears the state). ``state_in_first_order`` says which call comes next. After the
last (first-order, to sigma = 0) call the state is left set, as in diffusers; the next
``set_timesteps`` clears it.

Code -> EDM Algorithm 1 notation::

    sigmas[i], sigmas[i+1]   t_i, t_{i+1} (EDM uses sigma(t) = t)
    pred_original            D_theta(x; t)
    prev_derivative, dt      d_i, t_{i+1} - t_i   (kept between the two calls)
    _first_sample            x_i                  (kept between the two calls)

Precision. Sigmas and fractional timesteps are float64 here, as every schedule in this package
is (schedules.py); diffusers' Heun (like its Euler) rounds both to float32. The two schedules
agree to that rounding, and run in float64 on the same sigmas the two loops agree to 1e-14
(tests/samplers/test_parity_random.py), so we do not copy the rounding. A float32 loop is
another matter where sigma_max is large: the cosine schedule's is 2.0e4 (alpha_bar_{T-1} =
2.4e-9), the first step's update x_i + dt * slope then cancels four to five digits, and a
float32 sample is good to about 5e-3 relative only, in diffusers and here alike (each 4.5e-3
to 2e-2 from the float64 loop at 5 to 20 linspace or trailing steps, v-prediction). The
4.3e-3 between the two float32 loops in that configuration is that rounding seen twice, not
a difference of method: run such schedules in float64 where the digits matter.

Left out: EDM's stochastic churn (gamma = 0 as in diffusers), exponential and beta sigmas,
custom timesteps.
"""

from __future__ import annotations

import numpy as np

from diffusion_np.samplers.base import ClipsX0, SigmaSampler, StepOutput


class HeunSampler(ClipsX0, SigmaSampler):
    """Heun's method, one model call per ``step`` (diffusers' ``HeunDiscreteScheduler``).

    Parameters follow diffusers, including its defaults (beta 0.00085 .. 0.012, "linear"):
    ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas``,
    ``prediction_type``, ``use_karras_sigmas``, ``clip_sample``, ``clip_sample_range``,
    ``timestep_spacing`` (default ``"linspace"``), ``steps_offset``.
    diffusers' Heun has no zero-terminal-SNR option; neither has this one.
    """

    order = 2

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
            timestep_spacing, steps_offset, False, use_karras_sigmas,
        )
        self._keep_clip_config(clip_sample, clip_sample_range)
        self._reset_state()

    def _reset_state(self) -> None:
        # set by a first-order call, consumed (and cleared) by the second-order call after it
        self.prev_derivative = None
        self.dt: float | None = None
        self._first_sample = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """N steps as 2N - 1 model calls: every timestep after the first, and every sigma
        between the first and the final 0, appear twice (see the module docstring)."""
        timesteps, sigmas = self._euler_schedule(num_inference_steps)
        self.sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        self.timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._reset_state()

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is an Euler predictor, False when it is Heun's corrector."""
        return self.dt is None

    def step(self, model_output, t, sample, noise=None, rng=None) -> StepOutput:
        """One model evaluation's worth of Heun's method (predictor or corrector, alternating).

        ``noise`` and ``rng`` are accepted for a uniform loop and unused (the ODE is deterministic).
        """
        self._check_output(model_output, sample)
        i = self._current_index(t)
        if self.state_in_first_order:
            sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
            sigma_model = sigma  # the model saw x_i at sigma_i
        else:
            # corrector: the step still runs from sigmas[i-1] to sigmas[i]; the model saw x' at sigma_next
            sigma, sigma_next = float(self.sigmas[i - 1]), float(self.sigmas[i])
            sigma_model = sigma_next

        # 1. x_0 estimate D(x; sigma) at the noise level the model was evaluated at
        pred_original = self._x0_from_output(model_output, sample, sigma_model)
        # for pixel-space models only; never for latents (REFERENCE pitfall 6)
        pred_original = self._clip(pred_original)

        if self.state_in_first_order:
            # 2a. Euler predictor: d_i at x_i, keep (d_i, dt, x_i) for the corrector
            derivative = (sample - pred_original) / sigma
            dt = sigma_next - sigma
            self.prev_derivative, self.dt, self._first_sample = derivative, dt, sample
        else:
            # 2b. Heun corrector: average the slopes at both ends, restart from x_i
            derivative = (sample - pred_original) / sigma_next
            derivative = (self.prev_derivative + derivative) / 2
            dt, sample = self.dt, self._first_sample
            self._reset_state()

        # 3. x_{i+1} = x_i + dt * slope (x' after a predictor call)
        prev_sample = sample + derivative * dt
        self._step_index = i + 1
        return StepOutput(prev_sample, pred_original)
