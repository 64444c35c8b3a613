"""The down, mid and up blocks of the Stable Diffusion U-Net (diffusers' ``unet_2d_blocks``).

A U-Net (Ronneberger et al. 2015) goes down through resolutions, then back up,
and every up block is fed the activations the down path left behind at its
resolution (the *skip connections*). The blocks here are diffusers' five:

* :class:`DownBlock2D`: ``num_layers`` ResnetBlock2D, then (optionally) a stride-2 conv.
* :class:`CrossAttnDownBlock2D`: the same with a Transformer2DModel after every resnet.
* :class:`UNetMidBlock2DCrossAttn`: resnet, (transformer, resnet) x num_layers, at the lowest resolution.
* :class:`UpBlock2D`: ``num_layers`` ResnetBlock2D, each eating one skip concatenated
  on the channels, then (optionally) a nearest x2 upsample and a 3x3 conv.
* :class:`CrossAttnUpBlock2D`: the same with a Transformer2DModel after every resnet.

Interfaces (channels-last, ``temb`` (B, T) the time embedding, ``context`` (B, L, D) the text)::

    down:  h, skips = block(x, temb[, context])       skips: tuple, one per resnet (+ the downsampled h)
           dx, dtemb[, dcontext] = block.backward(dh, dskips)
    mid:   h = block(x, temb, context);  dx, dtemb, dcontext = block.backward(dh)
    up:    h = block(x, skips, temb[, context])        skips are used last-first, as diffusers pops them
           dx, dskips, dtemb[, dcontext] = block.backward(dh)   dskips in the order of ``skips``

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
from diffusion_np.nn.module import Module, ModuleList
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


def _add(total, part):
    """Accumulate a gradient that several modules send to one input (None means nothing yet)."""
    return part if total is None else total + part


# ----------------------------------------------------------------------------- down blocks


class DownBlock2D(Module):
    """Resnets, then an optional stride-2 conv; every intermediate output is kept as a skip.

    ``forward(x (B, H, W, C_in), temb) -> (h, skips)`` with ``h`` (B, H/2, W/2, C_out)
    (or (B, H, W, C_out) without a downsampler) and ``skips`` one tensor per resnet
    plus the downsampled ``h`` itself.
    """

    has_cross_attention = False

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
        rng=None,
        dtype=DEFAULT_DTYPE,
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resnets = ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                          groups=resnet_groups, eps=resnet_eps, dropout=dropout,
                          output_scale_factor=output_scale_factor, rng=rng, dtype=dtype)
            for i in range(num_layers)
        ])
        self.add_downsample = add_downsample
        self.num_skips = num_layers + int(add_downsample)  # what forward returns as skips
        if add_downsample:
            self.downsamplers = ModuleList([
                Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding,
                             rng=rng, dtype=dtype)
            ])

    def forward(self, x, temb):
        check_image(self, x, self.in_channels)
        h = x
        skips = []
        for resnet in self.resnets:
            h = resnet(h, temb)
            skips.append(h)
        if self.add_downsample:
            h = self.downsamplers[0](h)  # (B, H, W, C) -> (B, H/2, W/2, C)
            skips.append(h)
        self._set_cache(len(skips))
        return h, tuple(skips)

    def backward(self, dh, dskips):
        """``dh``: gradient w.r.t. the returned h; ``dskips``: one per returned skip. -> (dx, dtemb)."""
        n_skips = self._pop_cache()
        if len(dskips) != n_skips:
            raise ValueError(f"DownBlock2D.backward expects {n_skips} skip gradients, got {len(dskips)}")
        dskips = list(dskips)
        dtemb = None
        if self.add_downsample:
            # the downsampled h was returned twice (as h and as the last skip): sum both gradients
            dh = dh + dskips.pop()
            dh = self.downsamplers[0].backward(dh)
            # the last resnet's output went on to the downsampler and into a skip
            dh = dh + dskips.pop()
        else:
            dh = dh + dskips.pop()  # the last resnet's output is both h and the last skip
        for i in reversed(range(len(self.resnets))):
            dh, dt = self.resnets[i].backward(dh)
            dtemb = _add(dtemb, dt)  # every resnet read temb
            if i > 0:
                dh = dh + dskips.pop()  # resnet i-1's output also went into a skip
        return dh, dtemb


class CrossAttnDownBlock2D(Module):
    """Like :class:`DownBlock2D`, with a Transformer2DModel after every resnet.

    ``forward(x, temb, context) -> (h, skips)``; ``backward(dh, dskips) -> (dx, dtemb, dcontext)``.
    ``num_attention_heads`` heads of ``out_channels // num_attention_heads`` channels each.
    """

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        transformer_layers_per_block: int = 1,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        use_linear_projection: bool = False,
        rng=None,
        dtype=DEFAULT_DTYPE,
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resnets = ModuleList()
        self.attentions = ModuleList()
        for i in range(num_layers):
            self.resnets.append(
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                              groups=resnet_groups, eps=resnet_eps, dropout=dropout,
                              output_scale_factor=output_scale_factor, rng=rng, dtype=dtype)
            )
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

    def forward(self, x, temb, context):
        check_image(self, x, self.in_channels)
        h = x
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            h = resnet(h, temb)
            h = attn(h, context)
            skips.append(h)
        if self.add_downsample:
            h = self.downsamplers[0](h)  # (B, H, W, C) -> (B, H/2, W/2, C)
            skips.append(h)
        self._set_cache(len(skips))
        return h, tuple(skips)

    def backward(self, dh, dskips):
        """-> (dx, dtemb, dcontext); see :meth:`DownBlock2D.backward`."""
        n_skips = self._pop_cache()
        if len(dskips) != n_skips:
            raise ValueError(f"CrossAttnDownBlock2D.backward expects {n_skips} skip gradients, got {len(dskips)}")
        dskips = list(dskips)
        dtemb = dcontext = None
        if self.add_downsample:
            dh = dh + dskips.pop()  # the downsampled h is both the output and the last skip
            dh = self.downsamplers[0].backward(dh)
        dh = dh + dskips.pop()  # the last transformer's output also went into a skip
        for i in reversed(range(len(self.resnets))):
            dh, dc = self.attentions[i].backward(dh)
            dcontext = _add(dcontext, dc)  # every transformer read the context
            dh, dt = self.resnets[i].backward(dh)
            dtemb = _add(dtemb, dt)  # every resnet read temb
            if i > 0:
                dh = dh + dskips.pop()  # the previous transformer's output also went into a skip
        return dh, dtemb, dcontext


# ----------------------------------------------------------------------------- mid block


class UNetMidBlock2DCrossAttn(Module):
    """The bottleneck: ``resnets.0``, then (``attentions.i``, ``resnets.i+1``) for i < num_layers.

    ``forward(x (B, H, W, C), temb, context) -> (B, H, W, C)``;
    ``backward(dh) -> (dx, dtemb, dcontext)``.
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

    def backward(self, dh):
        self._pop_cache()
        dtemb = dcontext = None
        for i in reversed(range(len(self.attentions))):
            dh, dt = self.resnets[i + 1].backward(dh)
            dtemb = _add(dtemb, dt)
            dh, dc = self.attentions[i].backward(dh)
            dcontext = _add(dcontext, dc)
        dh, dt = self.resnets[0].backward(dh)
        dtemb = _add(dtemb, dt)
        return dh, dtemb, dcontext


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
    """Resnets fed ``concat(h, skip)``, then an optional nearest x2 upsample + 3x3 conv.

    ``forward(x (B, H, W, prev_output_channel), skips, temb) -> (B, 2H, 2W, C_out)`` (or (B, H, W, C_out)
    without an upsampler). ``skips`` has ``num_layers`` tensors; the *last* one is used first.
    ``backward(dh) -> (dx, dskips, dtemb)`` with ``dskips`` in the order of ``skips``.

    Resnet i gets ``resnet_in + skip`` channels: ``prev_output_channel`` (i = 0) or
    ``out_channels``, plus ``in_channels`` for the last resnet (the skip from the
    level below) or ``out_channels`` otherwise, as in diffusers.
    """

    has_cross_attention = False

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
        rng=None,
        dtype=DEFAULT_DTYPE,
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.prev_output_channel, self.out_channels = prev_output_channel, out_channels
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

    def _check_skips(self, x, skips) -> None:
        check_image(self, x, self.prev_output_channel)
        if len(skips) != len(self.resnets):
            raise ValueError(f"{type(self).__name__} expects {len(self.resnets)} skips, got {len(skips)}")

    def forward(self, x, skips, temb):
        self._check_skips(x, skips)
        h = x
        widths = []  # channels of h before each concat, to split the gradient in backward
        for i, resnet in enumerate(self.resnets):
            skip = skips[len(skips) - 1 - i]  # pop from the end, as diffusers does
            widths.append(h.shape[-1])
            h = _concat_skip(h, skip)  # (B, H, W, C_h) + (B, H, W, C_s) -> (B, H, W, C_h + C_s)
            h = resnet(h, temb)  # -> (B, H, W, C_out)
        if self.add_upsample:
            h = self.upsamplers[0](h)  # (B, H, W, C_out) -> (B, 2H, 2W, C_out)
        self._set_cache(widths)
        return h

    def backward(self, dh):
        widths = self._pop_cache()
        n = len(self.resnets)
        dskips = [None] * n
        dtemb = None
        if self.add_upsample:
            dh = self.upsamplers[0].backward(dh)
        for i in reversed(range(n)):
            dh, dt = self.resnets[i].backward(dh)  # (B, H, W, C_h + C_s)
            dtemb = _add(dtemb, dt)
            # undo the concat: the first C_h channels came from h, the rest from the skip
            dh, dskips[n - 1 - i] = dh[..., : widths[i]], dh[..., widths[i]:]  # -> (.., C_h), (.., C_s)
        return dh, tuple(dskips), dtemb


