"""The device audit: training steps, every sampler, every pipeline and evaluate, run on the strict device.

The strict device (diffusion_np/testing/strict_backend.py) is NumPy under CuPy's rules: an implicit
device -> host copy (``np.asarray(x)``, ``float(x)``, ``if x:``, ``x.item()``), a NumPy function applied
to a device array, or a host array mixed into device arithmetic raises DeviceRuleError. So this suite,
on a CPU, fails where a GPU run would raise or stall on a synchronisation. It also counts copies: a
sampler step makes no device -> host copy, and uploads no more than its noise and a few scalars.

``pytest -m device_audit`` runs just this file (it is part of ``make test``).
"""

from __future__ import annotations

import numpy as np
import pytest
from pipelines.test_inpaint import tiny_vae as inpaint_vae
from pipelines.test_text_to_image import CAPTIONS, SIZE  # SIZE: the sample side (latents of a 2x VAE)
from pipelines.test_text_to_image import tiny_models as pipeline_models

from diffusion_np.backend import asnumpy, get_xp, to_device
from diffusion_np.metrics.evaluate import evaluate_checkpoint
from diffusion_np.models.controlnet import ControlNetModel
from diffusion_np.optim import EMA, AdamW, clip_grad_norm
from diffusion_np.pipelines import ControlNetPipeline, ImageToImagePipeline, InpaintPipeline, TextToImagePipeline
from diffusion_np.pipelines.prompt_to_prompt import prompt_to_prompt
from diffusion_np.restoration import dps_restore, make_degradation
from diffusion_np.samplers import SAMPLERS
from diffusion_np.samplers.loop import sample
from diffusion_np.testing import strict_backend as strict
from diffusion_np.testing.strict_backend import DeviceRuleError, count_transfers
from diffusion_np.training.configs import DigitsConfig, ShapesConfig, ShapesVAEConfig
from diffusion_np.training.controlnet import ShapesControlNetConfig, ShapesControlNetTask
from diffusion_np.training.distill import LCMDistillConfig, LCMDistillTask
from diffusion_np.training.model import TextToImageModel
from diffusion_np.training.personalise import FinetuneConfig, LoRAFinetuneTask, TextualInversionTask
from diffusion_np.training.tasks import DigitsTask, ShapesTask, ShapesVAETask
from diffusion_np.training.toy2d import Toy2DConfig, Toy2DTask
from diffusion_np.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.device_audit

PROMPTS = CAPTIONS[:2]  # a batch of 2

SMALL_BYTES = 8192  # what a step may upload beyond its noise


def tiny_models(in_channels: int = 3):
    """The pipeline tests' untrained U-Net (2 levels, cross-attention), text encoder and tokenizer, on strict."""
    unet, text_encoder, tokenizer = pipeline_models(in_channels)
    return unet.to("strict"), text_encoder.to("strict"), tokenizer


def tiny_vae():
    return inpaint_vae().to("strict")


class AuditedUNet:
    """Wraps a U-Net: before each call, checks the copies made since the previous one (one sampler step)."""

    def __init__(self, unet, counter, noise_bytes: int) -> None:
        self.unet, self.counter, self.noise_bytes, self.calls = unet, counter, noise_bytes, 0

    def __getattr__(self, name):  # config, in_channels, named_parameters, ...: the U-Net's
        return getattr(self.unet, name)

    def __call__(self, sample, t, encoder_hidden_states, **residuals):  # residuals: a ControlNet's, passed on
        assert strict.is_strict(sample) and strict.is_strict(encoder_hidden_states)
        c = self.counter
        if self.calls > 0:  # what the previous step did: the prologue (text, first noise) is not a step
            assert c.d2h == 0, f"a step before t={t} copied {c.d2h} arrays to the host"
            # the step's noise (drawn on the host, so a seed means the same on every device), then only
            # scalars and small constants (timesteps, schedule values, resampling taps): no weights, no images
            assert c.h2d_bytes <= self.noise_bytes + SMALL_BYTES, f"a step uploaded {c.h2d_bytes} B in {c.h2d} copies"
        c.reset()
        self.calls += 1
        out = self.unet(sample, t, encoder_hidden_states, **residuals)
        assert strict.is_strict(out)
        return out


