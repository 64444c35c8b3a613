import dataclasses

import numpy as np
import pytest
from helpers import SOURCES, assert_close, reference

from diffusion_np.gradcheck import check_module
from diffusion_np.models import config as config_module
from diffusion_np.models.text_encoder import (
    ACTIVATIONS,
    CLIPMLP,
    CLIPAttention,
    CLIPEncoderLayer,
    CLIPTextEmbeddings,
    TextEncoder,
    TextEncoderConfig,
    eos_positions,
)
from diffusion_np.models.tokenizer import WordTokenizer


def _config(**overrides) -> TextEncoderConfig:
    sizes = dict(vocab_size=13, hidden_size=6, num_hidden_layers=2, num_attention_heads=2, intermediate_size=7,
                 max_position_embeddings=7)
    return TextEncoderConfig(**{**sizes, **overrides})


def _randomise(module, seed: int = 0):
    """Non-trivial parameters (CLIP's init has zero biases, unit LayerNorm gains and 0.02 embeddings)."""
    rng = np.random.default_rng(seed)
    for name, p in module.named_parameters():
        if "layer_norm" in name and name.endswith("weight"):
            p[...] = 1.0 + 0.3 * rng.standard_normal(p.shape)
        elif name.endswith("bias"):
            p[...] = 0.2 * rng.standard_normal(p.shape)
        else:
            p[...] = 0.5 * rng.standard_normal(p.shape)
    return module


def _ids(rng, B, L, V):
    return rng.integers(0, V, size=(B, L))


def _drop_key_bias(module, errors: dict, prefix: str = "") -> dict:
    """The key bias shifts every score of a query row by the same q_i . b_k, which the softmax
    ignores: its true gradient is 0 and a relative error between two rounding noises means
    nothing. Check that the analytic gradient is 0 and leave it out of the relative errors."""
    grads = dict(module.named_grads())
    for name in [n for n in errors if n.endswith("k_proj.bias")]:
        assert np.abs(grads[name]).max() < 1e-10, name
        del errors[name]
    return errors


# ---------------------------------------------------------------------------- gradient checks
@pytest.mark.parametrize("B,L,D,heads", [(2, 5, 6, 2), (1, 3, 4, 1), (1, 1, 6, 3), (3, 4, 9, 3)])
def test_attention_gradcheck(B, L, D, heads):
    attn = _randomise(CLIPAttention(_config(hidden_size=D, num_attention_heads=heads)).to(dtype=np.float64))
    errors = check_module(attn, np.random.default_rng(1).standard_normal((B, L, D)))
    assert {"input0", "q_proj.weight", "q_proj.bias", "v_proj.bias", "out_proj.bias"} <= set(errors)
    errors = _drop_key_bias(attn, errors) if L > 1 else errors
    if L == 1:  # one key: softmax is 1 whatever q and k are; their gradients are exactly 0
        errors = {n: e for n, e in errors.items() if not n.startswith(("q_proj", "k_proj"))}
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("shape", [(2, 3, 6), (1, 1, 6)])
def test_mlp_gradcheck(act, shape):
    mlp = _randomise(CLIPMLP(_config(hidden_act=act)).to(dtype=np.float64))
    errors = check_module(mlp, np.random.default_rng(2).standard_normal(shape))
    assert set(errors) == {"input0", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize("B,L", [(2, 5), (1, 2)])
def test_encoder_layer_gradcheck(B, L):
    layer = _randomise(CLIPEncoderLayer(_config()).to(dtype=np.float64), seed=3)
    errors = _drop_key_bias(layer, check_module(layer, np.random.default_rng(4).standard_normal((B, L, 6))))
    assert len(errors) == 1 + 15  # the input and every parameter but k_proj.bias
    assert max(errors.values()) < 1e-7, errors


def test_embeddings_gradcheck_with_repeated_tokens():
    emb = _randomise(CLIPTextEmbeddings(_config()).to(dtype=np.float64))
    ids = np.array([[2, 5, 5, 3, 0, 0], [2, 3, 0, 0, 0, 0]])  # repeats: 5 twice, 0 six times
    errors = check_module(emb, ids)
    assert set(errors) == {"token_embedding.weight", "position_embedding.weight"}
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize("act,B,L", [("quick_gelu", 2, 7), ("gelu", 1, 4)])
def test_whole_model_gradcheck_on_sampled_coordinates(act, B, L):
    model = _randomise(TextEncoder(_config(hidden_act=act)).to(dtype=np.float64), seed=5)
    ids = _ids(np.random.default_rng(6), B, L, 13)
    errors = _drop_key_bias(model, check_module(model, ids, max_coordinates=8))
    assert len(errors) == len(model.state_dict()) - 2
    assert max(errors.values()) < 1e-6, errors


# ---------------------------------------------------------------------------- transformers parity
@pytest.fixture(params=SOURCES, scope="module")
def clip_cases(request):
    return reference("text_encoder", request.param)


def _model_for(case, act: str) -> TextEncoder:
    n_layers = 1 + max(int(k.split(".")[4]) for k in case if k.startswith("param.text_model.encoder.layers."))
    config = TextEncoderConfig(vocab_size=50, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                               intermediate_size=37, max_position_embeddings=16, hidden_act=act)
    model = TextEncoder(config)
    model.load_state_dict({k.removeprefix("param."): v for k, v in case.items() if k.startswith("param.")})
    return model


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_matches_transformers_clip_text_model(clip_cases, act):
    case = clip_cases[act]
    model = _model_for(case, act)
    last, pooled = model(case["input_ids"], return_pooled=True)
    assert last.dtype == np.float32
    assert_close(last, case["out"], what=f"{act}: last_hidden_state")
    assert_close(pooled, case["pooled"], what=f"{act}: pooled_output")
    assert model.backward(case["dout"]) is None
    grads = dict(model.named_grads())
    assert len(grads) == sum(k.startswith("grad.") for k in case)
    for key, grad in grads.items():
        assert_close(grad, case[f"grad.{key}"], what=f"{act}: grad {key}")


def test_pooled_output_with_legacy_eos_id_matches_transformers(clip_cases):
    case = clip_cases["quick_gelu"]
    model = _model_for(case, "quick_gelu")
    model.config = dataclasses.replace(model.config, eos_token_id=2)
    _, pooled = model(case["input_ids"], return_pooled=True)
    assert_close(pooled, case["pooled_eos2"], what="pooled_output with eos_token_id=2")


def test_state_dict_keys_equal_transformers(clip_cases):
    for act, case in clip_cases.items():
        assert set(_model_for(case, act).state_dict()) == set(case["keys"].tolist())
    names = set(TextEncoder(_config(num_hidden_layers=1)).state_dict())
    assert "text_model.encoder.layers.0.self_attn.q_proj.bias" in names
    assert "text_model.embeddings.position_embedding.weight" in names


# ---------------------------------------------------------------------------- behaviour
def test_causal_mask_later_tokens_do_not_change_earlier_outputs():
    model = _randomise(TextEncoder(_config()))
    ids = _ids(np.random.default_rng(7), 2, 7, 13)
    changed = ids.copy()
    changed[:, 4:] = (changed[:, 4:] + 1) % 13
    a, b = model(ids), model(changed)
    np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-5, atol=1e-6)
    assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-3


