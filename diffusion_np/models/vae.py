"""Stable Diffusion's VAE (diffusers' ``AutoencoderKL``) with a hand-written backward.

The autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3 and Appendix G) is a
variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational
Bayes") whose encoder outputs a diagonal Gaussian over a small latent image::

    moments      = quant_conv(encoder(x))          (B, H/f, W/f, 2 * latent_channels), f = 2^(levels - 1)
    mean, logvar = split(moments);  logvar <- clamp(logvar, -30, 20)
    z            = mean + exp(0.5 * logvar) * eps,  eps ~ N(0, I)      (reparameterisation, K&W Sec. 2.4)
    x_rec        = decoder(post_quant_conv(z))      (B, H, W, out_channels)

    encoder: conv_in -> DownEncoderBlock2D x levels -> mid block -> GroupNorm, SiLU -> conv_out
    decoder: conv_in -> mid block -> UpDecoderBlock2D x levels -> GroupNorm, SiLU -> conv_out
    mid block: resnet -> single-head self-attention over the pixels (GroupNorm inside, residual) -> resnet

The training objective is the one of CompVis' ``LPIPSWithDiscriminator`` with
only its first two terms (the negative ELBO with a down-weighted KL)::

    loss = (1/B) sum_{b, pixels} |x - x_rec|  +  beta * (1/B) sum_b KL(q(z | x_b) || N(0, I))

with the reconstruction summed over each image, as the KL is, so that ``beta``
means what it means in Stable Diffusion's config (``kl_weight: 1e-6``).

**What Stable Diffusion's VAE training adds that we leave out**, and why:

* the LPIPS perceptual loss: it needs a VGG network with ImageNet weights (and
  LPIPS' learned linear heads), which cannot be downloaded here;
* the patch-GAN discriminator and its adaptive weight (Esser et al. 2021,
  "Taming Transformers", Sec. 3.1): adversarial training is unstable at the
  tiny sizes and step counts this library trains at, and it hides whether the
  plain objective works;
* the learned output log-variance ``logvar`` of ``LPIPSWithDiscriminator``
  (initialised at 0, which is what we use, fixed).

The reparameterisation's noise is an input (``noise=``) or drawn on the host
from a NumPy generator and moved to the data's device, so a seed gives the
same sample on CPU and GPU.

Latent scaling (Rombach et al. Sec. 4.3.2 and Appendix D.1): the diffusion
model sees ``scaling_factor * z``, about unit variance; :meth:`AutoencoderKL.encode_latents`
and :meth:`AutoencoderKL.decode_latents` apply and undo it.

Parameter names are diffusers' ``AutoencoderKL`` state_dict keys
(``encoder.down_blocks.0.resnets.0.conv1.weight``,
``decoder.mid_block.attentions.0.to_q.weight``, ``quant_conv.bias``, ...); conv
weights are in our (kh, kw, C_in, C_out) layout (diffusers' weight
``.transpose(2, 3, 1, 0)``). Layout is channels-last, ``(B, H, W, C)``.

Left out on purpose (a ValueError names the config field): other block types,
``act_fn`` other than SiLU, the spatial norm of the MoVQ decoder, tiling and
slicing (they change memory use, not the result), and odd image sides (diffusers'
encoder accepts them but the decoder cannot give the size back).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, device_of, get_xp, to_device
from diffusion_np.models.config import VAEConfig, given_config
from diffusion_np.models.resnet import ResnetBlock2D
from diffusion_np.nn.attention import sdpa_blocked_backward, sdpa_blocked_forward
from diffusion_np.nn.conv import Conv2d
from diffusion_np.nn.linear import Linear
from diffusion_np.nn.losses import (
    gaussian_kl_backward,
    gaussian_kl_forward,
    l1_loss_backward,
    l1_loss_forward,
    mse_loss_backward,
    mse_loss_forward,
)
from diffusion_np.nn.module import Module, ModuleList
from diffusion_np.nn.norm import GroupNorm
from diffusion_np.nn.resample import Downsample2D, Upsample2D
from diffusion_np.nn.validate import check_float, check_image, check_input_finite

#: Stable Diffusion clamps the log-variance to this range (diffusers' DiagonalGaussianDistribution,
#: CompVis' ldm/modules/distributions): exp(20) ~ 5e8 is already a meaningless variance, and
#: exp(-30) ~ 1e-13 a zero one; outside, exp() would overflow or the KL's -logvar term explode.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

#: every GroupNorm of the VAE (resnets, attention, output norms) uses this epsilon in diffusers
_VAE_EPS = 1e-6


# ============================================================================ the posterior: ops
class PosteriorCache(NamedTuple):
    keep: object  # (B, h, w, L) bool: True where logvar was inside [LOGVAR_MIN, LOGVAR_MAX]


def diagonal_gaussian_forward(moments):
    """Split the encoder's moments into ``mean`` and a clamped ``logvar``.

    ``moments`` (B, h, w, 2L): the first L channels are the mean, the last L the
    log-variance (diffusers' ``torch.chunk(parameters, 2, dim=1)``, channels last here)::

        mean   = moments[..., :L]
        logvar = clamp(moments[..., L:], -30, 20)

    Returns ``(mean, logvar), cache``.
    """
    xp = get_xp(moments)
    L = moments.shape[-1] // 2
    mean = moments[..., :L]  # (B, h, w, 2L) -> (B, h, w, L), a view
    raw = moments[..., L:]
    keep = (raw >= LOGVAR_MIN) & (raw <= LOGVAR_MAX)  # inclusive, as torch.clamp's gradient
    logvar = xp.clip(raw, LOGVAR_MIN, LOGVAR_MAX)
    return (mean, logvar), PosteriorCache(keep)


def diagonal_gaussian_backward(dmean, dlogvar, cache: PosteriorCache):
    """Gradient w.r.t. the moments: ``concat(dmean, dlogvar * keep)`` on the channel axis.

    A clamp is the identity inside its range and a constant outside, so its
    derivative is 1 inside and 0 outside (at the boundary 1, as in PyTorch).
    ``dlogvar=None`` means the log-variance was not used (the posterior's mode).
    """
    xp = get_xp(dmean)
    if dlogvar is None:
        dlogvar = xp.zeros_like(dmean)
    else:
        dlogvar = dlogvar * cache.keep  # bool * float keeps the float dtype
    return xp.concatenate([dmean, dlogvar], axis=-1)  # (B, h, w, L) x 2 -> (B, h, w, 2L)


class ReparameterizeCache(NamedTuple):
    noise: object  # eps
    std: object  # exp(0.5 * logvar)


def reparameterize_forward(mean, logvar, noise):
    """``z = mean + exp(0.5 * logvar) * noise`` (Kingma & Welling 2014, Sec. 2.4).

    With ``noise ~ N(0, I)``, z is a sample of N(mean, exp(logvar)) that is a
    differentiable function of mean and logvar.
    """
    xp = get_xp(mean)
    std = xp.exp(logvar * 0.5)  # Python float: float32 stays float32
    z = mean + std * noise
    return z, ReparameterizeCache(noise, std)


def reparameterize_backward(dz, cache: ReparameterizeCache):
    """``dmean = dz``,  ``dlogvar = dz * noise * 0.5 * exp(0.5 * logvar)``  (d std / d logvar = std / 2).

    Returns ``(dmean, dlogvar)``.
    """
    noise, std = cache
    dlogvar = dz * noise
    dlogvar *= std
    dlogvar *= 0.5
    return dz, dlogvar


# ============================================================================ the posterior: object
class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, diag(exp(logvar))), as diffusers'
    ``DiagonalGaussianDistribution`` (``logvar`` already clamped to [-30, 20]).

    Attributes ``mean``, ``logvar``, ``std``, ``var``, each (B, h, w, latent_channels).
    """

    def __init__(self, mean, logvar):
        xp = get_xp(mean)
        self.mean, self.logvar = mean, logvar
        self.std = xp.exp(logvar * 0.5)
        self.var = xp.exp(logvar)

    def sample(self, rng=None, noise=None):
        """``mean + std * noise``; ``noise`` defaults to N(0, I) drawn from ``rng`` (a NumPy
        Generator or a seed; None: a fresh, unseeded generator) on the host, then moved
        to the mean's device (so a seed gives the same sample on every device)."""
        if noise is None:
            noise = _draw_noise(self.mean, rng)
        _check_same_shape("DiagonalGaussian.sample", self.mean, noise, "noise")
        return self.mean + self.std * noise

    def mode(self):
        """The most likely latent: the mean (what Stable Diffusion's img2img uses with ``argmax``)."""
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) per sample, (B,): ``0.5 * sum_{h, w, c} (mean^2 + var - 1 - logvar)``."""
        terms = self.mean * self.mean + self.var - 1.0 - self.logvar
        return terms.reshape(terms.shape[0], -1).sum(axis=1) * 0.5

    def __repr__(self) -> str:
        return f"DiagonalGaussian(shape={tuple(self.mean.shape)}, dtype={self.mean.dtype})"


def _draw_noise(like, rng):
    """N(0, I) shaped like ``like``: drawn on the host, cast, moved to ``like``'s device."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    noise = rng.standard_normal(like.shape).astype(like.dtype)
    return to_device(noise, device_of(like))


def _check_same_shape(name: str, ref, x, what: str) -> None:
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"{name} expects {what} of shape {tuple(ref.shape)}, got {tuple(x.shape)}")


