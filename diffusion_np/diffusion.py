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
as shape (B, 1, 1, ...) so batches may mix timesteps (:func:`gather`, the one place
a schedule value crosses into the data's dtype and device). :func:`x0_and_eps_at` is
the one conversion from a model output to (x0, eps): every sampler calls it, at a
training timestep or at any noise level between.

Also here (all on NumPy or CuPy, the array module taken from the data):

* the posterior q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7), for any previous timestep
  of a strided sequence: :func:`posterior_coefficients` (the formulas, once),
  :func:`posterior_mean_variance`, :func:`posterior_variance`;
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
from diffusion_np.nn.validate import check_finite

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def check_prediction_type(prediction_type: str) -> None:
    """ValueError naming the allowed values unless ``prediction_type`` is one of them."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


# ----------------------------------------------------------------------------------------------
# Where the values enter: every check names the argument (STYLE.md, rule 11)
# ----------------------------------------------------------------------------------------------


def check_alpha_bar(alpha_bar, name: str = "alpha_bar") -> np.ndarray:
    """``alpha_bar`` as a host float64 array (T,) of values in [0, 1]; TypeError or ValueError naming it.

    0 is allowed (zero terminal SNR reaches it at the last step), NaN is not.
    """
    if isinstance(alpha_bar, (str, bytes)) or not hasattr(alpha_bar, "__len__"):
        raise TypeError(f"{name} must be a 1-D array of floats (a schedule's alpha_bar), got {alpha_bar!r:.60}")
    try:
        ab = np.asarray(asnumpy(alpha_bar), dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a 1-D array of floats, got {alpha_bar!r:.60}") from err
    if ab.ndim != 1 or ab.size < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array (T,), got shape {ab.shape}")
    if not np.all((ab >= 0.0) & (ab <= 1.0)):  # also False for NaN
        raise ValueError(f"{name} must hold values in [0, 1], got {ab[~((ab >= 0.0) & (ab <= 1.0))][:3].tolist()}")
    return ab


def check_timesteps(t, T: int, batch: int | None = None, name: str = "t"):
    """``t``: an int, or an integer array of shape (B,) with B = ``batch``, each in [0, T - 1].

    Returned as it came (a host array stays on the host, a device array on the device). The
    range of a device array is not checked: that would copy it to the host, a synchronisation
    in every training step (CONTRIBUTING.md, device rules); its dtype and shape are.
    """
    if isinstance(t, (bool, np.bool_)) or not (isinstance(t, (int, np.integer)) or hasattr(t, "dtype")):
        raise TypeError(f"{name} must be an int or an integer array of timesteps, got {t!r:.60}")
    if hasattr(t, "dtype"):
        if not np.issubdtype(t.dtype, np.integer):
            raise TypeError(f"{name} must hold integer timesteps, got dtype {t.dtype}")
        if t.ndim > 1 or (t.ndim == 1 and batch is not None and t.shape[0] != batch):
            raise ValueError(f"{name} must be an int or shape ({batch if batch is not None else 'B'},), "
                             f"one timestep per sample, got shape {tuple(t.shape)}")
        if get_xp(t) is not np:
            return t
    values = np.asarray(t)
    if values.size and (values.min() < 0 or values.max() > T - 1):
        bad = values[(values < 0) | (values > T - 1)]
        raise ValueError(f"{name} must lie in [0, {T - 1}] (alpha_bar has T = {T} timesteps), got {bad[:5].tolist()}")
    return t


def check_data(x, name: str, like=None, fn: str = ""):
    """``x`` a float array (B, ...) with B >= 1 (and ``like``'s shape if given), finite (NumPy arrays).

    Raises TypeError or ValueError naming ``name`` (and the function ``fn``, when given).
    """
    where = f"{fn}: " if fn else ""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{where}{name} must be a float array (B, ...), got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{where}{name} must hold floats (float32 or float64), got dtype {x.dtype}")
    if like is not None and tuple(x.shape) != tuple(like.shape):
        raise ValueError(f"{where}{name} must have the shape of x0, {tuple(like.shape)}, got {tuple(x.shape)}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{where}{name} must be a batch (B, ...) with B >= 1, got shape {tuple(x.shape)}")
    check_finite(fn or "diffusion", x, name)


# ----------------------------------------------------------------------------------------------
# The forward process and the conversions between eps, x0 and v
# ----------------------------------------------------------------------------------------------


def gather(values: np.ndarray, t, like):
    """``values[t]`` shaped to broadcast against ``like`` (B, ...), on like's device, in like's dtype.

    ``t`` is an int (same step for the whole batch) or an integer array of shape (B,).
    Schedules live in float64 on the host; this is where a value crosses into the
    data's dtype and device.
    """
    if get_xp(t) is np:  # t on the host: gather there, upload B values
        return broadcast_like(np.asarray(values)[np.asarray(t)], like)
    # t on the device: gather there (np.asarray(t) would copy t back, a sync; CuPy refuses it)
    return broadcast_like(get_xp(like).asarray(values)[t], like)


def broadcast_like(values, like):
    """Values, one per sample (B,) or one for all (0-d), as (B, 1, ..., 1) or 0-d in like's dtype and device."""
    if values.ndim == 1:  # (B,) -> (B, 1, 1, ...)
        values = values.reshape((-1,) + (1,) * (like.ndim - 1))
    return get_xp(like).asarray(values, dtype=like.dtype)


def _checked(fn: str, x0, t, noise, alpha_bar):
    """The arguments of the forward-process functions, checked where they enter: alpha_bar as float64."""
    check_data(x0, "x0", fn=fn)
    check_data(noise, "noise", like=x0, fn=fn)
    ab = check_alpha_bar(alpha_bar)
    check_timesteps(t, ab.shape[0], batch=x0.shape[0])
    return ab


def q_sample(x0, t, noise, alpha_bar: np.ndarray):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (DDPM Eq. 4).

    ``x0`` and ``noise`` (B, ...) float arrays of one shape, ``t`` an int or (B,) ints in [0, T - 1],
    ``alpha_bar`` (T,); each is checked here, where it enters (a NaN is refused, not passed on).
    """
    ab = _checked("q_sample", x0, t, noise, alpha_bar)
    return gather(np.sqrt(ab), t, x0) * x0 + gather(np.sqrt(1.0 - ab), t, x0) * noise


def v_target(x0, noise, t, alpha_bar: np.ndarray):
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0  (Salimans & Ho 2022)."""
    ab = _checked("v_target", x0, t, noise, alpha_bar)
    return gather(np.sqrt(ab), t, x0) * noise - gather(np.sqrt(1.0 - ab), t, x0) * x0


def x0_and_eps(model_output, sample, t, alpha_bar: np.ndarray, prediction_type: str = "epsilon"):
    """(x0_pred, eps_pred) from a model output of any prediction type, at training timestep ``t``.

    :func:`x0_and_eps_at` with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t).
    With ``"epsilon"`` at alpha_bar_t = 0 (zero terminal SNR) x0 is undefined;
    samplers refuse that configuration up front.
    """
    check_prediction_type(prediction_type)
    ab = np.asarray(alpha_bar, dtype=np.float64)
    alpha_t, sigma_t = gather(np.sqrt(ab), t, sample), gather(np.sqrt(1.0 - ab), t, sample)
    return x0_and_eps_at(model_output, sample, alpha_t, sigma_t, prediction_type)


def x0_and_eps_at(model_output, x_t, alpha_t, sigma_t, prediction_type: str = "epsilon"):
    """(x0_pred, eps_pred) from a model output at x_t = alpha_t x_0 + sigma_t eps: the one conversion.

    alpha_t = sqrt(alpha_bar), sigma_t = sqrt(1 - alpha_bar), as Python floats or arrays that
    broadcast against x_t (every sampler passes its noise level here, whether a training
    timestep, a sigma between two of them, or alpha_bar after the last step)::

        "epsilon"       x0 = (x_t - sigma_t eps) / alpha_t
        "sample"        eps = (x_t - alpha_t x0) / sigma_t          (recomputed: REFERENCE pitfall 11)
        "v_prediction"  x0 = alpha_t x_t - sigma_t v,   eps = alpha_t v + sigma_t x_t   (alpha^2 + sigma^2 = 1)
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sigma_t * eps) / alpha_t
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - alpha_t * x0) / sigma_t
    else:  # v_prediction
        x0 = alpha_t * x_t - sigma_t * model_output
        eps = alpha_t * model_output + sigma_t * x_t
    return x0, eps


#: sigma_data of the consistency boundary condition (Song et al. 2023, App. C; LCM and diffusers keep 0.5)
SIGMA_DATA = 0.5


def consistency_scalings(t, timestep_scaling: float = 10.0, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out) of a consistency function f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t).

    Consistency models (Song et al. 2023, Eq. 3 and App. C), as Latent Consistency Models
    (Luo et al. 2023, Eq. 9) and diffusers' ``LCMScheduler`` write them for a discrete timestep t::

        s      = timestep_scaling * t
        c_skip = sigma_data^2 / (s^2 + sigma_data^2)
        c_out  = s / sqrt(s^2 + sigma_data^2)

    At t = 0, c_skip = 1 and c_out = 0: f(x, 0) = x, the boundary condition, holds for any network.
    ``timestep_scaling`` (10 in LCM) makes the pair reach (0, 1) within a few timesteps, so that
    away from t = 0 the function is the network's x0 estimate. ``t`` is a number or an array;
    the result has its type (float64 for numbers).
    """
    if not timestep_scaling > 0:
        raise ValueError(f"timestep_scaling must be > 0, got {timestep_scaling!r}")
    s = t * float(timestep_scaling)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def training_target(x0, noise, t, alpha_bar: np.ndarray, prediction_type: str = "epsilon"):
    """What the network is trained to output at (x_t, t), for each prediction type.

    ``"epsilon"``: eps (DDPM Eq. 14, L_simple = ||eps - eps_theta(x_t, t)||^2);
    ``"sample"``: x_0; ``"v_prediction"``: v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0
    (Salimans & Ho 2022, Sec. 4). ``x_t`` itself comes from :func:`q_sample` with
    the same ``noise``. Every argument is checked as in :func:`q_sample`, ``t`` and
    ``alpha_bar`` too although only v needs them.
    """
    check_prediction_type(prediction_type)
    _checked("training_target", x0, t, noise, alpha_bar)
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


class PosteriorCoefficients(NamedTuple):
    """q(x_prev | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, variance I), and beta'_t of the jump (DDPM Eq. 7)."""

    coef_x0: object
    coef_xt: object
    variance: object
    beta: object


def posterior_coefficients(alpha_bar_t, alpha_bar_prev) -> PosteriorCoefficients:
    """The posterior of the jump from alpha_bar_prev (less noisy) to alpha_bar_t, from the two alpha_bars.

    DDPM Eq. 6-7 for any previous noise level (a strided sequence, or alpha_bar_prev = 1 "after
    the last step", or a sampler's final alpha_bar), with beta'_t = 1 - ab_t / ab_prev::

        coef_x0  = sqrt(ab_prev) beta'_t / (1 - ab_t)
        coef_xt  = sqrt(ab_t / ab_prev) (1 - ab_prev) / (1 - ab_t)
        variance = (1 - ab_prev) / (1 - ab_t) beta'_t          beta tilde; DDIM Eq. 16's sigma_t^2 at eta = 1

    Floats in, float variance and beta out (coefficients as NumPy float64); host float64 arrays
    work elementwise. This is the one place the posterior variance is written down: DDPM's
    fixed_small variance, DDIM's sigma_t(eta) and the variational bound all come from it.
    """
    beta = 1.0 - alpha_bar_t / alpha_bar_prev  # beta'_t: the one-step beta from prev to t (= beta_t when prev = t - 1)
    coef_x0 = np.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar_t)
    coef_xt = np.sqrt(alpha_bar_t / alpha_bar_prev) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
    variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta
    return PosteriorCoefficients(coef_x0, coef_xt, variance, beta)


