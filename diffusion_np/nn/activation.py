"""Activations used by Stable Diffusion, and Dropout.

* Sigmoid and SiLU (a.k.a. swish, x * sigmoid(x); Elfwing et al. 2017,
  Ramachandran et al. 2017): the U-Net's and the VAE's nonlinearity.
* GELU, exact x * Phi(x) with the erf, and the tanh approximation
  (Hendrycks & Gimpel 2016, Sec. 2).
* QuickGELU, x * sigmoid(1.702 x): the approximation CLIP's text encoder was
  trained with (Hendrycks & Gimpel 2016, Sec. 2; OpenAI CLIP).
* GEGLU (Shazeer 2020, "GLU Variants Improve Transformer", Eq. 5): the first
  half of the transformer feed-forward, ``proj`` then h * gelu(g).
* Dropout (Srivastava et al. 2014), "inverted": kept units are scaled by
  1 / (1 - p) during training so evaluation is the identity.

Every op is a forward/backward pair on any shape, elementwise, followed by the
Module that validates its input and keeps the cache.

Left out on purpose: ReLU/LeakyReLU/Mish (SD does not use them), in-place
activations, and GEGLU's NPU fused kernel.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, erf, get_xp
from diffusion_np.nn import fast
from diffusion_np.nn.fast import activation as fast_activation
from diffusion_np.nn.linear import Linear
from diffusion_np.nn.module import Module
from diffusion_np.nn.validate import check_features, check_float, check_input_finite, check_size

# ----------------------------------------------------------------------------- Sigmoid


class SigmoidCache(NamedTuple):
    s: object  # sigmoid(x), all the backward needs


def _sigmoid(x):
    """sigmoid(x) = 1 / (1 + exp(-x)), computed as 0.5 * (1 + tanh(x / 2)).

    The two are equal (tanh(u) = 2 sigmoid(2u) - 1). The textbook form overflows
    in exp(-x) for x < -88 (float32) and warns; tanh cannot overflow, costs one
    transcendental, and measured 0.34 ms on 1M float32 values against 5-10 ms for
    the usual "exp(-|x|) with a where() for the sign" stable form. The price: the
    absolute error stays ~1e-7 (float32) but for x < -17 the result is 0 instead
    of a tiny positive number; no layer here needs sigmoid's relative precision
    in that tail.
    """
    xp = get_xp(x)
    s = xp.tanh(x * 0.5)  # Python floats keep float32 float32
    s *= 0.5
    s += 0.5
    return s


def sigmoid_forward(x):
    """s = sigmoid(x) = 1 / (1 + exp(-x)), stable for any x (see ``_sigmoid``)."""
    s = _sigmoid(x)
    return s, SigmoidCache(s)


def sigmoid_backward(dout, cache: SigmoidCache):
    """ds/dx = s (1 - s), so dx = dout * s * (1 - s)."""
    s = cache.s
    return dout * s * (1.0 - s)


# ----------------------------------------------------------------------------- SiLU


class SiLUCache(NamedTuple):
    x: object
    s: object  # sigmoid(x)


def silu_forward(x):
    """y = x * sigmoid(x)."""
    s = _sigmoid(x)
    return x * s, SiLUCache(x, s)


def silu_backward(dout, cache: SiLUCache):
    """dy/dx = s + x s (1 - s) = s (1 + x (1 - s))."""
    x, s = cache
    dx = 1.0 - s
    dx *= x
    dx += 1.0
    dx *= s
    dx *= dout
    return dx


# ----------------------------------------------------------------------------- GELU

_SQRT_HALF = 1.0 / math.sqrt(2.0)  # Phi(x) = 0.5 (1 + erf(x / sqrt(2)))
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)  # phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
_TANH_K = math.sqrt(2.0 / math.pi)  # constants of the tanh approximation
_TANH_C = 0.044715


class GELUCache(NamedTuple):
    x: object
    a: object  # "none": Phi(x);  "tanh": tanh(k (x + c x^3))
    approximate: str


def gelu_forward(x, approximate: str = "none"):
    """GELU (Hendrycks & Gimpel 2016).

    exact ("none"):  y = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
    "tanh":          y = 0.5 x (1 + tanh(k (x + 0.044715 x^3))),  k = sqrt(2 / pi)

    Same names and defaults as ``torch.nn.functional.gelu``. Phi of a float32 NumPy
    array comes from :func:`diffusion_np.nn.fast.activation.normal_cdf` (a few NumPy
    passes instead of SciPy's scalar erf) unless reference mode is on.
    """
    if approximate == "none":
        if not fast.reference_on() and fast_activation.applies_to(x):
            a = fast_activation.normal_cdf(x)  # Phi(x), the fast path
        else:
            a = erf(x * _SQRT_HALF)
            a += 1.0
            a *= 0.5  # Phi(x)
    elif approximate == "tanh":
        xp = get_xp(x)
        a = xp.tanh(_TANH_K * (x + _TANH_C * x * x * x))
    else:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    y = x * a if approximate == "none" else 0.5 * x * (1.0 + a)
    return y, GELUCache(x, a, approximate)


def gelu_backward(dout, cache: GELUCache):
    """exact:  dy/dx = Phi(x) + x phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    "tanh":   with t = tanh(u), u = k (x + c x^3):
              dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2)
    """
    x, a, approximate = cache
    xp = get_xp(x)
    if approximate == "none":
        dx = x * (xp.exp(-0.5 * x * x) * _INV_SQRT_2PI)  # x phi(x)
        dx += a
    else:
        dx = 0.5 * x * (1.0 - a * a) * (_TANH_K * (1.0 + 3.0 * _TANH_C * x * x))
        dx += 0.5 * (1.0 + a)
    dx *= dout
    return dx


# ----------------------------------------------------------------------------- QuickGELU

_QUICK_GELU_ALPHA = 1.702  # CLIP's constant: x sigmoid(1.702 x) ~ x Phi(x)


class QuickGELUCache(NamedTuple):
    x: object
    s: object  # sigmoid(1.702 x)


def quick_gelu_forward(x):
    """y = x * sigmoid(1.702 x) (CLIP's activation)."""
    s = _sigmoid(_QUICK_GELU_ALPHA * x)
    return x * s, QuickGELUCache(x, s)


def quick_gelu_backward(dout, cache: QuickGELUCache):
    """dy/dx = s + 1.702 x s (1 - s)."""
    x, s = cache
    dx = 1.0 - s
    dx *= x
    dx *= _QUICK_GELU_ALPHA
    dx += 1.0
    dx *= s
    dx *= dout
    return dx


# ----------------------------------------------------------------------------- GEGLU


class GEGLUCache(NamedTuple):
    h: object  # (..., D) first half of the projection
    gelu_cache: GELUCache  # g and Phi(g): gelu(g) = g Phi(g) is recomputed, not kept (a (..., D) array less)


def geglu_forward(hg):
    """The gate of GEGLU (Shazeer 2020, Eq. 5), applied to an already projected input.

    hg (..., 2D) is split on the last axis into (h, g), in that order (diffusers'
    ``hidden_states.chunk(2, dim=-1)``), and  out = h * gelu(g),  exact GELU.
    """
    two_d = hg.shape[-1]
    if two_d % 2 != 0:
        raise ValueError(f"geglu_forward: the last axis must have even size 2D, got {tuple(hg.shape)}")
    D = two_d // 2
    h, g = hg[..., :D], hg[..., D:]  # (..., 2D) -> (..., D), (..., D)
    gelu_g, gelu_cache = gelu_forward(g)
    return h * gelu_g, GEGLUCache(h, gelu_cache)


def geglu_backward(dout, cache: GEGLUCache):
    """dh = dout * gelu(g),  dg = gelu'(g) * (dout * h);  dhg = [dh, dg] on the last axis."""
    h, gelu_cache = cache
    xp = get_xp(dout)
    dh = gelu_cache.x * gelu_cache.a  # gelu(g) = g Phi(g), recomputed: one pass instead of a cached array
    dh *= dout
    dg = gelu_backward(dout * h, gelu_cache)
    return xp.concatenate([dh, dg], axis=-1)  # (..., D) + (..., D) -> (..., 2D)


# ----------------------------------------------------------------------------- Dropout


class DropoutCache(NamedTuple):
    mask: object  # 0 or 1/(1-p), the input's dtype and shape; None means identity


def dropout_forward(x, p: float, rng: np.random.Generator):
    """Inverted dropout: y = x * m,  m_i = 1/(1-p) with probability 1-p, else 0.

    E[y] = x, so evaluation needs no rescaling. The mask is drawn on the host
    with ``rng`` (so a seed gives the same mask on every device) and moved to x's
    device. p = 1 drops everything (y = 0), as in PyTorch.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    xp = get_xp(x)
    keep = rng.random(x.shape, dtype=np.float32) >= p  # P(keep) = 1 - p
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0  # p = 1: no survivors to scale
    mask = xp.asarray(keep).astype(x.dtype)
    mask *= scale
    return x * mask, DropoutCache(mask)


def dropout_backward(dout, cache: DropoutCache):
    """dx = dout * m, with the very mask of the forward pass."""
    return dout if cache.mask is None else dout * cache.mask


# ----------------------------------------------------------------------------- Modules


class _Elementwise(Module):
    """An activation with no parameters: validate, run the op pair, keep the cache.
    Subclasses name their op pair as ``_forward`` and ``_backward``."""

    def _forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _backward(self, dout, cache):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        check_float(self, x)
        check_input_finite(self, x)
        y, cache = self._forward(x)
        self._set_cache(cache)
        return y

    def backward(self, dout):
        return self._backward(dout, self._pop_cache())

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Sigmoid(_Elementwise):
    """y = 1 / (1 + exp(-x)), stable for any x."""

    _forward = staticmethod(sigmoid_forward)
    _backward = staticmethod(sigmoid_backward)


class SiLU(_Elementwise):
    """y = x * sigmoid(x) (swish)."""

    _forward = staticmethod(silu_forward)
    _backward = staticmethod(silu_backward)


class QuickGELU(_Elementwise):
    """y = x * sigmoid(1.702 x), the activation of CLIP's text encoder."""

    _forward = staticmethod(quick_gelu_forward)
    _backward = staticmethod(quick_gelu_backward)


class GELU(_Elementwise):
    """GELU, exact (``approximate="none"``, the default) or ``approximate="tanh"``."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def _forward(self, x):
        return gelu_forward(x, self.approximate)

    def _backward(self, dout, cache):
        return gelu_backward(dout, cache)

    def __repr__(self) -> str:
        return f"GELU(approximate={self.approximate!r})"


class GEGLU(Module):
    """GEGLU (Shazeer 2020): ``proj`` = Linear(dim_in, 2 dim_out), split into (h, g),
    out = h * gelu(g). Parameters ``proj.weight`` (2 dim_out, dim_in) and
    ``proj.bias``, as diffusers' ``GEGLU`` (``ff.net.0.proj`` in a transformer block).
    """

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True, rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.dim_in, self.dim_out = check_size(self, "dim_in", dim_in), check_size(self, "dim_out", dim_out)
        dim_in, dim_out = self.dim_in, self.dim_out
        self.proj = Linear(dim_in, 2 * dim_out, bias=bias, rng=rng, dtype=dtype)

    def forward(self, x):
        check_features(self, x, self.dim_in, min_ndim=2)
        check_input_finite(self, x)
        hg = self.proj(x)  # (..., dim_in) -> (..., 2 dim_out)
        if fast.splits_batch(hg):  # blocks of the batch on the threads (nn/fast/parallel.py)
            out, cache = fast.parallel.forward_in_blocks(geglu_forward, (hg,), (*hg.shape[:-1], self.dim_out))
        else:
            out, cache = geglu_forward(hg)  # (..., 2 dim_out) -> (..., dim_out)
        self._set_cache(cache)
        return out

    def backward(self, dout):
        cache = self._pop_cache()
        if isinstance(cache, fast.parallel.BlockCaches):
            (dhg,) = fast.parallel.backward_in_blocks(lambda d, c: (geglu_backward(d, c),), dout, cache)
        else:
            dhg = geglu_backward(dout, cache)  # (..., dim_out) -> (..., 2 dim_out)
        return self.proj.backward(dhg)  # -> (..., dim_in); adds into proj.grads


class Dropout(Module):
    """Inverted dropout with probability ``p``; the identity in eval mode or at p = 0.

    The module owns its random generator, seeded here, so a run is reproducible
    and two Dropouts built with different seeds draw different masks.
    """

    def __init__(self, p: float = 0.0, seed: int | None = 0) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = float(p)
        self.rng = np.random.default_rng(seed)

    def forward(self, x):
        check_float(self, x)
        check_input_finite(self, x)
        if not self.training or self.p == 0.0:
            self._set_cache(DropoutCache(None))
            return x
        y, cache = dropout_forward(x, self.p, self.rng)
        self._set_cache(cache)
        return y

    def backward(self, dout):
        return dropout_backward(dout, self._pop_cache())

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"