# ============================================================================ mid-block attention
class VAEAttention(Module):
    """The single-head self-attention of the VAE's mid block (ldm's ``AttnBlock``;
    diffusers' ``Attention`` with ``norm_num_groups``, ``residual_connection=True``, ``bias=True``)::

        h   = group_norm(x)                     (B, H, W, C) -> (B, HW, C): every pixel is a token
        out = to_out.0(softmax(q k^T / sqrt(C)) v)   q, k, v = to_q(h), to_k(h), to_v(h), all with biases
        y   = (out + x) / rescale_output_factor

    One head of width C (diffusers builds it with ``attention_head_dim = channels``).
    Parameters: ``group_norm.*``, ``to_q.*``, ``to_k.*``, ``to_v.*``, ``to_out.0.*``.
    """

    def __init__(self, channels: int, norm_num_groups: int = 32, eps: float = _VAE_EPS,
                 rescale_output_factor: float = 1.0, rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.channels = channels
        self.rescale_output_factor = float(rescale_output_factor)
        self.group_norm = GroupNorm(norm_num_groups, channels, eps=eps, dtype=dtype)
        self.to_q = Linear(channels, channels, bias=True, rng=rng, dtype=dtype)
        self.to_k = Linear(channels, channels, bias=True, rng=rng, dtype=dtype)
        self.to_v = Linear(channels, channels, bias=True, rng=rng, dtype=dtype)
        self.to_out = ModuleList([Linear(channels, channels, bias=True, rng=rng, dtype=dtype)])  # to_out.0

    def forward(self, x):
        check_image(self, x, self.channels)
        check_input_finite(self, x)
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, H * W, C)  # (B, H, W, C) -> (B, HW, C), channels-last: no copy
        q = self.to_q(h)[:, None]  # (B, HW, C) -> (B, 1, HW, C): one head
        k = self.to_k(h)[:, None]
        v = self.to_v(h)[:, None]
        out, sdpa_cache = sdpa_blocked_forward(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C); threads where large
        out = self.to_out[0](out[:, 0])  # (B, HW, C)
        y = out.reshape(B, H, W, C) + x  # the residual connection
        if self.rescale_output_factor != 1.0:
            y /= self.rescale_output_factor
        self._set_cache(sdpa_cache)
        return y

    def backward(self, dout):
        sdpa_cache = self._pop_cache()
        B, H, W, C = dout.shape
        if self.rescale_output_factor != 1.0:
            dout = dout / self.rescale_output_factor
        dattn = self.to_out[0].backward(dout.reshape(B, H * W, C))  # (B, HW, C)
        dq, dk, dv = sdpa_blocked_backward(dattn[:, None], sdpa_cache)  # each (B, 1, HW, C)
        # h fed the queries, the keys and the values: its gradient is the sum of the three
        dh = self.to_q.backward(dq[:, 0])
        dh += self.to_k.backward(dk[:, 0])
        dh += self.to_v.backward(dv[:, 0])
        dx = self.group_norm.backward(dh.reshape(B, H, W, C))
        dx += dout  # the residual connection
        return dx


