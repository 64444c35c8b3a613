"""`sample --model ... --lora FILE[:SCALE]`: LoRA files on a Stable Diffusion pipeline from the command line."""

from pathlib import Path

import numpy as np
import pytest
from helpers import one_error_line
from safetensors.numpy import load_file, save_file

from diffusion_np.cli import main
from diffusion_np.io import load_lora_weights, load_pipeline
from diffusion_np.io.lora import LORA_WEIGHT_NAME, parse_lora_spec, save_lora
from diffusion_np.nn.lora import ATTENTION_TARGETS, TEXT_ENCODER_TARGETS, add_lora, lora_layers
from diffusion_np.pipelines.image_io import load_image

TINY_SD = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_sd"
COMMON = ["--prompt", "a red circle", "--steps", "2", "--height", "32", "--width", "32", "--sampler", "ddim",
          "--quiet"]


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A LoRA for the tiny SD fixture on the U-Net's attention and the text encoder, B moved off zero."""
    pipe = load_pipeline(TINY_SD, sampler="ddim")
    add_lora(pipe.unet, rank=2, alpha=4.0, rng=np.random.default_rng(0))
    add_lora(pipe.text_encoder, target=("q_proj", "v_proj"), rank=2, rng=np.random.default_rng(1))
    rng = np.random.default_rng(2)
    for model in (pipe.unet, pipe.text_encoder):
        for layer in lora_layers(model).values():
            b = layer.lora_B["default"].weight
            b[...] = 0.3 * rng.standard_normal(b.shape)
    return save_lora(tmp_path_factory.mktemp("lora") / "pytorch_lora_weights.safetensors", unet=pipe.unet,
                     text_encoder=pipe.text_encoder)


def _ours(lora_file, scale, sampler="ddim", steps=2, guidance=7.5):  # 7.5: the CLI's default with --model
    pipe = load_pipeline(TINY_SD, sampler=sampler)
    if scale is not None:
        load_lora_weights(pipe, lora_file, scale=scale)
    return pipe("a red circle", height=32, width=32, num_inference_steps=steps, seed=0, guidance_scale=guidance).images


def test_sample_model_with_a_lora_file_and_its_scale(lora_file, tmp_path):
    base, half = _ours(lora_file, None), _ours(lora_file, 0.8)
    assert np.array_equal(_ours(lora_file, 0.0), base)  # scale 0: the base model's image bit for bit
    assert not np.allclose(half, base, atol=1e-3)
    out = tmp_path / "lora.png"
    assert main(["sample", "--model", str(TINY_SD), "--lora", f"{lora_file}:0.8", *COMMON, "-o", str(out)]) == 0
    expected = np.round((np.clip(half[0], -1, 1) + 1) * 127.5) / 127.5 - 1  # as the PNG stores it
    np.testing.assert_allclose(load_image(out), expected, atol=1 / 127.5)
    assert parse_lora_spec(f"{lora_file}:0.8") == (str(lora_file), 0.8)
    assert parse_lora_spec(str(lora_file)) == (str(lora_file), 1.0)


def test_lcm_lora_from_the_command_line(lora_file, tmp_path, capsys):
    """LCM-LoRA's command line (docs/real-weights.md): --lora FILE --sampler lcm --steps 4 --guidance-scale 1
    writes our pipeline's image with the LoRA and LCMSampler, no guidance (one U-Net batch per step)."""
    lcm = _ours(lora_file, 1.0, sampler="lcm", steps=4, guidance=1.0)
    assert not np.allclose(lcm, _ours(lora_file, None, sampler="lcm", steps=4, guidance=1.0), atol=1e-3)
    out = tmp_path / "lcm.png"
    args = ["--prompt", "a red circle", "--height", "32", "--width", "32", "--quiet", "-o", str(out)]
    assert main(["sample", "--model", str(TINY_SD), "--lora", str(lora_file), "--sampler", "lcm", "--steps", "4",
                 "--guidance-scale", "1", *args]) == 0
    assert "4 LCMSampler steps, guidance 1.0" in capsys.readouterr().out
    expected = np.round((np.clip(lcm[0], -1, 1) + 1) * 127.5) / 127.5 - 1  # as the PNG stores it
    np.testing.assert_allclose(load_image(out), expected, atol=1 / 127.5)


