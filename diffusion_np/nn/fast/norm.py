"""GroupNorm followed by SiLU in one pass, beside the reference (GroupNorm, then SiLU) in nn/norm.py.

:func:`group_norm_silu_forward` / :func:`group_norm_silu_backward` fold SiLU into
the normalisation's affine step and keep silu' for the backward instead of SiLU's
input and sigmoid: fewer full-size passes and one cached array fewer. Every pass runs
on the positions folded into long rows (:func:`_fold`). Tested equal to
``silu(group_norm(x))`` and its gradients in float64 (tests/nn/test_norm.py).
``GroupNorm(..., silu=True)`` runs it unless reference mode is on or ``method="reference"``.
Timings: docs/performance.md.
"""

from __future__ import annotations

from typing import NamedTuple

from diffusion_np.backend import get_xp
from diffusion_np.nn.norm import (
    _check_groups,
    _group_norm_backward_factors,
    _group_to_channel,
    _per_channel_to_group,
    _sum_over_positions,
    _sum_products_over_positions,
)


class GroupNormSiLUCache(NamedTuple):
    xc: object  # (B, N/fold, fold*C) centred input x - mu, positions folded (:func:`_fold`)
    rstd: object  # (B, G) 1 / sqrt(var + eps) per (sample, group)
    gamma: object  # (C,) or None
    num_groups: int
    has_beta: bool
    shape: tuple  # the input's shape, to give dx the same one
    dsilu: object  # (B, N/fold, fold*C) silu'(z) at the GroupNorm output z; None without grad
    fold: int  # positions side by side on the last axis


#: Per-channel factors are broadcast over rows of at least this many numbers (:func:`_fold`).
FOLD_ROW = 1024


def _fold(positions: int, channels: int) -> int:
    """How many positions to put side by side on the last axis, (B, N, C) -> (B, N/k, k*C), a view.

    Broadcasting a per-channel factor (B, 1, C) over (B, N, C) runs NumPy's inner loop over
    the C channels only, which at 32 channels doubled the cost of a pass. Folded to rows of
    ``k*C`` >= :data:`FOLD_ROW` numbers (the factor tiled k times, (B, 1, k*C)) the inner
    loops are long again. k is the largest power of two up to that which divides N.
    """
    k = 1
    while k * channels < FOLD_ROW and positions % (2 * k) == 0:
        k *= 2
    return k


def _unfold_sums(s, channels: int):
    """Per-channel sums over folded positions, (B, k*C) -> (B, C)."""
    return s.reshape(s.shape[0], -1, channels).sum(axis=1)


def _tile(v, fold: int):
    """A per-channel factor (B or 1, 1, C) for positions folded ``fold`` to a row: (B or 1, 1, fold*C)."""
    return v if fold == 1 else get_xp(v).tile(v, (1, 1, fold))


def _centre_and_rstd_folded(x, num_groups: int, eps: float, fold: int):
    """:func:`diffusion_np.nn.norm._centre_and_rstd` (the same two passes, see the accuracy note
    there) on positions folded ``fold`` to a row: x (B, ..., C) -> xc (B, N/fold, fold*C), rstd (B, G)."""
    _check_groups(x, num_groups)
    B, C = x.shape[0], x.shape[-1]
    x3 = x.reshape(B, -1, fold * C)  # (B, N/fold, fold*C), a view
    cpg = C // num_groups
    n = x3.shape[1] * fold * cpg  # numbers sharing one (mu, var)
    mu = _per_channel_to_group(_unfold_sums(_sum_over_positions(x3), C), num_groups) / n  # (B, G)
    xc = x3 - _tile(_group_to_channel(mu, cpg), fold)  # centred, a new array
    var = _per_channel_to_group(_unfold_sums(_sum_products_over_positions(xc, xc), C), num_groups) / n  # (B, G)
    return xc, 1.0 / get_xp(x).sqrt(var + eps)


