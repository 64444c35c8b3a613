"""PNDM: pseudo numerical methods on the DDIM manifold (Liu et al. 2022; diffusers' PNDMScheduler).

Liu, Ren, Lin and Zhao, "Pseudo Numerical Methods for Diffusion Models on Manifolds"
(ICLR 2022). A classical ODE solver applied to the probability-flow ODE leaves the
region where the network was trained. PNDM keeps DDIM's step as the "transfer part"
phi, which stays on that region, and lets a classical method choose only the noise
estimate e' that phi is given (the "gradient part", Sec. 3.3).

The transfer part, PNDM Eq. (9), from t to t - delta (DDIM Eq. 12 with eta = 0, rearranged)::

    phi(x_t, e, t, t - delta) = sqrt(ab_prev / ab_t) x_t
                                - (ab_prev - ab_t) / (ab_t sqrt(1 - ab_prev) + sqrt(ab_t (1 - ab_t) ab_prev)) e

with ab_t = alpha_bar_t and ab_prev = alpha_bar_{t - delta}. Algebraically it is
sqrt(ab_prev) x0_pred + sqrt(1 - ab_prev) e, with x0_pred = (x_t - sqrt(1 - ab_t) e) / sqrt(ab_t).

The gradient part, with e_t = eps_theta(x_t, t) (Sec. 3.3):

* pseudo linear multi-step (PLMS), one model call per step, Adams-Bashforth weights
  on the last four estimates::

      e' = (55 e_t - 59 e_{t+delta} + 37 e_{t+2 delta} - 9 e_{t+3 delta}) / 24
      x_{t-delta} = phi(x_t, e', t, t - delta)

* pseudo Runge-Kutta (PRK), four model calls per step, the classical RK4 weights::

      e1 = e(x_t, t)                          x1 = phi(x_t, e1, t, t - delta/2)
      e2 = e(x1, t - delta/2)                 x2 = phi(x_t, e2, t, t - delta/2)
      e3 = e(x2, t - delta/2)                 x3 = phi(x_t, e3, t, t - delta)
      e4 = e(x3, t - delta)
      e' = (e1 + 2 e2 + 2 e3 + e4) / 6        x_{t-delta} = phi(x_t, e', t, t - delta)

PLMS needs three earlier estimates. The paper's PNDM starts with three PRK steps
(12 model calls, ``skip_prk_steps=False``, diffusers' default). Stable Diffusion runs
``skip_prk_steps=True`` (its ``scheduler_config.json``), and so does this sampler by
default, so that any number of steps works (PRK needs at least 4; diffusers' configs
always name the field, so a loaded config keeps its own value). The warm-up is then a
linear multistep of growing order, as diffusers does it::

    step 0 (two calls)   predictor  x' = phi(x_0, e_0, t_0, t_1)              (Euler)
                         corrector  x_1 = phi(x_0, (e_0 + e(x', t_1)) / 2, t_0, t_1)   (Heun / trapezoid)
    step 1               e' = (3 e_1 - e_0) / 2                              (Adams-Bashforth 2)
    step 2               e' = (23 e_2 - 16 e_1 + 5 e_0) / 12                 (Adams-Bashforth 3)
    step 3, ...          the 4-step formula above

where e_i is the estimate at the *corrected* x_i (the predictor's e(x', t_1) is used once
and dropped). Each step is one call of ``step``, so the warm-up's extra call shows in
``timesteps`` as a repeated entry (N steps, N + 1 entries; PRK: N + 9 entries)::

    skip_prk_steps=True    t_0, t_1, t_1, t_2, ..., t_{N-1}
    skip_prk_steps=False   t_0, m_0, m_0, t_1,  t_1, m_1, m_1, t_2,  t_2, m_2, m_2, t_3,  t_3, t_4, ..., t_{N-1}

with m_i the PRK half step (see ``prev_timestep_rule`` below). After the last step
alpha_bar is 1 (``set_alpha_to_one=True``) or alpha_bar[0] (False, diffusers' default and
Stable Diffusion's), as in DDIM.

Which timesteps a transfer goes between (``prev_timestep_rule``), with g = T // N:

* ``"stride"`` (the default, diffusers' ``PNDMScheduler``): a step at t goes to t - g, and
  the warm-up's corrector starts from t_1 + g; PRK's half steps are m_i = t_{i+1} + g // 2,
  and its first stage goes to t_i - g // 2 (which is m_i + 1 when g is odd, while the model
  is then asked at m_i). Where every gap of the sequence is g ("leading", SD's spacing;
  "trailing" when N divides T) and g is even, this is the sequence below.
* ``"sequence"``: the transfers follow the sequence: a step goes to the next entry (the final
  alpha_bar after the last), the corrector starts from t_0, and PRK's half steps are
  m_i = t_{i+1} + (t_i - t_{i+1}) // 2 both ways. Where the gaps are uneven ("linspace",
  "trailing" with N not dividing T) diffusers' transfers land on noise levels the sequence never
  visits, which the paper's method does not do, and the results differ visibly (1e-3 relative
  and more).

The multistep weights combine the raw model outputs, and a v-prediction is converted to
eps afterwards, at the x and t the transfer starts from (eps = sqrt(ab_t) v + sqrt(1 - ab_t) x),
as diffusers does: for ``prediction_type="v_prediction"`` that is not the same as
combining the eps of each earlier step, and we keep diffusers' numbers.

Code -> paper notation::

    model_output          e_t = eps_theta(x_t, t) (or v, converted in the transfer)
    _ets                  the estimates at the last full steps, oldest first (at most 4)
    eps_prime             e', the gradient part's noise estimate
    _transfer             phi, PNDM Eq. (9)
    _start_sample         x_t of the step in progress (corrector call, PRK calls 2-4)

Left out: ``prediction_type="sample"`` (diffusers' PNDM refuses it too), zero terminal SNR
(diffusers' PNDM has no such option), starting mid-schedule (image-to-image: the
warm-up assumes the sequence from its first entry; use DDIM or DPM-Solver++ there).
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_np.diffusion import x0_and_eps
from diffusion_np.samplers.base import Sampler, StepOutput
from diffusion_np.samplers.timesteps import PREV_TIMESTEP_RULES, make_timesteps

#: Adams-Bashforth weights by order, newest estimate first (PLMS warm-up and PNDM's 4-step formula)
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}


def pndm_transfer(sample, eps, alpha_bar_t: float, alpha_bar_prev: float):
    """phi(x_t, e, t, t - delta), PNDM Eq. (9): DDIM's deterministic step, in the paper's arrangement.

    ``sample`` (B, ..., C) is x_t, ``eps`` (same shape) the noise estimate e; the result is x_{t-delta}.
    """
    ab_t, ab_prev = alpha_bar_t, alpha_bar_prev
    sample_coeff = math.sqrt(ab_prev / ab_t)
    # the denominator of Eq. (9): sqrt(ab_t) (sqrt(ab_t (1 - ab_prev)) + sqrt((1 - ab_t) ab_prev))
    denom = ab_t * math.sqrt(1.0 - ab_prev) + math.sqrt(ab_t * (1.0 - ab_t) * ab_prev)
    return sample_coeff * sample - ((ab_prev - ab_t) / denom) * eps


class PNDMSampler(Sampler):
    """PNDM / PLMS (Liu et al. 2022), diffusers ``PNDMScheduler`` keywords and defaults.

    Parameters beyond :class:`~diffusion_np.samplers.base.Sampler`'s
    ----------------------------------------------------------------
    skip_prk_steps : bool
        True (default here; Stable Diffusion's config): PLMS from the start with the linear
        multistep warm-up. False (diffusers' default, the paper's PNDM): three pseudo Runge-Kutta
        steps, then PLMS; needs ``num_inference_steps >= 4``.
    set_alpha_to_one : bool
        alpha_bar after the last step: 1 (True) or alpha_bar[0] (False, Stable Diffusion).
    prediction_type : "epsilon" or "v_prediction"
    prev_timestep_rule : "stride" | "sequence"
        Where a transfer goes: t - T // N ("stride", diffusers') or the next entry of the
        sequence ("sequence"); see the module docstring.

    Loop (one model call per entry of ``timesteps``)::

        sampler.set_timesteps(N)
        for t in sampler.timesteps:
            x = sampler.step(model(x, t), t, x).prev_sample
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        skip_prk_steps: bool = True,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        prev_timestep_rule: str = "stride",
    ) -> None:
        if prev_timestep_rule not in PREV_TIMESTEP_RULES:
            raise ValueError(f"prev_timestep_rule must be one of {PREV_TIMESTEP_RULES}, got {prev_timestep_rule!r}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"PNDMSampler: prediction_type must be 'epsilon' or 'v_prediction' (PLMS extrapolates a noise "
                f"estimate, as diffusers' PNDMScheduler does), got {prediction_type!r}"
            )
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            prediction_type, timestep_spacing, steps_offset,
        )  # fmt: skip
        self.skip_prk_steps = bool(skip_prk_steps)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.prev_timestep_rule = prev_timestep_rule
        self.step_timesteps: np.ndarray | None = None  # the N distinct timesteps, without repeats
        self._num_prk_calls = 0
        self._reset_state()

    def _reset_state(self) -> None:
        self.counter = 0  # calls of step since set_timesteps
        self._ets: list = []  # model outputs at the last full steps, oldest first
        self._start_sample = None  # x_t of a step that takes several calls
        self._rk_sum = None  # (e1 + 2 e2 + 2 e3) / 6 of the PRK step in progress

    # ---- schedule -------------------------------------------------------------------------
    @property
    def final_alpha_bar(self) -> float:
        """alpha_bar after the last step: 1 or alpha_bar[0], by ``set_alpha_to_one``."""
        return 1.0 if self.set_alpha_to_one else float(self.alpha_bar[0])

    def _alpha_bar_at(self, t: int) -> float:
        """alpha_bar_t, or the final alpha_bar for t = -1 (after the last step)."""
        return float(self.alpha_bar[t]) if t >= 0 else self.final_alpha_bar

    def set_timesteps(self, num_inference_steps: int) -> None:
        """The N steps (``step_timesteps``) and the calls that visit them (``timesteps``, with repeats)."""
        steps = make_timesteps(num_inference_steps, self.num_train_timesteps, self.timestep_spacing, self.steps_offset)
        self.num_inference_steps = num_inference_steps
        if self.skip_prk_steps:
            prk = []
            # t_0, t_1, t_1, t_2, ...: the warm-up's corrector repeats t_1 (N = 1: just t_0)
            plms = list(steps[:1]) + list(steps[1:2]) + list(steps[1:])
        else:
            if len(steps) < 4:
                raise ValueError(
                    f"PNDMSampler with skip_prk_steps=False needs num_inference_steps >= 4 (three pseudo Runge-Kutta "
                    f"steps, then PLMS), got {num_inference_steps}; use skip_prk_steps=True for fewer steps"
                )
            prk = []
            for i in range(3):  # t_i, m_i, m_i, t_{i+1} for each of the three PRK steps
                t, t_next = int(steps[i]), int(steps[i + 1])
                mid = t_next + self._half_gap(t, t_next)
                prk += [t, mid, mid, t_next]
            plms = list(steps[3:])
        self.timesteps = np.array(prk + plms, dtype=np.int64)
        self.step_timesteps = steps
        self._num_prk_calls = len(prk)
        self._reset_state()

    def _stride(self) -> int:
        """g = T // N, the step of the "stride" rule."""
        return self.num_train_timesteps // self.num_inference_steps

    def _half_gap(self, t: int, t_next: int) -> int:
        """A PRK half step: g // 2 ("stride") or half the gap t - t_next ("sequence"), rounded down."""
        return self._stride() // 2 if self.prev_timestep_rule == "stride" else (t - t_next) // 2

    def previous_timestep(self, t) -> int:
        """Where the step at t goes: t - T // N ("stride") or the step after t in ``step_timesteps``
        ("sequence"); negative after the last step."""
        self._require_timesteps()
        if self.prev_timestep_rule == "stride":
            return int(t) - self._stride()
        index = np.flatnonzero(self.step_timesteps == int(t))
        if index.size == 0:
            raise ValueError(f"timestep {t} is not one of this sampler's steps {self.step_timesteps.tolist()}")
        i = int(index[0])
        return int(self.step_timesteps[i + 1]) if i + 1 < len(self.step_timesteps) else -1

    # ---- the step -------------------------------------------------------------------------
    def _transfer(self, sample, model_output, t: int, t_prev: int):
        """phi (Eq. 9) from t to t_prev with the model output converted to eps at (sample, t); also x0_pred."""
        x0_pred, eps = x0_and_eps(model_output, sample, t, self.alpha_bar, self.prediction_type)
        return pndm_transfer(sample, eps, float(self.alpha_bar[t]), self._alpha_bar_at(t_prev)), x0_pred

    def step(self, model_output, t, sample, noise=None, rng=None) -> StepOutput:
        """One call: the next entry of ``timesteps`` (a PRK stage, the warm-up's predictor or corrector, or PLMS).

        Parameters
        ----------
        model_output : array (B, ..., C)
            The network's output at (sample, t), of this sampler's ``prediction_type``.
        t : int
            ``timesteps[counter]``: the entries of ``timesteps`` in order.
        sample : array (B, ..., C)
            The sample the model was given.
        noise, rng
            Accepted for a uniform loop and unused (PNDM is deterministic).

        Returns
        -------
        StepOutput(prev_sample, pred_original_sample): the sample for the next entry of ``timesteps``,
        and the x_0 estimate of the transfer's noise estimate at its start.
        """
        self._require_timesteps()
        self._check_output(model_output, sample)
        k = self.counter
        if k >= len(self.timesteps):
            raise RuntimeError(f"PNDMSampler: all {len(self.timesteps)} calls are done; call set_timesteps again")
        if int(t) != int(self.timesteps[k]):
            raise ValueError(
                f"PNDMSampler: expected timestep {int(self.timesteps[k])} (call {k}), got {t}; call step with the "
                "entries of sampler.timesteps, in order, from the first (the warm-up keeps state between calls, "
                "so PNDM cannot start mid-schedule: use DDIM, DPM-Solver++ or UniPC for image-to-image)"
            )
        if k < self._num_prk_calls:
            out = self._step_prk(model_output, k, sample)
        else:
            out = self._step_plms(model_output, int(t), sample)
        self.counter = k + 1
        return out

    def _step_prk(self, model_output, k: int, sample) -> StepOutput:
        """Call k of the pseudo Runge-Kutta warm-up (stage k % 4 of PRK step k // 4), Sec. 3.3."""
        stage, start = k % 4, k - k % 4
        t_start, t_mid, t_end = (int(self.timesteps[start + j]) for j in (0, 1, 3))
        if stage == 0:  # e1 at x_t: the step starts here; e1 is also PLMS's history
            self._start_sample = sample
            self._ets.append(model_output)
            self._rk_sum = model_output * (1.0 / 6.0)
            # x1 = phi(x_t, e1, t, t - delta/2): m_i, or t_i - g // 2 by diffusers' stride rule
            t_half = t_start - self._stride() // 2 if self.prev_timestep_rule == "stride" else t_mid
            eps_prime, t_to = model_output, t_half
        elif stage == 1:  # e2 at x1
            self._rk_sum = self._rk_sum + model_output * (1.0 / 3.0)
            eps_prime, t_to = model_output, t_mid  # x2 = phi(x_t, e2, t, t - delta/2)
        elif stage == 2:  # e3 at x2
            self._rk_sum = self._rk_sum + model_output * (1.0 / 3.0)
            eps_prime, t_to = model_output, t_end  # x3 = phi(x_t, e3, t, t - delta)
        else:  # e4 at x3: e' = (e1 + 2 e2 + 2 e3 + e4) / 6
            eps_prime, t_to = self._rk_sum + model_output * (1.0 / 6.0), t_end
            self._rk_sum = None
        prev_sample, x0_pred = self._transfer(self._start_sample, eps_prime, t_start, t_to)
        return StepOutput(prev_sample, x0_pred)

    def _step_plms(self, model_output, t: int, sample) -> StepOutput:
        """A pseudo linear multi-step call at t (or the warm-up's corrector, call 1 with skip_prk_steps)."""
        if self.skip_prk_steps and self.counter == 1:
            # corrector of step 0: the trapezoid (e_0 + e(x', t_1)) / 2 from x_0; e(x', t_1) is not kept
            eps_prime = (model_output + self._ets[-1]) * 0.5
            t_from = t + self._stride() if self.prev_timestep_rule == "stride" else int(self.step_timesteps[0])
            t_to, x_from = t, self._start_sample
            self._start_sample = None
        else:
            # 1. keep the last four estimates, this one newest
            self._ets = self._ets[-3:] + [model_output]
            if len(self._ets) == 1:  # step 0: Euler predictor; x_0 is kept for the corrector
                self._start_sample = sample
            # 2. e' = Adams-Bashforth of the order the history allows (4: PNDM's PLMS formula)
            weights = ADAMS_BASHFORTH[len(self._ets)]
            eps_prime = weights[0] * self._ets[-1]
            for j in range(1, len(weights)):
                eps_prime = eps_prime + weights[j] * self._ets[-1 - j]
            t_from, t_to, x_from = t, self.previous_timestep(t), sample
        # 3. x_{t-delta} = phi(x_t, e', t, t - delta)
        prev_sample, x0_pred = self._transfer(x_from, eps_prime, t_from, t_to)
        return StepOutput(prev_sample, x0_pred)
