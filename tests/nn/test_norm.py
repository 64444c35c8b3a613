import numpy as np
import pytest
from helpers import SOURCES, assert_close, reference

from diffusion_np.gradcheck import check_module, check_op
from diffusion_np.nn.activation import silu_backward, silu_forward
from diffusion_np.nn.fast.norm import group_norm_silu_backward, group_norm_silu_forward
from diffusion_np.nn.norm import (
    GroupNorm,
    LayerNorm,
    group_norm_backward,
    group_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
)


def _affine(rng, C):
    return 1.0 + 0.5 * rng.standard_normal(C), rng.standard_normal(C)


# ----------------------------------------------------------------------------- GroupNorm


@pytest.mark.parametrize(
    "shape,groups",
    [
        ((2, 3, 4, 6), 3),  # images
        ((1, 5, 5, 4), 1),  # batch 1, odd spatial, one group (LayerNorm over H, W, C)
        ((2, 3, 3, 6), 6),  # groups == channels (InstanceNorm)
        ((3, 7, 6), 2),  # tokens (B, L, C)
        ((2, 6), 2),  # (B, C): one position, 3 numbers a group (with 2, x_hat = +-1 and dx ~ 0)
    ],
)
def test_group_norm_op_gradcheck(shape, groups):
    # not seed 0: check_op draws its upstream gradient from seed 0, and dout equal to
    # an affine function of x makes the true dx ~ 0 (a normalisation ignores it)
    rng = np.random.default_rng(11)
    x = 2.0 * rng.standard_normal(shape) + 0.5
    gamma, beta = _affine(rng, shape[-1])
    errors = check_op(group_norm_forward, group_norm_backward, [x, gamma, beta],
                      kwargs={"num_groups": groups, "eps": 1e-5})
    assert set(errors) == {0, 1, 2}
    assert max(errors.values()) < 1e-7, errors


def test_group_norm_op_gradcheck_without_affine():
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 4))
    out, cache = group_norm_forward(x, None, None, 2)
    _, dgamma, dbeta = group_norm_backward(np.ones_like(out), cache)
    assert dgamma is None and dbeta is None
    errors = check_op(group_norm_forward, group_norm_backward, [x, None, None], kwargs={"num_groups": 2})
    assert max(errors.values()) < 1e-7, errors


def test_group_norm_module_gradcheck():
    rng = np.random.default_rng(2)
    layer = GroupNorm(2, 6, eps=1e-6).to(dtype=np.float64)
    gamma, beta = _affine(rng, 6)
    layer.load_state_dict({"weight": gamma, "bias": beta})
    errors = check_module(layer, rng.standard_normal((2, 3, 3, 6)))
    assert set(errors) == {"input0", "weight", "bias"}
    assert max(errors.values()) < 1e-7, errors


