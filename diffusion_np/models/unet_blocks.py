"""The down, mid and up blocks of the Stable Diffusion U-Net (diffusers' ``unet_2d_blocks``).

A U-Net (Ronneberger et al. 2015) goes down through resolutions, then back up,
and every up block is fed the activations the down path left behind at its
resolution (the *skip connections*). Three blocks build every level:

* :class:`DownBlock2D`: ``num_layers`` ResnetBlock2D, each followed by a Transformer2DModel
  when ``cross_attention=True`` (diffusers' ``CrossAttnDownBlock2D``), then (optionally) a
  stride-2 conv.
* :class:`UNetMidBlock2DCrossAttn`: resnet, (transformer, resnet) x num_layers, at the lowest resolution.
* :class:`UpBlock2D`: ``num_layers`` ResnetBlock2D, each eating one skip concatenated on the
  channels and followed by a Transformer2DModel when ``cross_attention=True`` (diffusers'
  ``CrossAttnUpBlock2D``), then (optionally) a nearest x2 upsample and a 3x3 conv.

diffusers has separate classes with and without attention; here the attention is one
switch, so the with-attention block reads as the plain one plus one line per resnet.
The U-Net maps diffusers' block-type names onto the switch (``"CrossAttnDownBlock2D"``
-> ``DownBlock2D(..., cross_attention=True)``), and the parameter names are the same.

Interfaces (channels-last, ``temb`` (B, T) the time embedding, ``context`` (B, L, D) the text;
``context`` is required with attention and must be None without). Every backward returns a
:class:`~diffusion_np.nn.BlockGrads`, with ``dcontext`` None for a block without attention::

    down:  h, skips = block(x, temb, context)      skips: tuple, one per resnet (+ the downsampled h)
           g = block.backward(dout, dskips)        g.dx, g.dtemb, g.dcontext
    mid:   h = block(x, temb, context);  g = block.backward(dout)       g.dx, g.dtemb, g.dcontext
    up:    h = block(x, skips, temb, context)      skips are used last-first, as diffusers pops them
           g = block.backward(dout)                g.dx, g.dtemb, g.dcontext, g.dskips (in the order of skips)

Every module that read ``temb`` (each resnet) or ``context`` (each transformer)
adds its part of their gradient; the sums are written out in the backward passes.

Parameter names are diffusers' (``resnets.0.conv1.weight``, ``attentions.0.proj_in.weight``,
``downsamplers.0.conv.weight``, ``upsamplers.0.conv.weight``).

Left out on purpose: the attention-only, skip, K-diffusion and "simple" cross-attention
block types, dual cross-attention, FreeU, ControlNet/T2I-adapter residuals,
attention masks and ``upsample_size`` (image sides must be divisible by 2 per level).
"""

from __future__ import annotations

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, get_xp
from diffusion_np.models.resnet import ResnetBlock2D
from diffusion_np.models.transformer import Transformer2DModel
from diffusion_np.nn.module import BlockGrads, Module, ModuleList
from diffusion_np.nn.resample import Downsample2D, Upsample2D
from diffusion_np.nn.validate import check_image


def _transformer(out_channels: int, num_attention_heads: int, cross_attention_dim: int, groups: int,
                 use_linear_projection: bool, num_layers: int, rng, dtype) -> Transformer2DModel:
    """diffusers' blocks build their transformers with ``attention_head_dim = channels // heads``."""
    if out_channels % num_attention_heads != 0:
        raise ValueError(
            f"{out_channels} channels cannot be split into {num_attention_heads} attention heads "
            "(diffusers' attention_head_dim is the number of heads; it must divide every block's channels)"
        )
    return Transformer2DModel(
        num_attention_heads, out_channels // num_attention_heads, in_channels=out_channels,
        num_layers=num_layers, cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
        use_linear_projection=use_linear_projection, rng=rng, dtype=dtype,
    )


def _check_context(block, context) -> None:
    """A block with attention needs the text; one without must not silently drop it."""
    if block.has_cross_attention and context is None:
        raise ValueError(f"{type(block).__name__} was built with cross_attention=True: pass the context (B, L, D)")
    if not block.has_cross_attention and context is not None:
        raise ValueError(f"{type(block).__name__} was built with cross_attention=False, so it takes no context")


def _add(total, part):
    """Accumulate a gradient that several modules send to one input (None means nothing yet)."""
    return part if total is None else total + part


# ----------------------------------------------------------------------------- down blocks


