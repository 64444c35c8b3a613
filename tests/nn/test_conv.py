import numpy as np
import pytest
from helpers import SOURCES, assert_close, reference
from hypothesis import given, settings
from hypothesis import strategies as st

import diffusion_np.nn.conv as conv_mod
import diffusion_np.nn.fast.conv as fast_conv
from diffusion_np.gradcheck import check_module, check_op
from diffusion_np.nn.conv import METHODS, Conv2d, conv2d_backward, conv2d_forward
from diffusion_np.nn.fast.conv import choose_method

# (x shape, w shape (kh, kw, C_in, C_out), stride, padding)
GRAD_CASES = {
    "k3_s1_p1_odd": ((2, 5, 7, 3), (3, 3, 3, 4), 1, 1),
    "k3_s2_p1_odd_batch1": ((1, 7, 5, 2), (3, 3, 2, 3), 2, 1),
    "k3_s2_vae_asym": ((1, 6, 8, 2), (3, 3, 2, 3), 2, (0, 1, 0, 1)),
    "k3_s2_vae_asym_odd": ((2, 5, 7, 2), (3, 3, 2, 2), 2, (0, 1, 0, 1)),
    "k1": ((2, 4, 4, 3), (1, 1, 3, 2), 1, 0),
    "k2x3_pad_wider_than_kernel": ((1, 5, 6, 2), (2, 3, 2, 2), 1, (2, 0, 1, 3)),
    "k3_s3_uneven": ((1, 7, 7, 2), (3, 3, 2, 2), 3, (2, 0, 1, 1)),
}


def _methods_for(w_shape, stride, padding):
    """The formulations that accept this configuration."""
    pad4 = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
    methods = ["reference", "im2col"]
    if stride == 1:
        methods += ["rows", "rows_stacked"]
    if w_shape[:2] == (1, 1) and stride == 1 and pad4 == (0, 0, 0, 0):
        methods.append("matmul")
    return methods


GRAD_PARAMS = [
    pytest.param(name, method, id=f"{name}-{method}")
    for name, (_, w_shape, stride, padding) in GRAD_CASES.items()
    for method in _methods_for(w_shape, stride, padding)
]


@pytest.mark.parametrize("name,method", GRAD_PARAMS)
def test_conv2d_op_gradcheck(name, method):
    x_shape, w_shape, stride, padding = GRAD_CASES[name]
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[3])
    errors = check_op(
        conv2d_forward, conv2d_backward, [x, w, b], kwargs=dict(stride=stride, padding=padding, method=method)
    )
    assert set(errors) == {0, 1, 2}
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize("method", ["reference", "im2col", "rows", "rows_stacked"])
def test_conv2d_op_gradcheck_without_bias(method):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((1, 5, 4, 2)), rng.standard_normal((3, 3, 2, 3))
    errors = check_op(conv2d_forward, conv2d_backward, [x, w], kwargs=dict(padding=1, method=method))
    assert set(errors) == {0, 1}  # no bias, no bias gradient
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize(
    "stride,padding,x_shape",
    [(1, 1, (2, 5, 7, 3)), (2, (0, 1, 0, 1), (1, 7, 5, 3)), (2, 1, (1, 4, 4, 3))],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_module_gradcheck(stride, padding, x_shape, bias):
    layer = Conv2d(3, 2, 3, stride=stride, padding=padding, bias=bias, rng=np.random.default_rng(3))
    layer.to(dtype=np.float64)
    x = np.random.default_rng(4).standard_normal(x_shape)
    errors = check_module(layer, x)
    assert set(errors) == ({"input0", "weight", "bias"} if bias else {"input0", "weight"})
    assert max(errors.values()) < 1e-7, errors


# ----------------------------------------------------------------------------- fast == reference
def _compare_methods(x_shape, w_shape, stride, padding, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[3]).astype(dtype)
    y_ref, cache = conv2d_forward(x, w, b, stride, padding, method="reference")
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    grads_ref = conv2d_backward(dy, cache)
    # float32 sums of up to kh*kw*C (or B*Ho*Wo) terms in a different order
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    for method in [*_methods_for(w_shape, stride, padding), None]:  # None: the dispatcher's choice
        y, cache = conv2d_forward(x, w, b, stride, padding, method=method)
        assert y.dtype == dtype and y.flags.c_contiguous
        np.testing.assert_allclose(y, y_ref, **tol, err_msg=f"{method}: y")
        for name, g, g_ref in zip(("dx", "dw", "db"), conv2d_backward(dy, cache), grads_ref):
            assert g.dtype == dtype, (method, name, g.dtype)
            np.testing.assert_allclose(g, g_ref, **tol, err_msg=f"{method}: {name}")


@settings(max_examples=40)
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 9),
    W=st.integers(1, 9),
    c_in=st.integers(1, 4),
    c_out=st.integers(1, 4),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.integers(1, 3),
    padding=st.tuples(*[st.integers(0, 2)] * 4),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_all_formulations_equal_reference(B, H, W, c_in, c_out, kh, kw, stride, padding, dtype):
    top, bottom, left, right = padding
    if H + top + bottom < kh or W + left + right < kw:
        return  # the kernel does not fit: tested in test_conv2d_kernel_larger_than_image
    _compare_methods((B, H, W, c_in), (kh, kw, c_in, c_out), stride, padding, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "x_shape,w_shape,stride,padding",
    [
        ((2, 16, 16, 8), (3, 3, 8, 6), 1, 1),  # the dispatcher picks "rows"
        ((3, 17, 20, 5), (3, 3, 5, 4), 1, 1),
        ((2, 8, 8, 16), (3, 3, 16, 16), 1, 1),  # "rows"
        ((2, 4, 4, 16), (3, 3, 16, 16), 1, 1),  # "im2col"
        ((2, 16, 16, 8), (3, 3, 8, 8), 2, 1),  # a U-Net downsampler
        ((2, 17, 15, 4), (3, 3, 4, 4), 2, (0, 1, 0, 1)),  # the VAE's, odd sizes
        ((2, 16, 16, 8), (1, 1, 8, 12), 1, 0),  # "matmul"
    ],
)
def test_fast_formulations_equal_reference_on_larger_shapes(x_shape, w_shape, stride, padding, dtype):
    _compare_methods(x_shape, w_shape, stride, padding, dtype)