def test_a_bad_lora_file_is_one_error_and_nothing_is_applied(lora_file, tmp_path, capsys):
    tensors = load_file(str(lora_file))
    first = sorted(k for k in tensors if k.endswith("to_q.lora_A.weight"))[0]
    tensors[first] = np.zeros((2, 3), np.float32)  # a shape that fits no layer
    tensors["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn7.to_q.lora_A.weight"] = np.zeros((2, 4),
                                                                                                      np.float32)
    tensors["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn7.to_q.lora_B.weight"] = np.zeros((4, 2),
                                                                                                      np.float32)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    out = tmp_path / "x.png"
    assert main(["sample", "--model", str(TINY_SD), "--lora", str(bad), *COMMON, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "do not fit the layer" in err and "no Linear or Conv2d layer" in err and "attn7" in err
    assert not out.exists()
    pipe = load_pipeline(TINY_SD, sampler="ddim")
    with pytest.raises(Exception, match="does not fit the models"):
        load_lora_weights(pipe, bad)
    assert lora_layers(pipe.unet) == {} and lora_layers(pipe.text_encoder) == {}  # nothing applied half-way
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": np.zeros((2, 4), np.float32),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": np.zeros((4, 2), np.float32)},
              str(tmp_path / "ldm.safetensors"))
    assert main(["sample", "--model", str(TINY_SD), "--lora", str(tmp_path / "ldm.safetensors"), *COMMON,
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err  # one error, its problems listed one per indented line
    assert err.count("error:") == 1 and "Traceback" not in err and "no Linear or Conv2d layer input_blocks_1_1" in err
    assert main(["sample", "--model", str(TINY_SD), "--embedding", "x", *COMMON, "-o", str(out)]) == 2
    one_error_line(capsys, "--embedding goes with a shapes --checkpoint")


#: the U-Net modules LCM-LoRA adapts (diffusers' train_lcm_distill_lora_sd_wds.py): 3x3 convs and time embeddings too
LCM_LORA_TARGETS = [*ATTENTION_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def _peft_lora_folder(folder, targets=ATTENTION_TARGETS, text_encoder=False):
    """A LoRA made with peft on the tiny SD fixture's U-Net modules ``targets`` (r 4, alpha 8, B moved off zero),
    and with ``text_encoder`` on CLIP's ``TEXT_ENCODER_TARGETS`` too (r 4, alpha 8), saved by diffusers'
    ``save_lora_weights`` into ``folder`` (diffusers' layout): the folder. The text encoder's adapters are put
    on by ``peft.inject_adapter_in_model``: transformers' ``add_adapter`` refuses peft < 0.22."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from fixtures.make_tiny_sd import load_reference_pipeline
    from peft.utils import get_peft_model_state_dict

    maker = load_reference_pipeline(TINY_SD, "ddim")
    torch.manual_seed(0)  # peft draws A (kaiming_uniform_) from torch's global generator
    maker.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=list(targets)))
    layers = {"unet_lora_layers": None, "unet_lora_adapter_metadata": maker.unet.peft_config["default"].to_dict()}
    models = [maker.unet]
    if text_encoder:
        config = peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=list(TEXT_ENCODER_TARGETS))
        peft.inject_adapter_in_model(config, maker.text_encoder)
        layers["text_encoder_lora_adapter_metadata"] = config.to_dict()
        models.append(maker.text_encoder)
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.3)
    layers["unet_lora_layers"] = get_peft_model_state_dict(maker.unet)
    if text_encoder:
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(maker.text_encoder)
    diffusers.StableDiffusionPipeline.save_lora_weights(folder, **layers)
    return folder


@pytest.mark.crosscheck
def test_a_peft_lora_through_diffusers_load_lora_weights_gives_our_images(tmp_path):
    """A LoRA made with peft on the tiny SD fixture's U-Net attention, saved by diffusers, applied by diffusers'
    ``pipe.load_lora_weights`` and by ours at scale 0.8: the same images (<= 1e-4). (A LoRA with text-encoder
    adapters too: the next test.)"""
    torch = pytest.importorskip("torch")
    from fixtures.make_tiny_sd import PIPELINE_GUIDANCE, PIPELINE_PROMPT, PIPELINE_STEPS, load_reference_pipeline

    _peft_lora_folder(tmp_path)
    latents = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32)
    theirs = load_reference_pipeline(TINY_SD, "ddim")
    theirs.load_lora_weights(str(tmp_path), adapter_name="star")
    theirs.set_adapters(["star"], adapter_weights=[0.8])
    ref = theirs(PIPELINE_PROMPT, num_inference_steps=PIPELINE_STEPS, guidance_scale=PIPELINE_GUIDANCE,
                 latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np").images
    ours = load_pipeline(TINY_SD, sampler="ddim")
    done = load_lora_weights(ours, tmp_path, scale=0.8)
    assert len(done["unet"]) == 4 * len([k for k in done["unet"] if k.endswith("to_q")]) and "text_encoder" not in done
    out = ours(PIPELINE_PROMPT, guidance_scale=PIPELINE_GUIDANCE, num_inference_steps=PIPELINE_STEPS,
               noise=latents, progress=False)
    plain = load_pipeline(TINY_SD, sampler="ddim")(PIPELINE_PROMPT, guidance_scale=PIPELINE_GUIDANCE,
                                                   num_inference_steps=PIPELINE_STEPS, noise=latents, progress=False)
    assert np.abs(out.images - plain.images).max() > 1e-2  # the LoRA changes the image ...
    diff = float(np.abs((out.images + 1.0) / 2.0 - np.asarray(ref)).max())
    assert diff <= 1e-4, diff  # ... as diffusers changes it (measured: 1.3e-6)


def _transformers_takes_this_peft() -> bool:
    """Whether transformers' peft integration (``CLIPTextModel.load_adapter``, which diffusers'
    ``load_lora_weights`` calls for the text encoder) accepts the installed peft: transformers 5.24 and later
    want peft >= 0.22, 5.20 to 5.23 peft >= 0.20."""
    from transformers.integrations.peft import MIN_PEFT_VERSION
    from transformers.utils.peft_utils import check_peft_version

    try:
        check_peft_version(min_version=MIN_PEFT_VERSION)
    except ValueError:
        return False
    return True


def _reference_with_text_encoder_lora(lora, peft_folder, scale):
    """diffusers' pipeline with the LoRA at ``scale`` (``set_adapters``): (images in [0, 1], the text encoder's
    last hidden state of [prompt, ""]). Through ``pipe.load_lora_weights(lora)`` where transformers takes the
    installed peft; otherwise ``load_lora_into_unet`` (the U-Net half of ``load_lora_weights``) and, for the text
    encoder, what the other half does, with peft directly: a ``LoraConfig`` from the file's ``text_encoder.*``
    metadata, ``peft.inject_adapter_in_model`` and ``set_peft_model_state_dict`` on the ``text_encoder.*``
    tensors of ``peft_folder`` (diffusers' layout)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from fixtures.make_tiny_sd import PIPELINE_GUIDANCE, PIPELINE_PROMPT, PIPELINE_STEPS, load_reference_pipeline
    from peft.utils import set_peft_model_state_dict

    theirs = load_reference_pipeline(TINY_SD, "ddim")
    if _transformers_takes_this_peft():
        theirs.load_lora_weights(str(lora), adapter_name="star")
    else:
        state_dict, _, metadata = theirs.lora_state_dict(str(peft_folder), return_lora_metadata=True)
        theirs.load_lora_into_unet(state_dict, network_alphas=None, unet=theirs.unet, adapter_name="star",
                                   metadata=metadata, _pipeline=theirs)
        prefix = "text_encoder."
        config = peft.LoraConfig(**{k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)})
        peft.inject_adapter_in_model(config, theirs.text_encoder, adapter_name="star")
        loaded = set_peft_model_state_dict(theirs.text_encoder, {k[len(prefix):]: v for k, v in state_dict.items()
                                                                 if k.startswith(prefix)}, adapter_name="star")
        assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "lora_" in k]
    theirs.set_adapters(["star"], adapter_weights=[scale])
    latents = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32)
    images = theirs(PIPELINE_PROMPT, num_inference_steps=PIPELINE_STEPS, guidance_scale=PIPELINE_GUIDANCE,
                    latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np").images
    ids = theirs.tokenizer([PIPELINE_PROMPT, ""], padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = theirs.text_encoder(ids).last_hidden_state.numpy()
    return np.asarray(images), hidden


@pytest.mark.crosscheck
@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_a_peft_lora_with_text_encoder_adapters_gives_our_images(tmp_path, layout):
    """A LoRA made with peft on the tiny SD fixture's U-Net attention and CLIP's q/k/v/out projections (r 4,
    alpha 8), saved by diffusers' ``save_lora_weights`` (diffusers' layout; with transformers 5 the text
    encoder's layers are ``text_encoder.encoder.layers.0.self_attn.q_proj...``, without ``text_model.``), or re-saved
    by our ``save_lora`` in kohya's layout (``lora_te_text_model_encoder_layers_0_self_attn_q_proj...``), at scale
    0.8 on both sides: our prompt embeddings and images are diffusers' (<= 1e-4), and differ from the base's.

    The reference is diffusers' ``pipe.load_lora_weights`` of the same file when transformers' peft integration
    takes the installed peft (transformers up to 5.23 with peft 0.21). transformers 5.24 and later refuse peft < 0.22
    in ``CLIPTextModel.load_adapter``, which ``load_lora_weights`` calls for the text encoder, and the package
    registry has peft 0.21.2: then the U-Net's adapters go through diffusers' ``load_lora_into_unet`` and the
    text encoder's through peft directly (:func:`_reference_with_text_encoder_lora`), both from the file in
    diffusers' layout (the kohya file holds the same adapters)."""
    from fixtures.make_tiny_sd import PIPELINE_GUIDANCE, PIPELINE_PROMPT, PIPELINE_STEPS

    peft_folder = _peft_lora_folder(tmp_path / "peft", text_encoder=True)
    assert sum(k.startswith("text_encoder.") for k in load_file(str(peft_folder / LORA_WEIGHT_NAME))) == 2 * 4 * 2
    lora = peft_folder
    if layout == "kohya":
        pipe = load_pipeline(TINY_SD, sampler="ddim")
        load_lora_weights(pipe, peft_folder)
        lora = save_lora(tmp_path / "kohya.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder,
                         layout="kohya")
    ref_images, ref_hidden = _reference_with_text_encoder_lora(lora, peft_folder, 0.8)

    ours = load_pipeline(TINY_SD, sampler="ddim")
    done = load_lora_weights(ours, lora, scale=0.8)
    assert len(done["text_encoder"]) == 4 * 2  # q, k, v, out in each of CLIP's 2 layers
    assert len(done["unet"]) == 4 * len([k for k in done["unet"] if k.endswith("to_q")])
    plain = load_pipeline(TINY_SD, sampler="ddim")
    ids = ours.tokenizer.encode([PIPELINE_PROMPT, ""])[0]
    hidden = ours.text_encoder(ids)
    assert np.abs(hidden - plain.text_encoder(ids)).max() > 1e-2  # the LoRA changes the prompt embeddings ...
    hidden_diff = float(np.abs(hidden - ref_hidden).max())
    assert hidden_diff <= 1e-4, hidden_diff  # ... as diffusers changes them (measured: 1.1e-6)
    latents = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32)
    out = ours(PIPELINE_PROMPT, guidance_scale=PIPELINE_GUIDANCE, num_inference_steps=PIPELINE_STEPS,
               noise=latents, progress=False)
    base = plain(PIPELINE_PROMPT, guidance_scale=PIPELINE_GUIDANCE, num_inference_steps=PIPELINE_STEPS,
                 noise=latents, progress=False)
    assert np.abs(out.images - base.images).max() > 1e-2  # ... and the images
    diff = float(np.abs((out.images + 1.0) / 2.0 - ref_images).max())
    assert diff <= 1e-4, diff  # measured: 1.4e-6, both layouts, either reference route


@pytest.mark.crosscheck
@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_lcm_lora_sampling_matches_diffusers(tmp_path, monkeypatch, layout):
    """LCM-LoRA sampling as diffusers documents it: a LoRA on LCM-LoRA's modules put on a StableDiffusionPipeline
    by ``pipe.load_lora_weights``, the scheduler swapped for ``LCMScheduler``, 4 steps at guidance 1; ours: the
    same file through our ``load_lora_weights`` and ``LCMSampler``, the same initial latents and the re-noising
    draws diffusers made (recorded from its LCMScheduler): the same images (<= 1e-4). The file: peft's, in
    diffusers' layout, or the same adapters re-saved by our ``save_lora`` in kohya's layout with float16 tensors,
    as ``latent-consistency/lcm-lora-sdv1-5`` ships them (``lora_unet_up_blocks_2_attentions_0_proj_in...``)."""
    torch = pytest.importorskip("torch")
    from diffusers.schedulers import scheduling_lcm
    from fixtures.make_tiny_sd import PIPELINE_PROMPT, load_reference_pipeline

    lora = _peft_lora_folder(tmp_path / "peft", LCM_LORA_TARGETS)
    if layout == "kohya":
        pipe = load_pipeline(TINY_SD, sampler="lcm")
        load_lora_weights(pipe, lora)
        lora = save_lora(tmp_path / "lcm_lora.safetensors", unet=pipe.unet, layout="kohya", dtype=np.float16)
    draws, randn_tensor = [], scheduling_lcm.randn_tensor

    def recorded(*args, **kwargs):  # LCMScheduler.step's z of the re-noising, kept to be replayed by ours
        draws.append(randn_tensor(*args, **kwargs))
        return draws[-1]

    monkeypatch.setattr(scheduling_lcm, "randn_tensor", recorded)
    latents = np.random.default_rng(4).standard_normal((2, 8, 8, 4)).astype(np.float32)
    theirs = load_reference_pipeline(TINY_SD, "lcm")
    theirs.load_lora_weights(str(lora))
    ref = theirs(PIPELINE_PROMPT, num_inference_steps=4, guidance_scale=1.0, num_images_per_prompt=2,
                 latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert len(draws) == 3  # no re-noising after the last step
    step_noise = [z.numpy().transpose(0, 2, 3, 1) for z in draws] + [np.zeros_like(latents)]

    ours = load_pipeline(TINY_SD, sampler="lcm")
    done = load_lora_weights(ours, lora)
    assert {name.rsplit(".", 1)[-1] for name in done["unet"]} >= {"to_q", "conv1", "conv_shortcut", "time_emb_proj"}
    assert any(name.endswith("upsamplers.0.conv") for name in done["unet"])  # outside Upsample2D's fused path
    out = ours(PIPELINE_PROMPT, guidance_scale=1.0, num_inference_steps=4, num_images_per_prompt=2, noise=latents,
               step_noise=step_noise, progress=False)
    assert ours.sampler.timesteps.tolist() == theirs.scheduler.timesteps.tolist() == [999, 759, 499, 259]
    plain = load_pipeline(TINY_SD, sampler="lcm")(PIPELINE_PROMPT, guidance_scale=1.0, num_inference_steps=4,
                                                  num_images_per_prompt=2, noise=latents, step_noise=step_noise,
                                                  progress=False)
    assert np.abs(out.images - plain.images).max() > 1e-2  # the LoRA changes the image ...
    diff = float(np.abs((out.images + 1.0) / 2.0 - np.asarray(ref)).max())
    assert diff <= 1e-4, diff  # ... as diffusers changes it (measured: 6.3e-7 diffusers' layout, 7.7e-7 kohya's)
