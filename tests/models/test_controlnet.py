"""Tests of the ControlNet (models/controlnet.py) and its residuals in the U-Net (models/unet.py).

Gradient checks in float64 at K random coordinates of every input and parameter
(:func:`helpers.check_subset`); parity with diffusers' ``ControlNetModel`` feeding
``UNet2DConditionModel`` from the golden file ``fixtures/controlnet.npz`` (made by
``fixtures/cases_controlnet.py``) and live under ``make crosscheck``.
"""

import numpy as np
import pytest
from fixtures.cases_controlnet import SCALE, TINY_CONTROLNET, bgr_dmid, controlnet_weights
from fixtures.cases_unet import GRADCHECK_UNET, TINY_UNET, assert_grads_match, our_layout, reference_shapes, weights_for
from helpers import SOURCES, assert_close, check_subset, randomize, reference

from diffusion_np.gradcheck import check_module
from diffusion_np.models.config import ControlNetConfig
from diffusion_np.models.controlnet import ControlNetConditioningEmbedding, ControlNetModel
from diffusion_np.models.unet import UNet2DConditionModel
from diffusion_np.nn.module import Module

D = GRADCHECK_UNET["cross_attention_dim"]  # text width of the gradient-check models


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _pair(rng, conditioning_channels=2, embedding=(3, 4), order="rgb"):
    """(unet, controlnet) in float64 with every weight moved away from its init (zero convs included)."""
    unet = UNet2DConditionModel(**GRADCHECK_UNET, rng=rng, dtype=np.float64)
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels,
                                           conditioning_embedding_out_channels=embedding,
                                           controlnet_conditioning_channel_order=order, rng=rng)
    return randomize(unet, rng, 0.2), randomize(controlnet, rng, 0.2)


def _inputs(rng, batch=2, side=4, f=2, channels=2):
    return [rng.standard_normal((batch, side, side, 3)), rng.standard_normal((batch, 3, D)),
            rng.random((batch, f * side, f * side, channels))]


# ---------------------------------------------------------------------------- gradient checks
def test_conditioning_embedding_gradcheck(rng):
    embedding = ControlNetConditioningEmbedding(5, conditioning_channels=2, block_out_channels=(3, 4, 6), rng=rng)
    randomize(embedding.to(dtype=np.float64), rng)
    errors = check_module(embedding, rng.standard_normal((2, 8, 8, 2)))
    assert embedding(rng.standard_normal((1, 8, 8, 2))).shape == (1, 2, 2, 5)  # two stride-2 convs
    assert len(errors) == 1 + 2 * 6 and max(errors.values()) < 1e-7, errors  # the image and 6 convs


