"""Fast formulations of the 2-D convolution, beside the reference one in nn/conv.py.

All compute the numbers of :func:`diffusion_np.nn.conv.conv2d_reference_forward` /
``conv2d_reference_backward`` (the math is in nn/conv.py's docstring), tested equal in
float64 (tests/nn/test_conv.py); :func:`choose_method` picks one per shape, and
``conv2d_forward(..., method=...)`` or ``Conv2d(..., method=...)`` forces one.

``"im2col"``
    The reference forward; the backward computes dx as the flipped-kernel
    convolution of dout, a gather instead of col2im's scatter: put ``s - 1``
    zeros between the rows and columns of dout, pad it with ``kh - 1`` zeros, and
    correlate it with the kernel flipped in both spatial axes and with C_in and
    C_out swapped (``w[::-1, ::-1].transpose(0, 1, 3, 2)``). That convolution runs
    as whichever formulation :func:`choose_method` picks for its C_out -> C_in
    shape; with a stride > 1, as one small convolution per output phase
    (:func:`_dx_phases`) instead of one over the dilated dout.
``"rows"``
    Stride 1 only. im2col along W only (each pixel's ``kw`` horizontal neighbours
    side by side: ``kw`` times the input, not ``kh * kw``), then one matmul per
    kernel *row* ``p``. For every image, the output rows ``i`` read the
    width-columns of image rows ``i + p``: a contiguous slice of that image's rows,
    so the matmul is batched over the images with no further copy.
``"rows_stacked"``
    Stride 1 only. "rows" with the ``kh`` kernel-row products of one image in ONE
    batched matmul over a strided view (no copy), summed over the kernel rows
    after: an image's width-columns are read ``kh`` times from the cache instead
    of once per pass over the whole batch. The weight gradient is stacked the same way.
``"matmul"``
    A 1x1 convolution with stride 1 and no padding is a Linear layer on the
    channel axis: one matmul.

(A seventh, "shifted": kh*kw matmuls of row slices of the flattened padded image,
no copy at all, was removed: "rows" was faster on every shape measured.)
Timings: docs/performance.md.
"""

from __future__ import annotations

import numpy as np

from diffusion_np.backend import get_xp
from diffusion_np.nn import fast
from diffusion_np.nn.conv import (
    Conv2dCache,
    _im2col,
    _out_size,
    _pad_hw,
    _padding4,
    _sum_rows,
    _windows,
    conv2d_forward,
)
from diffusion_np.nn.fast import parallel


def _width_columns(x_pad, kw: int, Wo: int):
    """im2col along W only: row ``(b, u, j)`` holds the ``kw`` pixels
    ``x_pad[b, u, j : j + kw]`` side by side, in the weight's (q, c) order.

    x_pad (B, Hp, Wp, C) -> (B, Hp, Wo, kw * C), a contiguous copy (stride 1).
    """
    B, Hp, _, C = x_pad.shape
    windows = _windows(x_pad, 1, kw)[:, :, :Wo, 0]  # (B, Hp, Wo, kw, C), a view
    # explicit copy: reshape alone would give an overlapping *view* (a pixel's kw*C numbers
    # are contiguous in x_pad), which BLAS cannot use and every later reshape would copy again
    return get_xp(x_pad).ascontiguousarray(windows).reshape(B, Hp, Wo, kw * C)


def _flipped(w):
    """The kernel of the input-gradient convolution: flipped in space, C_in and
    C_out swapped. (kh, kw, C_in, C_out) -> (kh, kw, C_out, C_in)."""
    return w[::-1, ::-1].transpose(0, 1, 3, 2)


# ----------------------------------------------------------------------------- dispatch
def choose_method(x_shape: tuple, w_shape: tuple, stride: int = 1, padding=0) -> str:
    """The fastest formulation for this shape (measured on a CPU with NumPy/OpenBLAS;
    the timings behind each rule are in docs/performance.md, "Convolution formulations").

    * 1x1, stride 1, no padding: "matmul", nothing to gather.
    * stride 1 and at least 8x8 outputs (64 positions): "rows" (a copy ``kw``
      times the input instead of ``kh*kw`` times, each image's product
      accumulated while it is in the cache), run in cache-sized blocks of images.
    * "rows_stacked" is no longer chosen: it won only while "rows" streamed the
      whole batch's width-columns from memory once per kernel row, which the blocks
      of :func:`_rows_blocked` no longer do (docs/performance.md, fourth round). It
      stays one more round as an explicit method, for that comparison.
    * everything else (4x4, stride 2, 1x1 with stride or padding): "im2col"
      (rows' matmuls per image are too small at 4x4; with a stride the image
      rows a kernel row reads are not one contiguous slice).

    The input gradient of a convolution is itself a stride-1 convolution (of dout,
    C_out -> C_in channels), and :func:`conv2d_backward` asks this function again
    for that shape, so the two directions may use different formulations.
    """
    kh, kw, C_in, C_out = w_shape
    padding = _padding4(padding)
    if kh == kw == 1 and stride == 1 and padding == (0, 0, 0, 0):
        return "matmul"
    Ho, Wo = _out_size(tuple(x_shape), tuple(w_shape), stride, padding)
    if stride == 1 and Ho * Wo >= 64:
        return "rows"
    return "im2col"


