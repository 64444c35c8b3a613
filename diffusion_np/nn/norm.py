"""Normalisation layers: GroupNorm (the U-Net's and the VAE's) and LayerNorm
(the transformer blocks').

Both normalise a set of numbers to zero mean and unit variance, then apply a
learned per-channel scale and shift:

    x_hat = (x - mu) / sqrt(var + eps),      y = gamma * x_hat + beta

They differ only in *which* numbers share one (mu, var):

* LayerNorm (Ba et al. 2016): the C features of one token (the last axis).
* GroupNorm (Wu & He 2018, Eq. 1-3 and Fig. 2): for one sample, the C/G channels
  of one group at every spatial position. G = 1 is "LayerNorm over (H, W, C)",
  G = C is InstanceNorm.

Layout is channels-last: images (B, H, W, C), tokens (B, L, C), or any
(B, ..., C). The variance is the biased one (divide by n), as in PyTorch.

Backward, for n numbers sharing one (mu, var), the upstream gradient dout and dx_hat = dout * gamma
(derivation: CS231n batch-norm notes; llm.c ``layernorm_backward``):

    dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))

where the means run over the same n numbers and rstd = 1 / sqrt(var + eps).

GroupNorm followed by SiLU (every pre-activation block of the U-Net and the VAE)
is ``GroupNorm(..., silu=True)``. Here it runs the two ops one after the other
(the reference path); the fused op pair that folds SiLU into the normalisation's
affine step is in :mod:`diffusion_np.nn.fast.norm` and is what ``method="auto"``
runs outside reference mode.

Left out on purpose: BatchNorm and running statistics (Stable Diffusion has
none), RMSNorm, and fused kernels other than GroupNorm + SiLU.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, get_xp
from diffusion_np.nn import fast  # fast.norm: nn/fast/norm.py, which builds on this file (see nn/fast/__init__.py)
from diffusion_np.nn.activation import silu_backward, silu_forward
from diffusion_np.nn.module import Module
from diffusion_np.nn.validate import check_features, check_input_finite, check_number, check_size

# ----------------------------------------------------------------------------- GroupNorm


class GroupNormCache(NamedTuple):
    xc: object  # (B, N, C) centred input x - mu, N = number of positions (x_hat = xc * rstd)
    rstd: object  # (B, G) 1 / sqrt(var + eps) per (sample, group)
    gamma: object  # (C,) or None
    num_groups: int
    has_beta: bool
    shape: tuple  # the input's shape, to give dx the same one


def _per_channel_to_group(s, num_groups: int):
    """(B, C) per-channel sums -> (B, G) per-group sums (channels of a group are adjacent)."""
    B, C = s.shape
    return s.reshape(B, num_groups, C // num_groups).sum(axis=-1)  # (B, G, C/G) -> (B, G)


def _group_to_channel(g, channels_per_group: int):
    """(B, G) per-group values -> (B, 1, C), ready to broadcast over positions."""
    xp = get_xp(g)
    return xp.repeat(g, channels_per_group, axis=1)[:, None, :]  # (B, C) -> (B, 1, C)


def _sum_over_positions(a):
    """sum over positions: (B, N, C) -> (B, C), as one batched matmul with a row of ones.

    Measured on (64, 64, 128) float32: 0.03 ms against 0.09 ms for ``a.sum(axis=1)``
    (which walks the rows one by one), and BLAS's blocked accumulation is also
    the more accurate of the two.
    """
    xp = get_xp(a)
    ones = xp.ones((1, a.shape[1]), dtype=a.dtype)
    return (ones @ a)[:, 0, :]  # (1, N) @ (B, N, C) -> (B, 1, C) -> (B, C)


def _sum_products_over_positions(a, b):
    """sum over positions of a * b: (B, N, C), (B, N, C) -> (B, C), with no (B, N, C) temporary."""
    return get_xp(a).einsum("bnc,bnc->bc", a, b)


def _check_groups(x, num_groups: int) -> None:
    """x must be (B, ..., C) with C divisible by the number of groups."""
    if x.ndim < 2 or x.shape[-1] % num_groups != 0:
        raise ValueError(
            f"group_norm: x must be (B, ..., C) with C divisible by num_groups={num_groups}, "
            f"got {tuple(x.shape)}"
        )


def _centre_and_rstd(x, num_groups: int, eps: float):
    """The statistics of GroupNorm: x (B, ..., C) -> centred xc (B, N, C) and rstd (B, G)."""
    _check_groups(x, num_groups)
    B, C = x.shape[0], x.shape[-1]
    x3 = x.reshape(B, -1, C)  # (B, H, W, C) -> (B, N, C): positions on one axis
    N = x3.shape[1]
    cpg = C // num_groups  # channels per group
    n = N * cpg  # numbers sharing one (mu, var)

    # Speed: reduce over positions per channel first ((B, N, C) -> (B, C), a fast
    # contiguous reduction), then over the C/G channels of each group ((B, C) -> (B, G),
    # tiny). Reducing over a (B, N, G, C/G) view in one go is 5-40x slower.
    #
    # Accuracy: two passes (mean first, then the mean of squared deviations), all in
    # the input's dtype. The one-pass E[x^2] - E[x]^2 cancels catastrophically when
    # |mu| >> std (float32 at mu = 1000, std = 1 loses every digit of var; see the
    # shift-invariance test). The first pass is a float32 sum; accumulating it in
    # float64 was measured (up to 512x512 positions, per-channel offsets up to 100x
    # the std) to change the error of y by less than the float32 rounding of x itself,
    # already below PyTorch's, for 10-25% more time, so we do not.
    mu = _per_channel_to_group(_sum_over_positions(x3), num_groups) / n  # (B, G)
    xc = x3 - _group_to_channel(mu, cpg)  # (B, N, C) centred
    var = _per_channel_to_group(_sum_products_over_positions(xc, xc), num_groups) / n  # (B, G)
    rstd = 1.0 / get_xp(x).sqrt(var + eps)  # (B, G); eps is a Python float: dtype stays
    return xc, rstd


def group_norm_forward(x, gamma, beta, num_groups: int, eps: float = 1e-5):
    """GroupNorm, channels-last.

    For sample b and group g, with S the set of (position, channel) pairs of the
    group (n = N * C/G numbers, N = H*W positions):

        mu = mean_S(x),   var = mean_S((x - mu)^2)            (Wu & He, Eq. 3)
        x_hat = (x - mu) / sqrt(var + eps)
        y = gamma[c] * x_hat + beta[c]

    Parameters
    ----------
    x : (B, ..., C) array, e.g. (B, H, W, C) or (B, L, C).
    gamma, beta : (C,) arrays or None (no affine transform).
    num_groups : G; C must be divisible by G.
    eps : added to the variance (PyTorch default 1e-5; SD's VAE uses 1e-6).

    Returns
    -------
    y with the shape of x, and a :class:`GroupNormCache`.
    """
    xc, rstd = _centre_and_rstd(x, num_groups, eps)  # (B, N, C), (B, G)
    # y = gamma * rstd * xc + beta: gamma and rstd fold into one (B, 1, C) factor, so
    # x_hat itself is never formed (one full-size pass fewer).
    scale = _group_to_channel(rstd, x.shape[-1] // num_groups)  # (B, 1, C)
    if gamma is not None:
        scale = scale * gamma
    y = xc * scale
    if beta is not None:
        y += beta
    # What to cache: llm.c caches x (with mu and rstd) and recomputes x_hat in
    # backward, because there x is kept by the previous layer anyway. Here no layer
    # keeps its output, so caching x or the centred xc costs the same memory, and
    # xc saves the backward a full pass (x - mu); x_hat = xc * rstd is again folded
    # into per-channel factors there.
    cache = GroupNormCache(xc, rstd, gamma, num_groups, beta is not None, tuple(x.shape))
    return y.reshape(x.shape), cache


def _group_norm_backward_factors(sum_dout, sum_dout_xc, rstd, gamma, num_groups: int, N: int, has_beta: bool):
    """The per-(sample, channel) factors of GroupNorm's input gradient, from two per-channel sums
    over the N positions: ``sum(dout)`` and ``sum(dout * xc)``, both (B, C).

    Using x_hat = xc * rstd, dx = dout * scale - xc * xc_factor - shift with (all (B, C))::

        scale     = rstd * gamma
        xc_factor = rstd^2 * mean(dx_hat * x_hat)
        shift     = rstd * mean(dx_hat)

    Returns (scale, xc_factor, shift, dgamma, dbeta); dgamma/dbeta None without gamma/beta.
    (The fused GroupNorm + SiLU of nn/fast/norm.py uses it too.)
    """
    C = sum_dout.shape[-1]
    cpg = C // num_groups
    n = N * cpg  # numbers sharing one (mu, var)
    rstd_c = _group_to_channel(rstd, cpg)[:, 0, :]  # (B, C)
    sum_dout_xhat = sum_dout_xc * rstd_c  # (B, C); x_hat = xc * rstd
    dbeta = sum_dout.sum(axis=0) if has_beta else None  # (C,)
    dgamma = sum_dout_xhat.sum(axis=0) if gamma is not None else None  # (C,)
    if gamma is not None:  # dx_hat = gamma * dout, so its sums are gamma * the sums of dout
        sum_dout, sum_dout_xhat = sum_dout * gamma, sum_dout_xhat * gamma
    mean_dxhat = _per_channel_to_group(sum_dout, num_groups) / n  # (B, G)
    mean_dxhat_xhat = _per_channel_to_group(sum_dout_xhat, num_groups) / n  # (B, G)
    scale = rstd_c * gamma if gamma is not None else rstd_c
    xc_factor = rstd_c * rstd_c * _group_to_channel(mean_dxhat_xhat, cpg)[:, 0, :]
    shift = rstd_c * _group_to_channel(mean_dxhat, cpg)[:, 0, :]
    return scale, xc_factor, shift, dgamma, dbeta


def group_norm_backward(dout, cache: GroupNormCache):
    """Gradients of :func:`group_norm_forward`.

    With dx_hat = gamma * dout and means over the n numbers of each (sample, group):

        dbeta[c]  = sum_{b, positions} dout
        dgamma[c] = sum_{b, positions} dout * x_hat
        dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))

    The two group means come from per-channel sums that dgamma and dbeta need
    anyway: sum(dx_hat) = gamma[c] * sum(dout) per channel, then per group.

    Returns
    -------
    (dx, dgamma, dbeta); dgamma/dbeta are None when the forward had no gamma/beta.
    """
    xc, rstd, gamma, num_groups, has_beta, shape = cache
    B, N, C = xc.shape
    dout3 = dout.reshape(B, N, C)  # (B, N, C)
    sums = _sum_over_positions(dout3), _sum_products_over_positions(dout3, xc)  # (B, C) each
    scale, xc_factor, shift, dgamma, dbeta = _group_norm_backward_factors(*sums, rstd, gamma, num_groups, N,
                                                                          has_beta)  # (B, C) each, then (C,)
    dx = dout3 * scale[:, None, :]  # each full-size pass is one multiply or one subtract
    dx -= xc * xc_factor[:, None, :]
    dx -= shift[:, None, :]
    return dx.reshape(shape), dgamma, dbeta


class _GroupNormThenSiLUCache(NamedTuple):  # GroupNorm(silu=True) on the reference path
    norm: GroupNormCache
    silu: object  # activation.SiLUCache


class GroupNorm(Module):
    """Group normalisation over channels-last input (B, ..., C).

    Parameters ``weight`` (gamma, ones) and ``bias`` (beta, zeros), both (C,),
    as in ``torch.nn.GroupNorm`` and diffusers' state_dict.

    ``silu=True``: the layer is GroupNorm followed by SiLU (same parameters).
    ``method`` says how that pair runs: "auto" (the default) fused
    (:func:`diffusion_np.nn.fast.norm.group_norm_silu_forward`) unless reference mode
    is on (:func:`diffusion_np.nn.fast.reference_mode`), "fused" always fused,
    "reference" always the two ops one after the other. Without ``silu`` it has no effect.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 dtype=DEFAULT_DTYPE, silu: bool = False, method: str = "auto"):
        super().__init__()
        num_groups = check_size(self, "num_groups", num_groups)
        num_channels = check_size(self, "num_channels", num_channels)
        if num_channels % num_groups != 0:
            raise ValueError(
                f"GroupNorm: num_channels={num_channels} must be divisible by num_groups={num_groups}"
            )
        if method not in ("auto", "fused", "reference"):
            raise ValueError(f"GroupNorm: method must be 'auto', 'fused' or 'reference', got {method!r}")
        eps = check_number(self, "eps", eps, positive=True)
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self.silu, self.method = bool(silu), method
        if affine:
            self.add_param("weight", np.ones(num_channels, dtype=dtype))
            self.add_param("bias", np.zeros(num_channels, dtype=dtype))

    def forward(self, x):
        check_features(self, x, self.num_channels, min_ndim=2)
        check_input_finite(self, x)
        gamma, beta = self.params.get("weight"), self.params.get("bias")
        if fast.splits_batch(x):  # blocks of the batch on the threads (nn/fast/parallel.py)
            y, cache = fast.parallel.forward_in_blocks(self._forward, (x,), x.shape, gamma, beta)
        else:
            y, cache = self._forward(x, gamma, beta)
        self._set_cache(cache)
        return y

    def _forward(self, x, gamma, beta):
        if self.silu and fast.runs_fused(self.method):
            return fast.norm.group_norm_silu_forward(
                x, gamma, beta, self.num_groups, self.eps, with_grad=self._keep_cache
            )
        y, cache = group_norm_forward(x, gamma, beta, self.num_groups, self.eps)
        if self.silu:  # the reference path: the two ops one after the other
            y, silu_cache = silu_forward(y)
            cache = _GroupNormThenSiLUCache(cache, silu_cache)
        return y, cache

    @staticmethod
    def _backward(dout, cache):
        if isinstance(cache, fast.norm.GroupNormSiLUCache):
            return fast.norm.group_norm_silu_backward(dout, cache, consume=True)  # the cache was popped
        if isinstance(cache, _GroupNormThenSiLUCache):
            return group_norm_backward(silu_backward(dout, cache.silu), cache.norm)
        return group_norm_backward(dout, cache)

    def backward(self, dout):
        cache = self._pop_cache()
        if isinstance(cache, fast.parallel.BlockCaches):
            dx, dgamma, dbeta = fast.parallel.backward_in_blocks(self._backward, dout, cache)
        else:
            dx, dgamma, dbeta = self._backward(dout, cache)
        if self.affine:
            self.add_grad("weight", dgamma)
            self.add_grad("bias", dbeta)
        return dx

    def __repr__(self) -> str:
        silu = ", silu=True" if self.silu else ""
        method = f", method={self.method!r}" if self.method != "auto" else ""
        return f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}{silu}{method})"