def test_token_gradient_is_a_scatter_add():
    model = _randomise(TextEncoder(_config(num_hidden_layers=1)))
    ids = np.array([[2, 7, 7, 7, 3, 0, 0]])
    dout = np.random.default_rng(8).standard_normal((1, 7, 6)).astype(np.float32)
    model(ids)
    model.backward(dout)
    table_grad = model.text_model.embeddings.token_embedding.grads["weight"]
    used = np.zeros(13, bool)
    used[[0, 2, 3, 7]] = True
    assert not table_grad[~used].any()  # tokens not in the batch get no gradient
    assert (np.abs(table_grad[used]).sum(axis=1) > 0).all()
    # the row of a repeated token is the sum over its positions: pos grads are per position
    pos_grad = model.text_model.embeddings.position_embedding.grads["weight"]
    np.testing.assert_allclose(table_grad[7], pos_grad[1:4].sum(axis=0), rtol=1e-5, atol=1e-6)


def test_gradients_accumulate_until_zeroed():
    model = _randomise(TextEncoder(_config(num_hidden_layers=1)))
    ids = _ids(np.random.default_rng(9), 2, 5, 13)
    dout = np.ones((2, 5, 6), np.float32)
    model(ids)
    model.backward(dout)
    first = {k: g.copy() for k, g in model.named_grads()}
    model(ids)
    model.backward(dout)
    for k, g in model.named_grads():
        np.testing.assert_allclose(g, 2 * first[k], rtol=1e-5, atol=1e-6, err_msg=k)
    model.zero_grad()
    assert not any(g.any() for _, g in model.named_grads())


def test_float32_stays_float32_and_shapes():
    model = TextEncoder(_config())
    last, pooled = model(np.array([[2, 5, 3, 0], [2, 3, 0, 0]]), return_pooled=True)
    assert last.shape == (2, 4, 6) and pooled.shape == (2, 6)
    assert last.dtype == pooled.dtype == np.float32
    model.backward(np.ones_like(last))
    assert all(g.dtype == np.float32 for _, g in model.named_grads())