@pytest.mark.parametrize(
    "x_shape,w_shape,stride,padding,expected",
    [
        ((64, 16, 16, 32), (3, 3, 32, 32), 1, 1, "rows"),
        ((16, 32, 32, 64), (3, 3, 64, 32), 1, 1, "rows"),  # large width-columns: run in blocks of images
        ((16, 32, 32, 64), (3, 3, 64, 64), 1, 1, "rows"),
        ((64, 32, 32, 32), (3, 3, 32, 32), 1, 1, "rows"),  # the VAE's 32x32 layers
        ((64, 16, 16, 64), (3, 3, 64, 64), 1, 1, "rows"),
        ((64, 32, 32, 3), (3, 3, 3, 32), 1, 1, "rows"),  # 3 input channels: the kernel-row sum costs more
        ((64, 8, 8, 128), (3, 3, 128, 128), 1, 1, "rows"),  # the U-Net's 8x8 layers: 2.0 M numbers, under the limit
        ((16, 32, 32, 3), (3, 3, 3, 32), 1, 1, "rows"),  # 3 input channels
        ((16, 32, 32, 32), (3, 3, 32, 3), 1, 1, "rows"),  # 3 output channels
        ((64, 8, 8, 64), (3, 3, 64, 64), 1, 1, "rows"),
        ((64, 4, 4, 128), (3, 3, 128, 128), 1, 1, "im2col"),  # 4x4: three tiny matmuls per image
        ((16, 32, 32, 64), (3, 3, 64, 64), 2, 1, "im2col"),
        ((16, 32, 32, 64), (1, 1, 64, 32), 1, 0, "matmul"),
        ((16, 32, 32, 64), (1, 1, 64, 32), 2, 0, "im2col"),
    ],
)
def test_choose_method(x_shape, w_shape, stride, padding, expected):
    assert choose_method(x_shape, w_shape, stride, padding) == expected


@pytest.mark.parametrize(
    "x_shape,w_shape,stride,padding,expected",
    [
        ((2, 16, 16, 8), (3, 3, 8, 8), 2, 1, ("im2col", "rows")),  # stride 2; dx is a stride-1 16x16 conv
        ((2, 32, 32, 16), (3, 3, 16, 16), 2, (0, 1, 0, 1), ("im2col", "rows")),  # dx on the dilated dy
        ((2, 4, 4, 8), (3, 3, 8, 16), 1, 1, ("im2col", "im2col")),
    ],
)
def test_forward_and_input_gradient_may_use_different_formulations(x_shape, w_shape, stride, padding, expected):
    B, H, W, _ = x_shape
    y, _ = conv2d_forward(np.zeros(x_shape, np.float32), np.zeros(w_shape, np.float32), None, stride, padding)
    fwd = fast_conv.choose_method(x_shape, w_shape, stride, padding)
    assert (fwd, fast_conv._dx_method(y.shape, w_shape, H, W)) == expected
    _compare_methods(x_shape, w_shape, stride, padding, np.float32)
    _compare_methods(x_shape, w_shape, stride, padding, np.float64)