class CrossAttnUpBlock2D(UpBlock2D):
    """Like :class:`UpBlock2D`, with a Transformer2DModel after every resnet.

    ``forward(x, skips, temb, context)``; ``backward(dh) -> (dx, dskips, dtemb, dcontext)``.
    """

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        transformer_layers_per_block: int = 1,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        use_linear_projection: bool = False,
        rng=None,
        dtype=DEFAULT_DTYPE,
    ):
        rng = rng if rng is not None else np.random.default_rng(0)
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_groups=resnet_groups, dropout=dropout,
                         output_scale_factor=output_scale_factor, add_upsample=add_upsample, rng=rng, dtype=dtype)
        self.attentions = ModuleList([
            _transformer(out_channels, num_attention_heads, cross_attention_dim, resnet_groups,
                         use_linear_projection, transformer_layers_per_block, rng, dtype)
            for _ in range(num_layers)
        ])

    def forward(self, x, skips, temb, context):
        self._check_skips(x, skips)
        h = x
        widths = []
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            skip = skips[len(skips) - 1 - i]  # pop from the end, as diffusers does
            widths.append(h.shape[-1])
            h = _concat_skip(h, skip)  # (B, H, W, C_h) + (B, H, W, C_s) -> (B, H, W, C_h + C_s)
            h = resnet(h, temb)  # -> (B, H, W, C_out)
            h = attn(h, context)
        if self.add_upsample:
            h = self.upsamplers[0](h)  # (B, H, W, C_out) -> (B, 2H, 2W, C_out)
        self._set_cache(widths)
        return h

    def backward(self, dh):
        widths = self._pop_cache()
        n = len(self.resnets)
        dskips = [None] * n
        dtemb = dcontext = None
        if self.add_upsample:
            dh = self.upsamplers[0].backward(dh)
        for i in reversed(range(n)):
            dh, dc = self.attentions[i].backward(dh)
            dcontext = _add(dcontext, dc)
            dh, dt = self.resnets[i].backward(dh)  # (B, H, W, C_h + C_s)
            dtemb = _add(dtemb, dt)
            # undo the concat: the first C_h channels came from h, the rest from the skip
            dh, dskips[n - 1 - i] = dh[..., : widths[i]], dh[..., widths[i]:]  # -> (.., C_h), (.., C_s)
        return dh, tuple(dskips), dtemb, dcontext
