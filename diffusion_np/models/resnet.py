"""The residual block of the Stable Diffusion U-Net and VAE (diffusers' ``ResnetBlock2D``).

A pre-activation ResNet block (He et al. 2016, "Identity Mappings in Deep Residual
Networks", Fig. 4e) with GroupNorm (Wu & He 2018) and SiLU, into which the
diffusion timestep is added after the first convolution, as in DDPM (Ho et al.
2020, Appendix B) and the Stable Diffusion U-Net (Rombach et al. 2022)::

    h   = conv1(silu(norm1(x)))                          (B, H, W, C_out)
    h   = h + time_emb_proj(silu(temb))[:, None, None, :]   only when a temb is given
    h   = conv2(dropout(silu(norm2(h))))
    out = (shortcut(x) + h) / output_scale_factor

``shortcut`` is the identity when the channels stay the same and a 1x1 conv
(``conv_shortcut``) when they change. The VAE uses the same block with no time
embedding (``temb_channels=None``) and GroupNorm eps 1e-6.

Parameter names are diffusers' (``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``,
``conv2``, ``conv_shortcut``); the conv weights are in our (kh, kw, C_in, C_out)
layout, so a diffusers conv weight maps onto ours by ``.transpose(2, 3, 1, 0)``.

Left out on purpose: the ``scale_shift`` (FiLM) and ``ada_group``/``spatial``
time-embedding norms, the up/down-sampling variants (``up=True``/``down=True``,
FIR kernels), a 3x3 ``conv_shortcut``, ``skip_time_act`` and
``conv_2d_out_channels``; Stable Diffusion 1.x/2.x uses none of them.

``norm1`` and ``norm2`` are built with ``silu=True``: each runs as the fused
GroupNorm + SiLU op of :mod:`diffusion_np.nn.norm` (same parameters, fewer
passes over the activations).
"""

from __future__ import annotations

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE
from diffusion_np.nn.activation import Dropout, silu_backward, silu_forward
from diffusion_np.nn.conv import Conv2d
from diffusion_np.nn.linear import Linear
from diffusion_np.nn.module import BlockGrads, Module
from diffusion_np.nn.norm import GroupNorm
from diffusion_np.nn.validate import check_features, check_image, check_input_finite


