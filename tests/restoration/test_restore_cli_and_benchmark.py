"""`diffusion-np restore` and `python -m benchmarks.restore` at a tiny size."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from benchmarks import restore as bench
from diffusion_np.cli import main
from diffusion_np.data.digits import load_digits
from diffusion_np.demo import repair_panel
from diffusion_np.pipelines.image_io import load_image, save_image
from diffusion_np.restoration import make_degradation


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("restore") / "digit.png"
    save_image(path, load_digits("test")[0][0])
    return path


def test_restore_writes_the_dps_and_baseline_images(tmp_path, digit_png):
    out, base = tmp_path / "dps.png", tmp_path / "wiener.png"
    rc = main(["restore", "--task", "deblur", "--checkpoint", "pretrained:digits", "--input", str(digit_png),
               "--degrade", "--steps", "3", "--baseline", str(base), "-o", str(out), "--quiet"])
    assert rc == 0
    assert load_image(out, channels=1).shape == (8, 8, 1) and load_image(base, channels=1).shape == (8, 8, 1)


def test_restore_takes_a_small_measurement_for_superres(tmp_path):
    small = tmp_path / "small.png"
    op = make_degradation("superres", 8, 1, factor=2)
    save_image(small, op.degrade(load_digits("test")[0][:1], 0)[0])
    rc = main(["restore", "--task", "superres", "--factor", "2", "--checkpoint", "pretrained:digits",
               "--input", str(small), "--steps", "2", "-o", str(tmp_path / "big.png"), "--quiet"])
    assert rc == 0 and load_image(tmp_path / "big.png", channels=1).shape == (8, 8, 1)


def test_a_measurement_of_the_wrong_size_is_one_line_and_status_2(tmp_path, digit_png, capsys):
    rc = main(["restore", "--task", "superres", "--checkpoint", "pretrained:digits", "--input", str(digit_png),
               "-o", str(tmp_path / "x.png"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "2x2 pixels" in err and len(err.strip().splitlines()) == 1
    rc = main(["restore", "--task", "deblur", "--checkpoint", "pretrained:digits", "--input",
               str(tmp_path / "missing.png"), "-o", str(tmp_path / "x.png"), "--quiet"])
    assert rc == 2 and "missing.png" in capsys.readouterr().err


def test_the_benchmark_writes_rows_for_every_method(tmp_path):
    path = tmp_path / "restore.json"
    rows = bench.main(["--json", str(path), "--models", "digits", "--tasks", "deblur", "superres_x4",
                       "--n", "2", "--steps", "4", "--quiet"])  # the warm start runs int(4 * 0.3) = 1
    saved = json.loads(path.read_text())["results"]
    assert saved == rows and len(rows) == 8
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in ("deblur", "superres_x4")
                                                         for m in ("degraded", "baseline", "dps", "dps_warm")}
    assert all(r["strength"] == 0.3 for r in rows if r["method"] == "dps_warm")
    for r in rows:
        assert np.isfinite(r["psnr"]) and 0.0 <= r["task_metric"] <= 1.0 and r["n"] == 2


def test_the_demo_repair_panel_scores_and_writes_a_png(tmp_path):
    report = io.StringIO()
    result = repair_panel(tmp_path / "repair.png", steps=3, progress=False, out=report)
    assert (tmp_path / "repair.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result["psnr"]) == {"blurred", "wiener", "dps"} and "Image repair" in report.getvalue()
    assert result["psnr"]["wiener"] > result["psnr"]["blurred"]
