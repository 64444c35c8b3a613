"""2-D convolution, channels-last, with a hand-written backward, and the Conv2d layer.

Shapes: x ``(B, H, W, C_in)``, weight ``(kh, kw, C_in, C_out)``, bias ``(C_out,)``,
output ``(B, Ho, Wo, C_out)``. ``x_pad`` is x with zeros added around H and W
(``padding`` = top, bottom, left, right), ``s`` the stride.

Forward (a cross-correlation, as PyTorch's ``conv2d``: the kernel is not flipped)::

    y[b, i, j, o] = bias[o] + sum_{p, q, c} x_pad[b, s*i + p, s*j + q, c] * w[p, q, c, o]
    Ho = (H + top + bottom - kh) // s + 1,   Wo = (W + left + right - kw) // s + 1

Backward, for the upstream gradient ``dout = dL/dy``::

    dbias[o]     = sum_{b, i, j} dout[b, i, j, o]
    dw[p, q, c, o] = sum_{b, i, j} x_pad[b, s*i + p, s*j + q, c] * dout[b, i, j, o]
    dx_pad[b, u, v, c] = sum over (i, p) with s*i + p = u and (j, q) with s*j + q = v
                         of dout[b, i, j, o] * w[p, q, c, o]
    dx = dx_pad without its padding rows and columns

This file is the reference path, the one to read: :func:`conv2d_reference_forward`
copies every patch into one row of a matrix (im2col) and multiplies it by the
kernel; :func:`conv2d_reference_backward` multiplies back and scatters the column
gradients onto the image (col2im). Faster formulations of the same numbers (a
gather instead of the scatter, im2col along W only, a plain matmul for 1x1) are in
:mod:`diffusion_np.nn.fast.conv`, each tested equal to this one; :func:`conv2d_forward`
and :class:`Conv2d` pick one (``method="auto"``, the default, the fastest for the
shape; ``"reference"`` this file; reference mode, :func:`diffusion_np.nn.fast.reference_mode`,
turns "auto" into "reference"). CONTRIBUTING.md has the layout.

Left out on purpose: groups, dilation of the kernel, padding modes other than
zeros, transposed convolution.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, get_xp
from diffusion_np.nn import fast  # fast.conv: nn/fast/conv.py, which builds on this file (see nn/fast/__init__.py)
from diffusion_np.nn.module import Module, init_uniform
from diffusion_np.nn.validate import check_image, check_input_finite, check_size

#: Every formulation :func:`conv2d_forward` accepts; all but "reference" are in nn/fast/conv.py.
METHODS = ("reference", "im2col", "rows", "rows_stacked", "matmul")




class Conv2dCache(NamedTuple):
    method: str  # which formulation ran the forward (its backward must match)
    saved: object  # reference: columns (B*Ho*Wo, kh*kw*C_in); im2col: the columns, or x when they
    # are large (fast.conv._MAX_SAVED_COLUMNS_BYTES); rows, rows_stacked and matmul: x
    w: object  # (kh, kw, C_in, C_out)
    x_shape: tuple  # (B, H, W, C_in) of the unpadded input
    stride: int
    padding: tuple  # (top, bottom, left, right)
    has_bias: bool


# ----------------------------------------------------------------------------- small helpers
def _padding4(padding) -> tuple:
    """An int ``p`` or a 4-tuple (top, bottom, left, right) -> a 4-tuple of ints >= 0."""
    def is_int(p):
        return isinstance(p, (int, np.integer)) and not isinstance(p, bool)

    if is_int(padding):
        padding = (padding,) * 4
    if not isinstance(padding, (tuple, list)) or not all(is_int(p) for p in padding):
        raise TypeError(f"padding must be an int >= 0 or (top, bottom, left, right) of ints, got {padding!r}")
    if len(padding) != 4 or min(padding) < 0:
        raise ValueError(f"padding must be an int >= 0 or (top, bottom, left, right), got {tuple(padding)}")
    return tuple(int(p) for p in padding)


def _out_size(x_shape: tuple, w_shape: tuple, stride: int, padding: tuple) -> tuple:
    """(Ho, Wo), with a sentence if the kernel does not fit."""
    (_, H, W, _), (kh, kw) = x_shape, w_shape[:2]
    top, bottom, left, right = padding
    Ho = (H + top + bottom - kh) // stride + 1
    Wo = (W + left + right - kw) // stride + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"conv2d: a {kh}x{kw} kernel does not fit an {H}x{W} image with padding {padding}"
        )
    return Ho, Wo


def _pad_hw(x, top: int, bottom: int, left: int, right: int, stride: int = 1):
    """Zero-pad axes 1 and 2 of x (B, H, W, C); with ``stride > 1`` first put
    ``stride - 1`` zeros between neighbouring rows and columns (dilation).

    A negative amount crops instead. One allocation and one strided copy (xp.pad
    cannot dilate, and this is the same code on NumPy and CuPy).
    """
    xp = get_xp(x)
    B, H, W, C = x.shape
    Hd, Wd = stride * (H - 1) + 1, stride * (W - 1) + 1  # size after dilation
    t, b, l, r = (max(a, 0) for a in (top, bottom, left, right))
    out = xp.zeros((B, t + Hd + b, l + Wd + r, C), dtype=x.dtype)
    out[:, t : t + Hd : stride, l : l + Wd : stride] = x
    if min(top, bottom, left, right) < 0:  # crop where an amount was negative
        out = out[:, max(-top, 0) : out.shape[1] - max(-bottom, 0), max(-left, 0) : out.shape[2] - max(-right, 0)]
    return out


def _windows(x, kh: int, kw: int):
    """Every kh x kw window of x (B, H, W, C), a view: ``windows[b, i, j, p, q] = x[b, i + p, j + q]``,
    (B, H - kh + 1, W - kw + 1, kh, kw, C). The window axes step like the image axes.
    (What ``sliding_window_view`` gives, axes in the weight's order, without its argument
    checks, which cost more than the view; the same code on NumPy and CuPy.)"""
    B, H, W, C = x.shape
    s_b, s_h, s_w, s_c = x.strides
    windows = get_xp(x).lib.stride_tricks.as_strided(x, (B, H - kh + 1, W - kw + 1, kh, kw, C),
                                                     (s_b, s_h, s_w, s_h, s_w, s_c))
    if isinstance(windows, np.ndarray):
        windows.flags.writeable = False  # the windows overlap: a write would land in several
    return windows


def _im2col(x_pad, kh: int, kw: int, stride: int, Ho: int, Wo: int):
    """Columns of a padded image: row ``(b, i, j)`` holds the ``kh x kw x C`` patch
    that output pixel (i, j) sees, flattened in the weight's (p, q, c) order.

    x_pad (B, Hp, Wp, C) -> (B * Ho * Wo, kh * kw * C), a contiguous copy.
    """
    B, C = x_pad.shape[0], x_pad.shape[3]
    windows = _windows(x_pad, kh, kw)  # (B, Hp-kh+1, Wp-kw+1, kh, kw, C), a view
    windows = windows[:, : stride * (Ho - 1) + 1 : stride, : stride * (Wo - 1) + 1 : stride]  # (B, Ho, Wo, kh, kw, C)
    return windows.reshape(B * Ho * Wo, kh * kw * C)  # the one copy


def _sum_rows(a):
    """Sum over the rows of a (N, C) array as a matmul with a row of ones: (1, N) @ (N, C) -> (C,).

    Equal to ``a.sum(axis=0)`` (which it replaces for the bias gradient); BLAS is
    about 3x faster on the tall (B*H*W, C) arrays here (see norm.py), and no less
    accurate (blocked accumulation).
    """
    return (get_xp(a).ones((1, a.shape[0]), dtype=a.dtype) @ a)[0]


def _col2im_dx(dout, w, stride: int, padding: tuple, H: int, W: int):
    """Reference input gradient: the definition of dx_pad, tap by tap.

    Column gradients ``dcols = dout @ W^T`` hold, for each output pixel, what it
    sends back to each pixel of its patch; pixel (i, j) with tap (p, q) lands at
    ``x_pad[s*i + p, s*j + q]``. Overlapping patches add up (col2im).
    """
    xp = get_xp(dout)
    B, Ho, Wo, C_out = dout.shape
    kh, kw, C_in, _ = w.shape
    top, bottom, left, right = padding
    dcols = dout.reshape(-1, C_out) @ w.reshape(kh * kw * C_in, C_out).T  # (B*Ho*Wo, C_out) @ (C_out, K)
    dcols = dcols.reshape(B, Ho, Wo, kh, kw, C_in)
    dx_pad = xp.zeros((B, H + top + bottom, W + left + right, C_in), dtype=dout.dtype)
    for p in range(kh):  # a loop over the kh*kw kernel taps, not over pixels
        for q in range(kw):
            dx_pad[:, p : p + stride * (Ho - 1) + 1 : stride, q : q + stride * (Wo - 1) + 1 : stride] += dcols[
                :, :, :, p, q
            ]
    return xp.ascontiguousarray(dx_pad[:, top : top + H, left : left + W])  # drop the padding


# ----------------------------------------------------------------------------- the reference op pair
def conv2d_reference_forward(x, w, b=None, stride: int = 1, padding=0):
    """y = conv2d(x, w) + b as im2col + one matmul: ``y = cols @ w`` with ``cols`` the
    (B*Ho*Wo, kh*kw*C_in) patches (:func:`_im2col`) and w as a (kh*kw*C_in, C_out) matrix.

    Returns y (B, Ho, Wo, C_out) and the cache for :func:`conv2d_reference_backward`.
    """
    padding = _padding4(padding)
    kh, kw, C_in, C_out = w.shape
    B = x.shape[0]
    Ho, Wo = _out_size(x.shape, w.shape, stride, padding)
    x_pad = _pad_hw(x, *padding)  # (B, Hp, Wp, C_in)
    cols = _im2col(x_pad, kh, kw, stride, Ho, Wo)  # (B*Ho*Wo, kh*kw*C_in)
    y = cols @ w.reshape(kh * kw * C_in, C_out)  # (B*Ho*Wo, K) @ (K, C_out)
    y = y.reshape(B, Ho, Wo, C_out)
    if b is not None:
        y += b  # y is a fresh matmul result: add in place, no second full-size array
    return y, Conv2dCache("reference", cols, w, tuple(x.shape), stride, padding, b is not None)


def conv2d_reference_backward(dout, cache: Conv2dCache):
    """Gradients of :func:`conv2d_reference_forward`: ``(dx, dw, db)``, db None without bias.

    ``dw = cols^T @ dout`` (the forward's columns, kept in the cache) and dx by col2im
    (:func:`_col2im_dx`): the formulas of the module docstring, term by term.
    """
    _, cols, w, x_shape, stride, padding, has_bias = cache
    C_out = w.shape[3]
    _, H, W, _ = x_shape
    dout2 = dout.reshape(-1, C_out)  # (B*Ho*Wo, C_out)
    db = _sum_rows(dout2) if has_bias else None
    dw = (cols.T @ dout2).reshape(w.shape)  # (K, B*Ho*Wo) @ (B*Ho*Wo, C_out) -> (K, C_out)
    dx = _col2im_dx(dout, w, stride, padding, H, W)
    return dx, dw, db


# ----------------------------------------------------------------------------- the op pair, any formulation
def conv2d_forward(x, w, b=None, stride: int = 1, padding=0, method: str | None = None):
    """y = conv2d(x, w) + b, channels-last (see the module docstring for the math).

    Parameters
    ----------
    x : (B, H, W, C_in) array.
    w : (kh, kw, C_in, C_out) array.
    b : (C_out,) array or None.
    stride : int, the same in both directions.
    padding : int, or (top, bottom, left, right) for asymmetric zero padding
        (the VAE's downsampler uses (0, 1, 0, 1)).
    method : None or "auto" (the fastest for the shape,
        :func:`diffusion_np.nn.fast.conv.choose_method`; "reference" in reference mode),
        or one of :data:`METHODS` to force it.

    Returns
    -------
    y : (B, Ho, Wo, C_out) array, and the cache for :func:`conv2d_backward`.
    """
    padding = _padding4(padding)
    if x.ndim != 4 or w.ndim != 4 or x.shape[3] != w.shape[2]:
        raise ValueError(
            f"conv2d expects x (B, H, W, C_in) and w (kh, kw, C_in, C_out) with the same C_in, "
            f"got x {tuple(x.shape)} and w {tuple(w.shape)}"
        )
    if method in (None, "auto"):
        method = "reference" if fast.reference_on() else fast.conv.choose_method(x.shape, w.shape, stride, padding)
    if method not in METHODS:
        raise ValueError(f"method must be 'auto' or one of {METHODS}, got {method!r}")
    if method == "reference":
        return conv2d_reference_forward(x, w, b, stride, padding)
    return fast.conv.conv2d_fast_forward(x, w, b, stride, padding, method)


def conv2d_backward(dout, cache: Conv2dCache, input_grad: bool = True):
    """Gradients of :func:`conv2d_forward`: ``(dx, dw, db)``, db None without bias,
    by the backward of the formulation that ran the forward (``cache.method``).
    ``input_grad=False``: dx is None, and the fast formulations skip computing it."""
    if cache.method == "reference":
        dx, dw, db = conv2d_reference_backward(dout, cache)
        return (dx if input_grad else None), dw, db
    return fast.conv.conv2d_fast_backward(dout, cache, input_grad)


def _kernel2(layer, kernel_size) -> tuple:
    """An int k or a pair (kh, kw) of positive ints -> (kh, kw)."""
    if isinstance(kernel_size, (tuple, list)) and len(kernel_size) == 2:
        return tuple(check_size(layer, "kernel_size", k) for k in kernel_size)
    k = check_size(layer, "kernel_size", kernel_size)
    return k, k


class Conv2d(Module):
    """2-D convolution on channels-last images.

    Parameters: ``weight`` (kh, kw, C_in, C_out) and ``bias`` (C_out,), initialised
    as PyTorch does: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = C_in * kh * kw.
    A PyTorch weight (C_out, C_in, kh, kw) maps onto ours by ``.transpose(2, 3, 1, 0)``.

    ``padding`` is an int or (top, bottom, left, right). ``method``: "auto" (the
    fastest formulation for each input's shape, or the reference one in reference
    mode), "reference", or a formulation of :mod:`diffusion_np.nn.fast.conv` to force it.

    ``input_grad``: set it False on a layer whose input is data (a model's first layer,
    while it trains) and ``backward`` returns None for dx, as PyTorch skips the gradient
    of an input that does not require one. The fast formulations then do not compute it;
    the reference one computes it and drops it.
    """

    input_grad = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride: int = 1,
        padding=0,
        bias: bool = True,
        rng=None,
        dtype=DEFAULT_DTYPE,
        method: str = "auto",
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        in_channels = check_size(self, "in_channels", in_channels)
        out_channels = check_size(self, "out_channels", out_channels)
        kh, kw = _kernel2(self, kernel_size)
        if method != "auto" and method not in METHODS:
            raise ValueError(f"Conv2d: method must be 'auto' or one of {METHODS}, got {method!r}")
        self.in_channels, self.out_channels, self.method = in_channels, out_channels, method
        self.kernel_size, self.stride, self.padding = (kh, kw), check_size(self, "stride", stride), _padding4(padding)
        fan_in = in_channels * kh * kw
        self.add_param("weight", init_uniform(rng, (kh, kw, in_channels, out_channels), fan_in, dtype))
        if bias:
            self.add_param("bias", init_uniform(rng, (out_channels,), fan_in, dtype))

    def forward(self, x):
        check_image(self, x, self.in_channels)
        check_input_finite(self, x)
        y, cache = conv2d_forward(x, self.weight, self.params.get("bias"), self.stride, self.padding, self.method)
        self._set_cache(cache)
        return y

    def backward(self, dout):
        dx, dw, db = conv2d_backward(dout, self._pop_cache(), self.input_grad)
        self.add_grad("weight", dw)
        if db is not None:
            self.add_grad("bias", db)
        return dx

    def __repr__(self) -> str:
        kh, kw = self.kernel_size
        return (
            f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
            f"stride={self.stride}, padding={self.padding}"
            + (f", method={self.method!r})" if self.method != "auto" else ")")
        )