def test_default_init_is_clips():
    model = TextEncoder(_config(hidden_size=64, num_attention_heads=4, vocab_size=500, num_hidden_layers=2))
    sd = model.state_dict()
    assert abs(sd["text_model.embeddings.token_embedding.weight"].std() - 0.02) < 0.002
    q = sd["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std() - 64**-0.5 * 4**-0.5) < 0.01  # D^-1/2 (2 n_layers)^-1/2
    assert not sd["text_model.encoder.layers.0.self_attn.q_proj.bias"].any()
    np.testing.assert_array_equal(sd["text_model.final_layer_norm.weight"], 1)


def test_with_the_tokenizer_and_pooled_output_at_eos():
    tok = WordTokenizer.from_captions(["a red circle", "a blue square on the left"], max_length=8)
    model = TextEncoder(_config(vocab_size=tok.vocab_size, max_position_embeddings=tok.max_length))
    ids, lengths = tok.encode(["a red circle", "", "a green square"])
    last, pooled = model(ids, return_pooled=True)
    np.testing.assert_array_equal(eos_positions(ids, tok.eos_id), lengths - 1)
    np.testing.assert_array_equal(pooled, last[np.arange(3), lengths - 1])


def test_eos_positions_rules():
    ids = np.array([[2, 9, 3, 0, 3], [2, 3, 0, 0, 0]])
    np.testing.assert_array_equal(eos_positions(ids, 3), [2, 1])  # first eos
    np.testing.assert_array_equal(eos_positions(ids, 2), [1, 1])  # legacy: largest id
    with pytest.raises(ValueError, match="some row of input_ids has no eos token"):
        eos_positions(np.array([[2, 5, 0]]), 3)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "ids,error,match",
    [
        (np.zeros((2, 3), np.float32), TypeError, "TextEncoder expects integer input_ids .*got float32"),
        ([[2, 3]], TypeError, "TextEncoder expects input_ids to be an integer array, got list"),
        (np.zeros(3, np.int64), ValueError, r"input_ids of shape \(B, L\) .*got \(3,\)"),
        (np.zeros((1, 8), np.int64), ValueError, r"1 <= L <= max_position_embeddings=7, got \(1, 8\)"),
        (np.zeros((1, 0), np.int64), ValueError, r"got \(1, 0\)"),
        (np.array([[2, 13, 3]]), ValueError, r"Embedding expects ids in \[0, 13\), got id 13"),
    ],
)
def test_bad_input_ids(ids, error, match):
    with pytest.raises(error, match=match):
        TextEncoder(_config())(ids)


def test_bad_upstream_gradient_and_backward_without_forward():
    model = TextEncoder(_config())
    with pytest.raises(RuntimeError, match="backward called without a preceding forward"):
        model.backward(np.zeros((1, 3, 6), np.float32))
    model(np.array([[2, 3, 0]]))
    with pytest.raises(ValueError, match=r"TextEncoder expects dout of shape \(\.\.\., 6\)"):
        model.backward(np.zeros((1, 3, 5), np.float32))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"hidden_size": 6, "num_attention_heads": 4}, "hidden_size=6 must be divisible by num_attention_heads=4"),
        ({"hidden_act": "relu"}, r"hidden_act must be one of \['gelu', 'gelu_pytorch_tanh', 'quick_gelu'\]"),
        ({"vocab_size": 0}, "vocab_size must be a positive int, got 0"),
        ({"num_hidden_layers": 1.5}, "num_hidden_layers must be a positive int"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps must be > 0"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


def test_config_round_trip_and_type_check():
    config = _config()
    assert TextEncoderConfig(**config.to_dict()) == config
    with pytest.raises(TypeError, match="TextEncoder expects a TextEncoderConfig, got dict"):
        TextEncoder(config.to_dict())


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_text_encoder_cupy_matches_numpy():
    import cupy as cp

    ids = _ids(np.random.default_rng(10), 3, 7, 13)
    dout = np.random.default_rng(11).standard_normal((3, 7, 6)).astype(np.float32)
    cpu = _randomise(TextEncoder(_config()))
    gpu = _randomise(TextEncoder(_config())).to("cupy")
    last_gpu, pooled_gpu = gpu(cp.asarray(ids), return_pooled=True)
    last, pooled = cpu(ids, return_pooled=True)
    assert isinstance(last_gpu, cp.ndarray)
    assert_close(last_gpu, last, what="last_hidden_state")
    assert_close(pooled_gpu, pooled, what="pooled")
    gpu.backward(cp.asarray(dout))
    cpu.backward(dout)
    for (name, g_gpu), (_, g) in zip(gpu.named_grads(), cpu.named_grads()):
        assert_close(g_gpu, g, what=name)


def test_every_hidden_act_the_config_accepts_has_a_module():
    assert set(config_module.HIDDEN_ACTS) == set(ACTIVATIONS)
    assert TextEncoderConfig is config_module.TextEncoderConfig  # one class, importable from both modules