@pytest.mark.parametrize("order", ["rgb", "bgr"])
def test_controlnet_gradcheck(rng, order):
    _, controlnet = _pair(rng, order=order)

    def forward(x, c, cond):
        return controlnet(x, np.array([3, 700]), c, cond, conditioning_scale=0.8)

    def backward(d):
        g = controlnet.backward(d[0], d[1])
        return (g.dx, g.dcontext, g.dcond)

    errors = check_subset(forward, backward, _inputs(rng), controlnet, k=3)
    assert len(errors) == 3 + len(controlnet.state_dict())  # sample, text, control image, every parameter
    assert max(errors.values()) < 1e-6, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_unet_residual_gradients(rng):
    """The residuals are inputs of the U-Net: their gradients (dskips, dmid) by finite differences."""
    unet, controlnet = _pair(rng)
    x, c, cond = _inputs(rng)
    down, mid = controlnet(x, 5, c, cond)
    residuals = [rng.standard_normal(r.shape) for r in (*down, mid)]

    def forward(x, c, *res):
        return unet(x, 5, c, down_block_additional_residuals=res[:-1], mid_block_additional_residual=res[-1])

    def backward(d):
        g = unet.backward(d)
        return (g.dx, g.dcontext, *g.dskips, g.dmid)

    errors = check_subset(forward, backward, [x, c, *residuals], Module(), k=4)  # the U-Net's own: test_unet.py
    assert set(errors) == {f"input{i}" for i in range(2 + len(residuals))}
    assert max(errors.values()) < 1e-6, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_controlled_unet_gradcheck(rng):
    """The whole controlled model, as it trains: the U-Net's backward feeds the ControlNet's (every
    ControlNet parameter at two coordinates; the U-Net's parameters are test_unet.py's)."""
    unet, controlnet = _pair(rng)
    t = np.array([10, 500])

    def forward(x, c, cond):
        down, mid = controlnet(x, t, c, cond, conditioning_scale=1.3)
        return unet(x, t, c, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    def backward(dout):
        g = unet.backward(dout)
        gc = controlnet.backward(g.dskips, g.dmid)
        return (g.dx + gc.dx, g.dcontext + gc.dcontext, gc.dcond)  # x and the text feed both networks

    errors = check_subset(forward, backward, _inputs(rng), controlnet, k=2)
    assert max(errors.values()) < 1e-6, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


# ---------------------------------------------------------------------------- zero convolutions
def test_a_new_controlnet_leaves_the_unet_unchanged_and_learns_through_its_zero_convs(rng):
    """Eq. 2 at initialisation: every residual is 0, so the output is the base model's; the zero convs'
    weights still get a gradient, while nothing flows into the copy through them yet."""
    unet = UNet2DConditionModel(**GRADCHECK_UNET, rng=rng)
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=2, conditioning_embedding_out_channels=(3, 4))
    x, c, cond = (a.astype(np.float32) for a in _inputs(rng))
    base = unet(x, 7, c)
    down, mid = controlnet(x, 7, c, cond)
    assert all(not r.any() for r in (*down, mid))
    out = unet(x, 7, c, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    np.testing.assert_array_equal(out, base)
    g = unet.backward(rng.standard_normal(out.shape).astype(np.float32))
    controlnet.zero_grad()
    controlnet.backward(g.dskips, g.dmid)
    grads = dict(controlnet.named_grads())
    assert np.abs(grads["controlnet_mid_block.weight"]).sum() > 0
    assert all(np.abs(grads[f"controlnet_down_blocks.{j}.weight"]).sum() > 0 for j in range(4))
    assert not grads["mid_block.resnets.0.conv1.weight"].any()  # behind a zero conv: nothing yet
    assert not grads["controlnet_cond_embedding.conv_in.weight"].any()


def test_from_unet_copies_the_encoder(rng):
    unet = UNet2DConditionModel(**GRADCHECK_UNET, rng=rng).freeze()
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(3, 4))
    ours, base = controlnet.state_dict(), unet.state_dict()
    copied = [k for k in ours if k.startswith(("conv_in.", "time_embedding.", "down_blocks.", "mid_block."))]
    assert len(copied) > 30 and all(np.array_equal(ours[k], base[k]) and ours[k] is not base[k] for k in copied)
    assert len(list(controlnet.parameters_and_grads())) == len(ours)  # trainable, though the U-Net is frozen
    assert controlnet.config["cross_attention_dim"] == D and controlnet.conditioning_downscale == 2


def test_conditioning_scale_scales_the_residuals(rng):
    _, controlnet = _pair(rng)
    x, c, cond = _inputs(rng)
    down1, mid1 = controlnet(x, 3, c, cond)
    down2, mid2 = controlnet(x, 3, c, cond, conditioning_scale=-0.5)
    np.testing.assert_allclose(mid2, -0.5 * mid1, rtol=1e-12)
    for a, b in zip(down1, down2):
        np.testing.assert_allclose(b, -0.5 * a, rtol=1e-12)


# ---------------------------------------------------------------------------- parity with diffusers
@pytest.fixture(params=SOURCES, scope="module")
def torch_cases(request):
    return reference("controlnet", request.param)


def _tiny_models():
    unet, controlnet = UNet2DConditionModel(**TINY_UNET), ControlNetModel(**TINY_CONTROLNET)
    unet.load_state_dict(weights_for({k: tuple(v.shape) for k, v in unet.state_dict().items()}))
    controlnet.load_state_dict(controlnet_weights({k: tuple(v.shape) for k, v in controlnet.state_dict().items()}))
    return unet, controlnet