# ============================================================================ blocks
class UNetMidBlock2D(Module):
    """The VAE's bottleneck (diffusers' ``UNetMidBlock2D`` with ``temb_channels=None``, one layer)::

        h = resnets.0(x);  h = attentions.0(h);  out = resnets.1(h)

    ``add_attention=False`` (diffusers' ``mid_block_add_attention``) leaves the attention out.
    """

    def __init__(self, in_channels: int, resnet_eps: float = _VAE_EPS, resnet_groups: int = 32,
                 add_attention: bool = True, output_scale_factor: float = 1.0, dropout: float = 0.0,
                 rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.in_channels, self.add_attention = in_channels, add_attention
        kwargs = dict(temb_channels=None, groups=resnet_groups, eps=resnet_eps, dropout=dropout,
                      output_scale_factor=output_scale_factor, dtype=dtype)
        self.resnets = ModuleList([ResnetBlock2D(in_channels, in_channels, rng=rng, **kwargs)])
        if add_attention:
            self.attentions = ModuleList([VAEAttention(in_channels, resnet_groups, resnet_eps,
                                                       rescale_output_factor=output_scale_factor,
                                                       rng=rng, dtype=dtype)])
        self.resnets.append(ResnetBlock2D(in_channels, in_channels, rng=rng, **kwargs))

    def forward(self, x):
        h = self.resnets[0](x)
        if self.add_attention:
            h = self.attentions[0](h)
        return self.resnets[1](h)

    def backward(self, dout):
        dh = self.resnets[1].backward(dout).dx  # no time embedding: only dx
        if self.add_attention:
            dh = self.attentions[0].backward(dh)
        return self.resnets[0].backward(dh).dx


class DownEncoderBlock2D(Module):
    """``num_layers`` resnets (no time embedding), then (``add_downsample``) a stride-2 conv.

    The VAE's downsampler pads (top 0, bottom 1, left 0, right 1) and convolves
    with no padding (``downsample_padding=0``). (B, H, W, in) -> (B, H/2, W/2, out).
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 1, resnet_eps: float = _VAE_EPS,
                 resnet_groups: int = 32, add_downsample: bool = True, downsample_padding: int = 0,
                 dropout: float = 0.0, rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.resnets = ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                          groups=resnet_groups, eps=resnet_eps, dropout=dropout, rng=rng, dtype=dtype)
            for i in range(num_layers)
        ])
        self.add_downsample = add_downsample
        if add_downsample:
            self.downsamplers = ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding,
                                                         rng=rng, dtype=dtype)])

    def forward(self, x):
        h = x
        for resnet in self.resnets:
            h = resnet(h)
        if self.add_downsample:
            h = self.downsamplers[0](h)
        return h

    def backward(self, dout):
        dh = self.downsamplers[0].backward(dout) if self.add_downsample else dout
        for resnet in reversed(list(self.resnets)):
            dh = resnet.backward(dh).dx  # no time embedding: only dx
        return dh


class UpDecoderBlock2D(Module):
    """``num_layers`` resnets (no time embedding, no skip connections), then (``add_upsample``)
    nearest x2 and a 3x3 conv. (B, H, W, in) -> (B, 2H, 2W, out)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 1, resnet_eps: float = _VAE_EPS,
                 resnet_groups: int = 32, add_upsample: bool = True, dropout: float = 0.0,
                 rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.resnets = ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                          groups=resnet_groups, eps=resnet_eps, dropout=dropout, rng=rng, dtype=dtype)
            for i in range(num_layers)
        ])
        self.add_upsample = add_upsample
        if add_upsample:
            self.upsamplers = ModuleList([Upsample2D(out_channels, use_conv=True, rng=rng, dtype=dtype)])

    def forward(self, x):
        h = x
        for resnet in self.resnets:
            h = resnet(h)
        if self.add_upsample:
            h = self.upsamplers[0](h)
        return h

    def backward(self, dout):
        dh = self.upsamplers[0].backward(dout) if self.add_upsample else dout
        for resnet in reversed(list(self.resnets)):
            dh = resnet.backward(dh).dx  # no time embedding: only dx
        return dh


