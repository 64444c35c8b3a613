"""LoRA files (diffusion_np/io/lora.py): the diffusers/peft and kohya layouts, written by our own code
(and, under crosscheck, by diffusers/peft) and read back into a U-Net and a text encoder."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffusion_np.io.diffusers import WeightsError
from diffusion_np.io.lora import LORA_WEIGHT_NAME, load_lora, load_lora_weights, read_lora, save_lora
from diffusion_np.models.text_encoder import TextEncoder, TextEncoderConfig
from diffusion_np.models.unet import UNet2DConditionModel
from diffusion_np.nn.lora import TEXT_ENCODER_TARGETS, add_lora, lora_layers

D = 6
TINY_UNET = dict(
    in_channels=3, out_channels=2, block_out_channels=(4, 8), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=D, attention_head_dim=2, norm_num_groups=2,
)
TEXT = TextEncoderConfig(vocab_size=50, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=12, max_position_embeddings=8)


def _models(seed=0):
    rng = np.random.default_rng(seed)
    return UNet2DConditionModel(**TINY_UNET, rng=rng), TextEncoder(TEXT, rng=rng)


def _trained(rng):
    """A U-Net and a text encoder with non-zero adapters: rank 2 alpha 4 on attention, rank 3 alpha 1
    on two resnet convs (3x3), rank 1 on the text encoder's projections."""
    unet, text = _models()
    add_lora(unet, rank=2, alpha=4.0)
    add_lora(unet, target="down_blocks.0.resnets.0.conv*", rank=3, alpha=1.0)
    add_lora(text, target=TEXT_ENCODER_TARGETS, rank=1, alpha=0.5)
    for model in (unet, text):
        for _, p, _ in model.parameters_and_grads():
            p[...] = 0.3 * rng.standard_normal(p.shape)
    return unet, text


def _outputs(unet, text, rng=None):
    rng = rng or np.random.default_rng(3)
    x = rng.standard_normal((1, 4, 4, 3)).astype(np.float32)
    ids = np.array([[0, 5, 7, 2]])
    context = text(ids)
    return unet(x, 10, context), context


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_save_then_load_gives_the_same_models(tmp_path, layout):
    rng = np.random.default_rng(0)
    unet, text = _trained(rng)
    expected = _outputs(unet, text)
    file = save_lora(tmp_path, unet=unet, text_encoder=text, layout=layout)
    assert file.name == LORA_WEIGHT_NAME
    keys = set(load_file(str(file)))
    if layout == "diffusers":
        assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
        assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    fresh_unet, fresh_text = _models()
    done = load_lora(tmp_path, unet=fresh_unet, text_encoder=fresh_text)
    assert sorted(done["unet"]) == sorted(lora_layers(unet)) and len(done["text_encoder"]) == 8
    conv = lora_layers(fresh_unet)["down_blocks.0.resnets.0.conv1"]
    assert conv.ranks["default"] == 3 and conv.alphas["default"] == 1.0
    for ours, theirs in zip(_outputs(fresh_unet, fresh_text), expected):
        np.testing.assert_array_equal(ours, theirs)
    # only the adapters are in the file, and the base stays as it was
    assert not any(".lora_" not in k and not k.endswith(".alpha") for k in keys)


def test_diffusers_metadata_carries_the_alphas(tmp_path):
    unet, text = _trained(np.random.default_rng(1))
    file = save_lora(tmp_path / "x.safetensors", unet=unet, layout="diffusers")
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    config = json.loads(header["__metadata__"]["lora_adapter_metadata"])
    assert config["unet.r"] == 2 and config["unet.lora_alpha"] == 4.0
    assert config["unet.alpha_pattern"] == {"down_blocks.0.resnets.0.conv1": 1.0, "down_blocks.0.resnets.0.conv2": 1.0}
    parts, layout = read_lora(file)
    assert layout == "diffusers" and parts["text_encoder"] == {}
    assert parts["unet"]["down_blocks.0.resnets.0.conv1"].alpha == 1.0
    assert parts["unet"]["down_blocks.0.resnets.0.conv1"].down.shape == (3, 4, 3, 3)  # PyTorch's (r, C_in, kh, kw)