def test_group_norm_output_statistics():
    # per (sample, group): zero mean, unit variance (up to eps); affine off
    x = np.random.default_rng(3).standard_normal((2, 4, 4, 8)) * 3 + 1
    y = GroupNorm(4, 8, affine=False).to(dtype=np.float64)(x)
    yg = y.reshape(2, 16, 4, 2)  # (B, N, G, C/G)
    np.testing.assert_allclose(yg.mean(axis=(1, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(yg.var(axis=(1, 3)), 1, atol=1e-5)


def test_group_norm_is_shift_invariant_in_float32():
    # Two-pass statistics: x + 1000 normalises like x. The one-pass E[x^2] - E[x]^2
    # loses every digit of the variance in float32 here (errors of order 1).
    x = np.random.default_rng(4).standard_normal((2, 6, 6, 8)).astype(np.float32)
    layer = GroupNorm(4, 8)
    y = layer(x)
    y_shift = layer(x + np.float32(1000))
    assert y_shift.dtype == np.float32
    np.testing.assert_allclose(y_shift, y, atol=2e-3)


def test_group_norm_constant_input_gives_beta():
    layer = GroupNorm(2, 4)
    layer.params["bias"][...] = [1, 2, 3, 4]
    y = layer(np.full((1, 3, 3, 4), 7.0, np.float32))
    np.testing.assert_allclose(y, np.broadcast_to([1, 2, 3, 4], y.shape))


def test_group_norm_keeps_float32_and_shape():
    x = np.random.default_rng(5).standard_normal((2, 3, 5, 8)).astype(np.float32)
    layer = GroupNorm(4, 8)
    y = layer(x)
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == layer.grads["weight"].dtype == np.float32
    assert y.shape == dx.shape == x.shape


# ----------------------------------------------------------------------------- GroupNorm + SiLU, fused
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,groups", [((2, 3, 4, 6), 3), ((1, 5, 5, 4), 1), ((3, 7, 6), 2), ((2, 6), 2),
                                          ((2, 16, 16, 8), 4), ((2, 6, 8, 96), 32)])
def test_group_norm_silu_equals_the_two_ops(shape, groups, affine):
    """Forward and every gradient equal GroupNorm then SiLU (float64, wide range of z), with the
    positions folded 4, 1, 1, 1, 128 and 16 to a row (``_fold``)."""
    rng = np.random.default_rng(3)
    x = 2.0 * rng.standard_normal(shape) + 0.5
    gamma, beta = _affine(rng, shape[-1]) if affine else (None, None)
    if affine:
        gamma *= 4.0  # z over about -10 .. 10: both tails of the sigmoid
    y, cache = group_norm_silu_forward(x, gamma, beta, groups, 1e-5)
    z, norm_cache = group_norm_forward(x, gamma, beta, groups, 1e-5)
    y_ref, silu_cache = silu_forward(z)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(shape)
    grads = group_norm_silu_backward(dy, cache)
    grads_ref = group_norm_backward(silu_backward(dy, silu_cache), norm_cache)
    for name, g, g_ref in zip(("dx", "dgamma", "dbeta"), grads, grads_ref):
        if g_ref is None:
            assert g is None, name
        else:
            np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("shape,groups", [((2, 3, 4, 6), 3), ((1, 5, 5, 4), 1), ((2, 6), 2)])
def test_group_norm_silu_op_gradcheck(shape, groups):
    rng = np.random.default_rng(11)
    x = 2.0 * rng.standard_normal(shape) + 0.5
    gamma, beta = _affine(rng, shape[-1])
    errors = check_op(group_norm_silu_forward, group_norm_silu_backward, [x, gamma, beta],
                      kwargs={"num_groups": groups, "eps": 1e-5})
    assert set(errors) == {0, 1, 2}
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize("method", ["auto", "fused", "reference"])
def test_group_norm_silu_module_gradcheck(method):
    rng = np.random.default_rng(2)
    layer = GroupNorm(2, 6, eps=1e-6, silu=True, method=method).to(dtype=np.float64)
    gamma, beta = _affine(rng, 6)
    layer.load_state_dict({"weight": gamma, "bias": beta})
    errors = check_module(layer, rng.standard_normal((2, 3, 3, 6)))
    assert set(errors) == {"input0", "weight", "bias"}
    assert max(errors.values()) < 1e-7, errors


def test_group_norm_silu_module_keeps_float32_and_matches_unfused():
    rng = np.random.default_rng(4)
    x, dy = (rng.standard_normal((2, 4, 4, 8)).astype(np.float32) for _ in range(2))
    outs = {}
    for fused in (True, False):
        layer = GroupNorm(4, 8, silu=True, method="fused" if fused else "reference")
        y = layer(x)
        dx = layer.backward(dy)
        assert y.dtype == dx.dtype == np.float32 and y.shape == x.shape
        outs[fused] = (y, dx, layer.grads["weight"], layer.grads["bias"])
    for a, b in zip(outs[True], outs[False]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_group_norm_silu_backward_leaves_its_cache_unless_told_to_consume_it():
    """The op may run its backward twice on one cache; a Module's (``consume=True``) writes over
    the cache it has popped and gives the same numbers; dout is never written; a float64 dout
    on a float32 cache gives float64 gradients, as before the in-place passes."""
    rng = np.random.default_rng(5)
    x, dout = (rng.standard_normal((2, 4, 4, 8)).astype(np.float32) for _ in range(2))
    gamma, beta = (a.astype(np.float32) for a in _affine(rng, 8))
    _, cache = group_norm_silu_forward(x, gamma, beta, 4)
    kept = [a.copy() for a in (cache.xc, cache.dsilu, dout)]
    first, second = group_norm_silu_backward(dout, cache), group_norm_silu_backward(dout, cache)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(kept, (cache.xc, cache.dsilu, dout)):
        np.testing.assert_array_equal(a, b)
    consumed = group_norm_silu_backward(dout, cache, consume=True)
    for a, b in zip(first, consumed):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    _, cache = group_norm_silu_forward(x, gamma, beta, 4)
    dx64, _, _ = group_norm_silu_backward(dout.astype(np.float64), cache, consume=True)
    assert dx64.dtype == np.float64 and cache.dsilu.dtype == np.float32
    np.testing.assert_allclose(dx64, first[0], rtol=1e-5, atol=1e-5)


def test_group_norm_silu_without_grad_keeps_no_derivative():
    _, cache = group_norm_silu_forward(np.ones((1, 2, 2, 4)), None, None, 2, with_grad=False)
    assert cache.dsilu is None


@pytest.fixture(params=SOURCES, scope="module")
def torch_cases(request):
    return reference("norm", request.param)


def test_group_norm_matches_torch(torch_cases):
    gn_cases = {k: v for k, v in torch_cases.items() if k.startswith("gn_")}
    assert len(gn_cases) == 5
    for name, c in gn_cases.items():
        layer = GroupNorm(int(c["groups"]), c["x"].shape[-1], eps=float(c["eps"]))
        layer.load_state_dict({"weight": c["w"], "bias": c["b"]})
        y = layer(c["x"])
        assert_close(y, c["out"], what=f"{name}: out")
        dx = layer.backward(c["dout"])
        assert_close(dx, c["dx"], what=f"{name}: dx")
        # dgamma/dbeta sum over every position of every sample: larger float32 sums
        assert_close(layer.grads["weight"], c["dw"], atol=5e-5, what=f"{name}: dweight")
        assert_close(layer.grads["bias"], c["db"], atol=5e-5, what=f"{name}: dbias")


@pytest.mark.parametrize("channels,groups", [(6, 4), (5, 2)])
def test_group_norm_rejects_indivisible_channels(channels, groups):
    with pytest.raises(ValueError, match=f"num_channels={channels} must be divisible by num_groups={groups}"):
        GroupNorm(groups, channels)


def test_group_norm_op_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="divisible by num_groups=4"):
        group_norm_forward(np.zeros((1, 2, 2, 6)), None, None, 4)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (np.zeros((2, 4, 4, 3), np.float32), ValueError,
         r"GroupNorm expects x of shape \(\.\.\., 8\).*got \(2, 4, 4, 3\)"),
        (np.zeros((2, 8, 4, 4), np.float32), ValueError, r"GroupNorm expects x .*got \(2, 8, 4, 4\)"),
        (np.zeros(8, np.float32), ValueError, r"GroupNorm expects x .*at least 2 dims, got \(8,\)"),
        (np.zeros((2, 4, 4, 8), np.int32), TypeError, "GroupNorm expects x with a floating dtype"),
        (np.full((2, 4, 4, 8), np.inf, np.float32), ValueError, "GroupNorm got a non-finite value"),
    ],
)
def test_group_norm_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        GroupNorm(4, 8)(x)