def test_im2col_rebuilds_large_columns_in_backward(monkeypatch):
    """Above the size limit the forward keeps x, not the columns; the gradients do not change."""
    x_shape, w_shape = (2, 8, 8, 4), (3, 3, 4, 5)
    _compare_methods(x_shape, w_shape, 1, 1, np.float64)  # columns kept
    monkeypatch.setattr(fast_conv, "_MAX_SAVED_COLUMNS_BYTES", 0)
    x = np.ones(x_shape)
    _, cache = conv2d_forward(x, np.ones(w_shape), None, 1, 1, method="im2col")
    assert cache.saved is x  # the input itself, not (128, 36) columns
    _compare_methods(x_shape, w_shape, 1, 1, np.float64)  # columns rebuilt
    _compare_methods((2, 9, 7, 4), w_shape, 2, (0, 1, 0, 1), np.float32)


def test_rows_keeps_the_input_not_the_width_columns():
    """The width-columns are kw times the input: the backward pads x again and rebuilds them."""
    x_shape, w_shape = (2, 9, 8, 4), (3, 3, 4, 5)
    x = np.ones(x_shape)
    _, cache = conv2d_forward(x, np.ones(w_shape), None, 1, 1, method="rows")
    assert cache.saved is x  # not x_pad (2, 11, 10, 4), nor (2, 11, 8, 12) columns
    _compare_methods(x_shape, w_shape, 1, 1, np.float64)
    _compare_methods(x_shape, (3, 2, 4, 3), 1, (0, 2, 1, 0), np.float32)


@pytest.mark.parametrize(
    "x_shape,w_shape,stride,padding",
    [
        ((2, 8, 8, 3), (3, 3, 3, 4), 2, 1),  # the U-Net's downsampler
        ((2, 9, 7, 3), (3, 3, 3, 2), 2, (0, 1, 0, 1)),  # the VAE's, odd sizes
        ((1, 7, 7, 2), (3, 3, 2, 2), 3, (2, 0, 1, 1)),
        ((1, 6, 9, 2), (2, 5, 2, 3), 2, (1, 0, 2, 2)),  # more taps than phases along W
        ((2, 6, 6, 2), (1, 1, 2, 3), 2, 0),  # kernel smaller than the stride: three phases get nothing
        ((1, 5, 5, 2), (2, 2, 2, 2), 3, 0),  # rows and columns no output reads
    ],
)
def test_strided_input_gradient_by_phases_equals_the_dilated_gather(x_shape, w_shape, stride, padding):
    """_dx_phases (what the backward runs for stride > 1) against the dilated-dy convolution."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    pad4 = conv_mod._padding4(padding)
    y, _ = conv2d_forward(x, w, None, stride, pad4, method="im2col")
    dy = rng.standard_normal(y.shape)
    H, W = x_shape[1:3]
    dx = fast_conv._dx_phases(dy, w, stride, pad4, H, W)
    np.testing.assert_allclose(dx, fast_conv._dx_gather(dy, w, stride, pad4, H, W, "im2col"), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, conv_mod._col2im_dx(dy, w, stride, pad4, H, W), rtol=1e-12, atol=1e-12)


def test_kernel_row_slices_are_an_overlapping_view():
    """rows_stacked's view: slice p of an image is its width-column rows p .. p+Ho-1, no copy."""
    xw = np.arange(2 * 5 * 3 * 4, dtype=np.float64).reshape(2, 5, 3, 4)  # (B, Hp, Wo, K)
    view = fast_conv._kernel_row_slices(xw, 3)  # Ho = 3
    assert view.shape == (2, 3, 9, 4) and np.shares_memory(view, xw)
    for p in range(3):
        np.testing.assert_array_equal(view[1, p], xw[1, p : p + 3].reshape(9, 4))


