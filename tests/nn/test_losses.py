import numpy as np
import pytest
from helpers import SOURCES, assert_close, reference

from diffusion_np.gradcheck import check_op
from diffusion_np.nn.losses import (
    gaussian_kl_backward,
    gaussian_kl_forward,
    l1_loss_backward,
    l1_loss_forward,
    mse_loss_backward,
    mse_loss_forward,
    pseudo_huber_loss_backward,
    pseudo_huber_loss_forward,
)

PAIRS = {"mse": (mse_loss_forward, mse_loss_backward), "l1": (l1_loss_forward, l1_loss_backward)}
SHAPES = [(3, 4, 4, 2), (1, 5), (2, 3, 7)]


def _pred_target(shape, seed=1):
    rng = np.random.default_rng(seed)
    pred = rng.standard_normal(shape)
    # keep |pred - target| away from 0, where |.| has no derivative (L1)
    target = pred + rng.choice([-1.0, 1.0], shape) * rng.uniform(0.1, 1.0, shape)
    return pred, target, rng.uniform(0.1, 2.0, shape[0])


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_regression_loss_gradcheck(name, shape, reduction, weighted):
    fwd, bwd = PAIRS[name]
    pred, target, weights = _pred_target(shape)
    weights = weights if weighted else None
    # check_op's backward is (dout, cache) with one gradient per input: dpred only
    errors = check_op(lambda p: fwd(p, target, weights, reduction), lambda d, c: bwd(c, d), [pred])
    assert errors[0] < 1e-7, errors


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("c", [1e-3, 0.5])
def test_pseudo_huber_gradcheck(shape, reduction, weighted, c):
    """Differences of order c and far beyond it: the quadratic and the linear regime."""
    pred, target, weights = _pred_target(shape)
    target = pred + (target - pred) * np.random.default_rng(3).choice([0.003, 1.0], shape)
    errors = check_op(lambda p: pseudo_huber_loss_forward(p, target, c, weights if weighted else None, reduction),
                      lambda d, cache: pseudo_huber_loss_backward(cache, d), [pred])
    assert errors[0] < 1e-7, errors


