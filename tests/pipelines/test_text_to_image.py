"""Text-to-image: classifier-free guidance math and batching, every sampler, seeds, latent space, errors.

The test doubles defined here (tiny models, an analytic oracle denoiser, a spy, a linear
stand-in VAE) are shared with the image-to-image and inpainting tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_np.backend import gpu_available
from diffusion_np.models import TextEncoder, TextEncoderConfig, UNet2DConditionModel, WordTokenizer
from diffusion_np.pipelines import GuidedDenoiser, PipelineOutput, TextToImagePipeline
from diffusion_np.samplers import SAMPLERS, DDIMSampler, HeunSampler
from diffusion_np.samplers.loop import sample

CAPTIONS = ["a red circle", "a blue square", "a small green triangle"]
SIZE = 8  # pixels (pixel space) or latents (latent space); the tiny U-Net halves it once


# ----------------------------------------------------------------------------- test doubles
def tiny_models(in_channels: int = 3):
    """An untrained U-Net (2 levels, cross-attention), CLIP-shaped text encoder and word tokenizer."""
    tokenizer = WordTokenizer.from_captions(CAPTIONS, max_length=8)
    text_encoder = TextEncoder(TextEncoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=8,
    ), rng=np.random.default_rng(1))  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=SIZE, in_channels=in_channels, out_channels=in_channels, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
        norm_num_groups=4, rng=np.random.default_rng(2),
    )
    return unet, text_encoder, tokenizer


def oracle_alpha_bar(sampler, t) -> float:
    """alpha_bar at a (possibly fractional) timestep, as the sigma samplers interpolate it."""
    ab = sampler.alpha_bar
    sigmas = np.sqrt((1.0 - ab) / ab)
    sigma = float(np.interp(float(t), np.arange(len(ab)), sigmas))
    return 1.0 / (1.0 + sigma**2)


class Oracle:
    """The ideal denoiser of a data set holding one image x0: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab).

    Whatever x_t it sees, its x_0 estimate is x0, so any correct sampler ends at x0. It ignores the text.
    """

    num_upsamplers = 1

    def __init__(self, x0, sampler) -> None:
        self.x0 = np.asarray(x0, dtype=np.float32)
        self.sampler = sampler
        self.in_channels = self.x0.shape[-1]
        self.config = {"sample_size": self.x0.shape[1]}

    def __call__(self, sample, t, encoder_hidden_states):
        assert encoder_hidden_states.shape[0] == sample.shape[0]
        ab = oracle_alpha_bar(self.sampler, t)
        return ((sample - np.sqrt(ab) * self.x0) / np.sqrt(1.0 - ab)).astype(np.float32)


class Spy:
    """Wraps a U-Net and records (batch, t, sample, encoder_hidden_states) of every call."""

    def __init__(self, unet) -> None:
        self.unet = unet
        self.calls: list = []
        self.in_channels = unet.in_channels
        self.num_upsamplers = unet.num_upsamplers
        self.config = unet.config

    def named_parameters(self):
        return self.unet.named_parameters() if hasattr(self.unet, "named_parameters") else iter(())

    def __call__(self, sample, t, encoder_hidden_states):
        self.calls.append((sample.shape[0], t, sample.copy(), encoder_hidden_states.copy()))
        return self.unet(sample, t, encoder_hidden_states)


class FakeVAE:
    """A linear stand-in for AutoencoderKL: 2x2 mean-pool and a fixed 3 -> 4 channel map, and back.

    decode(encode(x)) is x averaged over 2x2 blocks. Counts its encodes and decodes.
    """

    downscale = 2
    in_channels = 3
    latent_channels = 4

    def __init__(self) -> None:
        self.A = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
        self.A_pinv = np.linalg.pinv(self.A).astype(np.float32)  # (4, 3), A @ A_pinv = I_3
        self.encodes = 0
        self.decodes = 0

    def encode_latents(self, x, sample_posterior: bool = True):
        assert sample_posterior is False, "pipelines encode with the posterior mean"
        self.encodes += 1
        B, H, W, C = x.shape
        pooled = x.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))
        return pooled @ self.A  # (B, H/2, W/2, 4)

    def decode_latents(self, z):
        self.decodes += 1
        x = z @ self.A_pinv  # (B, h, w, 3)
        return x.repeat(2, axis=1).repeat(2, axis=2)


def image(seed: int, size: int = SIZE, channels: int = 3) -> np.ndarray:
    """A smooth-ish test image in [-0.9, 0.9], (size, size, channels) float32."""
    rng = np.random.default_rng(seed)
    return (0.9 * np.tanh(rng.standard_normal((size, size, channels)))).astype(np.float32)


@pytest.fixture(scope="module")
def models():
    return tiny_models()


# ----------------------------------------------------------------------------- guidance
def _denoiser_inputs(models):
    unet, text_encoder, tokenizer = models
    emb = text_encoder(tokenizer.encode(["", "", "a red circle", "a blue square"]).ids)  # (4, L, D)
    uncond, cond = emb[:2], emb[2:]
    x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    return unet, cond, uncond, x


def test_guidance_zero_and_one_are_the_two_branches(models):
    unet, cond, uncond, x = _denoiser_inputs(models)
    eps_u, eps_c = unet(x, 500, uncond), unet(x, 500, cond)
    np.testing.assert_allclose(GuidedDenoiser(unet, cond, uncond, 0.0)(x, 500), eps_u, atol=1e-5)
    np.testing.assert_allclose(GuidedDenoiser(unet, cond, uncond, 1.0)(x, 500), eps_c, atol=1e-5)
    # without an unconditional embedding there is no guidance: the conditional output itself
    np.testing.assert_array_equal(GuidedDenoiser(unet, cond)(x, 500), eps_c)
    assert not np.allclose(eps_u, eps_c, atol=1e-3), "the text must change the prediction for this test to mean much"


def test_guidance_is_linear_in_w(models):
    unet, cond, uncond, x = _denoiser_inputs(models)
    out = {w: GuidedDenoiser(unet, cond, uncond, w)(x, 321) for w in (0.0, 1.0, 2.5, 7.5)}
    for w in (2.5, 7.5):
        np.testing.assert_allclose(out[w], out[0.0] + w * (out[1.0] - out[0.0]), atol=1e-4)
    assert out[7.5].dtype == np.float32


def test_both_branches_run_in_one_batch_negatives_first(models):
    unet, text_encoder, tokenizer = models
    spy = Spy(unet)
    pipe = TextToImagePipeline(spy, text_encoder, tokenizer, DDIMSampler())
    pipe(CAPTIONS[:2], negative_prompt=["a blue square", ""], guidance_scale=4.0, num_inference_steps=3,
         num_images_per_prompt=2, progress=False)  # fmt: skip
    assert [c[0] for c in spy.calls] == [8, 8, 8]  # 3 steps, one call each, 2 prompts x 2 images x 2 branches
    _, _, x_in, context = spy.calls[0]
    np.testing.assert_array_equal(x_in[:4], x_in[4:])  # the same x_t for both branches
    emb = text_encoder(tokenizer.encode(["a blue square", "", *CAPTIONS[:2]]).ids)
    expected = np.repeat(emb, 2, axis=0)  # negatives (per prompt), then prompts; each repeated per image
    np.testing.assert_allclose(context, expected, atol=1e-6)


def test_guidance_scale_one_skips_the_unconditional_branch(models):
    unet, text_encoder, tokenizer = models
    spy = Spy(unet)
    TextToImagePipeline(spy, text_encoder, tokenizer, DDIMSampler())(
        CAPTIONS, guidance_scale=1.0, num_inference_steps=2, progress=False)  # fmt: skip
    assert [c[0] for c in spy.calls] == [3, 3]


def test_heun_calls_the_batched_model_twice_per_step(models):
    unet, text_encoder, tokenizer = models
    spy = Spy(unet)
    TextToImagePipeline(spy, text_encoder, tokenizer, HeunSampler())("a red circle", num_inference_steps=4,
                                                                     progress=False)  # fmt: skip
    assert [c[0] for c in spy.calls] == [2] * 7  # 2N - 1 calls, each of 2B


def test_pipeline_equals_a_loop_with_two_separate_model_calls(models):
    # the batched (2B) call must give what the textbook two-call CFG loop gives
    unet, text_encoder, tokenizer = models
    w, steps, seed = 6.0, 4, 11
    got = TextToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler())(
        CAPTIONS[:2], guidance_scale=w, num_inference_steps=steps, seed=seed, progress=False)  # fmt: skip
    cond = text_encoder(tokenizer.encode(CAPTIONS[:2]).ids)
    uncond = text_encoder(tokenizer.encode(["", ""]).ids)

    def two_calls(x, t):
        eps_u, eps_c = unet(x, t, uncond), unet(x, t, cond)
        return eps_u + w * (eps_c - eps_u)

    ref = sample(two_calls, (2, SIZE, SIZE, 3), DDIMSampler(), steps, seed=seed, progress=False)
    np.testing.assert_allclose(got.latents, ref, atol=1e-4)


# ----------------------------------------------------------------------------- samplers and the oracle
# PNDM (PLMS) combines eps from earlier steps; for the one-image oracle those eps belong to other x_t,
# so its x0 is not exactly the image (0.04 off at 10 steps): a property of linear multistep, not a bug
@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"pndm"}))
def test_every_sampler_reproduces_the_oracle_image(models, name):
    _, text_encoder, tokenizer = models
    target = image(3)[None]  # (1, 8, 8, 3)
    sampler = SAMPLERS[name]()
    pipe = TextToImagePipeline(Oracle(target, sampler), text_encoder, tokenizer, sampler)
    out = pipe(CAPTIONS[:2], guidance_scale=5.0, num_inference_steps=10, progress=False)
    assert out.images.shape == (2, SIZE, SIZE, 3) and out.images.dtype == np.float32
    np.testing.assert_allclose(out.images, np.broadcast_to(target, out.images.shape), atol=2e-3)


def test_oracle_in_latent_space_decodes_to_the_oracle_latent(models):
    _, text_encoder, tokenizer = models
    vae = FakeVAE()
    target_pixels = image(4, size=2 * SIZE)[None]  # (1, 16, 16, 3)
    target = vae.encode_latents(target_pixels, sample_posterior=False)  # (1, 8, 8, 4)
    sampler = DDIMSampler(clip_sample=False)
    pipe = TextToImagePipeline(Oracle(target, sampler), text_encoder, tokenizer, sampler, vae=vae)
    out = pipe("a red circle", num_inference_steps=8, progress=False, return_trajectory=True)
    assert out.images.shape == (1, 2 * SIZE, 2 * SIZE, 3) and out.latents.shape == (1, SIZE, SIZE, 4)
    np.testing.assert_allclose(out.latents, target, atol=1e-4)
    np.testing.assert_allclose(out.images, np.clip(vae.decode_latents(target), -1, 1), atol=1e-4)
    # the trajectory stays in latent space until asked for, and then decodes only what is kept
    assert vae.decodes == 2  # the final image (and the reference just above)
    frames = out.trajectory_images("x0_pred", every=3)
    assert vae.decodes == 2 + 4 and len(frames) == 4  # entries 0, 3, 6 and the last, 7
    assert frames[0].shape == (1, 2 * SIZE, 2 * SIZE, 3)


def test_trajectory_lengths_and_pixel_frames(models):
    unet, text_encoder, tokenizer = models
    out = TextToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler())(
        "a red circle", num_inference_steps=5, progress=False, return_trajectory=True)  # fmt: skip
    traj = out.trajectory
    assert len(traj.x_t) == 6 and len(traj.x0_pred) == 5 and traj.timesteps.tolist() == [800, 600, 400, 200, 0]
    np.testing.assert_array_equal(traj.x_t[-1], out.latents)
    frames = out.trajectory_images("x_t", every=2)
    assert len(frames) == 4  # entries 0, 2, 4 and the last, 5
    np.testing.assert_array_equal(frames[-1], out.latents)
    with pytest.raises(ValueError, match="which"):
        out.trajectory_images("eps")
    no_traj = PipelineOutput(out.images, out.prompts)
    with pytest.raises(ValueError, match="return_trajectory=True"):
        no_traj.trajectory_images()


# ----------------------------------------------------------------------------- seeds and outputs
def test_seed_determines_the_images(models):
    unet, text_encoder, tokenizer = models
    pipe = TextToImagePipeline(unet, text_encoder, tokenizer, SAMPLERS["euler-a"]())
    run = lambda **kw: pipe("a blue square", num_inference_steps=3, progress=False, **kw).images  # noqa: E731
    a, b, c = run(seed=7), run(seed=7), run(seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # the initial z can be given instead (with a deterministic sampler, it is all the randomness there is)
    ddim = TextToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler())
    z = np.random.default_rng(7).standard_normal((1, SIZE, SIZE, 3))  # the seed's first draw
    np.testing.assert_array_equal(ddim("a blue square", num_inference_steps=3, progress=False, noise=z).images,
                                  ddim("a blue square", num_inference_steps=3, progress=False, seed=7).images)


def test_images_per_prompt_are_grouped_and_differ(models):
    unet, text_encoder, tokenizer = models
    out = TextToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler())(
        CAPTIONS[:2], num_inference_steps=2, num_images_per_prompt=3, progress=False)  # fmt: skip
    assert out.prompts == [CAPTIONS[0]] * 3 + [CAPTIONS[1]] * 3
    assert out.images.shape == (6, SIZE, SIZE, 3)
    assert not np.allclose(out.images[0], out.images[1])
    assert out.images.min() >= -1.0 and out.images.max() <= 1.0
    u8 = out.to_uint8()
    assert u8.dtype == np.uint8 and u8.shape == out.images.shape


def test_size_defaults_and_overrides(models):
    unet, text_encoder, tokenizer = models
    pipe = TextToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler())
    assert pipe("a red circle", num_inference_steps=1, progress=False).images.shape == (1, SIZE, SIZE, 3)
    out = pipe("a red circle", num_inference_steps=1, height=4, width=12, progress=False)
    assert out.images.shape == (1, 4, 12, 3)
    latent = TextToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler(), vae=FakeVAE())
    assert latent.vae_scale_factor == 2 and latent.unet_factor == 2


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompt=[]), ValueError, "empty list"),
        (dict(prompt=3), TypeError, "string or a list"),
        (dict(prompt=["a", None]), TypeError, "entry 1"),
        (dict(guidance_scale=0.5), ValueError, "w = 1 is the text-conditional model alone"),
        (dict(guidance_scale=float("nan")), ValueError, ">= 1"),
        (dict(negative_prompt=["a", "b"]), ValueError, "negative_prompt has 2 entries but prompt has 1"),
        (dict(height=7), ValueError, "divisible by 2"),
        (dict(width=0), ValueError, "positive int"),
        (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
        (dict(num_inference_steps=0), ValueError, "steps"),
        (dict(noise=np.zeros((2, SIZE, SIZE, 3))), ValueError, "noise must have shape"),
    ],
)
def test_errors(models, kwargs, error, match):
    unet, text_encoder, tokenizer = models
    pipe = TextToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler())
    kwargs = {"prompt": "a red circle", "num_inference_steps": 2, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        pipe(**kwargs)


def test_latent_size_error_names_both_factors(models):
    unet, text_encoder, tokenizer = tiny_models(in_channels=4)
    pipe = TextToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler(), vae=FakeVAE())
    with pytest.raises(ValueError, match="VAE downsamples by 2 and the U-Net by 2"):
        pipe("a red circle", height=18, width=16, num_inference_steps=1, progress=False)


def test_negative_prompt_without_guidance_warns_and_bad_sampler_is_refused(models):
    unet, text_encoder, tokenizer = models
    pipe = TextToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler())
    with pytest.warns(UserWarning, match="no effect with guidance_scale=1"):
        pipe("a red circle", negative_prompt="blue", guidance_scale=1.0, num_inference_steps=1, progress=False)
    with pytest.raises(TypeError, match="Sampler"):
        TextToImagePipeline(unet, text_encoder, tokenizer, "ddim")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cupy_matches_numpy():
    unet, text_encoder, tokenizer = tiny_models()
    kwargs = dict(guidance_scale=4.0, num_inference_steps=4, seed=3, progress=False, num_images_per_prompt=2)
    ref = TextToImagePipeline(unet, text_encoder, tokenizer, SAMPLERS["dpm++"]())(CAPTIONS[:2], **kwargs)
    unet.to("cupy")
    text_encoder.to("cupy")
    got = TextToImagePipeline(unet, text_encoder, tokenizer, SAMPLERS["dpm++"]())(CAPTIONS[:2], **kwargs)
    assert isinstance(got.images, np.ndarray) and gpu_available()
    np.testing.assert_allclose(got.images, ref.images, atol=1e-4)


def test_pipeline_runs_forward_only_and_restores_training_mode():
    unet, text_encoder, tokenizer = tiny_models()
    pipe = TextToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler(clip_sample=False))
    pipe(CAPTIONS[:1], num_inference_steps=2, guidance_scale=2.0, progress=False)
    for model in (unet, text_encoder):  # no backward cache survives sampling ...
        assert all(m._cache is None for _, m in model.named_modules())
        assert all(m._keep_cache for _, m in model.named_modules())  # ... and training mode is back
    x = np.zeros((1, SIZE, SIZE, 3), np.float32)
    out = unet(x, 5, text_encoder(tokenizer.encode(CAPTIONS[:1]).ids))
    unet.backward(np.ones_like(out))  # still trainable


@pytest.mark.parametrize("w", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_a_non_finite_guidance_weight_is_refused_by_every_entry_point(models, w):
    """GuidedDenoiser, the three pipelines and the sampling loop all refuse NaN/Inf at entry, naming the
    argument, instead of returning all-NaN images."""
    from diffusion_np.pipelines import ImageToImagePipeline, InpaintPipeline

    unet, text_encoder, tokenizer = models
    image = np.zeros((1, SIZE, SIZE, 3), dtype=np.float32)
    calls = {
        "text-to-image": lambda: TextToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler())(
            "a", guidance_scale=w, num_inference_steps=2, progress=False),
        "image-to-image": lambda: ImageToImagePipeline(unet, text_encoder, tokenizer, DDIMSampler())(
            "a", image, guidance_scale=w, num_inference_steps=2, progress=False),
        "inpaint": lambda: InpaintPipeline(unet, text_encoder, tokenizer, DDIMSampler())(
            "a", image, np.ones((SIZE, SIZE), np.float32), guidance_scale=w, num_inference_steps=2, progress=False),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            call()
            pytest.fail(f"{name} accepted guidance_scale={w}")
    pair = lambda x, t: (0.1 * x, 0.2 * x)  # noqa: E731
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        sample(pair, (1, 2, 2, 1), DDIMSampler(), 2, progress=False, guidance=w)
    with pytest.raises(TypeError, match="guidance must be a number or None, got str"):
        sample(pair, (1, 2, 2, 1), DDIMSampler(), 2, progress=False, guidance="2")
