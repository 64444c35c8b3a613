import numpy as np
import pytest
from helpers import SOURCES, assert_close, reference

from diffusion_np.gradcheck import check_op
from diffusion_np.nn.classification import (
    log_softmax,
    softmax_cross_entropy_backward,
    softmax_cross_entropy_forward,
)

SHAPES = [(4, 10), (1, 3), (7, 5), (3, 1), (2, 2)]


def _logits_labels(shape, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    B, K = shape
    return scale * rng.standard_normal(shape), rng.integers(0, K, size=B)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_gradcheck(shape, reduction):
    logits, labels = _logits_labels(shape)
    # check_op's backward is (dout, cache); ours is (cache, dloss): dlogits only
    errors = check_op(
        lambda z: softmax_cross_entropy_forward(z, labels, reduction),
        lambda d, c: softmax_cross_entropy_backward(c, d),
        [logits],
    )
    assert errors[0] < 1e-7, errors


def test_cross_entropy_values():
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [np.log(3.0), 0.0, 0.0, 0.0]])
    labels = np.array([2, 0])
    loss, cache = softmax_cross_entropy_forward(logits, labels)
    # uniform over 4: -log(1/4); p = 3/6 for the second: -log(1/2)
    assert float(loss) == pytest.approx((np.log(4.0) + np.log(2.0)) / 2)
    expected = np.array([[0.25, 0.25, -0.75, 0.25], [0.5 - 1.0, 1 / 6, 1 / 6, 1 / 6]]) / 2
    np.testing.assert_allclose(softmax_cross_entropy_backward(cache), expected)
    loss_sum, _ = softmax_cross_entropy_forward(logits, labels, reduction="sum")
    assert float(loss_sum) == pytest.approx(2 * float(loss))


def test_cross_entropy_gradient_rows_sum_to_zero():
    # sum_k (p_k - onehot_k) = 1 - 1: shifting all logits of a row changes nothing
    logits, labels = _logits_labels((5, 7), seed=3)
    _, cache = softmax_cross_entropy_forward(logits, labels)
    np.testing.assert_allclose(softmax_cross_entropy_backward(cache, 0.7).sum(axis=1), 0.0, atol=1e-15)
    shifted, _ = softmax_cross_entropy_forward(logits + 123.0, labels)
    assert float(shifted) == pytest.approx(float(softmax_cross_entropy_forward(logits, labels)[0]), rel=1e-12)


def test_cross_entropy_is_stable_for_large_logits_in_float32():
    logits = np.array([[1000.0, 0.0, -1000.0], [-500.0, 500.0, 0.0]], np.float32)
    labels = np.array([0, 0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        loss, cache = softmax_cross_entropy_forward(logits, labels)
        dlogits = softmax_cross_entropy_backward(cache)
    assert loss.dtype == np.float32 and dlogits.dtype == np.float32
    assert float(loss) == pytest.approx((0.0 + 1000.0) / 2)  # the second row is off by 1000
    np.testing.assert_allclose(dlogits, [[0, 0, 0], [-0.5, 0.5, 0]], atol=1e-7)
    np.testing.assert_allclose(log_softmax(logits)[0], [0.0, -1000.0, -2000.0])


def test_cross_entropy_keeps_float32():
    logits, labels = _logits_labels((3, 4))
    loss, cache = softmax_cross_entropy_forward(logits.astype(np.float32), labels)
    assert loss.dtype == np.float32
    assert softmax_cross_entropy_backward(cache, np.float64(2.0)).dtype == np.float32


@pytest.fixture(params=SOURCES, scope="module")
def torch_cases(request):
    return reference("classification", request.param)


def test_cross_entropy_matches_torch(torch_cases):
    assert len(torch_cases) == 9
    for name, c in torch_cases.items():
        reduction = "sum" if name.endswith("_sum") else "mean"
        loss, cache = softmax_cross_entropy_forward(c["logits"], c["labels"], reduction)
        assert_close(loss, c["loss"], what=f"{name}: loss")
        assert_close(softmax_cross_entropy_backward(cache, c["dloss"]), c["dlogits"], what=f"{name}: dlogits")


@pytest.mark.parametrize(
    "logits,labels,reduction,error,match",
    [
        (np.zeros(4), np.zeros(4, np.int64), "mean", ValueError, r"logits of shape \(B, K\).*got \(4,\)"),
        (np.zeros((2, 3, 4)), np.zeros(2, np.int64), "mean", ValueError, r"logits of shape \(B, K\)"),
        (np.zeros((0, 3)), np.zeros(0, np.int64), "mean", ValueError, r"B, K >= 1, got \(0, 3\)"),
        (np.zeros((2, 3), np.int64), np.zeros(2, np.int64), "mean", TypeError, "floating dtype"),
        (np.full((2, 3), np.nan), np.zeros(2, np.int64), "mean", ValueError, "non-finite value"),
        (np.zeros((2, 3)), np.zeros(2), "mean", TypeError, "integer labels"),
        (np.zeros((2, 3)), [0, 1], "mean", TypeError, "integer labels"),
        (np.zeros((2, 3)), np.zeros(3, np.int64), "mean", ValueError, r"labels of shape \(2,\).*got \(3,\)"),
        (np.zeros((2, 3)), np.zeros((2, 1), np.int64), "mean", ValueError, r"labels of shape \(2,\)"),
        (np.zeros((2, 3)), np.array([0, 3]), "mean", ValueError, r"labels must lie in 0\.\.2, got min 0 max 3"),
        (np.zeros((2, 3)), np.array([-1, 0]), "mean", ValueError, r"labels must lie in 0\.\.2"),
        (np.zeros((2, 3)), np.array([0, 1]), "none", ValueError, "reduction must be one of"),
    ],
)
def test_cross_entropy_bad_input(logits, labels, reduction, error, match):
    with pytest.raises(error, match=match):
        softmax_cross_entropy_forward(logits, labels, reduction)


@pytest.mark.gpu
def test_cross_entropy_cupy_matches_numpy():
    import cupy

    logits, labels = _logits_labels((6, 10), seed=5)
    loss, cache = softmax_cross_entropy_forward(logits, labels)
    loss_gpu, cache_gpu = softmax_cross_entropy_forward(cupy.asarray(logits), cupy.asarray(labels))
    assert isinstance(loss_gpu, cupy.ndarray)
    np.testing.assert_allclose(float(loss_gpu), float(loss), rtol=1e-12)
    np.testing.assert_allclose(
        cupy.asnumpy(softmax_cross_entropy_backward(cache_gpu, 0.7)),
        softmax_cross_entropy_backward(cache, 0.7),
        rtol=1e-12,
        atol=1e-14,
    )
