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

A ControlNet (Zhang et al. 2023, :mod:`diffusion_np.models.controlnet`) steers this
network through two optional inputs, diffusers' ``down_block_additional_residuals``
(one tensor per skip) and ``mid_block_additional_residual``::

    skips[j] <- skips[j] + down_block_additional_residuals[j]     after the whole down path
    h        <- mid_block(h, temb, c) + mid_block_additional_residual

so only the up path sees them. Their gradients are what the up path sends to each skip
and to the bottleneck's output: ``backward`` returns them as ``BlockGrads.dskips`` and
``BlockGrads.dmid``, and the ControlNet's own backward takes it from there.

Configuration: a :class:`~diffusion_np.models.config.UNetConfig` (diffusers' field
names, validated when it is made), or its fields as keyword arguments; parameter names
are diffusers' ``state_dict`` keys (conv weights in our (kh, kw, C_in, C_out) layout).
diffusers' ``attention_head_dim`` is the *number of heads* (see models/config.py).
:meth:`UNet2DConditionModel.from_config` reads a diffusers ``config.json``; the fields
it refuses or ignores are listed in :mod:`diffusion_np.io.diffusers_config`.

Left out on purpose (a ValueError names the field): class and additional
embeddings (SDXL), encoder_hid_proj, time-conditioning projections,
the scale-shift time-embedding norm, dual / only cross-attention, GLIGEN,
Fourier time embeddings, attention masks, T2I-adapter residuals,
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
from diffusion_np.nn.validate import check_features, check_image, check_input_finite


