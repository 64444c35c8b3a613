"""Latent consistency distillation: the gradient of the consistency loss, the teacher's guided step, the target
network, the boundary condition, exact resume, the CLI (`distill lcm`, `evaluate --sampler lcm --steps 1,2`)."""

import json
import math

import numpy as np
import pytest
from helpers import one_error_line

from diffusion_np.cli import main
from diffusion_np.diffusion import consistency_scalings, x0_and_eps
from diffusion_np.gradcheck import check_op
from diffusion_np.io import load_checkpoint
from diffusion_np.metrics.evaluate import evaluate_checkpoint
from diffusion_np.nn.losses import pseudo_huber_loss_backward, pseudo_huber_loss_forward
from diffusion_np.samplers import DDIMSampler, LCMSampler
from diffusion_np.training.distill import LCMDistillConfig, LCMDistillTask, x0_output_coefficient
from diffusion_np.training.trainer import TrainConfig, Trainer, run_from_checkpoint, task_from_checkpoint

TINY = ["--preset", "tiny", "--steps", "2", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lcm"
    assert main(["distill", "lcm", *TINY, "--out", str(out)]) == 0
    return out


def tiny_task(**kwargs):
    return LCMDistillTask(LCMDistillConfig(preset="tiny", **kwargs), np.random.default_rng(0))


# ------------------------------------------------------------------------------ the math
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_consistency_loss_gradient_through_the_boundary_scalings(prediction_type):
    """d loss / d out of loss(out) = huber(c_skip x_t + c_out x0(out, x_t), target) against central differences
    (float64, per-sample t, random target, random upstream gradient): what the task hands the student's backward."""
    rng = np.random.default_rng(1)
    sampler = LCMSampler()
    ab = sampler.alpha_bar
    t = np.array([19, 259, 999])
    x_t, out, target = (rng.standard_normal((3, 2, 2, 4)) for _ in range(3))
    c_skip, c_out = consistency_scalings(t)

    def loss(o):
        x0 = x0_and_eps(o, x_t, t, ab, prediction_type)[0]
        pred = c_skip[:, None, None, None] * x_t + c_out[:, None, None, None] * x0
        return pseudo_huber_loss_forward(pred, target, c=0.3)

    scale = (c_out * x0_output_coefficient(ab[t], prediction_type))[:, None, None, None]  # (B, 1, 1, 1)
    errors = check_op(loss, lambda dloss, cache: pseudo_huber_loss_backward(cache, dloss) * scale, [out])
    assert errors[0] < 1e-7, errors


def test_the_teachers_guided_step_is_one_ddim_step_over_the_skip():
    """Step 4 of the task equals DDIMSampler's eta = 0 step from k j - 1 to k (j - 1) - 1 on the N' grid."""
    task = tiny_task()
    k, n = task.grid()
    assert (k, n) == (20, 50)
    ddim = DDIMSampler(**task.teacher.schedule_config, prediction_type="epsilon", clip_sample=False,
                       timestep_spacing="trailing", prev_timestep_rule="sequence")
    ddim.set_timesteps(n)  # trailing: 999, 979, ..., 19
    assert ddim.timesteps.tolist() == (k * np.arange(n, 0, -1) - 1).tolist()
    x_t = np.random.default_rng(2).standard_normal((1, 8, 8, 4))
    out = np.tanh(x_t)
    t = 499
    ab = ddim.alpha_bar
    x0, eps = x0_and_eps(out, x_t, t, ab, "epsilon")
    ours = math.sqrt(ab[t - k]) * x0 + math.sqrt(1 - ab[t - k]) * eps
    np.testing.assert_allclose(ours, ddim.step(out, t, x_t).prev_sample, rtol=1e-12)


def test_a_step_trains_the_student_only_and_the_target_follows_by_ema():
    task = tiny_task(target_decay=0.5)
    teacher = {k: v.copy() for k, v in task.teacher.unet.state_dict().items()}
    text = {k: v.copy() for k, v in task.model.text_encoder.state_dict().items()}
    target0 = {k: v.copy() for k, v in task.target.state_dict().items()}
    np.testing.assert_array_equal(target0["conv_in.weight"], teacher["conv_in.weight"])  # theta^- = theta = teacher
    trainer = Trainer(task, TrainConfig(steps=2, batch_size=2, warmup_steps=0, lr=1e-3, ema_decay=0.9),
                      progress=False)
    trainer.train(stop_at=1)
    student1 = {k: v.copy() for k, v in task.model.unet.state_dict().items()}
    assert not np.array_equal(student1["conv_in.weight"], teacher["conv_in.weight"])
    trainer.train()  # the second step first moves theta^- half way to the student of step 1
    expected = 0.5 * target0["conv_in.weight"] + 0.5 * student1["conv_in.weight"]
    np.testing.assert_allclose(task.target.state_dict()["conv_in.weight"], expected, rtol=1e-6)
    assert all(np.array_equal(v, teacher[k]) for k, v in task.teacher.unet.state_dict().items())
    assert all(np.array_equal(v, text[k]) for k, v in task.model.text_encoder.state_dict().items())


def test_boundary_condition_makes_the_lowest_skip_target_the_teachers_step():
    """At t_n = 0, c_skip = 1 and c_out = 0: f_{theta^-}(x, 0) = x, whatever the target network says."""
    assert consistency_scalings(0) == (1.0, 0.0)
    c_skip, c_out = consistency_scalings(19)
    assert c_out > 0.999 and c_skip < 1e-3  # one skip up, the network's x0 estimate already dominates


# ------------------------------------------------------------------------------ the run
def test_resume_continues_exactly(tmp_path):
    """2 steps in one go == 1 step, checkpoint, resume from it in a new task, 1 step: the student, the target
    network and the losses bit for bit (the target lives in the checkpoint's training state)."""
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=0, lr=1e-3, checkpoint_every=0, sample_every=0)
    whole = Trainer(tiny_task(), config, progress=False, rng=np.random.default_rng(0))
    whole.train()
    first = Trainer(tiny_task(), config, out_dir=tmp_path, progress=False, rng=np.random.default_rng(0))
    first.train(stop_at=1)
    first.save_checkpoint()
    task, train_config, rng = run_from_checkpoint(load_checkpoint(tmp_path / "checkpoint"))
    second = Trainer(task, train_config, out_dir=tmp_path, progress=False, rng=rng)
    assert second.resume()
    second.train()
    assert whole.losses == second.losses
    for key, value in whole.task.model.unet.state_dict().items():
        np.testing.assert_array_equal(value, task.model.unet.state_dict()[key])
    for key, value in whole.task.target.state_dict().items():
        np.testing.assert_array_equal(value, task.target.state_dict()[key])


