"""The text encoder of Stable Diffusion: CLIP's text transformer, with a hand-written backward.

Token ids in, one vector per token out; the U-Net's cross-attention reads these
vectors as its context. The architecture is CLIP's text tower (Radford et al.
2021, Sec. 2.4), a GPT-2-style pre-LN transformer with a causal mask::

    h = token_embedding[ids] + position_embedding[0..L-1]           (B, L, D)
    for each layer:
        h = h + self_attn(layer_norm1(h))      causal multi-head attention
        h = h + mlp(layer_norm2(h))            fc1 -> quick_gelu -> fc2
    last_hidden_state = final_layer_norm(h)                         (B, L, D)

Backward runs the same lines in reverse: each residual line ``h = h + f(ln(h))``
sends its upstream gradient down both paths and sums them,
``dh_in = dh_out + ln.backward(f.backward(dh_out))``; the embeddings end the
chain with a scatter-add into the token table (a token used twice gets both
gradients) and a sum over the batch into the position table. This is how the
diffusion loss trains the text encoder: the U-Net's cross-attention returns
d(context), and ``TextEncoder.backward(dcontext)`` takes it from there.

Names. Parameter names are those of transformers' ``CLIPTextModel`` checkpoints
(and of Stable Diffusion's ``text_encoder/model.safetensors``), e.g.
``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.0.self_attn.q_proj.weight``,
``text_model.encoder.layers.0.mlp.fc1.bias``, ``text_model.final_layer_norm.weight``,
so such a state_dict loads by name. (transformers 5 drops the ``text_model.``
prefix from ``CLIPTextModel.state_dict()`` and adds it back when saving; put it
back with ``{"text_model." + k: v}`` when loading a live model's state_dict.)
For that reason the attention here is its own small :class:`CLIPAttention`, with
``q_proj``/``k_proj``/``v_proj``/``out_proj`` children (all with biases), that
reuses the op pair ``sdpa_forward``/``sdpa_backward`` of ``nn/attention.py``;
the diffusers-named ``nn.Attention`` (``to_q``, ``to_out.0``) would need a table
of renamed keys, one more thing for a student to translate.

Class names mirror transformers' ``modeling_clip.py`` so the two files can be
read side by side: CLIPTextEmbeddings, CLIPAttention, CLIPMLP, CLIPEncoderLayer,
CLIPEncoder, CLIPTextTransformer, and :class:`TextEncoder` (``CLIPTextModel``).

Left out on purpose: an attention padding mask (Stable Diffusion's CLIP uses only
the causal mask; with it, real tokens never see the padding after them, and the
padding positions' own vectors are part of SD's context as they are here);
``position_ids`` other than 0..L-1; dropout (CLIP's is 0); the projection head of
``CLIPTextModelWithProjection``; ``output_hidden_states`` (SD 2's penultimate-layer
trick); and a backward through the pooled output.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, get_xp
from diffusion_np.models.config import TextEncoderConfig
from diffusion_np.nn.activation import GELU, QuickGELU
from diffusion_np.nn.attention import _merge_heads, _split_heads, causal_mask, sdpa_backward, sdpa_forward
from diffusion_np.nn.embedding import Embedding
from diffusion_np.nn.linear import Linear
from diffusion_np.nn.module import Module, ModuleList
from diffusion_np.nn.norm import LayerNorm
from diffusion_np.nn.validate import check_features, check_input_finite

#: hidden_act name (transformers' ACT2FN) -> activation module; TextEncoderConfig accepts these names
#: (its sizes and their checks are in models/config.py)
ACTIVATIONS = {
    "quick_gelu": QuickGELU,  # x sigmoid(1.702 x): CLIP ViT-L/14, Stable Diffusion 1.x
    "gelu": GELU,  # exact x Phi(x): OpenCLIP ViT-H, Stable Diffusion 2.x
    "gelu_pytorch_tanh": lambda: GELU("tanh"),
}


# --------------------------------------------------------------------------- init
def _normal_(linear: Linear, std: float, rng) -> None:
    """CLIP's init of a Linear: weight ~ N(0, std^2), bias = 0 (in place)."""
    w = linear.params["weight"]
    w[...] = rng.normal(0.0, std, size=w.shape).astype(w.dtype)
    if "bias" in linear.params:
        linear.params["bias"][...] = 0


