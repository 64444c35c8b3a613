"""The forward process and the three ways a network can describe the noise.

Forward process, closed form (DDPM Eq. 4)::

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,      eps ~ N(0, I)

A network sees x_t and t and predicts one of (code name -> meaning):

    "epsilon"       eps, the noise that was added (DDPM Eq. 14)
    "sample"        x_0 itself
    "v_prediction"  v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0   (Salimans & Ho 2022, Sec. 4)

Any one determines the other two given x_t (REFERENCE.md)::

    x_0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)         eps = (x_t - sqrt(ab) x_0) / sqrt(1 - ab)
    x_0 = sqrt(ab) x_t - sqrt(1 - ab) v               eps = sqrt(ab) v + sqrt(1 - ab) x_t

Per-sample ``t`` broadcasts over the remaining axes: ``alpha_bar_t`` is gathered
as shape (B, 1, 1, ...) so batches may mix timesteps.

Also here (all on NumPy or CuPy, the array module taken from the data):

* the posterior q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7), for any previous timestep
  of a strided sequence: :func:`posterior_mean_variance`, :func:`posterior_variance`;
* training targets and the min-SNR-gamma loss weights (Hang et al. 2023):
  :func:`training_target`, :func:`min_snr_weights`;
* the variational bound in bits per dimension (DDPM Eq. 5; Improved DDPM
  Sec. 2-3 and its code, openai/improved-diffusion ``gaussian_diffusion.py`` and
  ``losses.py``): :func:`normal_kl`, :func:`approx_standard_normal_cdf`,
  :func:`discretized_gaussian_log_likelihood`, :func:`prior_bpd`,
  :func:`vlb_terms`, :func:`bits_per_dim`.

Left out: learned variances (Improved DDPM's ``learned_range`` output head and
its hybrid loss L_hybrid), importance sampling of t for L_vlb (Improved DDPM
Sec. 3.3), continuous-time bounds (VDM).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from diffusion_np.backend import asnumpy, get_xp

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def check_prediction_type(prediction_type: str) -> None:
    """ValueError naming the allowed values unless ``prediction_type`` is one of them."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def gather(values: np.ndarray, t, like):
    """``values[t]`` shaped to broadcast against ``like`` (B, ...), on like's device, in like's dtype.

    ``t`` is an int (same step for the whole batch) or an integer array of shape (B,).
    Schedules live in float64 on the host; this is where a value crosses into the
    data's dtype and device.
    """
    xp = get_xp(like)
    if get_xp(t) is np:  # t on the host: gather there, upload B values
        v = np.asarray(values)[np.asarray(t)]
    else:  # t on the device: gather there (np.asarray(t) would copy t back, a sync; CuPy refuses it)
        v = xp.asarray(values)[t]
    if v.ndim == 1:  # (B,) -> (B, 1, 1, ...)
        v = v.reshape((-1,) + (1,) * (like.ndim - 1))
    return xp.asarray(v, dtype=like.dtype)


def q_sample(x0, t, noise, alpha_bar: np.ndarray):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (DDPM Eq. 4)."""
    ab = np.asarray(alpha_bar, dtype=np.float64)
    return gather(np.sqrt(ab), t, x0) * x0 + gather(np.sqrt(1.0 - ab), t, x0) * noise


def v_target(x0, noise, t, alpha_bar: np.ndarray):
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0  (Salimans & Ho 2022)."""
    ab = np.asarray(alpha_bar, dtype=np.float64)
    return gather(np.sqrt(ab), t, x0) * noise - gather(np.sqrt(1.0 - ab), t, x0) * x0


def x0_and_eps(model_output, sample, t, alpha_bar: np.ndarray, prediction_type: str = "epsilon"):
    """(x0_pred, eps_pred) from a model output of any prediction type.

    With ``"epsilon"`` at alpha_bar_t = 0 (zero terminal SNR) x0 is undefined;
    samplers refuse that configuration up front.
    """
    check_prediction_type(prediction_type)
    ab = np.asarray(alpha_bar, dtype=np.float64)
    sqrt_ab = gather(np.sqrt(ab), t, sample)
    sqrt_1m_ab = gather(np.sqrt(1.0 - ab), t, sample)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_1m_ab * eps) / sqrt_ab
    elif prediction_type == "sample":  # recompute eps from x0 (REFERENCE pitfall 11)
        x0 = model_output
        eps = (sample - sqrt_ab * x0) / sqrt_1m_ab
    else:  # v_prediction
        x0 = sqrt_ab * sample - sqrt_1m_ab * model_output
        eps = sqrt_ab * model_output + sqrt_1m_ab * sample
    return x0, eps