def test_state_dict_keys_and_shapes_equal_diffusers(torch_cases):
    ours = {k: tuple(v.shape) for k, v in ControlNetModel(**TINY_CONTROLNET).state_dict().items()}
    assert ours == reference_shapes(torch_cases["controlnet_grads"])


def test_controlnet_steering_the_unet_matches_diffusers(torch_cases):
    """Forward (residuals and output) and every gradient: sample, text, control image, both networks' parameters."""
    c = torch_cases["controlled"]
    unet, controlnet = _tiny_models()
    down, mid = controlnet(c["sample"], c["timestep"], c["encoder_hidden_states"], c["controlnet_cond"],
                           conditioning_scale=SCALE)
    assert_close(mid, c["mid_residual"], what="mid_block_res_sample")
    assert_close(down[-1], c["down_residual_last"], what="down_block_res_samples[-1]")
    out = unet(c["sample"], c["timestep"], c["encoder_hidden_states"], down, mid)
    assert_close(out, c["out"], what="controlled U-Net output")
    g = unet.backward(c["dout"])
    gc = controlnet.backward(g.dskips, g.dmid)
    assert_close(g.dx + gc.dx, c["dsample"], what="dsample")
    assert_close(g.dcontext + gc.dcontext, c["dencoder_hidden_states"], what="dencoder_hidden_states")
    assert_close(gc.dcond, c["dcontrolnet_cond"], what="dcontrolnet_cond")
    assert assert_grads_match(controlnet.named_grads(), torch_cases["controlnet_grads"]) <= 1.0
    assert assert_grads_match(unet.named_grads(), torch_cases["unet_grads"]) <= 1.0


def test_bgr_channel_order_matches_diffusers(torch_cases):
    c, x = torch_cases["bgr"], torch_cases["controlled"]
    controlnet = ControlNetModel(**TINY_CONTROLNET, controlnet_conditioning_channel_order="bgr")
    controlnet.load_state_dict(controlnet_weights({k: tuple(v.shape) for k, v in controlnet.state_dict().items()}))
    down, mid = controlnet(x["sample"][:1], x["timestep"][:1], x["encoder_hidden_states"][:1],
                           x["controlnet_cond"][:1])
    assert_close(mid, c["mid_residual"], what="bgr mid_block_res_sample")
    g = controlnet.backward(tuple(np.zeros_like(d) for d in down), bgr_dmid(mid.shape))
    assert_close(g.dcond, c["dcontrolnet_cond"], what="bgr dcontrolnet_cond")