def test_older_diffusers_names_and_float16(tmp_path):
    """``lora.down``/``lora.up``, attention processors and ``lora_linear_layer``; no metadata: alpha = r."""
    unet, text = _trained(np.random.default_rng(2))
    for model in (unet, text):
        for layer in lora_layers(model).values():
            layer.alphas["default"] = float(layer.ranks["default"])  # what a file without alphas means
    expected = _outputs(unet, text)
    new = load_file(str(save_lora(tmp_path / "new.safetensors", unet=unet, text_encoder=text)))
    old = {}
    for key, value in new.items():
        key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        if ".attn1.to_" in key and key.startswith("unet."):
            key = key.replace(".attn1.to_out.0.lora.", ".attn1.processor.to_out_lora.")
            for p in "qkv":
                key = key.replace(f".attn1.to_{p}.lora.", f".attn1.processor.to_{p}_lora.")
        if key.startswith("text_encoder."):
            key = key.replace(".lora.", ".lora_linear_layer.")
        if key.startswith("unet."):
            key = key[len("unet."):]  # the oldest files have no component prefix
        old[key] = value.astype(np.float16)
    assert any(".processor.to_out_lora.down.weight" in k for k in old)
    save_file(old, str(tmp_path / "old.safetensors"))
    fresh = _models()
    load_lora(tmp_path / "old.safetensors", unet=fresh[0], text_encoder=fresh[1])
    for ours, theirs in zip(_outputs(*fresh), expected):
        np.testing.assert_allclose(ours, theirs, rtol=2e-2, atol=2e-3)  # float16 adapters


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_text_encoder_names_without_text_model_load_as_with_it(tmp_path, layout):
    """transformers 5's CLIPTextModel has no ``text_model`` submodule, so diffusers' ``save_lora_weights`` writes
    ``text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight``: the same layers as the ``text_model.``
    names (kohya's ``lora_te_encoder_layers_0_...`` too), with the metadata's alphas."""
    unet, text = _trained(np.random.default_rng(5))
    expected = _outputs(unet, text)
    file = save_lora(tmp_path / "ours.safetensors", unet=unet, text_encoder=text, layout=layout)
    with open(file, "rb") as f:
        metadata = json.loads(f.read(int.from_bytes(f.read(8), "little"))).get("__metadata__")
    old = "text_encoder.text_model." if layout == "diffusers" else "lora_te_text_model_"
    new = "text_encoder." if layout == "diffusers" else "lora_te_"
    flat = {k.replace(old, new): v for k, v in load_file(str(file)).items()}
    assert sum(k.startswith(new + ("encoder." if layout == "diffusers" else "encoder_")) for k in flat) >= 16
    save_file(flat, str(tmp_path / "flat.safetensors"), metadata=metadata)
    paths = sorted(p if layout == "diffusers" else p.replace(".", "_") for p in lora_layers(text))  # kohya's: flat
    assert sorted(read_lora(tmp_path / "flat.safetensors")[0]["text_encoder"]) == paths
    fresh = _models()
    done = load_lora(tmp_path / "flat.safetensors", unet=fresh[0], text_encoder=fresh[1])
    assert sorted(done["text_encoder"]) == sorted(lora_layers(text))
    assert {layer.alphas["default"] for layer in lora_layers(fresh[1]).values()} == {0.5}
    for ours, theirs in zip(_outputs(*fresh), expected):
        np.testing.assert_array_equal(ours, theirs)


def test_two_files_as_two_adapters_with_scales(tmp_path):
    unet, text = _trained(np.random.default_rng(4))
    save_lora(tmp_path / "a.safetensors", unet=unet)
    fresh_unet, fresh_text = _models()
    base_out, context = _outputs(fresh_unet, fresh_text)
    load_lora(tmp_path / "a.safetensors", unet=fresh_unet, adapter_name="a", scale=0.0)
    np.testing.assert_allclose(_outputs(fresh_unet, fresh_text)[0], base_out, rtol=1e-6, atol=1e-6)
    load_lora(tmp_path / "a.safetensors", unet=fresh_unet, adapter_name="b", scale=1.0)
    out_b = _outputs(fresh_unet, fresh_text)[0]
    unet_text = _models()[1]  # the text encoder without its adapters, as fresh_text
    np.testing.assert_allclose(out_b, unet(np.random.default_rng(3).standard_normal((1, 4, 4, 3)).astype(np.float32),
                                           10, unet_text(np.array([[0, 5, 7, 2]]))), rtol=1e-5, atol=1e-6)


class _Pipe:
    def __init__(self, unet, text_encoder):
        self.unet, self.text_encoder = unet, text_encoder


def test_load_lora_weights_into_a_pipeline(tmp_path):
    unet, text = _trained(np.random.default_rng(5))
    save_lora(tmp_path, unet=unet, text_encoder=text, layout="kohya")
    pipe = _Pipe(*_models())
    done = load_lora_weights(pipe, tmp_path / LORA_WEIGHT_NAME, scale=0.5)
    assert lora_layers(pipe.unet)[done["unet"][0]].scales["default"] == 0.5


