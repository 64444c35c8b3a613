"""Personalisation: LoRA, textual inversion and DreamBooth on pretrained:shapes, their checkpoints and CLI."""

import json

import numpy as np
import pytest
from helpers import check_subset, one_error_line

from diffusion_np.cli import main
from diffusion_np.io import load_checkpoint
from diffusion_np.io.checkpoint import CheckpointError
from diffusion_np.nn.lora import lora_layers
from diffusion_np.training.model import TextToImageModel
from diffusion_np.training.personalise import (
    DreamBoothTask,
    FinetuneConfig,
    LoRAFinetuneTask,
    TextualInversionTask,
    _check_lora_fits,
    _stored,
    _vae_rank,
    add_concept_token,
    apply_personalisation,
    augment_flip_shift,
    evaluate_personalised,
    load_personalised,
    parse_lora_spec,
    save_embedding,
)
from diffusion_np.training.trainer import TrainConfig, Trainer

TINY = ["--steps", "2", "--batch-size", "4", "--class-images", "4", "--invert-steps", "2", "--quiet"]
PROMPTS = ["a small red circle in the top left", "a large cyan triangle in the center"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs of the three methods, as `diffusion-np finetune` writes them."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method, concept in (("lora", "star"), ("textual-inversion", "orange"), ("dreambooth", "star")):
        out[method] = root / method
        assert main(["finetune", method, "--concept", concept, *TINY, "--out", str(out[method])]) == 0
    return out


def _nonzero_b(run_dir):
    """The run's LoRA with B moved off zero (two steps leave it tiny), saved back: a LoRA that changes images."""
    checkpoint = load_checkpoint(run_dir / "checkpoint")
    task = LoRAFinetuneTask(FinetuneConfig(**checkpoint.config["task_config"]), np.random.default_rng(0))
    checkpoint.load_weights(task.modules())
    rng = np.random.default_rng(1)
    layers = [*lora_layers(task.base.unet).values(), *lora_layers(task.base.vae).values()]
    assert len(layers) == 7 * 2 * 4 + 8 * 2 + len(lora_layers(task.base.vae)) and lora_layers(task.base.vae)
    for layer in layers:
        layer.lora_B["default"].weight[...] = 0.05 * rng.standard_normal(layer.lora_B["default"].weight.shape)
    return task


def test_a_new_token_leaves_every_other_prompt_as_it_was():
    model = TextToImageModel.load("pretrained:shapes")
    before = np.array(model.encode_text(PROMPTS))
    V = model.tokenizer.vocab_size
    token = add_concept_token(model, "star", np.ones(64))
    assert token == V and model.tokenizer.vocab_size == V + 1 and model.text_encoder.config.vocab_size == V + 1
    np.testing.assert_array_equal(np.array(model.encode_text(PROMPTS)), before)
    assert model.tokenizer.encode("a small red star in the top left").ids[0, 4] == token
    with pytest.raises(ValueError, match="already in the vocabulary"):
        add_concept_token(model, "star")
    with pytest.raises(ValueError, match="one lower-case word"):
        add_concept_token(model, "Two words")


def test_lora_at_scale_zero_gives_the_base_images_exactly(runs, tmp_path):
    task = _nonzero_b(runs["lora"])
    path = tmp_path / "lora"
    Trainer(task, TrainConfig(steps=1), out_dir=path, progress=False).save_checkpoint()
    base = TextToImageModel.load("pretrained:shapes")
    expected = base.generate(PROMPTS, "ddim", 3, 4.0, seed=3)
    for scale, same in ((0.0, True), (1.0, False)):
        model = TextToImageModel.load("pretrained:shapes")
        apply_personalisation(model, [(str(path), scale)])
        images = model.generate(PROMPTS, "ddim", 3, 4.0, seed=3)
        assert np.array_equal(images, expected) == same, scale


def test_only_the_learned_part_trains_and_is_saved(runs):
    lora = load_checkpoint(runs["lora"] / "checkpoint")
    keys = set(lora.weights["personal"])
    assert "token_row" in keys and all(k == "token_row" or ".lora_" in k for k in keys)
    # U-Net: 7 transformer blocks x (attn1, attn2) x 4 projections + 8 ResNet blocks x (conv1, conv2);
    # VAE decoder: conv_in, 8 ResNet blocks (2 in the mid block, 6 up) x (conv1, conv2), conv_out; each A and B
    assert len(keys) == 1 + 2 * (7 * 2 * 4 + 8 * 2) + 2 * (1 + 8 * 2 + 1)
    assert sum(k.startswith("vae.decoder.") for k in keys) == 2 * 18
    ti = load_checkpoint(runs["textual-inversion"] / "checkpoint")
    assert set(ti.weights["personal"]) == {"token_row"}
    db = load_checkpoint(runs["dreambooth"] / "checkpoint")
    assert len(db.weights["personal"]) > 100  # the whole U-Net
    for method, concept in (("lora", "star"), ("textual-inversion", "orange"), ("dreambooth", "star")):
        config = load_checkpoint(runs[method] / "checkpoint").config
        assert config["task"] == f"finetune-{method}" and config["task_config"]["concept"] == concept
        assert config["task_config"]["base"] == "pretrained:shapes"


def test_training_changes_only_what_the_method_trains():
    for cls, concept in ((LoRAFinetuneTask, "star"), (TextualInversionTask, "orange"), (DreamBoothTask, "star")):
        task = cls(FinetuneConfig(concept=concept, class_images=4, invert_steps=2), np.random.default_rng(0))
        unet_before = {k: v.copy() for k, v in task.base.unet.state_dict().items()}
        vae_before = {k: v.copy() for k, v in task.base.vae.state_dict().items()}
        text_before = {k: v.copy() for k, v in task.base.text_encoder.state_dict().items()}
        row_before = task.model.token_row.copy()
        Trainer(task, TrainConfig(steps=2, batch_size=4, warmup_steps=0, lr=1e-2, ema_decay=0.0),
                progress=False).train()
        unet_changed = {k for k, v in task.base.unet.state_dict().items() if not np.array_equal(v, unet_before[k])}
        text_changed = {k for k, v in task.base.text_encoder.state_dict().items()
                        if not np.array_equal(v, text_before[k])}
        row_changed = not np.array_equal(task.model.token_row, row_before)
        vae_changed = {k for k, v in task.base.vae.state_dict().items() if not np.array_equal(v, vae_before[k])}
        if cls is LoRAFinetuneTask:  # LoRA adapts the decoder; the others keep the VAE as shipped
            assert vae_changed and all(k.startswith("decoder.") and ".lora_" in k for k in vae_changed)
        else:
            assert not vae_changed and not lora_layers(task.base.vae)
        if cls is LoRAFinetuneTask:  # the adapters and (train_token, the default) the new word's row
            assert unet_changed and all(".lora_" in k for k in unet_changed) and row_changed
        elif cls is TextualInversionTask:
            assert not unet_changed and row_changed
            assert text_changed == {"text_model.embeddings.token_embedding.weight"}
            table = task.base.text_encoder.state_dict()["text_model.embeddings.token_embedding.weight"]
            np.testing.assert_array_equal(table[:-1], text_before["text_model.embeddings.token_embedding.weight"][:-1])
        else:
            assert len(unet_changed) > 100 and not row_changed
        if cls is DreamBoothTask:
            assert not text_changed
        else:  # only the new row of the token table moves
            assert text_changed == {"text_model.embeddings.token_embedding.weight"}


def test_textual_inversion_gradient_reaches_the_row_finite_differences():
    """d loss / d (the new token's row) through the frozen text encoder's hand-written backward, float64."""
    config = FinetuneConfig(concept="orange", class_images=4, invert_steps=2)
    task = TextualInversionTask(config, np.random.default_rng(0))
    base, weights = task.base, task.model
    base.unet.to("numpy", np.float64)
    base.text_encoder.to("numpy", np.float64)
    weights.to("numpy", np.float64)
    rng = np.random.default_rng(0)
    ids = base.tokenizer.encode(["a small orange circle in the top left", "a large orange square"]).ids
    x_t = rng.standard_normal((2, 8, 8, 4))
    t = np.array([10, 700])

    def forward(x):
        weights.sync()  # finite differences move token_row: the table must follow
        return base.unet(x, t, base.text_encoder(ids))

    def backward(dout):
        g = base.unet.backward(dout)
        base.text_encoder.backward(g.dcontext)
        weights.pull_grad()
        return (g.dx,)

    report = check_subset(forward, backward, [x_t], weights, k=8)
    assert set(report) == {"input0", "token_row"}
    assert max(report.values()) < 1e-6, report


def test_resume_continues_the_same_run(tmp_path):
    config = FinetuneConfig(concept="star", class_images=4, invert_steps=2)
    train = TrainConfig(steps=4, batch_size=4, warmup_steps=0, lr=1e-2, ema_decay=0.0, checkpoint_every=2)
    whole = LoRAFinetuneTask(config, np.random.default_rng(0))
    Trainer(whole, train, rng=np.random.default_rng(0), progress=False).train()
    half = LoRAFinetuneTask(FinetuneConfig(concept="star", class_images=4, invert_steps=2), np.random.default_rng(0))
    Trainer(half, train, out_dir=tmp_path, rng=np.random.default_rng(0), progress=False).train(stop_at=2)
    again = LoRAFinetuneTask(FinetuneConfig(concept="star", class_images=4, invert_steps=2), np.random.default_rng(0))
    trainer = Trainer(again, train, out_dir=tmp_path, progress=False)
    assert trainer.resume() and trainer.step == 2
    trainer.train()
    for key, value in whole.model.state_dict().items():
        np.testing.assert_array_equal(again.model.state_dict()[key], value, err_msg=key)


def test_evaluate_reports_concept_and_retention(runs):
    model = load_personalised(runs["lora"])
    base = TextToImageModel.load("pretrained:shapes")
    m = evaluate_personalised(model, base, "star", "ddim", 2, 4.0, per_shown=1, unseen=3)
    for key in ("concept_accuracy", "concept_unseen_accuracy", "retention_prompt_accuracy_all",
                "base_prompt_accuracy_all"):
        assert 0.0 <= m[key] <= 1.0
    assert m["concept_images"] == 8 and m["concept_unseen_images"] == 3 and m["retention_images"] == 180


def test_cli_sample_and_evaluate_json(runs, tmp_path, capsys, monkeypatch):
    per = {"colour": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0}
    stub = {"concept_accuracy": 1.0, "concept_unseen_accuracy": 1.0, "retention_prompt_accuracy_all": 1.0,
            "base_prompt_accuracy_all": 1.0, "concept_images": 32, "concept_unseen_images": 64,
            "retention_images": 180, **{f"{p}_per_attribute": per for p in ("concept", "concept_unseen",
                                                                             "retention", "base")}}
    monkeypatch.setattr("diffusion_np.training.personalise.evaluate_personalised", lambda *a, **k: stub)
    out = tmp_path / "r.json"
    assert main(["evaluate", "--checkpoint", "pretrained:shapes", "--lora", f"{runs['lora']}:0.5", "--embedding",
                 str(runs["textual-inversion"]), "--steps", "2", "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "personalised" and result["concept"] == "star"
    assert result["method"] == ["lora", "textual-inversion"] and result["lora"] == [f"{runs['lora']}:0.5"]
    png = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", "pretrained:shapes", "--lora", str(runs["lora"]), "--embedding",
                 str(runs["textual-inversion"]), "--prompt", "a large orange star in the center", "-n", "1",
                 "--steps", "2", "--quiet", "-o", str(png)]) == 0
    assert png.stat().st_size > 0
    assert main(["sample", "--checkpoint", str(runs["dreambooth"]), "--prompt", "a large red star in the center",
                 "-n", "1", "--steps", "2", "--quiet", "-o", str(png)]) == 0


def test_embedding_file_in_diffusers_layout(runs, tmp_path):
    task_model = load_checkpoint(runs["textual-inversion"] / "checkpoint")
    task = TextualInversionTask(FinetuneConfig(**task_model.config["task_config"]), np.random.default_rng(0))
    task_model.load_weights(task.modules())
    path = save_embedding(task, tmp_path / "learned_embeds.safetensors")
    model = TextToImageModel.load("pretrained:shapes")
    apply_personalisation(model, embedding=str(path))
    assert model.tokenizer.token_to_id["orange"] == model.tokenizer.vocab_size - 1
    np.testing.assert_array_equal(model.text_encoder.state_dict()["text_model.embeddings.token_embedding.weight"][-1],
                                  task.model.token_row[0])


def test_bad_input(runs, capsys, tmp_path):
    assert parse_lora_spec("runs/star:0.8") == ("runs/star", 0.8)
    assert parse_lora_spec("pretrained:shapes-lora-star") == ("pretrained:shapes-lora-star", 1.0)
    assert parse_lora_spec("pretrained:shapes-lora-star:0.5") == ("pretrained:shapes-lora-star", 0.5)
    model = TextToImageModel.load("pretrained:shapes")
    with pytest.raises(CheckpointError, match="not a fine-tuning run"):
        apply_personalisation(model, [("pretrained:shapes", 1.0)])
    with pytest.raises(CheckpointError, match="goes with --embedding"):
        apply_personalisation(model, [(str(runs["textual-inversion"]), 1.0)])
    apply_personalisation(model, [(str(runs["lora"]), 1.0)])
    with pytest.raises(CheckpointError, match="already has the word 'star'"):
        apply_personalisation(model, [(str(runs["lora"]), 1.0)])
    with pytest.raises(ValueError, match="concept must be one of"):
        FinetuneConfig(concept="heart")
    with pytest.raises(ValueError, match="num_images"):
        FinetuneConfig(num_images=3)
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "lora", "--concept", "heart", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    one_error_line(capsys, "invalid choice: 'heart'")
    assert main(["finetune", "lora", *TINY, "--out", str(runs["lora"])]) == 2
    one_error_line(capsys, "already holds a checkpoint", "--resume")
    assert main(["sample", "--checkpoint", "pretrained:shapes", "--lora", str(runs["lora"]), "-o",
                 str(tmp_path / "a.png")]) == 2
    one_error_line(capsys, "--lora and --embedding go with at least one --prompt")


def test_a_lora_run_that_does_not_fit_lists_every_problem(runs):
    config, weights = _stored(load_checkpoint(runs["lora"] / "checkpoint"), use_ema=True)
    a_key = next(k for k in weights if k.endswith("to_q.lora_A.weight"))
    conv_key = next(k for k in weights if k.endswith("conv1.lora_B.weight"))
    vae_key = next(k for k in weights if k.startswith("vae.") and k.endswith("conv_out.lora_A.weight"))
    weights = {**weights, a_key: np.zeros((3, 5), np.float32), conv_key: np.zeros((1, 1, 2, 2), np.float32),
               vae_key: np.zeros((3, 3, 32, 2), np.float32),
               "vae.decoder.nowhere.lora_B.weight": np.zeros((1, 1, 8, 3), np.float32),
               "unet.nowhere.lora_A.weight": np.zeros((8, 4), np.float32), "token_row": np.zeros((1, 7))}
    model = TextToImageModel.load("pretrained:shapes")
    add_concept_token(model, "star")
    with pytest.raises(CheckpointError) as info:
        _check_lora_fits(model, "x", config, weights)
    message = str(info.value)
    expected = ("already has the word 'star'", "token_row is (1, 7)", a_key, conv_key, vae_key,
                "the U-Net has no Linear or Conv2d layer nowhere",
                "the VAE has no Linear or Conv2d layer decoder.nowhere")
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert lora_layers(model.unet) == {} and lora_layers(model.vae) == {}  # nothing applied


def test_augment_flip_shift_against_a_loop():
    """The one-gather augmentation equals padding, cropping and flipping each copy in turn."""
    images = np.random.default_rng(0).standard_normal((3, 6, 5, 2))
    out = augment_flip_shift(images, 20, np.random.default_rng(1), max_shift=2, fill=-1.0)
    rng = np.random.default_rng(1)  # the same draws, in the function's order
    source = rng.integers(0, 3, 20)
    dy, dx = rng.integers(0, 5, (2, 20))
    flip = rng.random(20) < 0.5
    for k in range(20):  # shift (pad, crop), then flip
        padded = np.pad(images[source[k]], ((2, 2), (2, 2), (0, 0)), constant_values=-1.0)
        crop = padded[dy[k]:dy[k] + 6, dx[k]:dx[k] + 5]
        np.testing.assert_array_equal(out[k], crop[:, ::-1] if flip[k] else crop, err_msg=str(k))
    assert (out == -1.0).any() and not (out == -1.0).all()


def test_decoder_adapters_gradient_finite_differences():
    """Step 6: d loss_vae / d (the decoder's adapters) through the VAE decoder's hand-written backward, float64."""
    task = LoRAFinetuneTask(FinetuneConfig(concept="star", class_images=4, vae_batch=2), np.random.default_rng(0))
    vae = task.base.vae
    vae.to("numpy", np.float64)
    rng = np.random.default_rng(0)
    for layer in lora_layers(vae).values():  # B off zero, so that every A gets a gradient too
        layer.lora_B["default"].weight[...] = 0.05 * rng.standard_normal(layer.lora_B["default"].weight.shape)
    z = rng.standard_normal((2, 8, 8, 4))
    report = check_subset(lambda x: vae.decode(x), lambda d: (vae.decode_backward(d),), [z], vae, k=4)
    assert len(report) == 1 + 2 * len(lora_layers(vae))  # the input and every A and B
    assert max(report.values()) < 1e-6, report
    # the loss itself: each half's mean, the frozen decoder's drawings as the base half's targets
    vae.to("numpy", np.float32)
    (c_mean, _, c_target), (b_mean, _, b_target) = task.decoder_data()
    assert c_target.shape == (256, 32, 32, 3) and b_target.shape == (256 + 4, 32, 32, 3)  # renders + class images
    vae.zero_grad()
    loss = task.decoder_loss_and_backward(np.random.default_rng(1))
    assert np.isfinite(loss) and loss > 0
    grads = [g for name, _, g in vae.parameters_and_grads() if g is not None]
    assert grads and all(np.isfinite(g).all() for g in grads) and any(np.abs(g).max() > 0 for g in grads)


def test_vae_rank_of_a_run():
    assert _vae_rank("lora", {"vae_rank": None}) == 8 and _vae_rank("dreambooth", {"vae_rank": None}) == 0
    assert _vae_rank("dreambooth", {"vae_rank": 8}) == 8
    assert _vae_rank("textual-inversion", {"vae_rank": None}) == 0 and _vae_rank("lora", {"vae_rank": 4}) == 4
    assert _vae_rank("lora", {}) == 0  # a run saved before the decoder was adapted
    with pytest.raises(ValueError, match="vae_rank"):
        FinetuneConfig(vae_rank=-1)
    with pytest.raises(ValueError, match="vae_batch"):
        FinetuneConfig(vae_batch=1)


def test_share_data_reuses_the_other_runs_data():
    config = dict(concept="star", class_images=4)
    first = LoRAFinetuneTask(FinetuneConfig(**config), np.random.default_rng(0))
    second = LoRAFinetuneTask(FinetuneConfig(**config, rank=2), np.random.default_rng(0)).share_data(first)
    assert second.concept_data() is first.concept_data() and second.prior_data() is first.prior_data()
    assert second.decoder_data() is first.decoder_data()
    Trainer(second, TrainConfig(steps=1, batch_size=4, warmup_steps=0, ema_decay=0.0), progress=False).train()


def test_frozen_prior_target_is_the_base_unet():
    """prior_target="frozen": the class half's target is the shipped U-Net's prediction, which the adapted
    U-Net equals bit for bit before its first step (B = 0), so that half starts at zero loss."""
    task = LoRAFinetuneTask(FinetuneConfig(concept="star", class_images=4, prior_target="frozen", vae_rank=0),
                            np.random.default_rng(0))
    rng = np.random.default_rng(1)
    x_t, t = rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([5, 900])
    context = task.base.encode_text(["a small red circle in the top left", ""])
    np.testing.assert_array_equal(task.frozen_unet()(x_t, t, context), task.base.unet(x_t, t, context))
    loss = task.loss_and_backward(4, np.random.default_rng(2))
    assert np.isfinite(loss) and loss > 0
    with pytest.raises(ValueError, match="prior_target"):
        FinetuneConfig(prior_target="teacher")