def _dx_method(dout_shape: tuple, w_shape: tuple, H: int, W: int) -> str:
    """Formulation of the input-gradient convolution (dout padded to (B, H + kh - 1,
    W + kw - 1, C_out), kernel (kh, kw, C_out, C_in), stride 1, no padding)."""
    kh, kw, C_in, C_out = w_shape
    method = choose_method((dout_shape[0], H + kh - 1, W + kw - 1, C_out), (kh, kw, C_out, C_in), 1, 0)
    return "im2col" if method == "matmul" else method


#: Above this many bytes the "im2col" forward keeps its input instead of the columns
#: (``kh*kw`` times larger) and the backward rebuilds them: one more copy (about 25%
#: of the weight-gradient matmul) for a ninth of the memory. The 4x4 layers of the
#: shapes U-Net at batch 64 (4.7 MB of columns each) are above it: keeping their
#: columns was 40 MB of the step's peak, which is held to 1.2x PyTorch's.
_MAX_SAVED_COLUMNS_BYTES = 2 * 2**20


# ----------------------------------------------------------------------------- the op pair
def conv2d_fast_forward(x, w, b, stride: int, padding: tuple, method: str):
    """:func:`diffusion_np.nn.conv.conv2d_forward` by ``method`` ("im2col", "rows",
    "rows_stacked" or "matmul"); the caller has checked the shapes and the name."""
    kh, kw, C_in, C_out = w.shape
    B = x.shape[0]
    Ho, Wo = _out_size(x.shape, w.shape, stride, padding)
    if method in ("rows", "rows_stacked"):
        if stride != 1:
            raise ValueError(f"method '{method}' needs stride 1")
        y = _rows_blocked(x, w, padding, method, Wo, b=b)  # (B, Ho, Wo, C_out), a fresh array, bias added
        # keep x itself, not x_pad nor the kw times larger width-columns: the backward pads
        # and rebuilds them (two copies, a few % of that convolution), while keeping the
        # columns made the VAE's step page-fault and x_pad is 1.56x x at 8x8, 2.25x at 4x4
        return y, Conv2dCache(method, x, w, tuple(x.shape), stride, padding, b is not None)
    if method == "im2col" and _im2col_in_blocks(x, w.shape, Ho, Wo):  # large columns: built block by block
        y = _im2col_blocked(x, w, b, stride, padding, Ho, Wo)  # (B, Ho, Wo, C_out), bias added
        return y, Conv2dCache(method, x, w, tuple(x.shape), stride, padding, b is not None)  # columns rebuilt
    if method == "matmul":
        if (kh, kw, stride, padding) != (1, 1, 1, (0, 0, 0, 0)):
            raise ValueError("method 'matmul' is for 1x1 convolutions with stride 1 and no padding")
        y = fast.matmul(x.reshape(-1, C_in), w.reshape(C_in, C_out))  # (B*H*W, C_in) @ (C_in, C_out)
        saved = x
    else:  # "im2col": the reference forward; what it keeps and its backward differ
        x_pad = _pad_hw(x, *padding)
        cols = _im2col(x_pad, kh, kw, stride, Ho, Wo)  # (B*Ho*Wo, kh*kw*C_in)
        y = fast.matmul(cols, w.reshape(kh * kw * C_in, C_out))  # (B*Ho*Wo, K) @ (K, C_out)
        # keep the columns for dw while they are small, else x itself (kh*kw times smaller)
        saved = cols if cols.nbytes <= _MAX_SAVED_COLUMNS_BYTES else x
    y = y.reshape(B, Ho, Wo, C_out)
    if b is not None:
        y += b  # y is a fresh matmul result: add in place, no second full-size array
    return y, Conv2dCache(method, saved, w, tuple(x.shape), stride, padding, b is not None)


