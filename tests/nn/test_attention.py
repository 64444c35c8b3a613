import numpy as np
import pytest
from helpers import SOURCES, assert_close, reference

from diffusion_np.gradcheck import check_module, check_op
from diffusion_np.nn import BlockGrads
from diffusion_np.nn.attention import Attention, causal_mask, sdpa_backward, sdpa_forward


def _qkv(rng, B, heads, N, L, d):
    return (rng.standard_normal((B, heads, N, d)), rng.standard_normal((B, heads, L, d)),
            rng.standard_normal((B, heads, L, d)))


# ---------------------------------------------------------------------------- gradient checks
@pytest.mark.parametrize(
    "B,heads,N,L,d", [(2, 3, 4, 6, 5), (1, 1, 3, 7, 2), (1, 2, 1, 2, 3), (2, 1, 5, 5, 4)]
)
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_sdpa_gradcheck(B, heads, N, L, d, mask_kind):
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, B, heads, N, L, d)
    kwargs = {}
    if mask_kind == "bool":
        mask = rng.random((B, 1, N, L)) < 0.6
        mask[..., -1] = True
        kwargs["mask"] = mask
    elif mask_kind == "additive":
        kwargs["mask"] = rng.standard_normal((N, L))
    errors = check_op(sdpa_forward, sdpa_backward, [q, k, v], kwargs=kwargs)
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize("N,d", [(2, 3), (5, 4), (8, 2)])
def test_sdpa_causal_gradcheck_with_custom_scale(N, d):
    q, k, v = _qkv(np.random.default_rng(1), 2, 2, N, N, d)
    errors = check_op(sdpa_forward, sdpa_backward, [q, k, v], kwargs={"mask": causal_mask(N), "scale": 0.7})
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize("B,N,C,heads,dim_head,causal", [(2, 5, 6, 2, 3, False), (1, 4, 3, 1, 5, True)])
def test_self_attention_gradcheck(B, N, C, heads, dim_head, causal):
    layer = Attention(C, heads=heads, dim_head=dim_head, causal=causal, rng=np.random.default_rng(3))
    layer.to(dtype=np.float64)
    errors = check_module(layer, np.random.default_rng(4).standard_normal((B, N, C)))
    assert set(errors) == {"input0", "to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight",
                           "to_out.0.bias"}
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize("B,N,L,C,Cc,heads,dim_head", [(2, 5, 3, 6, 9, 3, 2), (1, 3, 7, 4, 2, 2, 3)])
def test_cross_attention_gradcheck(B, N, L, C, Cc, heads, dim_head):
    layer = Attention(C, Cc, heads=heads, dim_head=dim_head, out_bias=False, rng=np.random.default_rng(5))
    layer.to(dtype=np.float64)
    rng = np.random.default_rng(6)
    errors = check_module(layer, rng.standard_normal((B, N, C)), rng.standard_normal((B, L, Cc)))
    assert {"input0", "input1"} <= set(errors) and "to_out.0.bias" not in errors
    assert max(errors.values()) < 1e-7, errors


# ---------------------------------------------------------------------------- behaviour
def test_single_key_copies_value_and_gives_no_query_or_key_gradient():
    # softmax over one key is 1 whatever the score, so q and k cannot matter (a finite-difference
    # check has nothing to compare here: both gradients are 0 up to rounding)
    q, k, v = _qkv(np.random.default_rng(7), 2, 2, 3, 1, 4)
    out, cache = sdpa_forward(q, k, v)
    np.testing.assert_allclose(out, np.broadcast_to(v, out.shape))
    dq, dk, dv = sdpa_backward(np.random.default_rng(8).standard_normal(out.shape), cache)
    assert np.abs(dq).max() < 1e-12 and np.abs(dk).max() < 1e-12 and np.abs(dv).max() > 0.1


