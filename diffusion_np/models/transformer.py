"""The spatial transformer of the Stable Diffusion U-Net: where the text comes in.

Three modules, each as diffusers names it (so their state_dict keys match):

* :class:`FeedForward`: GEGLU (Shazeer 2020, Eq. 5) ``C -> 4C``, dropout, Linear ``4C -> C``;
  parameters ``net.0.proj.*`` and ``net.2.*`` (``net.1`` is the dropout).
* :class:`BasicTransformerBlock`: a pre-LayerNorm transformer block (Vaswani et al.
  2017, with the norm before each sublayer as in GPT-2) over the H*W pixels as
  tokens, with self-attention, cross-attention to the text and the feed-forward::

      x = x + attn1(norm1(x))              self-attention: pixels look at pixels
      x = x + attn2(norm2(x), context)     cross-attention: pixels look at text tokens
      x = x + ff(norm3(x))

* :class:`Transformer2DModel`: the image <-> token wrapper around the blocks
  (Rombach et al. 2022, Sec. 3.3, "SpatialTransformer")::

      h = proj_in(GroupNorm(x))            (B, H, W, C) -> (B, H, W, inner)   [1x1 conv, or Linear]
      h = h.reshape(B, H*W, inner)         pixels become tokens (channels-last: no transpose)
      h = blocks(h, context)
      h = proj_out(h.reshape(B, H, W, inner))
      out = h + x                          the residual around the whole transformer

The backward passes run the same lines in reverse; each residual connection
shows up as an explicit sum of the two gradients that meet there, and the
gradient w.r.t. the text ``context`` is summed over every block that read it.

Left out on purpose: attention dropout and biases on to_q/to_k/to_v (SD uses
none), ``only_cross_attention``/``double_self_attention``, AdaLayerNorm variants,
gated (GLIGEN) attention, the discrete and patched inputs of Transformer2DModel,
attention masks, and activations other than GEGLU.
"""

from __future__ import annotations

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE
from diffusion_np.nn.activation import GEGLU, Dropout
from diffusion_np.nn.attention import Attention
from diffusion_np.nn.conv import Conv2d
from diffusion_np.nn.linear import Linear
from diffusion_np.nn.module import BlockGrads, Module, ModuleList
from diffusion_np.nn.norm import GroupNorm, LayerNorm
from diffusion_np.nn.validate import check_features, check_image, check_input_finite


def _check_context(layer, context, cross_attention_dim: int, batch: int) -> None:
    """context must be (B, L, cross_attention_dim) with the batch of the image/tokens."""
    check_features(layer, context, cross_attention_dim, min_ndim=3, what="context (encoder_hidden_states)")
    if context.ndim != 3 or context.shape[0] != batch:
        raise ValueError(
            f"{type(layer).__name__} expects context (encoder_hidden_states) of shape "
            f"(B={batch}, L, {cross_attention_dim}), got {tuple(context.shape)}"
        )
    check_input_finite(layer, context, "context")


class FeedForward(Module):
    """``net.2(dropout(GEGLU(x)))``: (..., dim) -> (..., dim_out), hidden width ``mult * dim``.

    Parameters ``net.0.proj.weight`` (2 * mult * dim, dim), ``net.0.proj.bias``,
    ``net.2.weight`` (dim_out, mult * dim), ``net.2.bias``.
    """

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0, rng=None,
                 dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.dim, self.dim_out = dim, dim_out if dim_out is not None else dim
        inner = int(dim * mult)
        # a list, so the parameters are named net.0.* and net.2.* as in diffusers
        self.net = ModuleList([
            GEGLU(dim, inner, rng=rng, dtype=dtype),  # (..., dim) -> (..., inner)
            Dropout(dropout, seed=int(rng.integers(2**31))),
            Linear(inner, self.dim_out, rng=rng, dtype=dtype),  # (..., inner) -> (..., dim_out)
        ])

    def forward(self, x):
        check_features(self, x, self.dim, min_ndim=2)
        h = self.net[0](x)
        h = self.net[1](h)
        return self.net[2](h)

    def backward(self, dout):
        dh = self.net[2].backward(dout)
        dh = self.net[1].backward(dh)
        return self.net[0].backward(dh)