class UNet2DConditionModel(Module):
    """Noise prediction network ``eps(x_t, t, c)``, channels-last.

    ``forward(sample (B, H, W, in_channels), timestep (B,) or scalar,
    encoder_hidden_states (B, L, cross_attention_dim)) -> (B, H, W, out_channels)``;
    ``backward(dout) -> BlockGrads(dx=dsample, dcontext=dencoder_hidden_states)`` and adds
    every parameter gradient into ``grads``. H and W must be divisible by ``2 ** (levels - 1)``.
    With a ControlNet's residuals (``forward(..., down_block_additional_residuals,
    mid_block_additional_residual)``, see the module docstring) ``backward`` also returns
    their gradients, as ``dskips`` and ``dmid``.

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

        # down path and bottleneck (a ControlNet builds its copy of them with the same function)
        self.down_blocks, mid_block = build_encoder(c, time_embed_dim, rng, dtype)
        self.has_mid_block = mid_block is not None
        if self.has_mid_block:
            self.mid_block = mid_block

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
    def forward(self, sample, timestep, encoder_hidden_states, down_block_additional_residuals=None,
                mid_block_additional_residual=None):
        check_sample_and_context(self, sample, encoder_hidden_states)
        controlled = self._check_residuals(sample, down_block_additional_residuals, mid_block_additional_residual)
        xp = get_xp(sample)
        B = sample.shape[0]
        context = encoder_hidden_states  # (B, L, D): the text tokens every transformer attends to
        if self.center_input_sample:
            sample = 2.0 * sample - 1.0

        # 1. time embedding: sinusoidal features (float32, as diffusers) -> MLP
        t_emb = self.time_proj(batch_timesteps(self, timestep, B, xp)).astype(sample.dtype)  # (B, C0)
        temb = self.time_embedding(t_emb)  # (B, 4 * C0)

        # 2. down path; every tensor in `skips` waits for an up block
        h = self.conv_in(sample)  # (B, H, W, in) -> (B, H, W, C0)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context if block.has_cross_attention else None)
            skips.extend(block_skips)  # one (B, H_l, W_l, C_l) per resnet, plus the downsampled h
        if controlled:  # ControlNet: its residuals join the skips, which only the up path reads
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]

        # 3. bottleneck
        if self.has_mid_block:
            h = self.mid_block(h, temb, context)  # (B, H / 2^(n-1), W / 2^(n-1), C_last)
        if controlled:
            h = h + mid_block_additional_residual  # ControlNet: and the bottleneck's output

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
        self._set_cache((silu_cache, n_skips, tuple(context.shape), controlled))
        return out

    def backward(self, dout, residuals_only: bool = False):
        """Gradients of :meth:`forward`; returns ``BlockGrads(dx=dsample, dcontext=dencoder_hidden_states)``,
        and with ControlNet residuals ``dskips`` and ``dmid``, their gradients.

        ``residuals_only=True`` (a frozen U-Net under a ControlNet being trained) stops once the
        residuals' gradients are known: they entered after the down path and the bottleneck, so
        the up path alone decides them, and the rest of the backward would only feed the frozen
        encoder and the inputs. ``dx`` and ``dcontext`` are then None.
        """
        silu_cache, n_skips, context_shape, controlled = self._pop_cache()
        if residuals_only and not controlled:
            raise ValueError("UNet2DConditionModel.backward(residuals_only=True) needs a forward with ControlNet "
                             "residuals")
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

        # 3. bottleneck, reversed. h + mid_block_additional_residual: the residual's gradient is dh itself
        dmid = dh if controlled else None
        if residuals_only:  # the frozen encoder's caches are simply replaced by the next forward
            return BlockGrads(None, dskips=tuple(dskips), dmid=dmid)
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
        # the residuals added to skips[j] have the gradient the up path sent to skips[j]
        dresiduals = tuple(dskips) if controlled else None
        return BlockGrads(dsample, dcontext=dcontext, dskips=dresiduals, dmid=dmid)

    # ------------------------------------------------------------------ configuration and input checks
    @classmethod
    def from_config(cls, config: dict, rng=None, dtype=DEFAULT_DTYPE) -> UNet2DConditionModel:
        """Build from a diffusers config dict (e.g. a parsed ``unet/config.json``) or a saved ``config``.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are
        skipped; unknown or unsupported fields raise a ValueError naming them.
        """
        return cls(_config(None, config), rng=rng, dtype=dtype)

    def _check_residuals(self, sample, down_residuals, mid_residual) -> bool:
        """Are ControlNet residuals given? Both or neither, one per skip, each shaped like what it is added to."""
        if down_residuals is None and mid_residual is None:
            return False
        if down_residuals is None or mid_residual is None:
            raise ValueError(
                "UNet2DConditionModel: give both down_block_additional_residuals and mid_block_additional_residual "
                "(a ControlNet's two outputs), or neither"
            )
        B, H, W, _ = sample.shape
        expected = [(B, H // f, W // f, c) for f, c in skip_shapes(self.conv_in, self.down_blocks)]
        if len(down_residuals) != len(expected):
            raise ValueError(
                f"UNet2DConditionModel has {len(expected)} skip connections, so down_block_additional_residuals "
                f"needs {len(expected)} tensors; got {len(down_residuals)}"
            )
        for j, (r, shape) in enumerate(zip(down_residuals, expected)):
            if tuple(r.shape) != shape:
                raise ValueError(f"UNet2DConditionModel: down_block_additional_residuals[{j}] must have the shape "
                                 f"of skip {j}, {shape}; got {tuple(r.shape)}")
        f = 2**self.num_upsamplers
        mid_shape = (B, H // f, W // f, self.config["block_out_channels"][-1])
        if tuple(mid_residual.shape) != mid_shape:
            raise ValueError(f"UNet2DConditionModel: mid_block_additional_residual must have the shape of the "
                             f"mid block's output, {mid_shape}; got {tuple(mid_residual.shape)}")
        return True

    def __repr__(self) -> str:
        return (
            f"UNet2DConditionModel(block_out_channels={self.config['block_out_channels']}, "
            f"{self.num_parameters():,} parameters)"
        )


def batch_timesteps(model: Module, timestep, batch: int, xp):
    """A scalar, (), (1,) or (B,) timestep -> a (B,) array on the sample's device (``model`` names errors)."""
    name = type(model).__name__
    t = xp.asarray(timestep)
    if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
        raise TypeError(f"{name} expects integer or float timesteps, got {t.dtype}")
    if t.ndim == 0 or t.shape == (1,):
        return xp.broadcast_to(t.reshape(1), (batch,))
    if t.shape != (batch,):
        raise ValueError(f"{name} expects timestep as a scalar or of shape (B,) with B={batch}, got {tuple(t.shape)}")
    return t


