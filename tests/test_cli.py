import subprocess
import sys

from diffusion_np.cli import gradcheck_report, main


def test_gradcheck_report_passes_for_every_layer(capsys):
    worst = gradcheck_report(seed=1)
    out = capsys.readouterr().out
    assert worst < 1e-6
    assert "FAIL" not in out and "Attention cross" in out and "GroupNorm" in out


def test_demo_exit_code_zero():
    assert main(["demo"]) == 0


def test_bad_arguments_give_one_line_and_status_2():
    proc = subprocess.run([sys.executable, "-m", "diffusion_np", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "diffusion_np", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout and "gradcheck" in proc.stdout