# ----------------------------------------------------------------------------- the audit catches each mistake
def test_each_kind_of_mistake_is_caught():
    x = to_device(np.linspace(-1.0, 1.0, 6).reshape(2, 3), "strict")
    xp = get_xp(x)
    host = np.ones(3)

    def sums_in_a_loop(x):
        total = 0.0
        for row in x:
            total += float(row.sum())  # a sync per row
        return total

    mistakes = {
        "np.asarray": lambda: np.asarray(x),
        "np.array": lambda: np.array(x),
        "if on an array": lambda: 1 if (x > 0).any() else 0,
        "float in a loop": lambda: sums_in_a_loop(x),
        "int": lambda: int(x[0, 0]),
        "index": lambda: [0, 1, 2][x[0, 0].astype(np.int64)],
        ".item()": lambda: x.sum().item(),
        ".tolist()": lambda: x.tolist(),
        "format": lambda: f"{x.mean():.3f}",
        "NumPy ufunc": lambda: np.exp(x),
        "NumPy function": lambda: np.concatenate([x, x]),
        "NumPy reduction": lambda: np.sum(x),
        "host array in arithmetic": lambda: x * host,
        "host array on the left": lambda: host + x,
        "host array into xp": lambda: xp.maximum(x, host),
        "Python max": lambda: max(x[0, 0], 0.0),
    }
    for what, mistake in mistakes.items():
        with pytest.raises(DeviceRuleError):
            mistake()
            pytest.fail(f"not caught: {what}")


def test_what_cupy_allows_still_works_and_copies_are_counted():
    with count_transfers() as counter:
        x = to_device(np.arange(6.0).reshape(2, 3), "strict")  # 1 upload
        xp = get_xp(x)
        y = xp.exp(x) * np.float32(2.0) + 1.0  # NumPy scalars and Python floats are fine
        y = np.float64(0.5) * y - xp.asarray(3.0)  # 1 upload (a host scalar)
        y[0, :] = 0.0
        z = xp.concatenate([y, x[::-1]], axis=0)
        assert strict.is_strict(z) and strict.is_strict(z.sum()) and z.shape == (4, 3)
        assert counter.d2h == 0 and counter.h2d == 2
        out = asnumpy(z)  # the one deliberate way back
    assert type(out) is np.ndarray and counter.d2h == 1
    np.testing.assert_allclose(out[2:], np.arange(6.0).reshape(2, 3)[::-1])


# ----------------------------------------------------------------------------- training steps
def test_unet_text_to_image_training_step():
    task = DigitsTask(DigitsConfig(preset="tiny"), np.random.default_rng(0))
    task.model.to("strict")
    optimizer, ema = AdamW(task.model, lr=1e-3), EMA(task.model)
    with count_transfers() as counter:
        task.model.zero_grad()
        loss = task.loss_and_backward(4, np.random.default_rng(1))
        clip_grad_norm(task.model, 1.0)
        optimizer.step()
        ema.update()
    assert isinstance(loss, float) and np.isfinite(loss)
    # the logged loss, the clip's norm, and the id range check of the two embedding tables; nothing per layer
    assert counter.d2h <= 4, counter


def _audited_steps(task, batch_size: int, steps: int = 1):
    """``steps`` optimizer steps of ``task`` (zero_grad, loss_and_backward, AdamW) inside ``count_transfers``:
    (the last loss, the counter)."""
    optimizer = AdamW(task.model, lr=1e-3)
    with count_transfers() as counter:
        for _ in range(steps):
            task.model.zero_grad()
            loss = task.loss_and_backward(batch_size, np.random.default_rng(1))
            optimizer.step()
    assert isinstance(loss, float) and np.isfinite(loss)
    return loss, counter


def test_vae_training_step():
    task = ShapesVAETask(ShapesVAEConfig(preset="tiny"), np.random.default_rng(0))
    task.model.to("strict")
    _, counter = _audited_steps(task, 2)
    assert counter.d2h <= 1, counter


def test_controlnet_training_step():
    task = ShapesControlNetTask(ShapesControlNetConfig(preset="tiny"), np.random.default_rng(0)).to("strict")
    task._control_pool()  # encoded once, before the steps (its deliberate copies are not a step's)
    _, counter = _audited_steps(task, 2)
    assert counter.d2h <= 3, counter  # the loss, the id range check of the text encoder's two embedding tables


def test_lcm_distillation_step():
    """Teacher (guided, 2B), target and student forwards, the student's backward, the target's EMA update."""
    task = LCMDistillTask(LCMDistillConfig(preset="tiny"), np.random.default_rng(0)).to("strict")
    task.teacher_task._latent_pool()  # encoded once, before the steps (its deliberate copies are not a step's)
    _, counter = _audited_steps(task, 2, steps=2)  # the second step updates the target network first
    assert counter.d2h <= 6, counter  # per step: the loss, the id range check of the two embedding tables


