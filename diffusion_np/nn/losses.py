"""Losses for training: mean squared error, L1, pseudo-Huber, and the VAE's Gaussian KL.

Each loss is a forward/backward pair like every op, except that its output is a
scalar, so the upstream gradient is a scalar too (1.0 at the top of backprop):

    loss, cache = mse_loss_forward(eps_pred, eps, weights=w)
    deps_pred = mse_loss_backward(cache)            # dloss = 1.0

* ``mse_loss``: the "simple" diffusion loss || eps - eps_theta(x_t, t) ||^2
  (DDPM Eq. 14), with optional per-sample weights, e.g. min-SNR-gamma
  w_t = min(SNR_t, gamma) / SNR_t (Hang et al. 2023, Eq. 8), broadcast over every
  non-batch axis.
* ``l1_loss``: mean absolute error (VAE reconstruction).
* ``pseudo_huber_loss``: sqrt(d^2 + c^2) - c, smooth near 0 and linear far from it
  (consistency distillation, :mod:`diffusion_np.training.distill`).
* ``gaussian_kl``: KL(N(mu, sigma^2) || N(0, I)) (Kingma & Welling 2014,
  Appendix B), the VAE's regulariser.

The loss is returned as a 0-d value of the inputs' dtype and device (a NumPy
scalar or a 0-d CuPy array): ``float(loss)`` brings it to Python.

Left out on purpose: "none" reduction (write the elementwise expression
instead), perceptual (LPIPS) and adversarial losses, the VLB terms (those
live in diffusion.py).
"""

from __future__ import annotations

from typing import NamedTuple

from diffusion_np.backend import get_xp
from diffusion_np.nn.validate import check_float

_REDUCTIONS = ("mean", "sum")


