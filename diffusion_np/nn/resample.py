"""Resampling between U-Net / VAE resolutions: 2x nearest upsampling, 2x2 average
pooling, and diffusers' Upsample2D and Downsample2D layers built on them.

Channels-last images ``(B, H, W, C)``. The ops, forward and backward side by side:

Nearest 2x upsampling (``F.interpolate(scale_factor=2, mode="nearest")``)::

    y[b, 2i + di, 2j + dj, c] = x[b, i, j, c]            di, dj in {0, 1}
    dx[b, i, j, c] = sum_{di, dj} dy[b, 2i + di, 2j + dj, c]     (sum over each 2x2 block)

2x2 average pooling, stride 2 (``F.avg_pool2d(x, 2)``; an odd last row/column is
dropped, as PyTorch floors the output size)::

    y[b, i, j, c] = 1/4 sum_{di, dj} x[b, 2i + di, 2j + dj, c]
    dx[b, 2i + di, 2j + dj, c] = dy[b, i, j, c] / 4     (0 in a dropped row/column)

Both are reshapes: ``(B, 2H, 2W, C)`` viewed as ``(B, H, 2, W, 2, C)`` puts each
2x2 block on axes 2 and 4, so a block sum is ``.sum(axis=(2, 4))`` and a block
copy is a broadcast. No loops.

Layers (parameter names as diffusers' ``Upsample2D`` / ``Downsample2D``):

* ``Upsample2D``: nearest x2, then (``use_conv``) a 3x3 conv, padding 1: ``conv.weight``, ``conv.bias``.
* ``Downsample2D``: (``use_conv``) a 3x3 conv with stride 2 and padding 1; with
  ``padding=0`` it is the VAE's variant, which pads (top 0, bottom 1, left 0,
  right 1) and then convolves with no padding (diffusers pads with ``F.pad(x, (0, 1, 0, 1))``).
  Without ``use_conv`` a 2x2 average pool.

Nearest 2x upsampling followed by a 3x3 convolution with padding 1 (Upsample2D)
is fused into four 2x2 convolutions of the small image, one per output phase
``(a, c)`` (row parity a, column parity c), see :func:`upsample_conv_forward`:
2.25x fewer multiplications and no 4x upsampled intermediate. The unfused
path (upsample, then Conv2d) stays as the reference (``Upsample2D.fused``).

Left out: Upsample2D's ``output_size`` argument and transposed-conv option, the
FIR/K up- and downsamplers, and Downsample2D's optional norm.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, get_xp
from diffusion_np.nn.conv import Conv2d, conv2d_backward, conv2d_forward
from diffusion_np.nn.module import Module
from diffusion_np.nn.validate import check_finite, check_image


class ResampleCache(NamedTuple):
    x_shape: tuple  # (B, H, W, C) of the input, all the backward needs


# ----------------------------------------------------------------------------- nearest 2x upsampling
def upsample_nearest2x_forward(x):
    """Repeat every pixel into a 2x2 block: (B, H, W, C) -> (B, 2H, 2W, C)."""
    xp = get_xp(x)
    B, H, W, C = x.shape
    blocks = xp.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))  # a view, no copy yet
    return blocks.reshape(B, 2 * H, 2 * W, C), ResampleCache(tuple(x.shape))  # the copy


def upsample_nearest2x_backward(dy, cache: ResampleCache):
    """dx = the sum of dy over each 2x2 block: (B, 2H, 2W, C) -> (B, H, W, C)."""
    B, H, W, C = cache.x_shape
    return dy.reshape(B, H, 2, W, 2, C).sum(axis=(2, 4))  # block (i, j) on axes 2 and 4


# ----------------------------------------------------------------------------- 2x2 average pooling
def avg_pool2x2_forward(x):
    """Mean of each 2x2 block, stride 2: (B, H, W, C) -> (B, H // 2, W // 2, C)."""
    B, H, W, C = x.shape
    Ho, Wo = H // 2, W // 2
    if Ho < 1 or Wo < 1:
        raise ValueError(f"avg_pool2x2 needs H, W >= 2, got x of shape {tuple(x.shape)}")
    blocks = x[:, : 2 * Ho, : 2 * Wo].reshape(B, Ho, 2, Wo, 2, C)  # odd last row/column dropped
    return blocks.mean(axis=(2, 4)), ResampleCache(tuple(x.shape))


def avg_pool2x2_backward(dy, cache: ResampleCache):
    """Each input pixel of a block gets a quarter of the block's gradient."""
    xp = get_xp(dy)
    B, H, W, C = cache.x_shape
    _, Ho, Wo, _ = dy.shape
    dx = xp.zeros((B, H, W, C), dtype=dy.dtype)  # a dropped odd row/column gets 0
    quarter = xp.broadcast_to(dy[:, :, None, :, None, :] * 0.25, (B, Ho, 2, Wo, 2, C))  # Python float: keeps dtype
    dx[:, : 2 * Ho, : 2 * Wo] = quarter.reshape(B, 2 * Ho, 2 * Wo, C)
    return dx


# ----------------------------------------------------------------------------- fused upsample + 3x3 conv
#: Along one axis, output phase a (even/odd rows of the upsampled image) of a 3-tap
#: kernel with padding 1 reads only two source rows: row 2i + a - 1 + p of the
#: upsampled image is source row i - 1 + r, so tap p adds into the 2-tap kernel's
#: tap r = _PHASE_TAPS[a][r, p]. a = 0: rows (i - 1, i) with taps (w0, w1 + w2);
#: a = 1: rows (i, i + 1) with taps (w0 + w1, w2).
_PHASE_TAPS = (np.array([[1, 0, 0], [0, 1, 1]]), np.array([[1, 1, 0], [0, 0, 1]]))  # (r, p)
#: The 2-tap kernel of phase a reads rows (i - 1, i) or (i, i + 1): zero padding (before, after).
_PHASE_PAD = ((1, 0), (0, 1))


class UpsampleConvCache(NamedTuple):
    phases: tuple  # the four conv caches, phases (0, 0), (0, 1), (1, 0), (1, 1)
    w_shape: tuple  # (3, 3, C_in, C_out)


def _phase_kernel(w, a: int, c: int):
    """The 2x2 kernel of output phase (a, c): w (3, 3, C_in, C_out) -> (2, 2, C_in, C_out)."""
    m_a, m_c = (get_xp(w).asarray(_PHASE_TAPS[k], dtype=w.dtype) for k in (a, c))
    return get_xp(w).einsum("rp,sq,pqio->rsio", m_a, m_c, w)  # sums of the taps that read one source pixel


def upsample_conv_forward(x, w, b=None):
    """y = conv3x3(upsample_nearest2x(x), padding 1), as four 2x2 convs of x.

    Output pixel (2i + a, 2j + c) sees a 3x3 patch of the upsampled image that
    covers only 2x2 source pixels (see :data:`_PHASE_TAPS`), so::

        y[:, a::2, c::2] = conv2d(x, w_ac, padding=(pad_a, pad_c)) + b,   w_ac = M_a w M_c^T

    with ``w_ac`` the 2x2 kernel of :func:`_phase_kernel`. 16 source taps per
    2x2 output block instead of 36: 2.25x fewer multiplications.

    x (B, H, W, C_in), w (3, 3, C_in, C_out), b (C_out,) or None -> y (B, 2H, 2W, C_out).
    """
    xp = get_xp(x)
    B, H, W, _ = x.shape
    C_out = w.shape[3]
    y = xp.empty((B, H, 2, W, 2, C_out), dtype=x.dtype)  # (B, 2H, 2W, C_out) with the phases on axes 2, 4
    caches = []
    for a in (0, 1):  # a loop over the four output phases
        for c in (0, 1):
            padding = (*_PHASE_PAD[a], *_PHASE_PAD[c])  # (top, bottom, left, right)
            y[:, :, a, :, c], cache = conv2d_forward(x, _phase_kernel(w, a, c), b, 1, padding)  # (B, H, W, C_out)
            caches.append(cache)
    return y.reshape(B, 2 * H, 2 * W, C_out), UpsampleConvCache(tuple(caches), tuple(w.shape))


def upsample_conv_backward(dy, cache: UpsampleConvCache):
    """Gradients of :func:`upsample_conv_forward`: ``(dx, dw, db)``, db None without bias.

    Each phase's conv gives its own (dx, dw_ac, db); dx and db add up over the
    phases, and ``dw_ac`` goes back to the 3x3 taps it was summed from:
    ``dw += M_a^T dw_ac M_c``.
    """
    xp = get_xp(dy)
    B, H2, W2, C_out = dy.shape
    dy6 = dy.reshape(B, H2 // 2, 2, W2 // 2, 2, C_out)  # phases on axes 2, 4
    dx = dw = db = None
    for (a, c), conv_cache in zip(((0, 0), (0, 1), (1, 0), (1, 1)), cache.phases):
        dy_ac = xp.ascontiguousarray(dy6[:, :, a, :, c])  # (B, H, W, C_out)
        dx_ac, dw_ac, db_ac = conv2d_backward(dy_ac, conv_cache)
        m_a, m_c = (xp.asarray(_PHASE_TAPS[k], dtype=dy.dtype) for k in (a, c))
        dw_33 = xp.einsum("rp,sq,rsio->pqio", m_a, m_c, dw_ac)  # (2, 2, ...) -> (3, 3, C_in, C_out)
        if dx is None:
            dx, dw, db = dx_ac, dw_33, db_ac
        else:
            dx += dx_ac
            dw += dw_33
            if db is not None:
                db += db_ac
    return dx, dw, db


# ----------------------------------------------------------------------------- layers
class Upsample2D(Module):
    """Nearest-neighbour x2 upsampling, then (``use_conv=True``) a 3x3 conv with padding 1.

    (B, H, W, channels) -> (B, 2H, 2W, out_channels). Parameters ``conv.weight``,
    ``conv.bias`` as in diffusers' ``Upsample2D(channels, use_conv=True)``.

    With ``fused = True`` (the default) the two run as :func:`upsample_conv_forward`
    (four 2x2 convs of the small image, ``self.conv`` holds the parameters and
    receives the gradients); ``fused = False`` runs them one after the other,
    the reference the tests compare with.
    """

    fused: bool = True

    def __init__(
        self, channels: int, use_conv: bool = True, out_channels: int | None = None, rng=None, dtype=DEFAULT_DTYPE
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            rng = rng if rng is not None else np.random.default_rng(0)
            self.conv = Conv2d(channels, self.out_channels, 3, padding=1, rng=rng, dtype=dtype)
        elif self.out_channels != channels:
            raise ValueError(
                f"Upsample2D without a conv cannot change channels ({channels} -> {self.out_channels})"
            )

    def forward(self, x):
        check_image(self, x, self.channels)
        check_finite(self, x)
        if self.use_conv and self.fused:
            y, cache = upsample_conv_forward(x, self.conv.weight, self.conv.params.get("bias"))
            self._set_cache(cache)
            return y  # (B, 2H, 2W, C_out)
        h, cache = upsample_nearest2x_forward(x)  # (B, 2H, 2W, C)
        self._set_cache(cache)
        return self.conv(h) if self.use_conv else h  # (B, 2H, 2W, C_out)

    def backward(self, dy):
        cache = self._pop_cache()
        if isinstance(cache, UpsampleConvCache):  # the fused forward ran
            dx, dw, db = upsample_conv_backward(dy, cache)
            self.conv.grads["weight"] += dw
            if db is not None:
                self.conv.grads["bias"] += db
            return dx
        dh = self.conv.backward(dy) if self.use_conv else dy  # reverse order: conv first
        return upsample_nearest2x_backward(dh, cache)


class Downsample2D(Module):
    """Halve H and W: a 3x3 conv with stride 2 (``use_conv=True``) or a 2x2 average pool.

    ``padding=1`` (the U-Net): conv padding 1 on every side. ``padding=0`` (the
    VAE encoder): pad (top 0, bottom 1, left 0, right 1), then no conv padding:
    an even H gives H/2 either way, but the samples sit on different pixels.
    Parameters ``conv.weight``, ``conv.bias`` as in diffusers' ``Downsample2D``.
    """

    def __init__(
        self,
        channels: int,
        use_conv: bool = True,
        out_channels: int | None = None,
        padding: int = 1,
        rng=None,
        dtype=DEFAULT_DTYPE,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.padding = padding
        if use_conv:
            rng = rng if rng is not None else np.random.default_rng(0)
            # diffusers: F.pad(x, (0, 1, 0, 1)) then Conv2d(padding=0) when padding == 0
            conv_padding = (0, 1, 0, 1) if padding == 0 else padding
            self.conv = Conv2d(channels, self.out_channels, 3, stride=2, padding=conv_padding, rng=rng, dtype=dtype)
        elif self.out_channels != channels:
            raise ValueError(
                f"Downsample2D without a conv cannot change channels ({channels} -> {self.out_channels})"
            )

    def forward(self, x):
        check_image(self, x, self.channels)
        check_finite(self, x)
        if self.use_conv:
            self._set_cache(ResampleCache(tuple(x.shape)))  # the conv keeps what its backward needs
            return self.conv(x)  # (B, Ho, Wo, C_out)
        y, cache = avg_pool2x2_forward(x)  # (B, H // 2, W // 2, C)
        self._set_cache(cache)
        return y

    def backward(self, dy):
        cache = self._pop_cache()
        if self.use_conv:
            return self.conv.backward(dy)
        return avg_pool2x2_backward(dy, cache)
