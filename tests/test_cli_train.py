"""`diffusion-np train` and `diffusion-np sample` end to end on the 2-D toy, with tiny step counts."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import one_error_line

from diffusion_np.cli import main
from diffusion_np.io import load_checkpoint
from diffusion_np.samplers import SAMPLERS
from diffusion_np.training.toy2d import Toy2DTask

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--steps", "6", "--batch-size", "16", "--hidden", "8", "--depth", "1", "--quiet", "--sample-every", "3"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "toy2d", "--dataset", "two_moons", "--prediction-type", "v_prediction", *TINY,
                 "--out", str(out)]) == 0
    return out


def test_train_writes_checkpoint_loss_curve_and_previews(run_dir, capsys):
    ck = load_checkpoint(run_dir / "checkpoint")
    assert ck.config["task"] == "toy2d" and ck.training_state["step"] == 6
    assert ck.config["task_config"]["dataset"] == "two_moons"
    assert ck.config["task_config"]["prediction_type"] == "v_prediction"
    assert ck.config["train"]["batch_size"] == 16 and ck.config["train"]["lr"] == Toy2DTask.train_defaults["lr"]
    for name in ("loss.png", "samples/step-000003.png", "samples/step-000006.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG_MAGIC


def test_training_again_into_the_same_directory_needs_resume(run_dir, capsys):
    assert main(["train", "toy2d", *TINY, "--out", str(run_dir)]) == 2
    one_error_line(capsys, "already holds a checkpoint; pass --resume")
    assert main(["train", "toy2d", "--out", str(run_dir), "--resume", "--lr", "0.5"]) == 2
    one_error_line(capsys, "--lr 0.5 (the checkpoint has 0.003)")
    assert main(["train", "toy2d", "--out", str(run_dir), "--resume", "--quiet"]) == 0
    assert "already trained to step 6" in capsys.readouterr().out


def test_ctrl_c_then_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["train", "toy2d", *TINY, "--out", str(straight)]) == 0

    calls = []
    original = Toy2DTask.loss_and_backward

    def press_ctrl_c_in_step_4(self, batch_size, rng):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch_size, rng)

    monkeypatch.setattr(Toy2DTask, "loss_and_backward", press_ctrl_c_in_step_4)
    assert main(["train", "toy2d", *TINY, "--out", str(interrupted)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted at step 4; checkpoint saved to {interrupted / 'checkpoint'}" in err
    assert "--resume" in err and "Traceback" not in err
    monkeypatch.setattr(Toy2DTask, "loss_and_backward", original)

    # the other options come from the checkpoint
    assert main(["train", "toy2d", "--out", str(interrupted), "--resume", "--quiet"]) == 0
    a, b = load_checkpoint(straight / "checkpoint"), load_checkpoint(interrupted / "checkpoint")
    for name, value in a.weights["denoiser"].items():
        assert np.array_equal(value, b.weights["denoiser"][name])
    assert np.array_equal(a.training_state["losses"], b.training_state["losses"])


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sample_writes_a_scatter_png_with_every_sampler(run_dir, tmp_path, capsys, sampler):
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(run_dir), "--sampler", sampler, "--steps", "3", "-n", "50",
                 "-o", str(out), "--quiet"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and sampler in printed


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "toy2d", "--steps", "-5", "--out", "x"], "--steps: must be a positive integer, got -5"),
        (["train", "toy2d", "--lr", "abc", "--out", "x"], "--lr: must be a number"),
        (["train", "toy2d", "--dataset", "mnist", "--out", "x"], "invalid choice: 'mnist'"),
        (["train", "stable-diffusion-xl"], "invalid choice: 'stable-diffusion-xl'"),
        (["sample", "--checkpoint", "x", "--sampler", "plms"], "invalid choice: 'plms'"),
        (["sample", "--checkpoint", "x", "-n", "0"], "-n: must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_one_line_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    one_error_line(capsys, fragment)


def test_bad_paths_and_unavailable_tasks_one_line_exit_2(run_dir, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "missing"), "-o", str(tmp_path / "s.png")]) == 2
    one_error_line(capsys, "does not exist")
    assert main(["sample", "--checkpoint", str(run_dir), "-o", str(tmp_path / "no" / "s.png")]) == 2
    one_error_line(capsys, "the directory", "does not exist")
    assert main(["sample", "--checkpoint", str(run_dir), "-o", str(tmp_path / "s.jpg")]) == 2
    one_error_line(capsys, "must end in .png")
    assert main(["sample", "--checkpoint", str(run_dir), "--steps", "5000", "-o", str(tmp_path / "s.png")]) == 2
    one_error_line(capsys, "cannot exceed num_train_timesteps")
    (tmp_path / "weights.ckpt").write_bytes(b"\x80\x04K\x01.")
    assert main(["sample", "--checkpoint", str(tmp_path / "weights.ckpt"), "-o", str(tmp_path / "s.png")]) == 2
    one_error_line(capsys, "arbitrary code")
    assert main(["train", "toy2d", "--steps", "5"]) == 2
    one_error_line(capsys, "--out DIR is required")
    assert main(["train", "shapes", "--out", str(tmp_path / "shapes")]) == 2
    one_error_line(capsys, "shapes needs the VAE of a shapes-vae run: pass its directory (--vae DIR)")
    assert main(["train", "shapes", "--vae", str(tmp_path / "nowhere"), "--out", str(tmp_path / "shapes")]) == 2
    one_error_line(capsys, "no checkpoint at")
    assert main(["train", "shapes", "--vae", str(run_dir), "--out", str(tmp_path / "shapes")]) == 2
    one_error_line(capsys, "holds no shapes VAE (its task is 'toy2d'")


def test_help_describes_every_command_and_option(capsys):
    for argv, expected in [
        (["--help"], ["train", "sample", "demo", "gradcheck"]),
        (["train", "--help"], ["toy2d", "digits", "shapes-vae", "shapes", "8x8 digits", "frozen VAE"]),
        (["train", "digits", "--help"], ["--preset", "tiny", "demo", "full", "--prediction-type", "v_prediction",
                                         "--min-snr-gamma", "--caption-dropout", "--guidance-scale", "--image-size",
                                         "--steps", "(default 64)"]),
        (["train", "shapes-vae", "--help"], ["--preset", "--kl-weight", "--recon"]),
        (["train", "shapes", "--help"], ["--vae", "--preset", "--latent-pool", "--min-snr-gamma",
                                         "--caption-dropout"]),
        (["train", "toy2d", "--help"], ["--dataset", "--prediction-type", "--resume", "--steps", "--batch-size",
                                        "--lr", "--seed", "--out", "--checkpoint-every", "(default 512)"]),
        (["sample", "--help"], ["--checkpoint", "--sampler", "dpm++", "euler-a", "--steps", "--seed", "-n", "-o"]),
    ]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        for word in expected:
            assert word in out, (argv, word)


def test_exit_codes_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffusion_np", "train", "shapes", "--out", str(tmp_path / "d")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == ("diffusion-np: error: shapes needs the VAE of a shapes-vae run: "
                           "pass its directory (--vae DIR)\n")


# ----------------------------------------------------------------------------- text-to-image tasks
T2I_TINY = ["--preset", "tiny", "--steps", "2", "--quiet"]


def test_train_digits_tiny_end_to_end_then_sample(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["train", "digits", *T2I_TINY, "--prediction-type", "v_prediction", "--out", str(out)]) == 0
    ck = load_checkpoint(out / "checkpoint")
    assert ck.config["task"] == "digits" and ck.training_state["step"] == 2
    assert ck.config["task_config"]["preset"] == "tiny"
    assert ck.config["task_config"]["prediction_type"] == "v_prediction"
    assert ck.config["train"]["batch_size"] == 8  # the tiny preset's, not the demo's 64
    assert set(ck.weights) == {"unet", "text_encoder"}
    assert (out / "samples" / "step-000002.png").read_bytes()[:8] == PNG_MAGIC
    png = tmp_path / "d.png"
    assert main(["sample", "--checkpoint", str(out), "--steps", "2", "-n", "10", "-o", str(png), "--quiet"]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert main(["train", "digits", "--out", str(out), "--resume", "--steps", "3", "--quiet"]) == 2
    one_error_line(capsys, "--steps 3 (the checkpoint has 2)")

    prompted = tmp_path / "p.png"
    argv = ["sample", "--checkpoint", str(out), "--steps", "2", "--quiet", "-o", str(prompted),
            "--prompt", "the digit seven", "--prompt", "the digit one", "-n", "2",
            "--negative-prompt", "the digit zero", "--guidance-scale", "2"]
    assert main(argv) == 0
    assert prompted.read_bytes()[:8] == PNG_MAGIC and "(4 samples" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(out), "-o", str(prompted), "--guidance-scale", "2", "--quiet"]) == 2
    one_error_line(capsys, "go with at least one --prompt")
    assert main(["sample", "--checkpoint", str(out), "-o", str(prompted), "--prompt", "the digit one",
                 "--guidance-scale", "0.5", "--quiet"]) == 2
    one_error_line(capsys, "guidance")


def test_train_shapes_vae_then_latent_shapes_tiny(tmp_path, capsys):
    vae = tmp_path / "vae"
    assert main(["train", "shapes-vae", *T2I_TINY, "--out", str(vae)]) == 0
    shapes = tmp_path / "shapes"
    assert main(["train", "shapes", *T2I_TINY, "--vae", str(vae), "--min-snr-gamma", "5", "--out", str(shapes)]) == 0
    ck = load_checkpoint(shapes / "checkpoint")
    assert set(ck.weights) == {"unet", "text_encoder", "vae"}
    assert ck.config["task_config"]["min_snr_gamma"] == 5.0 and ck.config["task_config"]["scaling_factor"] > 0
    assert (shapes / "samples" / "step-000002.png").read_bytes()[:8] == PNG_MAGIC
