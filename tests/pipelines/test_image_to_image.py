"""Image-to-image (SDEdit): diffusers' timestep rule, the start point, strength 1 = text-to-image, PNG I/O, errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from pipelines.test_text_to_image import SIZE, FakeVAE, Oracle, Spy, image, tiny_models

from diffusion_np.pipelines import ImageToImagePipeline, TextToImagePipeline, img2img_timesteps
from diffusion_np.pipelines.image_io import from_uint8, load_image, load_mask, make_grid, save_image, to_uint8
from diffusion_np.samplers import SAMPLERS, DDIMSampler, DDPMSampler, EulerSampler, HeunSampler


@pytest.fixture(scope="module")
def models():
    return tiny_models()


def _pipe(models, sampler, vae=None, unet=None):
    unet_, text_encoder, tokenizer = models
    return ImageToImagePipeline(unet if unet is not None else unet_, text_encoder, tokenizer, sampler, vae=vae)


# ----------------------------------------------------------------------------- which timesteps
@pytest.mark.parametrize(
    "sampler, N, strength, expected",
    [
        # DDIM, leading spacing: 900, 800, ..., 0
        (DDIMSampler(), 10, 0.5, [400, 300, 200, 100, 0]),
        (DDIMSampler(), 10, 0.75, [600, 500, 400, 300, 200, 100, 0]),  # int(7.5) = 7 steps
        (DDIMSampler(), 10, 0.3, [200, 100, 0]),  # 10 * 0.3 = 3.0000000000000004 -> 3
        (DDIMSampler(), 10, 1.0, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        (DDIMSampler(), 3, 0.34, [0]),  # int(1.02) = 1: only the last step
        # Heun (order 2), linspace: 999, 666, 666, 333, 333, 0, 0; two kept steps = 3 calls
        (HeunSampler(), 4, 0.5, [333.0, 0.0, 0.0]),
        (HeunSampler(), 4, 1.0, [999.0, 666.0, 666.0, 333.0, 333.0, 0.0, 0.0]),
    ],
)
def test_kept_timesteps(sampler, N, strength, expected):
    timesteps, start = img2img_timesteps(sampler, N, strength)
    assert timesteps.tolist() == expected
    assert sampler.timesteps[start:].tolist() == expected


# PNDM is left out: its warm-up repeats t_1 and keeps state from the first call, so it cannot start
# mid-schedule (its step says so; tests/samplers/test_pndm.py)
@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"pndm"}))
@pytest.mark.parametrize("N, strength", [(10, 0.8), (7, 0.5), (25, 0.33), (50, 0.999), (4, 0.25), (1, 1.0)])
def test_kept_timesteps_follow_diffusers_rule(name, N, strength):
    sampler = SAMPLERS[name]()
    timesteps, start = img2img_timesteps(sampler, N, strength)
    # the rule of StableDiffusionImg2ImgPipeline.get_timesteps, written out
    init_timestep = min(int(N * strength), N)
    t_start = max(N - init_timestep, 0)
    assert start == t_start * sampler.order
    np.testing.assert_array_equal(timesteps, sampler.timesteps[t_start * sampler.order:])
    # and the number of model calls: one per kept step, Heun two per step but the first
    calls = 2 * init_timestep - 1 if sampler.order == 2 else init_timestep
    assert len(timesteps) == calls


@pytest.mark.crosscheck
@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "heun", "dpm++"])
@pytest.mark.parametrize("N, strength", [(10, 0.8), (7, 0.5), (25, 0.33), (4, 0.25), (6, 1.0)])
def test_kept_timesteps_match_live_diffusers(name, N, strength):
    import diffusers
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
        StableDiffusionImg2ImgPipeline,
    )

    theirs_cls = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler,
                  "euler": diffusers.EulerDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler,
                  "dpm++": diffusers.DPMSolverMultistepScheduler}[name]  # fmt: skip
    theirs = theirs_cls()  # default configs; ours have the same defaults (spacing, betas)
    theirs.set_timesteps(N)
    ref, n_steps = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=theirs), N, strength, "cpu")
    ours, _ = img2img_timesteps(SAMPLERS[name](), N, strength)
    # diffusers keeps fractional timesteps (Euler, Heun) in float32, we in float64: 799.2 vs 799.2000122
    np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- the start point and the loop
@pytest.mark.parametrize("sampler_cls", [DDIMSampler, DDPMSampler, EulerSampler, HeunSampler])
def test_first_model_input_is_the_image_noised_to_the_first_kept_timestep(models, sampler_cls):
    unet = models[0]
    spy = Spy(unet)
    sampler = sampler_cls()
    x0 = image(1)
    _pipe(models, sampler, unet=spy)("a red circle", x0, strength=0.6, num_inference_steps=5, seed=4,
                                     guidance_scale=1.0, progress=False)  # fmt: skip
    ref = sampler_cls()
    timesteps, _ = img2img_timesteps(ref, 5, 0.6)  # 3 steps
    z = np.random.default_rng(4).standard_normal((1, SIZE, SIZE, 3)).astype(np.float32)  # the seed's first draw
    x_start = ref.add_noise(x0[None], z, timesteps[0])
    assert len(spy.calls) == len(timesteps)
    assert spy.calls[0][1] == timesteps[0]
    np.testing.assert_allclose(spy.calls[0][2], ref.scale_model_input(x_start, timesteps[0]), atol=1e-6)


@pytest.mark.parametrize("name", ["ddim", "euler-a", "heun", "dpm++"])
def test_strength_one_is_text_to_image_and_ignores_the_input(models, name):
    unet, text_encoder, tokenizer = models
    kwargs = dict(guidance_scale=3.0, num_inference_steps=4, seed=9, progress=False)
    t2i = TextToImagePipeline(unet, text_encoder, tokenizer, SAMPLERS[name]())("a red circle", **kwargs)
    pipe = _pipe(models, SAMPLERS[name]())
    a = pipe("a red circle", image(1), strength=1.0, **kwargs)
    b = pipe("a red circle", -image(2), strength=1.0, **kwargs)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.images, t2i.images)
    c = pipe("a red circle", image(1), strength=0.5, **kwargs)
    d = pipe("a red circle", -image(2), strength=0.5, **kwargs)
    assert not np.allclose(c.images, d.images), "below strength 1 the input image must matter"


def test_distance_to_the_input_grows_with_strength(models):
    # an untrained U-Net keeps little of what noise destroys: the more of the schedule is re-run,
    # the further the result ends from the input
    x0 = image(5)
    pipe = _pipe(models, DDIMSampler())
    err = [np.abs(pipe("a red circle", x0, strength=s, num_inference_steps=50, progress=False).images[0] - x0).mean()
           for s in (0.02, 0.1, 0.3)]  # fmt: skip
    assert err[0] < 0.02 and err[0] < err[1] < err[2]


def test_oracle_for_another_image_is_reached_from_any_strength(models):
    _, text_encoder, tokenizer = models
    target = image(6)[None]
    sampler = DDIMSampler()
    pipe = ImageToImagePipeline(Oracle(target, sampler), text_encoder, tokenizer, sampler)
    for strength in (0.3, 0.7, 1.0):
        out = pipe("a red circle", image(7), strength=strength, num_inference_steps=10, progress=False)
        np.testing.assert_allclose(out.images[0], target[0], atol=1e-3)


def test_latent_space_encodes_once_and_images_follow_prompts(models):
    unet, text_encoder, tokenizer = tiny_models(in_channels=4)
    vae = FakeVAE()
    pipe = ImageToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler(clip_sample=False), vae=vae)
    big = np.stack([image(1, size=2 * SIZE), image(2, size=2 * SIZE)])  # one image per prompt
    out = pipe(["a red circle", "a blue square"], big, strength=0.1, num_inference_steps=20,
               num_images_per_prompt=2, progress=False, return_trajectory=True)  # fmt: skip
    assert out.images.shape == (4, 2 * SIZE, 2 * SIZE, 3) and out.latents.shape == (4, SIZE, SIZE, 4)
    assert vae.encodes == 1 and vae.decodes == 1
    assert out.prompts == ["a red circle"] * 2 + ["a blue square"] * 2
    assert len(out.trajectory.x_t) == 3 and out.trajectory.timesteps.tolist() == [50, 0]
    # images 0, 1 come from input 0, images 2, 3 from input 1 (they stay near their inputs at this strength)
    err = np.abs(out.images[:, None] - big[None]).mean(axis=(2, 3, 4))  # (4 outputs, 2 inputs)
    assert err.argmin(axis=1).tolist() == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5, float("nan")])
def test_strength_outside_the_unit_interval_is_refused(models, strength):
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
        _pipe(models, DDIMSampler())("a red circle", image(1), strength=strength, progress=False)


def test_errors(models):
    pipe = _pipe(models, DDIMSampler())
    call = lambda img, **kw: pipe("a red circle", img, num_inference_steps=4, progress=False, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="runs int"):
        call(image(1), strength=0.2)  # int(4 * 0.2) = 0 steps
    with pytest.raises(TypeError, match="from_uint8"):
        call(to_uint8(image(1)))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        call(2.0 * image(1))
    with pytest.raises(ValueError, match="3 channels"):
        call(image(1, channels=4))
    with pytest.raises(ValueError, match="divisible by 2"):
        call(image(1)[:7])
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(["a red circle"] * 3, np.stack([image(1), image(2)]), progress=False)
    with pytest.raises(TypeError, match="strength must be a number"):
        call(image(1), strength="high")
    with pytest.raises(TypeError, match="image must be an array"):
        call([[0.0]])


# ----------------------------------------------------------------------------- PNG helpers
def test_png_round_trip_and_grid(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    x = from_uint8(pixels)
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_uint8(x), pixels)
    path = save_image(tmp_path / "img.png", x)
    np.testing.assert_array_equal(load_image(path), x)
    assert load_image(path, size=(3, 5)).shape == (3, 5, 3)
    assert load_image(path, channels=1).shape == (6, 10, 1)
    grid = make_grid(np.stack([x, x, x]), ncols=2, padding=1)
    assert grid.shape == (2 * 6 + 1, 2 * 10 + 1, 3)
    np.testing.assert_array_equal(grid[7:, 11:], 1.0)  # the empty fourth cell is padding (white)
    save_image(tmp_path / "grid.png", np.stack([x, x]))
    assert load_image(tmp_path / "grid.png").shape == (6, 2 * 10 + 2, 3)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"images": np.full((2, 4, 4, 3), np.nan, np.float32)}, ValueError, "images hold NaN or Inf"),  # was silent
        ({"images": np.zeros((0, 4, 4, 3), np.float32)}, ValueError, "images is an empty batch"),
        ({"images": np.zeros((2, 4, 4, 3), np.complex64)}, TypeError, "images of real numbers"),
        ({"ncols": 0}, ValueError, "ncols must be >= 1, got 0"),
        ({"ncols": 1.5}, TypeError, "ncols must be an int, got 1.5"),
        ({"padding": -1}, ValueError, "padding must be >= 0, got -1"),  # was a NumPy broadcast error
        ({"padding": "1"}, TypeError, "padding must be an int"),
    ],
)
def test_make_grid_refuses_bad_input_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_grid(**{"images": np.zeros((2, 4, 4, 3), np.float32), **kwargs})


def test_save_image_names_an_empty_batch(tmp_path):
    # it used to be reported as make_grid's ncols
    with pytest.raises(ValueError, match=r"images is an empty batch, shape \(0, 4, 4, 3\)"):
        save_image(tmp_path / "a.png", np.zeros((0, 4, 4, 3), np.float32))


def test_mask_png_is_white_for_repaint(tmp_path):
    grey = np.zeros((4, 4, 1), dtype=np.float32) - 1.0  # black
    grey[1:3, 1:3] = 1.0  # white square
    grey[0, 0] = -0.2  # 40% grey: below the threshold
    path = save_image(tmp_path / "mask.png", grey)
    mask = load_mask(path)
    assert mask.dtype == np.float32 and mask.shape == (4, 4)
    assert mask.sum() == 4 and mask[1:3, 1:3].all() and mask[0, 0] == 0
    with pytest.raises(ValueError, match="threshold"):
        load_mask(path, threshold=0.0)


def test_image_io_errors(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        from_uint8(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.array([np.nan]))
    with pytest.raises(ValueError, match="C in"):
        save_image(tmp_path / "x.png", np.zeros((4, 4, 2)))
    path = save_image(tmp_path / "x.png", np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="height, width"):
        load_image(path, size=(0, 4))
    with pytest.raises(ValueError, match="channels"):
        load_image(tmp_path / "x.png", channels=2)
