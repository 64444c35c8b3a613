"""Tests of the U-Net blocks and the whole UNet2DConditionModel.

Gradient checks of modules with thousands of parameters use :func:`check_subset`,
which differentiates K random coordinates of every input and parameter
numerically (the full check of every entry would take minutes here).
"""

import numpy as np
import pytest
from fixtures.cases_unet import (
    GRADCHECK_UNET,
    SMALL_SD_LIKE_UNET,
    TINY_UNET,
    assert_grads_match,
    our_layout,
    reference_shapes,
    torch_layout,
    weights_for,
)
from helpers import SOURCES, assert_close, check_subset, randomize, reference

from diffusion_np.models.config import UNetConfig
from diffusion_np.models.unet import UNet2DConditionModel
from diffusion_np.models.unet_blocks import DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D

B, T, L, D = 2, 5, 3, 6  # batch, time-embedding width, text tokens, text width


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------- block gradient checks
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("add_downsample", [True, False])
def test_down_blocks_gradcheck(rng, cross, add_downsample):
    block = DownBlock2D(4, 6, T, num_layers=2, resnet_groups=2, add_downsample=add_downsample,
                        cross_attention=cross, num_attention_heads=2, cross_attention_dim=D, rng=rng)
    randomize(block.to(dtype=np.float64), rng)
    inputs = [rng.standard_normal((B, 4, 4, 4)), rng.standard_normal((B, T))]
    if cross:
        inputs.append(rng.standard_normal((B, L, D)))
    def backward(d):
        g = block.backward(d[0], d[1])
        return (g.dx, g.dtemb, g.dcontext)

    errors = check_subset(block, backward, inputs, block, k=4)
    assert len(block(*inputs)[1]) == 2 + add_downsample
    assert max(errors.values()) < 1e-6, errors


def test_mid_block_gradcheck(rng):
    block = UNetMidBlock2DCrossAttn(6, T, num_layers=1, resnet_groups=3, num_attention_heads=2,
                                    cross_attention_dim=D, output_scale_factor=1.5, rng=rng)
    randomize(block.to(dtype=np.float64), rng)
    inputs = [rng.standard_normal((B, 2, 3, 6)), rng.standard_normal((B, T)), rng.standard_normal((B, L, D))]
    errors = check_subset(block, lambda d: block.backward(d)[:3], inputs, block, k=4)  # dx, dtemb, dcontext
    assert {"input0", "input1", "input2", "resnets.1.conv2.weight", "attentions.0.proj_out.weight"} <= set(errors)
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("add_upsample", [True, False])
def test_up_blocks_gradcheck(rng, cross, add_upsample):
    # 3 resnets: skips of 6, 6 and (from the level below) 4 channels, used last-first
    block = UpBlock2D(4, 8, 6, T, num_layers=3, resnet_groups=2, add_upsample=add_upsample, cross_attention=cross,
                      num_attention_heads=2, cross_attention_dim=D, rng=rng)
    randomize(block.to(dtype=np.float64), rng)
    skips = [rng.standard_normal((B, 2, 2, c)) for c in (4, 6, 6)]
    inputs = [rng.standard_normal((B, 2, 2, 8)), *skips, rng.standard_normal((B, T))]
    if cross:
        inputs.append(rng.standard_normal((B, L, D)))

    def forward(x, s0, s1, s2, *rest):
        return block(x, (s0, s1, s2), *rest)

    def backward(d):
        g = block.backward(d)
        return (g.dx, *g.dskips, g.dtemb, g.dcontext)

    errors = check_subset(forward, backward, inputs, block, k=4)
    assert {"input1", "input2", "input3"} <= set(errors)  # every skip got its gradient
    assert max(errors.values()) < 1e-6, errors


# ---------------------------------------------------------------------------- whole U-Net gradient check
def test_unet_gradcheck(rng):
    model = UNet2DConditionModel(**GRADCHECK_UNET, rng=rng, dtype=np.float64)
    randomize(model, rng, scale=0.2)
    sample, context = rng.standard_normal((2, 4, 4, 3)), rng.standard_normal((2, L, D))
    timesteps = np.array([3, 700])
    def backward(dout):
        g = model.backward(dout)
        return (g.dx, g.dcontext)

    errors = check_subset(lambda x, c: model(x, timesteps, c), backward, [sample, context], model, k=2)
    assert len(errors) == 2 + len(model.state_dict())  # every parameter, the sample and the text
    assert max(errors.values()) < 1e-6, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