def test_resume_refuses_another_schedule(run, capsys):
    assert main(["distill", "lcm", *TINY, "--steps", "3", "--out", str(run), "--resume"]) == 2
    one_error_line(capsys, "--steps 3 (the checkpoint has 2)")


def test_checkpoint_samples_on_its_own_with_the_lcm_sampler(run, tmp_path, capsys):
    checkpoint = load_checkpoint(run / "checkpoint")
    assert set(checkpoint.weights) == {"unet", "text_encoder", "vae"}
    config = checkpoint.config["task_config"]
    assert config["teacher"] == "pretrained:shapes" and config["teacher_task"] == "shapes"
    assert set(checkpoint.training_state["task"]["target"]) == set(checkpoint.weights["unet"])
    task = task_from_checkpoint(checkpoint)
    sampler = task.model.make_sampler("lcm")
    assert sampler.original_inference_steps == 50 and sampler.timestep_scaling == 10.0
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(run), "--sampler", "lcm", "--steps", "2", "--prompt",
                 "a small red circle in the center", "-n", "2", "-o", str(out), "--quiet"]) == 0
    assert out.stat().st_size > 0
    default = tmp_path / "d.png"  # no --sampler: the student's own, LCM
    assert main(["sample", "--checkpoint", str(run), "--steps", "2", "-n", "2", "-o", str(default), "--quiet"]) == 0
    assert "lcm, 2 steps" in capsys.readouterr().out


def test_evaluate_sweeps_steps_beside_a_baseline(run, tmp_path, capsys):
    path = tmp_path / "sweep.json"
    argv = ["evaluate", "--checkpoint", str(run), "--sampler", "lcm", "--steps", "1,2", "--num-samples", "4",
            "--heldout-samples", "2", "--baseline", "pretrained:shapes", "ddim", "2", "4", "--json", str(path),
            "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "s/image" in printed and "pretrained:shapes" in printed
    runs = json.loads(path.read_text())["runs"]
    assert [(r["sampler"], r["steps"], r["guidance_scale"]) for r in runs] == [("lcm", 1, 1.0), ("lcm", 2, 1.0),
                                                                               ("ddim", 2, 4.0)]
    assert runs[0]["task"] == "lcm" and runs[0]["scored_as"] == "shapes"
    assert all(r["seconds_per_image"] > 0 for r in runs)


def test_a_digits_student_is_scored_as_digits(tmp_path):
    out = tmp_path / "digits"
    assert main(["distill", "lcm", *TINY, "--teacher", "pretrained:digits", "--out", str(out)]) == 0
    result = evaluate_checkpoint(out, sampler="lcm", steps=2, num_samples=10)
    assert result["task"] == "lcm" and result["scored_as"] == "digits"
    assert 0.0 <= result["metrics"]["conditional_accuracy"] <= 1.0 and result["seconds_per_image"] > 0


@pytest.mark.parametrize("argv, fragment", [
    (["distill", "lcm", "--teacher", "pretrained:shapes-controlnet"], "lcm distils shapes or digits"),
    (["distill", "lcm", "--teacher-guidance-scale", "0.5"], "must be a number >= 1"),
    (["distill", "lcm", "--loss", "l3"], "invalid choice"),
    (["distill", "progressive-x"], "invalid choice"),
])
def test_distill_mistakes_exit_2_with_one_line(argv, fragment, tmp_path, capsys):
    try:
        code = main([*argv, "--out", str(tmp_path / "x"), "--quiet"])
    except SystemExit as exit:  # argparse's own checks
        code = exit.code
    assert code == 2
    one_error_line(capsys, fragment)


def test_config_errors_name_the_field():
    for kwargs, fragment in [({"loss": "l1"}, "loss must be one of"), ({"huber_c": 0.0}, "huber_c must be > 0"),
                             ({"target_decay": 1.0}, "target_decay must be in [0, 1)"),
                             ({"original_inference_steps": 0}, "original_inference_steps must be"),
                             ({"teacher_task": "toy2d"}, "teacher_task must be one of")]:
        with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
            LCMDistillConfig(preset="tiny", **kwargs)
