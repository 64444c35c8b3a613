"""LoRA adapters (diffusion_np/nn/lora.py): gradients by finite differences in float64, a frozen
base with no gradient buffers, merge/unmerge bit for bit, several adapters with scales,
injection into a U-Net and a text encoder, and parity with peft (crosscheck)."""

import numpy as np
import pytest

from diffusion_np import nn
from diffusion_np.gradcheck import check_module, grad_rel_error, numerical_gradient, sampled_grad_error
from diffusion_np.models.text_encoder import TextEncoder, TextEncoderConfig
from diffusion_np.models.unet import UNet2DConditionModel
from diffusion_np.nn.lora import (
    ATTENTION_TARGETS,
    TEXT_ENCODER_TARGETS,
    LoRAConv2d,
    LoRALinear,
    add_lora,
    disable_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    set_lora_adapter,
    set_lora_scale,
    unmerge_lora,
)
from diffusion_np.optim import Adam

B, L, D = 2, 3, 6  # batch, text tokens, text width
TINY_UNET = dict(
    in_channels=3, out_channels=2, block_out_channels=(4, 8), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=D, attention_head_dim=2, norm_num_groups=2,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _randomize_adapters(layer_or_model, rng, scale=0.5):
    """B starts at zero, which would hide every bug of dA: give every trainable array values."""
    for _, p, _ in layer_or_model.parameters_and_grads():
        p[...] = scale * rng.standard_normal(p.shape)


def _lora_linear(rng, **kw):
    layer = LoRALinear.wrap(nn.Linear(5, 3, rng=rng, dtype=np.float64), rank=2, alpha=3.0, rng=rng, **kw)
    layer.add_adapter("style", rank=3, alpha=1.5, rng=rng)
    _randomize_adapters(layer, rng)
    return layer


def _lora_conv(rng, kernel, stride, padding):
    base = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, rng=rng, dtype=np.float64)
    layer = LoRAConv2d.wrap(base, rank=2, alpha=5.0, rng=rng)
    _randomize_adapters(layer, rng)
    return layer


# ---------------------------------------------------------------------------- finite differences (float64)
def test_lora_linear_gradcheck_two_adapters(rng):
    layer = _lora_linear(rng).eval()
    errors = check_module(layer, rng.standard_normal((2, 4, 5)))
    # the input and the four adapter arrays; the frozen weight and bias are not parameters to train
    assert set(errors) == {"input0", "lora_A.default.weight", "lora_B.default.weight",
                           "lora_A.style.weight", "lora_B.style.weight"}
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
def test_lora_conv_gradcheck(rng, kernel, stride, padding):
    layer = _lora_conv(rng, kernel, stride, padding).eval()
    errors = check_module(layer, rng.standard_normal((2, 5, 6, 3)))
    assert set(errors) == {"input0", "lora_A.default.weight", "lora_B.default.weight"}
    assert max(errors.values()) < 1e-7, errors


def test_lora_gradcheck_with_dropout_uses_the_forward_mask(rng):
    """Training mode, p = 0.4: the finite differences redraw the same mask (the generator is reseeded)."""
    layer = _lora_linear(rng, dropout=0.4).train()
    x = rng.standard_normal((2, 4, 5))
    dout = rng.standard_normal((2, 4, 3))

    def run():
        layer.lora_dropout["default"].rng = np.random.default_rng(7)
        return layer(x)

    def loss():
        value = float((run() * dout).sum())
        layer._set_cache(None)
        return value

    layer.zero_grad()
    run()
    dx = layer.backward(dout)
    assert grad_rel_error(dx, numerical_gradient(loss, x)) < 1e-7
    grads = dict(layer.named_grads())
    for name, p, _ in layer.parameters_and_grads():
        assert grad_rel_error(grads[name], numerical_gradient(loss, p)) < 1e-7, name
    dropped = layer.lora_dropout["default"]
    dropped.rng = np.random.default_rng(7)
    assert not dropped(x).all()  # some inputs were dropped in these checks


