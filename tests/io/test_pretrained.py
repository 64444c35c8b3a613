"""Shipped weights by name (``pretrained:NAME``) and ``export_checkpoint`` / ``diffusion-np export``."""

import json

import numpy as np
import pytest

from diffusion_np.cli import main
from diffusion_np.io import CheckpointError, load_checkpoint
from diffusion_np.pretrained import PRETRAINED, pretrained_path, resolve_checkpoint
from diffusion_np.training.model import TextToImageModel
from diffusion_np.training.trainer import export_checkpoint, task_from_checkpoint
from diffusion_np.training.vae_helpers import load_vae

TINY = ["--preset", "tiny", "--steps", "3", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny digits, shapes-vae and shapes runs, as `diffusion-np train` writes them."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "digits", *TINY, "--out", str(root / "digits")]) == 0
    assert main(["train", "shapes-vae", *TINY, "--out", str(root / "vae")]) == 0
    assert main(["train", "shapes", *TINY, "--vae", str(root / "vae"), "--out", str(root / "shapes")]) == 0
    return root


def _denoise(model: TextToImageModel, seed: int = 0):
    """One forward of the U-Net + text encoder on fixed inputs (float32 host array)."""
    rng = np.random.default_rng(seed)
    side, channels = model.unet.config["sample_size"], model.unet.in_channels
    x = rng.standard_normal((2, side, side, channels)).astype(np.float32)
    ids = model.tokenizer.encode([""] * 2).ids
    return model(x, np.array([10, 500]), ids)


# ----------------------------------------------------------------------------- names
def test_resolve_checkpoint_forms(runs):
    assert resolve_checkpoint(runs / "digits") == runs / "digits" / "checkpoint"  # a run directory
    assert resolve_checkpoint(runs / "digits" / "checkpoint") == runs / "digits" / "checkpoint"
    assert resolve_checkpoint(str(runs / "nowhere")) == runs / "nowhere"  # load_checkpoint explains it


def test_unknown_pretrained_name_lists_the_shipped_ones():
    with pytest.raises(CheckpointError, match="no pretrained model 'cats'.*pretrained:digits.*pretrained:shapes"):
        resolve_checkpoint("pretrained:cats")
    with pytest.raises(CheckpointError, match="no pretrained model"):
        load_checkpoint("pretrained:")


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_shipped_weights_are_there_and_small(name):
    """Each shipped model is a float16 export with a model card; all of them together stay under 24 MB."""
    path = pretrained_path(name)
    checkpoint = load_checkpoint(f"pretrained:{name}")
    assert checkpoint.training_state is None
    # a personalisation result is a fine-tuning run's export: its task is the method's
    personal = {"shapes-lora-star": "finetune-lora", "shapes-embedding-orange": "finetune-textual-inversion"}
    assert checkpoint.config["task"] == personal.get(name, "lcm" if name.endswith("-lcm") else name)
    assert checkpoint.config["exported_from"]["weights"] == "ema"
    assert all(w.dtype == np.float16 for module in checkpoint.weights.values() for w in module.values()
               if w.dtype.kind == "f")
    card = (path / "MODEL_CARD.md").read_text()
    made = ("diffusion-np finetune" if name in personal else "diffusion-np distill" if name.endswith("-lcm")
            else "diffusion-np train")
    assert made in card and "diffusion-np evaluate" in card  # how it was made and measured
    total = sum(f.stat().st_size for n in PRETRAINED for f in pretrained_path(n).iterdir())
    # digits 8.2, shapes 9.6, shapes-controlnet 3.9, shapes-lcm 9.6, digits-lcm 8.2 MiB; the LoRA and embedding < 1
    assert total < 42 * 2**20


def test_pretrained_models_load_as_float32_and_run():
    for name in ("digits", "shapes"):  # the text-to-image ones; shapes-controlnet: tests/training
        model = TextToImageModel.load(f"pretrained:{name}")
        assert model.unet.conv_in.weight.dtype == np.float32
        out = _denoise(model)
        assert out.dtype == np.float32 and np.isfinite(out).all()
    vae = load_vae("pretrained:shapes")  # the frozen VAE inside the shapes checkpoint
    assert vae.latent_channels == 4


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["digits", "shapes"])
def test_export_keeps_the_ema_weights_in_float16(runs, tmp_path, name):
    out = export_checkpoint(runs / name, tmp_path / "export")
    exported = load_checkpoint(out)
    assert exported.training_state is None
    assert exported.config["exported_from"] == {"step": 3, "weights": "ema", "dtype": "float16"}
    assert exported.config["task_config"].get("vae") is None  # no path to another run
    original = task_from_checkpoint(load_checkpoint(runs / name), use_ema=True).model
    reloaded = TextToImageModel.load(out)
    for key, value in original.state_dict().items():  # the EMA weights, rounded to float16
        np.testing.assert_array_equal(reloaded.state_dict()[key], value.astype(np.float16).astype(np.float32))
    if name == "shapes":  # the VAE travels with it
        for key, value in original.vae.state_dict().items():
            np.testing.assert_array_equal(reloaded.vae.state_dict()[key],
                                          value.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(_denoise(reloaded), _denoise(original), atol=2e-2)


def test_export_raw_weights_differ_from_ema(runs, tmp_path):
    raw = load_checkpoint(export_checkpoint(runs / "digits", tmp_path / "raw", dtype=np.float32, use_ema=False))
    ema = load_checkpoint(export_checkpoint(runs / "digits", tmp_path / "ema", dtype=np.float32))
    assert raw.config["exported_from"]["weights"] == "raw"
    assert any(not np.array_equal(raw.weights["unet"][k], ema.weights["unet"][k]) for k in raw.weights["unet"])


def test_export_command_then_sample(runs, tmp_path, capsys):
    out = tmp_path / "shipped"
    assert main(["export", "--checkpoint", str(runs / "shapes"), "--out", str(out)]) == 0
    assert "float16" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["weights_dtype"] == "float16" and not config["training_state"]
    png = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(out), "--prompt", "a small red circle in the center", "-n", "2",
                 "--steps", "2", "-o", str(png), "--quiet"]) == 0
    assert "EMA weights" in capsys.readouterr().out and png.stat().st_size > 0


def test_export_and_sample_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["sample", "--checkpoint", "pretrained:cats", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no pretrained model 'cats'" in err