def test_causal_mask_is_lower_triangular_keep_mask():
    np.testing.assert_array_equal(causal_mask(3), [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    assert causal_mask(3).dtype == bool


def test_causal_attention_ignores_future_tokens():
    layer = Attention(4, heads=2, dim_head=2, causal=True)
    x = np.random.default_rng(0).standard_normal((1, 5, 4)).astype(np.float32)
    changed = x.copy()
    changed[:, 3:] += 10.0
    np.testing.assert_allclose(layer(x)[:, :3], layer(changed)[:, :3], atol=1e-6)


def test_boolean_and_additive_masks_agree():
    q, k, v = (a.astype(np.float32) for a in _qkv(np.random.default_rng(2), 2, 2, 3, 4, 5))
    keep = np.array([[True, False, True, True], [False, False, True, False], [True] * 4])
    additive = np.where(keep, 0.0, -np.inf).astype(np.float32)
    out_bool, _ = sdpa_forward(q, k, v, mask=keep)
    out_add, _ = sdpa_forward(q, k, v, mask=additive)
    np.testing.assert_allclose(out_bool, out_add, rtol=1e-6)


def test_float32_stays_float32():
    q, k, v = (a.astype(np.float32) for a in _qkv(np.random.default_rng(2), 1, 2, 3, 4, 5))
    out, cache = sdpa_forward(q, k, v, mask=np.tril(np.ones((3, 4), bool)))
    assert out.dtype == np.float32 and cache.p.dtype == np.float32
    assert all(g.dtype == np.float32 for g in sdpa_backward(out, cache))
    layer = Attention(4, 6, heads=2, dim_head=3)
    y = layer(np.ones((1, 2, 4), np.float32), np.ones((1, 3, 6), np.float32))
    g = layer.backward(y)
    assert y.dtype == g.dx.dtype == g.dcontext.dtype == np.float32


def test_parameter_names_follow_diffusers():
    names = [name for name, _ in Attention(8, 16, heads=2, dim_head=4).named_parameters()]
    assert names == ["to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"]


def test_backward_returns_block_grads_with_dcontext_only_after_cross_attention():
    layer = Attention(4, heads=1, dim_head=4)
    x = np.ones((1, 2, 4), np.float32)
    result = layer.backward(layer(x))
    assert isinstance(result, BlockGrads) and result.dx.shape == x.shape
    assert result.dcontext is None and result.dtemb is None and result.dskips is None
    result = layer.backward(layer(x, x))
    assert isinstance(result, BlockGrads) and result.dx.shape == result.dcontext.shape == x.shape


# ---------------------------------------------------------------------------- q/k/v biases
@pytest.mark.parametrize("cross", [False, True])
def test_attention_with_qkv_bias_gradcheck(cross):
    layer = Attention(6, 5 if cross else None, heads=2, dim_head=3, bias=True, rng=np.random.default_rng(9))
    layer.to(dtype=np.float64)
    rng = np.random.default_rng(10)
    inputs = (rng.standard_normal((2, 4, 6)),) + ((rng.standard_normal((2, 3, 5)),) if cross else ())
    errors = check_module(layer, *inputs)
    assert {"to_q.bias", "to_k.bias", "to_v.bias"} <= set(errors)
    # The key bias adds q_i . b_k to every score of row i: the same shift for all keys, which the
    # softmax ignores. Its true gradient is 0, so both sides are rounding noise and the relative
    # error means nothing: check that the analytic gradient is 0 instead.
    assert np.abs(layer.to_k.grads["bias"]).max() < 1e-12
    del errors["to_k.bias"]
    assert max(errors.values()) < 1e-7, errors


def test_qkv_bias_is_off_by_default_and_named_like_diffusers():
    default = [name for name, _ in Attention(4, heads=1, dim_head=4).named_parameters()]
    assert not any(n.startswith(("to_q.bias", "to_k.bias", "to_v.bias")) for n in default)
    names = [name for name, _ in Attention(4, 6, heads=1, dim_head=4, bias=True).named_parameters()]
    assert names == ["to_q.weight", "to_q.bias", "to_k.weight", "to_k.bias", "to_v.weight", "to_v.bias",
                     "to_out.0.weight", "to_out.0.bias"]


def test_qkv_bias_is_added_to_the_projections():
    # written out with the op pair, so the test fails if a bias is dropped or applied twice
    layer = Attention(4, heads=2, dim_head=3, bias=True, causal=True, rng=np.random.default_rng(11))
    x = np.random.default_rng(12).standard_normal((2, 5, 4)).astype(np.float32)
    p = layer.state_dict()
    q, k, v = ((x @ p[f"to_{n}.weight"].T + p[f"to_{n}.bias"]).reshape(2, 5, 2, 3).transpose(0, 2, 1, 3)
               for n in "qkv")
    out, _ = sdpa_forward(q, k, v, mask=causal_mask(5))
    expected = out.transpose(0, 2, 1, 3).reshape(2, 5, 6) @ p["to_out.0.weight"].T + p["to_out.0.bias"]
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(p["to_q.bias"]).max() > 0.1  # non-trivial biases


@pytest.mark.crosscheck
def test_attention_with_qkv_bias_matches_diffusers_live():
    torch = pytest.importorskip("torch")
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    rng = np.random.default_rng(13)
    ref = DiffusersAttention(6, cross_attention_dim=5, heads=2, dim_head=4, bias=True, out_bias=True)
    weights = {k: (0.5 * rng.standard_normal(tuple(t.shape))).astype(np.float32) for k, t in ref.state_dict().items()}
    ref.load_state_dict({k: torch.tensor(w) for k, w in weights.items()})
    x, context = rng.standard_normal((2, 3, 6)).astype(np.float32), rng.standard_normal((2, 4, 5)).astype(np.float32)
    dout = rng.standard_normal((2, 3, 6)).astype(np.float32)
    tx, tc = torch.tensor(x, requires_grad=True), torch.tensor(context, requires_grad=True)
    y_ref = ref(tx, encoder_hidden_states=tc)
    (y_ref * torch.tensor(dout)).sum().backward()
    layer = Attention(6, 5, heads=2, dim_head=4, bias=True)
    layer.load_state_dict(weights)
    assert_close(layer(x, context), y_ref.detach().numpy(), what="out")
    dx, dcontext = (g := layer.backward(dout)).dx, g.dcontext
    assert_close(dx, tx.grad.numpy(), what="dx")
    assert_close(dcontext, tc.grad.numpy(), what="dcontext")
    ref_grads = dict(ref.named_parameters())
    for name, grad in layer.named_grads():
        assert_close(grad, ref_grads[name].grad.numpy(), what=name)


# ---------------------------------------------------------------------------- torch parity
@pytest.fixture(params=SOURCES, scope="module")
def torch_cases(request):
    return reference("attention", request.param)


def test_sdpa_matches_torch(torch_cases):
    cases = {n: c for n, c in torch_cases.items() if n.startswith("sdpa_")}
    assert len(cases) == 5
    for name, c in cases.items():
        mask = c.get("mask")
        if name == "sdpa_causal":
            mask = causal_mask(c["q"].shape[2])
        out, cache = sdpa_forward(c["q"], c["k"], c["v"], mask=mask)
        assert_close(out, c["out"], what=f"{name}: out")
        for grad, key in zip(sdpa_backward(c["dout"], cache), ("dq", "dk", "dv")):
            assert_close(grad, c[key], what=f"{name}: {key}")


def test_attention_module_matches_diffusers(torch_cases):
    cases = {n: c for n, c in torch_cases.items() if n.startswith("attention_")}
    assert len(cases) == 3
    for name, c in cases.items():
        C, inner = c["param.to_q.weight"].shape[1], c["param.to_q.weight"].shape[0]
        Cc = c["param.to_k.weight"].shape[1]
        heads = {"attention_self": 2, "attention_cross": 3, "attention_cross_batch1": 1}[name]
        layer = Attention(C, Cc, heads=heads, dim_head=inner // heads)
        layer.load_state_dict({k.removeprefix("param."): v for k, v in c.items() if k.startswith("param.")})
        if "context" in c:
            y = layer(c["x"], c["context"])
            dx, dcontext = (g := layer.backward(c["dout"])).dx, g.dcontext
            assert_close(dcontext, c["dcontext"], what=f"{name}: dcontext")
        else:
            y = layer(c["x"])
            dx = layer.backward(c["dout"]).dx
        assert_close(y, c["out"], what=f"{name}: out")
        assert_close(dx, c["dx"], what=f"{name}: dx")
        for key, grad in layer.named_grads():
            assert_close(grad, c[f"grad.{key}"], what=f"{name}: grad {key}")


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "shapes,mask,error,match",
    [
        (((2, 4, 3), (2, 4, 3), (2, 4, 3)), None, ValueError, r"q \(B, heads, N, d\).*got q \(2, 4, 3\)"),
        (((1, 2, 4, 3), (1, 2, 5, 2), (1, 2, 5, 3)), None, ValueError, "matching B, heads, L and d"),
        (((1, 2, 4, 3), (1, 2, 5, 3), (1, 2, 6, 3)), None, ValueError, "matching B, heads, L and d"),
        (((1, 2, 4, 3), (1, 2, 5, 3), (1, 2, 5, 3)), np.zeros((4, 4), np.float32), ValueError,
         r"mask of shape \(4, 4\) does not broadcast to the scores .* \(1, 2, 4, 5\)"),
        (((1, 2, 4, 3), (1, 2, 5, 3), (1, 2, 5, 3)), np.zeros((4, 5), np.int64), TypeError,
         "boolean .* or float .* mask, got int64"),
        (((1, 1, 2, 3), (1, 1, 2, 3), (1, 1, 2, 3)), np.array([[True, True], [False, False]]), ValueError,
         "leaves some query with no key"),
    ],
)
def test_sdpa_bad_input(shapes, mask, error, match):
    q, k, v = (np.zeros(s, np.float32) for s in shapes)
    with pytest.raises(error, match=match):
        sdpa_forward(q, k, v, mask=mask)


@pytest.mark.parametrize(
    "x,context,error,match",
    [
        (np.zeros((2, 4), np.float32), None, ValueError, r"Attention expects x of shape .*got \(2, 4\)"),
        (np.zeros((1, 2, 3, 4), np.float32), None, ValueError,
         r"Attention expects x of shape \(B, tokens, 4\), got \(1, 2, 3, 4\)"),
        (np.zeros((2, 3, 5), np.float32), None, ValueError, r"Attention expects x of shape \(\.\.\., 4\)"),
        (np.zeros((2, 3, 4), np.int32), None, TypeError, "Attention expects x with a floating dtype"),
        (np.full((2, 3, 4), np.nan, np.float32), None, ValueError, "Attention got a non-finite value .* in x"),
        (np.zeros((2, 3, 4), np.float32), np.zeros((2, 5, 7), np.float32), ValueError,
         r"Attention expects context of shape \(\.\.\., 6\).*got \(2, 5, 7\)"),
        (np.zeros((2, 3, 4), np.float32), np.zeros((1, 5, 6), np.float32), ValueError,
         "same batch size"),
        (np.zeros((2, 3, 4), np.float32), np.full((2, 5, 6), np.inf, np.float32), ValueError,
         "non-finite value .* in context"),
    ],
)
def test_attention_bad_input(x, context, error, match):
    with pytest.raises(error, match=match):
        Attention(4, 6, heads=2, dim_head=2)(x, context)


def test_causal_cross_attention_is_refused():
    with pytest.raises(ValueError, match="causal=True.*self-attention"):
        Attention(4, heads=1, dim_head=2, causal=True)(np.zeros((1, 2, 4), np.float32),
                                                      np.zeros((1, 3, 4), np.float32))


def test_backward_without_forward_raises():
    with pytest.raises(RuntimeError, match="Attention.backward called without a preceding forward"):
        Attention(4, heads=1, dim_head=2).backward(np.zeros((1, 2, 4), np.float32))


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_sdpa_cupy_matches_numpy():
    import cupy as cp

    q, k, v = (a.astype(np.float32) for a in _qkv(np.random.default_rng(0), 2, 4, 33, 17, 8))
    dout = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    mask = np.random.default_rng(2).standard_normal((33, 17)).astype(np.float32)
    out, cache = sdpa_forward(q, k, v, mask=mask)
    grads = sdpa_backward(dout, cache)
    out_gpu, cache_gpu = sdpa_forward(*(cp.asarray(a) for a in (q, k, v)), mask=cp.asarray(mask))
    grads_gpu = sdpa_backward(cp.asarray(dout), cache_gpu)
    assert isinstance(out_gpu, cp.ndarray)
    assert_close(out_gpu, out, what="out")
    for g_gpu, g in zip(grads_gpu, grads):
        assert_close(g_gpu, g, what="grad")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_attention_cupy_matches_numpy(causal):
    import cupy as cp

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 8)).astype(np.float32)
    dout = rng.standard_normal((2, 9, 8)).astype(np.float32)
    cpu = Attention(8, heads=2, dim_head=4, causal=causal, rng=np.random.default_rng(1))
    gpu = Attention(8, heads=2, dim_head=4, causal=causal, rng=np.random.default_rng(1)).to("cupy")
    assert_close(gpu(cp.asarray(x)), cpu(x), what="out")
    assert_close(gpu.backward(cp.asarray(dout)).dx, cpu.backward(dout).dx, what="dx")
    for (name, g_gpu), (_, g) in zip(gpu.named_grads(), cpu.named_grads()):
        assert_close(g_gpu, g, what=name)