def test_tiny_unet_with_lora_gradcheck(rng):
    model = UNet2DConditionModel(**TINY_UNET, rng=rng, dtype=np.float64)
    for _, p in model.named_parameters():  # the base away from its init too (norms' ones and zeros)
        p += 0.2 * rng.standard_normal(p.shape)
    paths = add_lora(model, rank=2, alpha=4.0, rng=rng)
    assert len(paths) == 4 * 2 * 4  # four transformer blocks (down, mid, 2 up) x attn1, attn2 x 4 projections
    _randomize_adapters(model, rng, scale=0.3)
    sample, context = rng.standard_normal((B, 4, 4, 3)), rng.standard_normal((B, L, D))
    timesteps = np.array([3, 700])
    drng = np.random.default_rng(11)
    model.zero_grad()
    out = model(sample, timesteps, context)
    dout = drng.standard_normal(out.shape)
    g = model.backward(dout)
    dsample, dcontext = g.dx, g.dcontext

    def loss():
        return float((model(sample, timesteps, context) * dout).sum())

    errors = {"sample": sampled_grad_error(loss, sample, dsample, 4, drng),
              "context": sampled_grad_error(loss, context, dcontext, 4, drng)}
    for name, p, g in model.parameters_and_grads():
        errors[name] = sampled_grad_error(loss, p, g.copy(), 2, drng)
    assert len(errors) == 2 + 2 * len(paths)  # only adapters are trainable: an A and a B per path
    assert max(errors.values()) < 1e-6, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


# ---------------------------------------------------------------------------- the frozen base
def test_base_weights_get_no_gradient_buffer_and_stay_put(rng):
    layer = _lora_linear(rng)
    assert set(layer.grads) == set()  # the layer's own (base) parameters have no gradient arrays
    assert set(layer.params) == {"weight", "bias"}
    w0, b0 = layer.weight.copy(), layer.bias.copy()
    opt = Adam(layer, lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        layer(rng.standard_normal((2, 5)))
        layer.backward(rng.standard_normal((2, 3)))
        opt.step()
    assert np.array_equal(layer.weight, w0) and np.array_equal(layer.bias, b0)
    assert set(opt.state) == {"lora_A.default.weight", "lora_B.default.weight",
                              "lora_A.style.weight", "lora_B.style.weight"}


def test_model_parameter_names_stay_and_only_adapters_are_added(rng):
    model = UNet2DConditionModel(**TINY_UNET, rng=rng)
    before = model.state_dict()
    paths = add_lora(model, rank=2)
    after = model.state_dict()
    assert all(after[k] is v for k, v in before.items())  # same names, the very same arrays
    added = sorted(set(after) - set(before))
    assert added == sorted(f"{p}.lora_{ab}.default.weight" for p in paths for ab in "AB")
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.default.weight" in added
    names = {n for n, _, _ in model.parameters_and_grads()}
    assert names == set(added)
    # grads exist for the adapted layers' adapters only, none for their frozen base
    layer = lora_layers(model)[paths[0]]
    assert set(layer.grads) == set() and "weight" in layer.params


def test_a_new_adapter_changes_nothing_and_a_is_pefts_init(rng):
    base = nn.Linear(64, 32, rng=rng, dtype=np.float64)
    x = rng.standard_normal((3, 64))
    expected = x @ base.weight.T + base.bias
    layer = LoRALinear.wrap(base, rank=8, rng=np.random.default_rng(1))
    assert np.array_equal(layer(x), expected)
    assert not layer.lora_B["default"].weight.any()
    a = layer.lora_A["default"].weight
    assert a.shape == (8, 64) and np.abs(a).max() <= 1 / np.sqrt(64)  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(in))
    assert np.abs(a).max() > 0.9 / np.sqrt(64)