def test_rows_stacked_runs_when_asked_for():
    x_shape, w_shape = (3, 9, 8, 16), (3, 3, 16, 5)
    assert choose_method(x_shape, w_shape, 1, 1) == "rows"
    _, cache = conv2d_forward(np.ones(x_shape), np.ones(w_shape), None, 1, 1, method="rows_stacked")
    assert cache.method == "rows_stacked"


def test_width_columns_are_a_contiguous_copy():
    """A reshape of the window view would be an overlapping view that BLAS cannot take."""
    x_pad = np.arange(2 * 4 * 5 * 3, dtype=np.float64).reshape(2, 4, 5, 3)
    xw = fast_conv._width_columns(x_pad, 3, 3)
    assert xw.shape == (2, 4, 3, 9) and xw.flags.c_contiguous and not np.shares_memory(xw, x_pad)
    np.testing.assert_array_equal(xw[1, 2, 1], x_pad[1, 2, 1:4].reshape(-1))  # pixels j..j+2, (q, c) order


# ----------------------------------------------------------------------------- torch parity
@pytest.fixture(params=SOURCES, scope="module")
def torch_cases(request):
    return {k: v for k, v in reference("conv", request.param).items() if k.startswith("conv_")}


def test_conv2d_op_matches_torch(torch_cases):
    assert len(torch_cases) == 7
    for name, c in torch_cases.items():
        stride, padding = int(c["stride"]), tuple(int(p) for p in c["padding"])
        for method in _methods_for(c["w"].shape, stride, padding):
            y, cache = conv2d_forward(c["x"], c["w"], c["b"], stride, padding, method=method)
            assert_close(y, c["out"], what=f"{name} {method}: out")
            dx, dw, db = conv2d_backward(c["dout"], cache)
            assert_close(dx, c["dx"], what=f"{name} {method}: dx")
            assert_close(dw, c["dw"], what=f"{name} {method}: dw")
            assert_close(db, c["db"], what=f"{name} {method}: db")


def test_conv2d_module_matches_torch(torch_cases):
    for name, c in torch_cases.items():
        kh, kw, c_in, c_out = c["w"].shape
        layer = Conv2d(c_in, c_out, (kh, kw), stride=int(c["stride"]), padding=tuple(c["padding"]))
        layer.load_state_dict({"weight": c["w"], "bias": c["b"]})
        assert_close(layer(c["x"]), c["out"], what=f"{name}: out")
        assert_close(layer.backward(c["dout"]), c["dx"], what=f"{name}: dx")
        assert_close(layer.grads["weight"], c["dw"], what=f"{name}: dw")
        assert_close(layer.grads["bias"], c["db"], what=f"{name}: db")


# ----------------------------------------------------------------------------- the layer
def test_conv2d_init_follows_pytorch():
    layer = Conv2d(8, 16, 3, rng=np.random.default_rng(0))
    assert layer.weight.shape == (3, 3, 8, 16) and layer.bias.shape == (16,)
    assert layer.weight.dtype == np.float32
    bound = 1 / np.sqrt(8 * 3 * 3)  # fan_in = C_in * kh * kw
    assert np.abs(layer.weight).max() <= bound and np.abs(layer.bias).max() <= bound
    assert np.abs(layer.weight).max() > 0.9 * bound  # uniform over the whole range, not narrower
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert set(Conv2d(2, 3, 1, bias=False).state_dict()) == {"weight"}


def test_conv2d_float32_stays_float32():
    layer = Conv2d(3, 4, 3, padding=1)
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    y = layer(x)
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == layer.grads["weight"].dtype == layer.grads["bias"].dtype == np.float32