def conv2d_fast_backward(dout, cache: Conv2dCache, input_grad: bool = True):
    """Gradients of :func:`conv2d_fast_forward`: ``(dx, dw, db)``, db None without bias,
    dx None with ``input_grad=False`` (not computed).

    dx is a gather, never col2im: for stride 1 the flipped-kernel convolution of
    dout (:func:`_dx_gather`, itself run as the formulation :func:`_dx_method`
    picks), for a larger stride one small convolution per output phase
    (:func:`_dx_phases`). dw by the forward's formulation.
    """
    method, saved, w, x_shape, stride, padding, has_bias = cache
    kh, kw, C_in, C_out = w.shape
    _, H, W, _ = x_shape
    _, Ho, Wo, _ = dout.shape
    dout2 = dout.reshape(-1, C_out)  # (B*Ho*Wo, C_out)
    im2col_blocks = method == "im2col" and saved.ndim == 4 and _im2col_in_blocks(saved, w.shape, Ho, Wo)
    in_blocks = method in ("rows", "rows_stacked") or im2col_blocks
    # the blocks sum db with their weight gradient, while each block of dout is in the cache
    db = _sum_rows(dout2) if has_bias and not in_blocks else None
    if method == "matmul":
        x2 = saved.reshape(-1, C_in)  # (B*H*W, C_in)
        dw = fast.matmul_tn(x2, dout2).reshape(w.shape)  # (C_in, N) @ (N, C_out)
        dx = None
        if input_grad:
            dx = fast.matmul(dout2, w.reshape(C_in, C_out).T).reshape(x_shape)  # (N, C_out) @ (C_out, C_in)
        return dx, dw, db
    if not input_grad:
        dx = None
    elif stride == 1:  # dx is a stride-1 convolution of dout (C_out -> C_in): its own formulation
        dx = _dx_gather(dout, w, stride, padding, H, W, _dx_method(dout.shape, w.shape, H, W))
    else:  # no dilated dout (3/4 zeros at stride 2): one small convolution per output phase
        dx = _dx_phases(dout, w, stride, padding, H, W)
    if method in ("rows", "rows_stacked"):
        dw, db = _dw_rows_blocked(saved, dout, w.shape, padding, method, has_bias)  # the forward's columns, rebuilt
    elif im2col_blocks:  # "im2col" that kept x
        dw, db = _dw_im2col_blocked(saved, dout, w.shape, stride, padding, has_bias)  # rebuilt block by block
    else:
        cols = saved if saved.ndim == 2 else _im2col(_pad_hw(saved, *padding), kh, kw, stride, Ho, Wo)  # rebuilt
        dw = fast.matmul_tn(cols, dout2).reshape(w.shape)  # (K, B*Ho*Wo) @ (B*Ho*Wo, C_out) -> (K, C_out)
    return dx, dw, db


# ----------------------------------------------------------------------------- the formulations
def _dx_gather(dout, w, stride: int, padding: tuple, H: int, W: int, method: str):
    """Input gradient as a stride-1 convolution (a gather, no scatter), run as
    ``method`` ("im2col", "rows" or "rows_stacked").

    dx[u] = sum_p dout_d[u + top - p] w[p] with dout_d the dilated dout; substituting
    p' = kh - 1 - p makes it a correlation with the flipped kernel of dout_d padded
    by ``kh - 1 - top`` before and ``H + top - (s*(Ho-1) + 1)`` after (so that
    exactly H outputs come out); negative amounts crop. The same along W.
    The backward runs it for stride 1; for stride > 1 it runs :func:`_dx_phases`
    (no multiplications by the dilation's zeros), tested against this one.
    """
    B, Ho, Wo, C_out = dout.shape
    kh, kw, C_in, _ = w.shape
    top, bottom, left, right = padding
    pads = (kh - 1 - top, H + top - (stride * (Ho - 1) + 1), kw - 1 - left, W + left - (stride * (Wo - 1) + 1))
    w_flip = _flipped(w)  # (kh, kw, C_out, C_in)
    if method in ("rows", "rows_stacked"):
        return _rows_blocked(dout, w_flip, pads, method, W, stride)  # (B, H, W, C_in)
    dout_pad = _pad_hw(dout, *pads, stride=stride)  # (B, H + kh - 1, W + kw - 1, C_out)
    cols = _im2col(dout_pad, kh, kw, 1, H, W)  # (B*H*W, kh*kw*C_out)
    dx = fast.matmul(cols, w_flip.reshape(kh * kw * C_out, C_in))  # (B*H*W, K') @ (K', C_in)
    return dx.reshape(B, H, W, C_in)


