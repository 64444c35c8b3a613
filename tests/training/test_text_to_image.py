"""The text-to-image tasks (digits, shapes-vae, shapes) at the "tiny" preset: each learns, saves and reloads."""

import dataclasses

import numpy as np
import pytest

from diffusion_np.data.digits import digit_captions
from diffusion_np.io import load_checkpoint
from diffusion_np.optim import AdamW
from diffusion_np.training.configs import DigitsConfig, ShapesConfig, ShapesVAEConfig
from diffusion_np.training.model import TextToImageModel
from diffusion_np.training.presets import PRESETS, get_preset
from diffusion_np.training.tasks import DigitsTask, ShapesTask, ShapesVAETask, drop_captions
from diffusion_np.training.trainer import TrainConfig, Trainer
from diffusion_np.training.vae_helpers import latent_scaling_factor, load_vae, vae_reconstruction_mse


def tiny_train(task, **overrides) -> TrainConfig:
    return TrainConfig(**{**task.train_defaults_for(task.config), "checkpoint_every": 0, "sample_every": 0,
                          **overrides})


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A shapes-vae run of 3 tiny steps, as `train shapes-vae --preset tiny` writes it."""
    out = tmp_path_factory.mktemp("vae") / "run"
    rng = np.random.default_rng(0)
    task = ShapesVAETask(ShapesVAEConfig(preset="tiny"), rng)
    Trainer(task, tiny_train(task, steps=3), out_dir=out, rng=rng, progress=False).train()
    return out


def make_task(name, vae_run=None, **fields):
    rng = np.random.default_rng(0)
    if name == "digits":
        return DigitsTask(DigitsConfig(preset="tiny", **fields), rng)
    if name == "shapes-vae":
        return ShapesVAETask(ShapesVAEConfig(preset="tiny", **fields), rng)
    return ShapesTask(ShapesConfig(vae=str(vae_run), preset="tiny", **fields), rng)


@pytest.mark.parametrize("name", ["digits", "shapes-vae", "shapes"])
def test_overfits_one_fixed_batch(name, vae_run):
    """30 AdamW steps on one batch (same images, t, noise and caption dropout each step): the loss
    must fall to under half its first value. A broken backward (or one that misses a part) fails this."""
    task = make_task(name, vae_run)
    optimizer = AdamW(task.model, lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        task.model.zero_grad()
        losses.append(task.loss_and_backward(8, np.random.default_rng(123)))
        optimizer.step()
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", ["digits", "shapes"])
def test_text_encoder_gets_the_diffusion_gradient(name, vae_run):
    """After one step every text-encoder parameter has a gradient, and it is the right one: a
    directional finite difference of the loss along it (float64) matches grad . direction."""
    task = make_task(name, vae_run)
    task.model.to(dtype=np.float64)
    task.model.zero_grad()
    task.loss_and_backward(4, np.random.default_rng(7))
    grads = dict(task.model.text_encoder.named_grads())
    for key, g in grads.items():
        assert np.abs(g).max() > 0, f"{key} received no gradient"
    key = "text_model.encoder.layers.0.self_attn.v_proj.weight"
    grad = grads[key].copy()  # the loss evaluations below add into grads again
    direction = np.random.default_rng(1).standard_normal(grads[key].shape)
    param_owner = dict(task.model.text_encoder.named_modules())["text_model.encoder.layers.0.self_attn.v_proj."]
    w0 = param_owner.params["weight"].copy()
    h = 1e-5
    losses = []
    for sign in (1, -1):
        param_owner.params["weight"] = w0 + sign * h * direction
        losses.append(task.loss_and_backward(4, np.random.default_rng(7)))
    param_owner.params["weight"] = w0
    numeric = (losses[0] - losses[1]) / (2 * h)
    analytic = float(np.sum(grad * direction))
    assert abs(numeric - analytic) <= 1e-4 * max(1e-8, abs(analytic)), (numeric, analytic)


def test_caption_dropout_rate_and_use():
    rng = np.random.default_rng(0)
    captions = ["the digit one"] * 20000
    dropped = drop_captions(captions, 0.1, rng)
    rate = np.mean([c == "" for c in dropped])
    assert abs(rate - 0.1) < 0.01  # binomial std 0.002
    assert all(c in ("", "the digit one") for c in dropped)
    assert drop_captions(captions[:100], 0.0, rng) == captions[:100]
    with pytest.raises(ValueError, match="caption dropout must be in"):
        drop_captions(captions, 1.5, rng)

    # the task drops captions at its configured rate before tokenizing
    task = make_task("digits", caption_dropout=0.5)
    seen = []
    encode = task.model.tokenizer.encode
    task.model.tokenizer.encode = lambda texts: (seen.extend(texts), encode(texts))[1]
    task.loss_and_backward(400, np.random.default_rng(0))
    assert 0.4 < np.mean([c == "" for c in seen]) < 0.6
    assert set(seen) - {""} <= set(digit_captions(np.arange(10)))


def test_bundle_checkpoint_round_trip(vae_run, tmp_path):
    task = make_task("shapes", vae_run)
    model = task.model
    model.save(tmp_path / "bundle")
    config = load_checkpoint(tmp_path / "bundle").config
    assert config["kind"] == "text_to_image"
    assert config["vae"]["scaling_factor"] == task.config.scaling_factor
    assert config["schedule"]["beta_schedule"] == "scaled_linear"
    loaded = TextToImageModel.load(tmp_path / "bundle")
    assert loaded.model_config() == model.model_config()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ids = model.tokenizer.encode(["a small red circle in the top left", ""]).ids
    np.testing.assert_array_equal(loaded(x, np.array([3, 900]), ids), model(x, np.array([3, 900]), ids))
    for name, module in model.modules().items():
        for key, value in module.state_dict().items():
            np.testing.assert_array_equal(loaded.modules()[name].state_dict()[key], value)


def test_training_checkpoint_resumes_exactly_and_loads_as_a_bundle(vae_run, tmp_path):
    """4 straight steps == 2 steps, save, resume, 2 steps (the latent pool and every draw are seeded)."""
    def run(out, stop_at=None):
        task = make_task("shapes", vae_run)
        rng = np.random.default_rng(0)
        trainer = Trainer(task, tiny_train(task, steps=4), out_dir=out, rng=rng, progress=False)
        trainer.resume()
        trainer.train(stop_at)
        trainer.save_checkpoint()
        return trainer

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop_at=2)
    resumed = run(tmp_path / "b")
    assert straight.losses == resumed.losses
    a, b = load_checkpoint(tmp_path / "a" / "checkpoint"), load_checkpoint(tmp_path / "b" / "checkpoint")
    for module in ("unet", "text_encoder", "vae"):
        for key, value in a.weights[module].items():
            np.testing.assert_array_equal(value, b.weights[module][key])
    model = TextToImageModel.load(tmp_path / "a")  # a run directory: its EMA weights
    ema = a.training_state["ema"]["shadow"]
    np.testing.assert_array_equal(model.unet.conv_in.weight, ema["unet.conv_in.weight"])
    assert model.vae is not None and model.vae.scaling_factor == a.config["task_config"]["scaling_factor"]


def test_vae_metrics_and_scaling_factor(vae_run):
    vae = load_vae(vae_run)
    mse = vae_reconstruction_mse(vae, n=16, split="heldout")
    assert np.isfinite(mse) and mse > 0
    factor, std = latent_scaling_factor(vae, n=64, seed=3)
    assert factor == pytest.approx(1.0 / std)
    config = ShapesConfig(vae=str(vae_run), preset="tiny")
    assert config.scaling_factor == pytest.approx(latent_scaling_factor(vae)[0], rel=1e-6)
    assert config.vae_config["scaling_factor"] == config.scaling_factor
    assert config.unet["in_channels"] == 4 and config.unet["sample_size"] == 8  # 32x32 -> 8x8 latents


def test_prediction_type_and_min_snr_change_the_loss():
    base = make_task("digits").loss_and_backward(8, np.random.default_rng(0))
    weighted = make_task("digits", min_snr_gamma=5.0).loss_and_backward(8, np.random.default_rng(0))
    v = make_task("digits", prediction_type="v_prediction").loss_and_backward(8, np.random.default_rng(0))
    assert np.isfinite([base, weighted, v]).all()
    assert weighted < base  # epsilon weights min(SNR, 5) / SNR <= 1, < 1 at small t
    assert v != base


def test_samples_have_the_right_shape_and_range(vae_run, tmp_path):
    digits = make_task("digits")
    images = digits.sample("ddim", 2, 3, seed=0)
    assert images.shape == (3, 8, 8, 1) and images.min() >= -1 and images.max() <= 1
    shapes = make_task("shapes", vae_run)
    images = shapes.sample("euler", 2, 2, seed=0)
    assert images.shape == (2, 32, 32, 3)
    shapes.save_preview(tmp_path / "p.png", seed=0, title="t")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_configs_refuse_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        DigitsConfig(preset="huge")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DigitsConfig(preset="tiny", prediction_type="sample")
    with pytest.raises(ValueError, match="caption_dropout"):
        DigitsConfig(preset="tiny", caption_dropout=1.0)
    with pytest.raises(ValueError, match="--vae DIR"):
        ShapesConfig(preset="tiny")
    with pytest.raises(ValueError, match="no checkpoint at"):
        ShapesConfig(vae=str(tmp_path / "missing"), preset="tiny")


def test_presets_build_and_store_everything():
    for task, presets in PRESETS.items():
        for name in presets:
            preset = get_preset(task, name)
            TrainConfig(**preset["train"])  # valid training settings
    config = DigitsConfig(preset="demo")
    saved = dataclasses.asdict(config)
    assert DigitsConfig(**saved) == config  # a checkpoint's config rebuilds the same task
    assert config.text_encoder["hidden_size"] == config.unet["cross_attention_dim"]
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("digits", "huge")


def test_make_sampler_clips_x0_only_when_asked_and_only_in_pixel_space(vae_run):
    """Clipping x0 is off by default (it fights guidance, see make_sampler); latents are never clipped."""
    pixels = make_task("digits").model
    latents = make_task("shapes", vae_run).model
    assert pixels.make_sampler("ddim").clip_sample is False
    assert pixels.make_sampler("ddpm", clip_sample=True).clip_sample is True
    assert latents.make_sampler("ddim", clip_sample=True).clip_sample is False
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        pixels.make_sampler("plms")
