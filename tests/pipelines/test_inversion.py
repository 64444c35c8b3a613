"""DDIM inversion pipeline: exact round trips with an x-free model, pixel and latent space, edits, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pipelines.test_text_to_image import SIZE, FakeVAE, Spy, image, tiny_models

from diffusion_np.pipelines import DDIMInversionPipeline, TextToImagePipeline, reconstruction_error
from diffusion_np.samplers import DDIMSampler, EulerSampler


class XFree:
    """A U-Net stand-in whose eps depends on t only: DDIM inversion is then exactly undone by DDIM."""

    num_upsamplers = 1

    def __init__(self, channels: int = 3) -> None:
        self.in_channels = channels
        self.config = {"sample_size": SIZE}
        self.calls = 0

    def __call__(self, sample, t, encoder_hidden_states):
        self.calls += 1
        return np.full_like(sample, math.sin(0.013 * float(t) + 0.4))


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_round_trip_is_exact_when_eps_ignores_x_in_pixel_space(models, w):
    _, text_encoder, tokenizer = models
    unet = XFree()
    pipe = DDIMInversionPipeline(unet, text_encoder, tokenizer, DDIMSampler(clip_sample=False))
    x0 = image(0)
    out = pipe("a red circle", x0, guidance_scale=w, num_inference_steps=12, progress=False)
    np.testing.assert_allclose(out.images[0], x0, atol=2e-5)
    assert unet.calls == 24  # 12 inversion steps up, 12 DDIM steps down


def test_round_trip_in_latent_space_returns_the_vae_reconstruction(models):
    _, text_encoder, tokenizer = models
    vae = FakeVAE()
    pipe = DDIMInversionPipeline(XFree(channels=4), text_encoder, tokenizer, DDIMSampler(clip_sample=False), vae=vae)
    x0 = image(1, size=2 * SIZE)
    inverted = pipe.invert("a red circle", x0, num_inference_steps=8, progress=False)
    assert inverted.noise.shape == (1, SIZE, SIZE, 4)
    out = pipe("a red circle", x0, num_inference_steps=8, progress=False)
    expected = vae.decode_latents(vae.encode_latents(x0[None], sample_posterior=False))[0]  # 2x2 averages
    np.testing.assert_allclose(out.images[0], np.clip(expected, -1, 1), atol=2e-5)


def test_inverted_noise_regenerates_through_the_text_to_image_path(models):
    unet, text_encoder, tokenizer = models
    pipe = DDIMInversionPipeline(unet, text_encoder, tokenizer, DDIMSampler(clip_sample=False))
    x0 = image(2)
    inverted = pipe.invert("a red circle", x0, num_inference_steps=6, progress=False)
    assert inverted.prompts == ["a red circle"]
    np.testing.assert_array_equal(inverted.x0[0], x0)
    again = pipe("a red circle", x0, num_inference_steps=6, progress=False)
    # the same regeneration, written as the text-to-image loop from the inverted noise
    t2i = TextToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler(clip_sample=False))
    direct = t2i("a red circle", guidance_scale=1.0, num_inference_steps=6, noise=inverted.noise, progress=False)
    np.testing.assert_allclose(again.images, direct.images, atol=1e-6)


def test_edit_prompt_conditions_only_the_way_down(models):
    unet, text_encoder, tokenizer = models
    spy = Spy(unet)
    pipe = DDIMInversionPipeline(spy, text_encoder, tokenizer, DDIMSampler(clip_sample=False))
    x0 = image(3)
    recon = pipe("a red circle", x0, num_inference_steps=4, progress=False)
    spy.calls.clear()
    edit = pipe("a red circle", x0, edit_prompt="a blue square", num_inference_steps=4, progress=False)
    red = text_encoder(tokenizer.encode(["a red circle"]).ids)
    blue = text_encoder(tokenizer.encode(["a blue square"]).ids)
    contexts = [c[3] for c in spy.calls]
    assert all(np.allclose(c, red) for c in contexts[:4]) and all(np.allclose(c, blue) for c in contexts[4:])
    assert edit.prompts == ["a blue square"]
    assert not np.allclose(edit.images, recon.images)


def test_reconstruction_error_rows(models):
    _, text_encoder, tokenizer = models
    pipe = DDIMInversionPipeline(XFree(), text_encoder, tokenizer, DDIMSampler(clip_sample=False))
    rows = reconstruction_error(pipe, "a red circle", image(4), steps=(2, 5), guidance_scales=(1.0, 2.0))
    assert [(r["steps"], r["guidance_scale"]) for r in rows] == [(2, 1.0), (2, 2.0), (5, 1.0), (5, 2.0)]
    assert all(r["mse"] < 1e-9 and r["psnr"] > 80 for r in rows)


def test_bad_input(models):
    unet, text_encoder, tokenizer = models
    with pytest.raises(TypeError, match="DDIMSampler"):
        DDIMInversionPipeline(unet, text_encoder, tokenizer, EulerSampler())
    pipe = DDIMInversionPipeline(unet, text_encoder, tokenizer, DDIMSampler())
    with pytest.raises(ValueError, match="edit_prompt"):
        pipe("a red circle", image(0), edit_prompt=["a", "b"], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe.invert("a red circle", image(0), guidance_scale=float("nan"), num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="values must lie in"):
        pipe.invert("a red circle", 3 * image(0), num_inference_steps=2, progress=False)