# ----------------------------------------------------------------------------- LayerNorm


@pytest.mark.parametrize("shape", [(4, 5), (1, 3), (2, 3, 7), (2, 3, 3, 5), (1, 1, 1)])
def test_layer_norm_op_gradcheck(shape):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape) - 1.0
    gamma, beta = _affine(rng, shape[-1])
    errors = check_op(layer_norm_forward, layer_norm_backward, [x, gamma, beta], kwargs={"eps": 1e-5})
    assert set(errors) == {0, 1, 2}
    assert max(errors.values()) < 1e-7, errors


def test_layer_norm_module_gradcheck_without_affine():
    layer = LayerNorm(7, elementwise_affine=False).to(dtype=np.float64)
    errors = check_module(layer, np.random.default_rng(7).standard_normal((3, 2, 7)))
    assert set(errors) == {"input0"}
    assert errors["input0"] < 1e-7, errors


def test_layer_norm_module_gradcheck():
    rng = np.random.default_rng(8)
    layer = LayerNorm((5,), eps=1e-6).to(dtype=np.float64)
    gamma, beta = _affine(rng, 5)
    layer.load_state_dict({"weight": gamma, "bias": beta})
    errors = check_module(layer, rng.standard_normal((2, 4, 5)))
    assert set(errors) == {"input0", "weight", "bias"}
    assert max(errors.values()) < 1e-7, errors


