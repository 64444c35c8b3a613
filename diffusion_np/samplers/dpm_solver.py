"""DPM-Solver++ multistep, orders 1 and 2 (Lu et al. 2022; diffusers' DPMSolverMultistepScheduler).

Notation (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Sec. 2-4). The sample is x_t itself (variance preserving), with

    alpha_t = sqrt(alpha_bar_t),  sigma_t = sqrt(1 - alpha_bar_t),  lambda_t = log(alpha_t / sigma_t)  (half log-SNR)

and the data-prediction model x_theta(x_t, t) (the x_0 estimate, from any prediction type).
The probability-flow ODE has the exact solution, from s to t (DPM-Solver++, Sec. 4.1)::

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x_theta dlambda

Freezing x_theta over the step (its value D at s) gives the first-order update,
DPM-Solver++(1), which is DDIM::

    h   = lambda_t - lambda_s
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D

DPM-Solver++(2M) (Algorithm 2) reuses the previous step's x_0 estimate for a linear
correction, one model call per step: with D0 = x_theta at s0 (now), m1 = x_theta at s1
(previous step), h = lambda_t - lambda_s0, h_0 = lambda_s0 - lambda_s1, r = h_0 / h::

    D   = (1 + 1/(2r)) D0 - 1/(2r) m1        (diffusers: D0 + 0.5 D1 with D1 = (D0 - m1) / r)
    x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^{-h} - 1) D

The first step has no previous estimate and is first order. The last step goes to
sigma = 0 (alpha = 1, lambda = +inf, e^{-h} = 0): the first-order update then returns
exactly D, the clean x_0 estimate; a second-order update there would need h = inf. A
schedule that stops at a non-zero sigma leaves that much noise in the image
(REFERENCE pitfall 8). diffusers' defaults (final_sigmas_type="zero", lower_order_final=True)
do exactly this; both are kept as options.

In the k-diffusion sigma s = sigma_t / alpha_t = sqrt((1 - ab) / ab) that ``sigmas`` holds:
alpha_t = 1/sqrt(s^2 + 1), sigma_t = s alpha_t, lambda = -log s and e^{-h} = s_next / s.
The code uses these, so the final step needs no log(0).

Timesteps differ from Euler's (diffusers' convention for this scheduler, kept here so
the two agree step for step): N + 1 points are laid out and the last one is dropped::

    linspace   round(linspace(0, T_last - 1, N + 1))[::-1][:-1]        T=1000, N=10: 999, 899, ..., 100
    leading    (arange(N + 1) * (T_last // (N + 1)))[::-1][:-1] + steps_offset
    trailing   round(arange(T_last, 0, -T/N)) - 1                      (as elsewhere)

T_last = T unless ``lambda_min_clipped`` cuts off the noisiest steps. With
``use_karras_sigmas`` the sigmas are EDM Eq. (5) between the training schedule's sigma_min
and sigma_max (whatever the spacing), and the timesteps are recovered from them by log-sigma
interpolation and rounded (truncated for the cosine schedule, as diffusers does).

The sampler works on x_t directly, so unlike Euler: ``init_noise_sigma = 1`` and
``scale_model_input`` is the identity. UniPC shares all of this and the first-order update:
that code is :class:`~diffusion_np.samplers.base.DataPredictionSampler`'s; this file holds
DPM-Solver++'s second-order update and its step.

Code -> paper notation::

    sigmas[i]                s_i = sigma_{t_i} / alpha_{t_i} (k-diffusion sigma)
    alpha_t, sigma_t         alpha_{t_i}, sigma_{t_i} (VP coefficients)
    x0_pred                  x_theta(x_{t_i}, t_i), "D_i" / "m_i" in Algorithm 2
    _model_outputs[-2]       m_{i-1}, the previous step's x_0 estimate
    _lower_order_nums        how many steps have run (0 -> first order)

Left out: algorithm types "dpmsolver" (noise prediction) and the SDE variants, solver_order 3,
solver_type "heun", thresholding, learned variance outputs, Lu lambdas, exponential/beta/flow
sigmas, custom timesteps.
"""

