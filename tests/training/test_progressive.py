"""Progressive distillation: the halving grid, the two-step target, a round from the base and from a round,
the student-only gradient and its finite-difference check, the CLI's refusals."""

import numpy as np
import pytest
from helpers import one_error_line

from diffusion_np.cli import main
from diffusion_np.diffusion import x0_and_eps
from diffusion_np.gradcheck import check_op
from diffusion_np.io import load_checkpoint
from diffusion_np.nn.losses import mse_loss_backward, mse_loss_forward
from diffusion_np.samplers import DDIMSampler
from diffusion_np.training.distill import x0_output_coefficient
from diffusion_np.training.progressive import ProgressiveConfig, ProgressiveDistillTask, halving_grid
from diffusion_np.training.trainer import TrainConfig, Trainer, task_from_checkpoint

TINY = ["--preset", "tiny", "--steps", "2", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    root = tmp_path_factory.mktemp("pd")
    assert main(["distill", "progressive", *TINY, "--student-steps", "8", "--out", str(root / "pd-8")]) == 0
    assert main(["distill", "progressive", *TINY, "--student-steps", "4", "--teacher", str(root / "pd-8"),
                 "--out", str(root / "pd-4")]) == 0
    return root


def test_halving_grid_is_ddims_trailing_grid_and_its_midpoints():
    for n, T in [(4, 1000), (16, 1000), (8, 100), (5, 1000)]:
        t, t_mid, t_next = halving_grid(np.arange(n, 0, -1), n, T)
        ddim = DDIMSampler(num_train_timesteps=T, timestep_spacing="trailing")
        ddim.set_timesteps(n)
        np.testing.assert_array_equal(t, ddim.timesteps)
        ddim.set_timesteps(2 * n)
        np.testing.assert_array_equal(np.stack([t, t_mid], axis=1).ravel(), ddim.timesteps)  # the teacher's grid
        assert t_next[-1] == -1 and np.array_equal(t_next[:-1], t[1:])
    assert [tuple(int(v) for v in halving_grid(i, 4, 1000)) for i in (4, 1)] == [(999, 874, 749), (249, 124, -1)]


def test_the_target_makes_one_ddim_step_land_on_the_teachers_two():
    rng = np.random.default_rng(0)
    z_t, z_next = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    for ab_t, ab_next in [(0.1, 0.4), (0.002, 0.3), (0.5, 1.0)]:
        a, s, a_n, s_n = np.sqrt(ab_t), np.sqrt(1 - ab_t), np.sqrt(ab_next), np.sqrt(1 - ab_next)
        x_tilde = (z_next - s_n / s * z_t) / (a_n - s_n / s * a)
        eps = (z_t - a * x_tilde) / s
        np.testing.assert_allclose(a_n * x_tilde + s_n * eps, z_next, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon", "sample"])
def test_weighted_x_loss_gradient_reaches_the_output(prediction_type):
    """loss(out) = mean max(SNR, 1) ||x~ - x_hat(out)||^2: the task's d out against central differences."""
    rng = np.random.default_rng(1)
    ab = DDIMSampler().alpha_bar
    t = np.array([5, 300, 990])
    z, target = rng.standard_normal((3, 2, 2, 3)), rng.standard_normal((3, 2, 2, 3))
    weights = np.maximum(ab[t] / (1 - ab[t]), 1.0)

    def loss(out):
        return mse_loss_forward(x0_and_eps(out, z, t, ab, prediction_type)[0], target, weights)

    scale = x0_output_coefficient(ab[t], prediction_type)[:, None, None, None]
    errors = check_op(loss, lambda dloss, cache: mse_loss_backward(cache, dloss) * scale,
                      [rng.standard_normal(z.shape)])
    assert errors[0] < 1e-7, errors


def test_a_round_trains_the_student_only():
    task = ProgressiveDistillTask(ProgressiveConfig(preset="tiny", student_steps=8), np.random.default_rng(0))
    teacher = {k: v.copy() for k, v in task.teacher.unet.state_dict().items()}
    Trainer(task, TrainConfig(steps=2, batch_size=2, warmup_steps=0, lr=1e-3), progress=False).train()
    assert not np.array_equal(task.model.unet.state_dict()["conv_in.weight"], teacher["conv_in.weight"])
    assert all(np.array_equal(v, teacher[k]) for k, v in task.teacher.unet.state_dict().items())
    assert task.teacher_w == 4.0 and task.model.prediction_type == "v_prediction"
    sampler = task.make_sampler("ddim")
    sampler.set_timesteps(8)
    assert sampler.prev_timestep_rule == "sequence" and sampler.timesteps.tolist()[0] == 999


def test_a_later_round_learns_from_the_last_student_without_guidance(rounds, capsys):
    task = task_from_checkpoint(load_checkpoint(rounds / "pd-4" / "checkpoint"))
    assert task.teacher_w == 1.0 and task.teacher.prediction_type == "v_prediction"
    assert task.data_task.name == "shapes" and task.config.teacher_task == "shapes"
    assert main(["evaluate", "--checkpoint", str(rounds / "pd-4"), "--steps", "4", "--num-samples", "4",
                 "--heldout-samples", "2", "--quiet"]) == 0
    assert "progressive" in capsys.readouterr().out


def test_a_round_must_halve_its_teachers_steps(rounds, tmp_path, capsys):
    assert main(["distill", "progressive", *TINY, "--student-steps", "3", "--teacher", str(rounds / "pd-8"),
                 "--out", str(tmp_path / "x")]) == 2
    one_error_line(capsys, "--student-steps must be 4")


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="student_steps must be an integer >= 1"):
        ProgressiveConfig(preset="tiny", student_steps=0)
    with pytest.raises(ValueError, match="prediction_type must be"):
        ProgressiveConfig(preset="tiny", prediction_type="x")
