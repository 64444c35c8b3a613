"""Loading real Stable Diffusion weights: diffusers folders, original single files, and parity.

The tiny SD in ``tests/fixtures/tiny_sd/`` (U-Net float32, VAE float16, text encoder bfloat16)
and ``tiny_sd_ldm.safetensors`` (the same weights under LDM names, float16) are made by
``fixtures/make_tiny_sd.py`` with diffusers/transformers, which also wrote
``tiny_sd_reference.npz``: their outputs with those weights. "golden" compares with that
file, "live" recomputes it with the installed diffusers (``make crosscheck``).

Chunked attention (``nn/attention.py``'s inference option used by the loader) is tested
here too, because the loader is what turns it on.
"""

import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from diffusion_np.io.diffusers import (
    SCHEDULER_CLASSES,
    SCHEDULER_FIELDS,
    SD1_UNET_CONFIG,
    WeightsError,
    bf16_to_float32,
    convert_tensor,
    load_model,
    load_pipeline,
    load_single_file,
    load_weights,
    read_safetensors,
    sampler_from_config,
)
from diffusion_np.models.unet import UNet2DConditionModel
from diffusion_np.nn.attention import Attention, sdpa_chunked_forward, sdpa_forward, set_attention_chunk_size
from diffusion_np.samplers import DDIMSampler, DPMSolverMultistepSampler, LCMSampler, PNDMSampler, UniPCSampler

FIXTURES = Path(__file__).parents[1] / "fixtures"
TINY_SD = FIXTURES / "tiny_sd"
LDM_FILE = FIXTURES / "tiny_sd_ldm.safetensors"
SOURCES = ["golden", pytest.param("live", marks=pytest.mark.crosscheck)]
PROMPT = "a small red circle in the top left"  # make_tiny_sd.PIPELINE_PROMPT
#: float32 parity bar of the issue: max |ours - diffusers| (measured: about 1e-6)
ATOL = 1e-4


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(TINY_SD, sampler="ddim")


@pytest.fixture(scope="module", params=SOURCES)
def ref(request):
    if request.param == "golden":
        with np.load(FIXTURES / "tiny_sd_reference.npz") as data:
            return {k: data[k] for k in data.files}
    from fixtures.make_tiny_sd import references

    return references()


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - b).max())


# ----------------------------------------------------------------------------- parity
def test_unet_matches_diffusers(pipe, ref):
    out = pipe.unet(ref["unet_sample"], ref["unet_timestep"], ref["unet_context"])
    assert _max_diff(out, ref["unet_out"]) <= ATOL


def test_vae_encode_decode_match_diffusers(pipe, ref):
    posterior = pipe.vae.encode(ref["vae_image"])
    assert _max_diff(posterior.mean, ref["vae_mean"]) <= ATOL
    assert _max_diff(posterior.logvar, ref["vae_logvar"]) <= ATOL
    assert _max_diff(pipe.vae.decode(ref["vae_latent"]), ref["vae_decoded"]) <= ATOL


def test_text_encoder_and_tokenizer_match_transformers(pipe, ref):
    ids, _ = pipe.tokenizer.encode([PROMPT, ""])
    np.testing.assert_array_equal(ids, ref["text_ids"])
    assert _max_diff(pipe.text_encoder(ids), ref["text_hidden"]) <= ATOL


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_text_to_image_matches_stable_diffusion_pipeline(ref, sampler):
    """The whole StableDiffusionPipeline: tokenizer, text encoder, 4 guided steps (w = 7.5) of the
    sampler built from the folder's PNDM config as diffusers' from_config does, VAE decode.
    Images in [0, 1] (output_type="np"); tolerance 1e-4 (measured about 1e-6)."""
    pipeline = load_pipeline(TINY_SD, sampler=sampler)
    out = pipeline(PROMPT, guidance_scale=7.5, num_inference_steps=4, noise=ref["pipeline_latents"], progress=False)
    assert _max_diff((out.images + 1.0) / 2.0, ref[f"pipeline_{sampler}_images"]) <= ATOL