# ---------------------------------------------------------------------------- merge / unmerge
@pytest.mark.parametrize("make", ["linear", "conv3x3", "conv1x1"])
def test_merge_then_unmerge_restores_the_base_bit_for_bit(rng, make):
    if make == "linear":
        layer, x = _lora_linear(rng), rng.standard_normal((2, 4, 5))
    else:
        layer = _lora_conv(rng, 3 if make == "conv3x3" else 1, 1, 1 if make == "conv3x3" else 0)
        x = rng.standard_normal((2, 5, 6, 3))
    w0 = layer.weight.copy()
    y = layer(x)
    layer.merge()
    assert layer.merged and not np.array_equal(layer.weight, w0)
    np.testing.assert_allclose(layer(x), y, rtol=1e-12, atol=1e-12)  # the merged layer computes the same
    with pytest.raises(RuntimeError, match="merged"):
        layer.backward(np.ones_like(y))
    layer.unmerge()
    assert np.array_equal(layer.weight, w0)  # bit for bit
    assert layer.weight.tobytes() == w0.tobytes()
    np.testing.assert_array_equal(layer(x), y)


def test_why_unmerge_does_not_subtract(rng):
    """(W0 + D) - D is not W0 in floating point: the reason unmerge keeps W0."""
    w0 = rng.standard_normal((256, 256))
    d = 1e-3 * rng.standard_normal((256, 256))
    assert not np.array_equal((w0 + d) - d, w0)


def test_merge_lora_on_a_model(rng):
    model = UNet2DConditionModel(**TINY_UNET, rng=rng, dtype=np.float64)
    paths = add_lora(model, rank=2, rng=rng)
    _randomize_adapters(model, rng, 0.3)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    sample, context = rng.standard_normal((B, 4, 4, 3)), rng.standard_normal((B, L, D))
    y = model(sample, 10, context)
    assert merge_lora(model) == len(paths)
    np.testing.assert_allclose(model(sample, 10, context), y, rtol=1e-10, atol=1e-12)
    assert unmerge_lora(model) == len(paths)
    for k, v in model.state_dict().items():
        assert v.tobytes() == before[k].tobytes(), k


