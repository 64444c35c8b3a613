import warnings

import numpy as np
import pytest
from helpers import SOURCES, assert_close, reference

from diffusion_np.gradcheck import check_module, check_op
from diffusion_np.nn.activation import (
    GEGLU,
    GELU,
    Dropout,
    QuickGELU,
    Sigmoid,
    SiLU,
    dropout_backward,
    dropout_forward,
    geglu_backward,
    geglu_forward,
    gelu_backward,
    gelu_forward,
    quick_gelu_backward,
    quick_gelu_forward,
    sigmoid_backward,
    sigmoid_forward,
    silu_backward,
    silu_forward,
)

OPS = {
    "sigmoid": (sigmoid_forward, sigmoid_backward, {}),
    "silu": (silu_forward, silu_backward, {}),
    "gelu": (gelu_forward, gelu_backward, {}),
    "gelu_tanh": (gelu_forward, gelu_backward, {"approximate": "tanh"}),
    "quick_gelu": (quick_gelu_forward, quick_gelu_backward, {}),
}
MODULES = {"sigmoid": Sigmoid, "silu": SiLU, "gelu": GELU, "gelu_tanh": lambda: GELU("tanh"),
           "quick_gelu": QuickGELU}


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("shape", [(3, 4), (1, 5, 5, 3), (2, 7)])
def test_elementwise_op_gradcheck(name, shape):
    fwd, bwd, kwargs = OPS[name]
    x = 2.5 * np.random.default_rng(1).standard_normal(shape)
    errors = check_op(fwd, bwd, [x], kwargs=kwargs)
    assert errors[0] < 1e-7, errors


@pytest.mark.parametrize("name", OPS)
def test_elementwise_module_gradcheck(name):
    layer = MODULES[name]().to(dtype=np.float64)
    errors = check_module(layer, np.random.default_rng(2).standard_normal((2, 3, 5)))
    assert errors["input0"] < 1e-7, errors


