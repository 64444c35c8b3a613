"""The Stable Diffusion U-Net (diffusers' ``UNet2DConditionModel``) with a hand-written backward.

It predicts the noise in a latent image ``x_t`` given the timestep ``t`` and the
text ``c`` (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", Sec. 3.3; the U-Net of Ronneberger et al. 2015 with the
timestep embedding of Ho et al. 2020)::

    temb  = time_embedding(sinusoidal(t))                 (B, 4 * block_out_channels[0])
    h     = conv_in(x_t);  skips = [h]
    down: for each level: h, s = down_block(h, temb[, c]);  skips += s     (H, W halve per level)
    mid:  h = mid_block(h, temb, c)
    up:   for each level: h = up_block(h, last n skips, temb[, c])         (H, W double per level)
    out   = conv_out(silu(conv_norm_out(h)))              (B, H, W, out_channels)

The backward runs this in reverse. The skip connections are the one place where
the graph branches across blocks: a skip tensor was used by the down path *and*
by an up block, so its gradient is the sum of the two; we keep the up blocks'
skip gradients in a list indexed like ``skips`` and add them, visibly, where the
down path produced each tensor.

Configuration: the keyword arguments (and :meth:`UNet2DConditionModel.from_config`)
take diffusers' field names, so a diffusers ``config.json`` builds the same
network, and the parameter names are diffusers' ``state_dict`` keys (conv
weights in our (kh, kw, C_in, C_out) layout). One naming trap, kept for
compatibility: diffusers' ``attention_head_dim`` is the *number of heads*, not
their width (diffusers issue #2011); each block then uses heads of
``channels // attention_head_dim`` channels. Stable Diffusion 1.x: 8 heads
everywhere; 2.x: ``attention_head_dim=(5, 10, 20, 20)`` heads of 64 channels.

Left out on purpose (a ValueError names the field): class and additional
embeddings (SDXL), encoder_hid_proj, time-conditioning projections,
the scale-shift time-embedding norm, dual / only cross-attention, GLIGEN,
Fourier time embeddings, attention masks, ControlNet/T2I-adapter residuals,
and image sides that are not divisible by 2 per level (diffusers' upsample_size).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, get_xp
from diffusion_np.models.unet_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)
from diffusion_np.nn.activation import silu_backward, silu_forward
from diffusion_np.nn.conv import Conv2d
from diffusion_np.nn.embedding import TimestepEmbedding, Timesteps
from diffusion_np.nn.module import Module, ModuleList
from diffusion_np.nn.norm import GroupNorm
from diffusion_np.nn.validate import check_features, check_finite, check_image

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

#: diffusers fields we do not implement, with the only value we accept (diffusers' default).
_UNSUPPORTED = {
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,  # diffusers itself refuses it; attention_head_dim carries the heads
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
}

#: diffusers fields that change nothing for the block types we build, accepted with any value:
#: skip_time_act and out_scale_factor reach only the Resnet*/Simple* block types, the next two
#: only the "simple" mid block and the text addition embedding, and upcast_attention only
#: changes float16 models (it computes the scores in float32, which we always do).
_IGNORED = (
    "resnet_skip_time_act",
    "resnet_out_scale_factor",
    "cross_attention_norm",
    "mid_block_only_cross_attention",
    "addition_embed_type_num_heads",
    "upcast_attention",
)


def _per_level(value, n: int, name: str) -> list:
    """An int for every level, or a list/tuple with one entry per level."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet2DConditionModel: {name} has {len(value)} entries for {n} levels: {value}")
        return list(value)
    return [value] * n