def test_an_upsampler_conv_takes_an_adapter(rng):
    """LCM-LoRA adapts ``up_blocks.*.upsamplers.0.conv``, which Upsample2D otherwise runs fused with the upsampling:
    wrapped, it runs unfused, so the adapter changes the output and gets its gradient (finite differences), and
    merging it into the conv's weight gives the same output."""
    model = UNet2DConditionModel(**TINY_UNET, rng=rng, dtype=np.float64)
    sample, context = rng.standard_normal((B, 4, 4, 3)), rng.standard_normal((B, L, D))
    base = model(sample, 10, context)
    paths = add_lora(model, target="upsamplers.0.conv", rank=2, rng=rng)
    assert paths and all(isinstance(lora_layers(model)[p], LoRAConv2d) for p in paths)
    _randomize_adapters(model, rng, 0.3)
    model.zero_grad()
    y = model(sample, 10, context)
    assert np.abs(y - base).max() > 1e-3
    drng = np.random.default_rng(12)
    dout = drng.standard_normal(y.shape)
    dsample = model.backward(dout).dx

    def loss():
        return float((model(sample, 10, context) * dout).sum())

    errors = {"sample": sampled_grad_error(loss, sample, dsample, 4, drng)}
    for name, p, g in model.parameters_and_grads():
        errors[name] = sampled_grad_error(loss, p, g.copy(), 4, drng)
    assert len(errors) == 1 + 2 * len(paths) and max(errors.values()) < 1e-6, errors
    merge_lora(model)
    np.testing.assert_allclose(model(sample, 10, context), y, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- several adapters
def test_adapters_add_up_with_their_scales(rng):
    layer = _lora_linear(rng).eval()
    x = rng.standard_normal((2, 5))
    base = x @ layer.weight.T + layer.bias

    def update(name):
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        return layer.alphas[name] / layer.ranks[name] * (x @ a.T @ b.T)

    np.testing.assert_allclose(layer(x), base + update("default") + update("style"), rtol=1e-12)
    layer.set_scale("style", 0.25)
    np.testing.assert_allclose(layer(x), base + update("default") + 0.25 * update("style"), rtol=1e-12)
    layer.set_adapter("style")
    np.testing.assert_allclose(layer(x), base + 0.25 * update("style"), rtol=1e-12)
    layer.disabled = True
    np.testing.assert_array_equal(layer(x), base)
    layer.backward(np.ones((2, 3)))  # dx only; no adapter took part
    assert not any(g.any() for _, g in layer.named_grads())
    layer.disabled = False
    layer.delete_adapter("style")
    assert layer.active == [] and "lora_A.style.weight" not in layer.state_dict()


def test_model_wide_adapter_and_scale_switches(rng):
    model = UNet2DConditionModel(**TINY_UNET, rng=rng, dtype=np.float64)
    add_lora(model, rank=2, rng=rng)
    add_lora(model, target=("attn2.to_k", "attn2.to_v"), rank=1, adapter_name="ctx", rng=rng)
    _randomize_adapters(model, rng)
    sample, context = rng.standard_normal((B, 4, 4, 3)), rng.standard_normal((B, L, D))
    both = model(sample, 10, context)
    set_lora_scale(model, "ctx", 0.0)
    only_default = model(sample, 10, context)
    set_lora_scale(model, "ctx", 1.0)
    set_lora_adapter(model, "default")
    np.testing.assert_allclose(model(sample, 10, context), only_default, rtol=1e-12, atol=1e-12)
    assert not np.allclose(both, only_default)
    assert len(lora_state_dict(model, "ctx")) == 4 * 2 * 2  # four cross-attentions x to_k, to_v x A, B


def test_disable_lora_gives_the_base_model_bit_for_bit_and_restores(rng):
    model = UNet2DConditionModel(**TINY_UNET, rng=rng)
    sample, context = rng.standard_normal((B, 4, 4, 3)).astype(np.float32), rng.standard_normal((B, L, D))
    base = model(sample, 10, context.astype(np.float32))
    add_lora(model, rank=2, rng=rng)
    _randomize_adapters(model, rng)
    adapted = model(sample, 10, context.astype(np.float32))
    with disable_lora(model) as inside:
        assert inside is model
        np.testing.assert_array_equal(model(sample, 10, context.astype(np.float32)), base)
    np.testing.assert_array_equal(model(sample, 10, context.astype(np.float32)), adapted)
    assert not np.allclose(adapted, base)
    with pytest.raises(ValueError, match="disable_lora"):
        with disable_lora(UNet2DConditionModel(**TINY_UNET, rng=rng)):
            pass


def test_text_encoder_projections_and_glob_targets(rng):
    config = TextEncoderConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=12, max_position_embeddings=8)
    encoder = TextEncoder(config, rng=rng)
    paths = add_lora(encoder, target=TEXT_ENCODER_TARGETS, rank=2)
    assert paths[0] == "text_model.encoder.layers.0.self_attn.q_proj" and len(paths) == 8
    model = UNet2DConditionModel(**TINY_UNET, rng=rng)
    convs = add_lora(model, target="*resnets.*.conv1", rank=2)
    assert convs and all(isinstance(lora_layers(model)[p], LoRAConv2d) for p in convs)


# ---------------------------------------------------------------------------- errors a student understands
def test_errors(rng):
    model = UNet2DConditionModel(**TINY_UNET, rng=rng)
    with pytest.raises(ValueError, match="no module of UNet2DConditionModel matches"):
        add_lora(model, target="to_qq")
    with pytest.raises(ValueError, match="is a GroupNorm; LoRA wraps Linear and Conv2d"):
        add_lora(model, target="norm1")
    with pytest.raises(ValueError, match="has no LoRA layers"):
        merge_lora(model)
    layer = LoRALinear.wrap(nn.Linear(4, 3, rng=rng))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        layer.add_adapter("x", rank=0)
    with pytest.raises(ValueError, match="already has an adapter 'default'"):
        layer.add_adapter("default")
    with pytest.raises(ValueError, match=r"no adapter 'nope'; it has \['default'\]"):
        layer.set_scale("nope", 2.0)
    with pytest.raises(ValueError, match="expects x of shape"):
        layer(np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="LoRALinear wraps a Linear, got Conv2d"):
        LoRALinear(nn.Conv2d(2, 2, 1))
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        layer.backward(np.zeros((2, 3), np.float32))
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    assert ATTENTION_TARGETS == ("to_q", "to_k", "to_v", "to_out.0")