def _dx_phases(dout, w, stride: int, padding: tuple, H: int, W: int):
    """Input gradient of a strided convolution, one stride-1 convolution per phase.

    ``dx_pad[s*i + p] += dout[i] w[p]``: the padded-input rows of phase a
    (``u = s*t + a``) receive only the taps ``p = a + m*s`` (m = 0, 1, ...),
    from ``i = t - m``::

        dx_pad[s*t + a] = sum_m dout[t - m] @ w[a + m*s]^T

    a correlation of dout (padded with M - 1 zero rows before) with the phase's
    taps ``w[a::s]`` in reverse order: ``_flipped(w[a::s])``. The same along W.
    Equal to the flipped-kernel convolution of the dilated dout (:func:`_dx_gather`)
    without its multiplications by zero: s*s times fewer.
    """
    xp = get_xp(dout)
    B, Ho, Wo, C_out = dout.shape
    kh, kw, C_in, _ = w.shape
    top, bottom, left, right = padding
    Hp, Wp = H + top + bottom, W + left + right
    dx_pad = xp.zeros((B, Hp, Wp, C_in), dtype=dout.dtype)
    for a in range(stride):  # a loop over the stride*stride phases
        for c in range(stride):
            w_ac = w[a::stride, c::stride]  # (Ma, Mc, C_in, C_out): the taps that land on this phase
            Ma, Mc = w_ac.shape[:2]
            n_t, n_v = len(range(a, Hp, stride)), len(range(c, Wp, stride))  # phase rows and columns
            if Ma == 0 or Mc == 0 or n_t == 0 or n_v == 0:
                continue  # no tap lands here (kernel smaller than the stride), or no such rows
            # dout zero-padded to exactly n_t + Ma - 1 rows (a negative amount crops rows that land in no phase row)
            dout_pad = _pad_hw(dout, Ma - 1, n_t - Ho, Mc - 1, n_v - Wo)
            dout_pad = xp.ascontiguousarray(dout_pad)  # a crop may have left a view
            w_flip = _flipped(w_ac)  # (Ma, Mc, C_out, C_in)
            method = choose_method(dout_pad.shape, w_flip.shape)  # explicit: the same in reference mode
            dx_ac, _ = conv2d_forward(dout_pad, w_flip, None, 1, 0, method)  # (B, n_t, n_v, C_in)
            dx_pad[:, a::stride, c::stride] = dx_ac
    return xp.ascontiguousarray(dx_pad[:, top : top + H, left : left + W])  # drop the padding


def _rows_blocked(x, w, pads: tuple, method: str, Wo: int, dilation: int = 1, b=None):
    """conv_rows / conv_rows_stacked of x padded by ``pads`` (top, bottom, left, right; with
    ``dilation - 1`` zeros between pixels first, see ``_pad_hw``), in blocks of images,
    plus the bias ``b`` (C_out,) where given (each block adds it while its output is in the cache).

    Padding, width-columns and products run per block of the batch
    (:func:`diffusion_np.nn.fast.parallel.run_blocks`): a block's width-columns
    (about 2 MB) stay in the cache for all ``kh`` kernel rows, and the blocks run on
    the threads of :func:`diffusion_np.nn.fast.parallel.get_threads`. Each image is
    computed exactly as in one pass over the whole batch.

    x (B, H, W, C_in), w (kh, kw, C_in, C_out) -> y (B, Ho, Wo, C_out).
    """
    conv = _conv_rows if method == "rows" else _conv_rows_stacked
    xp = get_xp(x)
    if xp is not np:  # one pass over the batch on a GPU
        y = conv(_width_columns(_pad_hw(x, *pads, stride=dilation), kw=w.shape[1], Wo=Wo), w)
        if b is not None:
            y += b
        return y
    kh, kw, C_in, C_out = w.shape
    w = np.ascontiguousarray(w)  # a flipped kernel is a view: reshape it once, not in every block
    B, H = x.shape[0], x.shape[1]
    Hp = dilation * (H - 1) + 1 + pads[0] + pads[1]
    y = np.empty((B, Hp - kh + 1, Wo, C_out), dtype=np.result_type(x, w))

    def block(lo: int, hi: int) -> None:
        xw = _width_columns(_pad_hw(x[lo:hi], *pads, stride=dilation), kw, Wo)  # (hi - lo, Hp, Wo, kw*C_in)
        conv(xw, w, out=y[lo:hi])
        if b is not None:
            y[lo:hi] += b

    macs = B * (Hp - kh + 1) * Wo * kh * kw * C_in * C_out  # below a minimum, the blocks run on this thread
    parallel.run_blocks(block, B, parallel.block_size(B, Hp * Wo * kw * C_in * y.itemsize), macs)
    return y


