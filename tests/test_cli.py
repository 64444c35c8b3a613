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
    for name in ("toy2d_samplers.png", "toy2d_loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_give_one_line_and_status_2():
    proc = subprocess.run([sys.executable, "-m", "diffusion_np", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "diffusion_np", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout and "gradcheck" in proc.stdout
