"""A diffusers ControlNet folder steering real (tiny) Stable Diffusion weights: loading and parity.

``fixtures/tiny_controlnet/`` (float16, written by diffusers' ``save_pretrained``) and
``tiny_controlnet_reference.npz`` are made by ``fixtures/make_tiny_controlnet.py`` for the tiny
SD of ``fixtures/tiny_sd/``; "live" recomputes the reference with the installed diffusers.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import one_error_line

from diffusion_np.cli import main
from diffusion_np.io.diffusers import WeightsError, load_controlnet, load_pipeline
from diffusion_np.pipelines.controlnet import ControlNetPipeline
from diffusion_np.pipelines.image_io import load_control_image, save_image

FIXTURES = Path(__file__).parents[1] / "fixtures"
TINY_SD, TINY_CONTROLNET = FIXTURES / "tiny_sd", FIXTURES / "tiny_controlnet"
SOURCES = ["golden", pytest.param("live", marks=pytest.mark.crosscheck)]
ATOL = 1e-4  # float32 parity bar, as test_diffusers_loading.py (measured: about 1e-6)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(TINY_SD, sampler="ddim")


@pytest.fixture(scope="module")
def controlnet():
    return load_controlnet(TINY_CONTROLNET)


@pytest.fixture(scope="module", params=SOURCES)
def ref(request):
    if request.param == "golden":
        with np.load(FIXTURES / "tiny_controlnet_reference.npz") as data:
            return {k: data[k] for k in data.files}
    from fixtures.make_tiny_controlnet import references

    return references()


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - b).max())


def test_residuals_and_controlled_unet_match_diffusers(pipe, controlnet, ref):
    from fixtures.make_tiny_controlnet import SCALE

    down, mid = controlnet(ref["sample"], ref["timestep"], ref["context"], ref["control"], conditioning_scale=SCALE)
    assert _max_diff(mid, ref["mid_residual"]) <= ATOL and _max_diff(down[0], ref["down_residual_0"]) <= ATOL
    eps = pipe.unet(ref["sample"], ref["timestep"], ref["context"], down, mid)
    assert _max_diff(eps, ref["unet_out"]) <= ATOL


def test_controlnet_pipeline_matches_stable_diffusion_controlnet_pipeline(pipe, controlnet, ref):
    """diffusers' StableDiffusionControlNetPipeline: 4 guided DDIM steps, the control image in both halves of
    the guided batch, scale 0.8, images in [0, 1]."""
    from fixtures.make_tiny_controlnet import PROMPT, SCALE

    cpipe = ControlNetPipeline(pipe.unet, controlnet, pipe.text_encoder, pipe.tokenizer, pipe.sampler, pipe.vae)
    out = cpipe(PROMPT, ref["control"][0], conditioning_scale=SCALE, guidance_scale=7.5, num_inference_steps=4,
                noise=ref["pipeline_latents"], progress=False)
    assert _max_diff((out.images + 1.0) / 2.0, ref["pipeline_images"]) <= ATOL


def test_loaded_controlnet_is_forward_only_and_named_as_diffusers(controlnet):
    config = json.loads((TINY_CONTROLNET / "config.json").read_text())
    widths = tuple(config["conditioning_embedding_out_channels"])
    assert controlnet.config["conditioning_embedding_out_channels"] == widths
    assert controlnet.conditioning_downscale == 4 and controlnet.conditioning_channels == 3
    assert not controlnet._keep_cache  # no gradient buffers, no backward caches, as load_pipeline's models


def test_load_controlnet_errors_name_the_problem(tmp_path):
    with pytest.raises(WeightsError, match="is not a folder"):
        load_controlnet(tmp_path / "missing")
    folder = tmp_path / "cn"
    shutil.copytree(TINY_CONTROLNET, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(WeightsError, match="not a ControlNetModel"):
        load_controlnet(folder)
    (folder / "config.json").write_text(json.dumps({**config, "conditioning_embedding_out_channels": [4, 8]}))
    with pytest.raises(WeightsError, match="mis-shaped key.*controlnet_cond_embedding"):
        load_controlnet(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="pickle"):
        load_controlnet(folder)


def test_a_control_image_that_does_not_fit_is_named(pipe, controlnet):
    cpipe = ControlNetPipeline(pipe.unet, controlnet, pipe.text_encoder, pipe.tokenizer, pipe.sampler, pipe.vae)
    with pytest.raises(ValueError, match=r"3 channel\(s\).*got shape \(1, 32, 32, 1\)"):
        cpipe("a cat", np.zeros((32, 32, 1), np.float32), num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="image size 36x32 must be divisible by 32"):
        cpipe("a cat", np.zeros((36, 32, 3), np.float32), num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
        cpipe("a cat", -np.ones((32, 32, 3), np.float32), num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="downsamples the control image by 4"):
        ControlNetPipeline(pipe.unet, controlnet, pipe.text_encoder, pipe.tokenizer, pipe.sampler, None)


def test_cli_sample_with_a_controlnet_folder(tmp_path, capsys, ref):
    control = tmp_path / "control.png"
    save_image(control, ref["control"][0] * 2.0 - 1.0)  # an RGB PNG, [0, 1] stored as 0..255
    np.testing.assert_allclose(load_control_image(control), ref["control"][0], atol=0.5 / 255 + 1e-6)
    out = tmp_path / "out.png"
    args = ["sample", "--model", str(TINY_SD), "--controlnet", str(TINY_CONTROLNET), "--control", str(control),
            "--prompt", "a red circle", "--steps", "2", "--sampler", "ddim", "--control-scale", "0.5", "-o", str(out),
            "--quiet"]
    assert main(args) == 0 and out.is_file()
    assert "32x32" in capsys.readouterr().out
    grey = tmp_path / "grey.png"
    save_image(grey, np.zeros((32, 32, 1), np.float32))  # a grey-scale PNG: one channel, the ControlNet wants 3
    assert main([*args[:6], str(grey), *args[7:]]) == 2
    one_error_line(capsys, "3 channel(s)", "(1, 32, 32, 1)")
    assert main(args[:5] + args[7:]) == 2  # --controlnet without --control
    one_error_line(capsys, "--controlnet DIR and --control IMAGE")
    assert main(args[:3] + args[7:]) == 2  # --control-scale without --controlnet
    one_error_line(capsys, "go together with --model")
