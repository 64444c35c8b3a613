"""ControlNet (diffusers' ``ControlNetModel``): a trainable copy of the U-Net's encoder that steers a frozen U-Net.

Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models", Eq. 2: a frozen block ``F(x; Theta)`` gets a trainable copy ``F(x; Theta_c)``
joined to it by two zero-initialised 1x1 convolutions ``Z``::

    y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2)                  (Eq. 2)

For Stable Diffusion (their Sec. 3.2, Fig. 3) the copied block is the U-Net's whole
encoder, its down path and middle block, and each of the copy's outputs is added
to a skip connection or to the middle block's output of the frozen U-Net. In code::

    temb  = time_embedding(sinusoidal(t))                   the copy's own, as the U-Net's
    h     = conv_in(x_t) + controlnet_cond_embedding(c)     Z1: the embedding's conv_out starts at 0
    skips = [h];  down blocks (copies) append to skips;  h = mid_block(h, temb, text)
    down_res[j] = s * controlnet_down_blocks[j](skips[j])   Z2: one zero 1x1 conv per skip
    mid_res     = s * controlnet_mid_block(h)               ... and one for the middle
    eps   = unet(x_t, t, text, down_block_additional_residuals=down_res,
                 mid_block_additional_residual=mid_res)     the frozen U-Net (models/unet.py)

``s`` is ``conditioning_scale`` (1 in training; at sampling it sets how strongly the
control image binds). ``c`` is the control image at the *image* resolution (an edge map,
a mask, a pose...), in [0, 1]; :class:`ControlNetConditioningEmbedding` brings it down to
the latent resolution with a few strided convolutions (the paper's "tiny network E").

Why zeros (the paper's Sec. 3.1): at initialisation every residual is exactly 0, so the
controlled U-Net *is* the base model, and training starts from a model that already
works instead of from noise injected into it. Zero weights still learn: a zero conv's
weight gradient is ``x^T dout`` with ``x`` the copy's (non-zero) features, so Z moves on
the first step; only the gradient that flows *through* Z into the copy (``dout W^T``) is
zero until then. The copy starts as the base encoder (:meth:`ControlNetModel.from_unet`).

Parameter names are diffusers' (``controlnet_cond_embedding.blocks.0.weight``,
``controlnet_down_blocks.3.weight``, ``controlnet_mid_block.weight``, and the encoder's
``down_blocks.*`` and ``mid_block.*`` exactly as the U-Net's), so a diffusers ControlNet
state dict maps onto ours by name (:func:`diffusion_np.io.diffusers.load_controlnet`).
The down path and middle block are the U-Net's own classes, built by
:func:`~diffusion_np.models.unet.build_encoder`.

The backward runs in reverse: the frozen U-Net's backward hands back the gradient of
every residual (``BlockGrads.dskips``, ``.dmid``); :meth:`ControlNetModel.backward`
takes them through the zero convs into the copy, where each skip's gradient joins
the down path's as in the U-Net, and on into ``conv_in`` and the conditioning embedding.

Left out on purpose: guess mode (log-spaced scales over the residuals), global pooling
of the conditions, several ControlNets at once (their residuals would simply add),
class/addition embeddings (SDXL), and the UNetMidBlock2D (no attention) middle block.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, device_of, get_xp
from diffusion_np.models.config import ControlNetConfig, given_config
from diffusion_np.models.unet import (
    UNet2DConditionModel,
    batch_timesteps,
    build_encoder,
    check_sample_and_context,
    skip_shapes,
)
from diffusion_np.nn.activation import silu_backward, silu_forward
from diffusion_np.nn.conv import Conv2d
from diffusion_np.nn.embedding import TimestepEmbedding, Timesteps
from diffusion_np.nn.module import BlockGrads, Module, ModuleList
from diffusion_np.nn.validate import check_image, check_input_finite

__all__ = ["ControlNetConditioningEmbedding", "ControlNetModel"]


def _zero_conv(in_channels: int, out_channels: int, kernel_size: int, rng, dtype, padding: int = 0) -> Conv2d:
    """A convolution whose weight and bias start at exactly 0 (the paper's "zero convolution")."""
    conv = Conv2d(in_channels, out_channels, kernel_size, padding=padding, rng=rng, dtype=dtype)
    for value in conv.params.values():
        value[...] = 0
    return conv


class ControlNetConditioningEmbedding(Module):
    """The control image -> features at the latent resolution (diffusers' ``ControlNetConditioningEmbedding``).

    ``conv_in`` (3x3, ``conditioning_channels -> block_out_channels[0]``), then for each next
    width a 3x3 conv and a stride-2 3x3 conv (``blocks.2i``, ``blocks.2i+1``), SiLU after every
    one of them, and ``conv_out`` (3x3, to ``conditioning_embedding_channels``) initialised at 0::

        e = silu(conv_in(c));  for each conv in blocks: e = silu(conv(e));  out = conv_out(e)

    ``forward(c (B, H, W, conditioning_channels)) -> (B, H / f, W / f, conditioning_embedding_channels)``
    with ``f = 2 ** (len(block_out_channels) - 1)``; ``backward(dout) -> dc``.
    """

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int = 3,
                 block_out_channels: tuple = (16, 32, 96, 256), rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.conditioning_channels = conditioning_channels
        self.downscale = 2 ** (len(block_out_channels) - 1)
        self.conv_in = Conv2d(conditioning_channels, block_out_channels[0], 3, padding=1, rng=rng, dtype=dtype)
        self.blocks = ModuleList()
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            self.blocks.append(Conv2d(c_in, c_in, 3, padding=1, rng=rng, dtype=dtype))
            self.blocks.append(Conv2d(c_in, c_out, 3, padding=1, stride=2, rng=rng, dtype=dtype))  # H, W halve
        self.conv_out = _zero_conv(block_out_channels[-1], conditioning_embedding_channels, 3, rng, dtype, padding=1)

    def forward(self, conditioning):
        check_image(self, conditioning, self.conditioning_channels, what="controlnet_cond")
        silu_caches = []
        e, cache = silu_forward(self.conv_in(conditioning))  # (B, H, W, C_cond) -> (B, H, W, ch[0])
        silu_caches.append(cache)
        for conv in self.blocks:
            e, cache = silu_forward(conv(e))  # every second conv halves H and W
            silu_caches.append(cache)
        self._set_cache(silu_caches)
        return self.conv_out(e)  # (B, H / f, W / f, conditioning_embedding_channels)

    def backward(self, dout):
        silu_caches = self._pop_cache()
        de = self.conv_out.backward(dout)
        for conv, cache in zip(reversed(list(self.blocks)), reversed(silu_caches[1:])):
            de = conv.backward(silu_backward(de, cache))
        return self.conv_in.backward(silu_backward(de, silu_caches[0]))  # (B, H, W, C_cond)


class ControlNetModel(Module):
    """A ControlNet: residuals for a frozen :class:`~diffusion_np.models.UNet2DConditionModel` (module docstring).

    ``forward(sample (B, h, w, in_channels), timestep, encoder_hidden_states (B, L, D),
    controlnet_cond (B, h * f, w * f, conditioning_channels), conditioning_scale=1.0)
    -> (down_block_res_samples, mid_block_res_sample)``: a tuple with one tensor per skip of
    the U-Net and one tensor for its middle, already times ``conditioning_scale``; hand them
    to the U-Net's ``forward`` as ``down_block_additional_residuals`` and
    ``mid_block_additional_residual``. ``f`` is ``config.conditioning_downscale``.

    ``backward(ddown, dmid) -> BlockGrads(dx=dsample, dcontext=dencoder_hidden_states,
    dcond=dcontrolnet_cond)`` takes the residuals' gradients (the U-Net's ``g.dskips``,
    ``g.dmid``) and adds every parameter gradient into ``grads``.

    Build it from a U-Net with :meth:`from_unet` (the copy starts as that U-Net's encoder),
    from a :class:`~diffusion_np.models.config.ControlNetConfig` or its fields (diffusers'
    names and defaults), or from a diffusers ``config.json`` with :meth:`from_config`.
    """

    def __init__(self, config: ControlNetConfig | None = None, *, rng=None, dtype=DEFAULT_DTYPE, **fields):
        super().__init__()
        config = _config(config, fields)
        rng = rng if rng is not None else np.random.default_rng(0)
        self.config = config.to_dict()  # a plain dict, as diffusers' model.config: what checkpoints store
        c, channels = config, config.block_out_channels
        self.in_channels, self.conditioning_channels = c.in_channels, c.conditioning_channels
        self.cross_attention_dim = c.cross_attention_dim
        self.num_upsamplers = c.num_levels - 1  # the U-Net's name: the sample's sides halve this many times
        self.conditioning_downscale = c.conditioning_downscale
        self.bgr = c.controlnet_conditioning_channel_order == "bgr"

        # 1. the U-Net's input layers: conv_in, the time embedding (diffusers' ControlNet: always 4 x C0 wide)
        self.conv_in = Conv2d(c.in_channels, channels[0], 3, padding=1, rng=rng, dtype=dtype)
        time_embed_dim = 4 * channels[0]
        self.time_proj = Timesteps(channels[0], c.flip_sin_to_cos, c.freq_shift)  # no parameters
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim, rng=rng, dtype=dtype)
        # 2. the control image's encoder, ending in a zero conv (Z1 of Eq. 2)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], c.conditioning_channels, c.conditioning_embedding_out_channels, rng=rng, dtype=dtype)
        # 3. the trainable copy: the U-Net's down path and middle block, built as the U-Net builds them
        self.down_blocks, self.mid_block = build_encoder(c.unet_config(), time_embed_dim, rng, dtype)
        # 4. one zero 1x1 conv per skip and one for the middle (Z2 of Eq. 2)
        self.controlnet_down_blocks = ModuleList([
            _zero_conv(ch, ch, 1, rng, dtype) for _, ch in skip_shapes(self.conv_in, self.down_blocks)
        ])
        self.controlnet_mid_block = _zero_conv(channels[-1], channels[-1], 1, rng, dtype)

    # ------------------------------------------------------------------ forward / backward
    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale: float = 1.0):
        check_sample_and_context(self, sample, encoder_hidden_states)
        scale = self._check_cond(sample, controlnet_cond, conditioning_scale)
        xp = get_xp(sample)
        B = sample.shape[0]
        context = encoder_hidden_states  # (B, L, D)
        if self.bgr:  # diffusers flips a "bgr" ControlNet's control image to rgb first
            controlnet_cond = controlnet_cond[..., ::-1]

        # 1. time embedding, as the U-Net's (the copy has its own weights)
        t_emb = self.time_proj(batch_timesteps(self, timestep, B, xp)).astype(sample.dtype)  # (B, C0)
        temb = self.time_embedding(t_emb)  # (B, 4 * C0)

        # 2. x + Z1(c): the latent and the control image's features, at the latent resolution
        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)  # (B, h, w, C0)

        # 3. the copied encoder: every tensor in `skips` gets a zero conv, as the U-Net's skips get an up block
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context if block.has_cross_attention else None)
            skips.extend(block_skips)
        h = self.mid_block(h, temb, context)  # (B, h / 2^(n-1), w / 2^(n-1), C_last)

        # 4. Z2: zero 1x1 convs, then the conditioning scale
        down = tuple(scale * conv(s) for conv, s in zip(self.controlnet_down_blocks, skips))  # shapes of the skips
        mid = scale * self.controlnet_mid_block(h)
        self._set_cache((scale, len(skips), tuple(context.shape)))
        return down, mid

    def backward(self, ddown, dmid):
        """Gradients of :meth:`forward` from those of its two outputs (the U-Net's ``g.dskips``, ``g.dmid``);
        returns ``BlockGrads(dx=dsample, dcontext=dencoder_hidden_states, dcond=dcontrolnet_cond)``."""
        scale, n_skips, context_shape = self._pop_cache()
        if len(ddown) != n_skips:
            raise ValueError(f"ControlNetModel.backward expects {n_skips} down-residual gradients, got {len(ddown)}")
        xp = get_xp(dmid)
        dcontext = xp.zeros(context_shape, dtype=dmid.dtype)  # every transformer of the copy read the text

        # 4. the scale and the zero convs, reversed: each skip's gradient, and the middle's
        dskips = [conv.backward(scale * d) for conv, d in zip(self.controlnet_down_blocks, ddown)]
        dh = self.controlnet_mid_block.backward(scale * dmid)

        # 3. the copied encoder, reversed as in the U-Net: each down block adds its skips' gradients
        g = self.mid_block.backward(dh)
        dh, dtemb = g.dx, g.dtemb
        dcontext += g.dcontext
        end = n_skips
        for block in reversed(list(self.down_blocks)):
            g = block.backward(dh, dskips[end - block.num_skips:end])
            dh, dtemb = g.dx, dtemb + g.dtemb
            if block.has_cross_attention:
                dcontext += g.dcontext
            end -= block.num_skips
        dh = dh + dskips[0]  # h = skips[0] went into the first down block and into zero conv 0

        # 2. h = conv_in(sample) + embedding(c): both branches receive dh
        dsample = self.conv_in.backward(dh)  # (B, h, w, in_channels)
        dcond = self.controlnet_cond_embedding.backward(dh)  # (B, H, W, conditioning_channels)
        if self.bgr:
            dcond = dcond[..., ::-1]

        # 1. time embedding, reversed (the timesteps get no gradient)
        self.time_embedding.backward(dtemb)
        return BlockGrads(dsample, dcontext=dcontext, dcond=dcond)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, conditioning_channels: int = 3,
                  conditioning_embedding_out_channels: tuple = (16, 32, 96, 256),
                  controlnet_conditioning_channel_order: str = "rgb", load_weights_from_unet: bool = True,
                  rng=None) -> ControlNetModel:
        """A ControlNet for ``unet`` (diffusers' ``ControlNetModel.from_unet``): its config, and with
        ``load_weights_from_unet`` a copy of its ``conv_in``, time embedding, down path and middle block.

        The zero convs and the conditioning embedding are new (the embedding's first layers
        drawn from ``rng``); the result lives on the U-Net's device, in its dtype.
        """
        u = unet.config
        layers = u["layers_per_block"]
        if isinstance(layers, (list, tuple)):
            if len(set(layers)) != 1:
                raise ValueError(f"ControlNetModel.from_unet: a ControlNet has one layers_per_block for every level "
                                 f"(as diffusers'), but the U-Net has {tuple(layers)}")
            layers = layers[0]
        problems = [f"{k}={u.get(k)!r}" for k, ok in (("time_embedding_dim", (None, 4 * u["block_out_channels"][0])),
                                                     ("conv_in_kernel", (3,)),
                                                     ("mid_block_type", ("UNetMidBlock2DCrossAttn",)))
                    if u.get(k) not in ok]
        if problems:
            raise ValueError("ControlNetModel.from_unet: diffusers' ControlNet cannot copy a U-Net with "
                             + ", ".join(problems))
        shared = {k: u[k] for k in ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
                                    "mid_block_type", "only_cross_attention", "block_out_channels",
                                    "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups",
                                    "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
                                    "attention_head_dim", "use_linear_projection")}
        config = ControlNetConfig(**shared, layers_per_block=layers, conditioning_channels=conditioning_channels,
                                  conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                                  controlnet_conditioning_channel_order=controlnet_conditioning_channel_order)
        weight = unet.conv_in.weight
        controlnet = cls(config, rng=rng, dtype=weight.dtype)
        if load_weights_from_unet:
            copied = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")
            state = {k: v for k, v in unet.state_dict().items() if k.startswith(copied)}
            controlnet.load_state_dict(state, strict=False)
        return controlnet.to(device_of(weight))

    @classmethod
    def from_config(cls, config: dict, rng=None, dtype=DEFAULT_DTYPE) -> ControlNetModel:
        """Build from a diffusers ControlNet ``config.json`` (parsed) or a saved ``config``; keys starting
        with ``_`` are skipped, unknown or unsupported fields raise a ValueError naming them."""
        return cls(_config(None, config), rng=rng, dtype=dtype)

    # ------------------------------------------------------------------ input checks
    def _check_cond(self, sample, controlnet_cond, conditioning_scale) -> float:
        """The control image must be (B, h * f, w * f, conditioning_channels) and finite; the scale a finite number."""
        if isinstance(conditioning_scale, bool) or not isinstance(conditioning_scale, (int, float, np.number)):
            raise TypeError(f"ControlNetModel: conditioning_scale must be a number, got {conditioning_scale!r}")
        if not math.isfinite(conditioning_scale):
            raise ValueError(f"ControlNetModel: conditioning_scale must be finite, got {conditioning_scale}")
        check_image(self, controlnet_cond, what="controlnet_cond")
        B, h, w, _ = sample.shape
        f = self.conditioning_downscale
        expected = (B, h * f, w * f, self.conditioning_channels)
        if tuple(controlnet_cond.shape) != expected:
            raise ValueError(
                f"ControlNetModel expects controlnet_cond of shape {expected}: batch B={B}, a {h}x{w} sample times "
                f"{f} (its conditioning embedding downsamples by {f}), {self.conditioning_channels} channel(s); "
                f"got {tuple(controlnet_cond.shape)}"
            )
        check_input_finite(self, controlnet_cond, "controlnet_cond")
        return float(conditioning_scale)  # a Python float keeps float32 float32

    def __repr__(self) -> str:
        return (f"ControlNetModel(block_out_channels={self.config['block_out_channels']}, conditioning_channels="
                f"{self.conditioning_channels}, {self.num_parameters():,} parameters)")


def _config(config: ControlNetConfig | None, fields: dict) -> ControlNetConfig:
    """The constructor's config: the ControlNetConfig given, or one made from diffusers' field names."""
    if config is not None:
        return given_config("ControlNetModel", ControlNetConfig, config, fields)
    # imported on first use, as in models/unet.py (io/__init__.py imports the models)
    from diffusion_np.io.diffusers_config import controlnet_config

    return controlnet_config(fields)