def test_problems_are_listed_in_one_error(tmp_path):
    unet, text = _trained(np.random.default_rng(6))
    file = save_lora(tmp_path / "l.safetensors", unet=unet, text_encoder=text)
    small_unet = UNet2DConditionModel(**{**TINY_UNET, "block_out_channels": (4, 4)})
    with pytest.raises(WeightsError, match="no text_encoder was given") as info:
        load_lora(file, unet=small_unet)
    assert "do not fit the layer" in str(info.value)
    assert lora_layers(small_unet) == {}  # nothing was changed
    tensors = load_file(str(file))
    tensors["unet.mid_block.attentions.0.transformer_blocks.0.attn9.to_q.lora_A.weight"] = np.zeros((2, 8), np.float32)
    tensors["unet.mid_block.attentions.0.transformer_blocks.0.attn9.to_q.lora_B.weight"] = np.zeros((8, 2), np.float32)
    tensors["unet.something.else"] = np.zeros(1, np.float32)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match="of no LoRA layout this reader knows: unet.something.else"):
        read_lora(tmp_path / "bad.safetensors")
    del tensors["unet.something.else"]
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match=r"no Linear or Conv2d layer mid_block\.\S*\.attn9\.to_q"):
        load_lora(tmp_path / "bad.safetensors", *_models())
    save_file({"lora_te2_x.lora_down.weight": np.zeros((1, 1), np.float32)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(WeightsError, match="SDXL is not supported"):
        read_lora(tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match="layout must be 'diffusers' or 'kohya'"):
        save_lora(tmp_path, unet=unet, layout="a1111")


# ---------------------------------------------------------------------------- files diffusers writes and reads
def _diffusers_pair(torch, diffusers):
    """A tiny diffusers U-Net and ours with the same base weights (float32)."""
    from fixtures.cases_unet import TINY_UNET as DIFFUSERS_TINY
    from fixtures.cases_unet import torch_layout, weights_for

    ours = UNet2DConditionModel(**DIFFUSERS_TINY)
    weights = weights_for({k: tuple(v.shape) for k, v in ours.state_dict().items()})
    ours.load_state_dict(weights)
    theirs = diffusers.UNet2DConditionModel(**DIFFUSERS_TINY).eval()
    theirs.load_state_dict({k: torch.tensor(torch_layout(k, v)) for k, v in weights.items()})
    return ours, theirs


def _both_outputs(torch, ours, theirs):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 4, 32)).astype(np.float32)
    with torch.no_grad():
        ref = theirs(torch.tensor(x.transpose(0, 3, 1, 2).copy()), torch.tensor([300]), torch.tensor(ctx)).sample
    return ours(x, 300, ctx), ref.numpy().transpose(0, 2, 3, 1)


@pytest.mark.crosscheck
def test_a_file_diffusers_saved_loads_into_ours(tmp_path):
    """peft adapters (alpha != r, attention and the 1x1 proj_in convs) saved by diffusers' save_lora_weights."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    ours, theirs = _diffusers_pair(torch, diffusers)
    config = peft.LoraConfig(r=4, lora_alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"])
    theirs.add_adapter(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(theirs),
        unet_lora_adapter_metadata=theirs.peft_config["default"].to_dict())
    parts, layout = read_lora(tmp_path)
    assert layout == "diffusers" and {t.alpha for t in parts["unet"].values()} == {2.0}
    done = load_lora(tmp_path, unet=ours)
    assert any(p.endswith("proj_in") for p in done["unet"]) and len(done["unet"]) == 4 * 2 * 4 + 4
    out, ref = _both_outputs(torch, ours, theirs)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.crosscheck
def test_a_file_we_save_loads_into_diffusers(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    ours, theirs = _diffusers_pair(torch, diffusers)
    rng = np.random.default_rng(10)
    add_lora(ours, rank=2, alpha=6.0)
    add_lora(ours, target="down_blocks.0.resnets.0.conv1", rank=3, alpha=1.0)  # a 3x3 conv, its own rank and alpha
    for _, p, _ in ours.parameters_and_grads():
        p[...] = 0.2 * rng.standard_normal(p.shape)
    save_lora(tmp_path, unet=ours)
    theirs.load_lora_adapter(str(tmp_path), prefix="unet", weight_name=LORA_WEIGHT_NAME)
    out, ref = _both_outputs(torch, ours, theirs)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)