# ============================================================================ encoder and decoder
class Encoder(Module):
    """Image -> moments: ``conv_out(silu(conv_norm_out(mid_block(down_blocks(conv_in(x))))))``.

    (B, H, W, in_channels) -> (B, H/f, W/f, 2 * out_channels) with ``double_z`` (the VAE:
    a mean and a log-variance per latent channel), f = 2^(levels - 1).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 4, block_out_channels: tuple = (64,),
                 layers_per_block: int = 2, norm_num_groups: int = 32, double_z: bool = True,
                 mid_block_add_attention: bool = True, rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        n = len(block_out_channels)
        self.in_channels = in_channels
        self.conv_in = Conv2d(in_channels, block_out_channels[0], 3, padding=1, rng=rng, dtype=dtype)
        self.down_blocks = ModuleList()
        out_ch = block_out_channels[0]
        for i in range(n):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(DownEncoderBlock2D(
                in_ch, out_ch, num_layers=layers_per_block, resnet_groups=norm_num_groups,
                add_downsample=i < n - 1, downsample_padding=0, rng=rng, dtype=dtype))
        self.mid_block = UNetMidBlock2D(block_out_channels[-1], resnet_groups=norm_num_groups,
                                        add_attention=mid_block_add_attention, rng=rng, dtype=dtype)
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[-1], eps=_VAE_EPS, dtype=dtype, silu=True)
        conv_out_channels = 2 * out_channels if double_z else out_channels
        self.conv_out = Conv2d(block_out_channels[-1], conv_out_channels, 3, padding=1, rng=rng, dtype=dtype)

    def forward(self, x):
        check_image(self, x, self.in_channels)
        check_input_finite(self, x)
        h = self.conv_in(x)  # (B, H, W, block_out_channels[0])
        for block in self.down_blocks:
            h = block(h)  # halves H and W at every level but the last
        h = self.mid_block(h)
        h = self.conv_norm_out(h)  # GroupNorm, then SiLU (fused: silu=True)
        return self.conv_out(h)  # (B, H/f, W/f, 2 * latent_channels)

    def backward(self, dout):
        dh = self.conv_out.backward(dout)
        dh = self.conv_norm_out.backward(dh)  # back through SiLU, then GroupNorm
        dh = self.mid_block.backward(dh)
        for block in reversed(list(self.down_blocks)):
            dh = block.backward(dh)
        return self.conv_in.backward(dh)


class Decoder(Module):
    """Latent -> image: ``conv_out(silu(conv_norm_out(up_blocks(mid_block(conv_in(z))))))``.

    (B, h, w, in_channels) -> (B, h f, w f, out_channels). Every up block has
    ``layers_per_block + 1`` resnets, as in diffusers.
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 3, block_out_channels: tuple = (64,),
                 layers_per_block: int = 2, norm_num_groups: int = 32, mid_block_add_attention: bool = True,
                 rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        n = len(block_out_channels)
        self.in_channels = in_channels
        self.conv_in = Conv2d(in_channels, block_out_channels[-1], 3, padding=1, rng=rng, dtype=dtype)
        self.mid_block = UNetMidBlock2D(block_out_channels[-1], resnet_groups=norm_num_groups,
                                        add_attention=mid_block_add_attention, rng=rng, dtype=dtype)
        self.up_blocks = ModuleList()
        rev = list(reversed(block_out_channels))
        out_ch = rev[0]
        for i in range(n):
            prev_ch, out_ch = out_ch, rev[i]
            self.up_blocks.append(UpDecoderBlock2D(
                prev_ch, out_ch, num_layers=layers_per_block + 1, resnet_groups=norm_num_groups,
                add_upsample=i < n - 1, rng=rng, dtype=dtype))
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[0], eps=_VAE_EPS, dtype=dtype, silu=True)
        self.conv_out = Conv2d(block_out_channels[0], out_channels, 3, padding=1, rng=rng, dtype=dtype)

    def forward(self, z):
        check_image(self, z, self.in_channels, what="z")
        check_input_finite(self, z, "z")
        h = self.conv_in(z)  # (B, h, w, block_out_channels[-1])
        h = self.mid_block(h)
        for block in self.up_blocks:
            h = block(h)  # doubles H and W at every level but the last
        h = self.conv_norm_out(h)  # GroupNorm, then SiLU (fused: silu=True)
        return self.conv_out(h)  # (B, H, W, out_channels)

    def backward(self, dout):
        dh = self.conv_out.backward(dout)
        dh = self.conv_norm_out.backward(dh)  # back through SiLU, then GroupNorm
        for block in reversed(list(self.up_blocks)):
            dh = block.backward(dh)
        dh = self.mid_block.backward(dh)
        return self.conv_in.backward(dh)