def _dw_rows_blocked(x, dout, w_shape: tuple, padding: tuple, method: str, with_bias: bool = False):
    """The weight gradient of "rows" / "rows_stacked" from the forward's input x, per block
    of images as :func:`_rows_blocked`: each block's (kh, kw, C_in, C_out) partial sum,
    added in block order; with ``with_bias``, the bias gradient (the sum of dout over
    everything but C_out) the same way, else None. Returns (dw, db)."""
    dw_rows = _dw_rows if method == "rows" else _dw_rows_stacked
    kh, kw, C_in, C_out = w_shape
    B, H, _, _ = x.shape
    Wo = dout.shape[2]
    if get_xp(x) is not np:
        db = _sum_rows(dout.reshape(-1, C_out)) if with_bias else None
        return dw_rows(_width_columns(_pad_hw(x, *padding), kw, Wo), dout, w_shape), db
    Hp = H + padding[0] + padding[1]

    def block(lo: int, hi: int):
        dw = dw_rows(_width_columns(_pad_hw(x[lo:hi], *padding), kw, Wo), dout[lo:hi], w_shape)
        return dw, (_sum_rows(dout[lo:hi].reshape(-1, C_out)) if with_bias else None)

    macs = B * dout.shape[1] * Wo * kh * kw * C_in * C_out
    parts = parallel.run_blocks(block, B, parallel.block_size(B, Hp * Wo * kw * C_in * x.itemsize), macs)
    return _add_block_parts(parts)


def _add_block_parts(parts: list):
    """The sums over the batch of a weight (and bias) gradient computed per block: each block's
    ``(dw, db)`` partial sums, added in block order (db None stays None). Returns (dw, db)."""
    dw, db = parts[0]
    for dw_part, db_part in parts[1:]:
        dw += dw_part
        if db is not None:
            db += db_part
    return dw, db


def _im2col_in_blocks(x, w_shape: tuple, Ho: int, Wo: int) -> bool:
    """Whether the "im2col" formulation runs block by block: NumPy, and columns larger than
    :data:`_MAX_SAVED_COLUMNS_BYTES` (then the forward keeps x, not the columns)."""
    kh, kw, C_in, _ = w_shape
    return isinstance(x, np.ndarray) and x.shape[0] * Ho * Wo * kh * kw * C_in * x.itemsize > _MAX_SAVED_COLUMNS_BYTES


def _im2col_blocked(x, w, b, stride: int, padding: tuple, Ho: int, Wo: int):
    """The "im2col" forward per block of images, as :func:`_rows_blocked`: a block's columns
    (about 2 MB) are built and multiplied while they are in the cache, and the blocks run
    on the threads (docs/performance.md, sixth round).

    x (B, H, W, C_in), w (kh, kw, C_in, C_out), b (C_out,) or None -> y (B, Ho, Wo, C_out).
    """
    kh, kw, C_in, C_out = w.shape
    B = x.shape[0]
    w2 = np.ascontiguousarray(w).reshape(kh * kw * C_in, C_out)  # (K, C_out)
    y = np.empty((B, Ho, Wo, C_out), dtype=np.result_type(x, w))

    def block(lo: int, hi: int) -> None:
        cols = _im2col(_pad_hw(x[lo:hi], *padding), kh, kw, stride, Ho, Wo)  # ((hi - lo)*Ho*Wo, K)
        np.matmul(cols, w2, out=y[lo:hi].reshape(-1, C_out))
        if b is not None:
            y[lo:hi] += b

    macs = B * Ho * Wo * kh * kw * C_in * C_out
    parallel.run_blocks(block, B, parallel.block_size(B, Ho * Wo * kh * kw * C_in * x.itemsize), macs)
    return y