from __future__ import annotations

import math

from diffusion_np.samplers.base import DataPredictionSampler, StepOutput
from diffusion_np.schedules import vp_coefficients


class DPMSolverMultistepSampler(DataPredictionSampler):
    """DPM-Solver++(1) / (2M) in data-prediction form (diffusers' ``DPMSolverMultistepScheduler``).

    Parameters follow diffusers: ``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule``, ``trained_betas``, ``solver_order`` (1 or 2), ``prediction_type``,
    ``algorithm_type`` (only "dpmsolver++"), ``lower_order_final``, ``euler_at_final``,
    ``use_karras_sigmas``, ``final_sigmas_type`` ("zero" or "sigma_min"),
    ``lambda_min_clipped``, ``timestep_spacing`` (default ``"linspace"``), ``steps_offset``,
    ``rescale_betas_zero_snr`` (needs v-prediction).
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
        algorithm_type: str = "dpmsolver++",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -math.inf,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        if algorithm_type != "dpmsolver++":
            raise ValueError(
                f"algorithm_type {algorithm_type!r} is not implemented; only 'dpmsolver++' (data prediction) is"
            )
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, solver_order, prediction_type,
            lower_order_final, use_karras_sigmas, final_sigmas_type, lambda_min_clipped, timestep_spacing,
            steps_offset, rescale_betas_zero_snr,
        )  # fmt: skip
        self.algorithm_type = algorithm_type
        self.euler_at_final = euler_at_final

    # ---- the solver: timesteps, sigmas, x_t as the sample, x_theta and the first-order update are
    # ---- DataPredictionSampler's (samplers/base.py, shared with UniPC); the second order is here
    def _second_order_update(self, m0, m1, sample, s_prev: float, s: float, s_next: float):
        """DPM-Solver++(2M), Algorithm 2: the first-order update with D = D0 + (D0 - m1) / (2r), r = h_0 / h."""
        alpha_t, sigma_t = vp_coefficients(s_next)
        _, sigma_s0 = vp_coefficients(s)
        h = math.log(s / s_next)  # lambda_t - lambda_s0 (s_next > 0 here: the final step to 0 is first order)
        h_0 = math.log(s_prev / s)  # lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        exp_neg_h_minus_1 = math.expm1(-h)  # e^{-h} - 1 (expm1: exact for small h)
        return (sigma_t / sigma_s0) * sample - (alpha_t * exp_neg_h_minus_1) * D0 - (
            0.5 * alpha_t * exp_neg_h_minus_1
        ) * D1

    def step(self, model_output, t, sample, noise=None, rng=None) -> StepOutput:
        """One multistep DPM-Solver++ step from sigmas[i] to sigmas[i+1].

        ``noise`` and ``rng`` are accepted for a uniform loop and unused (the solver is deterministic).
        """
        self._check_output(model_output, sample)
        i = self._current_index(t)
        n = len(self.timesteps)
        # the last step is first order whenever it goes to sigma = 0 (h = inf), or when asked
        # (lower_order_final: "improves stability for fewer than 15 steps", diffusers)
        lower_order_final = i == n - 1 and (
            self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
        )
        s, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        # a step of length h = 0 ("trailing" ends at t = 0, and final_sigmas_type="sigma_min" repeats its
        # sigma) is the identity, which the first-order update gives exactly; the second order divides by h
        lower_order_final = lower_order_final or s_next == s

        # 1. the x_0 estimate at this step, and the history (newest last)
        x0_pred = self._data_prediction(model_output, sample, s)
        self._model_outputs = self._model_outputs[1:] + [x0_pred]

        # 2. first order at the start (no history), at the end, or always for solver_order = 1
        if self.solver_order == 1 or self._lower_order_nums < 1 or lower_order_final:
            prev_sample = self._first_order_update(x0_pred, sample, s, s_next)
        else:
            s_prev = float(self.sigmas[i - 1])
            prev_sample = self._second_order_update(x0_pred, self._model_outputs[-2], sample, s_prev, s, s_next)

        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        self._step_index = i + 1
        return StepOutput(prev_sample, x0_pred)