def training_target(x0, noise, t, alpha_bar: np.ndarray, prediction_type: str = "epsilon"):
    """What the network is trained to output at (x_t, t), for each prediction type.

    ``"epsilon"``: eps (DDPM Eq. 14, L_simple = ||eps - eps_theta(x_t, t)||^2);
    ``"sample"``: x_0; ``"v_prediction"``: v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0
    (Salimans & Ho 2022, Sec. 4). ``x_t`` itself comes from :func:`q_sample` with
    the same ``noise``.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return v_target(x0, noise, t, alpha_bar)


def min_snr_weights(t, snr: np.ndarray, gamma: float = 5.0, prediction_type: str = "epsilon", dtype=np.float32):
    """Min-SNR-gamma loss weights per sample (Hang et al. 2023, "Efficient Diffusion Training
    via Min-SNR Weighting Strategy").

    The x_0-space loss ||x_0 - x0_pred||^2 is weighted by min(SNR_t, gamma); the
    same weight expressed for the other targets (||eps - eps_pred||^2 = SNR_t
    ||x_0 - x0_pred||^2 and ||v - v_pred||^2 = (SNR_t + 1) ||x_0 - x0_pred||^2)::

        "sample"        w_t = min(SNR_t, gamma)
        "epsilon"       w_t = min(SNR_t, gamma) / SNR_t
        "v_prediction"  w_t = min(SNR_t, gamma) / (SNR_t + 1)

    as in diffusers' ``examples/text_to_image/train_text_to_image.py`` (``compute_snr`` from
    ``diffusers.training_utils``, then ``mse_loss_weights``), except that diffusers leaves
    the x_0 weight to the caller and gives NaN for epsilon at SNR = 0. Here
    min(SNR, gamma) / SNR is written gamma / max(SNR, gamma), which is its limit, 1, at
    SNR = 0 (zero terminal SNR) instead of 0/0.

    Parameters
    ----------
    t : int array (B,)
        Timesteps of the batch (host or device).
    snr : array (T,)
        ``NoiseSchedule.snr``.
    gamma : float
        The clamp; the paper's default is 5.

    Returns
    -------
    (B,) array on t's device, in ``dtype``, to multiply the per-sample mean squared error.
    """
    check_prediction_type(prediction_type)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    xp = get_xp(t)
    snr_t = np.asarray(snr, dtype=np.float64)[asnumpy(t)]
    if prediction_type == "epsilon":
        w = gamma / np.maximum(snr_t, gamma)  # = min(SNR, gamma) / SNR, and 1 at SNR = 0
    elif prediction_type == "v_prediction":
        w = np.minimum(snr_t, gamma) / (snr_t + 1.0)
    else:  # sample
        w = np.minimum(snr_t, gamma)
    return xp.asarray(w, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# The posterior q(x_{t-1} | x_t, x_0)
# ----------------------------------------------------------------------------------------------


class Gaussian(NamedTuple):
    """A diagonal Gaussian: mean, variance and log variance (the last two broadcast against the mean)."""

    mean: object
    variance: object
    log_variance: object


def _prev_alpha_bar(alpha_bar: np.ndarray, t, t_prev):
    """Host float64 (alpha_bar_t, alpha_bar_prev), each shaped like t; alpha_bar_prev = 1 where prev < 0."""
    ab = np.asarray(alpha_bar, dtype=np.float64)
    T = ab.shape[0]
    t = np.asarray(asnumpy(t))
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
    t_prev = t - 1 if t_prev is None else np.asarray(asnumpy(t_prev))
    if not np.issubdtype(t_prev.dtype, np.integer):
        raise TypeError(f"t_prev must hold integer timesteps, got dtype {t_prev.dtype}")
    if np.any(t < 0) or np.any(t > T - 1):
        raise ValueError(f"t must lie in [0, {T - 1}], got values {np.unique(t[(t < 0) | (t > T - 1)])[:5].tolist()}")
    if np.any(t_prev >= t):
        raise ValueError(f"t_prev must come before t (t_prev < t), got t={t.tolist()}, t_prev={t_prev.tolist()}")
    ab_t = ab[t]
    ab_prev = np.where(t_prev >= 0, ab[np.maximum(t_prev, 0)], 1.0)  # before the first step: x_0, alpha_bar = 1
    return ab_t, ab_prev


def _posterior_coefficients(alpha_bar: np.ndarray, t, t_prev=None):
    """Host float64 (coef_x0, coef_xt, variance) of q(x_prev | x_t, x_0), DDPM Eq. 7."""
    ab_t, ab_prev = _prev_alpha_bar(alpha_bar, t, t_prev)
    beta_t = 1.0 - ab_t / ab_prev  # beta'_t: the one-step beta from prev to t (= beta_t when prev = t - 1)
    coef_x0 = np.sqrt(ab_prev) * beta_t / (1.0 - ab_t)
    coef_xt = np.sqrt(ab_t / ab_prev) * (1.0 - ab_prev) / (1.0 - ab_t)
    variance = (1.0 - ab_prev) / (1.0 - ab_t) * beta_t
    return coef_x0, coef_xt, variance


def _to_like(values: np.ndarray, like):
    """Host values, one per sample (B,) or one for all (scalar), shaped to broadcast against like."""
    xp = get_xp(like)
    if values.ndim == 1:  # (B,) -> (B, 1, 1, ...)
        values = values.reshape((-1,) + (1,) * (like.ndim - 1))
    return xp.asarray(values, dtype=like.dtype)


def posterior_variance(alpha_bar: np.ndarray, t=None, t_prev=None) -> np.ndarray:
    """beta_tilde_t, the variance of q(x_prev | x_t, x_0) (DDPM Eq. 7; Improved DDPM Eq. 12), float64.

    beta_tilde_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta'_t,  beta'_t = 1 - alpha_bar_t / alpha_bar_prev,

    with prev = t - 1 unless ``t_prev`` is given (strided sequences) and alpha_bar_prev = 1
    for prev < 0. ``t=None`` gives the whole table for t = 0..T-1 (DDPM's "fixed_small"
    variance); its first entry is exactly 0. Not clipped: see :func:`posterior_mean_variance`.
    """
    if t is None:
        t = np.arange(np.asarray(alpha_bar).shape[0])
    return _posterior_coefficients(alpha_bar, t, t_prev)[2]


def posterior_mean_variance(x0, x_t, t, alpha_bar: np.ndarray, t_prev=None) -> Gaussian:
    """q(x_prev | x_t, x_0) = N(mu_tilde, beta_tilde I)  (DDPM Eq. 6-7; Improved DDPM Eq. 10-12).

    With ab = alpha_bar, prev the previous timestep (t - 1, or ``t_prev`` for a
    strided sequence; ab_prev = 1 when prev < 0) and beta'_t = 1 - ab_t / ab_prev::

        mu_tilde   = sqrt(ab_prev) beta'_t / (1 - ab_t) * x_0  +  sqrt(ab_t / ab_prev) (1 - ab_prev) / (1 - ab_t) * x_t
        beta_tilde = (1 - ab_prev) / (1 - ab_t) * beta'_t

    code -> paper: ``t`` -> t (0-based here, 1-based in DDPM), ``beta_tilde`` -> beta~_t.

    The log variance is clipped: log(max(beta_tilde, 1e-20)). At the first step
    (prev < 0) the posterior is a point mass, beta_tilde = 0, whose log is -inf;
    1e-20 is diffusers' floor (``DDPMScheduler._get_variance``) and keeps it finite.
    Improved DDPM's code does something else worth knowing: its
    ``posterior_log_variance_clipped`` stores log(beta_tilde_1) at t = 0 (the
    posterior variance of the *second* step), because that log variance is
    also what the reverse process p(x_0 | x_1) uses as its own variance, and the
    decoder likelihood L_0 needs a Gaussian of non-zero width. :func:`vlb_terms`
    uses that choice for p; this function returns q's own (clipped) value.

    Parameters
    ----------
    x0, x_t : arrays (B, ...)
    t : int or int array (B,)
    alpha_bar : (T,) float64
    t_prev : None, int or int array (B,), each < t; negative means "before the first step"

    Returns
    -------
    Gaussian(mean, variance, log_variance); mean like x_t, the other two broadcast
    against it ((B, 1, ...) for per-sample t, 0-d for an int t).
    """
    coef_x0, coef_xt, variance = _posterior_coefficients(alpha_bar, t, t_prev)
    mean = _to_like(coef_x0, x_t) * x0 + _to_like(coef_xt, x_t) * x_t
    # 1e-20 floor: beta_tilde = 0 at the first step (see above)
    log_variance = np.log(np.maximum(variance, 1e-20))
    return Gaussian(mean, _to_like(variance, x_t), _to_like(log_variance, x_t))


# ----------------------------------------------------------------------------------------------
# The variational bound (ELBO) in bits per dimension
# ----------------------------------------------------------------------------------------------

MODEL_VAR_TYPES = ("fixed_small", "fixed_large")


def _exp(v, xp):
    """exp of a Python number stays a Python float (a NumPy float64 scalar would promote float32 data)."""
    return math.exp(v) if isinstance(v, (int, float)) else xp.exp(v)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    KL = 1/2 [ -1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) ]

    (the KL between Gaussians that every term L_{t-1} of DDPM Eq. 5 reduces to;
    Improved DDPM's ``losses.normal_kl``). Any argument may be a Python number or an
    array; they broadcast.
    """
    xp = get_xp(*[a for a in (mean1, logvar1, mean2, logvar2) if hasattr(a, "shape")])
    return 0.5 * (-1.0 + logvar2 - logvar1 + _exp(logvar1 - logvar2, xp) + (mean1 - mean2) ** 2 * _exp(-logvar2, xp))