def group_norm_silu_forward(x, gamma, beta, num_groups: int, eps: float = 1e-5, with_grad: bool = True):
    """y = silu(group_norm(x)), fused.

    With z = gamma * x_hat + beta the GroupNorm output and sigmoid(z) = (1 + tanh(z/2)) / 2
    (see ``activation._sigmoid``), SiLU becomes a function of h = z / 2::

        silu(z) = z sigmoid(z) = h p,          p = 1 + tanh(h) = 2 sigmoid(z)
        silu'(z) = s + silu(z) (1 - s) = (p + y (2 - p)) / 2 = p (1 + 2h - y) / 2,     s = p / 2

    The 1/2 folds into GroupNorm's per-channel scale and shift, so h costs the
    same two passes as z; SiLU's input z and sigmoid are never stored: the
    backward needs only silu'(z), computed here over h's memory (``with_grad=False``
    skips it, for inference).

    Shapes as :func:`diffusion_np.nn.norm.group_norm_forward`; returns y and a :class:`GroupNormSiLUCache`.
    """
    xp = get_xp(x)
    B, C = x.shape[0], x.shape[-1]
    fold = _fold(x.size // (B * C), C) if x.ndim >= 2 and x.size else 1
    xc, rstd = _centre_and_rstd_folded(x, num_groups, eps, fold)  # (B, N/fold, fold*C), (B, G)
    scale = _group_to_channel(rstd, C // num_groups)  # (B, 1, C)
    if gamma is not None:
        scale = scale * gamma
    h = xc * _tile(scale * 0.5, fold)  # z / 2
    if beta is not None:
        h += _tile((beta * 0.5)[None, None, :], fold)
    p = xp.tanh(h)
    p += 1.0  # 2 sigmoid(z)
    y = h * p  # silu(z)
    dsilu = None
    if with_grad:  # silu'(z) = p (1 + 2h - y) / 2, in h's memory: no new array
        dsilu = h
        dsilu *= 2.0  # Python floats keep float32 float32
        dsilu -= y
        dsilu += 1.0
        dsilu *= p
        dsilu *= 0.5  # silu'(z)
    cache = GroupNormSiLUCache(xc, rstd, gamma, num_groups, beta is not None, tuple(x.shape), dsilu, fold)
    return y.reshape(x.shape), cache


def group_norm_silu_backward(dout, cache: GroupNormSiLUCache, consume: bool = False):
    """Gradients of :func:`group_norm_silu_forward`: dz = dout * silu'(z), then GroupNorm's
    input gradient dx = dz * scale - xc * xc_factor - shift (the factors of
    :func:`diffusion_np.nn.norm._group_norm_backward_factors`) on the folded rows.
    Returns (dx, dgamma, dbeta).

    ``consume=True`` (a Module, which has popped its cache): dz, dx and xc * xc_factor are
    written over the cache's arrays, so no pass writes a new full-size array; the cache is
    spent. Otherwise the cache stays as it was and the backward may run again.
    """
    xc, rstd, gamma, num_groups, has_beta, shape, dsilu, fold = cache
    C = shape[-1]
    dout3 = dout.reshape(xc.shape)  # (B, N/fold, fold*C)
    in_place = consume and get_xp(dout).result_type(dout3, dsilu) == dsilu.dtype  # a float64 dout: new arrays
    dz = get_xp(dout).multiply(dout3, dsilu, out=dsilu if in_place else None)
    sums = _unfold_sums(_sum_over_positions(dz), C), _unfold_sums(_sum_products_over_positions(dz, xc), C)
    factors = _group_norm_backward_factors(*sums, rstd, gamma, num_groups, xc.shape[1] * fold, has_beta)
    scale, xc_factor, shift, dgamma, dbeta = factors  # the first three (B, C)
    dx = dz  # ours either way: the passes below run in place
    dx *= _tile(scale[:, None, :], fold)
    dx -= get_xp(dout).multiply(xc, _tile(xc_factor[:, None, :], fold), out=xc if in_place else None)
    dx -= _tile(shift[:, None, :], fold)
    return dx.reshape(shape), dgamma, dbeta