# ---------------------------------------------------------------------------- parity with diffusers
@pytest.fixture(params=SOURCES, scope="module")
def torch_cases(request):
    return reference("unet", request.param)


def _load(model, case):
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == reference_shapes(case)  # diffusers' names, and shapes after the conv transpose
    model.load_state_dict(weights_for(shapes))
    return model


def test_mid_block_matches_diffusers(torch_cases):
    c = torch_cases["mid_block"]
    block = _load(UNetMidBlock2DCrossAttn(32, 16, resnet_eps=1e-5, resnet_groups=8, num_attention_heads=4,
                                          cross_attention_dim=12), c)
    assert_close(block(c["x"], c["temb"], c["context"]), c["out"], what="mid: out")
    g = block.backward(c["dout"])
    dx, dtemb, dcontext = g.dx, g.dtemb, g.dcontext
    assert_close(dx, c["dx"], what="mid: dx")
    assert_close(dtemb, c["dtemb"], what="mid: dtemb")
    assert_close(dcontext, c["dcontext"], what="mid: dcontext")
    assert assert_grads_match(block.named_grads(), c) <= 1.0


def test_unet_matches_diffusers(torch_cases):
    c = torch_cases["unet"]
    model = _load(UNet2DConditionModel(**TINY_UNET), c)
    out = model(c["sample"], c["timestep"], c["encoder_hidden_states"])
    assert_close(out, c["out"], what="unet: out")
    g = model.backward(c["dout"])
    dsample, dcontext = g.dx, g.dcontext
    assert_close(dsample, c["dsample"], what="unet: dsample")
    assert_close(dcontext, c["dencoder_hidden_states"], what="unet: dencoder_hidden_states")
    assert assert_grads_match(model.named_grads(), c) <= 1.0


@pytest.mark.parametrize("case_name,config", [("unet", TINY_UNET), ("keys_small_sd_like", SMALL_SD_LIKE_UNET)])
def test_state_dict_keys_and_shapes_equal_diffusers(torch_cases, case_name, config):
    ours = {k: tuple(v.shape) for k, v in UNet2DConditionModel(**config).state_dict().items()}
    theirs = reference_shapes(torch_cases[case_name])
    assert set(ours) == set(theirs), (sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours)))
    assert ours == theirs


@pytest.mark.crosscheck
def test_unet_every_gradient_matches_diffusers_in_full():
    """The golden test compares gradient summaries; this one compares every entry (needs torch)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    ours = UNet2DConditionModel(**TINY_UNET)
    weights = weights_for({k: tuple(v.shape) for k, v in ours.state_dict().items()})
    ours.load_state_dict(weights)
    theirs.load_state_dict({k: torch.tensor(torch_layout(k, v)) for k, v in weights.items()})
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 4, 32)).astype(np.float32)
    dout = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    tx = torch.tensor(x.transpose(0, 3, 1, 2).copy(), requires_grad=True)
    tctx = torch.tensor(ctx, requires_grad=True)
    tout = theirs(tx, torch.tensor([500]), tctx).sample
    (tout * torch.tensor(dout.transpose(0, 3, 1, 2).copy())).sum().backward()
    assert_close(ours(x, 500, ctx), tout.detach().numpy().transpose(0, 2, 3, 1), what="out")
    dx, dctx = (g := ours.backward(dout)).dx, g.dcontext
    assert_close(dx, tx.grad.numpy().transpose(0, 2, 3, 1), what="dsample")
    assert_close(dctx, tctx.grad.numpy(), what="dencoder_hidden_states")
    grads = dict(ours.named_grads())
    for name, p in theirs.named_parameters():
        ref = our_layout(p.grad.numpy())
        # see assert_grads_match: the absolute tolerance scales with the gradient's size
        assert_close(grads[name], ref, atol=1e-5 * max(1.0, float(np.abs(ref).max())), what=name)


# ---------------------------------------------------------------------------- skips and structure
def test_skip_gradients_reach_the_down_path(rng):
    """Cutting a skip's gradient must change dsample: the skips are summed into the down path."""
    model = UNet2DConditionModel(**GRADCHECK_UNET, rng=rng)
    x = rng.standard_normal((1, 4, 4, 3)).astype(np.float32)
    ctx = rng.standard_normal((1, L, D)).astype(np.float32)
    dout = rng.standard_normal((1, 4, 4, 2)).astype(np.float32)
    model(x, 1, ctx)
    full = model.backward(dout).dx
    model(x, 1, ctx)
    up = model.up_blocks[0]
    original = up.backward

    def no_skip_grads(dout):
        g = original(dout)
        return g._replace(dskips=tuple(d * 0 for d in g.dskips))

    object.__setattr__(up, "backward", no_skip_grads)
    cut = model.backward(dout).dx
    assert np.abs(full - cut).max() > 1e-4