def approx_standard_normal_cdf(x):
    """Phi(x) ~ 1/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (Page 1977; Improved DDPM's code).

    Absolute error below 2e-4 everywhere. Kept instead of the exact erf so that
    bits/dim match the numbers Improved DDPM's code reports.
    """
    xp = get_xp(x)
    # beyond |x| = 40 the tanh is exactly +-1 already; clipping only prevents x^3 overflowing in float32
    x = xp.clip(x, -40.0, 40.0)
    return 0.5 * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of 8-bit data under a Gaussian integrated over each pixel's bin (DDPM Eq. 13).

    Data are the 256 levels -1, -1 + 2/255, ..., 1 (images scaled to [-1, 1]); level x
    owns the bin [x - 1/255, x + 1/255], except the edge bins, which extend to
    -inf (x = -1) and +inf (x = 1) so the 256 probabilities sum to one::

        p(x) = Phi((x + 1/255 - mu) / s) - Phi((x - 1/255 - mu) / s),   s = exp(log_scales)

    As Improved DDPM's code (``losses.discretized_gaussian_log_likelihood``): the
    approximate CDF, the edges detected as x < -0.999 and x > 0.999, and every
    probability floored at 1e-12 before the log (a bin far in the tail would
    otherwise give log 0).

    Parameters
    ----------
    x : array, values in [-1, 1] (on the 256-level grid for a meaningful likelihood)
    means, log_scales : arrays broadcasting against x (log_scales = log of the std)

    Returns
    -------
    log-likelihood in nats, elementwise, shape of the broadcast.
    """
    xp = get_xp(x, means, log_scales)
    if float(xp.max(xp.abs(x))) > 1.0 + 1e-6:
        raise ValueError(f"x must be data scaled to [-1, 1], got values up to {float(xp.max(xp.abs(x))):.4g}")
    centered = x - means
    inv_stdv = xp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    # 1e-12 floor: a bin deep in the tail has probability 0 in floating point
    log_cdf_plus = xp.log(xp.maximum(cdf_plus, 1e-12))  # bin (-inf, -1 + 1/255]
    log_one_minus_cdf_min = xp.log(xp.maximum(1.0 - cdf_min, 1e-12))  # bin [1 - 1/255, inf)
    log_cdf_delta = xp.log(xp.maximum(cdf_plus - cdf_min, 1e-12))  # interior bins
    return xp.where(x < -0.999, log_cdf_plus, xp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(a):
    """Mean over every axis but the batch axis: (B, ...) -> (B,)."""
    return a.mean(axis=tuple(range(1, a.ndim)))


def prior_bpd(x0, alpha_bar: np.ndarray):
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per sample (B,) (Improved DDPM Eq. 7).

    q(x_T | x_0) = N(sqrt(ab_T) x_0, (1 - ab_T) I) with ab_T the last alpha_bar. No
    parameter can change this term; it is small only when the schedule ends near
    zero SNR (and exactly 0 with zero terminal SNR).
    """
    ab_T = float(np.asarray(alpha_bar, dtype=np.float64)[-1])
    mean = math.sqrt(ab_T) * x0
    kl = normal_kl(mean, math.log(1.0 - ab_T), 0.0, 0.0)
    return _mean_flat(kl) / math.log(2.0)


