"""Resampling between U-Net / VAE resolutions: 2x nearest upsampling, 2x2 average
pooling, and diffusers' Upsample2D and Downsample2D layers built on them.

Channels-last images ``(B, H, W, C)``. The ops, forward and backward side by side:

Nearest 2x upsampling (``F.interpolate(scale_factor=2, mode="nearest")``)::

    y[b, 2i + di, 2j + dj, c] = x[b, i, j, c]            di, dj in {0, 1}
    dx[b, i, j, c] = sum_{di, dj} dout[b, 2i + di, 2j + dj, c]     (sum over each 2x2 block)

2x2 average pooling, stride 2 (``F.avg_pool2d(x, 2)``; an odd last row/column is
dropped, as PyTorch floors the output size)::

    y[b, i, j, c] = 1/4 sum_{di, dj} x[b, 2i + di, 2j + dj, c]
    dx[b, 2i + di, 2j + dj, c] = dout[b, i, j, c] / 4     (0 in a dropped row/column)

Both are reshapes: ``(B, 2H, 2W, C)`` viewed as ``(B, H, 2, W, 2, C)`` puts each
2x2 block on axes 2 and 4, so a block sum is ``.sum(axis=(2, 4))`` and a block
copy is a broadcast. No loops.

Layers (parameter names as diffusers' ``Upsample2D`` / ``Downsample2D``):

* ``Upsample2D``: nearest x2, then (``use_conv``) a 3x3 conv, padding 1: ``conv.weight``, ``conv.bias``.
* ``Downsample2D``: (``use_conv``) a 3x3 conv with stride 2 and padding 1; with
  ``padding=0`` it is the VAE's variant, which pads (top 0, bottom 1, left 0,
  right 1) and then convolves with no padding (diffusers pads with ``F.pad(x, (0, 1, 0, 1))``).
  Without ``use_conv`` a 2x2 average pool.

The reference path of Upsample2D is the two ops one after the other (upsample,
then Conv2d). Its fast path, four 2x2 convolutions of the small image (2.25x fewer
multiplications, no 4x upsampled intermediate), is in :mod:`diffusion_np.nn.fast.resample`.

Left out: Upsample2D's ``output_size`` argument and transposed-conv option, the
FIR/K up- and downsamplers, and Downsample2D's optional norm.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, get_xp
from diffusion_np.nn import fast
from diffusion_np.nn.conv import Conv2d
from diffusion_np.nn.fast.resample import UpsampleConvCache, upsample_conv_backward, upsample_conv_forward
from diffusion_np.nn.module import Module
from diffusion_np.nn.validate import check_image, check_input_finite, check_size


class ResampleCache(NamedTuple):
    x_shape: tuple  # (B, H, W, C) of the input, all the backward needs


# ----------------------------------------------------------------------------- nearest 2x upsampling
def upsample_nearest2x_forward(x):
    """Repeat every pixel into a 2x2 block: (B, H, W, C) -> (B, 2H, 2W, C)."""
    xp = get_xp(x)
    B, H, W, C = x.shape
    blocks = xp.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))  # a view, no copy yet
    return blocks.reshape(B, 2 * H, 2 * W, C), ResampleCache(tuple(x.shape))  # the copy


def upsample_nearest2x_backward(dout, cache: ResampleCache):
    """dx = the sum of dout over each 2x2 block: (B, 2H, 2W, C) -> (B, H, W, C)."""
    B, H, W, C = cache.x_shape
    return dout.reshape(B, H, 2, W, 2, C).sum(axis=(2, 4))  # block (i, j) on axes 2 and 4


# ----------------------------------------------------------------------------- 2x2 average pooling
def avg_pool2x2_forward(x):
    """Mean of each 2x2 block, stride 2: (B, H, W, C) -> (B, H // 2, W // 2, C)."""
    B, H, W, C = x.shape
    Ho, Wo = H // 2, W // 2
    if Ho < 1 or Wo < 1:
        raise ValueError(f"avg_pool2x2 needs H, W >= 2, got x of shape {tuple(x.shape)}")
    blocks = x[:, : 2 * Ho, : 2 * Wo].reshape(B, Ho, 2, Wo, 2, C)  # odd last row/column dropped
    return blocks.mean(axis=(2, 4)), ResampleCache(tuple(x.shape))


def avg_pool2x2_backward(dout, cache: ResampleCache):
    """Each input pixel of a block gets a quarter of the block's gradient."""
    xp = get_xp(dout)
    B, H, W, C = cache.x_shape
    _, Ho, Wo, _ = dout.shape
    dx = xp.zeros((B, H, W, C), dtype=dout.dtype)  # a dropped odd row/column gets 0
    quarter = xp.broadcast_to(dout[:, :, None, :, None, :] * 0.25, (B, Ho, 2, Wo, 2, C))  # Python float: keeps dtype
    dx[:, : 2 * Ho, : 2 * Wo] = quarter.reshape(B, 2 * Ho, 2 * Wo, C)
    return dx


# ----------------------------------------------------------------------------- layers
class Upsample2D(Module):
    """Nearest-neighbour x2 upsampling, then (``use_conv=True``) a 3x3 conv with padding 1.

    (B, H, W, channels) -> (B, 2H, 2W, out_channels). Parameters ``conv.weight``,
    ``conv.bias`` as in diffusers' ``Upsample2D(channels, use_conv=True)``.

    ``method``: "auto" (the default) runs the two as
    :func:`diffusion_np.nn.fast.resample.upsample_conv_forward` (four 2x2 convs of
    the small image; ``self.conv`` holds the parameters and receives the gradients)
    unless reference mode is on; "fused" always so; "reference" always one after the other.
    A ``conv`` that is not a plain Conv2d (LoRA's wrapper: LCM-LoRA adapts ``upsamplers.0.conv``)
    runs one after the other, so what it adds to the convolution counts.
    """

    def __init__(
        self,
        channels: int,
        use_conv: bool = True,
        out_channels: int | None = None,
        rng=None,
        dtype=DEFAULT_DTYPE,
        method: str = "auto",
    ):
        super().__init__()
        self.channels = check_size(self, "channels", channels)
        self.out_channels = check_size(self, "out_channels", out_channels) if out_channels is not None else channels
        if method not in ("auto", "fused", "reference"):
            raise ValueError(f"Upsample2D: method must be 'auto', 'fused' or 'reference', got {method!r}")
        self.use_conv, self.method = use_conv, method
        if use_conv:
            rng = rng if rng is not None else np.random.default_rng(0)
            self.conv = Conv2d(channels, self.out_channels, 3, padding=1, rng=rng, dtype=dtype)
        elif self.out_channels != channels:
            raise ValueError(
                f"Upsample2D without a conv cannot change channels ({channels} -> {self.out_channels})"
            )

    def forward(self, x):
        check_image(self, x, self.channels)
        check_input_finite(self, x)
        if self.use_conv and type(self.conv) is Conv2d and fast.runs_fused(self.method):
            y, cache = upsample_conv_forward(x, self.conv.weight, self.conv.params.get("bias"))
            self._set_cache(cache)
            return y  # (B, 2H, 2W, C_out)
        h, cache = upsample_nearest2x_forward(x)  # (B, 2H, 2W, C)
        self._set_cache(cache)
        return self.conv(h) if self.use_conv else h  # (B, 2H, 2W, C_out)

    def backward(self, dout):
        cache = self._pop_cache()
        if isinstance(cache, UpsampleConvCache):  # the fused forward ran
            dx, dw, db = upsample_conv_backward(dout, cache)
            self.conv.add_grad("weight", dw)
            if db is not None:
                self.conv.add_grad("bias", db)
            return dx
        dup = self.conv.backward(dout) if self.use_conv else dout  # reverse order: conv first
        return upsample_nearest2x_backward(dup, cache)


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
        self.channels = check_size(self, "channels", channels)
        self.out_channels = check_size(self, "out_channels", out_channels) if out_channels is not None else channels
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
        check_input_finite(self, x)
        if self.use_conv:
            self._set_cache(ResampleCache(tuple(x.shape)))  # the conv keeps what its backward needs
            return self.conv(x)  # (B, Ho, Wo, C_out)
        y, cache = avg_pool2x2_forward(x)  # (B, H // 2, W // 2, C)
        self._set_cache(cache)
        return y

    def backward(self, dout):
        cache = self._pop_cache()
        if self.use_conv:
            return self.conv.backward(dout)
        return avg_pool2x2_backward(dout, cache)