def test_layer_norm_is_shift_invariant_in_float32():
    x = np.random.default_rng(9).standard_normal((4, 64)).astype(np.float32)
    layer = LayerNorm(64)
    np.testing.assert_allclose(layer(x + np.float32(1000)), layer(x), atol=2e-3)


def test_layer_norm_matches_torch(torch_cases):
    ln_cases = {k: v for k, v in torch_cases.items() if k.startswith("ln_")}
    assert len(ln_cases) == 3
    for name, c in ln_cases.items():
        layer = LayerNorm(c["x"].shape[-1], eps=float(c["eps"]))
        layer.load_state_dict({"weight": c["w"], "bias": c["b"]})
        y = layer(c["x"])
        assert y.dtype == np.float32
        assert_close(y, c["out"], what=f"{name}: out")
        assert_close(layer.backward(c["dout"]), c["dx"], what=f"{name}: dx")
        assert_close(layer.grads["weight"], c["dw"], atol=5e-5, what=f"{name}: dweight")
        assert_close(layer.grads["bias"], c["db"], atol=5e-5, what=f"{name}: dbias")


@pytest.mark.parametrize(
    "x,error,match",
    [
        (np.zeros((2, 5), np.float32), ValueError, r"LayerNorm expects x of shape \(\.\.\., 4\).*got \(2, 5\)"),
        (np.zeros((2, 4), np.float16).astype(np.int8), TypeError, "LayerNorm expects x with a floating dtype"),
        (np.array([[0.0, np.nan, 1.0, 2.0]], np.float32), ValueError, "LayerNorm got a non-finite value"),
    ],
)
def test_layer_norm_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        LayerNorm(4)(x)


def test_layer_norm_rejects_multi_axis_shape():
    with pytest.raises(ValueError, match=r"normalized_shape must be an int or a 1-tuple, got \(4, 5\)"):
        LayerNorm((4, 5))


@pytest.mark.parametrize("layer", [GroupNorm(2, 4), LayerNorm(4)])
def test_backward_without_forward_raises(layer):
    with pytest.raises(RuntimeError, match=f"{type(layer).__name__}.backward called without"):
        layer.backward(np.zeros((1, 2, 2, 4), np.float32))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["group", "group_silu", "layer"])
def test_norm_cupy_matches_numpy(kind):
    import cupy as cp

    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 5, 5, 8)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma, beta = (a.astype(np.float32) for a in _affine(rng, 8))
    if kind == "group":
        fwd, bwd, kw = group_norm_forward, group_norm_backward, {"num_groups": 4}
    elif kind == "group_silu":
        fwd, bwd, kw = group_norm_silu_forward, group_norm_silu_backward, {"num_groups": 4}
    else:
        fwd, bwd, kw = layer_norm_forward, layer_norm_backward, {}
    y, cache = fwd(x, gamma, beta, **kw)
    grads = bwd(dy, cache)
    y_gpu, cache_gpu = fwd(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta), **kw)
    assert isinstance(y_gpu, cp.ndarray)
    grads_gpu = bwd(cp.asarray(dy), cache_gpu)
    assert_close(y_gpu, y, what="out")
    for name, g, g_gpu in zip(("dx", "dgamma", "dbeta"), grads, grads_gpu):
        assert_close(g_gpu, g, atol=5e-5, what=name)