@pytest.mark.parametrize("method", ["lora", "textual-inversion"])
def test_personalisation_training_step(method):
    cls = LoRAFinetuneTask if method == "lora" else TextualInversionTask
    task = cls(FinetuneConfig(concept="star", class_images=4, invert_steps=2), np.random.default_rng(0)).to("strict")
    task.concept_data(), task.prior_data()  # inverted and generated once, before the steps
    if method == "lora":  # LoRA's decoder data and frozen U-Net (the class images' target), also made once
        task.decoder_data(), task.frozen_unet()
    _, counter = _audited_steps(task, 4)
    # the loss, the id range check of the text encoder's two embedding tables, min_snr_weights' one (3 without it);
    # LoRA: and the decoder's loss
    assert counter.d2h <= (5 if method == "lora" else 4), counter


# ----------------------------------------------------------------------------- every sampler
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_loop_makes_no_host_copies(name):
    unet, text_encoder, tokenizer = tiny_models()
    context = text_encoder(to_device(tokenizer.encode(PROMPTS).ids, "strict"))
    kwargs = {"eta": 1.0} if name == "ddim" else {}  # DDIM with noise too
    shape = (2, SIZE, SIZE, 3)
    with count_transfers() as counter:
        audited = AuditedUNet(unet, counter, noise_bytes=int(np.prod(shape)) * 4)
        x0 = sample(lambda x, t: audited(x, t, context), shape, SAMPLERS[name](), 4, xp=strict.xp, progress=False,
                    **kwargs)  # fmt: skip
        audited(x0, 0, context)  # checks the last step
    assert strict.is_strict(x0) and audited.calls >= 5


# ----------------------------------------------------------------------------- every pipeline
@pytest.fixture(scope="module")
def latent_models():
    unet, text_encoder, tokenizer = tiny_models(in_channels=4)
    return unet, text_encoder, tokenizer, tiny_vae()


def run_pipeline(pipeline, *args, noises_per_step=1, **kwargs):
    """Run with a step audit on the pipeline's sampling loop (2 prompts, guided, 4 steps)."""
    unet = pipeline.unet
    noise_bytes = noises_per_step * 2 * SIZE * SIZE * unet.in_channels * 4  # float32 (2, h, w, C)
    with count_transfers() as total, count_transfers() as per_step:
        pipeline.unet = AuditedUNet(unet, per_step, noise_bytes)
        try:
            out = pipeline(*args, guidance_scale=3.0, num_inference_steps=4, progress=False, **kwargs)
        finally:
            pipeline.unet = unet
    assert type(out.images) is np.ndarray
    # outside the loop: the id range check of the text encoder's two embeddings, the input image's (and
    # mask's) range check, the final images
    assert total.d2h <= 5, total
    return out


def test_text_to_image_with_guidance(latent_models):
    unet, text_encoder, tokenizer, vae = latent_models
    pipe = TextToImagePipeline(unet, text_encoder, tokenizer, SAMPLERS["ddim"](), vae=vae)
    out = run_pipeline(pipe, PROMPTS)
    assert out.images.shape == (2, 2 * SIZE, 2 * SIZE, 3)


def test_image_to_image(latent_models):
    unet, text_encoder, tokenizer, vae = latent_models
    image = np.random.default_rng(0).uniform(-1, 1, (2 * SIZE, 2 * SIZE, 3)).astype(np.float32)
    pipe = ImageToImagePipeline(unet, text_encoder, tokenizer, SAMPLERS["euler"](), vae=vae)
    out = run_pipeline(pipe, PROMPTS, image, strength=0.8)
    assert out.images.shape == (2, 2 * SIZE, 2 * SIZE, 3)


def test_inpainting(latent_models):
    unet, text_encoder, tokenizer, vae = latent_models
    image = np.random.default_rng(0).uniform(-1, 1, (2 * SIZE, 2 * SIZE, 3)).astype(np.float32)
    mask = np.zeros((2 * SIZE, 2 * SIZE), dtype=np.float32)
    mask[4:12, 4:12] = 1.0
    pipe = InpaintPipeline(unet, text_encoder, tokenizer, SAMPLERS["ddpm"](), vae=vae)
    out = run_pipeline(pipe, PROMPTS, image, mask, resample_steps=2, noises_per_step=3)  # z, known, jump back
    assert out.images.shape == (2, 2 * SIZE, 2 * SIZE, 3)