def test_unet_structure_follows_diffusers():
    model = UNet2DConditionModel(**TINY_UNET)
    assert [len(b.resnets) for b in model.down_blocks] == [1, 1]
    assert [len(b.resnets) for b in model.up_blocks] == [2, 2]  # one more than the down block
    assert model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 8  # attention_head_dim = heads
    assert model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.dim_head == 4  # 32 channels / 8 heads
    assert model.time_embedding.linear_1.weight.shape == (128, 32)  # 4 * block_out_channels[0]
    out = model(np.zeros((1, 8, 8, 4), np.float32), 10, np.zeros((1, 3, 32), np.float32))
    assert out.shape == (1, 8, 8, 4) and out.dtype == np.float32


def test_three_levels_and_no_mid_block(rng):
    config = dict(SMALL_SD_LIKE_UNET, mid_block_type=None)
    model = UNet2DConditionModel(**config, rng=rng)
    assert not any(k.startswith("mid_block") for k in model.state_dict())
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 3, 24)).astype(np.float32)
    out = model(x, np.array([1, 2]), ctx)
    dx, dctx = (g := model.backward(np.ones_like(out))).dx, g.dcontext
    assert dx.shape == x.shape and dctx.shape == ctx.shape
    assert all(np.abs(g).sum() > 0 for _, g in model.named_grads())  # every parameter was reached


def test_center_input_sample_scales_the_sample_gradient(rng):
    plain = UNet2DConditionModel(**GRADCHECK_UNET, rng=np.random.default_rng(1))
    centred = UNet2DConditionModel(**GRADCHECK_UNET, center_input_sample=True, rng=np.random.default_rng(1))
    x = rng.random((1, 4, 4, 3)).astype(np.float32)
    ctx = rng.standard_normal((1, L, D)).astype(np.float32)
    assert_close(centred(x, 5, ctx), plain(2 * x - 1, 5, ctx))
    dout = rng.standard_normal((1, 4, 4, 2)).astype(np.float32)
    assert_close(centred.backward(dout).dx, 2 * plain.backward(dout).dx)


def test_scalar_and_batched_timesteps_agree(rng):
    model = UNet2DConditionModel(**GRADCHECK_UNET, rng=rng)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    ctx = rng.standard_normal((2, L, D)).astype(np.float32)
    a = model(x, 42, ctx)
    np.testing.assert_array_equal(a, model(x, np.array([42, 42]), ctx))
    np.testing.assert_array_equal(a, model(x, np.array([42]), ctx))
    assert not np.allclose(a, model(x, np.array([42, 900]), ctx))


def test_gradients_accumulate_until_zeroed(rng):
    model = UNet2DConditionModel(**GRADCHECK_UNET, rng=rng)
    x = rng.standard_normal((1, 4, 4, 3)).astype(np.float32)
    ctx = rng.standard_normal((1, L, D)).astype(np.float32)
    dout = np.ones((1, 4, 4, 2), np.float32)
    model(x, 1, ctx)
    model.backward(dout)
    first = model.conv_in.grads["weight"].copy()
    model(x, 1, ctx)
    model.backward(dout)
    np.testing.assert_allclose(model.conv_in.grads["weight"], 2 * first, rtol=1e-5)
    model.zero_grad()
    assert not any(g.any() for _, g in model.named_grads())
    with pytest.raises(RuntimeError, match="backward called without a preceding forward"):
        model.backward(dout)


