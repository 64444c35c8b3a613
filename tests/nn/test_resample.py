import numpy as np
import pytest
from helpers import SOURCES, assert_close, reference

from diffusion_np.gradcheck import check_module, check_op
from diffusion_np.nn.conv import conv2d_backward, conv2d_forward
from diffusion_np.nn.fast.resample import upsample_conv_backward, upsample_conv_forward
from diffusion_np.nn.resample import (
    Downsample2D,
    Upsample2D,
    avg_pool2x2_backward,
    avg_pool2x2_forward,
    upsample_nearest2x_backward,
    upsample_nearest2x_forward,
)

OP_PAIRS = {
    "upsample": (upsample_nearest2x_forward, upsample_nearest2x_backward),
    "avgpool": (avg_pool2x2_forward, avg_pool2x2_backward),
}


@pytest.mark.parametrize("op", OP_PAIRS)
@pytest.mark.parametrize("x_shape", [(2, 3, 5, 4), (1, 6, 7, 3), (1, 5, 4, 2), (1, 2, 2, 1)])
def test_resample_op_gradcheck(op, x_shape):
    forward, backward = OP_PAIRS[op]
    x = np.random.default_rng(0).standard_normal(x_shape)
    errors = check_op(forward, backward, [x])
    assert max(errors.values()) < 1e-7, errors


def test_upsample_repeats_each_pixel_into_a_block():
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1)
    y, _ = upsample_nearest2x_forward(x)
    np.testing.assert_array_equal(y[0, :, :, 0], np.repeat(np.repeat(x[0, :, :, 0], 2, axis=0), 2, axis=1))
    assert y.dtype == np.float32


def test_avg_pool_drops_odd_last_row_and_column():
    x = np.arange(15, dtype=np.float32).reshape(1, 3, 5, 1)
    y, cache = avg_pool2x2_forward(x)
    np.testing.assert_array_equal(y[0, :, :, 0], [[3.0, 5.0]])  # mean of [[0, 1], [5, 6]] and [[2, 3], [7, 8]]
    dx = avg_pool2x2_backward(np.ones_like(y), cache)
    assert dx.dtype == np.float32
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0.25] * 4 + [0], [0.25] * 4 + [0], [0] * 5])