def test_sampler_follows_the_sd_scheduler_config(pipe):
    """SD 1.5's PNDM config read into DDIM: scaled_linear, steps_offset 1, no clipping, alpha_bar_prev = ab[0]."""
    s = pipe.sampler
    assert isinstance(s, DDIMSampler) and not s.clip_sample and not s.set_alpha_to_one and s.steps_offset == 1
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [751, 501, 251, 1]  # leading spacing + offset, as diffusers
    assert abs(s.alpha_bar[0] - 0.99915) < 1e-5


# ----------------------------------------------------------------------------- single file
def test_single_file_gives_the_folder_weights(pipe):
    """The LDM-named float16 file loads to the folder's weights rounded to float16, exactly."""
    single = load_single_file(LDM_FILE, config=TINY_SD, sampler="ddim")
    for component in ("unet", "vae", "text_encoder"):
        ours = dict(getattr(single, component).named_parameters())
        folder = dict(getattr(pipe, component).named_parameters())
        assert ours.keys() == folder.keys()
        for name, value in folder.items():
            np.testing.assert_array_equal(ours[name], value.astype(np.float16).astype(np.float32), err_msg=name)


@pytest.mark.crosscheck
def test_fixture_ldm_names_are_what_diffusers_converts():
    """diffusers' own converters map the fixture's LDM file back to the folder's state dicts, so the
    file uses the real LDM names (checked independently of our map)."""
    import torch
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import load_file

    ldm = load_file(str(LDM_FILE))
    configs = {c: json.loads((TINY_SD / c / "config.json").read_text()) for c in ("unet", "vae")}
    converted = {
        "unet": convert_ldm_unet_checkpoint(ldm, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(ldm, configs["vae"]),
        "text_encoder": convert_ldm_clip_checkpoint(ldm),
    }
    converted["text_encoder"].pop("text_model.embeddings.position_ids")
    for component, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                            ("text_encoder", "model")):
        folder = load_file(str(TINY_SD / component / f"{stem}.safetensors"))
        if component == "text_encoder":  # transformers 5 saves CLIP without the text_model. prefix
            folder = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in folder.items()}
        assert converted[component].keys() == folder.keys(), component
        for key, value in folder.items():
            assert torch.equal(converted[component][key], value.to(torch.float16)), key


