"""Linear (fully connected) layer: y = x W^T + b.

Forward and backward side by side. Weights use PyTorch's layout ``(out, in)``,
so a diffusers/PyTorch ``state_dict`` loads without a transpose; ``x @ W.T``
costs nothing extra (BLAS reads the transposed operand in place).

Works on any number of leading dimensions: ``(..., in) -> (..., out)``, e.g.
tokens ``(B, L, C)`` or channels-last pixels ``(B, H, W, C)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE
from diffusion_np.nn import fast
from diffusion_np.nn.module import Module, init_uniform
from diffusion_np.nn.validate import check_features, check_input_finite, check_size


class LinearCache(NamedTuple):
    x: object  # (..., in) the input, needed for dW
    w: object  # (out, in) the weight, needed for dx
    has_bias: bool


def linear_forward(x, w, b=None):
    """y = x W^T + b.

    Shapes: x (..., in), w (out, in), b (out,) or None -> y (..., out).
    """
    # one (N, in) @ (in, out) product for all N rows: NumPy multiplies a stacked (B, L, in)
    # array by a matrix as B separate small products, 1.5-3x slower at the U-Net's token counts;
    # on two threads or more, large products are split by rows (nn/fast/parallel.py)
    y = fast.matmul(x.reshape(-1, x.shape[-1]), w.T)  # (N, in) @ (in, out) -> (N, out)
    y = y.reshape(*x.shape[:-1], w.shape[0])  # -> (..., out)
    if b is not None:
        y += b
    return y, LinearCache(x, w, b is not None)


def linear_backward(dout, cache: LinearCache):
    """Gradients of y = x W^T + b.

    dx = dout W              (..., out) @ (out, in) -> (..., in)
    dW = sum over rows of dout^T x   (out, N) @ (N, in) -> (out, in)
    db = sum over rows of dout       (out,)
    """
    x, w, has_bias = cache
    n_in, n_out = x.shape[-1], dout.shape[-1]
    dout2 = dout.reshape(-1, n_out)  # (N, out) with N = product of leading dims
    dx = fast.matmul(dout2, w).reshape(x.shape)  # (N, out) @ (out, in): one product, as in the forward
    dw = fast.matmul_tn(dout2, x.reshape(-1, n_in))  # (out, N) @ (N, in) -> (out, in)
    db = dout2.sum(axis=0) if has_bias else None
    return dx, dw, db


class Linear(Module):
    """``y = x W^T + b`` on the last axis. Parameters: ``weight`` (out, in), ``bias`` (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        in_features = check_size(self, "in_features", in_features)
        out_features = check_size(self, "out_features", out_features)
        self.in_features, self.out_features = in_features, out_features
        self.add_param("weight", init_uniform(rng, (out_features, in_features), in_features, dtype))
        if bias:
            self.add_param("bias", init_uniform(rng, (out_features,), in_features, dtype))

    def forward(self, x):
        check_features(self, x, self.in_features, min_ndim=2)
        check_input_finite(self, x)
        y, cache = linear_forward(x, self.weight, self.params.get("bias"))
        self._set_cache(cache)
        return y

    def backward(self, dout):
        cache = self._pop_cache()
        if not self.grads:  # frozen (Module.freeze, LoRA's base): dx = dout W only, no dW to form
            dx = fast.matmul(dout.reshape(-1, self.out_features), cache.w)  # (N, out) @ (out, in)
            return dx.reshape(cache.x.shape)
        dx, dw, db = linear_backward(dout, cache)
        self.add_grad("weight", dw)
        if db is not None:
            self.add_grad("bias", db)
        return dx