# ----------------------------------------------------------------------------- LayerNorm


class LayerNormCache(NamedTuple):
    x_hat: object  # (..., C) normalised input
    rstd: object  # (..., 1) 1 / sqrt(var + eps) per row
    gamma: object  # (C,) or None
    has_beta: bool


def layer_norm_forward(x, gamma, beta, eps: float = 1e-5):
    """LayerNorm over the last axis (Ba et al. 2016, Eq. 4).

    For each row (one token's C features):

        mu = mean(x),  var = mean((x - mu)^2),  x_hat = (x - mu) / sqrt(var + eps)
        y = gamma * x_hat + beta

    Two passes (mean, then squared deviations) for the same reason as GroupNorm:
    E[x^2] - E[x]^2 cancels when |mu| >> std. Reductions over the contiguous last
    axis use NumPy's pairwise summation, so float32 accumulation is accurate.

    Shapes: x (..., C), gamma/beta (C,) or None -> y (..., C).
    """
    xp = get_xp(x)
    mu = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mu  # (..., C)
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    x_hat = xc
    x_hat *= rstd
    y = x_hat * gamma if gamma is not None else x_hat.copy()
    if beta is not None:
        y += beta
    # x_hat, not x, is cached: the same memory (x is kept by no one else either,
    # see the note in group_norm_forward), and backward need not recompute it.
    return y, LayerNormCache(x_hat, rstd, gamma, beta is not None)