def test_single_file_with_other_configs_lists_every_misfit(tmp_path):
    """Configs that do not describe the file (as SD 1.5's would not describe the tiny one): ONE
    error names the mis-shaped and missing keys of every model."""
    root = _copy_folder(tmp_path)
    edits = {"unet": {"block_out_channels": [8, 16, 16, 32], "layers_per_block": 1},
             "vae": {"latent_channels": 8}, "text_encoder": {"intermediate_size": 24}}
    for component, edit in edits.items():
        config = json.loads((root / component / "config.json").read_text())
        (root / component / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(WeightsError) as info:
        load_single_file(LDM_FILE, config=root)
    message = str(info.value)
    assert "checkpoint: " in message  # layers_per_block=1: LDM blocks that the smaller U-Net lacks
    for part in ("unet: ", "vae: ", "text_encoder: ", "mis-shaped", "missing"):
        assert part in message


def test_single_file_needs_a_tokenizer(tmp_path):
    shutil.copy(LDM_FILE, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="holds no vocabulary"):
        load_single_file(tmp_path / "model.safetensors")


def test_ema_weights_are_preferred(tmp_path):
    """A file with model_ema.* copies (LDM's dot-less names) loads those into the U-Net."""
    from safetensors.numpy import save_file

    state = {k: np.asarray(v) for k, v in read_safetensors(LDM_FILE).items()}
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    for k in unet_keys:
        state["model_ema.diffusion_model" + k[len("model.diffusion_model."):].replace(".", "")] = state[k] * 2
    save_file(state, str(tmp_path / "ema.safetensors"))
    ema = load_single_file(tmp_path / "ema.safetensors", config=TINY_SD)
    raw = load_single_file(tmp_path / "ema.safetensors", config=TINY_SD, use_ema=False)
    np.testing.assert_array_equal(ema.unet.conv_in.weight, 2 * raw.unet.conv_in.weight)


# ----------------------------------------------------------------------------- conversions
def test_bf16_is_the_top_half_of_float32():
    bits = np.array([0x3F80, 0xC000, 0x3E20, 0x4049, 0x7F80, 0x8000, 0x0001], dtype=np.uint16)
    values = np.array([1.0, -2.0, 0.15625, 3.140625, np.inf, -0.0, 2.0**-133], dtype=np.float32)
    np.testing.assert_array_equal(bf16_to_float32(bits), values)  # 0x0001: the smallest subnormal
    assert np.signbit(bf16_to_float32(bits))[5]
    assert np.isnan(bf16_to_float32(np.array([0x7FC0], dtype=np.uint16)))[0]
    with pytest.raises(TypeError, match="uint16"):
        bf16_to_float32(values)


def _write_safetensors(path, tensors: dict) -> None:
    """A safetensors file by hand: {name: (dtype name, shape, raw bytes)}."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_read_safetensors_dtypes(tmp_path):
    f16 = np.array([[1.5, -2.25]], dtype="<f2")
    bf16 = (np.array([0.5, 4.0, -8.0], dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
    _write_safetensors(tmp_path / "w.safetensors", {
        "half": ("F16", (1, 2), f16.tobytes()), "brain": ("BF16", (3,), bf16.tobytes()),
        "ids": ("I64", (2,), np.array([3, 4], dtype="<i8").tobytes()),
    })
    t = read_safetensors(tmp_path / "w.safetensors")
    assert t["half"].dtype == np.float16 and t["half"].tolist() == [[1.5, -2.25]]
    assert t["brain"].dtype == np.float32 and t["brain"].tolist() == [0.5, 4.0, -8.0]
    assert t["ids"].tolist() == [3, 4]


def test_read_safetensors_refuses_damage_and_unknown_dtypes(tmp_path):
    _write_safetensors(tmp_path / "bad.safetensors", {"w": ("F32", (4,), b"\0" * 8)})
    with pytest.raises(WeightsError, match="damaged"):
        read_safetensors(tmp_path / "bad.safetensors")
    _write_safetensors(tmp_path / "f8.safetensors", {"w": ("F8_E4M3", (2,), b"\0\0")})
    with pytest.raises(WeightsError, match="F8_E4M3"):
        read_safetensors(tmp_path / "f8.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\0\0\0\0\0\0\0{nope")
    with pytest.raises(WeightsError, match="not JSON"):
        read_safetensors(tmp_path / "junk.safetensors")


def test_convert_tensor_layouts():
    conv = np.arange(2 * 3 * 5 * 7, dtype=np.float16).reshape(2, 3, 5, 7)  # (C_out, C_in, kh, kw)
    ours = convert_tensor(conv, (5, 7, 3, 2))
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours[4, 6, 2, 1], conv[1, 2, 4, 6])
    one_by_one = np.ones((4, 3, 1, 1))
    assert convert_tensor(one_by_one, (4, 3)).shape == (4, 3)  # a 1x1 conv into a Linear
    assert convert_tensor(np.ones((4, 3)), (3, 4)) is None  # mis-shaped: the caller lists it


# ----------------------------------------------------------------------------- legacy and odd files
def _copy_folder(tmp_path) -> Path:
    root = tmp_path / "sd"
    shutil.copytree(TINY_SD, root)
    return root


def _rewrite(root: Path, component: str, edit) -> None:
    from safetensors.numpy import save_file

    stem = "model" if component == "text_encoder" else "diffusion_pytorch_model"
    path = root / component / f"{stem}.safetensors"
    state = {k: np.array(v) for k, v in read_safetensors(path).items()}
    save_file(edit(state), str(path))


def test_legacy_vae_attention_names_and_conv_shapes(tmp_path, pipe):
    """Old VAE files: query/key/value/proj_attn, and q/k/v as (C, C, 1, 1) 1x1 convs."""
    root = _copy_folder(tmp_path)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def edit(state):
        out = {}
        for key, value in state.items():
            for new, old in legacy.items():
                if f".attentions.0.{new}." in key:
                    key = key.replace(f".{new}.", f".{old}.")
                    value = value[:, :, None, None] if value.ndim == 2 else value
            out[key] = value
        return out

    _rewrite(root, "vae", edit)
    loaded = load_pipeline(root, sampler="ddim")
    for name, value in pipe.vae.named_parameters():
        np.testing.assert_array_equal(dict(loaded.vae.named_parameters())[name], value)


def test_downsample_conv2d_0_alias_and_both_text_key_spellings(tmp_path, pipe):
    """diffusers' Downsample2D may also store its conv as Conv2d_0 (dropped). transformers 5 writes
    CLIP keys without ``text_model.`` (the fixture folder), older files with it (rewritten here)."""
    root = _copy_folder(tmp_path)

    def add_alias(state):
        extra = {k.replace(".conv.", ".Conv2d_0."): v for k, v in state.items() if "downsamplers.0.conv." in k}
        return {**state, **extra}

    _rewrite(root, "unet", add_alias)
    assert not any(k.startswith("text_model.") for k in read_safetensors(root / "text_encoder" / "model.safetensors"))
    _rewrite(root, "text_encoder", lambda s: {"text_model." + k: v for k, v in s.items()})
    loaded = load_pipeline(root, sampler="ddim")
    np.testing.assert_array_equal(loaded.text_encoder.text_model.final_layer_norm.weight,
                                  pipe.text_encoder.text_model.final_layer_norm.weight)


def test_one_error_lists_every_problem(tmp_path):
    root = _copy_folder(tmp_path)

    def break_unet(state):
        state.pop("conv_in.bias")
        state["conv_in.extra"] = np.zeros(3, np.float32)
        state["conv_out.weight"] = np.zeros((4, 8, 5, 5), np.float32)
        return state

    _rewrite(root, "unet", break_unet)
    _rewrite(root, "vae", lambda s: {k: v for k, v in s.items() if k != "quant_conv.bias"})
    with pytest.raises(WeightsError) as info:
        load_pipeline(root, sampler="ddim")
    message = str(info.value)
    assert "unet: 1 missing key(s): conv_in.bias" in message
    assert "unet: 1 unexpected key(s): conv_in.extra" in message
    assert "conv_out.weight: file has (4, 8, 5, 5), the model expects (4, 8, 3, 3)" in message
    assert "vae: 1 missing key(s): quant_conv.bias" in message


def test_pickles_are_refused(tmp_path):
    root = _copy_folder(tmp_path)
    (root / "unet" / "diffusion_pytorch_model.safetensors").rename(root / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="unpickling executes arbitrary code"):
        load_pipeline(root, sampler="ddim")
    with pytest.raises(WeightsError, match="pickle-based file"):
        load_single_file(tmp_path / "v1-5-pruned-emaonly.ckpt")


def test_variant_files(tmp_path):
    root = _copy_folder(tmp_path)
    (root / "unet" / "diffusion_pytorch_model.safetensors").rename(
        root / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    load_pipeline(root, sampler="ddim")  # the only weights file there
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.fp16.safetensors is missing"):
        load_pipeline(root, sampler="ddim", variant="fp16")  # the VAE has no fp16 file


def test_gradient_buffers_are_not_allocated_unless_asked():
    lean = load_pipeline(TINY_SD, sampler="ddim")
    g = lean.unet.conv_in.grads["weight"]
    assert g.strides == (0, 0, 0, 0) and not g.flags.writeable  # a broadcast zero: no memory
    full = load_pipeline(TINY_SD, sampler="ddim", keep_grads=True)
    assert full.unet.conv_in.grads["weight"].flags.writeable


def test_load_weights_from_a_torch_layout_dict(pipe):
    unet = UNet2DConditionModel.from_config(json.loads((TINY_SD / "unet" / "config.json").read_text()))
    state = {k: np.array(v) for k, v in read_safetensors(TINY_SD / "unet" / "diffusion_pytorch_model.safetensors")
             .items()}
    load_weights(unet, state, "unet")
    np.testing.assert_array_equal(unet.conv_out.weight, pipe.unet.conv_out.weight)
    with pytest.raises(ValueError, match="component must be one of"):
        load_weights(unet, state, "clip")


# ----------------------------------------------------------------------------- configs
def test_scheduler_config_mapping():
    from fixtures.make_tiny_sd import SD15_SCHEDULER

    sd15 = {"_class_name": "PNDMScheduler", **SD15_SCHEDULER}
    pndm = sampler_from_config(None, sd15)  # SD 1.5's own scheduler: PLMS, steps_offset 1, alpha_bar_prev = ab[0]
    assert isinstance(pndm, PNDMSampler) and pndm.skip_prk_steps and pndm.steps_offset == 1
    assert not pndm.set_alpha_to_one
    unipc = sampler_from_config(None, {"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2",
                                       "disable_corrector": [], "predict_x0": True, "time_shift_type": "exponential",
                                       "shift_terminal": None, "beta_schedule": "scaled_linear"})
    assert isinstance(unipc, UniPCSampler) and unipc.solver_type == "bh2"
    with pytest.raises(WeightsError, match="predict_x0=False"):
        sampler_from_config(None, {"_class_name": "UniPCMultistepScheduler", "predict_x0": False})
    lcm = sampler_from_config(None, {"_class_name": "LCMScheduler", "original_inference_steps": 40,
                                     "timestep_scaling": 5.0, "set_alpha_to_one": True})
    assert isinstance(lcm, LCMSampler) and lcm.original_inference_steps == 40 and lcm.timestep_scaling == 5.0
    with pytest.raises(WeightsError, match="TCDScheduler, which diffusion_np does not implement"):
        sampler_from_config(None, {"_class_name": "TCDScheduler"})
    dpm = sampler_from_config("dpm++", sd15)
    assert isinstance(dpm, DPMSolverMultistepSampler) and dpm.steps_offset == 1
    own = sampler_from_config(None, {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True,
                                     "beta_schedule": "scaled_linear"})
    assert isinstance(own, DPMSolverMultistepSampler) and own.use_karras_sigmas
    with pytest.raises(WeightsError, match=r"solver_type='heun' \(supported: 'midpoint'\); flux \(unknown field\)"):
        sampler_from_config("dpm++", {"solver_type": "heun", "flux": 1})
    with pytest.raises(WeightsError, match="unknown sampler 'plms'"):
        sampler_from_config("plms", sd15)


def _diffusers_defaults(class_name: str) -> dict:
    """diffusers' default config of ``class_name`` (a tuple in the table lists equivalent values, the default first)."""
    return {k: v[0] if isinstance(v, tuple) else v for k, v in SCHEDULER_FIELDS[class_name].items()}


def test_scheduler_config_of_a_newer_diffusers_loads_at_its_defaults():
    """diffusers 0.42 writes time_shift_type (and other new fields) into every DPM-Solver config: at
    the default it changes nothing and is accepted; another value is refused, naming it."""
    config = {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.42.1",
              **_diffusers_defaults("DPMSolverMultistepScheduler"),
              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    dpm = sampler_from_config(None, config)
    assert isinstance(dpm, DPMSolverMultistepSampler)
    assert isinstance(sampler_from_config("ddim", config), DDIMSampler)  # DPM's own fields dropped for DDIM
    for key, value in [("time_shift_type", "linear"), ("use_flow_sigmas", True), ("solver_type", "heun")]:
        with pytest.raises(WeightsError, match=rf"{key}={value!r} \(supported: "):
            sampler_from_config(None, {**config, key: value})
    with pytest.raises(WeightsError) as info:
        sampler_from_config(None, {**config, "time_shift_type": "linear", "thresholding": True})
    assert "thresholding=True" in str(info.value) and "time_shift_type='linear'" in str(info.value)  # all at once
    with pytest.raises(WeightsError, match=r"shift_terminall \(unknown field\)"):
        sampler_from_config(None, {**config, "shift_terminall": 0.5})


@pytest.mark.parametrize("name", sorted(set(SCHEDULER_CLASSES.values())))
def test_every_sampler_loads_its_own_diffusers_default_config(name):
    theirs = next(k for k, v in SCHEDULER_CLASSES.items() if v == name)
    sampler = sampler_from_config(None, {"_class_name": theirs, **_diffusers_defaults(theirs)})
    assert type(sampler).__name__ == type(sampler_from_config(name, {})).__name__


@pytest.mark.crosscheck
def test_scheduler_fields_are_diffusers_signatures():
    """The table is diffusers' own: every scheduler class's __init__ fields with their defaults."""
    import inspect

    import diffusers

    for class_name in SCHEDULER_FIELDS:
        signature = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        theirs = {k: p.default for k, p in signature.items() if k != "self"}
        assert _diffusers_defaults(class_name) == theirs, class_name


def test_single_file_finds_a_tokenizer_json_only_folder(tmp_path):
    """transformers 5 writes tokenizer/ with only tokenizer.json; load_pipeline and load_single_file
    share one rule and both read it."""
    root = _copy_folder(tmp_path)
    vocab = json.loads((root / "tokenizer" / "vocab.json").read_text())
    lines = (root / "tokenizer" / "merges.txt").read_text().splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    for name in ("vocab.json", "merges.txt"):
        (root / "tokenizer" / name).unlink()
    (root / "tokenizer" / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab,
                                                                              "merges": merges}}))
    folder = load_pipeline(root, sampler="ddim")
    single = load_single_file(LDM_FILE, config=root, sampler="ddim")
    reference = load_pipeline(TINY_SD, sampler="ddim")
    for pipeline in (folder, single):
        np.testing.assert_array_equal(pipeline.tokenizer.encode([PROMPT])[0], reference.tokenizer.encode([PROMPT])[0])
    (root / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(WeightsError, match="no CLIP tokenizer .*tokenizer.json of transformers 5"):
        load_pipeline(root, sampler="ddim")


def _float16_bits(state: dict, dtype: str) -> dict:
    """Every float tensor of ``state`` as safetensors F16 or BF16 (name: (dtype, shape, bytes)), rounded to
    nearest-even as torch's .half() / .bfloat16() do."""
    out = {}
    for name, value in state.items():
        value = np.asarray(value, dtype=np.float32)
        if dtype == "F16":
            raw = value.astype("<f2").tobytes()
        else:
            bits = value.view(np.uint32).astype(np.uint64)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
            raw = bits.astype("<u2").tobytes()
        out[name] = (dtype, value.shape, raw)
    return out


@pytest.mark.parametrize("dtype, atol", [("F16", 2e-3), ("BF16", 2e-2)])
def test_unet_stored_in_float16_or_bfloat16_gives_the_float32_result(tmp_path, pipe, ref, dtype, atol):
    """The tiny SD's U-Net weights written as float16 / bfloat16 load (widened to float32) and give the
    float32 U-Net's output within the rounding of the storage type (float16 keeps 11 significant bits,
    bfloat16 8: relative steps of 5e-4 and 4e-3 per weight)."""
    root = _copy_folder(tmp_path)
    path = root / "unet" / "diffusion_pytorch_model.safetensors"
    _write_safetensors(path, _float16_bits(read_safetensors(path), dtype))
    assert {"F16": np.float16, "BF16": np.float32}[dtype] == next(iter(read_safetensors(path).values())).dtype
    loaded = load_pipeline(root, sampler="ddim")
    assert loaded.unet.conv_in.weight.dtype == np.float32
    args = ref["unet_sample"], ref["unet_timestep"], ref["unet_context"]
    ours, full = loaded.unet(*args), pipe.unet(*args)
    scale = float(np.abs(full).max())
    assert 0 < _max_diff(ours, full) <= atol * scale
    assert _max_diff(ours, ref["unet_out"]) <= atol * scale + ATOL


def test_model_config_errors_name_the_field(tmp_path):
    root = _copy_folder(tmp_path)
    config = json.loads((root / "unet" / "config.json").read_text())
    (root / "unet" / "config.json").write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    with pytest.raises(WeightsError, match="unet config: .*class_embed_type='timestep'"):
        load_pipeline(root, sampler="ddim")
    root = _copy_folder(tmp_path / "b")
    config = json.loads((root / "text_encoder" / "config.json").read_text())
    (root / "text_encoder" / "config.json").write_text(
        json.dumps({**config, "architectures": ["CLIPTextModelWithProjection"]}))
    with pytest.raises(WeightsError, match="CLIPTextModelWithProjection.*not supported"):
        load_pipeline(root, sampler="ddim")


def test_wrong_paths():
    with pytest.raises(WeightsError, match="does not exist"):
        load_pipeline(FIXTURES / "no_such_folder")
    with pytest.raises(WeightsError, match="use load_single_file"):
        load_pipeline(LDM_FILE)
    with pytest.raises(WeightsError, match="use load_pipeline"):
        load_single_file(TINY_SD)
    with pytest.raises(WeightsError, match="only for a single-file checkpoint"):
        load_model(TINY_SD, tokenizer=TINY_SD / "tokenizer")


# ----------------------------------------------------------------------------- command line
def test_cli_sample_with_a_folder_and_a_single_file(tmp_path, capsys):
    from PIL import Image

    from diffusion_np.cli import main

    out = tmp_path / "out.png"
    common = ["--prompt", "a red circle", "--steps", "2", "--height", "32", "--width", "32", "--quiet", "-o", str(out)]
    assert main(["sample", "--model", str(TINY_SD), "--sampler", "ddim", *common]) == 0
    assert Image.open(out).size == (32, 32)
    assert "s/step" in capsys.readouterr().out
    assert main(["sample", "--model", str(TINY_SD), *common]) == 0  # no --sampler: the folder's own PNDM
    assert "PNDMSampler steps" in capsys.readouterr().out
    assert main(["sample", "--model", str(LDM_FILE), "--config", str(TINY_SD), *common]) == 0
    assert main(["sample", "--model", str(LDM_FILE), *common]) == 2  # no tokenizer beside the file
    assert "holds no vocabulary" in capsys.readouterr().err
    assert main(["sample", "--model", str(TINY_SD), "--steps", "1", "-o", str(out)]) == 2  # no --prompt
    assert main(["sample", "--model", str(TINY_SD), "--checkpoint", str(tmp_path), *common]) == 2
    assert main(["sample", *common]) == 2  # neither --model nor --checkpoint


# ----------------------------------------------------------------------------- chunked attention
@pytest.mark.parametrize("N, chunk", [(13, 1), (13, 4), (13, 13), (13, 20), (64, 7)])
def test_chunked_sdpa_equals_unchunked(N, chunk):
    rng = np.random.default_rng(N + chunk)
    q = rng.standard_normal((2, 3, N, 5)).astype(np.float32)
    k = rng.standard_normal((2, 3, 11, 5)).astype(np.float32)
    v = rng.standard_normal((2, 3, 11, 6)).astype(np.float32)
    full, _ = sdpa_forward(q, k, v)
    np.testing.assert_allclose(sdpa_chunked_forward(q, k, v, chunk_size=chunk), full, atol=1e-6, rtol=1e-6)
    masks = [rng.standard_normal((N, 11)).astype(np.float32),  # additive, one row per query
             rng.random((2, 1, 1, 11)) > 0.3]  # boolean, broadcast over the queries
    masks[1][..., 0] = True
    for mask in masks:
        full, _ = sdpa_forward(q, k, v, mask=mask)
        np.testing.assert_allclose(sdpa_chunked_forward(q, k, v, mask=mask, chunk_size=chunk), full,
                                   atol=1e-6, rtol=1e-6)


def test_chunked_attention_layer_is_forward_only():
    rng = np.random.default_rng(0)
    layer = Attention(8, heads=2, dim_head=4, rng=rng)
    x = rng.standard_normal((2, 9, 8)).astype(np.float32)
    full = layer(x)
    layer.chunk_size = 4
    np.testing.assert_allclose(layer(x), full, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="chunked or edited forward"):
        layer.backward(np.ones_like(full))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        sdpa_chunked_forward(x[:, None], x[:, None], x[:, None], chunk_size=0)


def test_chunked_unet_gives_the_same_output(pipe, ref):
    unet = pipe.unet
    count = set_attention_chunk_size(unet, None)
    assert count == 2 * (3 * 2 + 1 + 3 * 3)  # attn1 and attn2 of 16 transformers: 3 levels x 2 down, mid, 3 x 3 up
    full = unet(ref["unet_sample"], ref["unet_timestep"], ref["unet_context"])
    set_attention_chunk_size(unet, 5)
    chunked = unet(ref["unet_sample"], ref["unet_timestep"], ref["unet_context"])
    set_attention_chunk_size(unet, 1024)
    np.testing.assert_allclose(chunked, full, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="positive int or None"):
        set_attention_chunk_size(unet, -1)


# ----------------------------------------------------------------------------- SD 1.5 itself
@pytest.mark.slow
@pytest.mark.crosscheck
def test_sd15_unet_one_step_on_a_64x64_latent_matches_diffusers():
    """The SD 1.5 U-Net config (320/640/1280/1280, 8 heads, cross_attention_dim 768) with diffusers'
    random init: one step on a 64x64 latent (a 512x512 image), batch 1, float32."""
    import resource

    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from diffusion_np.io.diffusers import _NoInit, _release_gradients

    start = time.perf_counter()
    # ours first, its gradient buffers dropped at once, so that two models (6.8 GB), not three, share memory
    ours = UNet2DConditionModel.from_config(SD1_UNET_CONFIG, rng=_NoInit())  # zeros: the weights come next
    _release_gradients(ours)
    set_attention_chunk_size(ours, 1024)
    torch.manual_seed(0)
    theirs = TorchUNet(**SD1_UNET_CONFIG).eval()
    load_weights(ours, {k: v.numpy() for k, v in theirs.state_dict().items()}, "unet", keep_grads=False)
    built = time.perf_counter()

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((1, 64, 64, 4)).astype(np.float32)
    context = rng.standard_normal((1, 77, 768)).astype(np.float32)
    t0 = time.perf_counter()
    out = ours(latent, np.array([500]), context)
    t1 = time.perf_counter()
    with torch.no_grad():
        expected = theirs(torch.from_numpy(latent.transpose(0, 3, 1, 2).copy()), 500,
                          torch.from_numpy(context)).sample.numpy().transpose(0, 2, 3, 1)
    t2 = time.perf_counter()
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    diff = _max_diff(out, expected)
    print(f"\nSD 1.5 U-Net, 64x64 latent, batch 1: max |ours - diffusers| = {diff:.2e} (|out| max "
          f"{np.abs(expected).max():.2f}); build+load {built - start:.1f} s, ours {t1 - t0:.1f} s, "
          f"diffusers {t2 - t1:.1f} s, peak RSS {peak_gib:.1f} GiB")
    # float32 through 860M parameters and ~70 layers: rounding differences grow with depth
    assert diff <= 1e-3


@pytest.mark.parametrize("cls", ["DDIMScheduler", "EulerDiscreteScheduler", "PNDMScheduler"])
def test_the_loader_refuses_an_invalid_timestep_spacing_when_it_loads(cls):
    # it used to pass the constructor and the loader and fail only at the first set_timesteps
    with pytest.raises((ValueError, WeightsError), match="timestep_spacing must be one of"):
        sampler_from_config(None, {"_class_name": cls, "timestep_spacing": "uniform"})