def test_pseudo_huber_limits():
    """d^2 / (2c) for |d| << c; |d| - c for |d| >> c; 0 at d = 0 with a zero gradient there."""
    d = np.array([[1e-6, -1e-6, 10.0, -20.0, 0.0]])
    values = [float(pseudo_huber_loss_forward(d[:, i:i + 1], np.zeros((1, 1)), c=1e-3)[0]) for i in range(5)]
    assert values[0] == pytest.approx(1e-12 / 2e-3, rel=1e-5) and values[1] == pytest.approx(values[0])
    assert values[2] == pytest.approx(10.0 - 1e-3, rel=1e-7) and values[3] == pytest.approx(20.0 - 1e-3, rel=1e-7)
    _, cache = pseudo_huber_loss_forward(d, np.zeros_like(d), c=1e-3, reduction="sum")
    np.testing.assert_allclose(pseudo_huber_loss_backward(cache), [[1e-3, -1e-3, 1.0, -1.0, 0.0]], atol=1e-6)
    with pytest.raises(ValueError, match="c must be > 0"):
        pseudo_huber_loss_forward(d, d, c=0.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_kl_gradcheck(shape):
    rng = np.random.default_rng(2)
    mean, logvar = rng.standard_normal(shape), 0.8 * rng.standard_normal(shape)
    errors = check_op(gaussian_kl_forward, lambda d, c: gaussian_kl_backward(c, d), [mean, logvar])
    assert set(errors) == {0, 1}
    assert max(errors.values()) < 1e-7, errors


def test_mse_loss_values():
    pred = np.array([[1.0, 2.0], [3.0, 5.0]])
    target = np.zeros((2, 2))
    assert float(mse_loss_forward(pred, target)[0]) == pytest.approx((1 + 4 + 9 + 25) / 4)
    assert float(mse_loss_forward(pred, target, reduction="sum")[0]) == pytest.approx(39)
    w = np.array([2.0, 0.5])
    assert float(mse_loss_forward(pred, target, w)[0]) == pytest.approx((2 * 5 + 0.5 * 34) / 4)
    _, cache = mse_loss_forward(pred, target, w)
    np.testing.assert_allclose(mse_loss_backward(cache), 2 * pred * w[:, None] / 4)


def test_unit_weights_equal_no_weights():
    pred, target, _ = _pred_target((3, 4, 5))
    for fwd, bwd in PAIRS.values():
        loss_w, cache_w = fwd(pred, target, np.ones(3))
        loss, cache = fwd(pred, target)
        assert float(loss_w) == pytest.approx(float(loss))
        np.testing.assert_allclose(bwd(cache_w, 0.3), bwd(cache, 0.3))


def test_l1_gradient_is_zero_where_pred_equals_target():
    pred = np.array([1.0, 2.0, 3.0, 4.0])
    target = np.array([1.0, 0.0, 3.0, 5.0])
    _, cache = l1_loss_forward(pred, target)
    np.testing.assert_array_equal(l1_loss_backward(cache), [0.0, 0.25, 0.0, -0.25])


def test_gaussian_kl_values():
    zero, _ = gaussian_kl_forward(np.zeros((2, 3)), np.zeros((2, 3)))
    assert float(zero) == 0.0  # N(0, 1) against itself
    # one sample, one number: 0.5 (mu^2 + sigma^2 - 1 - log sigma^2)
    mu, logvar = 1.5, np.log(0.25)
    loss, _ = gaussian_kl_forward(np.array([[mu]]), np.array([[logvar]]))
    assert float(loss) == pytest.approx(0.5 * (mu**2 + 0.25 - 1 - logvar))
    # sum over non-batch axes, mean over the batch: doubling the batch keeps the loss
    m = np.random.default_rng(3).standard_normal((1, 4, 4, 2))
    lv = np.random.default_rng(4).standard_normal((1, 4, 4, 2))
    one, _ = gaussian_kl_forward(m, lv)
    two, _ = gaussian_kl_forward(np.concatenate([m, m]), np.concatenate([lv, lv]))
    assert float(two) == pytest.approx(float(one))


@pytest.mark.parametrize("dloss", [1.0, np.float64(0.5), np.array(2.0)])
def test_losses_keep_float32(dloss):
    rng = np.random.default_rng(5)
    pred = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    target = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    w = np.array([0.5, 2.0])  # float64 weights are cast to the data's dtype
    for fwd, bwd in PAIRS.values():
        loss, cache = fwd(pred, target, w)
        assert loss.dtype == np.float32
        assert bwd(cache, dloss).dtype == np.float32
    loss, cache = gaussian_kl_forward(pred, target)
    assert loss.dtype == np.float32
    assert all(g.dtype == np.float32 for g in gaussian_kl_backward(cache, dloss))


# ----------------------------------------------------------------------------- torch parity


@pytest.fixture(params=SOURCES, scope="module")
def torch_cases(request):
    return reference("losses", request.param)


def test_regression_losses_match_torch(torch_cases):
    names = [k for k in torch_cases if k.startswith(("mse", "l1"))]
    assert len(names) == 12
    for name in names:
        c = torch_cases[name]
        fwd, bwd = PAIRS[name.split("_")[0]]
        reduction = "sum" if "_sum_" in name else "mean"
        loss, cache = fwd(c["pred"], c["target"], c.get("weights"), reduction)
        # a sum of up to 96 float32 terms of size ~2: atol scaled to the value
        assert_close(loss, c["loss"], atol=1e-5 * max(1.0, abs(float(c["loss"]))), what=f"{name}: loss")
        assert_close(bwd(cache, c["dloss"]), c["dpred"], what=f"{name}: dpred")


def test_pseudo_huber_matches_torch(torch_cases):
    names = [k for k in torch_cases if k.startswith("huber_")]
    assert len(names) == 6
    for name in names:
        c = torch_cases[name]
        reduction = "sum" if "_sum_" in name else "mean"
        loss, cache = pseudo_huber_loss_forward(c["pred"], c["target"], float(c["c"]), c.get("weights"), reduction)
        assert_close(loss, c["loss"], atol=1e-5 * max(1.0, abs(float(c["loss"]))), what=f"{name}: loss")
        assert_close(pseudo_huber_loss_backward(cache, c["dloss"]), c["dpred"], what=f"{name}: dpred")


def test_gaussian_kl_matches_torch(torch_cases):
    names = [k for k in torch_cases if k.startswith("kl_")]
    assert len(names) == 2
    for name in names:
        c = torch_cases[name]
        loss, cache = gaussian_kl_forward(c["mean"], c["logvar"])
        assert_close(loss, c["loss"], atol=1e-5 * max(1.0, abs(float(c["loss"]))), what=f"{name}: loss")
        dmean, dlogvar = gaussian_kl_backward(cache, c["dloss"])
        assert_close(dmean, c["dmean"], what=f"{name}: dmean")
        assert_close(dlogvar, c["dlogvar"], what=f"{name}: dlogvar")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", PAIRS)
def test_regression_loss_bad_input(name):
    fwd = PAIRS[name][0]
    loss = f"{name}_loss"
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=rf"{loss} expects pred and target of the same shape, got \(2, 1\) and \(2,\)"):
        fwd(np.zeros((2, 1), np.float32), np.zeros(2, np.float32))
    with pytest.raises(TypeError, match=f"{loss} expects target with a floating dtype"):
        fwd(x, np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match=rf"{loss} expects per-sample weights of shape \(2,\), got \(2, 3\)"):
        fwd(x, x, weights=np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=f"{loss}: reduction must be one of"):
        fwd(x, x, reduction="none")


def test_gaussian_kl_bad_input():
    with pytest.raises(ValueError, match=r"gaussian_kl expects mean and logvar of the same shape"):
        gaussian_kl_forward(np.zeros((2, 4)), np.zeros((2, 3)))
    with pytest.raises(TypeError, match="gaussian_kl expects logvar with a floating dtype"):
        gaussian_kl_forward(np.zeros((2, 4)), np.zeros((2, 4), np.int32))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_losses_cupy_match_numpy():
    import cupy as cp

    pred, target, w = (a.astype(np.float32) for a in _pred_target((2, 4, 4, 3)))
    for fwd, bwd in PAIRS.values():
        loss, cache = fwd(pred, target, w)
        loss_gpu, cache_gpu = fwd(cp.asarray(pred), cp.asarray(target), cp.asarray(w))
        assert isinstance(loss_gpu, cp.ndarray)
        assert_close(loss_gpu, loss, what="loss")
        assert_close(bwd(cache_gpu, 0.7), bwd(cache, 0.7), what="dpred")
    loss, cache = gaussian_kl_forward(pred, target)
    loss_gpu, cache_gpu = gaussian_kl_forward(cp.asarray(pred), cp.asarray(target))
    assert_close(loss_gpu, loss, what="kl")
    for g_gpu, g in zip(gaussian_kl_backward(cache_gpu, 0.7), gaussian_kl_backward(cache, 0.7)):
        assert_close(g_gpu, g, what="kl grads")