def _check_pair(name: str, pred, target, weights, reduction: str, what=("pred", "target")) -> None:
    """Same shape, float dtype, (B,) weights, a known reduction: else a clear error."""
    check_float(name, pred, what[0])
    check_float(name, target, what[1])
    if tuple(pred.shape) != tuple(target.shape):
        # a silent broadcast here ((B, 1) against (B,) gives (B, B)) is a classic bug
        raise ValueError(
            f"{name} expects {what[0]} and {what[1]} of the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if weights is not None:
        check_float(name, weights, "weights")
        if pred.ndim < 1 or tuple(weights.shape) != (pred.shape[0],):
            batch = pred.shape[0] if pred.ndim else "B"
            raise ValueError(
                f"{name} expects per-sample weights of shape ({batch},), got {tuple(weights.shape)}"
            )


def _per_sample(weights, like):
    """(B,) weights -> (B, 1, ..., 1) in ``like``'s dtype, to broadcast over non-batch axes."""
    if weights is None:
        return None
    return weights.astype(like.dtype, copy=False).reshape((-1,) + (1,) * (like.ndim - 1))


def _reduce(values, reduction: str):
    return values.mean() if reduction == "mean" else values.sum()


def _as_scalar(dloss, like):
    """The upstream gradient as a 0-d array of ``like``'s dtype and device (no host sync,
    and a float64 scalar does not promote float32 gradients)."""
    return get_xp(like).asarray(dloss, dtype=like.dtype)


# ----------------------------------------------------------------------------- MSE


class MSELossCache(NamedTuple):
    diff: object  # pred - target
    w: object  # (B, 1, ..., 1) per-sample weights, or None
    reduction: str


def mse_loss_forward(pred, target, weights=None, reduction: str = "mean"):
    """Mean squared error, optionally weighted per sample.

        loss = (1/n) sum_i w_b(i) (pred_i - target_i)^2      ("mean", n = pred.size)
        loss =       sum_i w_b(i) (pred_i - target_i)^2      ("sum")

    where b(i) is the sample of entry i and w_b = 1 without weights. With weights
    this equals diffusers' min-SNR form ``(mse(..., reduction="none").mean(dims) * w).mean()``
    since every sample has the same number of entries.

    Parameters
    ----------
    pred, target : arrays of the same shape (B, ...).
    weights : optional (B,) per-sample weights.
    reduction : "mean" (default, as ``torch.nn.functional.mse_loss``) or "sum".

    Returns
    -------
    (loss, cache): loss a 0-d value in pred's dtype.
    """
    _check_pair("mse_loss", pred, target, weights, reduction)
    diff = pred - target
    w = _per_sample(weights, diff)
    sq = diff * diff
    if w is not None:
        sq *= w
    return _reduce(sq, reduction), MSELossCache(diff, w, reduction)


def mse_loss_backward(cache: MSELossCache, dloss=1.0):
    """d loss / d pred = 2 w (pred - target) * dloss   (divided by n for "mean").

    ``dloss`` is the scalar upstream gradient (1.0 when this loss is the objective).
    """
    diff, w, reduction = cache
    factor = 2.0 / diff.size if reduction == "mean" else 2.0
    dpred = diff * (_as_scalar(dloss, diff) * factor)
    if w is not None:
        dpred *= w
    return dpred


# ----------------------------------------------------------------------------- L1


class L1LossCache(NamedTuple):
    sign: object  # sign(pred - target): 0 where they are equal, as in PyTorch
    w: object
    reduction: str


def l1_loss_forward(pred, target, weights=None, reduction: str = "mean"):
    """Mean absolute error, optionally weighted per sample:

        loss = (1/n) sum_i w_b(i) |pred_i - target_i|     ("mean"; "sum" drops 1/n)

    Same parameters and return as :func:`mse_loss_forward`.
    """
    _check_pair("l1_loss", pred, target, weights, reduction)
    xp = get_xp(pred)
    diff = pred - target
    w = _per_sample(weights, diff)
    absdiff = xp.abs(diff)
    if w is not None:
        absdiff *= w
    return _reduce(absdiff, reduction), L1LossCache(xp.sign(diff), w, reduction)


def l1_loss_backward(cache: L1LossCache, dloss=1.0):
    """d loss / d pred = w sign(pred - target) * dloss   (divided by n for "mean").

    |d| has no derivative at d = 0; we use 0 there (the subgradient PyTorch uses).
    """
    sign, w, reduction = cache
    factor = 1.0 / sign.size if reduction == "mean" else 1.0
    dpred = sign * (_as_scalar(dloss, sign) * factor)
    if w is not None:
        dpred *= w
    return dpred


# ----------------------------------------------------------------------------- pseudo-Huber


class PseudoHuberLossCache(NamedTuple):
    diff: object  # pred - target
    root: object  # sqrt(diff^2 + c^2)
    w: object
    reduction: str


def pseudo_huber_loss_forward(pred, target, c: float = 1e-3, weights=None, reduction: str = "mean"):
    """Pseudo-Huber loss, elementwise, optionally weighted per sample:

        loss = (1/n) sum_i w_b(i) (sqrt((pred_i - target_i)^2 + c^2) - c)     ("mean"; "sum" drops 1/n)

    Charbonnier's smooth L1 (Song & Dhariwal 2023, "Improved techniques for training consistency
    models", Sec. 3.3, pseudo-Huber metric; LCM's distillation loss, Luo et al. 2023, Sec. 4.2):
    quadratic, d^2 / (2c), for |d| << c and |d| - c for |d| >> c, so one outlier pulls as much as
    L1 lets it. diffusers' ``train_lcm_distill_sd_wds.py`` takes it elementwise with c = 0.001.
    Same parameters and return as :func:`mse_loss_forward`, plus ``c`` > 0.
    """
    _check_pair("pseudo_huber_loss", pred, target, weights, reduction)
    if not c > 0:
        raise ValueError(f"pseudo_huber_loss: c must be > 0, got {c!r}")
    xp = get_xp(pred)
    diff = pred - target
    w = _per_sample(weights, diff)
    c = float(c)  # a Python float keeps float32 float32
    root = xp.sqrt(diff * diff + c * c)
    values = root - c
    if w is not None:
        values = values * w
    return _reduce(values, reduction), PseudoHuberLossCache(diff, root, w, reduction)


def pseudo_huber_loss_backward(cache: PseudoHuberLossCache, dloss=1.0):
    """d loss / d pred = w (pred - target) / sqrt((pred - target)^2 + c^2) * dloss   (divided by n for "mean").

    The derivative of sqrt(d^2 + c^2) is d / sqrt(d^2 + c^2): smooth at d = 0 (where L1 has a kink),
    bounded by 1 in magnitude (where L2 grows with d).
    """
    diff, root, w, reduction = cache
    factor = 1.0 / diff.size if reduction == "mean" else 1.0
    dpred = diff / root * (_as_scalar(dloss, diff) * factor)
    if w is not None:
        dpred *= w
    return dpred


# ----------------------------------------------------------------------------- Gaussian KL


class GaussianKLCache(NamedTuple):
    mean: object
    var: object  # exp(logvar)


def gaussian_kl_forward(mean, logvar):
    """KL divergence of N(mean, exp(logvar)) from the standard normal, per sample,
    averaged over the batch (Kingma & Welling 2014, Appendix B, with the sign that
    makes it a loss):

        KL_b = 0.5 * sum_{non-batch i} (mu_i^2 + exp(logvar_i) - 1 - logvar_i)
        loss = (1/B) sum_b KL_b

    Reduction: **sum** over every non-batch axis (the latent's H, W, C), **mean**
    over the batch, as diffusers' ``DiagonalGaussianDistribution.kl()`` followed by
    ``.mean()``. No clamping here: Stable Diffusion's VAE clamps logvar to
    [-30, 20] when it builds the distribution, before this loss sees it (and
    exp(logvar) overflows float32 above logvar ~ 88).

    Parameters
    ----------
    mean, logvar : arrays of the same shape (B, ...).

    Returns
    -------
    (loss, cache): loss a 0-d value in mean's dtype.
    """
    _check_pair("gaussian_kl", mean, logvar, None, "mean", what=("mean", "logvar"))
    xp = get_xp(mean)
    var = xp.exp(logvar)
    terms = mean * mean
    terms += var
    terms -= 1.0
    terms -= logvar
    B = mean.shape[0] if mean.ndim else 1
    loss = terms.sum() * (0.5 / B)
    return loss, GaussianKLCache(mean, var)


def gaussian_kl_backward(cache: GaussianKLCache, dloss=1.0):
    """d loss / d mu = mu / B,   d loss / d logvar = 0.5 (exp(logvar) - 1) / B   (times dloss).

    Returns (dmean, dlogvar).
    """
    mean, var = cache
    B = mean.shape[0] if mean.ndim else 1
    scale = _as_scalar(dloss, mean) * (1.0 / B)
    dmean = mean * scale
    dlogvar = (var - 1.0) * (0.5 * scale)
    return dmean, dlogvar