def test_frozen_plain_layers_pass_gradients_through_and_store_none(rng):
    """Module.freeze (what add_lora does to the rest of the model): dx as before, no buffers written."""
    for layer, x in [(nn.Linear(4, 3, rng=rng), rng.standard_normal((2, 4))),
                     (nn.Conv2d(2, 3, 3, padding=1, rng=rng), rng.standard_normal((1, 4, 4, 2))),
                     (nn.GroupNorm(2, 4), rng.standard_normal((1, 3, 3, 4))),
                     (nn.LayerNorm(4), rng.standard_normal((2, 4)))]:
        layer.to(dtype=np.float64)
        y = layer(x)
        dout = rng.standard_normal(y.shape)
        dx = layer.backward(dout)
        layer.freeze()
        assert layer.grads == {} and list(layer.parameters_and_grads()) == []
        layer(x)
        np.testing.assert_array_equal(layer.backward(dout), dx)
    table = nn.Embedding(5, 3).freeze()
    table(np.array([[1, 2]]))
    assert table.backward(np.ones((1, 2, 3), np.float32)) is None and table.grads == {}


# ---------------------------------------------------------------------------- parity with peft (crosscheck)
def _torch_layout(value):
    """Ours -> PyTorch: conv (kh, kw, C_in, C_out) -> (C_out, C_in, kh, kw); Linear as it is."""
    value = np.asarray(value)
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value


def _peft_name(ours: str, lora_paths) -> str:
    """Our parameter name -> peft's inside a model: a frozen base of an adapted layer is ``base_layer``."""
    for path in lora_paths:
        prefix = f"{path}." if path else ""
        rest = ours[len(prefix):]
        if ours.startswith(prefix) and rest in ("weight", "bias"):
            return f"{prefix}base_layer.{rest}"
    return ours


def _copy_into_torch(torch, ours, theirs):
    """Every parameter of ``ours`` (LoRA layers included) into the peft-wrapped torch model."""
    paths = list(lora_layers(ours)) or [""]
    state = {_peft_name(k, paths): torch.tensor(_torch_layout(v).copy()) for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "lora" in k or "base_layer" in k], (missing, unexpected)