@pytest.mark.crosscheck
def test_every_gradient_matches_diffusers_in_full():
    """The golden test compares gradient summaries; this one compares every entry (needs torch)."""
    torch = pytest.importorskip("torch")
    from fixtures.cases_controlnet import case_inputs, models

    theirs_cn, theirs_unet = models()
    unet, controlnet = _tiny_models()
    x = case_inputs()
    rng = np.random.default_rng(3)
    sample = torch.tensor(x["sample"].transpose(0, 3, 1, 2).copy(), requires_grad=True)
    cond = torch.tensor(x["controlnet_cond"].transpose(0, 3, 1, 2).copy(), requires_grad=True)
    context = torch.tensor(x["encoder_hidden_states"], requires_grad=True)
    t = torch.tensor(x["timestep"])
    down, mid = theirs_cn(sample, t, context, cond, conditioning_scale=1.5, return_dict=False)
    y = theirs_unet(sample, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    dout = rng.standard_normal(tuple(y.shape)).astype(np.float32)  # (B, C, H, W)
    (y * torch.tensor(dout)).sum().backward()

    ours_down, ours_mid = controlnet(x["sample"], x["timestep"], x["encoder_hidden_states"], x["controlnet_cond"],
                                     conditioning_scale=1.5)
    out = unet(x["sample"], x["timestep"], x["encoder_hidden_states"], ours_down, ours_mid)
    assert_close(out, y.detach().numpy().transpose(0, 2, 3, 1), what="out")
    g = unet.backward(dout.transpose(0, 2, 3, 1).copy())
    gc = controlnet.backward(g.dskips, g.dmid)
    assert_close(g.dx + gc.dx, sample.grad.numpy().transpose(0, 2, 3, 1), what="dsample")
    assert_close(gc.dcond, cond.grad.numpy().transpose(0, 2, 3, 1), what="dcontrolnet_cond")
    for ours, theirs in ((controlnet, theirs_cn), (unet, theirs_unet)):
        grads = dict(ours.named_grads())
        for name, p in theirs.named_parameters():
            ref = our_layout(p.grad.numpy())
            # the absolute tolerance scales with the gradient's size, as in cases_unet.assert_grads_match
            assert_close(grads[name], ref, atol=1e-5 * max(1.0, float(np.abs(ref).max())), what=name)


# ---------------------------------------------------------------------------- configuration and bad input
def test_from_diffusers_config_refuses_what_it_does_not_build():
    config = {"_class_name": "ControlNetModel", **TINY_CONTROLNET, "upcast_attention": True,
              "global_pool_conditions": False, "class_embed_type": None}
    assert ControlNetModel.from_config(config).config["conditioning_channels"] == 2
    with pytest.raises(ValueError, match="global_pool_conditions=True"):
        ControlNetModel.from_config({**config, "global_pool_conditions": True})
    with pytest.raises(ValueError, match="unknown config field"):
        ControlNetModel.from_config({**config, "up_block_types": ["UpBlock2D"]})
    with pytest.raises(ValueError, match="ControlNetConfig: block_out_channels\\[1\\]=60 is not divisible"):
        ControlNetConfig(**{**TINY_CONTROLNET, "block_out_channels": (32, 60)})
    with pytest.raises(ValueError, match="conditioning_embedding_out_channels"):
        ControlNetConfig(**{**TINY_CONTROLNET, "conditioning_embedding_out_channels": ()})


def test_from_unet_refuses_what_a_controlnet_cannot_copy():
    unet = UNet2DConditionModel(**{**GRADCHECK_UNET, "layers_per_block": (1, 2)})
    with pytest.raises(ValueError, match="one layers_per_block"):
        ControlNetModel.from_unet(unet)
    with pytest.raises(ValueError, match="time_embedding_dim=12"):
        ControlNetModel.from_unet(UNet2DConditionModel(**GRADCHECK_UNET, time_embedding_dim=12))


@pytest.mark.parametrize("shape,match", [
    ((2, 4, 4, 2), r"controlnet_cond of shape \(2, 8, 8, 2\).*got \(2, 4, 4, 2\)"),  # latent-sized
    ((2, 8, 8, 3), r"controlnet_cond of shape \(2, 8, 8, 2\).*2 channel\(s\); got \(2, 8, 8, 3\)"),  # RGB
    ((1, 8, 8, 2), r"batch B=2"),
])
def test_a_control_image_of_the_wrong_size_or_channels_is_named(rng, shape, match):
    _, controlnet = _pair(rng)
    x, c, _ = _inputs(rng)
    with pytest.raises(ValueError, match=match):
        controlnet(x, 1, c, rng.random(shape))


def test_bad_scales_and_residuals_are_refused(rng):
    unet, controlnet = _pair(rng)
    x, c, cond = _inputs(rng)
    with pytest.raises(ValueError, match="conditioning_scale must be finite"):
        controlnet(x, 1, c, cond, conditioning_scale=float("nan"))
    with pytest.raises(TypeError, match="conditioning_scale must be a number"):
        controlnet(x, 1, c, cond, conditioning_scale="1")
    cond[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite value .* in controlnet_cond"):
        controlnet(x, 1, c, cond)
    down, mid = controlnet(x, 1, c, rng.random(cond.shape))
    with pytest.raises(ValueError, match="both down_block_additional_residuals and mid_block_additional_residual"):
        unet(x, 1, c, down_block_additional_residuals=down)
    with pytest.raises(ValueError, match="4 skip connections.*got 3"):
        unet(x, 1, c, down[:3], mid)
    with pytest.raises(ValueError, match=r"down_block_additional_residuals\[2\] must have the shape"):
        unet(x, 1, c, (*down[:2], down[3], down[3]), mid)
    with pytest.raises(ValueError, match="mid_block_additional_residual must have the shape"):
        unet(x, 1, c, down, mid[:, :1])
    with pytest.raises(ValueError, match="expects 4 down-residual gradients"):
        controlnet.backward(down[:2], mid)
