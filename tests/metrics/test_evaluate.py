"""`diffusion-np evaluate` and evaluate_checkpoint: the JSON's keys, types and ranges on tiny checkpoints of
digits, shapes and toy2d; the scoring functions tell real data (an oracle model) from garbage; bad arguments
exit with status 2 and one line."""

import json
from collections import Counter

import numpy as np
import pytest

from diffusion_np.cli import main
from diffusion_np.data.digits import load_digits
from diffusion_np.data.shapes import LABEL_COLUMNS, all_prompts, parse_caption, render
from diffusion_np.io import load_checkpoint
from diffusion_np.metrics import score_digits, score_shapes
from diffusion_np.metrics.evaluate import (
    DEFAULT_HELDOUT_SAMPLES,
    DEFAULT_NUM_SAMPLES,
    evaluate_checkpoint,
    format_report,
    generate_images,
    heldout_shapes_prompts,
    seen_shapes_prompts,
)
from diffusion_np.training.trainer import task_from_checkpoint

T2I_TINY = ["--preset", "tiny", "--steps", "2", "--quiet"]
COMMON_KEYS = {"task", "checkpoint", "checkpoint_dir", "step", "weights", "sampler", "steps", "guidance_scale",
               "num_samples", "seed", "metrics", "wall_time_s", "diffusion_np_version"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs of every task, as `diffusion-np train` writes them (about 3 s)."""
    root = tmp_path_factory.mktemp("evaluate")
    assert main(["train", "digits", *T2I_TINY, "--out", str(root / "digits")]) == 0
    assert main(["train", "shapes-vae", *T2I_TINY, "--out", str(root / "vae")]) == 0
    assert main(["train", "shapes", *T2I_TINY, "--vae", str(root / "vae"), "--out", str(root / "shapes")]) == 0
    assert main(["train", "toy2d", "--steps", "4", "--batch-size", "16", "--hidden", "8", "--depth", "1",
                 "--quiet", "--out", str(root / "toy")]) == 0
    return root


def one_error_line(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def is_fraction(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def check_common(result, task, steps, num_samples):
    assert COMMON_KEYS <= set(result), COMMON_KEYS - set(result)
    assert result["task"] == task and result["steps"] == steps and result["num_samples"] == num_samples
    assert result["step"] == {"toy2d": 4}.get(task, 2) and result["weights"] == "ema"
    assert result["sampler"] == "ddim" and result["seed"] == 0
    assert isinstance(result["wall_time_s"], float) and result["wall_time_s"] >= 0
    assert json.loads(json.dumps(result)) == result  # plain JSON values only


# ----------------------------------------------------------------------------- each task, tiny
def test_digits_result(runs):
    result = evaluate_checkpoint(runs / "digits", steps=2, num_samples=20)
    check_common(result, "digits", 2, 20)
    assert result["guidance_scale"] == load_checkpoint(runs / "digits").config["task_config"]["guidance_scale"]
    m = result["metrics"]
    assert is_fraction(m["conditional_accuracy"])
    assert len(m["per_digit_accuracy"]) == 10 and all(is_fraction(a) for a in m["per_digit_accuracy"])
    assert np.isclose(np.mean(m["per_digit_accuracy"]), m["conditional_accuracy"])  # 2 images per digit
    assert m["frechet_distance"] > 0 and m["frechet_distance_real_baseline"] > 0
    # two steps of training draw noise, not digits: far from real digits
    assert m["frechet_distance"] > 1.5 * m["frechet_distance_real_baseline"]
    assert m["baseline_images"] == 20 and m["reference_images"] == len(load_digits("test")[0])
    table = format_report(result)
    assert "conditional accuracy" in table and "Frechet distance" in table and "step 2, EMA weights" in table


def test_shapes_result_seen_and_heldout(runs):
    result = evaluate_checkpoint(runs / "shapes", steps=2, num_samples=6, heldout_samples=4, guidance_scale=2.0)
    check_common(result, "shapes", 2, 6)
    assert result["guidance_scale"] == 2.0 and result["heldout_samples"] == 4
    m = result["metrics"]
    for prefix in ("", "heldout_"):
        assert is_fraction(m[f"{prefix}prompt_accuracy_all"])
        per = m[f"{prefix}per_attribute"]
        assert set(per) == set(LABEL_COLUMNS) and all(is_fraction(a) for a in per.values())
        assert m[f"{prefix}prompt_accuracy_all"] <= min(per.values())
    assert m["distinct_prompts"] == 6 and m["heldout_distinct_prompts"] == 4 and is_fraction(m["unreadable"])
    table = format_report(result)
    assert "held-out (4 prompts)" in table and "chance" in table and "guidance 2" in table

    none = evaluate_checkpoint(runs / "shapes", steps=1, num_samples=2, heldout_samples=0)
    assert none["metrics"]["heldout_prompt_accuracy_all"] is None and none["metrics"]["heldout_per_attribute"] is None
    assert "held-out (0 prompts)" in format_report(none)


def test_toy2d_result_has_distances_and_floors(runs):
    result = evaluate_checkpoint(runs / "toy", steps=3, num_samples=300, guidance_scale=5.0)
    check_common(result, "toy2d", 3, 300)
    assert result["guidance_scale"] is None  # no text, no guidance
    m = result["metrics"]
    assert m["dataset"] == "swiss_roll" and m["mmd_points"] == 300
    assert 0 < m["sliced_wasserstein_data_vs_data"] < m["sliced_wasserstein"]  # 4 steps of training: far off
    assert 0 <= m["mmd_rbf_data_vs_data"] < m["mmd_rbf"]
    assert m["verdict"]["points"] == 300 and not m["verdict"]["within_floor"]  # 4 steps: above the floor band
    assert "sliced Wasserstein" in format_report(result) and "above the floor band" in format_report(result)


def test_exported_checkpoint_reports_its_training_step(runs, tmp_path):
    assert main(["export", "--checkpoint", str(runs / "digits"), "--out", str(tmp_path / "exported")]) == 0
    result = evaluate_checkpoint(tmp_path / "exported", steps=1, num_samples=10)
    assert result["step"] == 2 and result["weights"] == "ema"


def test_pretrained_name_is_accepted():
    from diffusion_np.io.checkpoint import CheckpointError
    from diffusion_np.pretrained import pretrained_path

    try:
        pretrained_path("digits")
    except CheckpointError:
        pytest.skip("the shipped digits weights are not in this checkout")
    result = evaluate_checkpoint("pretrained:digits", steps=1, num_samples=10)
    assert result["checkpoint"] == "pretrained:digits" and result["task"] == "digits"


def test_same_seed_same_numbers_and_streams_differ(runs):
    model = task_from_checkpoint(load_checkpoint(runs / "digits")).model
    prompts = ["the digit one"] * 3
    a = generate_images(model, prompts, steps=2, seed=7, stream=0, batch_size=2)
    b = generate_images(model, prompts, steps=2, seed=7, stream=0, batch_size=2)
    c = generate_images(model, prompts, steps=2, seed=7, stream=1, batch_size=2)
    assert a.shape == (3, 8, 8, 1) and np.array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a[0], a[2])  # two batches, two seeds


# ----------------------------------------------------------------------------- prompts
def test_prompt_sets():
    train = all_prompts("train")
    seen = seen_shapes_prompts(2 * len(train), seed=3)
    assert Counter(seen) == Counter(train * 2)  # every training prompt, equally often
    assert seen[:5] != train[:5] and seen_shapes_prompts(10, seed=3) == seen[:10]  # shuffled, seeded
    held = heldout_shapes_prompts(DEFAULT_HELDOUT_SAMPLES)
    assert set(Counter(held).values()) == {8} and set(held) == set(all_prompts("heldout"))
    assert not set(held) & set(train)
    assert DEFAULT_NUM_SAMPLES == {"digits": 500, "shapes": 320, "toy2d": 10_000, "shapes-controlnet": 128}


# ----------------------------------------------------------------------------- scoring tells good from bad
def test_real_digits_score_as_a_perfect_model():
    test_images, _, test_labels = load_digits("test")  # the classifier never trained on these
    assert score_digits(test_images[:200], test_labels[:200])["conditional_accuracy"] >= 0.95
    train_images, _, train_labels = load_digits("train")
    pick = np.random.default_rng(1).choice(len(train_images), 200, replace=False)
    real = score_digits(train_images[pick], train_labels[pick], seed=2)
    noise = np.random.default_rng(0).uniform(-1, 1, train_images[pick].shape).astype(np.float32)
    garbage = score_digits(noise, train_labels[pick], seed=2)
    assert real["conditional_accuracy"] >= 0.95 and garbage["conditional_accuracy"] < 0.3
    # real digits sit near the floor (a second real draw; n = 200 leaves it noisy), noise far above it
    assert real["frechet_distance"] < 2 * real["frechet_distance_real_baseline"]
    assert garbage["frechet_distance"] > 10 * garbage["frechet_distance_real_baseline"]


def test_real_shapes_score_as_a_perfect_model():
    seen, held = seen_shapes_prompts(64), heldout_shapes_prompts(18)
    images, held_images = render(parse_caption(seen), rng=0), render(parse_caption(held), rng=1)
    perfect = score_shapes(images, seen, held_images, held)
    assert perfect["prompt_accuracy_all"] == 1.0 and perfect["heldout_prompt_accuracy_all"] == 1.0
    assert set(perfect["per_attribute"].values()) == {1.0} and perfect["unreadable"] == 0.0
    wrong = score_shapes(images, seen[::-1])  # every image scored against another image's prompt
    assert wrong["prompt_accuracy_all"] < 0.2
    blank = score_shapes(np.full_like(images, -1.0), seen)
    assert blank["prompt_accuracy_all"] == 0.0 and blank["unreadable"] == 1.0


# ----------------------------------------------------------------------------- the command
def test_cli_prints_the_table_and_writes_json(runs, tmp_path, capsys):
    out = tmp_path / "digits.json"
    argv = ["evaluate", "--checkpoint", str(runs / "digits" / "checkpoint"), "--steps", "2", "--num-samples", "10",
            "--sampler", "dpm++", "--seed", "3", "--json", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["sampler"] == "dpm++" and result["seed"] == 3 and result["num_samples"] == 10
    assert format_report(result) in printed and f"wrote {out}" in printed


def test_cli_notes_options_a_task_ignores(runs, capsys):
    argv = ["evaluate", "--checkpoint", str(runs / "toy"), "--steps", "2", "--num-samples", "50",
            "--guidance-scale", "3", "--quiet"]
    assert main(argv) == 0
    one_error_line(capsys, "--guidance-scale ignored for toy2d")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--checkpoint", "{root}/missing"], "does not exist"),
        (["--checkpoint", "pretrained:nothing"], "no pretrained model 'nothing'"),
        (["--checkpoint", "{root}/vae"], "shapes-vae"),
        (["--checkpoint", "{root}/digits", "--json", "{root}/no/such/dir/out.json"], "does not exist"),
        (["--checkpoint", "{root}/digits", "--steps", "5000"], "cannot exceed"),
        (["--checkpoint", "{root}/digits", "--num-samples", "1"], "num_samples"),
        (["--checkpoint", "{root}/digits", "--sampler", "plms"], "invalid choice"),
        (["--checkpoint", "{root}/digits", "--steps", "0"], "positive integer"),
        (["--checkpoint", "{root}/digits", "--guidance-scale", "0.5"], "--guidance-scale"),
        (["--checkpoint", "{root}/digits", "--heldout-samples", "-1"], "--heldout-samples"),
        (["--steps", "2"], "--checkpoint"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(runs, capsys, args, fragment):
    argv = ["evaluate", *[a.format(root=runs) for a in args], "--quiet"]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    assert code == 2
    one_error_line(capsys, fragment)


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for word in ["--checkpoint", "pretrained:digits", "--json", "--num-samples", "--heldout-samples",
                 "--raw-weights", "examples:", "diffusion-np evaluate --checkpoint"]:
        assert word in text, word
