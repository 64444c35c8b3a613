import io
import subprocess
import sys

from diffusion_np.cli import gradcheck_report, main


def test_gradcheck_report_passes_for_every_layer(capsys):
    worst = gradcheck_report(seed=1)
    out = capsys.readouterr().out
    assert worst < 1e-6
    assert "FAIL" not in out and "Attention cross" in out and "GroupNorm" in out


def test_demo_trains_samples_and_writes_pngs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "30", "--points", "300", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "DDPM, 1000 steps" in out and "DPM-Solver++, 20 steps" in out and "the floor" in out
    assert "shapes, every attribute as prompted:" in out and "held-out ones" in out and "digits, the digit" in out
    assert "ControlNet" in out and "IoU of each shape with its mask" in out
    assert "Image repair" in out and "wiener" in out and "dps" in out
    assert "Few-step generation: pretrained:shapes-lcm, 4 LCM steps" in out and "x slower" in out
    for name in ("demo.png", "controlnet.png", "repair.png", "few_step.png", "toy2d_samplers.png", "toy2d_loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_few_step_panel_times_the_student_beside_its_teacher(tmp_path):
    from diffusion_np.demo import few_step_panel

    result = few_step_panel(tmp_path / "few.png", teacher_steps=8, progress=False, out=io.StringIO())
    assert result["total"] == 8 and result["student_correct"] >= 7  # 4 LCM steps, no guidance
    assert result["teacher_seconds"] > result["student_seconds"] > 0  # 16 guided evaluations against 4
    assert (tmp_path / "few.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_give_one_line_and_status_2():
    proc = subprocess.run([sys.executable, "-m", "diffusion_np", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "diffusion_np", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout and "gradcheck" in proc.stdout


def test_text_to_image_demo_scores_what_it_draws(tmp_path):
    """The shipped weights sampled and read back: counts within their totals, a PNG written."""
    from diffusion_np.data.shapes import all_prompts
    from diffusion_np.demo import HELDOUT_PROMPTS, SHAPES_PROMPTS, text_to_image_demo

    assert set(SHAPES_PROMPTS) <= set(all_prompts("train")) and set(HELDOUT_PROMPTS) <= set(all_prompts("heldout"))
    report = io.StringIO()
    result = text_to_image_demo(tmp_path / "demo.png", steps=4, progress=False, out=report)
    assert "sampled 36 images" in report.getvalue()
    assert 0 <= result["shapes_correct"] <= result["shapes_total"] == len(SHAPES_PROMPTS)
    assert 0 <= result["heldout_correct"] <= result["heldout_total"] == len(HELDOUT_PROMPTS)
    assert 0 <= result["digits_correct"] <= result["digits_total"] == 20
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
