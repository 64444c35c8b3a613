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
"""

from __future__ import annotations

import numpy as np

from diffusion_np.backend import get_xp

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
    t_host = np.asarray(t)
    v = np.asarray(values)[t_host]
    if t_host.ndim == 1:  # (B,) -> (B, 1, 1, ...)
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
