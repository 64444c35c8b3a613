import numpy as np
import pytest
from helpers import SOURCES, assert_close, reference

from diffusion_np.gradcheck import check_module, check_op
from diffusion_np.nn import Linear, linear_backward, linear_forward


@pytest.mark.parametrize("x_shape,n_out", [((3, 4), 5), ((2, 3, 7), 2), ((1, 2, 3, 5), 4), ((1, 1), 1)])
def test_linear_op_gradcheck(x_shape, n_out):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((n_out, x_shape[-1]))
    b = rng.standard_normal(n_out)
    errors = check_op(linear_forward, linear_backward, [x, w, b])
    assert max(errors.values()) < 1e-7, errors


def test_linear_module_gradcheck_without_bias():
    layer = Linear(6, 3, bias=False, rng=np.random.default_rng(1)).to(dtype=np.float64)
    x = np.random.default_rng(2).standard_normal((2, 4, 6))
    errors = check_module(layer, x)
    assert set(errors) == {"input0", "weight"}
    assert max(errors.values()) < 1e-7, errors


@pytest.fixture(params=SOURCES, scope="module")
def torch_cases(request):
    return reference("linear", request.param)


def test_linear_matches_torch(torch_cases):
    for name, c in torch_cases.items():
        layer = Linear(c["w"].shape[1], c["w"].shape[0])
        layer.load_state_dict({"weight": c["w"], "bias": c["b"]})
        y = layer(c["x"])
        assert_close(y, c["out"], what=f"{name}: out")
        dx = layer.backward(c["dout"])
        assert_close(dx, c["dx"], what=f"{name}: dx")
        assert_close(layer.grads["weight"], c["dw"], what=f"{name}: dw")
        assert_close(layer.grads["bias"], c["db"], what=f"{name}: db")


def test_linear_gradients_accumulate_until_zeroed():
    layer = Linear(3, 2, rng=np.random.default_rng(0))
    x = np.ones((4, 3), np.float32)
    layer(x)
    layer.backward(np.ones((4, 2), np.float32))
    first = layer.grads["weight"].copy()
    layer(x)
    layer.backward(np.ones((4, 2), np.float32))
    np.testing.assert_allclose(layer.grads["weight"], 2 * first)
    layer.zero_grad()
    assert not layer.grads["weight"].any()


@pytest.mark.parametrize(
    "x,error,match",
    [
        (np.zeros((2, 4), np.float32), ValueError, r"Linear expects x of shape \(\.\.\., 3\).*got \(2, 4\)"),
        (np.zeros(3, np.float32), ValueError, r"Linear expects x .*got \(3,\)"),
        (np.zeros((2, 3), np.int64), TypeError, "Linear expects x with a floating dtype"),
        (np.full((2, 3), np.nan, np.float32), ValueError, "Linear got a non-finite value"),
    ],
)
def test_linear_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        Linear(3, 2)(x)


def test_backward_without_forward_raises():
    with pytest.raises(RuntimeError, match="Linear.backward called without a preceding forward"):
        Linear(3, 2).backward(np.zeros((1, 2), np.float32))