# ============================================================================ the autoencoder
class _ForwardCache(NamedTuple):
    reparam: object  # ReparameterizeCache, or None when z was the posterior's mode


class _LossCache(NamedTuple):
    recon: str  # "l1" or "mse"
    recon_cache: object
    kl_cache: object
    beta: float
    batch: int


class AutoencoderKL(Module):
    """Stable Diffusion's VAE, channels-last, with diffusers' config names and state_dict keys.

    Methods (each backward adds the parameter gradients into ``grads``)::

        posterior = vae.encode(x)                  x (B, H, W, in_channels) -> DiagonalGaussian
        dx = vae.encode_backward(dmean, dlogvar)   (dlogvar may be None)
        x_rec = vae.decode(z)                      z (B, H/f, W/f, latent_channels) -> (B, H, W, out_channels)
        dz = vae.decode_backward(dout)             dout: the gradient w.r.t. x_rec
        x_rec = vae(x, sample_posterior=True, noise=None, rng=None);  dx = vae.backward(dout)
        loss, parts = vae.loss(x, beta=1e-6, recon="l1", noise=None);  dx = vae.loss_backward()
        z = vae.encode_latents(x);  x = vae.decode_latents(z)     (the scaling factor, no backward)

    H and W must be divisible by f = 2^(levels - 1). ``forward`` samples the posterior
    by default, as CompVis' ``AutoencoderKL.forward`` does (diffusers' default is the
    mode: pass ``sample_posterior=False``). Noise comes from ``noise=``, else from
    ``rng``, else from the model's own generator (seeded from ``rng`` at construction),
    so a run is reproducible.

    ``AutoencoderKL(VAEConfig(...))``, or the config's fields as keyword arguments (diffusers'
    names); ``config`` is then the dict of every field, which a checkpoint stores and
    :meth:`from_config` reads back. ``rng`` seeds the PyTorch-style initialisation; ``dtype`` the parameters.
    """

    def __init__(self, config: VAEConfig | None = None, *, rng=None, dtype=DEFAULT_DTYPE, **fields):
        super().__init__()
        c = _config(config, fields)
        rng = rng if rng is not None else np.random.default_rng(0)
        self.config = c.to_dict()  # a plain dict, as diffusers' model.config: what checkpoints store
        self.in_channels, self.out_channels, self.latent_channels = c.in_channels, c.out_channels, c.latent_channels
        self.scaling_factor = float(c.scaling_factor)
        self.shift_factor = float(c.shift_factor) if c.shift_factor is not None else 0.0
        self.downscale = 2 ** (c.num_levels - 1)  # every level but the last halves H and W
        self.use_quant_conv, self.use_post_quant_conv = c.use_quant_conv, c.use_post_quant_conv

        common = dict(block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
                      norm_num_groups=c.norm_num_groups, mid_block_add_attention=c.mid_block_add_attention,
                      rng=rng, dtype=dtype)
        self.encoder = Encoder(c.in_channels, c.latent_channels, double_z=True, **common)
        self.decoder = Decoder(c.latent_channels, c.out_channels, **common)
        L = c.latent_channels
        if c.use_quant_conv:
            self.quant_conv = Conv2d(2 * L, 2 * L, 1, rng=rng, dtype=dtype)
        if c.use_post_quant_conv:
            self.post_quant_conv = Conv2d(L, L, 1, rng=rng, dtype=dtype)
        # the reparameterisation's own generator, as Dropout owns one: reproducible by default
        self.noise_rng = np.random.default_rng(int(rng.integers(2**31)))
        self._encode_cache = None
        self._loss_cache = None
        self.posterior = None  # the DiagonalGaussian of the last forward

    def to(self, device: str = "numpy", dtype=None) -> AutoencoderKL:
        """Module.to, also dropping the caches this class keeps outside ``_cache``."""
        self._encode_cache = self._loss_cache = self.posterior = None
        return super().to(device, dtype)

    # ------------------------------------------------------------------ encode
    def encode(self, x) -> DiagonalGaussian:
        """The posterior q(z | x): ``quant_conv(encoder(x))`` split into mean and clamped logvar."""
        self._check_image(x)
        moments = self.encoder(x)  # (B, h, w, 2L)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        (mean, logvar), cache = diagonal_gaussian_forward(moments)
        self._encode_cache = cache
        return DiagonalGaussian(mean, logvar)

    def encode_backward(self, dmean, dlogvar=None):
        """Gradient w.r.t. x of the last :meth:`encode`, given the gradients w.r.t. the
        posterior's ``mean`` and (clamped) ``logvar``; ``dlogvar=None``: only the mean was used."""
        cache = self._encode_cache
        if cache is None:
            raise RuntimeError("AutoencoderKL.encode_backward called without a preceding encode (or twice for one)")
        self._encode_cache = None
        dmoments = diagonal_gaussian_backward(dmean, dlogvar, cache)  # zero where logvar was clamped
        if self.use_quant_conv:
            dmoments = self.quant_conv.backward(dmoments)
        return self.encoder.backward(dmoments)

    # ------------------------------------------------------------------ decode
    def decode(self, z):
        """The reconstruction ``decoder(post_quant_conv(z))``."""
        check_image(self, z, self.latent_channels, what="z")
        check_input_finite(self, z, "z")
        h = self.post_quant_conv(z) if self.use_post_quant_conv else z
        return self.decoder(h)

    def decode_backward(self, dout):
        """Gradient w.r.t. z of the last :meth:`decode`, given ``dout`` w.r.t. its output."""
        dh = self.decoder.backward(dout)
        return self.post_quant_conv.backward(dh) if self.use_post_quant_conv else dh

    # ------------------------------------------------------------------ the whole autoencoder
    def forward(self, x, sample_posterior: bool = True, noise=None, rng=None):
        """Encode, take ``z`` (a sample of the posterior, or its mode), decode. Keeps the
        posterior in ``self.posterior`` for a loss."""
        posterior = self.encode(x)
        reparam = None
        if sample_posterior:
            if noise is None:
                noise = _draw_noise(posterior.mean, rng if rng is not None else self.noise_rng)
            check_float(self, noise, "noise")
            _check_same_shape("AutoencoderKL", posterior.mean, noise, "noise")
            z, reparam = reparameterize_forward(posterior.mean, posterior.logvar, noise)
        else:
            z = posterior.mode()
        self.posterior = posterior
        self._set_cache(_ForwardCache(reparam))
        return self.decode(z)

    def backward(self, dout):
        """Gradient w.r.t. x of the last forward, through the decoder, the sample and the encoder."""
        dmean, dlogvar = self._backward_to_posterior(dout)
        return self.encode_backward(dmean, dlogvar)

    def _backward_to_posterior(self, dx_rec):
        (reparam,) = self._pop_cache()
        dz = self.decode_backward(dx_rec)
        if reparam is None:
            return dz, None  # z = mean
        return reparameterize_backward(dz, reparam)  # z = mean + std * noise: through both

    # ------------------------------------------------------------------ training loss
    def loss(self, x, beta: float = 1e-6, recon: str = "l1", noise=None, rng=None):
        """The VAE training loss (module docstring), on a sample of the posterior.

        1. posterior = encode(x);  2. z = mean + std * noise;  3. x_rec = decode(z)
        4. recon = (1/B) sum |x - x_rec|  (``recon="mse"``: squared)
        5. kl = (1/B) sum_b KL(q(z | x_b) || N(0, I));   loss = recon + beta * kl

        Returns ``(loss, {"recon": recon, "kl": kl})``, 0-d values in x's dtype.
        """
        if recon not in ("l1", "mse"):
            raise ValueError(f"AutoencoderKL.loss: recon must be 'l1' or 'mse', got {recon!r}")
        x_rec = self.forward(x, sample_posterior=True, noise=noise, rng=rng)
        B = x.shape[0]
        # "sum" then 1/B: summed over each image as the KL is (see the module docstring)
        recon_fwd = l1_loss_forward if recon == "l1" else mse_loss_forward
        rec, recon_cache = recon_fwd(x_rec, x, reduction="sum")
        rec = rec * (1.0 / B)
        kl, kl_cache = gaussian_kl_forward(self.posterior.mean, self.posterior.logvar)  # already / B
        total = rec + kl * float(beta)
        self._loss_cache = _LossCache(recon, recon_cache, kl_cache, float(beta), B)
        return total, {"recon": rec, "kl": kl}

    def loss_backward(self, input_grad: bool = True):
        """Backward of the last :meth:`loss` (upstream gradient 1): adds every parameter
        gradient into ``grads`` and returns d loss / d x. x enters the loss twice, through
        the encoder and as the reconstruction target; the returned gradient is the sum of both.

        ``input_grad=False`` (training, where x is data): returns None, and the encoder's first
        convolution skips its input gradient (``Conv2d.input_grad``) for this backward."""
        if not isinstance(input_grad, bool):
            raise TypeError(f"AutoencoderKL.loss_backward: input_grad must be True or False, got {input_grad!r}")
        cache = self._loss_cache
        if cache is None:
            raise RuntimeError("AutoencoderKL.loss_backward called without a preceding loss (or twice for one)")
        self._loss_cache = None
        recon_bwd = l1_loss_backward if cache.recon == "l1" else mse_loss_backward
        dx_rec = recon_bwd(cache.recon_cache, 1.0 / cache.batch)  # d loss / d x_rec
        # 5. the KL reaches the posterior directly ...
        dmean_kl, dlogvar_kl = gaussian_kl_backward(cache.kl_cache, cache.beta)
        # 3.-2. ... and the reconstruction through the decoder and the sample
        dmean, dlogvar = self._backward_to_posterior(dx_rec)
        dmean = dmean + dmean_kl  # mean was used twice: by z and by the KL
        dlogvar = dlogvar + dlogvar_kl  # so was logvar
        conv_in = self.encoder.conv_in
        before, conv_in.input_grad = conv_in.input_grad, conv_in.input_grad and input_grad
        try:
            dx = self.encode_backward(dmean, dlogvar)  # 1.
        finally:
            conv_in.input_grad = before
        if dx is None:  # not asked for, or the first convolution was set not to compute it
            return None
        dx -= dx_rec  # 4. x as the target: recon depends on x_rec - x
        return dx

    # ------------------------------------------------------------------ latents for diffusion
    def encode_latents(self, x, sample_posterior: bool = True, rng=None):
        """``scaling_factor * (z - shift_factor)``, z a sample (or the mode) of q(z | x): what the
        diffusion model is trained on (Rombach et al. Sec. 4.3.2). No cache is kept for a backward."""
        posterior = self.encode(x)
        self._encode_cache = None
        z = posterior.sample(rng if rng is not None else self.noise_rng) if sample_posterior else posterior.mode()
        return (z - self.shift_factor) * self.scaling_factor

    def decode_latents(self, latents):
        """``decode(latents / scaling_factor + shift_factor)``: a diffusion model's latents back to an image."""
        return self.decode(latents * (1.0 / self.scaling_factor) + self.shift_factor)

    # ------------------------------------------------------------------ configuration and input checks
    @classmethod
    def from_config(cls, config: dict, rng=None, dtype=DEFAULT_DTYPE) -> AutoencoderKL:
        """Build from a diffusers config dict (e.g. a parsed ``vae/config.json``) or a saved ``config``;
        keys starting with ``_`` are skipped, unknown fields raise a ValueError naming them."""
        return cls(_config(None, config), rng=rng, dtype=dtype)

    def _check_image(self, x) -> None:
        check_image(self, x, self.in_channels)
        check_input_finite(self, x)
        f = self.downscale
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"AutoencoderKL with {len(self.config['block_out_channels'])} levels needs H and W divisible "
                f"by {f}, got x of shape {tuple(x.shape)}"
            )

    def __repr__(self) -> str:
        c = self.config
        return (
            f"AutoencoderKL(block_out_channels={c['block_out_channels']}, latent_channels={self.latent_channels}, "
            f"{self.num_parameters():,} parameters)"
        )


def _config(config: VAEConfig | None, fields: dict) -> VAEConfig:
    """The constructor's config: the VAEConfig given, or one made from diffusers' field names
    (the fields a diffusers config has and we ignore are listed in :mod:`diffusion_np.io.diffusers_config`)."""
    if config is not None:
        return given_config("AutoencoderKL", VAEConfig, config, fields)
    # imported on first use: at the top it would run io/__init__.py, which imports io.diffusers,
    # which imports this module (an import cycle through the package)
    from diffusion_np.io.diffusers_config import vae_config

    return vae_config(fields)