def _check_ids(layer, input_ids, max_length: int) -> None:
    """input_ids must be an integer (B, L) array with 1 <= L <= max_length."""
    name = type(layer).__name__
    if not hasattr(input_ids, "dtype") or not hasattr(input_ids, "shape"):
        raise TypeError(f"{name} expects input_ids to be an integer array, got {type(input_ids).__name__}")
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise TypeError(f"{name} expects integer input_ids (token ids), got {input_ids.dtype}")
    if input_ids.ndim != 2 or not 1 <= input_ids.shape[1] <= max_length:
        raise ValueError(
            f"{name} expects input_ids of shape (B, L) with 1 <= L <= max_position_embeddings={max_length}, "
            f"got {tuple(input_ids.shape)}"
        )


# --------------------------------------------------------------------------- embeddings
class CLIPTextEmbeddings(Module):
    """``h = token_embedding[ids] + position_embedding[0..L-1]``: (B, L) ids -> (B, L, D)."""

    def __init__(self, config: TextEncoderConfig, rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.config = config
        D = config.hidden_size
        self.token_embedding = Embedding(config.vocab_size, D, rng=rng, dtype=dtype)
        self.position_embedding = Embedding(config.max_position_embeddings, D, rng=rng, dtype=dtype)
        for table in (self.token_embedding, self.position_embedding):  # CLIP's init: N(0, 0.02^2)
            w = table.params["weight"]
            w[...] = rng.normal(0.0, 0.02, size=w.shape).astype(dtype)

    def forward(self, input_ids):
        _check_ids(self, input_ids, self.config.max_position_embeddings)
        L = input_ids.shape[1]
        position_ids = get_xp(input_ids).arange(L)[None, :]  # (1, L): positions 0..L-1
        h = self.token_embedding(input_ids)  # (B, L) -> (B, L, D)
        h += self.position_embedding(position_ids)  # (1, L, D) broadcast over the batch
        return h

    def backward(self, dout):
        """Adds into both tables; returns None (ids have no gradient)."""
        self.token_embedding.backward(dout)  # scatter-add of (B, L, D) rows into (V, D)
        # the position rows were broadcast over the batch: their gradient is the batch sum
        self.position_embedding.backward(dout.sum(axis=0, keepdims=True))  # (B, L, D) -> (1, L, D)
        return None


# --------------------------------------------------------------------------- attention
class CLIPAttention(Module):
    """Causal multi-head self-attention with CLIP's names: ``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``, each a Linear with a bias.

    ``forward(x)``: (B, L, D) -> (B, L, D)::

        q = x W_q^T + b_q,  k = x W_k^T + b_k,  v = x W_v^T + b_v      split into H heads of d = D/H
        out = concat_h(softmax(q_h k_h^T / sqrt(d) + causal) v_h) W_o^T + b_o      (Vaswani et al. Eq. 1)

    Token i sees tokens 0..i only (``causal_mask``), as in CLIP and GPT.
    """

    def __init__(self, config: TextEncoderConfig, rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        D = config.hidden_size
        self.embed_dim, self.num_heads, self.head_dim = D, config.num_attention_heads, config.head_dim
        self.q_proj = Linear(D, D, rng=rng, dtype=dtype)
        self.k_proj = Linear(D, D, rng=rng, dtype=dtype)
        self.v_proj = Linear(D, D, rng=rng, dtype=dtype)
        self.out_proj = Linear(D, D, rng=rng, dtype=dtype)
        # CLIP's init (transformers' CLIPPreTrainedModel._init_weights, initializer_factor 1)
        in_std = D**-0.5 * (2 * config.num_hidden_layers) ** -0.5
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            _normal_(proj, in_std, rng)
        _normal_(self.out_proj, D**-0.5, rng)

    def forward(self, x):
        check_features(self, x, self.embed_dim, min_ndim=3)
        if x.ndim != 3:
            raise ValueError(f"CLIPAttention expects x of shape (B, L, {self.embed_dim}), got {tuple(x.shape)}")
        check_input_finite(self, x)
        H = self.num_heads
        q = _split_heads(self.q_proj(x), H)  # (B, L, D) -> (B, H, L, d)
        k = _split_heads(self.k_proj(x), H)  # (B, L, D) -> (B, H, L, d)
        v = _split_heads(self.v_proj(x), H)  # (B, L, D) -> (B, H, L, d)
        mask = causal_mask(x.shape[1], get_xp(x))  # (L, L) keep-mask, broadcast over (B, H)
        out, sdpa_cache = sdpa_forward(q, k, v, mask=mask, scale=1.0 / math.sqrt(self.head_dim))
        y = self.out_proj(_merge_heads(out))  # (B, H, L, d) -> (B, L, D) -> (B, L, D)
        self._set_cache(sdpa_cache)
        return y

    def backward(self, dout):
        sdpa_cache = self._pop_cache()
        d_merged = self.out_proj.backward(dout)  # (B, L, D)
        dq, dk, dv = sdpa_backward(_split_heads(d_merged, self.num_heads), sdpa_cache)  # each (B, H, L, d)
        # x fed all three projections: its gradient is the sum over the three paths
        dx = self.q_proj.backward(_merge_heads(dq))  # (B, L, D)
        dx += self.k_proj.backward(_merge_heads(dk))
        dx += self.v_proj.backward(_merge_heads(dv))
        return dx


# --------------------------------------------------------------------------- MLP
class CLIPMLP(Module):
    """``fc2(act(fc1(x)))``: (B, L, D) -> (B, L, intermediate) -> (B, L, D)."""

    def __init__(self, config: TextEncoderConfig, rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        D, inner = config.hidden_size, config.intermediate_size
        self.fc1 = Linear(D, inner, rng=rng, dtype=dtype)
        self.activation_fn = ACTIVATIONS[config.hidden_act]()
        self.fc2 = Linear(inner, D, rng=rng, dtype=dtype)
        _normal_(self.fc1, (2 * D) ** -0.5, rng)  # CLIP's init
        _normal_(self.fc2, D**-0.5 * (2 * config.num_hidden_layers) ** -0.5, rng)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))  # Linear validates x

    def backward(self, dout):
        return self.fc1.backward(self.activation_fn.backward(self.fc2.backward(dout)))


# --------------------------------------------------------------------------- blocks
class CLIPEncoderLayer(Module):
    """One pre-LN transformer block: ``h += self_attn(layer_norm1(h)); h += mlp(layer_norm2(h))``."""

    def __init__(self, config: TextEncoderConfig, rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        D, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CLIPAttention(config, rng=rng, dtype=dtype)
        self.layer_norm1 = LayerNorm(D, eps=eps, dtype=dtype)
        self.mlp = CLIPMLP(config, rng=rng, dtype=dtype)
        self.layer_norm2 = LayerNorm(D, eps=eps, dtype=dtype)

    def forward(self, h):
        h = h + self.self_attn(self.layer_norm1(h))  # residual 1 (a new array: h is the caller's)
        h += self.mlp(self.layer_norm2(h))  # residual 2
        return h

    def backward(self, dout):
        # residual 2: h2 = h1 + mlp(ln2(h1)) -> dh1 = dh2 + ln2'(mlp'(dh2)), dh2 = dout
        dh1 = dout + self.layer_norm2.backward(self.mlp.backward(dout))
        # residual 1: h1 = h0 + attn(ln1(h0)) -> dh0 = dh1 + ln1'(attn'(dh1))
        dh0 = self.layer_norm1.backward(self.self_attn.backward(dh1))
        dh0 += dh1
        return dh0


class CLIPEncoder(Module):
    """``num_hidden_layers`` CLIPEncoderLayers in a row (names ``layers.0``, ``layers.1``, ...)."""

    def __init__(self, config: TextEncoderConfig, rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.layers = ModuleList(CLIPEncoderLayer(config, rng=rng, dtype=dtype)
                                 for _ in range(config.num_hidden_layers))

    def forward(self, h):
        for layer in self.layers:
            h = layer(h)
        return h

    def backward(self, dout):
        dh = dout
        for layer in reversed(list(self.layers)):
            dh = layer.backward(dh)
        return dh


class CLIPTextTransformer(Module):
    """embeddings -> encoder -> final_layer_norm: (B, L) ids -> last_hidden_state (B, L, D)."""

    def __init__(self, config: TextEncoderConfig, rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, rng=rng, dtype=dtype)
        self.encoder = CLIPEncoder(config, rng=rng, dtype=dtype)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

    def forward(self, input_ids):
        h = self.embeddings(input_ids)  # (B, L, D); checks input_ids
        h = self.encoder(h)  # (B, L, D)
        return self.final_layer_norm(h)  # (B, L, D)

    def backward(self, dout):
        dh = self.final_layer_norm.backward(dout)
        dh = self.encoder.backward(dh)
        return self.embeddings.backward(dh)  # None: ids have no gradient


# --------------------------------------------------------------------------- pooling
def eos_positions(input_ids, eos_token_id: int):
    """Index of the <eos> token of each row, by transformers' rule for ``pooler_output``.

    * ``eos_token_id == 2``: the position of the *largest* id of the row. Older CLIP
      configs (Stable Diffusion 1.x's included) carry this wrong eos id, and OpenAI's
      CLIP pools at the argmax because its <eos> (49407) is the largest id of the
      vocabulary; transformers keeps that behaviour for them, and so do we.
    * otherwise: the first position where ``input_ids == eos_token_id``; a row with
      no <eos> raises ValueError (transformers silently takes position 0).

    Shapes: (B, L) -> (B,) int.
    """
    if eos_token_id == 2:
        return input_ids.argmax(axis=-1)
    is_eos = input_ids == eos_token_id  # (B, L) bool
    if not bool(is_eos.any(axis=-1).all()):
        raise ValueError(f"eos_positions: some row of input_ids has no eos token (id {eos_token_id}) to pool at")
    return is_eos.argmax(axis=-1)  # argmax of a bool row: its first True


class TextEncoder(Module):
    """CLIP's text transformer (transformers' ``CLIPTextModel``) with a hand-written backward.

    Parameters live under ``text_model.`` as in CLIP checkpoints (see the module docstring).

    ``forward(input_ids, return_pooled=False)``: integer ids (B, L), L <= max_position_embeddings
    -> ``last_hidden_state`` (B, L, hidden_size); with ``return_pooled=True`` the pair
    ``(last_hidden_state, pooled_output)``, the pooled output (B, hidden_size) being the
    last hidden state at each row's <eos> (:func:`eos_positions`).

    ``backward(dout)`` (the gradient w.r.t. ``last_hidden_state``) adds every parameter's gradient into ``grads``
    and returns None. The pooled output has no backward.
    """

    def __init__(self, config: TextEncoderConfig, rng=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        if not isinstance(config, TextEncoderConfig):
            raise TypeError(f"TextEncoder expects a TextEncoderConfig, got {type(config).__name__}")
        rng = rng if rng is not None else np.random.default_rng(0)
        self.config = config
        self.text_model = CLIPTextTransformer(config, rng=rng, dtype=dtype)

    def forward(self, input_ids, return_pooled: bool = False):
        _check_ids(self, input_ids, self.config.max_position_embeddings)
        last = self.text_model(input_ids)  # (B, L, D)
        if not return_pooled:
            return last
        rows = get_xp(input_ids).arange(last.shape[0])
        pooled = last[rows, eos_positions(input_ids, self.config.eos_token_id)]  # (B, D)
        return last, pooled

    def backward(self, dout):
        check_features(self, dout, self.config.hidden_size, min_ndim=3, what="dout")
        return self.text_model.backward(dout)
