"""Scaled dot-product attention and the multi-head Attention layer of Stable Diffusion.

Implements (Vaswani et al. 2017, "Attention Is All You Need", Eq. 1)::

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V

as a forward/backward function pair (:func:`sdpa_forward`, :func:`sdpa_backward`)
and the multi-head layer :class:`Attention` that projects tokens to queries, keys
and values, splits them into heads, attends, merges the heads and projects back.
Parameter names follow diffusers' ``Attention`` (``to_q.weight``, ``to_k.weight``,
``to_v.weight``, ``to_out.0.weight``, ``to_out.0.bias``), so a diffusers
``attn1``/``attn2`` state_dict loads by name.

Speed choices (each explained where it is made): everything stays float32, the
scale 1/sqrt(d) is folded into the queries (an (N, d) multiply instead of an
(N, L) one), the softmax runs in place on the score matrix, and attention is two
batched matmuls each way with no Python loop over batch or heads.

Memory: the score matrix is (B, heads, N, L); at Stable Diffusion's first level
(64x64 latents, N = L = 4096 tokens, 8 heads) that is 512 MiB float32 per image,
kept in the cache for the backward pass. For inference, :func:`sdpa_chunked_forward`
(``Attention(chunk_size=...)``, or :func:`set_attention_chunk_size` on a whole model)
computes the queries in chunks and keeps no cache: (B, heads, chunk, L) at a time.

Left out on purpose: dropout on the attention probabilities (Stable Diffusion
uses none), a chunked backward pass and FlashAttention-style key tiling (chunking
is forward-only), group/spatial norms and the residual connection that some
diffusers configurations put inside Attention (our blocks add the residual
themselves, visibly), and key/query normalisation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, get_xp
from diffusion_np.nn import fast
from diffusion_np.nn.linear import Linear
from diffusion_np.nn.module import BlockGrads, Module, ModuleList
from diffusion_np.nn.validate import check_features, check_input_finite, check_size


# --------------------------------------------------------------------------- masks
def causal_mask(n: int, xp=np):
    """Boolean causal mask of shape (n, n): ``mask[i, j]`` is True when query i may attend to key j.

    Query i sees keys 0..i (the lower triangle, diagonal included), as in GPT and
    the CLIP text encoder, and as PyTorch's ``scaled_dot_product_attention(...,
    is_causal=True)``.
    """
    if n < 1:
        raise ValueError(f"causal_mask needs n >= 1, got {n}")
    return xp.tril(xp.ones((n, n), dtype=bool))


def _additive_mask(mask, dtype, xp):
    """Turn a boolean keep-mask into an additive one (0 where kept, -inf where masked).

    Float masks are returned as they are: they are already additive.
    """
    if mask.dtype != bool:
        return mask
    # a query row with every key masked would divide 0 by 0 in the softmax; checked for a host mask only
    # (on a device the `if` would wait for the GPU at every attention layer)
    if get_xp(mask) is np and not mask.any(axis=-1).all():
        raise ValueError("sdpa_forward: the boolean mask leaves some query with no key to attend to")
    return xp.where(mask, dtype.type(0.0), dtype.type(-np.inf))


def _check_sdpa_shapes(q, k, v, mask) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "sdpa_forward expects q (B, heads, N, d), k and v (B, heads, L, d), "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "sdpa_forward expects q (B, heads, N, d), k (B, heads, L, d) and v (B, heads, L, d_v) "
            f"with matching B, heads, L and d, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if mask is not None:
        if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.floating)):
            raise TypeError(
                f"sdpa_forward expects a boolean (keep where True) or float (additive) mask, got {mask.dtype}"
            )
        scores_shape = (*q.shape[:3], k.shape[2])
        try:
            np.broadcast_shapes(tuple(mask.shape), scores_shape)
        except ValueError:
            raise ValueError(
                f"sdpa_forward: mask of shape {tuple(mask.shape)} does not broadcast to the "
                f"scores (B, heads, N, L) = {scores_shape}"
            ) from None


# --------------------------------------------------------------------------- the op
class SDPACache(NamedTuple):
    q_scaled: object  # (B, heads, N, d) the queries times scale, needed for dK
    k: object  # (B, heads, L, d) needed for dQ
    v: object  # (B, heads, L, d) needed for dP
    p: object  # (B, heads, N, L) the attention probabilities
    out: object  # (B, heads, N, d) the output, for the cheap softmax row term
    scale: float


def sdpa_forward(q, k, v, mask=None, scale: float | None = None):
    """Scaled dot-product attention: ``out = softmax(q k^T * scale + mask) v``.

    Parameters
    ----------
    q : (B, heads, N, d) queries.
    k, v : (B, heads, L, d) keys and values (L may differ from N: cross-attention).
    mask : None, or an array that broadcasts to the scores (B, heads, N, L), e.g.
        (N, L) or (B, 1, 1, L). **Boolean masks keep where True** (PyTorch's
        convention; :func:`causal_mask` makes one); **float masks are added** to the
        scores (0 to keep, -inf or a large negative number to drop). A boolean mask
        that leaves a query with no key raises ValueError (a NumPy mask; a device mask
        is not checked, which would be a synchronisation). The mask is a constant:
        it gets no gradient.
    scale : multiplies the scores; default ``1 / sqrt(d)`` (Vaswani et al. Eq. 1).

    Returns
    -------
    out : (B, heads, N, d)
    cache : SDPACache for :func:`sdpa_backward`. It holds ``out`` itself: change
        ``out`` in place only after the backward pass.

    An additive mask with every key of a row at -inf gives NaN for that query,
    as the formula does (0/0).

    Math (per batch and head, P_i the i-th row of P)::

        S = scale * q k^T + mask        (N, L)
        P = softmax(S) along the keys   P_ij = exp(S_ij - max_j S_ij) / sum_j exp(S_ij - max_j S_ij)
        out = P v                       (N, d)

    Subtracting the row maximum changes nothing mathematically (softmax is
    shift-invariant) but keeps exp() from overflowing.
    """
    _check_sdpa_shapes(q, k, v, mask)
    xp = get_xp(q, k, v)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # Fold the scale into q: (q * s) k^T == s (q k^T), and q is (N, d) where the
    # scores are (N, L), so this is the cheaper place for the multiply. A Python
    # float keeps float32 float32.
    q_scaled = q * scale
    # k^T as a contiguous (d, L) copy: BLAS multiplies by a transposed view ("NT" gemm) about
    # 2x slower than by a plain matrix at these small per-head sizes (measured); the copy is
    # only L*d numbers against the N*L*d multiply-adds of the matmul.
    k_t = xp.ascontiguousarray(k.swapaxes(-1, -2))  # (B, heads, L, d) -> (B, heads, d, L)
    s = q_scaled @ k_t  # (B, heads, N, d) @ (B, heads, d, L) -> (B, heads, N, L)
    if mask is not None:
        s += _additive_mask(mask, s.dtype, xp)  # broadcast (.., N, L) onto (B, heads, N, L)
    # softmax over the keys, in place: the (N, L) score matrix becomes P
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    p = s
    out = p @ v  # (B, heads, N, L) @ (B, heads, L, d) -> (B, heads, N, d)
    return out, SDPACache(q_scaled, k, v, p, out, scale)


def sdpa_backward(dout, cache: SDPACache):
    """Gradients of :func:`sdpa_forward` w.r.t. q, k and v: returns ``(dq, dk, dv)``.

    Math (per batch and head; dX means dLoss/dX)::

        dv = P^T dout                       (L, N) @ (N, d) -> (L, d)
        dP = dout v^T                       (N, d) @ (d, L) -> (N, L)
        dS = P * (dP - rowsum(dP * P))      softmax Jacobian-vector product
        dq = scale * dS k                   (N, L) @ (L, d) -> (N, d)
        dk = scale * dS^T q = dS^T (scale q)  (L, N) @ (N, d) -> (L, d)

    The softmax line: within one row, P = softmax(S) has the Jacobian
    ∂P_i/∂S_j = P_i (delta_ij - P_j), so
    dS_j = sum_i dP_i P_i (delta_ij - P_j) = P_j (dP_j - sum_i dP_i P_i).
    The row term sum_j dP_ij P_ij equals dout_i . out_i, because
    sum_j P_ij (dout_i . v_j) = dout_i . (sum_j P_ij v_j) (the same identity the
    FlashAttention backward pass uses, Dao et al. 2022): an (N, d) product instead
    of an (N, L) one, so we compute it that way.

    The mask needs no gradient and needs no special care here: masked entries
    have P = 0, so dS is 0 there too.
    """
    q_scaled, k, v, p, out, scale = cache
    xp = get_xp(dout, v)
    dv = p.swapaxes(-1, -2) @ dout  # (B, heads, L, N) @ (B, heads, N, d) -> (B, heads, L, d)
    v_t = xp.ascontiguousarray(v.swapaxes(-1, -2))  # (B, heads, d, L): see k_t in sdpa_forward
    dp = dout @ v_t  # (B, heads, N, d) @ (B, heads, d, L) -> (B, heads, N, L)
    # rowsum(dP * P) == rowsum(dout * out); einsum does the product and the sum in one pass
    # with no (N, d) temporary (3x faster than (dout * out).sum(-1) here)
    row = xp.einsum("bhnd,bhnd->bhn", dout, out)  # (B, heads, N)
    dp -= row[..., None]  # broadcast (B, heads, N, 1) over the keys
    dp *= p  # dS, in place over dP
    ds = dp
    dq = ds @ k  # (B, heads, N, L) @ (B, heads, L, d) -> (B, heads, N, d)
    dq *= scale
    dk = ds.swapaxes(-1, -2) @ q_scaled  # (B, heads, L, N) @ (B, heads, N, d) -> (B, heads, L, d)
    return dq, dk, dv


def sdpa_chunked_forward(q, k, v, mask=None, scale: float | None = None, chunk_size: int = 1024):
    """:func:`sdpa_forward` computed ``chunk_size`` queries at a time; forward only, no cache.

    Every query row of softmax(q k^T * scale + mask) v depends on its own row of
    scores only, so the rows can be computed in blocks: peak memory for the scores
    falls from (B, heads, N, L) to (B, heads, chunk_size, L), and the result is the
    same (each row goes through the same matmuls and softmax; at most a last-bit
    difference from BLAS blocking). Nothing is cached, so there is no backward: use
    it for sampling. The loop runs over ceil(N / chunk_size) blocks, not over pixels.
    On two threads or more (NumPy arrays, not in reference mode) the chunks are
    ``chunk_size / threads`` queries each, run on the threads of
    :mod:`diffusion_np.nn.fast.parallel`: the scores in memory at once stay those of
    ``chunk_size`` queries.

    Shapes and ``mask``/``scale`` as :func:`sdpa_forward`; returns ``out`` (B, heads, N, d_v).
    """
    _check_sdpa_shapes(q, k, v, mask)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"sdpa_chunked_forward: chunk_size must be a positive int, got {chunk_size!r}")
    xp = get_xp(q, k, v)
    B, heads, N, _ = q.shape
    out = xp.empty((B, heads, N, v.shape[-1]), dtype=xp.result_type(q, v))

    def chunk(start: int, stop: int) -> None:
        chunk_mask = mask
        if mask is not None and mask.ndim >= 2 and mask.shape[-2] != 1:
            chunk_mask = mask[..., start:stop, :]  # the mask's query axis, if it has one
        out[:, :, start:stop], _ = sdpa_forward(q[:, :, start:stop], k, v, mask=chunk_mask, scale=scale)

    if xp is np and not fast.reference_on() and fast.get_threads() > 1:
        fast.parallel.run_blocks(chunk, N, -(-chunk_size // fast.get_threads()))
    else:
        for start in range(0, N, chunk_size):
            chunk(start, min(start + chunk_size, N))
    return out


# --------------------------------------------------------------------------- heads
def sdpa_blocked_forward(q, k, v, mask=None):
    """:func:`sdpa_forward`, in blocks of the batch on the threads when the (B, heads, N, L)
    scores are large enough (nn/fast/parallel.py); its cache goes to :func:`sdpa_blocked_backward`."""
    scores = q.nbytes // q.shape[3] * k.shape[2]  # bytes of the (B, heads, N, L) scores
    if fast.splits_batch(q, k, v, nbytes=scores):
        return fast.parallel.forward_in_blocks(sdpa_forward, (q, k, v), (*q.shape[:3], v.shape[3]), mask,
                                               nbytes=scores)
    return sdpa_forward(q, k, v, mask=mask)


def sdpa_blocked_backward(dout, cache):
    """The gradients ``(dq, dk, dv)`` of :func:`sdpa_blocked_forward`, in blocks where it ran in blocks."""
    if isinstance(cache, fast.parallel.BlockCaches):
        return fast.parallel.backward_in_blocks(sdpa_backward, dout, cache, n_batch_grads=3)
    return sdpa_backward(dout, cache)


def _split_heads(x, heads: int):
    """(B, N, heads*d) -> (B, heads, N, d) (a view: no copy)."""
    B, N, inner = x.shape
    x = x.reshape(B, N, heads, inner // heads)  # (B, N, heads*d) -> (B, N, heads, d)
    return x.transpose(0, 2, 1, 3)  # (B, N, heads, d) -> (B, heads, N, d)


def _merge_heads(x):
    """(B, heads, N, d) -> (B, N, heads*d) (one copy)."""
    B, heads, N, d = x.shape
    x = x.transpose(0, 2, 1, 3)  # (B, heads, N, d) -> (B, N, heads, d)
    return x.reshape(B, N, heads * d)  # (B, N, heads, d) -> (B, N, heads*d)


def _check_tokens(layer, x, features: int, what: str) -> None:
    check_features(layer, x, features, min_ndim=3, what=what)
    if x.ndim != 3:
        raise ValueError(
            f"{type(layer).__name__} expects {what} of shape (B, tokens, {features}), got {tuple(x.shape)}"
        )
    check_input_finite(layer, x, what)


class Attention(Module):
    """Multi-head attention as in diffusers' ``Attention`` (self- or cross-attention).

    ``forward(x, context=None)``::

        q = x W_q^T,  k = c W_k^T,  v = c W_v^T       c = context, or x itself when context is None
                                                      (+ b_q, b_k, b_v with ``bias=True``)
        out = concat_h(softmax(q_h k_h^T / sqrt(d) [+ causal mask]) v_h) W_out^T + b_out

    Parameters
    ----------
    query_dim : channels of x.
    cross_attention_dim : channels of ``context``; None means the same as ``query_dim``.
    heads, dim_head : number of heads and channels per head (inner width heads * dim_head).
    out_bias : whether ``to_out.0`` has a bias.
    bias : whether ``to_q``/``to_k``/``to_v`` have biases (diffusers' ``bias``). Off by default,
        as in Stable Diffusion's U-Net; CLIP's text encoder has them.
    causal : attend only to earlier tokens (self-attention only; the CLIP text encoder).
    chunk_size : None (default), or attend ``chunk_size`` queries at a time with
        :func:`sdpa_chunked_forward` when there are more queries than that. Inference only:
        a chunked forward keeps no cache, and ``backward`` after it raises. Change it any
        time (``layer.chunk_size = 1024``) or model-wide with :func:`set_attention_chunk_size`.

    Notes
    -----
    Shapes: x (B, N, query_dim), context (B, L, cross_attention_dim) -> (B, N, query_dim).

    ``backward(dout)`` returns a :class:`~diffusion_np.nn.BlockGrads`: ``dx``, and
    ``dcontext`` after cross-attention, None after self-attention (``context=None``:
    x fed the queries *and* the keys/values, so both paths are summed into dx).

    ``attention_edit`` (an attribute, None by default) is a hook for attention editing such as
    prompt-to-prompt (:mod:`diffusion_np.pipelines.prompt_to_prompt`): a callable
    ``edit(probs (B, heads, N, L), self_attention: bool) -> probs`` that may change the attention
    probabilities before they weight the values. With a hook the layer runs the plain
    :func:`sdpa_forward` and keeps no cache (inference only; ``backward`` then raises); without
    one (the default) nothing changes, and the cost is one ``is None`` test.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        out_bias: bool = True,
        causal: bool = False,
        bias: bool = False,
        rng=None,
        dtype=DEFAULT_DTYPE,
        chunk_size: int | None = None,
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.chunk_size = chunk_size
        self.attention_edit = None  # prompt-to-prompt's hook (see the class docstring)
        self.query_dim = query_dim = check_size(self, "query_dim", query_dim)
        if cross_attention_dim is not None:
            cross_attention_dim = check_size(self, "cross_attention_dim", cross_attention_dim)
        self.cross_attention_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        heads, dim_head = check_size(self, "heads", heads), check_size(self, "dim_head", dim_head)
        self.heads, self.dim_head, self.causal = heads, dim_head, causal
        inner = heads * dim_head
        self.to_q = Linear(query_dim, inner, bias=bias, rng=rng, dtype=dtype)
        self.to_k = Linear(self.cross_attention_dim, inner, bias=bias, rng=rng, dtype=dtype)
        self.to_v = Linear(self.cross_attention_dim, inner, bias=bias, rng=rng, dtype=dtype)
        # a list holding one Linear, so the parameters are named to_out.0.* as in diffusers
        # (diffusers' to_out.1 is a Dropout, which has no parameters and is left out)
        self.to_out = ModuleList([Linear(inner, query_dim, bias=out_bias, rng=rng, dtype=dtype)])

    def forward(self, x, context=None):
        _check_tokens(self, x, self.query_dim, "x")
        self_attention = context is None
        if self_attention:
            context = x
        else:
            if self.causal:
                raise ValueError("Attention(causal=True) is for self-attention; got a context")
            _check_tokens(self, context, self.cross_attention_dim, "context")
            if context.shape[0] != x.shape[0]:
                raise ValueError(
                    f"Attention expects x and context with the same batch size, got x "
                    f"{tuple(x.shape)} and context {tuple(context.shape)}"
                )
        q = _split_heads(self.to_q(x), self.heads)  # (B, N, heads*d) -> (B, heads, N, d)
        k = _split_heads(self.to_k(context), self.heads)  # (B, L, heads*d) -> (B, heads, L, d)
        v = _split_heads(self.to_v(context), self.heads)  # (B, L, heads*d) -> (B, heads, L, d)
        mask = causal_mask(x.shape[1], get_xp(x)) if self.causal else None
        if self.attention_edit is not None:  # attention editing: the plain path, the probabilities changed
            _, probs_cache = sdpa_forward(q, k, v, mask=mask)  # probs_cache.p: (B, heads, N, L)
            out = self.attention_edit(probs_cache.p, self_attention) @ v  # (B, heads, N, L) @ (B, heads, L, d)
            sdpa_cache = None  # inference only, as a chunked forward
        elif self.chunk_size is not None and x.shape[1] > self.chunk_size:
            out = sdpa_chunked_forward(q, k, v, mask=mask, chunk_size=self.chunk_size)  # (B, heads, N, d)
            sdpa_cache = None  # forward only: the probabilities were never kept
        else:  # in blocks of the batch on the threads where large enough
            out, sdpa_cache = sdpa_blocked_forward(q, k, v, mask=mask)  # (B, heads, N, d)
        y = self.to_out[0](_merge_heads(out))  # (B, N, heads*d) -> (B, N, query_dim)
        self._set_cache((sdpa_cache, self_attention))
        return y

    def backward(self, dout):
        sdpa_cache, self_attention = self._pop_cache()
        if sdpa_cache is None:
            raise RuntimeError(
                f"Attention.backward after a chunked or edited forward (chunk_size={self.chunk_size}, "
                f"attention_edit={self.attention_edit!r}): both are for inference and keep no cache; set "
                "chunk_size=None and attention_edit=None for training"
            )
        d_merged = self.to_out[0].backward(dout)  # (B, N, heads*d)
        dq, dk, dv = sdpa_blocked_backward(_split_heads(d_merged, self.heads), sdpa_cache)
        dx = self.to_q.backward(_merge_heads(dq))  # (B, N, query_dim)
        dcontext = self.to_k.backward(_merge_heads(dk))  # (B, L, cross_attention_dim)
        dcontext += self.to_v.backward(_merge_heads(dv))
        if self_attention:
            # x was also the context: its gradient is the sum over both uses
            dx += dcontext
            return BlockGrads(dx)
        return BlockGrads(dx, dcontext=dcontext)


def set_attention_chunk_size(model: Module, chunk_size: int | None) -> int:
    """Set ``chunk_size`` on every :class:`Attention` inside ``model``; returns how many.

    ``set_attention_chunk_size(unet, 1024)`` makes a Stable Diffusion U-Net's attention
    at 64x64 latents hold (B, 8, 1024, 4096) scores at a time instead of (B, 8, 4096, 4096);
    None switches chunking off (needed again for training).
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size < 1):
        raise ValueError(f"set_attention_chunk_size: chunk_size must be a positive int or None, got {chunk_size!r}")
    layers = [m for _, m in model.named_modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.chunk_size = chunk_size
    return len(layers)
