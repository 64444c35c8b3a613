"""The shapes-controlnet task: training on pretrained:shapes, sampling under a control image, evaluation, bad input."""

import json

import numpy as np
import pytest
from helpers import one_error_line

from diffusion_np.cli import main
from diffusion_np.io import load_checkpoint
from diffusion_np.metrics.control import score_control
from diffusion_np.metrics.evaluate import evaluate_checkpoint
from diffusion_np.pipelines.image_io import save_image
from diffusion_np.training.controlnet import ShapesControlNetConfig, ShapesControlNetTask, heldout_controls
from diffusion_np.training.model import TextToImageModel
from diffusion_np.training.trainer import TrainConfig, Trainer, task_from_checkpoint

TINY = ["--preset", "tiny", "--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny shapes-controlnet run on pretrained:shapes, as `diffusion-np train` writes it."""
    out = tmp_path_factory.mktemp("runs") / "cn"
    assert main(["train", "shapes-controlnet", *TINY, "--out", str(out)]) == 0
    return out


def _png(path, array):
    """Write a control image given in [0, 1]."""
    save_image(path, np.asarray(array, np.float32) * 2.0 - 1.0)
    return str(path)


def test_the_checkpoint_holds_the_controlnet_and_names_its_base(run):
    checkpoint = load_checkpoint(run / "checkpoint")
    assert set(checkpoint.weights) == {"controlnet"}  # the base stays where it is: pretrained:shapes
    config = checkpoint.config["task_config"]
    assert config["base"] == "pretrained:shapes" and config["control"] == "mask"
    assert config["controlnet"]["conditioning_channels"] == 1
    assert config["controlnet"]["conditioning_embedding_out_channels"] == [4, 8, 16]  # the tiny preset's
    task = task_from_checkpoint(checkpoint)
    assert task.image_size == 32 and task.model.conditioning_downscale == 4


def test_a_new_controlnet_samples_exactly_as_its_base():
    """Zero convolutions: before training, the controlled pipeline gives the base model's images, bit for bit."""
    task = ShapesControlNetTask(ShapesControlNetConfig(preset="tiny"), np.random.default_rng(0))
    prompts, controls, _, _ = heldout_controls(2, seed=1)
    controlled = task.generate(prompts, controls, "ddim", 3, guidance_scale=3.0, seed=5)
    base = TextToImageModel.load("pretrained:shapes").generate(prompts, "ddim", 3, 3.0, seed=5)
    np.testing.assert_array_equal(controlled, base)


def test_training_moves_the_controlnet_and_leaves_the_base_alone():
    task = ShapesControlNetTask(ShapesControlNetConfig(preset="tiny"), np.random.default_rng(0))
    before = {k: v.copy() for k, v in task.model.state_dict().items()}
    base_before = {k: v.copy() for k, v in task.base.unet.state_dict().items()}
    Trainer(task, TrainConfig(steps=2, batch_size=2, warmup_steps=0, lr=1e-3), progress=False).train()
    after = task.model.state_dict()
    assert not np.array_equal(after["controlnet_mid_block.weight"], before["controlnet_mid_block.weight"])
    assert not np.array_equal(after["controlnet_cond_embedding.conv_out.weight"],
                              before["controlnet_cond_embedding.conv_out.weight"])
    assert all(np.array_equal(v, base_before[k]) for k, v in task.base.unet.state_dict().items())


def test_sample_under_a_control_image_and_a_scale(run, tmp_path, capsys):
    _, controls, _, _ = heldout_controls(1, seed=2)
    out = tmp_path / "out.png"
    argv = ["sample", "--checkpoint", str(run), "--control", _png(tmp_path / "c.png", controls[0]), "--prompt",
            "a small red circle in the center", "-n", "2", "--steps", "2", "--control-scale", "0.5", "-o", str(out),
            "--quiet"]
    assert main(argv) == 0 and out.stat().st_size > 0
    assert "2 samples" in capsys.readouterr().out
    plain = tmp_path / "plain.png"  # without --control: held-out control images beside their images
    assert main(["sample", "--checkpoint", str(run), "-n", "2", "--steps", "2", "-o", str(plain), "--quiet"]) == 0


@pytest.mark.parametrize("shape, fragment", [
    ((64, 64, 1), "must be 32x32 with 1 channel"),
    ((32, 32, 3), "got shape (32, 32, 3)"),
])
def test_a_control_image_of_the_wrong_size_or_channels_exits_2_with_one_line(run, tmp_path, capsys, shape, fragment):
    control = _png(tmp_path / "bad.png", np.random.default_rng(0).random(shape))
    argv = ["sample", "--checkpoint", str(run), "--control", control, "--prompt", "a red circle", "--steps", "1",
            "-o", str(tmp_path / "o.png"), "--quiet"]
    assert main(argv) == 2
    one_error_line(capsys, fragment)


def test_other_control_mistakes_exit_2_with_one_line(run, tmp_path, capsys):
    good = _png(tmp_path / "c.png", np.zeros((32, 32, 1)))
    out = ["-o", str(tmp_path / "o.png"), "--quiet"]
    assert main(["sample", "--checkpoint", str(run), "--control", str(tmp_path / "none.png"), "--prompt", "a",
                 *out]) == 2
    one_error_line(capsys, "--control", "none.png")
    assert main(["sample", "--checkpoint", str(run), "--control", good, *out]) == 2
    one_error_line(capsys, "--control IMAGE and at least one --prompt go together")
    assert main(["sample", "--checkpoint", str(run), "--prompt", "a red circle", *out]) == 2
    one_error_line(capsys, "--control IMAGE and at least one --prompt go together")
    assert main(["sample", "--checkpoint", "pretrained:shapes", "--control", good, "--prompt", "a", *out]) == 2
    one_error_line(capsys, "need a shapes-controlnet checkpoint")
    not_image = tmp_path / "x.png"
    not_image.write_text("not a picture")
    assert main(["sample", "--checkpoint", str(run), "--control", str(not_image), "--prompt", "a", *out]) == 2
    one_error_line(capsys, "--control")


def test_evaluate_reports_the_control_iou(run, tmp_path, capsys):
    result = evaluate_checkpoint(run, steps=2, num_samples=4)
    m = result["metrics"]
    assert result["task"] == "shapes-controlnet" and result["conditioning_scale"] == 1.0 and m["num_images"] == 4
    assert {"control_iou", "caption_geometry_iou", "prompt_accuracy", "per_attribute"} <= set(m)
    assert 0.0 <= m["control_iou"] <= 1.0 and set(m["per_attribute"]) == {"colour", "shape"}
    out = tmp_path / "cn.json"
    assert main(["evaluate", "--checkpoint", str(run), "--steps", "2", "--num-samples", "4", "--json", str(out),
                 "--quiet"]) == 0
    assert "control IoU" in capsys.readouterr().out
    assert json.loads(out.read_text())["metrics"]["control_iou"] == pytest.approx(m["control_iou"])


def test_edge_maps_train_too(tmp_path):
    assert main(["train", "shapes-controlnet", *TINY, "--control", "edges", "--out", str(tmp_path / "e")]) == 0
    task = task_from_checkpoint(load_checkpoint(tmp_path / "e"))
    prompts, controls, masks, _ = task.preview(2, 0)
    assert controls.max() == pytest.approx(1.0, abs=0.05) and (controls[..., 0] > 0.5).sum() < masks.sum()
    assert task.generate(prompts, controls, "ddim", 1).shape == (2, 32, 32, 3)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="control must be one of"):
        ShapesControlNetConfig(control="depth")
    with pytest.raises(ValueError, match="caption_dropout"):
        ShapesControlNetConfig(caption_dropout=1.0)
    with pytest.raises(ValueError, match="conditioning_scale must be finite"):
        ShapesControlNetConfig(conditioning_scale=float("inf"))
    with pytest.raises(ValueError, match="unknown preset"):
        ShapesControlNetConfig(preset="huge")


def test_the_shipped_controlnet_puts_the_shape_where_the_mask_says():
    """pretrained:shapes-controlnet on 16 held-out masks (DDIM 20): far above what the caption's words alone give,
    with colour and shape still from the prompt (the model card has the full evaluation: 128 images, DDIM 50)."""
    task = task_from_checkpoint(load_checkpoint("pretrained:shapes-controlnet"))
    prompts, controls, masks, labels = heldout_controls(16, seed=5)
    m = score_control(task.generate(prompts, controls, "ddim", 20, seed=5), masks, labels)
    assert m["control_iou"] >= 0.75 and m["control_iou"] > m["caption_geometry_iou"] + 0.3, m
    assert m["prompt_accuracy"] >= 0.85, m