def _dw_im2col_blocked(x, dout, w_shape: tuple, stride: int, padding: tuple, with_bias: bool):
    """The weight (and bias) gradient of :func:`_im2col_blocked` from its input x: each block's
    columns rebuilt, ``cols^T @ dout``, the blocks' parts added in block order. Returns (dw, db)."""
    kh, kw, C_in, C_out = w_shape
    B, Ho, Wo, _ = dout.shape

    def block(lo: int, hi: int):
        cols = _im2col(_pad_hw(x[lo:hi], *padding), kh, kw, stride, Ho, Wo)  # ((hi - lo)*Ho*Wo, K)
        dout2 = dout[lo:hi].reshape(-1, C_out)
        return cols.T @ dout2, (_sum_rows(dout2) if with_bias else None)  # (K, C_out), (C_out,)

    macs = B * Ho * Wo * kh * kw * C_in * C_out
    parts = parallel.run_blocks(block, B, parallel.block_size(B, Ho * Wo * kh * kw * C_in * x.itemsize), macs)
    dw, db = _add_block_parts(parts)
    return dw.reshape(w_shape), db


def _conv_rows(xw, w, out=None):
    """Stride-1 valid correlation from width-columns, one batched matmul per kernel row.

    With ``xw[b, u, j] = x_pad[b, u, j : j + kw]`` flattened (:func:`_width_columns`),

        y[b, i, j] = sum_p xw[b, i + p, j] @ w[p]      (w[p] as a (kw*C_in, C_out) matrix)

    For one image, the rows ``i + p`` for i = 0 .. Ho-1 are the contiguous slice
    ``[p*Wo, (p + Ho)*Wo)`` of its (Hp*Wo, kw*C_in) rows, so tap row p is one
    matmul batched over the images, added into the output.

    xw (B, Hp, Wo, kw*C_in), w (kh, kw, C_in, C_out) -> y (B, Ho, Wo, C_out), Ho = Hp - kh + 1,
    written into ``out`` (contiguous) when given.
    """
    xp = get_xp(xw)
    B, Hp, Wo, K = xw.shape
    kh, C_out = w.shape[0], w.shape[3]
    Ho = Hp - kh + 1
    x_rows = xw.reshape(B, Hp * Wo, K)  # a view: xw is contiguous
    y = xp.empty((B, Ho * Wo, C_out), dtype=xw.dtype) if out is None else out.reshape(B, Ho * Wo, C_out)
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


def _conv_rows_stacked(xw, w, out=None):
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
    if out is not None:
        return get_xp(xw).sum(prod, axis=1, out=out.reshape(B, Ho * Wo, C_out)).reshape(B, Ho, Wo, C_out)
    return prod.sum(axis=1).reshape(B, Ho, Wo, C_out)  # sum over the kernel rows


def _dw_rows_stacked(xw, dout, w_shape: tuple):
    """:func:`_dw_rows` with all kernel rows of an image in one batched matmul.

        dw[p] = sum_b xw[b, p : p + Ho]^T @ dout[b]     (B, kh, K, C_out), summed over b
    """
    B, Hp, Wo, K = xw.shape
    _, Ho, _, C_out = dout.shape
    kh = w_shape[0]
    x_p = _kernel_row_slices(xw, kh).transpose(0, 1, 3, 2)  # (B, kh, K, Ho*Wo), a view
    dw = x_p @ dout.reshape(B, 1, Ho * Wo, C_out)  # (B, kh, K, Ho*Wo) @ (B, 1, Ho*Wo, C_out)
    return dw.sum(axis=0).reshape(w_shape)  # (kh, K, C_out) -> (kh, kw, C_in, C_out)


def _dw_rows(xw, dout, w_shape: tuple):
    """Weight gradient from width-columns: ``dw[p] = sum_b xw[b, rows of tap p]^T @ dout[b]``.

    Each image's (K, Ho*Wo) @ (Ho*Wo, C_out) product is small; the batched
    matmul gives one (K, C_out) matrix per image, summed over the images.
    """
    B, Hp, Wo, K = xw.shape
    _, Ho, _, C_out = dout.shape
    kh = w_shape[0]
    x_rows = xw.reshape(B, Hp * Wo, K)
    dout3 = dout.reshape(B, Ho * Wo, C_out)  # (B, Ho*Wo, C_out)
    dw = get_xp(xw).empty((kh, K, C_out), dtype=dout.dtype)
    for p in range(kh):
        x_p = x_rows[:, p * Wo : (p + Ho) * Wo]  # (B, Ho*Wo, K), the rows tap row p read
        dw[p] = (x_p.transpose(0, 2, 1) @ dout3).sum(axis=0)  # (B, K, Ho*Wo) @ (B, Ho*Wo, C_out) -> (K, C_out)
    return dw.reshape(w_shape)  # (kh, kw*C_in, C_out) -> (kh, kw, C_in, C_out)