# ----------------------------------------------------------------------------- fused upsample + conv
@pytest.mark.parametrize("x_shape,c_out", [((2, 5, 7, 3), 4), ((1, 4, 4, 2), 2), ((1, 1, 3, 2), 3), ((3, 8, 8, 16), 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv_equals_upsample_then_conv(x_shape, c_out, bias):
    """The four-phase 2x2 convolutions give the unfused path's output and every gradient (float64)."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal((3, 3, x_shape[3], c_out))
    b = rng.standard_normal(c_out) if bias else None
    y, cache = upsample_conv_forward(x, w, b)
    h, up_cache = upsample_nearest2x_forward(x)
    y_ref, conv_cache = conv2d_forward(h, w, b, 1, 1, method="reference")
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = upsample_conv_backward(dy, cache)
    dh, dw_ref, db_ref = conv2d_backward(dy, conv_cache)
    np.testing.assert_allclose(dx, upsample_nearest2x_backward(dh, up_cache), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)
    assert (db is None) == (not bias)
    if bias:
        np.testing.assert_allclose(db, db_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_shape", [(2, 3, 5, 3), (1, 1, 1, 2), (1, 4, 4, 2)])
def test_upsample_conv_op_gradcheck(x_shape):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal((3, 3, x_shape[3], 3)), rng.standard_normal(3)
    errors = check_op(upsample_conv_forward, upsample_conv_backward, [x, w, b])
    assert max(errors.values()) < 1e-7, errors


def test_upsample2d_fused_and_unfused_agree_in_float32():
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((2, 6, 5, 8)).astype(np.float32), rng.standard_normal((2, 12, 10, 4)).astype(np.float32)
    outs = {}
    for fused in (True, False):
        method = "fused" if fused else "reference"
        layer = Upsample2D(8, out_channels=4, rng=np.random.default_rng(0), method=method)
        y = layer(x)
        dx = layer.backward(dy)
        assert y.dtype == dx.dtype == layer.conv.grads["weight"].dtype == np.float32
        outs[fused] = (y, dx, layer.conv.grads["weight"].copy(), layer.conv.grads["bias"].copy())
    for a, b in zip(outs[True], outs[False]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


MODULES = {
    "Upsample2D_conv_unfused": lambda: Upsample2D(3, out_channels=2, rng=np.random.default_rng(0), method="reference"),
    "Upsample2D_conv": lambda: Upsample2D(3, use_conv=True, out_channels=2, rng=np.random.default_rng(0)),
    "Upsample2D_plain": lambda: Upsample2D(3, use_conv=False),
    "Downsample2D_conv_p1": lambda: Downsample2D(3, out_channels=2, padding=1, rng=np.random.default_rng(0)),
    "Downsample2D_conv_vae": lambda: Downsample2D(3, out_channels=2, padding=0, rng=np.random.default_rng(0)),
    "Downsample2D_pool": lambda: Downsample2D(3, use_conv=False),
}


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("x_shape", [(2, 5, 7, 3), (1, 4, 4, 3)])
def test_resample_module_gradcheck(name, x_shape):  # Upsample2D_conv runs the fused path
    layer = MODULES[name]().to(dtype=np.float64)
    x = np.random.default_rng(1).standard_normal(x_shape)
    errors = check_module(layer, x)
    expected = {"input0", "conv.weight", "conv.bias"} if "conv" in name else {"input0"}
    assert set(errors) == expected
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize(
    "name,x_shape,out_shape",
    [
        ("Upsample2D_conv", (2, 5, 7, 3), (2, 10, 14, 2)),
        ("Downsample2D_conv_p1", (2, 5, 7, 3), (2, 3, 4, 2)),
        ("Downsample2D_conv_vae", (2, 5, 7, 3), (2, 2, 3, 2)),  # (5 + 1 - 3) // 2 + 1 = 2
        ("Downsample2D_conv_vae", (2, 8, 8, 3), (2, 4, 4, 2)),
        ("Downsample2D_pool", (2, 5, 7, 3), (2, 2, 3, 3)),
    ],
)
def test_resample_module_output_shape(name, x_shape, out_shape):
    y = MODULES[name]()(np.zeros(x_shape, np.float32))
    assert y.shape == out_shape and y.dtype == np.float32


def test_downsample_vae_pads_bottom_and_right_only():
    # with a kernel that reads only its centre tap, output (i, j) = x_pad[2i + 1, 2j + 1]:
    # padding (0, 1, 0, 1) samples x[1::2, 1::2]; padding 1 samples x[0::2, 0::2]
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 1)).astype(np.float32)
    centre = np.zeros((3, 3, 1, 1), np.float32)
    centre[1, 1] = 1.0
    for padding, expected in [(0, x[:, 1::2, 1::2]), (1, x[:, 0::2, 0::2])]:
        layer = Downsample2D(1, padding=padding)
        layer.load_state_dict({"conv.weight": centre, "conv.bias": np.zeros(1, np.float32)})
        np.testing.assert_array_equal(layer(x), expected)


# ----------------------------------------------------------------------------- torch / diffusers parity
@pytest.fixture(params=SOURCES, scope="module")
def torch_cases(request):
    return reference("conv", request.param)


@pytest.mark.parametrize(
    "prefix,op",
    [("upsample_", "upsample"), ("avgpool_", "avgpool")],
)
def test_resample_ops_match_torch(torch_cases, prefix, op):
    forward, backward = OP_PAIRS[op]
    cases = {k: v for k, v in torch_cases.items() if k.startswith(prefix)}
    assert cases
    for name, c in cases.items():
        y, cache = forward(c["x"])
        assert_close(y, c["out"], what=f"{name}: out")
        assert_close(backward(c["dout"], cache), c["dx"], what=f"{name}: dx")


def test_resample_modules_match_diffusers(torch_cases):
    cases = {k: v for k, v in torch_cases.items() if k.startswith(("Upsample2D", "Downsample2D"))}
    assert len(cases) == 4
    for name, c in cases.items():
        channels = c["x"].shape[3]
        use_conv = "conv.weight" in c
        out_channels = c["conv.weight"].shape[3] if use_conv else None
        if name.startswith("Upsample2D"):
            layer = Upsample2D(channels, use_conv=use_conv, out_channels=out_channels)
        else:
            padding = 0 if name.endswith("vae") else 1
            layer = Downsample2D(channels, use_conv=use_conv, out_channels=out_channels, padding=padding)
        if use_conv:
            layer.load_state_dict({"conv.weight": c["conv.weight"], "conv.bias": c["conv.bias"]})
        assert_close(layer(c["x"]), c["out"], what=f"{name}: out")
        assert_close(layer.backward(c["dout"]), c["dx"], what=f"{name}: dx")
        if use_conv:
            grads = dict(layer.named_grads())
            assert_close(grads["conv.weight"], c["d_conv.weight"], what=f"{name}: d conv.weight")
            assert_close(grads["conv.bias"], c["d_conv.bias"], what=f"{name}: d conv.bias")


def test_parameter_names_follow_diffusers():
    assert set(Upsample2D(4).state_dict()) == {"conv.weight", "conv.bias"}
    assert set(Downsample2D(4, padding=0).state_dict()) == {"conv.weight", "conv.bias"}
    assert Downsample2D(4, out_channels=8).state_dict()["conv.weight"].shape == (3, 3, 4, 8)
    assert not Downsample2D(4, use_conv=False).state_dict()
    assert not Upsample2D(4, use_conv=False).state_dict()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls", [Upsample2D, Downsample2D])
@pytest.mark.parametrize(
    "x,error,match",
    [
        (np.zeros((2, 4, 4), np.float32), ValueError, r"expects x of shape \(B, H, W, C\) with C=3.*got \(2, 4, 4\)"),
        (np.zeros((2, 3, 4, 4), np.float32), ValueError, r"with C=3 \(channels last\), got \(2, 3, 4, 4\)"),
        (np.zeros((1, 4, 4, 3), np.int32), TypeError, "expects x with a floating dtype"),
        (np.full((1, 4, 4, 3), np.inf, np.float32), ValueError, "got a non-finite value"),
    ],
)
def test_resample_module_bad_input(cls, x, error, match):
    with pytest.raises(error, match=f"{cls.__name__} .*{match}"):
        cls(3)(x)


def test_resample_without_conv_cannot_change_channels():
    with pytest.raises(ValueError, match=r"Upsample2D without a conv cannot change channels \(3 -> 4\)"):
        Upsample2D(3, use_conv=False, out_channels=4)
    with pytest.raises(ValueError, match=r"Downsample2D without a conv cannot change channels \(3 -> 4\)"):
        Downsample2D(3, use_conv=False, out_channels=4)


def test_avg_pool_needs_two_pixels():
    with pytest.raises(ValueError, match="avg_pool2x2 needs H, W >= 2"):
        Downsample2D(1, use_conv=False)(np.zeros((1, 1, 4, 1), np.float32))


@pytest.mark.parametrize("cls", [Upsample2D, Downsample2D])
def test_resample_backward_without_forward_raises(cls):
    with pytest.raises(RuntimeError, match=f"{cls.__name__}.backward called without a preceding forward"):
        cls(3).backward(np.zeros((1, 2, 2, 3), np.float32))


# ----------------------------------------------------------------------------- CuPy
@pytest.mark.gpu
@pytest.mark.parametrize("name", MODULES)
def test_resample_cupy_matches_numpy(name):
    import cupy

    x = np.random.default_rng(0).standard_normal((2, 6, 7, 3))
    cpu, gpu = MODULES[name]().to(dtype=np.float64), MODULES[name]().to("cupy", dtype=np.float64)
    y, y_gpu = cpu(x), gpu(cupy.asarray(x))
    assert isinstance(y_gpu, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(y_gpu), y, rtol=1e-10, atol=1e-10)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    np.testing.assert_allclose(cupy.asnumpy(gpu.backward(cupy.asarray(dy))), cpu.backward(dy), rtol=1e-10, atol=1e-10)
    for (key, g), (_, g_gpu) in zip(cpu.named_grads(), gpu.named_grads()):
        np.testing.assert_allclose(cupy.asnumpy(g_gpu), g, rtol=1e-10, atol=1e-10, err_msg=key)
