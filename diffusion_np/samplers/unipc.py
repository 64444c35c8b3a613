"""UniPC: a multistep predictor with a free corrector (Zhao et al. 2023; diffusers' UniPCMultistepScheduler).

Zhao, Bai, Rao, Zhou and Lu, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models" (NeurIPS 2023). Notation as in DPM-Solver++
(:mod:`diffusion_np.samplers.dpm_solver`): alpha_t = sqrt(alpha_bar_t),
sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t), and the data
prediction m = x_theta(x_t, t) (the x_0 estimate; ``predict_x0=True``, diffusers' and SD's
default). One step goes from s0 = t_i to t = t_{i+1} with h = lambda_t - lambda_s0 > 0.

The exact solution of the probability-flow ODE in data-prediction form is DPM-Solver++'s;
UniPC expands x_theta around s0 with divided differences of the earlier estimates
m_k at s_k = t_{i-k}::

    r_k = (lambda_{s_k} - lambda_s0) / h              (negative: the s_k lie behind)
    D_k = (m_k - m0) / r_k

and uses B(h), a free scale of the higher-order terms: ``solver_type="bh1"`` B(h) = h,
``"bh2"`` B(h) = e^h - 1 (diffusers' default; both written for the data prediction's
-h, as diffusers does: B = -h or e^{-h} - 1).

UniP-p, the predictor (Sec. 3.2, Algorithm 2 of the paper), for order p = 1, 2::

    x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^{-h} - 1) m0 - alpha_t B(h) sum_{k<p} rho_k D_k

with rho_1 = 1/2 for p = 2. For p = 1 it is DDIM (DPM-Solver++(1)); with bh2 and p = 2 it
is exactly DPM-Solver++(2M). UniC-p, the corrector (Sec. 3.1, Algorithm 1), runs after the
model has been evaluated at the predicted x_t: with m_t = x_theta(x_t, t) and D_t = m_t - m0,
it redoes the same step with one more term::

    x_t^c = (sigma_t / sigma_s0) x_s0 - alpha_t (e^{-h} - 1) m0
            - alpha_t B(h) (sum_{k<p} rho_k^c D_k + rho_t^c D_t)

and the next predictor starts from x_t^c. The weights solve R rho = b (the order conditions), with R[j, k] = r_k^j for
j = 0..p-1 (r_t = 1) and b from the phi-functions of the exponential integrator at -h;
written out for p <= 2::

    g_1 = (e^{-h} - 1) / (-h) - 1,   g_2 = g_1 / (-h) - 1/2
    b_1 = g_1 / B(h),                b_2 = 2 g_2 / B(h)
    p = 1:  rho_t^c = 1/2                                 (diffusers' UniC-1)
    p = 2:  rho_1^c = (b_1 - b_2) / (1 - r_1),  rho_t^c = b_1 - rho_1^c

The corrector costs no model call: m_t is the next step's model output anyway, and it is
kept as the history m0 for the steps that follow (not re-evaluated at x_t^c). The
corrector after the last step would need one more call, so the final sample is the
last predictor's.

Orders, as in diffusers: the first step is order 1 (no history); with ``lower_order_final``
the last step is order 1; the corrector at step i uses the order of step i - 1's
predictor; ``disable_corrector`` lists steps j whose result is *not* corrected (the
corrector run at step j + 1 is skipped). The last step goes to sigma = 0 (h = inf) by
default, where only the first-order update is defined: it is first order here whatever
``lower_order_final`` says (diffusers divides by h = inf there and returns NaN).

Timesteps, sigmas, ``add_noise``, ``init_noise_sigma = 1``, the identity
``scale_model_input`` and the first-order update are DPM-Solver++'s (diffusers lays out both
schedulers alike): both classes extend :class:`~diffusion_np.samplers.base.DataPredictionSampler`,
and this one writes UniPC's step.

Code -> paper notation::

    sigmas[i]                s_i = sigma_{t_i} / alpha_{t_i} (k-diffusion sigma), lambda_i = -log s_i
    x0_pred                  m_t = x_theta(x_t, t), the data prediction
    _model_outputs[-1], [-2] m0, m1: the estimates at s0 and s1
    _last_sample             x_s0, the start of the step being corrected
    _this_order              p of the step just predicted (the corrector's order)
    r1, D1                   r_1, D_1
    B_h                      B(h) at -h

Left out: ``predict_x0=False`` (noise prediction), ``solver_order`` 3 and up, ``solver_p``
(another scheduler as predictor), thresholding, exponential/beta/flow sigmas, dynamic
shifting, custom sigmas.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_np.samplers.base import DataPredictionSampler, StepOutput
from diffusion_np.samplers.timesteps import sigma_to_t
from diffusion_np.schedules import vp_coefficients

#: diffusers maps its DPM-Solver solver types to bh2 (UniPCMultistepScheduler.__init__)
SOLVER_TYPES = {"bh1": "bh1", "bh2": "bh2", "midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}


class UniPCSampler(DataPredictionSampler):
    """UniPC with the data prediction, orders 1 and 2 (diffusers' ``UniPCMultistepScheduler``).

    Parameters follow diffusers: ``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule``, ``trained_betas``, ``solver_order`` (1 or 2), ``prediction_type``,
    ``thresholding`` (only False), ``dynamic_thresholding_ratio`` and ``sample_max_value``
    (accepted, unused without thresholding), ``predict_x0`` (only True), ``solver_type``
    ("bh1" or "bh2"; DPM-Solver's names map to "bh2" as in diffusers), ``lower_order_final``,
    ``disable_corrector``, ``solver_p`` (only None), ``use_karras_sigmas``,
    ``timestep_spacing`` (default ``"linspace"``), ``steps_offset``, ``final_sigmas_type``,
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
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector=(),
        solver_p=None,
        use_karras_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        if not predict_x0:
            raise ValueError("UniPCSampler: predict_x0=False (the noise-prediction variant) is not implemented")
        if solver_p is not None:
            raise ValueError("UniPCSampler: solver_p (another scheduler as the predictor) is not supported")
        if thresholding:
            raise ValueError("UniPCSampler: thresholding=True is not implemented (it is for pixel models)")
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"UniPCSampler: solver_type must be one of {sorted(SOLVER_TYPES)}, got {solver_type!r}")
        if isinstance(disable_corrector, (int, str)) or not all(
            isinstance(j, (int, np.integer)) for j in disable_corrector
        ):
            raise ValueError(f"disable_corrector must be a list of step indices, got {disable_corrector!r}")
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, solver_order, prediction_type,
            lower_order_final=lower_order_final, use_karras_sigmas=use_karras_sigmas,
            final_sigmas_type=final_sigmas_type, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )  # fmt: skip
        self.solver_type = SOLVER_TYPES[solver_type]
        self.predict_x0 = True
        self.disable_corrector = [int(j) for j in disable_corrector]
        self.thresholding = False
        self.dynamic_thresholding_ratio = dynamic_thresholding_ratio
        self.sample_max_value = sample_max_value

    def _reset_state(self) -> None:
        super()._reset_state()
        self._last_sample = None  # x_s0 of the step the next call corrects
        self._this_order = 1  # order of that step's predictor

    def set_timesteps(self, num_inference_steps: int) -> None:
        """DPM-Solver++'s timesteps and sigmas; with Karras sigmas the timesteps are rounded for every schedule."""
        super().set_timesteps(num_inference_steps)
        if self.use_karras_sigmas:  # diffusers' UniPC rounds; its DPM-Solver truncates for the cosine schedule
            self.timesteps = sigma_to_t(self.sigmas[:-1], np.log(self.train_sigmas)).round().astype(np.int64)

    # ---- the two halves of UniPC -------------------------------------------------------
    def _b_of_h(self, hh: float) -> float:
        """B(h) at hh = -h: -h (bh1) or e^{-h} - 1 (bh2)."""
        return hh if self.solver_type == "bh1" else math.expm1(hh)

    def _predictor(self, sample, i: int, order: int):
        """UniP-p from sigmas[i] to sigmas[i + 1] with the history in ``_model_outputs`` (m0 newest)."""
        m0 = self._model_outputs[-1]
        s0, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if order == 1:  # DDIM / DPM-Solver++(1); also the step to sigma = 0 (e^{-h} = s_next / s0 = 0)
            return self._first_order_update(m0, sample, s0, s_next)
        alpha_t, sigma_t = vp_coefficients(s_next)
        _, sigma_s0 = vp_coefficients(s0)
        h = math.log(s0 / s_next)  # lambda_t - lambda_s0
        hh = -h
        r1 = math.log(s0 / float(self.sigmas[i - 1])) / h  # (lambda_s1 - lambda_s0) / h < 0
        D1 = (self._model_outputs[-2] - m0) * (1.0 / r1)
        h_phi_1 = math.expm1(hh)  # e^{-h} - 1
        x_t = (sigma_t / sigma_s0) * sample - (alpha_t * h_phi_1) * m0
        return x_t - (alpha_t * self._b_of_h(hh) * 0.5) * D1  # rho_1 = 1/2

    def _corrector(self, m_t, last_sample, sample, i: int, order: int):
        """UniC-p: redo the step sigmas[i - 1] -> sigmas[i] from ``last_sample`` with D_t = m_t - m0."""
        m0 = self._model_outputs[-1]
        s0, s_t = float(self.sigmas[i - 1]), float(self.sigmas[i])
        alpha_t, sigma_t = vp_coefficients(s_t)
        _, sigma_s0 = vp_coefficients(s0)
        h = math.log(s0 / s_t)  # lambda_t - lambda_s0 (finite: only the last step reaches sigma = 0)
        hh = -h
        h_phi_1 = math.expm1(hh)
        B_h = self._b_of_h(hh)
        x_t = (sigma_t / sigma_s0) * last_sample - (alpha_t * h_phi_1) * m0
        D_t = m_t - m0
        if order == 1:
            return x_t - (alpha_t * B_h * 0.5) * D_t  # rho_t^c = 1/2
        # order 2: solve [[1, 1], [r1, 1]] (rho_1, rho_t) = (b_1, b_2)
        r1 = math.log(s0 / float(self.sigmas[i - 2])) / h  # (lambda_s1 - lambda_s0) / h
        D1 = (self._model_outputs[-2] - m0) * (1.0 / r1)
        g1 = h_phi_1 / hh - 1.0
        g2 = g1 / hh - 0.5
        b1, b2 = g1 / B_h, 2.0 * g2 / B_h
        rho_1 = (b1 - b2) / (1.0 - r1)
        rho_t = b1 - rho_1
        return x_t - (alpha_t * B_h) * (rho_1 * D1 + rho_t * D_t)

    def step(self, model_output, t, sample, noise=None, rng=None) -> StepOutput:
        """One UniPC step: correct the sample the model just saw (UniC), then predict the next one (UniP).

        ``noise`` and ``rng`` are accepted for a uniform loop and unused (the solver is deterministic).
        Returns StepOutput(prev_sample = the predictor's x at sigmas[i + 1], pred_original_sample = m_t).
        """
        i = self._current_index(t)
        self._check_output(model_output, sample)
        n = len(self.timesteps)

        # 1. the data prediction m_t at the (uncorrected) sample the model was given
        x0_pred = self._data_prediction(model_output, sample, float(self.sigmas[i]))

        # 2. UniC: correct the previous step with m_t, before m_t enters the history
        if i > 0 and (i - 1) not in self.disable_corrector and self._last_sample is not None:
            sample = self._corrector(x0_pred, self._last_sample, sample, i, self._this_order)

        # 3. history, newest last
        self._model_outputs = self._model_outputs[1:] + [x0_pred]

        # 4. this step's order: 1 at the start (warm-up), at the end with lower_order_final, and into sigma = 0
        order = min(self.solver_order, n - i) if self.lower_order_final else self.solver_order
        order = min(order, self._lower_order_nums + 1)
        if float(self.sigmas[i + 1]) in (0.0, float(self.sigmas[i])):  # into sigma = 0, or a step of length 0
            order = 1
        self._this_order = order
        self._last_sample = sample

        # 5. UniP: the predictor from the corrected sample
        prev_sample = self._predictor(sample, i, order)

        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        self._step_index = i + 1
        return StepOutput(prev_sample, x0_pred)