class ResnetBlock2D(Module):
    """Residual block ``(x (B, H, W, C_in), temb (B, temb_channels) or None) -> (B, H, W, C_out)``.

    Parameters
    ----------
    in_channels, out_channels : channels of x and of the output (``out_channels=None``: the same).
    temb_channels : width of the time embedding; ``None`` builds no ``time_emb_proj`` (the VAE).
    groups, groups_out : GroupNorm groups of ``norm1`` and ``norm2`` (``groups_out=None``: ``groups``).
    eps : GroupNorm epsilon (diffusers' default 1e-6; the U-Net passes its ``norm_eps``, 1e-5).
    dropout : probability of the dropout before ``conv2`` (active in training mode only).
    output_scale_factor : the sum ``shortcut(x) + h`` is divided by it (1 in Stable Diffusion).

    Notes
    -----
    ``backward(dout)`` returns :class:`~diffusion_np.nn.BlockGrads` ``(dx, dtemb)``; ``dtemb`` is None
    when the forward had no temb.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        rng=None,
        dtype=DEFAULT_DTYPE,
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        out_channels = in_channels if out_channels is None else out_channels
        groups_out = groups if groups_out is None else groups_out
        self.in_channels, self.out_channels, self.temb_channels = in_channels, out_channels, temb_channels
        self.output_scale_factor = float(output_scale_factor)

        # silu=True: norm1 and norm2 apply GroupNorm *and then SiLU*, fused into one op (same parameters)
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, dtype=dtype, silu=True)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, rng=rng, dtype=dtype)
        if temb_channels is not None:
            self.time_emb_proj = Linear(temb_channels, out_channels, rng=rng, dtype=dtype)
        self.norm2 = GroupNorm(groups_out, out_channels, eps=eps, dtype=dtype, silu=True)  # GroupNorm, then SiLU
        # the dropout owns its generator; seeding it from rng gives every block its own masks
        self.dropout = Dropout(dropout, seed=int(rng.integers(2**31)))
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, rng=rng, dtype=dtype)
        if in_channels != out_channels:  # only a change of width needs a projection
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1, rng=rng, dtype=dtype)
        self.has_shortcut = in_channels != out_channels

    def forward(self, x, temb=None):
        check_image(self, x, self.in_channels)
        check_input_finite(self, x)
        if temb is not None:
            if self.temb_channels is None:
                raise ValueError(
                    f"ResnetBlock2D was built with temb_channels=None (no time embedding), but got a temb "
                    f"of shape {tuple(temb.shape)}"
                )
            check_features(self, temb, self.temb_channels, min_ndim=2, what="temb")
            if temb.ndim != 2 or temb.shape[0] != x.shape[0]:
                raise ValueError(
                    f"ResnetBlock2D expects temb of shape (B, {self.temb_channels}) with B={x.shape[0]} "
                    f"(the batch of x), got {tuple(temb.shape)}"
                )
            check_input_finite(self, temb, "temb")

        # main branch, first half: h = conv1(silu(norm1(x)))
        h = self.norm1(x)  # GroupNorm, then SiLU (fused: silu=True), (B, H, W, C_in)
        h = self.conv1(h)  # (B, H, W, C_in) -> (B, H, W, C_out)

        silu_t = None
        if temb is not None:
            t, silu_t = silu_forward(temb)  # (B, temb_channels)
            t = self.time_emb_proj(t)  # (B, temb_channels) -> (B, C_out)
            h = h + t[:, None, None, :]  # one value per (sample, channel), broadcast over H and W

        # main branch, second half: h = conv2(dropout(silu(norm2(h))))
        h = self.norm2(h)  # GroupNorm, then SiLU (fused: silu=True)
        h = self.dropout(h)
        h = self.conv2(h)  # (B, H, W, C_out)

        shortcut = self.conv_shortcut(x) if self.has_shortcut else x  # (B, H, W, C_out)
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out /= self.output_scale_factor
        self._set_cache((silu_t,))  # a tuple: None alone would read as "no forward ran"
        return out

    def backward(self, dout):
        """Gradients of the forward, in reverse order; returns ``BlockGrads(dx, dtemb)``."""
        (silu_t,) = self._pop_cache()
        if self.output_scale_factor != 1.0:
            dout = dout / self.output_scale_factor
        # out = shortcut + h: both branches receive dout unchanged

        # main branch, second half (reversed)
        dh = self.conv2.backward(dout)
        dh = self.dropout.backward(dh)
        dh = self.norm2.backward(dh)  # back through SiLU, then GroupNorm: the gradient w.r.t. h after + temb

        dtemb = None
        if silu_t is not None:
            # h + t[:, None, None, :]: t was broadcast over H and W, so its gradient sums over them
            dt = dh.sum(axis=(1, 2))  # (B, H, W, C_out) -> (B, C_out)
            dt = self.time_emb_proj.backward(dt)  # (B, C_out) -> (B, temb_channels)
            dtemb = silu_backward(dt, silu_t)

        # main branch, first half (reversed)
        dh = self.conv1.backward(dh)
        dx = self.norm1.backward(dh)  # back through SiLU, then GroupNorm, (B, H, W, C_in)

        # the shortcut branch: x reached the output a second time, so its gradients add up
        dx += self.conv_shortcut.backward(dout) if self.has_shortcut else dout
        return BlockGrads(dx, dtemb=dtemb)

    def __repr__(self) -> str:
        return (
            f"ResnetBlock2D({self.in_channels} -> {self.out_channels}, temb_channels={self.temb_channels}, "
            f"{self.num_parameters():,} parameters)"
        )