def layer_norm_backward(dout, cache: LayerNormCache):
    """Gradients of :func:`layer_norm_forward`; means over the last axis:

        dbeta  = sum over rows of dout,    dgamma = sum over rows of dout * x_hat
        dx_hat = gamma * dout
        dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))

    Returns (dx, dgamma, dbeta); dgamma/dbeta are None without gamma/beta.
    """
    x_hat, rstd, gamma, has_beta = cache
    C = x_hat.shape[-1]
    dout2 = dout.reshape(-1, C)  # (rows, C)
    dbeta = dout2.sum(axis=0) if has_beta else None  # (C,)
    dgamma = (dout2 * x_hat.reshape(-1, C)).sum(axis=0) if gamma is not None else None  # (C,)

    dx_hat = dout * gamma if gamma is not None else dout  # (..., C)
    mean_dxhat = dx_hat.mean(axis=-1, keepdims=True)  # (..., 1)
    mean_dxhat_xhat = (dx_hat * x_hat).mean(axis=-1, keepdims=True)  # (..., 1)
    dx = dx_hat - mean_dxhat
    dx -= x_hat * mean_dxhat_xhat
    dx *= rstd
    return dx, dgamma, dbeta


class LayerNorm(Module):
    """Layer normalisation over the last axis.

    ``normalized_shape`` is the size of the last axis (an int, or a 1-tuple as
    PyTorch also accepts). Parameters ``weight`` (ones) and ``bias`` (zeros).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 dtype=DEFAULT_DTYPE):
        super().__init__()
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ValueError(
                    f"LayerNorm normalises the last axis only: normalized_shape must be an int or a "
                    f"1-tuple, got {tuple(normalized_shape)}"
                )
            normalized_shape = normalized_shape[0]
        self.normalized_shape = check_size(self, "normalized_shape", normalized_shape)
        self.eps, self.elementwise_affine = check_number(self, "eps", eps, positive=True), elementwise_affine
        if elementwise_affine:
            self.add_param("weight", np.ones(self.normalized_shape, dtype=dtype))
            self.add_param("bias", np.zeros(self.normalized_shape, dtype=dtype))

    def forward(self, x):
        check_features(self, x, self.normalized_shape, min_ndim=1)
        check_input_finite(self, x)
        gamma, beta = self.params.get("weight"), self.params.get("bias")
        if fast.splits_batch(x):  # blocks of the batch on the threads (nn/fast/parallel.py)
            y, cache = fast.parallel.forward_in_blocks(layer_norm_forward, (x,), x.shape, gamma, beta, self.eps)
        else:
            y, cache = layer_norm_forward(x, gamma, beta, self.eps)
        self._set_cache(cache)
        return y

    def backward(self, dout):
        cache = self._pop_cache()
        if isinstance(cache, fast.parallel.BlockCaches):
            dx, dgamma, dbeta = fast.parallel.backward_in_blocks(layer_norm_backward, dout, cache)
        else:
            dx, dgamma, dbeta = layer_norm_backward(dout, cache)
        if self.elementwise_affine:
            self.add_grad("weight", dgamma)
            self.add_grad("bias", dbeta)
        return dx

    def __repr__(self) -> str:
        return f"LayerNorm({self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine})"
