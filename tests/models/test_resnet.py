import numpy as np
import pytest
from fixtures.cases_unet import assert_grads_match, reference_shapes, weights_for
from helpers import SOURCES, assert_close, reference

from diffusion_np.gradcheck import check_module
from diffusion_np.models.resnet import ResnetBlock2D


def _randomize(module, rng):
    """Move every parameter away from its init (GroupNorm's ones and zeros hide bugs)."""
    for _, p in module.named_parameters():
        p += 0.3 * rng.standard_normal(p.shape)
    return module


def test_resnet_block_fused_norm_silu_equals_the_two_ops():
    """norm1/norm2 run fused GroupNorm + SiLU; the unfused path gives the same output and gradients."""
    from diffusion_np.nn.fast import reference_mode

    rng = np.random.default_rng(5)
    block = _randomize(ResnetBlock2D(4, 6, 5, groups=2, rng=rng).to(dtype=np.float64), rng)
    x, temb, dout = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 5)), rng.standard_normal((2, 3, 5, 6))
    results = {}
    for fused in (True, False):
        block.zero_grad()
        with reference_mode(not fused):
            out = block(x, temb)
        dx, dtemb = (bg := block.backward(dout)).dx, bg.dtemb
        results[fused] = [out, dx, dtemb] + [g.copy() for _, g in block.named_grads()]
    for a, b in zip(results[True], results[False]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- gradient checks
@pytest.mark.parametrize(
    "B,H,W,c_in,c_out,temb_channels,scale",
    [
        (2, 3, 5, 4, 6, 5, 1.0),  # channel change (conv_shortcut) with a time embedding
        (1, 4, 4, 4, 4, 3, 1.0),  # identity shortcut with a time embedding, batch 1
        (2, 3, 3, 4, 4, None, 1.0),  # the VAE's block: no time embedding
        (1, 5, 2, 2, 4, None, 2.0),  # no temb, channel change, output_scale_factor
    ],
)
def test_resnet_block_gradcheck(B, H, W, c_in, c_out, temb_channels, scale):
    rng = np.random.default_rng(0)
    block = ResnetBlock2D(c_in, c_out, temb_channels, groups=2, eps=1e-5, output_scale_factor=scale,
                          rng=rng).to(dtype=np.float64)
    _randomize(block, rng)
    inputs = [rng.standard_normal((B, H, W, c_in))]
    if temb_channels is not None:
        inputs.append(rng.standard_normal((B, temb_channels)))
    errors = check_module(block, *inputs)
    assert ("conv_shortcut.weight" in errors) == (c_in != c_out)
    assert ("time_emb_proj.weight" in errors) == (temb_channels is not None)
    assert ("input1" in errors) == (temb_channels is not None)
    assert max(errors.values()) < 1e-6, errors


def test_resnet_block_without_temb_when_built_with_one_skips_the_time_path():
    rng = np.random.default_rng(1)
    block = ResnetBlock2D(4, 4, 3, groups=2, rng=rng).to(dtype=np.float64)
    x = rng.standard_normal((1, 3, 3, 4))
    block(x)
    dtemb = block.backward(np.ones((1, 3, 3, 4))).dtemb
    assert dtemb is None
    assert block.conv1.grads["weight"].any()
    assert not block.time_emb_proj.grads["weight"].any()  # the projection was not used


# ---------------------------------------------------------------------------- parity with diffusers
@pytest.fixture(params=SOURCES, scope="module")
def torch_cases(request):
    return reference("unet", request.param)


@pytest.mark.parametrize("case_name", ["resnet_temb", "resnet_no_temb"])
def test_resnet_block_matches_diffusers(torch_cases, case_name):
    c = torch_cases[case_name]
    if case_name == "resnet_temb":
        block = ResnetBlock2D(8, 12, 10, groups=4, eps=1e-5)
    else:
        block = ResnetBlock2D(8, 8, None, groups=4, eps=1e-6, output_scale_factor=2.0)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == reference_shapes(c)
    block.load_state_dict(weights_for(shapes))
    out = block(c["x"], c.get("temb"))
    assert_close(out, c["out"], what=f"{case_name}: out")
    dx, dtemb = (g := block.backward(c["dout"])).dx, g.dtemb
    assert_close(dx, c["dx"], what=f"{case_name}: dx")
    if "dtemb" in c:
        assert_close(dtemb, c["dtemb"], what=f"{case_name}: dtemb")
    assert assert_grads_match(block.named_grads(), c) <= 1.0


# ---------------------------------------------------------------------------- behaviour
def test_resnet_block_names_follow_diffusers():
    names = set(ResnetBlock2D(4, 8, 16, groups=2).state_dict())
    assert names == {f"{m}.{p}" for m in ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")
                     for p in ("weight", "bias")}
    assert "conv_shortcut.weight" not in ResnetBlock2D(4, 4, None, groups=2).state_dict()


def test_resnet_block_dropout_only_in_training():
    rng = np.random.default_rng(2)
    block = ResnetBlock2D(4, 4, None, groups=2, dropout=0.5, rng=rng)
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    block.eval()
    a, b = block(x), block(x)
    np.testing.assert_array_equal(a, b)
    block.train()
    assert not np.allclose(block(x), a)


def test_resnet_block_keeps_float32():
    block = ResnetBlock2D(4, 6, 5, groups=2)
    out = block(np.ones((1, 2, 2, 4), np.float32), np.ones((1, 5), np.float32))
    assert out.dtype == np.float32
    dx, dtemb = (g := block.backward(np.ones_like(out))).dx, g.dtemb
    assert dx.dtype == np.float32 and dtemb.dtype == np.float32


@pytest.mark.parametrize(
    "x,temb,error,match",
    [
        (np.zeros((1, 2, 2, 3), np.float32), None, ValueError, r"ResnetBlock2D expects x .*C=4.*got \(1, 2, 2, 3\)"),
        (np.zeros((2, 4), np.float32), None, ValueError, r"ResnetBlock2D expects x of shape \(B, H, W, C\)"),
        (np.zeros((1, 2, 2, 4), np.int32), None, TypeError, "ResnetBlock2D expects x with a floating dtype"),
        (np.full((1, 2, 2, 4), np.nan, np.float32), None, ValueError, "ResnetBlock2D got a non-finite value"),
        (np.zeros((1, 2, 2, 4), np.float32), np.zeros((1, 7), np.float32), ValueError,
         r"ResnetBlock2D expects temb of shape \(\.\.\., 5\)"),
        (np.zeros((2, 2, 2, 4), np.float32), np.zeros((3, 5), np.float32), ValueError,
         r"temb of shape \(B, 5\) with B=2"),
    ],
)
def test_resnet_block_bad_input(x, temb, error, match):
    with pytest.raises(error, match=match):
        ResnetBlock2D(4, 6, 5, groups=2)(x, temb)


def test_resnet_block_without_time_embedding_refuses_a_temb():
    with pytest.raises(ValueError, match="temb_channels=None"):
        ResnetBlock2D(4, 4, None, groups=2)(np.zeros((1, 2, 2, 4), np.float32), np.zeros((1, 5), np.float32))


def test_resnet_block_backward_without_forward_raises():
    with pytest.raises(RuntimeError, match="ResnetBlock2D.backward called without a preceding forward"):
        ResnetBlock2D(4, 4, None, groups=2).backward(np.zeros((1, 2, 2, 4), np.float32))


@pytest.mark.gpu
def test_resnet_block_cupy_matches_numpy():
    import cupy as cp

    rng = np.random.default_rng(3)
    block = ResnetBlock2D(4, 6, 5, groups=2, rng=rng)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    temb = rng.standard_normal((2, 5)).astype(np.float32)
    dout = rng.standard_normal((2, 8, 8, 6)).astype(np.float32)
    out = block(x, temb)
    dx, dtemb = (g := block.backward(dout)).dx, g.dtemb
    grads = {k: v.copy() for k, v in block.named_grads()}
    block.zero_grad()
    block.to("cupy")
    out_gpu = block(cp.asarray(x), cp.asarray(temb))
    dx_gpu, dtemb_gpu = (g := block.backward(cp.asarray(dout))).dx, g.dtemb
    assert isinstance(out_gpu, cp.ndarray)
    assert_close(out_gpu, out, what="out")
    assert_close(dx_gpu, dx, atol=5e-5, what="dx")
    assert_close(dtemb_gpu, dtemb, atol=5e-5, what="dtemb")
    for name, g in block.named_grads():
        assert_close(g, grads[name], atol=1e-4, what=name)