LARGE = [-1e30, -1e4, -1000.0, -100.0, -89.0, -88.0, -20.0, 0.0, 20.0, 88.0, 89.0, 100.0, 1000.0, 1e4, 1e30]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["sigmoid", "silu", "quick_gelu"])
def test_sigmoid_family_is_stable_for_large_inputs(name, dtype):
    fwd, bwd, _ = OPS[name]
    x = np.array(LARGE, dtype=dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")  # any RuntimeWarning fails the test
        y, cache = fwd(x)
        dx = bwd(np.ones_like(x), cache)
    assert y.dtype == dx.dtype == dtype
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    neg, pos = x <= -100, x >= 100
    if name == "sigmoid":
        np.testing.assert_array_equal(y[neg], 0)
        np.testing.assert_array_equal(y[pos], 1)
        np.testing.assert_array_equal(dx[neg | pos], 0)
    else:  # x * sigmoid(a x): 0 on the left, x on the right; slope 0 and 1
        np.testing.assert_array_equal(y[neg], 0)
        np.testing.assert_array_equal(y[pos], x[pos])
        np.testing.assert_array_equal(dx[neg], 0)
        np.testing.assert_array_equal(dx[pos], 1)


def test_sigmoid_gradcheck_in_the_tails():
    x = np.array([-30.0, -15.0, -5.0, 5.0, 15.0, 30.0])
    for fwd, bwd in [(silu_forward, silu_backward), (sigmoid_forward, sigmoid_backward)]:
        assert check_op(fwd, bwd, [x.copy()])[0] < 1e-7


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'fast'"):
        GELU("fast")
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        gelu_forward(np.zeros(3), approximate="erf")


@pytest.mark.parametrize("name", OPS)
def test_activations_keep_float32(name):
    fwd, bwd, kwargs = OPS[name]
    x = np.linspace(-4, 4, 11, dtype=np.float32)
    y, cache = fwd(x, **kwargs)
    assert y.dtype == bwd(np.ones_like(y), cache).dtype == np.float32


# ----------------------------------------------------------------------------- GEGLU


@pytest.mark.parametrize("shape", [(2, 6), (1, 3, 8), (2, 3, 3, 4)])
def test_geglu_op_gradcheck(shape):
    hg = 1.5 * np.random.default_rng(3).standard_normal(shape)
    assert check_op(geglu_forward, geglu_backward, [hg])[0] < 1e-7


def test_geglu_splits_h_then_g():
    hg = np.array([[2.0, 3.0, 0.0, 10.0]])  # h = (2, 3), g = (0, 10): gelu(0) = 0, gelu(10) = 10
    out, _ = geglu_forward(hg)
    np.testing.assert_allclose(out, [[0.0, 30.0]])


def test_geglu_module_gradcheck_and_names():
    layer = GEGLU(5, 3, rng=np.random.default_rng(4)).to(dtype=np.float64)
    assert set(layer.state_dict()) == {"proj.weight", "proj.bias"}
    assert layer.proj.weight.shape == (6, 5)
    errors = check_module(layer, np.random.default_rng(5).standard_normal((2, 3, 5)))
    assert set(errors) == {"input0", "proj.weight", "proj.bias"}
    assert max(errors.values()) < 1e-7, errors


def test_geglu_rejects_odd_width():
    with pytest.raises(ValueError, match=r"even size 2D, got \(2, 5\)"):
        geglu_forward(np.zeros((2, 5)))


# ----------------------------------------------------------------------------- torch parity


@pytest.fixture(params=SOURCES, scope="module")
def torch_cases(request):
    return reference("activation", request.param)


@pytest.mark.parametrize("name", OPS)
def test_activation_matches_torch(torch_cases, name):
    c = torch_cases[name]
    layer = MODULES[name]()
    y = layer(c["x"])
    assert_close(y, c["out"], what=f"{name}: out")
    assert_close(layer.backward(c["dout"]), c["dx"], what=f"{name}: dx")


@pytest.mark.parametrize("name", ["geglu_tokens", "geglu_batch1"])
def test_geglu_matches_diffusers(torch_cases, name):
    c = torch_cases[name]
    layer = GEGLU(c["x"].shape[-1], c["w"].shape[0] // 2)
    layer.load_state_dict({"proj.weight": c["w"], "proj.bias": c["b"]})
    y = layer(c["x"])
    assert_close(y, c["out"], what=f"{name}: out")
    assert_close(layer.backward(c["dout"]), c["dx"], what=f"{name}: dx")
    assert_close(layer.proj.grads["weight"], c["dw"], what=f"{name}: dw")
    assert_close(layer.proj.grads["bias"], c["db"], what=f"{name}: db")


# ----------------------------------------------------------------------------- Dropout


def test_dropout_train_drops_and_rescales():
    x = np.random.default_rng(6).uniform(1.0, 2.0, (200, 500)).astype(np.float32)
    layer = Dropout(0.3, seed=1)
    y = layer(x)
    assert y.dtype == np.float32
    dropped = y == 0
    assert abs(dropped.mean() - 0.3) < 0.01  # 100k draws: std of the fraction ~0.0015
    np.testing.assert_allclose(y[~dropped], x[~dropped] / 0.7, rtol=1e-6)
    assert abs(y.mean() / x.mean() - 1.0) < 0.01  # inverted dropout keeps the expectation


def test_dropout_backward_uses_the_forward_mask():
    rng = np.random.default_rng(7)
    x = rng.uniform(1.0, 2.0, (64, 33)).astype(np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    layer = Dropout(0.5, seed=2)
    y = layer(x)
    dx = layer.backward(dout)
    np.testing.assert_allclose(dx, dout * (y / x), rtol=1e-6)  # y / x is the mask
    y2 = layer(x)  # a new forward draws a new mask...
    assert (y2 != y).any()
    np.testing.assert_allclose(layer.backward(dout), dout * (y2 / x), rtol=1e-6)  # ...and backward follows it


def test_dropout_op_gradcheck_with_a_fixed_mask():
    x = np.random.default_rng(8).standard_normal((5, 7))
    errors = check_op(lambda a: dropout_forward(a, 0.4, np.random.default_rng(3)), dropout_backward, [x])
    assert errors[0] < 1e-7


def test_dropout_is_seeded():
    x = np.ones((10, 10), np.float32)
    np.testing.assert_array_equal(Dropout(0.5, seed=3)(x), Dropout(0.5, seed=3)(x))
    assert (Dropout(0.5, seed=3)(x) != Dropout(0.5, seed=4)(x)).any()


@pytest.mark.parametrize("p,train", [(0.5, False), (0.0, True)])
def test_dropout_identity_in_eval_or_at_p0(p, train):
    x = np.random.default_rng(9).standard_normal((4, 6)).astype(np.float32)
    dout = np.random.default_rng(10).standard_normal((4, 6)).astype(np.float32)
    layer = Dropout(p).train(train)
    np.testing.assert_array_equal(layer(x), x)
    np.testing.assert_array_equal(layer.backward(dout), dout)


def test_dropout_p1_drops_everything():
    layer = Dropout(1.0)
    x = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(layer(x), 0)
    np.testing.assert_array_equal(layer.backward(x), 0)


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_dropout_rejects_bad_p(p):
    with pytest.raises(ValueError, match=r"Dropout: p must be in \[0, 1\]"):
        Dropout(p)


# ----------------------------------------------------------------------------- bad input

ALL_MODULES = {**MODULES, "geglu": lambda: GEGLU(4, 2), "dropout": lambda: Dropout(0.1)}
CLASS_NAME = {"sigmoid": "Sigmoid", "silu": "SiLU", "gelu": "GELU", "gelu_tanh": "GELU",
              "quick_gelu": "QuickGELU", "geglu": "GEGLU", "dropout": "Dropout"}


@pytest.mark.parametrize("name", ALL_MODULES)
def test_activation_bad_input(name):
    layer, cls = ALL_MODULES[name](), CLASS_NAME[name]
    with pytest.raises(TypeError, match=f"{cls} expects x with a floating dtype"):
        layer(np.ones((2, 4), np.int64))
    with pytest.raises(ValueError, match=f"{cls} got a non-finite value"):
        layer(np.array([[1.0, np.nan, 0.0, 2.0]], np.float32))
    with pytest.raises(TypeError, match=f"{cls} expects x to be an array, got list"):
        layer([[1.0, 2.0, 3.0, 4.0]])


def test_geglu_bad_shape():
    with pytest.raises(ValueError, match=r"GEGLU expects x of shape \(\.\.\., 4\).*got \(2, 3\)"):
        GEGLU(4, 2)(np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("name", ALL_MODULES)
def test_backward_without_forward_raises(name):
    layer = ALL_MODULES[name]()
    with pytest.raises(RuntimeError, match="backward called without a preceding forward"):
        layer.backward(np.zeros((1, 2), np.float32))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", [*OPS, "geglu", "dropout"])
def test_activation_cupy_matches_numpy(name):
    import cupy as cp

    rng = np.random.default_rng(11)
    x = (3.0 * rng.standard_normal((2, 5, 8))).astype(np.float32)
    dout = rng.standard_normal((2, 5, 4) if name == "geglu" else x.shape).astype(np.float32)
    if name == "geglu":
        fwd, bwd, kwargs = geglu_forward, geglu_backward, {}
    elif name == "dropout":  # same seed: the host-drawn mask is the same on both devices
        fwd, bwd = (lambda a: dropout_forward(a, 0.3, np.random.default_rng(0))), dropout_backward
        kwargs = {}
    else:
        fwd, bwd, kwargs = OPS[name]
    y, cache = fwd(x, **kwargs)
    y_gpu, cache_gpu = fwd(cp.asarray(x), **kwargs)
    assert isinstance(y_gpu, cp.ndarray)
    assert_close(y_gpu, y, what="out")
    assert_close(bwd(cp.asarray(dout), cache_gpu), bwd(dout, cache), what="dx")