def _fixed_log_variance(alpha_bar: np.ndarray, model_var_type: str) -> np.ndarray:
    """log of the reverse-process variance Sigma_t for t = 0..T-1 (DDPM Sec. 3.2), float64 (T,).

    fixed_small: beta_tilde_t; fixed_large: beta_t. At t = 0 both use beta_tilde_1,
    as Improved DDPM's code does (beta_tilde_0 = 0 would make p(x_0 | x_1) a point mass,
    and beta_0 a slightly wider decoder than its authors trained).
    """
    ab = np.asarray(alpha_bar, dtype=np.float64)
    post = posterior_variance(ab)
    betas = 1.0 - ab / np.concatenate([[1.0], ab[:-1]])
    first = post[1] if ab.shape[0] > 1 else betas[0]  # T = 1 has no beta_tilde_1: fall back to beta_0
    var = np.concatenate([[first], post[1:] if model_var_type == "fixed_small" else betas[1:]])
    return np.log(var)


class VLBTerms(NamedTuple):
    """The terms of the variational bound, in bits per dimension.

    ``terms[:, i]`` is the term at code timestep ``timesteps[i]``: the decoder NLL L_0
    for t = 0, the KL L_{t} (paper: L_{t-1} with 1-based t) otherwise. ``prior`` is L_T.
    ``scale`` = T / len(timesteps) turns the sum over a subset into an estimate of
    the sum over all T terms.
    """

    terms: object
    timesteps: np.ndarray
    prior: object
    scale: float

    def total(self):
        """Bits per dim per sample (B,): L_T + scale * sum of the evaluated terms."""
        return self.prior + self.scale * self.terms.sum(axis=1)