def _prev_alpha_bar(alpha_bar: np.ndarray, t, t_prev):
    """Host float64 (alpha_bar_t, alpha_bar_prev), each shaped like t; alpha_bar_prev = 1 where prev < 0."""
    ab = check_alpha_bar(alpha_bar)
    T = ab.shape[0]
    t = np.asarray(asnumpy(t))
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
    t_prev = t - 1 if t_prev is None else np.asarray(asnumpy(t_prev))
    if not np.issubdtype(t_prev.dtype, np.integer):
        raise TypeError(f"t_prev must hold integer timesteps, got dtype {t_prev.dtype}")
    check_timesteps(t, T)
    if np.any(t_prev >= t):
        raise ValueError(f"t_prev must come before t (t_prev < t), got t={t.tolist()}, t_prev={t_prev.tolist()}")
    ab_t = ab[t]
    ab_prev = np.where(t_prev >= 0, ab[np.maximum(t_prev, 0)], 1.0)  # before the first step: x_0, alpha_bar = 1
    return ab_t, ab_prev


def posterior_variance(alpha_bar: np.ndarray, t=None, t_prev=None) -> np.ndarray:
    """beta_tilde_t, the variance of q(x_prev | x_t, x_0) (DDPM Eq. 7; Improved DDPM Eq. 12), float64.

    beta_tilde_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta'_t,  beta'_t = 1 - alpha_bar_t / alpha_bar_prev,

    with prev = t - 1 unless ``t_prev`` is given (strided sequences) and alpha_bar_prev = 1
    for prev < 0. ``t=None`` gives the whole table for t = 0..T-1 (DDPM's "fixed_small"
    variance); its first entry is exactly 0. Not clipped: see :func:`posterior_mean_variance`.
    """
    if t is None:
        t = np.arange(np.asarray(alpha_bar).shape[0])
    return posterior_coefficients(*_prev_alpha_bar(alpha_bar, t, t_prev)).variance


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
    coef_x0, coef_xt, variance, _ = posterior_coefficients(*_prev_alpha_bar(alpha_bar, t, t_prev))
    mean = broadcast_like(coef_x0, x_t) * x0 + broadcast_like(coef_xt, x_t) * x_t
    # 1e-20 floor: beta_tilde = 0 at the first step (see above)
    log_variance = np.log(np.maximum(variance, 1e-20))
    return Gaussian(mean, broadcast_like(variance, x_t), broadcast_like(log_variance, x_t))


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
    _, _, post, betas = posterior_coefficients(ab, np.concatenate([[1.0], ab[:-1]]))  # beta tilde_t and beta_t
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
        log_var_p_t = gather(log_var_p, t_b, x0)
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
