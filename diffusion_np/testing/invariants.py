"""Invariants of diffusion schedule math, as checks that raise a readable AssertionError.

Each function takes the arrays (or the function) under test, checks one fact
from the papers, and raises ``AssertionError`` naming the timestep, the value
found and the value expected. They are plain functions: call them in a test,
alone or under hypothesis (see :mod:`diffusion_np.testing.strategies`).

Catching a classic bug, ``cumsum`` where ``cumprod`` belongs::

    >>> import numpy as np
    >>> from diffusion_np.testing.invariants import check_alpha_bar
    >>> betas = np.linspace(1e-4, 0.02, 1000)
    >>> check_alpha_bar(np.cumprod(1 - betas))        # right: passes silently
    >>> check_alpha_bar(1 - np.cumsum(betas))         # wrong: 1 - sum(beta) goes negative
    Traceback (most recent call last):
    ...
    AssertionError: alpha_bar must lie in (0, 1]; alpha_bar[312] = -0.00394... is not (first of 688 bad entries)

The facts (DDPM = Ho et al. 2020; Improved DDPM = Nichol & Dhariwal 2021):

* :func:`check_alpha_bar`: alpha_bar_t = prod_{s<=t} (1 - beta_s) is strictly
  decreasing in (0, 1]; exactly 0 is allowed only at the last step, and only
  when asked (zero terminal SNR, Lin et al. 2023).
* :func:`check_forward_variance`: Var[q(x_t | x_0)] = 1 - alpha_bar_t and
  E[x_t | x_0] = sqrt(alpha_bar_t) x_0 (DDPM Eq. 4), both read off the formula
  and measured on samples, with a chi-square bound as the tolerance.
* :func:`check_posterior_variance`: beta_tilde_t = beta_t (1 - ab_{t-1}) / (1 - ab_t)
  (DDPM Eq. 7), equal to the precision-sum form 1 / (1/(1 - ab_{t-1}) + alpha_t/beta_t),
  zero at t = 0, and never above beta_t.
* :func:`check_timesteps`: N distinct integer timesteps in [0, T-1], strictly decreasing.
* :func:`check_conversions_roundtrip`: epsilon, x_0 and v predictions convert back
  to the x_0 and eps that made x_t, to within floating-point error.

Left out: sampler-level invariants (DDIM eta = 1 vs DDPM, no noise at the last
step), which belong with the samplers' own tests.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from diffusion_np.backend import asnumpy
from diffusion_np.diffusion import PREDICTION_TYPES, posterior_variance, q_sample, v_target, x0_and_eps


def _f(x) -> str:
    """A number as Python prints a float (no ``np.float64(...)`` wrapper in messages)."""
    return repr(float(x))


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_alpha_bar(alpha_bar, allow_zero_terminal: bool = False) -> None:
    """alpha_bar is 1-D, finite, in (0, 1] and strictly decreasing.

    ``allow_zero_terminal=True`` also accepts alpha_bar[-1] = 0 exactly (zero terminal SNR).
    """
    ab = np.asarray(asnumpy(alpha_bar), dtype=np.float64)
    assert ab.ndim == 1 and ab.size >= 1, f"alpha_bar must be a non-empty 1-D array, got shape {ab.shape}"
    assert np.all(np.isfinite(ab)), f"alpha_bar must be finite; alpha_bar[{_first_bad(~np.isfinite(ab))}] is not"
    low_ok = ab > 0
    if allow_zero_terminal:
        low_ok[-1] = ab[-1] >= 0
    bad = ~(low_ok & (ab <= 1))
    if np.any(bad):
        i = _first_bad(bad)
        hint = ""
        if not allow_zero_terminal and i == ab.size - 1 and ab[i] == 0:
            hint = " (pass allow_zero_terminal=True for zero terminal SNR)"
        raise AssertionError(
            f"alpha_bar must lie in (0, 1]; alpha_bar[{i}] = {_f(ab[i])} is not "
            f"(first of {int(bad.sum())} bad entries){hint}"
        )
    steps = np.diff(ab)
    if np.any(steps >= 0):
        i = _first_bad(steps >= 0) + 1
        raise AssertionError(
            f"alpha_bar must be strictly decreasing; "
            f"alpha_bar[{i}] = {_f(ab[i])} >= alpha_bar[{i - 1}] = {_f(ab[i - 1])}"
        )


def check_forward_variance(
    alpha_bar,
    t,
    q_sample_fn: Callable = q_sample,
    n_samples: int = 20000,
    x0_value: float = 0.5,
    rng: np.random.Generator | None = None,
    false_alarm: float = 1e-6,
    rtol: float = 1e-9,
) -> np.ndarray:
    """Var[q(x_t | x_0)] = 1 - alpha_bar_t and E[x_t | x_0] = sqrt(alpha_bar_t) x_0 (DDPM Eq. 4).

    ``q_sample_fn(x0, t, noise, alpha_bar)`` is the function under test (default: ours),
    called with x0 of shape (len(t), n) and t an int array (len(t),).

    1. By formula: x_t is affine in (x_0, eps), so q_sample_fn(0, t, 1) is the noise
       coefficient, whose square must be 1 - alpha_bar_t, and q_sample_fn(1, t, 0) the
       signal coefficient sqrt(alpha_bar_t) (relative tolerance ``rtol``).
    2. Empirically: n draws of x_t at x_0 = ``x0_value``. For Gaussian data the sample
       variance s^2 satisfies (n - 1) s^2 / sigma^2 ~ chi^2_{n-1}; the check fails
       when that statistic falls outside the central 1 - ``false_alarm`` interval
       (for n = 20000 and false_alarm = 1e-6: s^2 / sigma^2 within about 1 +- 0.049).
       The sample mean must lie within z sigma / sqrt(n) of sqrt(alpha_bar_t) x_0,
       z the normal quantile of the same rate. The rng is seeded (0) unless given,
       so the check is deterministic; a correct formula fails it with probability
       ~false_alarm per timestep over seeds.

    Returns the measured sample variances, one per t.
    """
    from scipy.stats import chi2, norm

    ab = np.asarray(asnumpy(alpha_bar), dtype=np.float64)
    t = np.atleast_1d(np.asarray(t)).astype(np.int64)
    expected_var = 1.0 - ab[t]
    expected_scale = np.sqrt(ab[t])
    B = t.size
    # 1. formula
    noise_coef = np.asarray(asnumpy(q_sample_fn(np.zeros((B, 1)), t, np.ones((B, 1)), ab))).reshape(B)
    signal_coef = np.asarray(asnumpy(q_sample_fn(np.ones((B, 1)), t, np.zeros((B, 1)), ab))).reshape(B)
    bad = ~np.isclose(noise_coef**2, expected_var, rtol=rtol, atol=0.0)
    if np.any(bad):
        i = _first_bad(bad)
        raise AssertionError(
            f"Var[q(x_t | x_0)] at t={t[i]}: the formula gives (noise coefficient)^2 = {_f(noise_coef[i] ** 2)}, "
            f"expected 1 - alpha_bar_t = {_f(expected_var[i])}"
        )
    bad = ~np.isclose(signal_coef, expected_scale, rtol=rtol, atol=0.0)
    if np.any(bad):
        i = _first_bad(bad)
        raise AssertionError(
            f"E[q(x_t | x_0)] at t={t[i]}: the formula gives x_0 coefficient {_f(signal_coef[i])}, "
            f"expected sqrt(alpha_bar_t) = {_f(expected_scale[i])}"
        )
    # 2. samples
    rng = rng if rng is not None else np.random.default_rng(0)
    n = n_samples
    x0 = np.full((B, n), x0_value)
    x_t = np.asarray(asnumpy(q_sample_fn(x0, t, rng.standard_normal((B, n)), ab)), dtype=np.float64)
    sample_var = x_t.var(axis=1, ddof=1)
    sample_mean = x_t.mean(axis=1)
    lo, hi = chi2.ppf(false_alarm / 2, n - 1) / (n - 1), chi2.ppf(1 - false_alarm / 2, n - 1) / (n - 1)
    ratio = sample_var / expected_var
    bad = (ratio < lo) | (ratio > hi)
    if np.any(bad):
        i = _first_bad(bad)
        raise AssertionError(
            f"Var[q(x_t | x_0)] at t={t[i]}: sample variance {sample_var[i]:.6g} over {n} draws, expected "
            f"1 - alpha_bar_t = {expected_var[i]:.6g}; the chi-square bound at false-alarm rate {false_alarm:g} "
            f"allows [{lo * expected_var[i]:.6g}, {hi * expected_var[i]:.6g}]"
        )
    z = norm.isf(false_alarm / 2)
    allowed = z * np.sqrt(expected_var / n)
    bad = np.abs(sample_mean - expected_scale * x0_value) > allowed
    if np.any(bad):
        i = _first_bad(bad)
        raise AssertionError(
            f"E[q(x_t | x_0)] at t={t[i]}: sample mean {sample_mean[i]:.6g} over {n} draws, expected "
            f"sqrt(alpha_bar_t) x_0 = {expected_scale[i] * x0_value:.6g} +- {allowed[i]:.3g}"
        )
    return sample_var


def check_posterior_variance(alpha_bar, posterior_var=None, rtol: float = 1e-9) -> None:
    """The DDPM posterior variance (Eq. 7) for t = 0..T-1, in three independent forms.

    ``posterior_var``: the (T,) array under test (default: ours, from
    :func:`diffusion_np.diffusion.posterior_variance`). With beta_t = 1 - ab_t / ab_{t-1},
    alpha_t = 1 - beta_t and ab_{-1} = 1:

    1. beta_tilde_t = beta_t (1 - ab_{t-1}) / (1 - ab_t)  (within ``rtol``)
    2. for t >= 1, 1 / beta_tilde_t = 1 / (1 - ab_{t-1}) + alpha_t / beta_t: the
       posterior precision is the sum of the prior's and the likelihood's (the
       product of two Gaussians that gives Eq. 7)
    3. 0 <= beta_tilde_t <= beta_t, and beta_tilde_0 = 0 (floored values up to 1e-20 accepted)
    """
    ab = np.asarray(asnumpy(alpha_bar), dtype=np.float64)
    T = ab.size
    var = posterior_variance(ab) if posterior_var is None else np.asarray(asnumpy(posterior_var), dtype=np.float64)
    assert var.shape == (T,), f"posterior variance must have shape ({T},) like alpha_bar, got {var.shape}"
    assert np.all(np.isfinite(var)), f"posterior variance must be finite; entry {_first_bad(~np.isfinite(var))} is not"
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    betas = 1.0 - ab / ab_prev
    alphas = 1.0 - betas
    # 1. DDPM Eq. 7
    expected = betas * (1.0 - ab_prev) / (1.0 - ab)
    bad = ~np.isclose(var, expected, rtol=rtol, atol=1e-20)
    if np.any(bad):
        i = _first_bad(bad)
        raise AssertionError(
            f"posterior variance at t={i}: got {_f(var[i])}, expected beta_t (1 - alpha_bar_(t-1)) / (1 - alpha_bar_t) "
            f"= {_f(expected[i])} (DDPM Eq. 7)"
        )
    # 2. precision sum
    if T > 1:
        precision = 1.0 / (1.0 - ab_prev[1:]) + alphas[1:] / betas[1:]
        bad = ~np.isclose(var[1:] * precision, 1.0, rtol=max(rtol, 1e-12), atol=0.0)
        if np.any(bad):
            i = _first_bad(bad) + 1
            raise AssertionError(
                f"posterior variance at t={i}: got {_f(var[i])}, but 1 / (1/(1 - alpha_bar_(t-1)) + alpha_t / beta_t) "
                f"= {_f(1.0 / precision[i - 1])}"
            )
    # 3. bounds
    assert var[0] <= 1e-20, f"posterior variance at t=0 must be 0 (x_0 is known), got {_f(var[0])}"
    bad = (var < 0) | (var > betas * (1.0 + rtol))
    if np.any(bad):
        i = _first_bad(bad)
        raise AssertionError(f"posterior variance at t={i} must lie in [0, beta_t = {_f(betas[i])}], got {_f(var[i])}")


def check_timesteps(timesteps, T: int, N: int, integer: bool = True) -> None:
    """N timesteps, strictly decreasing, within [0, T-1] (integers unless ``integer=False``)."""
    ts = np.asarray(asnumpy(timesteps))
    assert ts.ndim == 1, f"timesteps must be 1-D, got shape {ts.shape}"
    assert ts.size == N, f"expected {N} timesteps, got {ts.size}: {ts.tolist()[:8]}{'...' if ts.size > 8 else ''}"
    if integer:
        assert np.issubdtype(ts.dtype, np.integer), f"timesteps must be integers, got dtype {ts.dtype}"
    bad = (ts < 0) | (ts > T - 1)
    if np.any(bad):
        i = _first_bad(bad)
        raise AssertionError(f"timesteps must lie in [0, {T - 1}]; timesteps[{i}] = {ts[i]}")
    steps = np.diff(ts)
    if np.any(steps >= 0):
        i = _first_bad(steps >= 0) + 1
        raise AssertionError(
            f"timesteps must be strictly decreasing; timesteps[{i}] = {ts[i]} >= timesteps[{i - 1}] = {ts[i - 1]}"
        )


def check_conversions_roundtrip(
    alpha_bar,
    t,
    x0,
    noise,
    to_x0_eps: Callable = x0_and_eps,
    v_fn: Callable = v_target,
    tol: float | None = None,
) -> None:
    """Every prediction type converts back to the x_0 and eps that made x_t.

    x_t = q_sample(x0, t, noise); the output a perfect network would give is
    ``noise`` ("epsilon"), ``x0`` ("sample") or ``v_fn(x0, noise, t, alpha_bar)``
    ("v_prediction"); ``to_x0_eps(output, x_t, t, alpha_bar, prediction_type)`` (default:
    ours) must return (x0, noise) back.

    Tolerance: ``tol`` (default 100 machine epsilons of the data's dtype) times
    (1 + |x0| + |noise|) times the conversion's amplification: 1 / sqrt(alpha_bar_t) for
    x_0 from eps, 1 / sqrt(1 - alpha_bar_t) for eps from x_0, 1 for v. Epsilon is
    skipped where alpha_bar_t = 0, where x_0 is undefined (zero terminal SNR).
    """
    x0 = np.asarray(asnumpy(x0))
    noise = np.asarray(asnumpy(noise))
    ab = np.asarray(asnumpy(alpha_bar), dtype=np.float64)
    t = np.asarray(t)
    tol = 100 * float(np.finfo(x0.dtype).eps) if tol is None else tol
    size = 1.0 + float(np.max(np.abs(x0))) + float(np.max(np.abs(noise)))
    ab_t = ab[t].reshape((-1,) + (1,) * (x0.ndim - 1)) if t.ndim == 1 else ab[t]
    for prediction_type in PREDICTION_TYPES:
        keep = np.ones(x0.shape[0], dtype=bool) if t.ndim == 1 else np.array(True)
        if prediction_type == "epsilon":
            keep = np.asarray(ab[t] > 0)
            if not np.any(keep):
                continue
        if t.ndim == 1:
            xs, ns, ts, abs_ = x0[keep], noise[keep], t[keep], ab_t[keep]
        else:
            xs, ns, ts, abs_ = x0, noise, t, ab_t
        x_t = q_sample(xs, ts, ns, ab)
        output = {"epsilon": ns, "sample": xs, "v_prediction": None}[prediction_type]
        if output is None:
            output = np.asarray(asnumpy(v_fn(xs, ns, ts, ab)))
        x0_rec, eps_rec = (np.asarray(asnumpy(a)) for a in to_x0_eps(output, x_t, ts, ab, prediction_type))
        amp_x0 = 1.0 / np.sqrt(abs_) if prediction_type == "epsilon" else np.ones_like(abs_)
        amp_eps = 1.0 / np.sqrt(1.0 - abs_) if prediction_type == "sample" else np.ones_like(abs_)
        for name, got, want, amp in (("x0", x0_rec, xs, amp_x0), ("eps", eps_rec, ns, amp_eps)):
            err = np.abs(got.astype(np.float64) - want)
            allowed = tol * size * amp
            if np.any(err > allowed):
                idx = np.unravel_index(int(np.argmax(err - allowed)), err.shape)
                t_at = int(ts[idx[0]]) if ts.ndim == 1 else int(ts)
                raise AssertionError(
                    f"{prediction_type} round trip at t={t_at}: recovered {name} = {_f(got[idx])}, true {name} = "
                    f"{_f(want[idx])} (error {err[idx]:.3g} > allowed {np.broadcast_to(allowed, err.shape)[idx]:.3g})"
                )
