"""Bad destinations and hand-edited run configs: one line naming the argument or the field, exit 2,
before any work is done (every command: sample, export, evaluate, train)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers import one_error_line

from diffusion_np import cli
from diffusion_np.cli import main

TINY = ["--steps", "4", "--batch-size", "8", "--hidden", "8", "--depth", "1", "--quiet", "--sample-every", "0"]
#: a directory nothing can be created in, even by root
UNWRITABLE = Path("/proc")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["train", "toy2d", *TINY, "--out", str(out)]) == 0
    return out


def _edited(run_dir, tmp_path, edit) -> Path:
    """A copy of the run whose checkpoint/config.json went through ``edit(config)``."""
    copy = tmp_path / "edited"
    shutil.copytree(run_dir, copy)
    path = copy / "checkpoint" / "config.json"
    header = json.loads(path.read_text())
    edit(header["config"])
    path.write_text(json.dumps(header))
    return copy


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command starts its work (sampling, exporting, scoring, training)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the work started before the destination was checked")

    for name in ("evaluate_checkpoint", "export_checkpoint", "Trainer"):
        monkeypatch.setattr(cli, name, refuse)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["sample", "--checkpoint", "{run}", "-n", "4", "--steps", "2", "--quiet", "-o", "/proc/a.png"],
         "-o /proc/a.png"),
        (["export", "--checkpoint", "{run}", "--out", "/proc/e1"], "--out /proc/e1"),
        (["evaluate", "--checkpoint", "{run}", "--steps", "2", "--quiet", "--json", "/proc/x.json"],
         "--json /proc/x.json"),
        (["train", "toy2d", *TINY, "--out", "/proc/run"], "--out /proc/run"),
        (["train", "toy2d", *TINY, "--out", "/proc/deeper/run"], "--out /proc/deeper/run"),
    ],
)
def test_unwritable_destinations_are_refused_before_the_work(run_dir, argv, fragment, capsys, no_work):
    argv = [a.replace("{run}", str(run_dir)) for a in argv]
    assert main(argv) == 2
    one_error_line(capsys, fragment, "cannot be written")


def test_destinations_that_are_the_wrong_kind(run_dir, tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("x")
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "file")]) == 2
    one_error_line(capsys, "--out", "is a file, not a directory")
    assert main(["train", "toy2d", *TINY, "--out", str(tmp_path / "file" / "run")]) == 2
    one_error_line(capsys, "--out", "is a file, not a directory")
    assert main(["evaluate", "--checkpoint", str(run_dir), "--json", str(tmp_path)]) == 2
    one_error_line(capsys, "--json", "is a directory; give a file name")
    assert main(["evaluate", "--checkpoint", str(run_dir), "--json", str(tmp_path / "no" / "x.json")]) == 2
    one_error_line(capsys, "--json", "does not exist")


EDITS = {
    "dataset": (lambda c: c["task_config"].update(dataset="banana"), "task_config", "unknown toy dataset 'banana'"),
    "steps": (lambda c: c["train"].update(steps="many"), "train", "steps must be an integer >= 1, got 'many'"),
    "no task_config": (lambda c: c.pop("task_config"), '"task_config"', "it is missing"),
    "task_config list": (lambda c: c.update(task_config=[1, 2]), '"task_config"', "got [1, 2]"),
    "no train": (lambda c: c.pop("train"), '"train"', "it is missing"),
    "unknown field": (lambda c: c["task_config"].update(colour="red"), "task_config.colour", "not a setting"),
    "unknown task": (lambda c: c.update(task="banana"), '"task" is \'banana\'', "toy2d"),
    "lr text": (lambda c: c["train"].update(lr="fast"), "train.lr = 'fast'"),
}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("command", ["sample", "export", "evaluate", "resume"])
def test_an_edited_run_config_gives_one_line_naming_the_field(run_dir, tmp_path, capsys, command, edit):
    change, *fragments = EDITS[edit]
    run = _edited(run_dir, tmp_path, change)
    argv = {
        "sample": ["sample", "--checkpoint", str(run), "-n", "4", "--steps", "2", "--quiet",
                   "-o", str(tmp_path / "s.png")],
        "export": ["export", "--checkpoint", str(run), "--out", str(tmp_path / "exported")],
        "evaluate": ["evaluate", "--checkpoint", str(run), "--steps", "2", "--num-samples", "4", "--quiet"],
        "resume": ["train", "toy2d", "--out", str(run), "--resume", "--quiet"],
    }[command]
    assert main(argv) == 2
    if command == "resume" and edit == "unknown task":
        one_error_line(capsys, "holds a 'banana' run, not 'toy2d'")
    elif command == "evaluate" and edit == "unknown task":  # evaluate names the tasks it scores first
        one_error_line(capsys, "evaluate scores digits, shapes, toy2d", "checkpoints", "is a banana run")
    else:
        one_error_line(capsys, "config.json", *fragments)
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "exported").exists()


def test_a_good_run_still_resumes_samples_and_exports(run_dir, tmp_path, capsys):
    run = _edited(run_dir, tmp_path, lambda c: c["train"].update(sample_every=0))
    assert main(["train", "toy2d", "--out", str(run), "--resume", "--quiet", "--checkpoint-every", "2"]) == 0
    assert main(["sample", "--checkpoint", str(run), "-n", "4", "--steps", "2", "--quiet",
                 "-o", str(tmp_path / "s.png")]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exported")]) == 0
