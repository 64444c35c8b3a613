"""Inpainting: known pixels kept exactly, the hole filled by the model, RePaint resampling, latent masks, errors."""

from __future__ import annotations

import numpy as np
import pytest
from pipelines.test_text_to_image import SIZE, FakeVAE, Oracle, Spy, image, tiny_models

from diffusion_np.backend import gpu_available
from diffusion_np.models.vae import AutoencoderKL
from diffusion_np.pipelines import InpaintPipeline, TextToImagePipeline, downsample_mask
from diffusion_np.samplers import SAMPLERS, DDIMSampler, DDPMSampler


@pytest.fixture(scope="module")
def models():
    return tiny_models()


def square_mask(size: int = SIZE, lo: int = 2, hi: int = 6) -> np.ndarray:
    """(size, size) float32, 1 on the square [lo, hi)^2 (repaint), 0 elsewhere (keep)."""
    mask = np.zeros((size, size), dtype=np.float32)
    mask[lo:hi, lo:hi] = 1.0
    return mask


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                         rng=np.random.default_rng(3))  # fmt: skip


# ----------------------------------------------------------------------------- the oracle
# PNDM is left out: it extrapolates eps from earlier steps, which saw the samples before the mask
# blending, so even an exact oracle is off by about 1e-2 (the x0-based multistep samplers stay exact)
@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"pndm"}))
def test_oracle_fills_the_hole_and_the_rest_is_kept_exactly(models, name):
    # the model "knows" image A; we inpaint image B: outside the mask B exactly, inside it A
    _, text_encoder, tokenizer = models
    a, b, mask = image(1), image(2), square_mask()
    sampler = SAMPLERS[name]()
    pipe = InpaintPipeline(Oracle(a[None], sampler), text_encoder, tokenizer, sampler)
    out = pipe("a red circle", b, mask, num_inference_steps=8, progress=False)
    keep, fill = mask == 0, mask == 1
    np.testing.assert_array_equal(out.images[0][keep], b[keep])
    np.testing.assert_allclose(out.images[0][fill], a[fill], atol=2e-3)


