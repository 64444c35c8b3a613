import numpy as np
import pytest

from diffusion_np.gradcheck import check_module, check_op, grad_rel_error, numerical_gradient, rel_error
from diffusion_np.nn import Linear, linear_backward, linear_forward


def _wrong_linear_backward(dy, cache):
    """The classic bug: dW without the transpose (only type-checks for square shapes)."""
    x, w, _ = cache
    return dy @ w, (x.T @ dy).T.T, dy.sum(axis=0)


def test_check_op_passes_a_right_backward_and_fails_a_wrong_one():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((4, 4)), rng.standard_normal((4, 4)), rng.standard_normal(4)
    assert max(check_op(linear_forward, linear_backward, [x, w, b]).values()) < 1e-8
    assert check_op(linear_forward, _wrong_linear_backward, [x, w, b])[1] > 1e-2


def test_numerical_gradient_of_a_quadratic_and_at_positions():
    x = np.array([[1.0, -2.0], [3.0, 0.5]])
    a = np.array([[2.0, 1.0], [-1.0, 4.0]])

    def loss():
        return float((a * x**2).sum())

    full = numerical_gradient(loss, x)
    np.testing.assert_allclose(full, 2 * a * x, rtol=1e-7)
    np.testing.assert_allclose(numerical_gradient(loss, x, positions=[3, 0]), full.ravel()[[3, 0]])
    np.testing.assert_array_equal(x, [[1.0, -2.0], [3.0, 0.5]])  # restored after perturbing


def test_check_module_on_sampled_coordinates():
    layer = Linear(30, 20, rng=np.random.default_rng(1)).to(dtype=np.float64)
    x = np.random.default_rng(2).standard_normal((3, 30))
    errors = check_module(layer, x, max_coordinates=5)
    assert set(errors) == {"input0", "weight", "bias"} and max(errors.values()) < 1e-8


def test_check_module_sees_a_wrong_parameter_gradient():
    layer = Linear(4, 3, rng=np.random.default_rng(1)).to(dtype=np.float64)
    original = layer.backward

    def backward_with_bug(dy):
        dx = original(dy)
        layer.grads["bias"] *= 2  # as if the bias gradient were accumulated twice
        return dx

    layer.backward = backward_with_bug
    errors = check_module(layer, np.random.default_rng(2).standard_normal((5, 4)))
    assert errors["bias"] > 0.1 and errors["weight"] < 1e-8


def test_errors_and_refusals():
    assert rel_error(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == 0.0
    assert grad_rel_error(np.ones(3), -np.ones(3)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        rel_error(np.ones(2), np.ones(3))
    with pytest.raises(TypeError, match="need float64"):
        check_op(linear_forward, linear_backward, [np.ones((2, 2), np.float32), np.ones((2, 2)), np.ones(2)])