class DownBlock2D(Module):
    """Resnets (each followed by a transformer with ``cross_attention=True``), then an optional
    stride-2 conv; every intermediate output is kept as a skip.

    ``forward(x (B, H, W, C_in), temb, context=None) -> (h, skips)`` with ``h`` (B, H/2, W/2, C_out)
    (or (B, H, W, C_out) without a downsampler) and ``skips`` one tensor per resnet
    plus the downsampled ``h`` itself. ``backward(dout, dskips) -> BlockGrads(dx, dtemb, dcontext)``.
    With attention, ``num_attention_heads`` heads of ``out_channels // num_attention_heads``
    channels each (parameters ``attentions.i.*``); without, the attention arguments are unused.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        cross_attention: bool = False,
        transformer_layers_per_block: int = 1,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        use_linear_projection: bool = False,
        rng=None,
        dtype=DEFAULT_DTYPE,
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.has_cross_attention = bool(cross_attention)
        self.resnets = ModuleList()
        if self.has_cross_attention:
            self.attentions = ModuleList()
        for i in range(num_layers):  # resnet i, then (with attention) transformer i: the order of the weights
            self.resnets.append(
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                              groups=resnet_groups, eps=resnet_eps, dropout=dropout,
                              output_scale_factor=output_scale_factor, rng=rng, dtype=dtype)
            )
            if self.has_cross_attention:
                self.attentions.append(
                    _transformer(out_channels, num_attention_heads, cross_attention_dim, resnet_groups,
                                 use_linear_projection, transformer_layers_per_block, rng, dtype)
                )
        self.add_downsample = add_downsample
        self.num_skips = num_layers + int(add_downsample)  # what forward returns as skips
        if add_downsample:
            self.downsamplers = ModuleList([
                Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding,
                             rng=rng, dtype=dtype)
            ])

    def forward(self, x, temb, context=None):
        check_image(self, x, self.in_channels)
        _check_context(self, context)
        h = x
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.has_cross_attention:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.add_downsample:
            h = self.downsamplers[0](h)  # (B, H, W, C) -> (B, H/2, W/2, C)
            skips.append(h)
        self._set_cache(len(skips))
        return h, tuple(skips)

    def backward(self, dout, dskips):
        """``dout``: gradient w.r.t. the returned h; ``dskips``: one per returned skip.

        Returns ``BlockGrads(dx, dtemb, dcontext)`` (``dcontext`` None without attention).
        """
        n_skips = self._pop_cache()
        if len(dskips) != n_skips:
            raise ValueError(f"{type(self).__name__}.backward expects {n_skips} skip gradients, got {len(dskips)}")
        dskips = list(dskips)
        dtemb = dcontext = None
        dh = dout
        if self.add_downsample:
            # the downsampled h was returned twice (as h and as the last skip): sum both gradients
            dh = dh + dskips.pop()
            dh = self.downsamplers[0].backward(dh)
        dh = dh + dskips.pop()  # the last resnet's (or transformer's) output is also the last skip
        for i in reversed(range(len(self.resnets))):
            if self.has_cross_attention:
                g = self.attentions[i].backward(dh)
                dh, dcontext = g.dx, _add(dcontext, g.dcontext)  # every transformer read the context
            g = self.resnets[i].backward(dh)
            dh, dtemb = g.dx, _add(dtemb, g.dtemb)  # every resnet read temb
            if i > 0:
                dh = dh + dskips.pop()  # layer i-1's output also went into a skip
        return BlockGrads(dh, dtemb=dtemb, dcontext=dcontext)


# ----------------------------------------------------------------------------- mid block


class UNetMidBlock2DCrossAttn(Module):
    """The bottleneck: ``resnets.0``, then (``attentions.i``, ``resnets.i+1``) for i < num_layers.

    ``forward(x (B, H, W, C), temb, context) -> (B, H, W, C)``;
    ``backward(dout) -> BlockGrads(dx, dtemb, dcontext)``.
    """

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        transformer_layers_per_block: int = 1,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        use_linear_projection: bool = False,
        rng=None,
        dtype=DEFAULT_DTYPE,
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.in_channels = in_channels

        def resnet():
            return ResnetBlock2D(in_channels, in_channels, temb_channels, groups=resnet_groups, eps=resnet_eps,
                                 dropout=dropout, output_scale_factor=output_scale_factor, rng=rng, dtype=dtype)

        self.resnets = ModuleList([resnet()])
        self.attentions = ModuleList()
        for _ in range(num_layers):
            self.attentions.append(
                _transformer(in_channels, num_attention_heads, cross_attention_dim, resnet_groups,
                             use_linear_projection, transformer_layers_per_block, rng, dtype)
            )
            self.resnets.append(resnet())

    def forward(self, x, temb, context):
        check_image(self, x, self.in_channels)
        h = self.resnets[0](x, temb)
        for i in range(len(self.attentions)):
            h = self.attentions[i](h, context)
            h = self.resnets[i + 1](h, temb)
        self._set_cache(True)
        return h

    def backward(self, dout):
        self._pop_cache()
        dtemb = dcontext = None
        dh = dout
        for i in reversed(range(len(self.attentions))):
            g = self.resnets[i + 1].backward(dh)
            dh, dtemb = g.dx, _add(dtemb, g.dtemb)
            g = self.attentions[i].backward(dh)
            dh, dcontext = g.dx, _add(dcontext, g.dcontext)
        g = self.resnets[0].backward(dh)
        return BlockGrads(g.dx, dtemb=_add(dtemb, g.dtemb), dcontext=dcontext)


# ----------------------------------------------------------------------------- up blocks


def _concat_skip(h, skip):
    """[h, skip] on the channel axis, the order of diffusers' ``torch.cat([h, res], dim=1)``."""
    if skip.shape[:3] != h.shape[:3]:
        raise ValueError(
            f"an up block got a skip of shape {tuple(skip.shape)} for h of shape {tuple(h.shape)}: "
            "batch, height and width must match"
        )
    return get_xp(h).concatenate([h, skip], axis=-1)  # (B, H, W, C_h) + (B, H, W, C_s) -> (B, H, W, C_h + C_s)