def _assert_adapter_grads_match(ours, theirs, lora_paths, rtol=1e-10, atol=1e-12):
    grads = dict(ours.named_grads())
    trained = {name: p for name, p in theirs.named_parameters() if p.requires_grad}
    assert set(trained) == set(grads), (sorted(set(trained) ^ set(grads)))[:6]  # peft trains the adapters only
    for name, p in trained.items():
        ref = p.grad.numpy()
        ref = ref.transpose(2, 3, 1, 0) if ref.ndim == 4 else ref  # PyTorch's conv layout -> ours
        np.testing.assert_allclose(grads[name], ref, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.crosscheck
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # a second adapter, on purpose
def test_lora_layers_match_peft(rng):
    """A Linear with two adapters (one scaled) and a 3x3 stride-2 conv: output, dx and every adapter gradient."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(5, 3)
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)

    theirs = Layers().double()
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=3.0, target_modules=["to_q", "conv"]), theirs)
    peft.inject_adapter_in_model(peft.LoraConfig(r=3, lora_alpha=1.5, target_modules=["to_q"]), theirs,
                                 adapter_name="style")
    theirs.to_q.set_adapter(["default", "style"])
    theirs.to_q.set_scale("style", 0.25)
    theirs.conv.set_adapter(["default"])

    ours = nn.Module()
    ours.to_q = nn.Linear(5, 3, rng=rng, dtype=np.float64)
    ours.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, rng=rng, dtype=np.float64)
    add_lora(ours, target=("to_q", "conv"), rank=2, alpha=3.0, rng=rng)
    add_lora(ours, target="to_q", rank=3, alpha=1.5, adapter_name="style", rng=rng)
    ours.to_q.set_scale("style", 0.25)
    _randomize_adapters(ours, rng)
    _copy_into_torch(torch, ours, theirs)

    x, img = rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 5, 6, 3))
    dy, dz = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 3, 3, 4))
    tx = torch.tensor(x, requires_grad=True)
    timg = torch.tensor(img.transpose(0, 3, 1, 2).copy(), requires_grad=True)
    ty, tz = theirs.to_q(tx), theirs.conv(timg)
    ((ty * torch.tensor(dy)).sum() + (tz * torch.tensor(dz.transpose(0, 3, 1, 2).copy())).sum()).backward()

    ours.zero_grad()
    y, z = ours.to_q(x), ours.conv(img)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(z, tz.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ours.to_q.backward(dy), tx.grad.numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ours.conv.backward(dz), timg.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-12, atol=1e-13)
    _assert_adapter_grads_match(ours, theirs, ["to_q", "conv"])
    # merging as peft does: the same merged weights
    theirs.to_q.merge()
    ours.to_q.merge()
    np.testing.assert_allclose(ours.to_q.weight, theirs.to_q.base_layer.weight.detach().numpy(), rtol=1e-13, atol=1e-15)


@pytest.mark.crosscheck
@pytest.mark.parametrize("targets", [ATTENTION_TARGETS, ("upsamplers.0.conv", "conv1", "time_emb_proj")])
def test_tiny_unet_with_lora_matches_diffusers_add_adapter(targets):
    """diffusers' UNet2DConditionModel.add_adapter(LoraConfig) against add_lora, float64, every adapter gradient;
    on attention, and on convolutions (LCM-LoRA's upsampler conv among them) and time embeddings."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from fixtures.cases_unet import TINY_UNET as DIFFUSERS_TINY
    from fixtures.cases_unet import weights_for

    rng = np.random.default_rng(8)
    theirs = diffusers.UNet2DConditionModel(**DIFFUSERS_TINY).double().eval()
    ours = UNet2DConditionModel(**DIFFUSERS_TINY, dtype=np.float64)
    ours.load_state_dict(weights_for({k: tuple(v.shape) for k, v in ours.state_dict().items()}))
    paths = add_lora(ours, target=targets, rank=4, alpha=8.0, rng=rng)
    _randomize_adapters(ours, rng, 0.2)
    theirs.add_adapter(peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=list(targets)))
    _copy_into_torch(torch, ours, theirs)

    x = rng.standard_normal((2, 8, 8, 4))
    ctx = rng.standard_normal((2, 4, 32))
    dout = rng.standard_normal((2, 8, 8, 4))
    tx = torch.tensor(x.transpose(0, 3, 1, 2).copy(), requires_grad=True)
    tctx = torch.tensor(ctx, requires_grad=True)
    tout = theirs(tx, torch.tensor([500]), tctx).sample
    (tout * torch.tensor(dout.transpose(0, 3, 1, 2).copy())).sum().backward()

    # Both libraries compute the sinusoidal timestep embedding in float32 (diffusers' Timesteps), with
    # different sin/cos roundings: the float64 U-Nets without LoRA already differ by ~1e-9 (measured),
    # so the tolerance here is 1e-7, while the layers alone (test_lora_layers_match_peft) agree to 1e-12.
    ours.zero_grad()
    np.testing.assert_allclose(ours(x, 500, ctx), tout.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-7, atol=1e-8)
    g = ours.backward(dout)
    dx, dctx = g.dx, g.dcontext
    np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(dctx, tctx.grad.numpy(), rtol=1e-7, atol=1e-8)
    _assert_adapter_grads_match(ours, theirs, paths, rtol=1e-7, atol=1e-8)