# ---------------------------------------------------------------------------- configuration
def test_from_config_takes_a_diffusers_config_json():
    config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.0", **TINY_UNET,
              "upcast_attention": False, "resnet_time_scale_shift": "default", "num_attention_heads": None}
    model = UNet2DConditionModel.from_config(config)
    assert model.config["attention_head_dim"] == 8
    assert model.config["block_out_channels"] == (32, 64)
    assert set(model.state_dict()) == set(UNet2DConditionModel(**TINY_UNET).state_dict())
    again = UNet2DConditionModel.from_config(model.config)
    assert again.config == model.config


@pytest.mark.parametrize(
    "change,match",
    [
        ({"class_embed_type": "timestep"}, "does not support class_embed_type='timestep'"),
        ({"addition_embed_type": "text_time"}, "does not support addition_embed_type"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"num_attention_heads": 8}, "num_attention_heads"),
        ({"not_a_field": 1}, "unknown config field.*not_a_field"),
        ({"down_block_types": ("AttnDownBlock2D", "DownBlock2D")}, r"unsupported block type.*AttnDownBlock2D"),
        ({"up_block_types": ("UpBlock2D", "SimpleCrossAttnUpBlock2D")}, "SimpleCrossAttnUpBlock2D"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "unsupported mid_block_type"),
        ({"block_out_channels": (32, 64, 64)}, "must have the same length"),
        ({"attention_head_dim": 5}, r"block_out_channels\[0\]=32 is not divisible by attention_head_dim\[0\]=5"),
        ({"attention_head_dim": (8, 8, 8)}, "attention_head_dim has 3 entries for 2 levels"),
        ({"only_cross_attention": True}, "only_cross_attention"),
        ({"time_embedding_type": "fourier"}, "positional"),
    ],
)
def test_unsupported_config_raises(change, match):
    with pytest.raises(ValueError, match=match):
        UNet2DConditionModel(**{**TINY_UNET, **change})


def test_a_unet_config_builds_the_same_model_as_its_fields():
    config = UNetConfig(**TINY_UNET)
    a = UNet2DConditionModel(config, rng=np.random.default_rng(3))
    b = UNet2DConditionModel(**TINY_UNET, rng=np.random.default_rng(3))
    assert a.config == b.config == config.to_dict()
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(p, q, err_msg=name)
    assert UNetConfig(**{**TINY_UNET, "block_out_channels": [32, 64]}) == config  # a parsed JSON list
    assert config.per_level("layers_per_block") == [1, 1]


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"in_channels": "4"}, TypeError, "UNetConfig: in_channels must be a positive int"),
        ({"block_out_channels": (32, 0)}, ValueError, "block_out_channels must be a non-empty tuple of positive ints"),
        ({"down_block_types": "DownBlock2D"}, TypeError, "down_block_types must be a list or tuple"),
        ({"norm_num_groups": True}, TypeError, "norm_num_groups must be a positive int, got True"),
        ({"layers_per_block": 0}, ValueError, "layers_per_block must be a positive int"),
        ({"conv_in_kernel": 2}, ValueError, "conv_in_kernel and conv_out_kernel must be odd"),
    ],
)
def test_unet_config_names_the_bad_field(change, error, match):
    with pytest.raises(error, match=match):
        UNetConfig(**{**TINY_UNET, **change})


def test_unet_constructor_refuses_a_dict_or_a_config_with_fields():
    with pytest.raises(TypeError, match="expects a UNetConfig, got dict.*from_config"):
        UNet2DConditionModel(dict(TINY_UNET))
    with pytest.raises(TypeError, match="a UNetConfig or fields, not both"):
        UNet2DConditionModel(UNetConfig(**TINY_UNET), in_channels=3)


def test_blocks_with_and_without_attention_check_the_context(rng):
    plain = DownBlock2D(4, 4, T, resnet_groups=2, add_downsample=False, rng=rng)
    cross = UpBlock2D(4, 4, 4, T, resnet_groups=2, add_upsample=False, cross_attention=True, num_attention_heads=2,
                      cross_attention_dim=D, rng=rng)
    x, temb, ctx = rng.standard_normal((1, 2, 2, 4)), rng.standard_normal((1, T)), rng.standard_normal((1, L, D))
    assert not plain.has_cross_attention and "attentions" not in plain._modules
    assert cross.has_cross_attention and len(cross.attentions) == 1
    with pytest.raises(ValueError, match="cross_attention=False, so it takes no context"):
        plain(x, temb, ctx)
    with pytest.raises(ValueError, match="cross_attention=True: pass the context"):
        cross(x, (x,), temb)
    h, skips = plain(x, temb)
    g = plain.backward(np.ones_like(h), tuple(np.ones_like(s) for s in skips))
    assert g.dcontext is None and g.dskips is None and g.dtemb.shape == temb.shape