class UpBlock2D(Module):
    """Resnets fed ``concat(h, skip)`` (each followed by a transformer with ``cross_attention=True``),
    then an optional nearest x2 upsample + 3x3 conv.

    ``forward(x (B, H, W, prev_output_channel), skips, temb, context=None) -> (B, 2H, 2W, C_out)``
    (or (B, H, W, C_out) without an upsampler). ``skips`` has ``num_layers`` tensors; the *last*
    one is used first. ``backward(dout) -> BlockGrads(dx, dtemb, dcontext, dskips)`` with
    ``dskips`` in the order of ``skips`` and ``dcontext`` None without attention.

    Resnet i gets ``resnet_in + skip`` channels: ``prev_output_channel`` (i = 0) or
    ``out_channels``, plus ``in_channels`` for the last resnet (the skip from the
    level below) or ``out_channels`` otherwise, as in diffusers.
    """

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        cross_attention: bool = False,
        transformer_layers_per_block: int = 1,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        use_linear_projection: bool = False,
        rng=None,
        dtype=DEFAULT_DTYPE,
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.prev_output_channel, self.out_channels = prev_output_channel, out_channels
        self.has_cross_attention = bool(cross_attention)
        self.resnets = ModuleList()
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            self.resnets.append(
                ResnetBlock2D(resnet_in + skip_channels, out_channels, temb_channels, groups=resnet_groups,
                              eps=resnet_eps, dropout=dropout, output_scale_factor=output_scale_factor,
                              rng=rng, dtype=dtype)
            )
        self.add_upsample = add_upsample
        if add_upsample:
            self.upsamplers = ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels,
                                                     rng=rng, dtype=dtype)])
        # the transformers are drawn from rng after the resnets and the upsampler, so a seed gives
        # the same weights with attention as without, in every layer the two blocks share
        if self.has_cross_attention:
            self.attentions = ModuleList([
                _transformer(out_channels, num_attention_heads, cross_attention_dim, resnet_groups,
                             use_linear_projection, transformer_layers_per_block, rng, dtype)
                for _ in range(num_layers)
            ])

    def forward(self, x, skips, temb, context=None):
        check_image(self, x, self.prev_output_channel)
        if len(skips) != len(self.resnets):
            raise ValueError(f"{type(self).__name__} expects {len(self.resnets)} skips, got {len(skips)}")
        _check_context(self, context)
        h = x
        widths = []  # channels of h before each concat, to split the gradient in backward
        for i, resnet in enumerate(self.resnets):
            skip = skips[len(skips) - 1 - i]  # pop from the end, as diffusers does
            widths.append(h.shape[-1])
            h = _concat_skip(h, skip)  # (B, H, W, C_h) + (B, H, W, C_s) -> (B, H, W, C_h + C_s)
            h = resnet(h, temb)  # -> (B, H, W, C_out)
            if self.has_cross_attention:
                h = self.attentions[i](h, context)
        if self.add_upsample:
            h = self.upsamplers[0](h)  # (B, H, W, C_out) -> (B, 2H, 2W, C_out)
        self._set_cache(widths)
        return h

    def backward(self, dout):
        widths = self._pop_cache()
        n = len(self.resnets)
        dskips = [None] * n
        dtemb = dcontext = None
        dh = self.upsamplers[0].backward(dout) if self.add_upsample else dout
        for i in reversed(range(n)):
            if self.has_cross_attention:
                g = self.attentions[i].backward(dh)
                dh, dcontext = g.dx, _add(dcontext, g.dcontext)  # every transformer read the context
            g = self.resnets[i].backward(dh)  # (B, H, W, C_h + C_s)
            dh, dtemb = g.dx, _add(dtemb, g.dtemb)  # every resnet read temb
            # undo the concat: the first C_h channels came from h, the rest from the skip
            dh, dskips[n - 1 - i] = dh[..., : widths[i]], dh[..., widths[i]:]  # -> (.., C_h), (.., C_s)
        return BlockGrads(dh, dtemb=dtemb, dcontext=dcontext, dskips=tuple(dskips))