class UNet2DConditionModel(Module):
    """Noise prediction network ``eps(x_t, t, c)``, channels-last.

    ``forward(sample (B, H, W, in_channels), timestep (B,) or scalar,
    encoder_hidden_states (B, L, cross_attention_dim)) -> (B, H, W, out_channels)``;
    ``backward(dout) -> (dsample, dencoder_hidden_states)`` and adds every parameter
    gradient into ``grads``. H and W must be divisible by ``2 ** (levels - 1)``.

    Keyword arguments are diffusers' config fields with diffusers' defaults (the
    Stable Diffusion 1.x network); ``config`` holds them after construction.
    ``attention_head_dim`` is the number of heads (see the module docstring).
    ``rng`` seeds the PyTorch-style initialisation; ``dtype`` the parameters.
    """

    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention: bool | tuple = False,
        block_out_channels: tuple = (320, 640, 1280, 1280),
        layers_per_block: int | tuple = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | tuple = 1,
        attention_head_dim: int | tuple = 8,
        use_linear_projection: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        rng=None,
        dtype=DEFAULT_DTYPE,
        **other_fields: Any,
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self._check_fields(other_fields)
        n = len(block_out_channels)
        self._check_structure(down_block_types, up_block_types, mid_block_type, n, only_cross_attention, act_fn,
                              time_embedding_type, cross_attention_dim, norm_num_groups, conv_in_kernel,
                              conv_out_kernel)
        self.config = {
            "sample_size": sample_size, "in_channels": in_channels, "out_channels": out_channels,
            "center_input_sample": center_input_sample, "flip_sin_to_cos": flip_sin_to_cos,
            "freq_shift": freq_shift, "down_block_types": tuple(down_block_types),
            "mid_block_type": mid_block_type, "up_block_types": tuple(up_block_types),
            "only_cross_attention": only_cross_attention, "block_out_channels": tuple(block_out_channels),
            "layers_per_block": layers_per_block, "downsample_padding": downsample_padding,
            "mid_block_scale_factor": mid_block_scale_factor, "dropout": dropout, "act_fn": act_fn,
            "norm_num_groups": norm_num_groups, "norm_eps": norm_eps, "cross_attention_dim": cross_attention_dim,
            "transformer_layers_per_block": transformer_layers_per_block,
            "attention_head_dim": attention_head_dim, "use_linear_projection": use_linear_projection,
            "time_embedding_type": time_embedding_type, "time_embedding_dim": time_embedding_dim,
            "conv_in_kernel": conv_in_kernel, "conv_out_kernel": conv_out_kernel,
            **other_fields,
        }
        self.in_channels, self.out_channels = in_channels, out_channels
        self.cross_attention_dim = cross_attention_dim
        self.center_input_sample = center_input_sample
        self.num_upsamplers = n - 1  # every level but the last halves H and W

        heads = _per_level(attention_head_dim, n, "attention_head_dim")  # diffusers' name: it is the heads
        layers = _per_level(layers_per_block, n, "layers_per_block")
        t_layers = _per_level(transformer_layers_per_block, n, "transformer_layers_per_block")
        for level, (h, c) in enumerate(zip(heads, block_out_channels)):
            if c % h != 0:
                raise ValueError(
                    f"UNet2DConditionModel: block_out_channels[{level}]={c} is not divisible by "
                    f"attention_head_dim[{level}]={h} (diffusers' attention_head_dim is the number of heads)"
                )
        groups, eps = norm_num_groups, norm_eps

        # input and time embedding
        self.conv_in = Conv2d(in_channels, block_out_channels[0], conv_in_kernel, padding=(conv_in_kernel - 1) // 2,
                              rng=rng, dtype=dtype)
        time_embed_dim = time_embedding_dim or 4 * block_out_channels[0]
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)  # no parameters
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, rng=rng, dtype=dtype)

        # down path
        self.down_blocks = ModuleList()
        out_ch = block_out_channels[0]
        for i, kind in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            common = dict(num_layers=layers[i], resnet_eps=eps, resnet_groups=groups, dropout=dropout,
                          add_downsample=i < n - 1, downsample_padding=downsample_padding, rng=rng, dtype=dtype)
            if kind == "CrossAttnDownBlock2D":
                block = CrossAttnDownBlock2D(in_ch, out_ch, time_embed_dim, transformer_layers_per_block=t_layers[i],
                                             num_attention_heads=heads[i], cross_attention_dim=cross_attention_dim,
                                             use_linear_projection=use_linear_projection, **common)
            else:
                block = DownBlock2D(in_ch, out_ch, time_embed_dim, **common)
            self.down_blocks.append(block)

        # bottleneck
        self.has_mid_block = mid_block_type is not None
        if self.has_mid_block:
            self.mid_block = UNetMidBlock2DCrossAttn(
                block_out_channels[-1], time_embed_dim, transformer_layers_per_block=t_layers[-1],
                resnet_eps=eps, resnet_groups=groups, num_attention_heads=heads[-1],
                cross_attention_dim=cross_attention_dim, dropout=dropout, output_scale_factor=mid_block_scale_factor,
                use_linear_projection=use_linear_projection, rng=rng, dtype=dtype,
            )

        # up path: levels in reverse; each block has one resnet more than its down block
        self.up_blocks = ModuleList()
        rev_channels = list(reversed(block_out_channels))
        rev_heads, rev_layers, rev_t_layers = heads[::-1], layers[::-1], t_layers[::-1]
        out_ch = rev_channels[0]
        for i, kind in enumerate(up_block_types):
            prev_ch, out_ch = out_ch, rev_channels[i]
            in_ch = rev_channels[min(i + 1, n - 1)]  # channels of the skips from the level below
            common = dict(num_layers=rev_layers[i] + 1, resnet_eps=eps, resnet_groups=groups, dropout=dropout,
                          add_upsample=i < n - 1, rng=rng, dtype=dtype)
            if kind == "CrossAttnUpBlock2D":
                block = CrossAttnUpBlock2D(in_ch, prev_ch, out_ch, time_embed_dim,
                                           transformer_layers_per_block=rev_t_layers[i],
                                           num_attention_heads=rev_heads[i], cross_attention_dim=cross_attention_dim,
                                           use_linear_projection=use_linear_projection, **common)
            else:
                block = UpBlock2D(in_ch, prev_ch, out_ch, time_embed_dim, **common)
            self.up_blocks.append(block)

        # output
        self.conv_norm_out = GroupNorm(groups, block_out_channels[0], eps=eps, dtype=dtype)
        self.conv_out = Conv2d(block_out_channels[0], out_channels, conv_out_kernel,
                               padding=(conv_out_kernel - 1) // 2, rng=rng, dtype=dtype)

    # ------------------------------------------------------------------ configuration
    @classmethod
    def from_config(cls, config: dict, rng=None, dtype=DEFAULT_DTYPE) -> UNet2DConditionModel:
        """Build from a diffusers config dict (e.g. a parsed ``unet/config.json``).

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are
        skipped; unknown or unsupported fields raise a ValueError naming them.
        """
        fields = {k: v for k, v in config.items() if not k.startswith("_")}
        return cls(rng=rng, dtype=dtype, **fields)

    @staticmethod
    def _check_fields(other_fields: dict) -> None:
        unknown = [k for k in other_fields if k not in _UNSUPPORTED and k not in _IGNORED]
        if unknown:
            raise ValueError(f"UNet2DConditionModel: unknown config field(s) {', '.join(sorted(unknown))}")
        unsupported = [f"{k}={v!r} (only {_UNSUPPORTED[k]!r} is supported)"
                       for k, v in other_fields.items() if k in _UNSUPPORTED and v != _UNSUPPORTED[k]]
        if unsupported:
            raise ValueError("UNet2DConditionModel does not support " + "; ".join(unsupported))

    @staticmethod
    def _check_structure(down, up, mid, n, only_cross_attention, act_fn, time_embedding_type,
                         cross_attention_dim, norm_num_groups, conv_in_kernel, conv_out_kernel) -> None:
        bad = [t for t in down if t not in DOWN_BLOCK_TYPES] + [t for t in up if t not in UP_BLOCK_TYPES]
        if bad:
            raise ValueError(
                f"UNet2DConditionModel: unsupported block type(s) {bad}; down blocks may be {DOWN_BLOCK_TYPES}, "
                f"up blocks {UP_BLOCK_TYPES}"
            )
        if mid not in MID_BLOCK_TYPES:
            raise ValueError(f"UNet2DConditionModel: unsupported mid_block_type {mid!r}; use one of {MID_BLOCK_TYPES}")
        if len(down) != n or len(up) != n:
            raise ValueError(
                f"UNet2DConditionModel: down_block_types ({len(down)}), up_block_types ({len(up)}) and "
                f"block_out_channels ({n}) must have the same length"
            )
        if any(_per_level(only_cross_attention, n, "only_cross_attention")):
            raise ValueError("UNet2DConditionModel does not support only_cross_attention=True")
        if act_fn not in ("silu", "swish"):
            raise ValueError(f"UNet2DConditionModel supports act_fn='silu' only, got {act_fn!r}")
        if time_embedding_type != "positional":
            raise ValueError(
                f"UNet2DConditionModel supports time_embedding_type='positional' only, got {time_embedding_type!r}"
            )
        if not isinstance(cross_attention_dim, (int, np.integer)):
            raise ValueError(
                f"UNet2DConditionModel supports one int cross_attention_dim, got {cross_attention_dim!r}"
            )
        if norm_num_groups is None:
            raise ValueError("UNet2DConditionModel does not support norm_num_groups=None (no output norm)")
        if conv_in_kernel % 2 == 0 or conv_out_kernel % 2 == 0:
            raise ValueError("UNet2DConditionModel: conv_in_kernel and conv_out_kernel must be odd")

    # ------------------------------------------------------------------ forward / backward
    def _timesteps(self, timestep, batch: int, xp):
        """A scalar, (), (1,) or (B,) timestep -> a (B,) array on the sample's device."""
        t = xp.asarray(timestep)
        if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
            raise TypeError(f"UNet2DConditionModel expects integer or float timesteps, got {t.dtype}")
        if t.ndim == 0 or t.shape == (1,):
            return xp.broadcast_to(t.reshape(1), (batch,))
        if t.shape != (batch,):
            raise ValueError(
                f"UNet2DConditionModel expects timestep as a scalar or of shape (B,) with B={batch}, "
                f"got {tuple(t.shape)}"
            )
        return t

    def _check_inputs(self, sample, encoder_hidden_states) -> None:
        check_image(self, sample, self.in_channels, what="sample")
        check_finite(self, sample, "sample")
        B, H, W, _ = sample.shape
        factor = 2 ** self.num_upsamplers
        if H % factor or W % factor:
            raise ValueError(
                f"UNet2DConditionModel with {self.num_upsamplers + 1} levels needs H and W divisible by {factor}, "
                f"got sample of shape {tuple(sample.shape)}"
            )
        check_features(self, encoder_hidden_states, self.cross_attention_dim, min_ndim=3,
                       what="encoder_hidden_states")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != B:
            raise ValueError(
                f"UNet2DConditionModel expects encoder_hidden_states of shape (B={B}, L, "
                f"{self.cross_attention_dim}), got {tuple(encoder_hidden_states.shape)}"
            )
        check_finite(self, encoder_hidden_states, "encoder_hidden_states")

    def forward(self, sample, timestep, encoder_hidden_states):
        self._check_inputs(sample, encoder_hidden_states)
        xp = get_xp(sample)
        B = sample.shape[0]
        context = encoder_hidden_states  # (B, L, D): the text tokens every transformer attends to
        if self.center_input_sample:
            sample = 2.0 * sample - 1.0

        # 1. time embedding: sinusoidal features (float32, as diffusers) -> MLP
        t_emb = self.time_proj(self._timesteps(timestep, B, xp)).astype(sample.dtype)  # (B, C0)
        temb = self.time_embedding(t_emb)  # (B, 4 * C0)

        # 2. down path; every tensor in `skips` waits for an up block
        h = self.conv_in(sample)  # (B, H, W, in) -> (B, H, W, C0)
        skips = [h]
        for block in self.down_blocks:
            if block.has_cross_attention:
                h, block_skips = block(h, temb, context)
            else:
                h, block_skips = block(h, temb)
            skips.extend(block_skips)  # one (B, H_l, W_l, C_l) per resnet, plus the downsampled h

        # 3. bottleneck
        if self.has_mid_block:
            h = self.mid_block(h, temb, context)  # (B, H / 2^(n-1), W / 2^(n-1), C_last)

        # 4. up path: each block takes the last len(block.resnets) skips (the newest first)
        n_skips = len(skips)
        for block in self.up_blocks:
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            if block.has_cross_attention:
                h = block(h, block_skips, temb, context)
            else:
                h = block(h, block_skips, temb)
        assert not skips, "every skip is used by exactly one up block"

        # 5. output head
        h = self.conv_norm_out(h)  # (B, H, W, C0)
        h, silu_cache = silu_forward(h)
        out = self.conv_out(h)  # (B, H, W, C0) -> (B, H, W, out)
        self._set_cache((silu_cache, n_skips, tuple(context.shape)))
        return out

    def backward(self, dout):
        """Gradients of :meth:`forward`; returns ``(dsample, dencoder_hidden_states)``."""
        silu_cache, n_skips, context_shape = self._pop_cache()
        xp = get_xp(dout)
        dtemb = None  # every resnet read temb: the sum of their gradients
        dcontext = xp.zeros(context_shape, dtype=dout.dtype)  # every transformer read the text: the sum

        # 5. output head, reversed
        dh = self.conv_out.backward(dout)
        dh = silu_backward(dh, silu_cache)
        dh = self.conv_norm_out.backward(dh)  # (B, H, W, C0)

        # 4. up path, reversed. dskips[j] collects the gradient that the up blocks send to skips[j];
        # the last up block consumed the oldest skips, so walking the blocks backwards fills dskips
        # from the front.
        dskips = [None] * n_skips
        start = 0
        for block in reversed(list(self.up_blocks)):
            if block.has_cross_attention:
                dh, block_dskips, dt, dc = block.backward(dh)
                dcontext += dc
            else:
                dh, block_dskips, dt = block.backward(dh)
            dtemb = dt if dtemb is None else dtemb + dt
            dskips[start:start + len(block_dskips)] = block_dskips  # in the order the block got them
            start += len(block_dskips)

        # 3. bottleneck, reversed
        if self.has_mid_block:
            dh, dt, dc = self.mid_block.backward(dh)
            dtemb = dtemb + dt
            dcontext += dc

        # 2. down path, reversed. A down block's outputs were its h and its skips; the skips'
        # gradients come from the up path (dskips), and the block adds them where each was made.
        end = n_skips
        for block in reversed(list(self.down_blocks)):
            n_block = block.num_skips  # one per resnet, plus the downsampled h
            block_dskips = dskips[end - n_block:end]
            if block.has_cross_attention:
                dh, dt, dc = block.backward(dh, block_dskips)
                dcontext += dc
            else:
                dh, dt = block.backward(dh, block_dskips)
            dtemb = dtemb + dt
            end -= n_block
        # conv_in's output h0 = skips[0] went into the first down block and into the last up block
        assert end == 1
        dh = dh + dskips[0]  # (B, H, W, C0): the two gradients of h0 add up
        dsample = self.conv_in.backward(dh)  # (B, H, W, in)

        # 1. time embedding, reversed (the timesteps themselves get no gradient)
        self.time_embedding.backward(dtemb)
        if self.center_input_sample:
            dsample *= 2.0  # sample' = 2 * sample - 1
        return dsample, dcontext

    def __repr__(self) -> str:
        return (
            f"UNet2DConditionModel(block_out_channels={self.config['block_out_channels']}, "
            f"{self.num_parameters():,} parameters)"
        )
