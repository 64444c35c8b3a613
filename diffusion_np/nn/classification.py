"""Softmax cross-entropy: the loss of a K-way classifier, forward and backward side by side.

For logits ``z`` (B, K) and integer labels ``y`` (B,), with the softmax
``p_bk = exp(z_bk) / sum_j exp(z_bj)``, the loss of sample b is the negative
log-likelihood of its label (Goodfellow, Bengio and Courville 2016, *Deep
Learning*, Sec. 6.2.2.3):

    l_b = -log p_{b, y_b} = logsumexp_j(z_bj) - z_{b, y_b}
    loss = (1/B) sum_b l_b        ("mean", as ``torch.nn.functional.cross_entropy``)
    loss =       sum_b l_b        ("sum")

and its gradient is the famous "prediction minus target":

    d loss / d z_bk = (p_bk - [k == y_b]) * dloss      (divided by B for "mean")

Numerical stability: exp(z) overflows float32 above z ~ 88. The log-softmax is
computed after subtracting each row's maximum, ``z - m`` with ``m = max_j z_bj``,
which changes nothing mathematically (the m cancels between numerator and
denominator) but makes every exponent <= 0, so exp never overflows and the
largest term is exactly 1, so the log never sees 0.

Same calling convention as the losses in :mod:`diffusion_np.nn.losses`: a scalar
loss (0-d, the logits' dtype and device) and a backward that takes the cache and
a scalar upstream gradient (1.0 at the top of backprop)::

    loss, cache = softmax_cross_entropy_forward(logits, labels)
    dlogits = softmax_cross_entropy_backward(cache)

Left out on purpose: class weights, label smoothing, ``ignore_index``, the
"none" reduction, and soft (probability) targets.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from diffusion_np.backend import get_xp
from diffusion_np.nn.validate import check_finite, check_float

_REDUCTIONS = ("mean", "sum")
_NAME = "softmax_cross_entropy"


class SoftmaxCrossEntropyCache(NamedTuple):
    probs: object  # (B, K) softmax(logits), all the backward needs besides the labels
    labels: object  # (B,) integer class indices
    reduction: str


def log_softmax(logits):
    """log p = z - m - log(sum_j exp(z_j - m)) along the last axis, m = max_j z_j (stable; see above)."""
    xp = get_xp(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)  # every entry <= 0, the max is 0
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def _check_inputs(logits, labels, reduction: str) -> None:
    """(B, K) float logits, (B,) integer labels in 0..K-1, a known reduction: else a clear error."""
    check_float(_NAME, logits, "logits")
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"{_NAME} expects logits of shape (B, K) with B, K >= 1, got {tuple(logits.shape)}")
    check_finite(_NAME, logits, "logits")
    if not hasattr(labels, "dtype") or not np.issubdtype(labels.dtype, np.integer):
        got = labels.dtype if hasattr(labels, "dtype") else type(labels).__name__
        raise TypeError(f"{_NAME} expects integer labels (class indices), got {got}")
    B, K = logits.shape
    if tuple(labels.shape) != (B,):
        raise ValueError(
            f"{_NAME} expects labels of shape ({B},) for logits {tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= K:  # one host sync: a bad index must not wrap
        raise ValueError(f"{_NAME}: labels must lie in 0..{K - 1}, got min {int(labels.min())} max {int(labels.max())}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_NAME}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def softmax_cross_entropy_forward(logits, labels, reduction: str = "mean"):
    """Cross-entropy of the softmax of ``logits`` against integer ``labels``.

        l_b = logsumexp_j(z_bj) - z_{b, y_b} = -log_softmax(z)_{b, y_b}
        loss = mean_b l_b ("mean") or sum_b l_b ("sum")

    Parameters
    ----------
    logits : float (B, K) unnormalised scores.
    labels : integer (B,) class indices in 0..K-1 (on the same device as logits).
    reduction : "mean" (default, as ``torch.nn.functional.cross_entropy``) or "sum".

    Returns
    -------
    (loss, cache): loss a 0-d value in the logits' dtype.
    """
    _check_inputs(logits, labels, reduction)
    xp = get_xp(logits)
    B = logits.shape[0]
    logp = log_softmax(logits)  # (B, K)
    picked = logp[xp.arange(B), labels]  # (B,) log p_{b, y_b}
    loss = -picked.mean() if reduction == "mean" else -picked.sum()
    return loss, SoftmaxCrossEntropyCache(xp.exp(logp), labels, reduction)


def softmax_cross_entropy_backward(cache: SoftmaxCrossEntropyCache, dloss=1.0):
    """d loss / d z = (softmax(z) - onehot(y)) * dloss, divided by B for "mean".

    ``dloss`` is the scalar upstream gradient (1.0 when this loss is the objective).
    """
    probs, labels, reduction = cache
    xp = get_xp(probs)
    B = probs.shape[0]
    dlogits = probs.copy()  # (B, K)
    dlogits[xp.arange(B), labels] -= 1.0  # p - onehot(y)
    scale = 1.0 / B if reduction == "mean" else 1.0
    dlogits *= xp.asarray(dloss, dtype=probs.dtype) * scale  # a 0-d array: float32 stays float32
    return dlogits
