"""2-D convolution, channels-last, with a hand-written backward, and the Conv2d layer.

Shapes: x ``(B, H, W, C_in)``, weight ``(kh, kw, C_in, C_out)``, bias ``(C_out,)``,
output ``(B, Ho, Wo, C_out)``. ``x_pad`` is x with zeros added around H and W
(``padding`` = top, bottom, left, right), ``s`` the stride.

Forward (a cross-correlation, as PyTorch's ``conv2d``: the kernel is not flipped)::

    y[b, i, j, o] = bias[o] + sum_{p, q, c} x_pad[b, s*i + p, s*j + q, c] * w[p, q, c, o]
    Ho = (H + top + bottom - kh) // s + 1,   Wo = (W + left + right - kw) // s + 1

Backward, for the upstream gradient ``dy = dL/dy``::

    dbias[o]     = sum_{b, i, j} dy[b, i, j, o]
    dw[p, q, c, o] = sum_{b, i, j} x_pad[b, s*i + p, s*j + q, c] * dy[b, i, j, o]
    dx_pad[b, u, v, c] = sum over (i, p) with s*i + p = u and (j, q) with s*j + q = v
                         of dy[b, i, j, o] * w[p, q, c, o]
    dx = dx_pad without its padding rows and columns

The last line is itself a convolution: put ``s - 1`` zeros between the rows and
columns of dy ("dilate" it), pad it with ``kh - 1`` zeros, and correlate it with
the kernel flipped in both spatial axes and with C_in and C_out swapped
(``w[::-1, ::-1].transpose(0, 1, 3, 2)``). That turns the scatter of the
definition into a gather, which is what a fast implementation wants.

Six formulations compute the same numbers; :func:`conv2d_forward` picks one per
shape with :func:`choose_method` (or takes ``method=`` to force one):

``"reference"``
    im2col + one matmul; backward scatters the column gradients back (col2im).
    The plainest code, and the one the others are tested against.
``"im2col"``
    Same forward; backward computes dx as the flipped-kernel convolution of
    dy (a gather, no scatter), itself run as "im2col", "rows" or "rows_stacked",
    whichever :func:`choose_method` picks for that C_out -> C_in shape; with a
    stride > 1, as one small convolution per output phase instead of one over
    the dilated dy (:func:`_dx_phases`). Fastest for 4x4 images, strides > 1
    and few input channels.
``"shifted"``
    Stride 1 only. No im2col copy: a kernel offset ``(p, q)`` is a row offset
    ``p * Wp + q`` in the padded image flattened to ``(B * Hp * Wp, C_in)`` rows,
    so the convolution is ``kh * kw`` matmuls of contiguous row slices,
    accumulated into one output buffer. The idea "rows" builds on; no longer
    the fastest anywhere, kept as the copy-free formulation.
``"rows"``
    Stride 1 only. Between im2col and shifted: im2col along W only (each
    pixel's ``kw`` horizontal neighbours side by side: ``kw`` times the input,
    not ``kh * kw``), then one matmul per kernel *row* ``p``. For every image,
    the output rows ``i`` read the width-columns of image rows ``i + p``: a
    contiguous slice of that image's rows, so the matmul is batched over the
    images with no further copy. Each image's small product stays in the CPU
    cache while it is accumulated. Fastest for 8x8 images and up.
``"rows_stacked"``
    Stride 1 only. "rows" with the ``kh`` kernel-row products of one image in
    ONE batched matmul: a strided view stacks each image's ``kh`` row slices
    (no copy), the matmul runs over (image, kernel row) pairs, and the sum over
    the kernel rows follows. An image's width-columns are then read ``kh``
    times in a row, from the cache, instead of once per pass over the whole
    batch. Fastest for 32x32 images (at batch 64 "rows" streams 27 MB of
    columns through memory three times); the weight gradient is stacked the
    same way.
``"matmul"``
    A 1x1 convolution with stride 1 and no padding is a Linear layer on the
    channel axis: one matmul.

Left out on purpose: groups, dilation of the kernel, padding modes other than
zeros, transposed convolution.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, get_xp
from diffusion_np.nn.module import Module, init_uniform
from diffusion_np.nn.validate import check_finite, check_image

METHODS = ("reference", "im2col", "shifted", "rows", "rows_stacked", "matmul")


class Conv2dCache(NamedTuple):
    method: str  # which formulation ran the forward (its backward must match)
    saved: object  # reference: columns (B*Ho*Wo, kh*kw*C_in); im2col: the columns, or x_pad when they
    # are large (_MAX_SAVED_COLUMNS_BYTES); shifted, rows and rows_stacked: x_pad; matmul: x
    w: object  # (kh, kw, C_in, C_out)
    x_shape: tuple  # (B, H, W, C_in) of the unpadded input
    stride: int
    padding: tuple  # (top, bottom, left, right)
    has_bias: bool


# ----------------------------------------------------------------------------- small helpers
def _padding4(padding) -> tuple:
    """An int ``p`` or a 4-tuple (top, bottom, left, right) -> a 4-tuple of ints >= 0."""
    if isinstance(padding, (int, np.integer)):
        padding = (padding,) * 4
    padding = tuple(int(p) for p in padding)
    if len(padding) != 4 or min(padding) < 0:
        raise ValueError(f"padding must be an int >= 0 or (top, bottom, left, right), got {padding}")
    return padding


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


def _sliding_window_view(x, window_shape: tuple, axis: tuple):
    """``xp.lib.stride_tricks.sliding_window_view``; for a CuPy that lacks it, the
    same view built with ``as_strided`` (x is (B, H, W, C), axis (1, 2))."""
    xp = get_xp(x)
    tricks = xp.lib.stride_tricks
    if hasattr(tricks, "sliding_window_view"):
        return tricks.sliding_window_view(x, window_shape, axis=axis)
    B, H, W, C = x.shape
    kh, kw = window_shape
    sB, sH, sW, sC = x.strides
    return tricks.as_strided(x, (B, H - kh + 1, W - kw + 1, C, kh, kw), (sB, sH, sW, sC, sH, sW))


def _im2col(x_pad, kh: int, kw: int, stride: int, Ho: int, Wo: int):
    """Columns of a padded image: row ``(b, i, j)`` holds the ``kh x kw x C`` patch
    that output pixel (i, j) sees, flattened in the weight's (p, q, c) order.

    x_pad (B, Hp, Wp, C) -> (B * Ho * Wo, kh * kw * C), a contiguous copy.
    """
    B, C = x_pad.shape[0], x_pad.shape[3]
    windows = _sliding_window_view(x_pad, (kh, kw), axis=(1, 2))  # (B, Hp-kh+1, Wp-kw+1, C, kh, kw), a view
    windows = windows[:, : stride * (Ho - 1) + 1 : stride, : stride * (Wo - 1) + 1 : stride]  # (B, Ho, Wo, C, kh, kw)
    windows = windows.transpose(0, 1, 2, 4, 5, 3)  # (B, Ho, Wo, kh, kw, C), still a view
    return windows.reshape(B * Ho * Wo, kh * kw * C)  # the one copy


def _width_columns(x_pad, kw: int, Wo: int):
    """im2col along W only: row ``(b, u, j)`` holds the ``kw`` pixels
    ``x_pad[b, u, j : j + kw]`` side by side, in the weight's (q, c) order.

    x_pad (B, Hp, Wp, C) -> (B, Hp, Wo, kw * C), a contiguous copy (stride 1).
    """
    B, Hp, _, C = x_pad.shape
    windows = _sliding_window_view(x_pad, (1, kw), axis=(1, 2))[:, :, :Wo, :, 0]  # (B, Hp, Wo, C, kw), a view
    windows = windows.transpose(0, 1, 2, 4, 3)  # (B, Hp, Wo, kw, C), still a view
    # explicit copy: reshape alone would give an overlapping *view* (a pixel's kw*C numbers
    # are contiguous in x_pad), which BLAS cannot use and every later reshape would copy again
    return get_xp(x_pad).ascontiguousarray(windows).reshape(B, Hp, Wo, kw * C)


def _flipped(w):
    """The kernel of the input-gradient convolution: flipped in space, C_in and
    C_out swapped. (kh, kw, C_in, C_out) -> (kh, kw, C_out, C_in)."""
    return w[::-1, ::-1].transpose(0, 1, 3, 2)


# ----------------------------------------------------------------------------- dispatch
def choose_method(x_shape: tuple, w_shape: tuple, stride: int = 1, padding=0) -> str:
    """The fastest formulation for this shape (measured on a CPU with NumPy/OpenBLAS).

    * 1x1, stride 1, no padding: a plain matmul, nothing to gather.
    * stride 1 and at least 8x8 outputs (64 positions): "rows". Its copy is
      ``kw`` times the input (im2col's is ``kh*kw`` times) and each image's
      product is accumulated while it is in the cache. Measured forward times,
      one thread, "rows" vs "im2col": batch 64, 16x16, 32 -> 32 channels 1.7 vs
      3.3 ms; 8x8, 64 -> 64 1.4 vs 1.8; 32x32, 3 -> 32 1.7 vs 1.9 and 32 -> 3
      7.0 vs 17.0 (im2col's columns are 288 wide for a 3-wide output); the
      weight and input gradients gain as much (see docs/performance.md).
    * everything else (4x4, stride 2, 1x1 with stride or padding): "im2col".
      At 4x4, 128 -> 128 channels, rows' three matmuls per image are too small
      (forward 1.7 vs 1.35 ms), and with stride 2 the image rows a kernel row
      reads are no longer one contiguous slice.
    * "rows_stacked" instead of "rows" when the batch's width-columns are
      large (at least :data:`_STACKED_MIN_COLUMNS` numbers, 12 MiB in float32)
      and C_in >= 16: then "rows", which passes over the whole batch once per
      kernel row, reads them from memory three times, "rows_stacked" once.
      Measured (one thread, forward / weight gradient, ms): batch 64, 32x32,
      32 -> 32 12.5 / 12.8 vs 9.1 / 9.1; 32 -> 3 4.0 / 2.4 vs 2.6 / 1.7;
      16x16, 64 -> 64 7.5 / 9.0 vs 6.8 / 7.3; batch 16, 32x32, 64 -> 64
      7.0 / 8.6 vs 6.1 / 6.8. Below the threshold it loses (8x8, 64 -> 64
      weight gradient 1.5 vs 1.9), and with 3 input channels its sum over the
      kernel rows costs more than the matmuls (32x32, 3 -> 32: 0.8 vs 1.9).

    "shifted" is never chosen: "rows" was faster on every shape measured.

    The input gradient of a convolution is itself a stride-1 convolution (of dy,
    C_out -> C_in channels), and :func:`conv2d_backward` asks this function again
    for that shape, so the two directions may use different formulations.
    """
    kh, kw, C_in, C_out = w_shape
    padding = _padding4(padding)
    if kh == kw == 1 and stride == 1 and padding == (0, 0, 0, 0):
        return "matmul"
    Ho, Wo = _out_size(tuple(x_shape), tuple(w_shape), stride, padding)
    if stride == 1 and Ho * Wo >= 64:
        columns = x_shape[0] * (Ho + kh - 1) * Wo * kw * C_in  # numbers in the width-columns
        return "rows_stacked" if columns >= _STACKED_MIN_COLUMNS and C_in >= 16 else "rows"
    return "im2col"


#: Width-columns of at least this many numbers (12 MiB in float32) no longer stay
#: in the cache between the kernel-row passes of "rows": "rows_stacked" is chosen.
_STACKED_MIN_COLUMNS = 3 * 2**20


def _dx_method(dy_shape: tuple, w_shape: tuple, H: int, W: int) -> str:
    """Formulation of the input-gradient convolution (dy padded to (B, H + kh - 1,
    W + kw - 1, C_out), kernel (kh, kw, C_out, C_in), stride 1, no padding)."""
    kh, kw, C_in, C_out = w_shape
    method = choose_method((dy_shape[0], H + kh - 1, W + kw - 1, C_out), (kh, kw, C_out, C_in), 1, 0)
    return "im2col" if method == "matmul" else method


#: Above this many bytes the "im2col" forward keeps the padded input instead of the
#: columns (``kh*kw`` times larger) and the backward rebuilds them: one more copy
#: (about 25% of the weight-gradient matmul) for a ninth of the memory. Below it
#: (the 4x4 and stride-2 layers of a small U-Net) the columns are kept.
_MAX_SAVED_COLUMNS_BYTES = 32 * 2**20


# ----------------------------------------------------------------------------- the op pair
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
    method : force a formulation (one of :data:`METHODS`);
        None picks one with :func:`choose_method`.

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
    method = method or choose_method(x.shape, w.shape, stride, padding)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    kh, kw, C_in, C_out = w.shape
    B = x.shape[0]
    Ho, Wo = _out_size(x.shape, w.shape, stride, padding)

    if method == "matmul":
        if (kh, kw, stride, padding) != (1, 1, 1, (0, 0, 0, 0)):
            raise ValueError("method 'matmul' is for 1x1 convolutions with stride 1 and no padding")
        y = x.reshape(-1, C_in) @ w.reshape(C_in, C_out)  # (B*H*W, C_in) @ (C_in, C_out)
        saved = x
    elif method in ("shifted", "rows", "rows_stacked"):
        if stride != 1:
            raise ValueError(f"method '{method}' needs stride 1")
        x_pad = _pad_hw(x, *padding)  # (B, Hp, Wp, C_in), contiguous
        if method == "shifted":
            saved = x_pad
            y = _conv_shifted(x_pad, w)[:, :Ho, :Wo]  # (B, Ho, Wo, C_out), a view of the grid
        else:
            conv = _conv_rows if method == "rows" else _conv_rows_stacked
            y = conv(_width_columns(x_pad, kw, Wo), w)  # (B, Ho, Wo, C_out), a fresh array
            # keep x_pad, not the kw times larger width-columns: rebuilding them in the backward
            # costs one copy (3% of the conv at 32x32, 32 channels), while keeping them made the
            # VAE's training step page-fault (+15% time, +40% memory)
            saved = x_pad
    else:  # "reference" and "im2col" share the forward
        x_pad = _pad_hw(x, *padding)
        cols = _im2col(x_pad, kh, kw, stride, Ho, Wo)  # (B*Ho*Wo, kh*kw*C_in)
        y = cols @ w.reshape(kh * kw * C_in, C_out)  # (B*Ho*Wo, K) @ (K, C_out)
        # keep the columns for dw, or (when they are large) the 9x smaller padded input
        saved = cols if method == "reference" or cols.nbytes <= _MAX_SAVED_COLUMNS_BYTES else x_pad

    y = y.reshape(B, Ho, Wo, C_out)
    if method == "shifted":  # y is a strided view of the grid: the bias add makes it contiguous
        y = y + b if b is not None else get_xp(y).ascontiguousarray(y)
    elif b is not None:
        y += b  # y is a fresh matmul result: add in place, no second full-size array
    return y, Conv2dCache(method, saved, w, tuple(x.shape), stride, padding, b is not None)


def conv2d_backward(dy, cache: Conv2dCache):
    """Gradients of :func:`conv2d_forward`: ``(dx, dw, db)``, db None without bias.

    Each formulation has its own backward (below), all computing the formulas in
    the module docstring.
    """
    method, saved, w, x_shape, stride, padding, has_bias = cache
    kh, kw, C_in, C_out = w.shape
    B, H, W, _ = x_shape
    dy2 = dy.reshape(-1, C_out)  # (B*Ho*Wo, C_out)
    db = _sum_rows(dy2) if has_bias else None

    if method == "matmul":
        x2 = saved.reshape(-1, C_in)  # (B*H*W, C_in)
        dw = (x2.T @ dy2).reshape(w.shape)  # (C_in, N) @ (N, C_out)
        dx = (dy2 @ w.reshape(C_in, C_out).T).reshape(x_shape)  # (N, C_out) @ (C_out, C_in)
    elif method == "reference":
        cols = saved  # (B*Ho*Wo, kh*kw*C_in)
        dw = (cols.T @ dy2).reshape(w.shape)  # (K, B*Ho*Wo) @ (B*Ho*Wo, C_out) -> (K, C_out)
        dx = _dx_col2im(dy, w, stride, padding, H, W)
    else:
        if stride == 1:  # dx is a stride-1 convolution of dy (C_out -> C_in): its own formulation
            dx = _dx_gather(dy, w, stride, padding, H, W, _dx_method(dy.shape, w.shape, H, W))
        else:  # no dilated dy (3/4 zeros at stride 2): one small convolution per output phase
            dx = _dx_phases(dy, w, stride, padding, H, W)
        if method == "shifted":
            dw = _dw_shifted(saved, dy, kh, kw)
        elif method in ("rows", "rows_stacked"):
            _, Ho, Wo, _ = dy.shape
            dw_rows = _dw_rows if method == "rows" else _dw_rows_stacked
            dw = dw_rows(_width_columns(saved, kw, Wo), dy, w.shape)  # the forward's columns, rebuilt
        else:
            _, Ho, Wo, _ = dy.shape
            cols = saved if saved.ndim == 2 else _im2col(saved, kh, kw, stride, Ho, Wo)  # rebuilt if not kept
            dw = (cols.T @ dy2).reshape(w.shape)  # (K, B*Ho*Wo) @ (B*Ho*Wo, C_out) -> (K, C_out)
    return dx, dw, db


# ----------------------------------------------------------------------------- the formulations
def _sum_rows(a):
    """Sum over the rows of a (N, C) array as a matmul with a row of ones: (1, N) @ (N, C) -> (C,).

    Equal to ``a.sum(axis=0)`` (which it replaces for the bias gradient); BLAS is
    about 3x faster on the tall (B*H*W, C) arrays here (see norm.py), and no less
    accurate (blocked accumulation).
    """
    return (get_xp(a).ones((1, a.shape[0]), dtype=a.dtype) @ a)[0]


def _dx_col2im(dy, w, stride: int, padding: tuple, H: int, W: int):
    """Reference input gradient: the definition of dx_pad, tap by tap.

    Column gradients ``dcols = dy @ W^T`` hold, for each output pixel, what it
    sends back to each pixel of its patch; pixel (i, j) with tap (p, q) lands at
    ``x_pad[s*i + p, s*j + q]``. Overlapping patches add up (col2im).
    """
    xp = get_xp(dy)
    B, Ho, Wo, C_out = dy.shape
    kh, kw, C_in, _ = w.shape
    top, bottom, left, right = padding
    dcols = dy.reshape(-1, C_out) @ w.reshape(kh * kw * C_in, C_out).T  # (B*Ho*Wo, C_out) @ (C_out, K)
    dcols = dcols.reshape(B, Ho, Wo, kh, kw, C_in)
    dx_pad = xp.zeros((B, H + top + bottom, W + left + right, C_in), dtype=dy.dtype)
    for p in range(kh):  # a loop over the kh*kw kernel taps, not over pixels
        for q in range(kw):
            dx_pad[:, p : p + stride * (Ho - 1) + 1 : stride, q : q + stride * (Wo - 1) + 1 : stride] += dcols[
                :, :, :, p, q
            ]
    return xp.ascontiguousarray(dx_pad[:, top : top + H, left : left + W])  # drop the padding


def _dx_gather(dy, w, stride: int, padding: tuple, H: int, W: int, method: str):
    """Input gradient as a stride-1 convolution (a gather, no scatter), run as
    ``method`` ("im2col", "shifted", "rows" or "rows_stacked").

    dx[u] = sum_p dy_d[u + top - p] w[p] with dy_d the dilated dy; substituting
    p' = kh - 1 - p makes it a correlation with the flipped kernel of dy_d padded
    by ``kh - 1 - top`` before and ``H + top - (s*(Ho-1) + 1)`` after (so that
    exactly H outputs come out); negative amounts crop. The same along W.
    The backward runs it for stride 1; for stride > 1 it runs :func:`_dx_phases`
    (no multiplications by the dilation's zeros), tested against this one.
    """
    B, Ho, Wo, C_out = dy.shape
    kh, kw, C_in, _ = w.shape
    top, bottom, left, right = padding
    dy_pad = _pad_hw(
        dy,
        kh - 1 - top,
        H + top - (stride * (Ho - 1) + 1),
        kw - 1 - left,
        W + left - (stride * (Wo - 1) + 1),
        stride=stride,
    )  # (B, H + kh - 1, W + kw - 1, C_out)
    w_flip = _flipped(w)  # (kh, kw, C_out, C_in)
    if method == "shifted":
        dy_pad = get_xp(dy_pad).ascontiguousarray(dy_pad)  # a crop above may have left a view
        return get_xp(dy).ascontiguousarray(_conv_shifted(dy_pad, w_flip)[:, :H, :W])
    if method in ("rows", "rows_stacked"):
        conv = _conv_rows if method == "rows" else _conv_rows_stacked
        return conv(_width_columns(dy_pad, kw, W), w_flip)  # (B, H, W, C_in)
    cols = _im2col(dy_pad, kh, kw, 1, H, W)  # (B*H*W, kh*kw*C_out)
    dx = cols @ w_flip.reshape(kh * kw * C_out, C_in)  # (B*H*W, K') @ (K', C_in)
    return dx.reshape(B, H, W, C_in)


def _dx_phases(dy, w, stride: int, padding: tuple, H: int, W: int):
    """Input gradient of a strided convolution, one stride-1 convolution per phase.

    ``dx_pad[s*i + p] += dy[i] w[p]``: the padded-input rows of phase a
    (``u = s*t + a``) receive only the taps ``p = a + m*s`` (m = 0, 1, ...),
    from ``i = t - m``::

        dx_pad[s*t + a] = sum_m dy[t - m] @ w[a + m*s]^T

    a correlation of dy (padded with M - 1 zero rows before) with the phase's
    taps ``w[a::s]`` in reverse order: ``_flipped(w[a::s])``. The same along W.
    Equal to the flipped-kernel convolution of the dilated dy (:func:`_dx_gather`)
    without its multiplications by zero: s*s times fewer.
    """
    xp = get_xp(dy)
    B, Ho, Wo, C_out = dy.shape
    kh, kw, C_in, _ = w.shape
    top, bottom, left, right = padding
    Hp, Wp = H + top + bottom, W + left + right
    dx_pad = xp.zeros((B, Hp, Wp, C_in), dtype=dy.dtype)
    for a in range(stride):  # a loop over the stride*stride phases
        for c in range(stride):
            w_ac = w[a::stride, c::stride]  # (Ma, Mc, C_in, C_out): the taps that land on this phase
            Ma, Mc = w_ac.shape[:2]
            n_t, n_v = len(range(a, Hp, stride)), len(range(c, Wp, stride))  # phase rows and columns
            if Ma == 0 or Mc == 0 or n_t == 0 or n_v == 0:
                continue  # no tap lands here (kernel smaller than the stride), or no such rows
            # dy zero-padded to exactly n_t + Ma - 1 rows (a negative amount crops rows that land in no phase row)
            dy_pad = _pad_hw(dy, Ma - 1, n_t - Ho, Mc - 1, n_v - Wo)
            dy_pad = xp.ascontiguousarray(dy_pad)  # a crop may have left a view
            dx_ac, _ = conv2d_forward(dy_pad, _flipped(w_ac), None, 1, 0)  # (B, n_t, n_v, C_in)
            dx_pad[:, a::stride, c::stride] = dx_ac
    return xp.ascontiguousarray(dx_pad[:, top : top + H, left : left + W])  # drop the padding


def _conv_shifted(x_pad, w):
    """Stride-1 valid correlation of a padded image by shifted row slices.

    Flatten x_pad (B, Hp, Wp, C_in) to rows ``r = (b*Hp + u)*Wp + v``. Output
    pixel (b, i, j) sits at row ``r = (b*Hp + i)*Wp + j`` of a grid of the same
    size, and its tap (p, q) reads input row ``r + p*Wp + q``. So for each tap
    one matmul of a contiguous slice of rows, added into the grid:

        grid[0:M] += x_flat[off : off + M] @ w[p, q],   off = p*Wp + q

    with ``M = rows - max offset``. Grid rows with ``i >= Ho`` or ``j >= Wo`` mix
    pixels across a row end or an image end: they are computed and thrown away
    (that is the price of no im2col copy).

    Returns the grid (B, Hp, Wp, C_out); the caller keeps ``[:, :Ho, :Wo]``.
    """
    xp = get_xp(x_pad)
    B, Hp, Wp, C_in = x_pad.shape
    kh, kw, _, C_out = w.shape
    x_flat = x_pad.reshape(B * Hp * Wp, C_in)  # a view: x_pad is contiguous
    M = B * Hp * Wp - ((kh - 1) * Wp + (kw - 1))
    grid = xp.empty((B * Hp * Wp, C_out), dtype=x_pad.dtype)  # rows >= M are never valid outputs
    acc, tmp = grid[:M], xp.empty((M, C_out), dtype=x_pad.dtype)
    for p in range(kh):
        for q in range(kw):
            off = p * Wp + q
            if p == 0 and q == 0:
                xp.matmul(x_flat[off : off + M], w[p, q], out=acc)  # (M, C_in) @ (C_in, C_out)
            else:
                xp.matmul(x_flat[off : off + M], w[p, q], out=tmp)
                acc += tmp
    return grid.reshape(B, Hp, Wp, C_out)


def _dw_shifted(x_pad, dy, kh: int, kw: int):
    """Weight gradient on the flattened grid: ``dw[p, q] = x_flat[off:off+M]^T @ dy_grid[:M]``.

    dy_grid is dy placed on the (B, Hp, Wp) grid with zeros at the thrown-away
    positions, so those rows contribute nothing.
    """
    xp = get_xp(x_pad)
    B, Hp, Wp, C_in = x_pad.shape
    _, Ho, Wo, C_out = dy.shape
    dy_grid = xp.zeros((B, Hp, Wp, C_out), dtype=dy.dtype)
    dy_grid[:, :Ho, :Wo] = dy
    x_flat = x_pad.reshape(B * Hp * Wp, C_in)
    M = B * Hp * Wp - ((kh - 1) * Wp + (kw - 1))
    dy_rows = dy_grid.reshape(B * Hp * Wp, C_out)[:M]
    dw = xp.empty((kh, kw, C_in, C_out), dtype=dy.dtype)
    for p in range(kh):
        for q in range(kw):
            off = p * Wp + q
            xp.matmul(x_flat[off : off + M].T, dy_rows, out=dw[p, q])  # (C_in, M) @ (M, C_out)
    return dw


def _conv_rows(xw, w):
    """Stride-1 valid correlation from width-columns, one batched matmul per kernel row.

    With ``xw[b, u, j] = x_pad[b, u, j : j + kw]`` flattened (:func:`_width_columns`),

        y[b, i, j] = sum_p xw[b, i + p, j] @ w[p]      (w[p] as a (kw*C_in, C_out) matrix)

    For one image, the rows ``i + p`` for i = 0 .. Ho-1 are the contiguous slice
    ``[p*Wo, (p + Ho)*Wo)`` of its (Hp*Wo, kw*C_in) rows, so tap row p is one
    matmul batched over the images, added into the output.

    xw (B, Hp, Wo, kw*C_in), w (kh, kw, C_in, C_out) -> y (B, Ho, Wo, C_out), Ho = Hp - kh + 1.
    """
    xp = get_xp(xw)
    B, Hp, Wo, K = xw.shape
    kh, C_out = w.shape[0], w.shape[3]
    Ho = Hp - kh + 1
    x_rows = xw.reshape(B, Hp * Wo, K)  # a view: xw is contiguous
    y = xp.empty((B, Ho * Wo, C_out), dtype=xw.dtype)
    tmp = xp.empty_like(y) if kh > 1 else None
    for p in range(kh):  # a loop over the kh kernel rows
        x_p = x_rows[:, p * Wo : (p + Ho) * Wo]  # (B, Ho*Wo, K): image rows p .. p+Ho-1, a view
        w_p = w[p].reshape(K, C_out)  # (kw, C_in, C_out) -> (kw*C_in, C_out)
        if p == 0:
            xp.matmul(x_p, w_p, out=y)  # (B, Ho*Wo, K) @ (K, C_out)
        else:
            xp.matmul(x_p, w_p, out=tmp)
            y += tmp
    return y.reshape(B, Ho, Wo, C_out)


def _kernel_row_slices(xw, kh: int):
    """The rows each kernel row reads, stacked as a view: (B, Hp, Wo, K) -> (B, kh, Ho*Wo, K).

    ``view[b, p] = xw[b, p : p + Ho].reshape(Ho*Wo, K)``: slice p starts ``p``
    image rows later, so the kh axis has the stride of one image row and the
    slices overlap (no copy; read-only use only).
    """
    B, Hp, Wo, K = xw.shape
    Ho = Hp - kh + 1
    s_b, s_u, s_j, s_k = xw.strides  # xw is contiguous: s_u = Wo * s_j, s_j = K * s_k
    return get_xp(xw).lib.stride_tricks.as_strided(xw, (B, kh, Ho * Wo, K), (s_b, s_u, s_j, s_k))


def _conv_rows_stacked(xw, w):
    """The same correlation as :func:`_conv_rows`, all kernel rows of an image in one batched matmul.

        prod[b, p] = xw[b, p : p + Ho] @ w[p]       (B, kh, Ho*Wo, C_out), one matmul
        y[b]       = sum_p prod[b, p]

    The matmul loops over (b, p) with p innermost, so an image's width-columns
    are read kh times while they are in the cache.

    xw (B, Hp, Wo, kw*C_in), w (kh, kw, C_in, C_out) -> y (B, Ho, Wo, C_out), Ho = Hp - kh + 1.
    """
    B, Hp, Wo, K = xw.shape
    kh, C_out = w.shape[0], w.shape[3]
    Ho = Hp - kh + 1
    prod = _kernel_row_slices(xw, kh) @ w.reshape(kh, K, C_out)  # (B, kh, Ho*Wo, K) @ (kh, K, C_out)
    return prod.sum(axis=1).reshape(B, Ho, Wo, C_out)  # sum over the kernel rows


def _dw_rows_stacked(xw, dy, w_shape: tuple):
    """:func:`_dw_rows` with all kernel rows of an image in one batched matmul.

        dw[p] = sum_b xw[b, p : p + Ho]^T @ dy[b]     (B, kh, K, C_out), summed over b
    """
    B, Hp, Wo, K = xw.shape
    _, Ho, _, C_out = dy.shape
    kh = w_shape[0]
    x_p = _kernel_row_slices(xw, kh).transpose(0, 1, 3, 2)  # (B, kh, K, Ho*Wo), a view
    dw = x_p @ dy.reshape(B, 1, Ho * Wo, C_out)  # (B, kh, K, Ho*Wo) @ (B, 1, Ho*Wo, C_out)
    return dw.sum(axis=0).reshape(w_shape)  # (kh, K, C_out) -> (kh, kw, C_in, C_out)


def _dw_rows(xw, dy, w_shape: tuple):
    """Weight gradient from width-columns: ``dw[p] = sum_b xw[b, rows of tap p]^T @ dy[b]``.

    Each image's (K, Ho*Wo) @ (Ho*Wo, C_out) product is small; the batched
    matmul gives one (K, C_out) matrix per image, summed over the images.
    """
    B, Hp, Wo, K = xw.shape
    _, Ho, _, C_out = dy.shape
    kh = w_shape[0]
    x_rows = xw.reshape(B, Hp * Wo, K)
    dy3 = dy.reshape(B, Ho * Wo, C_out)  # (B, Ho*Wo, C_out)
    dw = get_xp(xw).empty((kh, K, C_out), dtype=dy.dtype)
    for p in range(kh):
        x_p = x_rows[:, p * Wo : (p + Ho) * Wo]  # (B, Ho*Wo, K), the rows tap row p read
        dw[p] = (x_p.transpose(0, 2, 1) @ dy3).sum(axis=0)  # (B, K, Ho*Wo) @ (B, Ho*Wo, C_out) -> (K, C_out)
    return dw.reshape(w_shape)  # (kh, kw*C_in, C_out) -> (kh, kw, C_in, C_out)


# ----------------------------------------------------------------------------- the layer
def _kernel2(kernel_size) -> tuple:
    if isinstance(kernel_size, (int, np.integer)):
        return int(kernel_size), int(kernel_size)
    kh, kw = kernel_size
    return int(kh), int(kw)


class Conv2d(Module):
    """2-D convolution on channels-last images.

    Parameters: ``weight`` (kh, kw, C_in, C_out) and ``bias`` (C_out,), initialised
    as PyTorch does: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = C_in * kh * kw.
    A PyTorch weight (C_out, C_in, kh, kw) maps onto ours by ``.transpose(2, 3, 1, 0)``.

    ``padding`` is an int or (top, bottom, left, right).
    """

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
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        kh, kw = _kernel2(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), int(stride), _padding4(padding)
        fan_in = in_channels * kh * kw
        self.add_param("weight", init_uniform(rng, (kh, kw, in_channels, out_channels), fan_in, dtype))
        if bias:
            self.add_param("bias", init_uniform(rng, (out_channels,), fan_in, dtype))

    def forward(self, x):
        check_image(self, x, self.in_channels)
        check_finite(self, x)
        y, cache = conv2d_forward(x, self.weight, self.params.get("bias"), self.stride, self.padding)
        self._set_cache(cache)
        return y

    def backward(self, dy):
        dx, dw, db = conv2d_backward(dy, self._pop_cache())
        self.grads["weight"] += dw
        if db is not None:
            self.grads["bias"] += db
        return dx

    def __repr__(self) -> str:
        kh, kw = self.kernel_size
        return (
            f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
            f"stride={self.stride}, padding={self.padding})"
        )