def check_sample_and_context(model: Module, sample, encoder_hidden_states) -> None:
    """The checks of a U-Net's (or a ControlNet's) ``sample`` and ``encoder_hidden_states``: channels,
    sides divisible by ``2 ** model.num_upsamplers``, text width ``model.cross_attention_dim``, finite."""
    name = type(model).__name__
    check_image(model, sample, model.in_channels, what="sample")
    check_input_finite(model, sample, "sample")
    B, H, W, _ = sample.shape
    factor = 2**model.num_upsamplers
    if H % factor or W % factor:
        raise ValueError(
            f"{name} with {model.num_upsamplers + 1} levels needs H and W divisible by {factor}, "
            f"got sample of shape {tuple(sample.shape)}"
        )
    check_features(model, encoder_hidden_states, model.cross_attention_dim, min_ndim=3, what="encoder_hidden_states")
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != B:
        raise ValueError(
            f"{name} expects encoder_hidden_states of shape (B={B}, L, {model.cross_attention_dim}), "
            f"got {tuple(encoder_hidden_states.shape)}"
        )
    check_input_finite(model, encoder_hidden_states, "encoder_hidden_states")


def skip_shapes(conv_in: Conv2d, down_blocks) -> list[tuple[int, int]]:
    """(downsampling factor, channels) of every skip tensor of a down path, in the order it makes them:
    conv_in's output, then one per resnet of each level and its downsampled output."""
    shapes = [(1, conv_in.out_channels)]
    for level, block in enumerate(down_blocks):
        shapes += [(2**level, block.out_channels)] * len(block.resnets)
        if block.add_downsample:
            shapes.append((2 ** (level + 1), block.out_channels))
    return shapes


def build_encoder(c: UNetConfig, time_embed_dim: int, rng, dtype) -> tuple[ModuleList, UNetMidBlock2DCrossAttn | None]:
    """The down path and the bottleneck of a U-Net of config ``c``: ``(down_blocks, mid_block or None)``.

    The U-Net builds its own with this function, and a ControlNet builds its trainable copy
    with it too (:mod:`diffusion_np.models.controlnet`): the same blocks, the same names.
    "CrossAttnDownBlock2D" is a DownBlock2D with cross-attention; every level but the last
    ends with a stride-2 downsampler.
    """
    channels, n = c.block_out_channels, c.num_levels
    heads = c.per_level("attention_head_dim")  # diffusers' name: it is the number of heads
    layers = c.per_level("layers_per_block")
    t_layers = c.per_level("transformer_layers_per_block")
    groups, eps = c.norm_num_groups, c.norm_eps
    attention = dict(cross_attention_dim=c.cross_attention_dim, use_linear_projection=c.use_linear_projection)
    down_blocks = ModuleList()
    out_ch = channels[0]
    for i, kind in enumerate(c.down_block_types):
        in_ch, out_ch = out_ch, channels[i]
        down_blocks.append(DownBlock2D(
            in_ch, out_ch, time_embed_dim, num_layers=layers[i], resnet_eps=eps, resnet_groups=groups,
            dropout=c.dropout, add_downsample=i < n - 1, downsample_padding=c.downsample_padding,
            cross_attention=DOWN_BLOCK_TYPES[kind], transformer_layers_per_block=t_layers[i],
            num_attention_heads=heads[i], **attention, rng=rng, dtype=dtype,
        ))
    mid_block = None
    if c.mid_block_type is not None:
        mid_block = UNetMidBlock2DCrossAttn(
            channels[-1], time_embed_dim, transformer_layers_per_block=t_layers[-1], resnet_eps=eps,
            resnet_groups=groups, num_attention_heads=heads[-1], dropout=c.dropout,
            output_scale_factor=c.mid_block_scale_factor, **attention, rng=rng, dtype=dtype,
        )
    return down_blocks, mid_block


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