def vlb_terms(
    model_fn: Callable,
    x0,
    schedule,
    prediction_type: str = "epsilon",
    rng: np.random.Generator | None = None,
    timesteps=None,
    model_var_type: str = "fixed_small",
    clip_denoised: bool = False,
) -> VLBTerms:
    """Terms of the variational bound -log p(x_0) <= L, in bits per dimension (DDPM Eq. 5).

    Improved DDPM Eq. 4-7 names them (paper t = 1..T is code t = 0..T-1 here)::

        L   = L_0 + L_1 + ... + L_{T-1} + L_T
        L_0 = -log p(x_0 | x_1)                               code t = 0: discretized decoder NLL
        L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))   code t >= 1: KL of two Gaussians
        L_T = KL(q(x_T | x_0) || N(0, I))                      :func:`prior_bpd`

    p(x_{t-1} | x_t) = N(mu_tilde(x_t, x0_pred), Sigma_t): the posterior mean with the
    model's x_0 estimate in place of x_0 (DDPM Eq. 11 in any parametrisation), and a
    fixed variance, beta_tilde_t (``"fixed_small"``) or beta_t (``"fixed_large"``).
    Each term is averaged over the data dimensions and divided by log 2.

    The algorithm, once per chosen timestep (the loop over t *is* the method; the
    batch is vectorised):

        1. eps ~ N(0, I), x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps     (DDPM Eq. 4)
        2. x0_pred from model_fn(x_t, t)                                 (:func:`x0_and_eps`)
        3. p's mean from x0_pred, q's mean from the true x_0             (:func:`posterior_mean_variance`)
        4. KL(q || p), or at t = 0 the decoder NLL at x_0

    Subsets: ``timesteps`` evaluates only those terms. With k of them drawn uniformly
    at random without replacement (``rng.choice(T, k, replace=False)``),
    (T / k) * sum of those k terms is an unbiased estimate of L_0 + ... + L_{T-1}
    (the same argument as DDPM's t ~ Uniform training loss); ``VLBTerms.total`` applies
    that scale. A fixed subset gives a deterministic but biased number.

    Parameters
    ----------
    model_fn : callable (x_t (B, ...), t int64 (B,)) -> model output like x_t
    x0 : (B, ...) data in [-1, 1] (256 levels for a meaningful L_0)
    schedule : NoiseSchedule
    prediction_type : "epsilon", "sample" or "v_prediction"
    rng : numpy Generator for the noise (host side; moved to x0's device)
    timesteps : None (all T) or distinct ints in [0, T-1]
    model_var_type : "fixed_small" or "fixed_large"
    clip_denoised : clip x0_pred to [-1, 1] (Improved DDPM's bpd loop does)

    Returns
    -------
    VLBTerms(terms (B, k), timesteps (k,), prior (B,), scale)
    """
    check_prediction_type(prediction_type)
    if model_var_type not in MODEL_VAR_TYPES:
        raise ValueError(f"model_var_type must be one of {MODEL_VAR_TYPES}, got {model_var_type!r}")
    if not hasattr(x0, "ndim") or x0.ndim < 2:
        raise ValueError(f"x0 must be a batch (B, ...), got {getattr(x0, 'shape', type(x0).__name__)}")
    xp = get_xp(x0)
    ab = np.asarray(schedule.alpha_bar, dtype=np.float64)
    T = ab.shape[0]
    ts = np.arange(T)[::-1] if timesteps is None else np.asarray(timesteps)
    if ts.ndim != 1 or ts.size < 1 or not np.issubdtype(ts.dtype, np.integer):
        raise ValueError(f"timesteps must be a non-empty 1-D sequence of ints, got {ts!r}")
    if np.any(ts < 0) or np.any(ts > T - 1) or np.unique(ts).size != ts.size:
        raise ValueError(f"timesteps must be distinct ints in [0, {T - 1}], got {ts.tolist()}")
    if prediction_type == "epsilon" and ab[-1] == 0.0 and np.any(ts == T - 1):
        raise ValueError(
            "alpha_bar_{T-1} = 0 (zero terminal SNR): an epsilon prediction cannot give x0 there; "
            "use prediction_type='v_prediction'"
        )
    rng = rng if rng is not None else np.random.default_rng()
    log_var_p = _fixed_log_variance(ab, model_var_type)
    B = x0.shape[0]
    terms = xp.zeros((B, ts.size), dtype=x0.dtype)
    for i, t in enumerate(ts.tolist()):
        t_b = np.full(B, t, dtype=np.int64)
        # 1. x_t ~ q(x_t | x_0)
        noise = xp.asarray(rng.standard_normal(x0.shape), dtype=x0.dtype)
        x_t = q_sample(x0, t_b, noise, ab)
        # 2. the model's estimate of x_0
        x0_pred, _ = x0_and_eps(model_fn(x_t, t_b), x_t, t_b, ab, prediction_type)
        if clip_denoised:
            x0_pred = xp.clip(x0_pred, -1.0, 1.0)
        # 3. p(x_{t-1} | x_t) = N(mu_tilde(x_t, x0_pred), Sigma_t)
        mean_p = posterior_mean_variance(x0_pred, x_t, t_b, ab).mean
        log_var_p_t = _to_like(log_var_p[t_b], x0)
        if t == 0:
            # 4a. L_0 = -log p(x_0 | x_1), the discretized Gaussian decoder (DDPM Eq. 13)
            nll = -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * log_var_p_t)
            terms[:, i] = _mean_flat(nll) / math.log(2.0)
        else:
            # 4b. L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
            q = posterior_mean_variance(x0, x_t, t_b, ab)
            kl = normal_kl(q.mean, q.log_variance, mean_p, log_var_p_t)
            terms[:, i] = _mean_flat(kl) / math.log(2.0)
    return VLBTerms(terms, ts, prior_bpd(x0, ab), T / ts.size)


def bits_per_dim(
    model_fn: Callable,
    x0,
    schedule,
    prediction_type: str = "epsilon",
    rng: np.random.Generator | None = None,
    timesteps=None,
    model_var_type: str = "fixed_small",
    clip_denoised: bool = False,
):
    """The variational bound L of DDPM Eq. 5 in bits per dimension, per sample (B,).

    L_T + sum_t L_t from :func:`vlb_terms` (same arguments); with a subset of
    ``timesteps`` the sum is scaled by T / k (an unbiased estimate when the subset
    is drawn uniformly at random). An upper bound on -log2 p(x_0) / D.
    """
    return vlb_terms(
        model_fn, x0, schedule, prediction_type, rng, timesteps, model_var_type, clip_denoised
    ).total()