def test_controlnet_pipeline(latent_models):
    unet, text_encoder, tokenizer, vae = latent_models  # a 2x VAE: the control image is 2x the latent
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(4, 8))
    control = np.random.default_rng(0).random((2 * SIZE, 2 * SIZE, 1)).astype(np.float32)
    pipe = ControlNetPipeline(unet, controlnet, text_encoder, tokenizer, SAMPLERS["dpm++"](), vae=vae)
    out = run_pipeline(pipe, PROMPTS, control, conditioning_scale=0.7)
    assert out.images.shape == (2, 2 * SIZE, 2 * SIZE, 3)


# ----------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-step runs of the evaluated tasks (and the shapes VAE), trained by the Trainer on the strict device:
    the whole loop (EMA, clipping, the final checkpoint and preview) with no implicit host copy."""
    root = tmp_path_factory.mktemp("audit")
    tasks = {
        "digits": lambda: DigitsTask(DigitsConfig(preset="tiny"), np.random.default_rng(0)),
        "vae": lambda: ShapesVAETask(ShapesVAEConfig(preset="tiny"), np.random.default_rng(0)),
        "shapes": lambda: ShapesTask(ShapesConfig(preset="tiny", vae=str(root / "vae")), np.random.default_rng(0)),
        "toy2d": lambda: Toy2DTask(Toy2DConfig(hidden=8, depth=1), np.random.default_rng(0)),
        "shapes-controlnet": lambda: ShapesControlNetTask(ShapesControlNetConfig(preset="tiny"),
                                                          np.random.default_rng(0)),
        "lcm": lambda: LCMDistillTask(LCMDistillConfig(preset="tiny"), np.random.default_rng(0)),
    }
    for name, make in tasks.items():  # in order: shapes needs the VAE run
        task = make()
        for module in task.modules().values():
            module.to("strict")
        if name in ("shapes-controlnet", "lcm"):
            task.to("strict")  # and its frozen base or teacher, which its checkpoint names but does not hold
        defaults = task.train_defaults_for(task.config) if hasattr(task, "train_defaults_for") else {}
        config = TrainConfig(**{**defaults, "steps": 2, "batch_size": 4, "checkpoint_every": 0, "sample_every": 0})
        losses = Trainer(task, config, out_dir=root / name, rng=np.random.default_rng(1), progress=False).train()
        assert len(losses) == 2 and np.all(np.isfinite(losses))
    return root


@pytest.mark.parametrize("name", ["digits", "shapes", "toy2d", "shapes-controlnet", "lcm"])
def test_evaluate(runs, name):
    kwargs = {"heldout_samples": 2} if name in ("shapes", "lcm") else {}
    if name == "lcm":
        kwargs["sampler"] = "lcm"
    on_strict = evaluate_checkpoint(runs / name, steps=2, num_samples=4, device="strict", **kwargs)
    on_numpy = evaluate_checkpoint(runs / name, steps=2, num_samples=4, **kwargs)
    assert flat(on_strict["metrics"]) == pytest.approx(flat(on_numpy["metrics"]), rel=1e-4, abs=1e-5)


def flat(metrics: dict) -> dict:
    """{"a.b": number}: nested dicts and lists of a result's metrics flattened for pytest.approx."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flat(value).items()})
        elif isinstance(value, list):
            out.update({f"{key}.{i}": v for i, v in enumerate(value)})
        elif value is not None and not isinstance(value, str):
            out[key] = value
    return {k: v for k, v in out.items() if v is not None}  # a None on one side only: the keys differ


# ----------------------------------------------------------------------------- repair and editing
def _latent_bundle(latent_models):
    unet, text_encoder, tokenizer, vae = latent_models
    schedule = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    return TextToImageModel(unet, text_encoder, tokenizer, schedule, vae)


def test_diffusion_posterior_sampling(latent_models):
    # every step runs the U-Net's and the decoder's backward on the device and copies nothing back
    model = _latent_bundle(latent_models)
    op = make_degradation("superres", 2 * SIZE, 3, factor=2)
    y = op.degrade(np.random.default_rng(0).uniform(-1, 1, (2, 2 * SIZE, 2 * SIZE, 3)).astype(np.float32), 0)
    with count_transfers() as total:
        out = dps_restore(model, op, y, steps=3, zeta=0.5, repeats=2)
    assert out.images.shape == (2, 2 * SIZE, 2 * SIZE, 3) and len(out.residual_norms) == 3
    assert total.d2h <= 4, total  # the text encoder's id check, the images and the residual norms, once each


def test_prompt_to_prompt(latent_models):
    model = _latent_bundle(latent_models)
    src, edited = prompt_to_prompt(model, PROMPTS, PROMPTS[::-1], steps=3, guidance_scale=3.0)
    assert src.shape == edited.shape == (2, 2 * SIZE, 2 * SIZE, 3)