def test_conv2d_gradients_accumulate_until_zeroed():
    layer = Conv2d(2, 3, 3, padding=1, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((1, 4, 4, 2)).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal((1, 4, 4, 3)).astype(np.float32)
    layer(x)
    layer.backward(dy)
    first = layer.grads["weight"].copy()
    layer(x)
    layer.backward(dy)
    np.testing.assert_allclose(layer.grads["weight"], 2 * first, rtol=1e-6)
    layer.zero_grad()
    assert not layer.grads["weight"].any()


@pytest.mark.parametrize(
    "x,error,match",
    [
        (np.zeros((2, 5, 5), np.float32), ValueError, r"Conv2d expects x of shape \(B, H, W, C\) .*got \(2, 5, 5\)"),
        (np.zeros((2, 3, 5, 5), np.float32), ValueError, r"Conv2d .*C=3 \(channels last\), got \(2, 3, 5, 5\)"),
        (np.zeros((1, 5, 5, 3), np.int64), TypeError, "Conv2d expects x with a floating dtype"),
        (np.full((1, 5, 5, 3), np.nan, np.float32), ValueError, "Conv2d got a non-finite value"),
    ],
)
def test_conv2d_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        Conv2d(3, 4, 3, padding=1)(x)


def test_conv2d_kernel_larger_than_image():
    with pytest.raises(ValueError, match=r"a 3x3 kernel does not fit an 2x2 image"):
        Conv2d(1, 1, 3)(np.zeros((1, 2, 2, 1), np.float32))


def test_conv2d_op_bad_arguments():
    x, w = np.zeros((1, 5, 5, 2)), np.zeros((3, 3, 3, 4))
    with pytest.raises(ValueError, match="same C_in"):
        conv2d_forward(x, w)
    w = np.zeros((3, 3, 2, 4))
    with pytest.raises(ValueError, match="padding must be"):
        conv2d_forward(x, w, padding=(1, 1))
    with pytest.raises(ValueError, match="padding must be"):
        conv2d_forward(x, w, padding=-1)
    with pytest.raises(ValueError, match="method must be 'auto' or one of"):
        conv2d_forward(x, w, method="winograd")
    with pytest.raises(ValueError, match="method must be 'auto' or one of"):
        conv2d_forward(x, w, method="shifted")  # removed: "rows" was faster everywhere
    with pytest.raises(ValueError, match="'rows' needs stride 1"):
        conv2d_forward(x, w, stride=2, method="rows")
    with pytest.raises(ValueError, match="'matmul' is for 1x1"):
        conv2d_forward(x, w, method="matmul")


def test_conv2d_backward_without_forward_raises():
    with pytest.raises(RuntimeError, match="Conv2d.backward called without a preceding forward"):
        Conv2d(3, 2, 3).backward(np.zeros((1, 3, 3, 2), np.float32))


# ----------------------------------------------------------------------------- CuPy
@pytest.mark.gpu
@pytest.mark.parametrize(
    "x_shape,w_shape,stride,padding",
    [
        ((2, 16, 16, 8), (3, 3, 8, 6), 1, 1),
        ((2, 7, 9, 3), (3, 3, 3, 4), 2, (0, 1, 0, 1)),
        ((2, 4, 4, 3), (1, 1, 3, 5), 1, 0),
    ],
)
def test_conv2d_cupy_matches_numpy(x_shape, w_shape, stride, padding):
    import cupy

    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[3])
    for method in METHODS:
        if method not in _methods_for(w_shape, stride, padding):
            continue
        y, cache = conv2d_forward(x, w, b, stride, padding, method=method)
        x_gpu, w_gpu, b_gpu = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
        y_gpu, cache_gpu = conv2d_forward(x_gpu, w_gpu, b_gpu, stride, padding, method=method)
        assert isinstance(y_gpu, cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(y_gpu), y, rtol=1e-10, atol=1e-10, err_msg=method)
        dy = rng.standard_normal(y.shape)
        for g, g_gpu in zip(conv2d_backward(dy, cache), conv2d_backward(cupy.asarray(dy), cache_gpu)):
            np.testing.assert_allclose(cupy.asnumpy(g_gpu), g, rtol=1e-10, atol=1e-10, err_msg=method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, (0, 1, 0, 1))])
def test_a_layer_without_input_grad_gives_the_same_parameter_gradients_and_no_dx(method, stride, padding):
    """``Conv2d.input_grad = False`` (a model's first layer, its input data): dx is None and
    the weight and bias gradients are those of a full backward."""
    if method == "matmul":
        stride, padding = 1, 0
    elif method in ("rows", "rows_stacked") and stride != 1:
        pytest.skip("stride 1 only")
    rng = np.random.default_rng(0)
    kernel = 1 if method == "matmul" else 3
    x = rng.standard_normal((3, 8, 8, 4))
    dout = None
    grads = {}
    for input_grad in (True, False):
        layer = Conv2d(4, 5, kernel, stride=stride, padding=padding, rng=np.random.default_rng(1),
                       method=method).to(dtype=np.float64)
        layer.input_grad = input_grad
        y = layer(x)
        dout = rng.standard_normal(y.shape) if dout is None else dout
        dx = layer.backward(dout)
        assert (dx is None) == (not input_grad)
        grads[input_grad] = (layer.grads["weight"], layer.grads["bias"])
    for full, skipped in zip(grads[True], grads[False]):
        np.testing.assert_array_equal(full, skipped)