@pytest.mark.parametrize("rule", ["stride", "sequence"])
def test_known_region_is_noised_to_where_the_ddim_step_lands(models, rule):
    # linspace has uneven gaps: DDIM's default step lands on t - T // N, not on the next timestep, and the
    # known region must be at that level for the two halves to join (the sequence rule lands on the next one)
    _, text_encoder, tokenizer = models
    sampler = DDIMSampler(timestep_spacing="linspace", prev_timestep_rule=rule)
    levels = []
    add_noise = sampler.add_noise
    sampler.add_noise = lambda x0, noise, t: levels.append(int(t)) or add_noise(x0, noise, t)
    InpaintPipeline(Oracle(image(1)[None], sampler), text_encoder, tokenizer, sampler)(
        "a red circle", image(2), square_mask(), num_inference_steps=7, progress=False)  # fmt: skip
    ts = sampler.timesteps.tolist()
    landing = [t - 1000 // 7 for t in ts[:-1]] if rule == "stride" else ts[1:]
    assert levels == [ts[0]] + landing  # x_T's known part, then one level per step but the last (x_0 there)
    assert rule == "sequence" or landing != ts[1:]


def test_oracle_with_repaint_resampling(models):
    _, text_encoder, tokenizer = models
    a, b, mask = image(1), image(2), square_mask(lo=1, hi=5)
    sampler = DDPMSampler()
    out = InpaintPipeline(Oracle(a[None], sampler), text_encoder, tokenizer, sampler)(
        "a red circle", b, mask, num_inference_steps=6, resample_steps=3, progress=False)  # fmt: skip
    np.testing.assert_array_equal(out.images[0][mask == 0], b[mask == 0])
    np.testing.assert_allclose(out.images[0][mask == 1], a[mask == 1], atol=2e-3)


def test_oracle_in_latent_space_with_a_max_pooled_mask(models):
    _, text_encoder, tokenizer = models
    vae = FakeVAE()
    a, b = image(1, size=2 * SIZE), image(2, size=2 * SIZE)
    mask = square_mask(2 * SIZE, lo=3, hi=9)  # odd edge: latent blocks 1..4 are (partly) repainted
    target = vae.encode_latents(a[None], sample_posterior=False)
    sampler = DDIMSampler(clip_sample=False)
    out = InpaintPipeline(Oracle(target, sampler), text_encoder, tokenizer, sampler, vae=vae)(
        "a red circle", b, mask, num_inference_steps=6, progress=False)  # fmt: skip
    assert vae.encodes == 2 and vae.decodes == 1  # (one encode was the test's own)
    np.testing.assert_array_equal(out.images[0][mask == 0], b[mask == 0])  # exact, though the VAE is lossy
    # inside: what the VAE decodes from the oracle's latents (block means of A)
    ref = np.clip(vae.decode_latents(target)[0], -1, 1)
    np.testing.assert_allclose(out.images[0][mask == 1], ref[mask == 1], atol=1e-4)
    # latents wholly outside the pooled mask stay B's latents, exactly
    latent_mask = downsample_mask(mask[None, :, :, None], 2)[0, :, :, 0]
    b_latent = vae.encode_latents(b[None], sample_posterior=False)[0]
    np.testing.assert_array_equal(out.latents[0][latent_mask == 0], b_latent[latent_mask == 0])


# ----------------------------------------------------------------------------- against text-to-image
@pytest.mark.parametrize("name", ["ddpm", "euler-a", "heun", "dpm++"])
def test_mask_of_ones_is_text_to_image_and_zeros_return_the_image(models, name):
    unet, text_encoder, tokenizer = models
    kwargs = dict(guidance_scale=3.0, num_inference_steps=4, seed=5, progress=False)
    t2i = TextToImagePipeline(unet, text_encoder, tokenizer, SAMPLERS[name]())("a red circle", **kwargs)
    pipe = InpaintPipeline(unet, text_encoder, tokenizer, SAMPLERS[name]())
    ones = pipe("a red circle", image(1), np.ones((SIZE, SIZE)), **kwargs)
    np.testing.assert_array_equal(ones.images, t2i.images)
    zeros = pipe("a red circle", image(1), np.zeros((SIZE, SIZE)), **kwargs)
    np.testing.assert_array_equal(zeros.images[0], image(1))


def test_known_region_is_noised_to_the_level_the_step_lands_on(models):
    # in the trajectory, the known region of x_{t_prev} must look like sqrt(ab_prev) x0 + sqrt(1 - ab_prev) z
    unet, text_encoder, tokenizer = models
    x0 = image(3, size=16)
    mask = np.zeros((16, 16), dtype=np.float32)
    mask[:4] = 1.0  # repaint the top rows, keep 3/4 of the pixels
    sampler = DDIMSampler()
    out = InpaintPipeline(unet, text_encoder, tokenizer, sampler)(
        "a red circle", x0, mask, num_inference_steps=4, return_trajectory=True, progress=False)  # fmt: skip
    timesteps = out.trajectory.timesteps  # 750, 500, 250, 0
    keep = mask == 0
    for i, t in enumerate(timesteps):  # x_t[i] sits at timesteps[i]
        ab = float(sampler.alpha_bar[t])
        z = (out.trajectory.x_t[i][0][keep] - np.sqrt(ab) * x0[keep]) / np.sqrt(1.0 - ab)
        assert abs(z.mean()) < 0.15 and 0.85 < z.std() < 1.15, (t, z.mean(), z.std())
    np.testing.assert_array_equal(out.trajectory.x_t[-1][0][keep], x0[keep])


# ----------------------------------------------------------------------------- RePaint
def test_resampling_changes_results_only_above_one(models):
    unet, text_encoder, tokenizer = models
    spy = Spy(unet)
    pipe = InpaintPipeline(spy, text_encoder, tokenizer, DDIMSampler())
    run = lambda **kw: pipe("a red circle", image(1), square_mask(), num_inference_steps=5, seed=2,  # noqa: E731
                            progress=False, eta=1.0, **kw).images  # fmt: skip
    base = run()
    np.testing.assert_array_equal(run(resample_steps=1), base)
    spy.calls.clear()
    resampled = run(resample_steps=3)
    assert len(spy.calls) == 3 * (5 - 1) + 1  # U passes per step, one at the last step
    assert not np.allclose(resampled, base)
    np.testing.assert_array_equal(resampled[0][square_mask() == 0], image(1)[square_mask() == 0])


@pytest.mark.parametrize("name", ["euler", "euler-a", "heun", "dpm++"])
def test_resampling_is_refused_where_a_step_cannot_be_redone(models, name):
    unet, text_encoder, tokenizer = models
    pipe = InpaintPipeline(unet, text_encoder, tokenizer, SAMPLERS[name]())
    with pytest.raises(ValueError, match="DDPMSampler or DDIMSampler"):
        pipe("a red circle", image(1), square_mask(), resample_steps=2, progress=False)


# ----------------------------------------------------------------------------- masks
def test_downsample_mask_is_a_max_pool():
    mask = np.zeros((2, 8, 8, 1), dtype=bool)
    mask[0, 3, 4] = True  # one pixel -> its 2x2 block's latent
    mask[1, 4:8, 0:2] = True
    small = downsample_mask(mask, 2)
    assert small.shape == (2, 4, 4, 1) and small.dtype == bool
    assert np.argwhere(small[0, :, :, 0]).tolist() == [[1, 2]]
    assert np.argwhere(small[1, :, :, 0]).tolist() == [[2, 0], [3, 0]]
    with pytest.raises(ValueError, match="cannot be pooled"):
        downsample_mask(np.zeros((1, 6, 6, 1)), 4)


def test_mask_layouts_and_per_prompt_masks(models):
    unet, text_encoder, tokenizer = models
    pipe = InpaintPipeline(unet, text_encoder, tokenizer, DDIMSampler())
    run = lambda prompt, mask, **kw: pipe(prompt, image(1), mask, num_inference_steps=2, progress=False,  # noqa: E731
                                          **kw).images  # fmt: skip
    m = square_mask()
    ref = run("a red circle", m)
    for layout in (m > 0.5, m[:, :, None], m[None], m[None, :, :, None], 0.6 * m):
        np.testing.assert_array_equal(run("a red circle", layout), ref)
    # one mask per prompt, each image per prompt repeated
    masks = np.stack([m, 1.0 - m])
    out = run(["a red circle", "a blue square"], masks, num_images_per_prompt=2)
    assert out.shape == (4, SIZE, SIZE, 3) and out.dtype == np.float32
    for k, mk in zip(range(4), [m, m, 1.0 - m, 1.0 - m]):
        np.testing.assert_array_equal(out[k][mk == 0], image(1)[mk == 0])


@pytest.mark.parametrize(
    "mask, error, match",
    [
        (np.zeros((SIZE, SIZE + 2)), ValueError, "H, W = 8, 8"),
        (np.zeros((3, SIZE, SIZE)), ValueError, "one per prompt"),
        (np.full((SIZE, SIZE), 255.0), ValueError, r"\[0, 1\]"),
        (np.full((SIZE, SIZE), np.nan), ValueError, r"\[0, 1\]"),
        (np.zeros((SIZE, SIZE), dtype=complex), TypeError, "dtype"),
        ("mask.png", TypeError, "mask must be an array"),
    ],
)
def test_mask_errors(models, mask, error, match):
    unet, text_encoder, tokenizer = models
    pipe = InpaintPipeline(unet, text_encoder, tokenizer, DDIMSampler())
    with pytest.raises(error, match=match):
        pipe("a red circle", image(1), mask, num_inference_steps=2, progress=False)


def test_other_errors(models):
    unet, text_encoder, tokenizer = models
    pipe = InpaintPipeline(unet, text_encoder, tokenizer, DDIMSampler())
    with pytest.raises(ValueError, match="resample_steps must be an int >= 1"):
        pipe("a red circle", image(1), square_mask(), resample_steps=0, progress=False)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
        pipe("a red circle", image(1), square_mask(), num_inference_steps=2.5, progress=False)
    with pytest.raises(ValueError, match="noise must have shape"):
        pipe("a red circle", image(1), square_mask(), noise=np.zeros((1, 4, 4, 3)), progress=False)
    with pytest.raises(ValueError, match=r"image values must lie in \[-1, 1\]"):
        pipe("a red circle", 3.0 * image(1), square_mask(), progress=False)


# ----------------------------------------------------------------------------- the real VAE
def test_real_vae_latent_inpainting_keeps_known_pixels_exactly():
    unet, text_encoder, tokenizer = tiny_models(in_channels=4)
    vae = tiny_vae()
    x = image(4, size=2 * SIZE)
    mask = square_mask(2 * SIZE, lo=5, hi=11)
    out = InpaintPipeline(unet, text_encoder, tokenizer, DDIMSampler(clip_sample=False), vae=vae)(
        "a red circle", x, mask, guidance_scale=2.0, num_inference_steps=3, progress=False)  # fmt: skip
    assert out.images.shape == (1, 2 * SIZE, 2 * SIZE, 3) and out.latents.shape == (1, SIZE, SIZE, 4)
    np.testing.assert_array_equal(out.images[0][mask == 0], x[mask == 0])
    assert np.abs(out.images[0][mask == 1] - x[mask == 1]).mean() > 0.05  # the hole was repainted
    assert out.images.min() >= -1 and out.images.max() <= 1


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("vae", [False, True])
def test_cupy_inpainting_matches_numpy(vae):
    unet, text_encoder, tokenizer = tiny_models(in_channels=4 if vae else 3)
    autoencoder = tiny_vae() if vae else None
    size = 2 * SIZE if vae else SIZE
    x, mask = image(4, size=size), square_mask(size, lo=2, hi=7)
    kwargs = dict(guidance_scale=3.0, num_inference_steps=4, seed=1, resample_steps=2, progress=False)
    ref = InpaintPipeline(unet, text_encoder, tokenizer, DDPMSampler(), vae=autoencoder)("a red circle", x, mask,
                                                                                         **kwargs)  # fmt: skip
    for module in (unet, text_encoder, autoencoder):
        if module is not None:
            module.to("cupy")
    got = InpaintPipeline(unet, text_encoder, tokenizer, DDPMSampler(), vae=autoencoder)("a red circle", x, mask,
                                                                                         **kwargs)  # fmt: skip
    assert isinstance(got.images, np.ndarray) and gpu_available()
    np.testing.assert_array_equal(got.images[0][mask == 0], x[mask == 0])
    np.testing.assert_allclose(got.images, ref.images, atol=2e-4)