# ---------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny():
    return UNet2DConditionModel(**TINY_UNET)


@pytest.mark.parametrize(
    "sample_shape,timestep,ctx_shape,error,match",
    [
        ((1, 8, 8, 3), 1, (1, 3, 32), ValueError, r"sample of shape \(B, H, W, C\) with C=4.*got \(1, 8, 8, 3\)"),
        ((1, 4, 8, 8), 1, (1, 3, 32), ValueError, r"C=4 \(channels last\), got \(1, 4, 8, 8\)"),
        ((1, 8, 8, 4), 1, (1, 3, 16), ValueError, r"encoder_hidden_states of shape \(\.\.\., 32\)"),
        ((2, 8, 8, 4), 1, (1, 3, 32), ValueError, r"encoder_hidden_states of shape \(B=2, L, 32\)"),
        ((1, 8, 8, 4), 1, (3, 32), ValueError, "encoder_hidden_states"),
        ((1, 7, 8, 4), 1, (1, 3, 32), ValueError, r"2 levels needs H and W divisible by 2"),
        ((1, 8, 5, 4), 1, (1, 3, 32), ValueError, r"2 levels needs H and W divisible by 2"),
        ((2, 8, 8, 4), np.array([1, 2, 3]), (2, 3, 32), ValueError, r"timestep .*\(B,\) with B=2, got \(3,\)"),
        ((1, 8, 8, 4), np.array(["a"]), (1, 3, 32), TypeError, "integer or float timesteps"),
    ],
)
def test_unet_bad_input(tiny, sample_shape, timestep, ctx_shape, error, match):
    with pytest.raises(error, match=match):
        tiny(np.zeros(sample_shape, np.float32), timestep, np.zeros(ctx_shape, np.float32))


def test_unet_bad_dtype_and_nan(tiny):
    ctx = np.zeros((1, 3, 32), np.float32)
    with pytest.raises(TypeError, match="UNet2DConditionModel expects sample with a floating dtype"):
        tiny(np.zeros((1, 8, 8, 4), np.int64), 1, ctx)
    with pytest.raises(ValueError, match="non-finite value .* in encoder_hidden_states"):
        tiny(np.zeros((1, 8, 8, 4), np.float32), 1, np.full((1, 3, 32), np.nan, np.float32))


def test_h_divisibility_grows_with_levels():
    model = UNet2DConditionModel(**SMALL_SD_LIKE_UNET)  # 3 levels: H, W divisible by 4
    with pytest.raises(ValueError, match="3 levels needs H and W divisible by 4"):
        model(np.zeros((1, 6, 8, 4), np.float32), 1, np.zeros((1, 2, 24), np.float32))


@pytest.mark.gpu
def test_unet_cupy_matches_numpy():
    import cupy as cp

    rng = np.random.default_rng(6)
    model = UNet2DConditionModel(**TINY_UNET, rng=rng)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    out = model(x, np.array([10, 500]), ctx)
    dx, dctx = (g := model.backward(dout)).dx, g.dcontext
    grads = {k: v.copy() for k, v in model.named_grads()}
    model.zero_grad()
    model.to("cupy")
    out_gpu = model(cp.asarray(x), cp.asarray([10, 500]), cp.asarray(ctx))
    dx_gpu, dctx_gpu = (g := model.backward(cp.asarray(dout))).dx, g.dcontext
    assert isinstance(out_gpu, cp.ndarray)
    assert_close(out_gpu, out, atol=1e-4, what="out")
    assert_close(dx_gpu, dx, atol=1e-4, what="dsample")
    assert_close(dctx_gpu, dctx, atol=1e-4, what="dencoder_hidden_states")
    for name, g in model.named_grads():
        ref = grads[name]
        assert_close(g, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())), rtol=1e-3, what=name)
