"""Embeddings: sinusoidal timestep features, the time-embedding MLP, and token lookup.

* :func:`timestep_embedding` / :class:`Timesteps`: the sinusoidal features of a
  diffusion timestep, the positional encoding of Vaswani et al. 2017 (Sec. 3.5)
  as DDPM (Ho et al. 2020, Appendix B) and diffusers' ``get_timestep_embedding``
  compute it. No parameters.
* :class:`TimestepEmbedding`: the MLP that turns those features into the time
  embedding every U-Net ResNet block receives: ``linear_1 -> SiLU -> linear_2``
  (diffusers' names, so ``time_embedding.linear_1.weight`` loads by name).
* :class:`Embedding`: a token (or position) lookup table, as ``torch.nn.Embedding``;
  the CLIP text encoder uses two.

Left out on purpose: diffusers' ``cond_proj``, ``post_act`` and ``out_dim``
options of TimestepEmbedding (Stable Diffusion uses none of them), activations
other than SiLU, and ``padding_idx`` / ``max_norm`` of torch's Embedding. There is
no gradient w.r.t. timesteps or token ids: they are integers (or, for
timesteps, fixed numbers), not something we learn.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, asnumpy, get_xp, scatter_add
from diffusion_np.nn.activation import silu_backward, silu_forward
from diffusion_np.nn.linear import Linear
from diffusion_np.nn.module import Module
from diffusion_np.nn.validate import check_features, check_input_finite, check_number, check_size


# --------------------------------------------------------------------------- timesteps
def timestep_embedding(
    timesteps,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
):
    """Sinusoidal timestep features, exactly as diffusers' ``get_timestep_embedding``.

    Parameters
    ----------
    timesteps : (B,) integer or float timesteps (fractional ones are fine).
    dim : number of features; an odd ``dim`` gets one zero column appended.
    flip_sin_to_cos : order ``[cos, sin]`` instead of ``[sin, cos]`` (Stable Diffusion: True).
    downscale_freq_shift : the ``s`` below (Stable Diffusion: 0; diffusers' default 1).
    scale : multiplies the arguments of sin and cos.
    max_period : the longest period, 10000 as in Vaswani et al.

    Returns
    -------
    (B, dim) float32, computed in float32 step by step as diffusers does. The two
    agree to about 1e-4 at t ~ 1000: there the argument t * freq_i itself is only
    known to one float32 ulp (6e-5), so no float32 implementation agrees more closely.

    Math: with ``half = dim // 2`` and ``i = 0 .. half-1``::

        freq_i = exp(-ln(max_period) * i / (half - s))
        arg_bi = scale * t_b * freq_i
        emb_b  = [sin(arg_b0..), cos(arg_b0..)]          (flip: [cos(..), sin(..)])

    The frequencies run geometrically from 1 down to about 1/max_period, so low
    features change fast with t and high ones slowly (Vaswani et al. Sec. 3.5).

    There is no backward: timesteps are inputs we never differentiate.
    """
    if not hasattr(timesteps, "shape"):
        timesteps = np.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timestep_embedding expects timesteps of shape (B,), got {tuple(timesteps.shape)}")
    if not (np.issubdtype(timesteps.dtype, np.integer) or np.issubdtype(timesteps.dtype, np.floating)):
        raise TypeError(f"timestep_embedding expects integer or float timesteps, got {timesteps.dtype}")
    if dim < 1:
        raise ValueError(f"timestep_embedding needs dim >= 1, got {dim}")
    half = dim // 2
    if half > 0 and half == downscale_freq_shift:
        raise ValueError(
            f"timestep_embedding: dim={dim} with downscale_freq_shift={downscale_freq_shift} divides "
            "by zero (dim // 2 - downscale_freq_shift = 0); use a larger dim or another shift"
        )
    xp = get_xp(timesteps)
    f32 = np.float32
    # Python floats keep float32 arrays float32 (NumPy 2 would promote through np.float64)
    exponent = xp.arange(half, dtype=f32) * float(-math.log(max_period))  # (half,)
    exponent = exponent / float(half - downscale_freq_shift)
    # exp in float64, rounded once to float32: NumPy's fast float32 exp is off by one ulp on
    # about a third of these entries, and at t = 999 one ulp of a frequency moves the sine's
    # argument by 6e-5. The correctly rounded value matches PyTorch's float32 exp on all but
    # a few entries (PyTorch's exp is itself within one ulp, not correctly rounded).
    freqs = xp.exp(exponent.astype(np.float64)).astype(f32)  # (half,)
    args = timesteps.astype(f32)[:, None] * freqs[None, :]  # (B, 1) * (1, half) -> (B, half)
    args = float(scale) * args
    emb = xp.concatenate([xp.sin(args), xp.cos(args)], axis=-1)  # (B, 2*half)
    if flip_sin_to_cos:
        emb = xp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)  # [sin, cos] -> [cos, sin]
    if dim % 2 == 1:
        emb = xp.concatenate([emb, xp.zeros((emb.shape[0], 1), dtype=f32)], axis=-1)  # zero pad
    return emb


class Timesteps(Module):
    """Module wrapper of :func:`timestep_embedding` (diffusers' ``Timesteps``); no parameters.

    ``forward(timesteps)``: (B,) -> (B, num_channels) float32.
    """

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1):
        super().__init__()
        self.num_channels = check_size(self, "num_channels", num_channels)
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = check_number(self, "downscale_freq_shift", downscale_freq_shift)
        self.scale = scale

    def forward(self, timesteps):
        return timestep_embedding(
            timesteps,
            self.num_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            downscale_freq_shift=self.downscale_freq_shift,
            scale=self.scale,
        )

    def backward(self, dout):
        """Nothing to pass on: timesteps are not differentiated. Returns None."""
        return None


class TimestepEmbedding(Module):
    """The time-embedding MLP: ``linear_2(silu(linear_1(x)))`` (diffusers' ``TimestepEmbedding``).

    Shapes: x (B, in_channels) -> (B, time_embed_dim); in Stable Diffusion
    in_channels = 320 (the sinusoidal features) and time_embed_dim = 1280.
    """

    def __init__(self, in_channels: int, time_embed_dim: int, act: str = "silu", rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        if act != "silu":
            raise ValueError(f"TimestepEmbedding supports act='silu' only, got {act!r}")
        rng = rng if rng is not None else np.random.default_rng(0)
        self.in_channels = check_size(self, "in_channels", in_channels)
        self.time_embed_dim = check_size(self, "time_embed_dim", time_embed_dim)
        self.linear_1 = Linear(in_channels, time_embed_dim, rng=rng, dtype=dtype)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim, rng=rng, dtype=dtype)

    def forward(self, x):
        check_features(self, x, self.in_channels, min_ndim=2)
        check_input_finite(self, x)
        h = self.linear_1(x)  # (B, in) -> (B, time_embed_dim)
        a, silu_cache = silu_forward(h)
        y = self.linear_2(a)  # (B, time_embed_dim) -> (B, time_embed_dim)
        self._set_cache(silu_cache)
        return y

    def backward(self, dout):
        silu_cache = self._pop_cache()
        dh = silu_backward(self.linear_2.backward(dout), silu_cache)
        return self.linear_1.backward(dh)


# --------------------------------------------------------------------------- tokens
class EmbeddingCache(NamedTuple):
    ids: object  # (...) the integer ids that were looked up
    num_embeddings: int


def embedding_forward(ids, weight):
    """Row lookup: ``out[...] = weight[ids[...]]``.

    Shapes: ids (...) integers in [0, V), weight (V, D) -> out (..., D).
    """
    return weight[ids], EmbeddingCache(ids, weight.shape[0])  # (...) -> (..., D)


def embedding_backward(dout, cache: EmbeddingCache, dweight=None):
    """Gradient w.r.t. the table: ``dweight[v] = sum of dout[p] over positions p with ids[p] == v``.

    A token that occurs twice gets both gradients summed, so this is a
    scatter-*add* (``backend.scatter_add``), not an assignment. When ``dweight``
    is given the gradient is added into it in place (and returned); otherwise a
    zero (V, D) array is made. Adding in place saves a full-size temporary: for
    CLIP's 49408 x 768 table that is 150 MB per step.
    """
    ids, num_embeddings = cache
    D = dout.shape[-1]
    if dweight is None:
        dweight = get_xp(dout).zeros((num_embeddings, D), dtype=dout.dtype)
    scatter_add(dweight, ids.reshape(-1), dout.reshape(-1, D))  # rows (P,) of (P, D) into (V, D)
    return dweight


class Embedding(Module):
    """Token lookup table (``torch.nn.Embedding``). Parameter ``weight`` (num_embeddings, embedding_dim).

    ``forward(ids)``: integer ids (...) in [0, num_embeddings) -> (..., embedding_dim).
    ``backward(dout)`` adds into ``grads["weight"]`` and returns None (ids have no gradient).
    Initialised N(0, 1) as in PyTorch.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.num_embeddings = check_size(self, "num_embeddings", num_embeddings)
        self.embedding_dim = check_size(self, "embedding_dim", embedding_dim)
        num_embeddings, embedding_dim = self.num_embeddings, self.embedding_dim
        self.add_param("weight", rng.standard_normal((num_embeddings, embedding_dim)).astype(dtype))

    def forward(self, ids):
        if not hasattr(ids, "dtype") or not np.issubdtype(ids.dtype, np.integer):
            got = ids.dtype if hasattr(ids, "dtype") else type(ids).__name__
            raise TypeError(f"Embedding expects integer ids, got {got}")
        if ids.size > 0:
            # one deliberate copy of two numbers (CuPy's indexing would wrap a bad id, not raise)
            lo, hi = (int(v) for v in asnumpy(get_xp(ids).stack([ids.min(), ids.max()])))
            if lo < 0 or hi >= self.num_embeddings:
                bad = hi if hi >= self.num_embeddings else lo
                raise ValueError(
                    f"Embedding expects ids in [0, {self.num_embeddings}), got id {bad} "
                    f"(ids range over [{lo}, {hi}])"
                )
        out, cache = embedding_forward(ids, self.weight)
        self._set_cache(cache)
        return out

    def backward(self, dout):
        # scatter straight into the accumulated gradient (see embedding_backward)
        cache = self._pop_cache()
        if "weight" in self.grads:  # a frozen table (Module.freeze) has no gradient buffer
            embedding_backward(dout, cache, dweight=self.grads["weight"])
        return None