class BasicTransformerBlock(Module):
    """Self-attention, cross-attention and feed-forward, each pre-normed and residual.

    ``forward(x (B, N, dim), context (B, L, cross_attention_dim)) -> (B, N, dim)``;
    ``backward(dout)`` returns :class:`~diffusion_np.nn.BlockGrads` ``(dx, dcontext)``.

    Parameters
    ----------
    dim : token width (the transformer's inner width).
    num_attention_heads, attention_head_dim : heads and channels per head (dim = heads * head_dim in SD).
    cross_attention_dim : width of the text tokens.
    norm_eps : LayerNorm epsilon (1e-5).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int,
        dropout: float = 0.0,
        attention_bias: bool = False,
        norm_eps: float = 1e-5,
        rng=None,
        dtype=DEFAULT_DTYPE,
    ):
        super().__init__()
        if dropout != 0.0:
            raise ValueError(
                f"BasicTransformerBlock supports dropout=0.0 only (Stable Diffusion's U-Net uses none), got {dropout}"
            )
        if attention_bias:
            raise ValueError("BasicTransformerBlock supports attention_bias=False only (no bias on to_q/to_k/to_v)")
        if cross_attention_dim is None:
            raise ValueError("BasicTransformerBlock needs a cross_attention_dim (blocks without attn2 are left out)")
        rng = rng if rng is not None else np.random.default_rng(0)
        self.dim, self.cross_attention_dim = dim, cross_attention_dim
        heads, dim_head = num_attention_heads, attention_head_dim
        self.norm1 = LayerNorm(dim, eps=norm_eps, dtype=dtype)
        self.attn1 = Attention(dim, None, heads=heads, dim_head=dim_head, rng=rng, dtype=dtype)
        self.norm2 = LayerNorm(dim, eps=norm_eps, dtype=dtype)
        self.attn2 = Attention(dim, cross_attention_dim, heads=heads, dim_head=dim_head, rng=rng, dtype=dtype)
        self.norm3 = LayerNorm(dim, eps=norm_eps, dtype=dtype)
        self.ff = FeedForward(dim, rng=rng, dtype=dtype)

    def forward(self, x, context):
        if x.ndim != 3:
            raise ValueError(f"BasicTransformerBlock expects x of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        check_features(self, x, self.dim, min_ndim=3)
        _check_context(self, context, self.cross_attention_dim, x.shape[0])
        h = x + self.attn1(self.norm1(x))  # (B, N, dim)
        h = h + self.attn2(self.norm2(h), context)  # (B, N, dim) attends to (B, L, cross_dim)
        return h + self.ff(self.norm3(h))

    def backward(self, dout):
        # out = h2 + ff(norm3(h2)): the residual passes dout straight to h2, the sublayer adds its part
        dh2 = dout + self.norm3.backward(self.ff.backward(dout))
        # h2 = h1 + attn2(norm2(h1), context)
        attn2_grads = self.attn2.backward(dh2)
        da, dcontext = attn2_grads.dx, attn2_grads.dcontext
        dh1 = dh2 + self.norm2.backward(da)
        # h1 = x + attn1(norm1(x))
        dx = dh1 + self.norm1.backward(self.attn1.backward(dh1).dx)
        return BlockGrads(dx, dcontext=dcontext)


class Transformer2DModel(Module):
    """GroupNorm, proj_in, transformer blocks over pixels-as-tokens, proj_out, plus the input.

    ``forward(x (B, H, W, in_channels), context (B, L, cross_attention_dim)) -> (B, H, W, in_channels)``;
    ``backward(dout)`` returns :class:`~diffusion_np.nn.BlockGrads` ``(dx, dcontext)``.

    Parameters
    ----------
    num_attention_heads, attention_head_dim : heads and channels per head; the inner width is their product.
    in_channels : channels of x (and of the output).
    num_layers : how many BasicTransformerBlocks.
    cross_attention_dim : width of the text tokens.
    norm_num_groups : groups of the input GroupNorm (its eps is 1e-6, as in diffusers).
    use_linear_projection : proj_in/proj_out as Linear layers (SD 2.x) instead of 1x1 convs (SD 1.x).
        Channels-last, the two compute the same thing; only the weight layout and
        the state_dict shapes differ ((1, 1, C_in, C_out) vs (C_out, C_in)).
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        num_layers: int = 1,
        cross_attention_dim: int | None = None,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        norm_eps: float = 1e-5,
        rng=None,
        dtype=DEFAULT_DTYPE,
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.in_channels = in_channels
        self.cross_attention_dim = cross_attention_dim
        self.inner_dim = inner = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        # eps 1e-6 is hard-coded in diffusers' Transformer2DModel (and in the original SD code)
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6, dtype=dtype)
        if use_linear_projection:
            self.proj_in = Linear(in_channels, inner, rng=rng, dtype=dtype)
        else:
            self.proj_in = Conv2d(in_channels, inner, 1, rng=rng, dtype=dtype)
        self.transformer_blocks = ModuleList([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, cross_attention_dim,
                                  norm_eps=norm_eps, rng=rng, dtype=dtype)
            for _ in range(num_layers)
        ])
        if use_linear_projection:
            self.proj_out = Linear(inner, in_channels, rng=rng, dtype=dtype)
        else:
            self.proj_out = Conv2d(inner, in_channels, 1, rng=rng, dtype=dtype)

    def forward(self, x, context):
        check_image(self, x, self.in_channels)
        check_input_finite(self, x)
        B, H, W, C = x.shape
        _check_context(self, context, self.cross_attention_dim, B)
        h = self.norm(x)  # (B, H, W, C)
        # proj_in on the image (1x1 conv) or on the tokens (Linear): both act on the last axis
        h = self.proj_in(h)  # (B, H, W, C) -> (B, H, W, inner)
        h = h.reshape(B, H * W, self.inner_dim)  # (B, H, W, inner) -> (B, HW, inner): pixels as tokens
        for block in self.transformer_blocks:
            h = block(h, context)  # (B, HW, inner)
        h = h.reshape(B, H, W, self.inner_dim)  # (B, HW, inner) -> (B, H, W, inner)
        h = self.proj_out(h)  # (B, H, W, inner) -> (B, H, W, C)
        self._set_cache((B, H, W))
        return h + x  # the residual around the whole transformer

    def backward(self, dout):
        B, H, W = self._pop_cache()
        # out = proj_out(...) + x: dout reaches x directly and through the transformer
        dh = self.proj_out.backward(dout)  # (B, H, W, inner)
        dh = dh.reshape(B, H * W, self.inner_dim)  # (B, H, W, inner) -> (B, HW, inner)
        dcontext = None
        for block in reversed(list(self.transformer_blocks)):
            g = block.backward(dh)
            dh = g.dx
            # every block read the same context: its gradient is the sum over blocks
            dcontext = g.dcontext if dcontext is None else dcontext + g.dcontext
        dh = dh.reshape(B, H, W, self.inner_dim)  # (B, HW, inner) -> (B, H, W, inner)
        dh = self.proj_in.backward(dh)  # (B, H, W, C)
        dx = self.norm.backward(dh)
        dx += dout  # the residual branch
        return BlockGrads(dx, dcontext=dcontext)
