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

Configuration: a :class:`~diffusion_np.models.config.UNetConfig` (diffusers' field
names, validated when it is made), or its fields as keyword arguments; parameter names
are diffusers' ``state_dict`` keys (conv weights in our (kh, kw, C_in, C_out) layout).
diffusers' ``attention_head_dim`` is the *number of heads* (see models/config.py).
:meth:`UNet2DConditionModel.from_config` reads a diffusers ``config.json``; the fields
it refuses or ignores are listed in :mod:`diffusion_np.io.diffusers_config`.

Left out on purpose (a ValueError names the field): class and additional
embeddings (SDXL), encoder_hid_proj, time-conditioning projections,
the scale-shift time-embedding norm, dual / only cross-attention, GLIGEN,
Fourier time embeddings, attention masks, ControlNet/T2I-adapter residuals,
and image sides that are not divisible by 2 per level (diffusers' upsample_size).
"""

from __future__ import annotations

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, get_xp
from diffusion_np.models.config import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, UNetConfig, given_config
from diffusion_np.models.unet_blocks import DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D
from diffusion_np.nn.activation import silu_backward, silu_forward
from diffusion_np.nn.conv import Conv2d
from diffusion_np.nn.embedding import TimestepEmbedding, Timesteps
from diffusion_np.nn.module import BlockGrads, Module, ModuleList
from diffusion_np.nn.norm import GroupNorm
from diffusion_np.nn.validate import check_features, check_finite, check_image


class UNet2DConditionModel(Module):
    """Noise prediction network ``eps(x_t, t, c)``, channels-last.

    ``forward(sample (B, H, W, in_channels), timestep (B,) or scalar,
    encoder_hidden_states (B, L, cross_attention_dim)) -> (B, H, W, out_channels)``;
    ``backward(dout) -> BlockGrads(dx=dsample, dcontext=dencoder_hidden_states)`` and adds
    every parameter gradient into ``grads``. H and W must be divisible by ``2 ** (levels - 1)``.

    ``UNet2DConditionModel(UNetConfig(...))``, or the config's fields as keyword arguments
    (diffusers' names and defaults: the Stable Diffusion 1.x network). ``config`` is then
    the dict of every field, which a checkpoint stores and :meth:`from_config` reads back.
    ``attention_head_dim`` is the number of heads (see the module docstring).
    ``rng`` seeds the PyTorch-style initialisation; ``dtype`` the parameters.
    """

    def __init__(self, config: UNetConfig | None = None, *, rng=None, dtype=DEFAULT_DTYPE, **fields):
        super().__init__()
        config = _config(config, fields)
        rng = rng if rng is not None else np.random.default_rng(0)
        self.config = config.to_dict()  # a plain dict, as diffusers' model.config: what checkpoints store
        c, n = config, config.num_levels
        channels = c.block_out_channels
        heads = c.per_level("attention_head_dim")  # diffusers' name: it is the number of heads
        layers = c.per_level("layers_per_block")
        t_layers = c.per_level("transformer_layers_per_block")
        groups, eps = c.norm_num_groups, c.norm_eps
        self.in_channels, self.out_channels = c.in_channels, c.out_channels
        self.cross_attention_dim = c.cross_attention_dim
        self.center_input_sample = c.center_input_sample
        self.num_upsamplers = n - 1  # every level but the last halves H and W

        # input and time embedding
        k_in, k_out = c.conv_in_kernel, c.conv_out_kernel
        self.conv_in = Conv2d(c.in_channels, channels[0], k_in, padding=(k_in - 1) // 2, rng=rng, dtype=dtype)
        time_embed_dim = c.time_embedding_dim or 4 * channels[0]
        self.time_proj = Timesteps(channels[0], c.flip_sin_to_cos, c.freq_shift)  # no parameters
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim, rng=rng, dtype=dtype)
        attention = dict(cross_attention_dim=c.cross_attention_dim, use_linear_projection=c.use_linear_projection)

        # down path: "CrossAttnDownBlock2D" is a DownBlock2D with cross-attention
        self.down_blocks = ModuleList()
        out_ch = channels[0]
        for i, kind in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            self.down_blocks.append(DownBlock2D(
                in_ch, out_ch, time_embed_dim, num_layers=layers[i], resnet_eps=eps, resnet_groups=groups,
                dropout=c.dropout, add_downsample=i < n - 1, downsample_padding=c.downsample_padding,
                cross_attention=DOWN_BLOCK_TYPES[kind], transformer_layers_per_block=t_layers[i],
                num_attention_heads=heads[i], **attention, rng=rng, dtype=dtype,
            ))

        # bottleneck
        self.has_mid_block = c.mid_block_type is not None
        if self.has_mid_block:
            self.mid_block = UNetMidBlock2DCrossAttn(
                channels[-1], time_embed_dim, transformer_layers_per_block=t_layers[-1], resnet_eps=eps,
                resnet_groups=groups, num_attention_heads=heads[-1], dropout=c.dropout,
                output_scale_factor=c.mid_block_scale_factor, **attention, rng=rng, dtype=dtype,
            )

        # up path: levels in reverse; each block has one resnet more than its down block
        self.up_blocks = ModuleList()
        rev_channels = list(reversed(channels))
        rev_heads, rev_layers, rev_t_layers = heads[::-1], layers[::-1], t_layers[::-1]
        out_ch = rev_channels[0]
        for i, kind in enumerate(c.up_block_types):
            prev_ch, out_ch = out_ch, rev_channels[i]
            in_ch = rev_channels[min(i + 1, n - 1)]  # channels of the skips from the level below
            self.up_blocks.append(UpBlock2D(
                in_ch, prev_ch, out_ch, time_embed_dim, num_layers=rev_layers[i] + 1, resnet_eps=eps,
                resnet_groups=groups, dropout=c.dropout, add_upsample=i < n - 1,
                cross_attention=UP_BLOCK_TYPES[kind], transformer_layers_per_block=rev_t_layers[i],
                num_attention_heads=rev_heads[i], **attention, rng=rng, dtype=dtype,
            ))

        # output
        self.conv_norm_out = GroupNorm(groups, channels[0], eps=eps, dtype=dtype)
        self.conv_out = Conv2d(channels[0], c.out_channels, k_out, padding=(k_out - 1) // 2, rng=rng, dtype=dtype)

    # ------------------------------------------------------------------ forward / backward
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
            h, block_skips = block(h, temb, context if block.has_cross_attention else None)
            skips.extend(block_skips)  # one (B, H_l, W_l, C_l) per resnet, plus the downsampled h

        # 3. bottleneck
        if self.has_mid_block:
            h = self.mid_block(h, temb, context)  # (B, H / 2^(n-1), W / 2^(n-1), C_last)

        # 4. up path: each block takes the last len(block.resnets) skips (the newest first)
        n_skips = len(skips)
        for block in self.up_blocks:
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            h = block(h, block_skips, temb, context if block.has_cross_attention else None)
        assert not skips, "every skip is used by exactly one up block"

        # 5. output head
        h = self.conv_norm_out(h)  # (B, H, W, C0)
        h, silu_cache = silu_forward(h)
        out = self.conv_out(h)  # (B, H, W, C0) -> (B, H, W, out)
        self._set_cache((silu_cache, n_skips, tuple(context.shape)))
        return out

    def backward(self, dout):
        """Gradients of :meth:`forward`; returns ``BlockGrads(dx=dsample, dcontext=dencoder_hidden_states)``."""
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
            g = block.backward(dh)
            dh = g.dx
            if block.has_cross_attention:
                dcontext += g.dcontext
            dtemb = g.dtemb if dtemb is None else dtemb + g.dtemb
            dskips[start:start + len(g.dskips)] = g.dskips  # in the order the block got them
            start += len(g.dskips)

        # 3. bottleneck, reversed
        if self.has_mid_block:
            g = self.mid_block.backward(dh)
            dh = g.dx
            dtemb = dtemb + g.dtemb
            dcontext += g.dcontext

        # 2. down path, reversed. A down block's outputs were its h and its skips; the skips'
        # gradients come from the up path (dskips), and the block adds them where each was made.
        end = n_skips
        for block in reversed(list(self.down_blocks)):
            n_block = block.num_skips  # one per resnet, plus the downsampled h
            g = block.backward(dh, dskips[end - n_block:end])
            dh = g.dx
            if block.has_cross_attention:
                dcontext += g.dcontext
            dtemb = dtemb + g.dtemb
            end -= n_block
        # conv_in's output h0 = skips[0] went into the first down block and into the last up block
        assert end == 1
        dh = dh + dskips[0]  # (B, H, W, C0): the two gradients of h0 add up
        dsample = self.conv_in.backward(dh)  # (B, H, W, in)

        # 1. time embedding, reversed (the timesteps themselves get no gradient)
        self.time_embedding.backward(dtemb)
        if self.center_input_sample:
            dsample *= 2.0  # sample' = 2 * sample - 1
        return BlockGrads(dsample, dcontext=dcontext)

    # ------------------------------------------------------------------ configuration and input checks
    @classmethod
    def from_config(cls, config: dict, rng=None, dtype=DEFAULT_DTYPE) -> UNet2DConditionModel:
        """Build from a diffusers config dict (e.g. a parsed ``unet/config.json``) or a saved ``config``.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are
        skipped; unknown or unsupported fields raise a ValueError naming them.
        """
        return cls(_config(None, config), rng=rng, dtype=dtype)

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

    def __repr__(self) -> str:
        return (
            f"UNet2DConditionModel(block_out_channels={self.config['block_out_channels']}, "
            f"{self.num_parameters():,} parameters)"
        )


def _config(config: UNetConfig | None, fields: dict) -> UNetConfig:
    """The constructor's config: the UNetConfig given, or one made from diffusers' field names.

    A diffusers config has fields we refuse or ignore; their tables are in the io layer
    (:mod:`diffusion_np.io.diffusers_config`), imported here on first use.
    """
    if config is not None:
        return given_config("UNet2DConditionModel", UNetConfig, config, fields)
    # imported on first use: at the top it would run io/__init__.py, which imports io.diffusers,
    # which imports this module (an import cycle through the package)
    from diffusion_np.io.diffusers_config import unet_config

    return unet_config(fields)
