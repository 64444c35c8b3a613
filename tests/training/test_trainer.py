"""The Trainer: exact resume, Ctrl-C checkpoints, NaN stops, PNGs, on a tiny 2-D toy."""

import os
import signal

import numpy as np
import pytest

from diffusion_np.io import CheckpointError, load_checkpoint
from diffusion_np.training.plots import save_loss_plot
from diffusion_np.training.toy2d import Toy2DConfig, Toy2DTask
from diffusion_np.training.trainer import (
    TASKS,
    NonFiniteLossError,
    TaskNotAvailable,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    get_task,
    task_from_checkpoint,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_trainer(out_dir=None, callbacks=(), task_cls=Toy2DTask, **overrides):
    """A 20-step run of a 2-layer, 16-wide MLP: about 1 ms a step."""
    config = TrainConfig(**{**dict(steps=20, batch_size=32, lr=1e-2, ema_decay=0.9, seed=7,
                                   checkpoint_every=0, sample_every=0), **overrides})
    rng = np.random.default_rng(config.seed)
    task = task_cls(Toy2DConfig(hidden=16, depth=2), rng)
    task.preview = {"sampler": "ddim", "steps": 5, "n": 200}  # cheap previews
    return Trainer(task, config, out_dir=out_dir, rng=rng, progress=False, callbacks=callbacks)


def assert_same_run(a: Trainer, b: Trainer):
    assert a.step == b.step
    assert a.losses == b.losses  # Python floats: bitwise
    for name, value in a.model.state_dict().items():
        assert np.array_equal(value, b.model.state_dict()[name]), name
        assert np.array_equal(a.ema.shadow[name], b.ema.shadow[name]), name
    assert a.optimizer.lr == b.optimizer.lr
    assert a.rng.bit_generator.state == b.rng.bit_generator.state


@pytest.fixture(scope="module")
def straight():
    trainer = make_trainer()
    trainer.train()
    return trainer


def test_resume_continues_the_exact_trajectory(straight, tmp_path):
    first = make_trainer(tmp_path)
    first.train(stop_at=10)
    assert first.step == 10 and load_checkpoint(tmp_path / "checkpoint").training_state["step"] == 10

    second = make_trainer(tmp_path)  # a fresh process, in effect: new model, optimizer, generator
    assert not np.array_equal(second.model.state_dict()["out.weight"], first.model.state_dict()["out.weight"])
    assert second.resume() is True
    assert second.step == 10
    second.train()
    assert_same_run(straight, second)


def test_previews_and_checkpoints_do_not_change_the_trajectory(straight, tmp_path):
    trainer = make_trainer(tmp_path, checkpoint_every=5, sample_every=10)
    trainer.train()
    assert_same_run(straight, trainer)
    for name in ("loss.png", "samples/step-000010.png", "samples/step-000020.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "loss.png", "samples"]


def test_ctrl_c_from_a_callback_saves_a_checkpoint_that_resumes_exactly(straight, tmp_path):
    def stop_at_7(trainer):
        if trainer.step == 7:
            raise KeyboardInterrupt

    trainer = make_trainer(tmp_path, callbacks=[stop_at_7])
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 7; checkpoint saved to .*checkpoint") as info:
        trainer.train()
    assert isinstance(info.value, KeyboardInterrupt)  # scripts that catch Ctrl-C still do
    assert info.value.checkpoint == tmp_path / "checkpoint"
    assert load_checkpoint(info.value.checkpoint).training_state["step"] == 7

    resumed = make_trainer(tmp_path)
    resumed.resume()
    resumed.train()
    assert_same_run(straight, resumed)


class SigintInStep4(Toy2DTask):
    """Presses Ctrl-C (a real SIGINT) in the middle of the 4th step."""

    calls = 0

    def loss_and_backward(self, batch_size, rng):
        type(self).calls += 1
        if type(self).calls == 4:
            os.kill(os.getpid(), signal.SIGINT)  # our handler only sets a flag
        return super().loss_and_backward(batch_size, rng)


def test_a_real_sigint_finishes_the_step_then_saves(straight, tmp_path):
    trainer = make_trainer(tmp_path, task_cls=SigintInStep4)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 4;"):  # step 4 was completed
        trainer.train()
    assert signal.getsignal(signal.SIGINT) is handler_before  # restored
    resumed = make_trainer(tmp_path)
    resumed.resume()
    resumed.train()
    assert_same_run(straight, resumed)


class InterruptMidStep(Toy2DTask):
    """Raises KeyboardInterrupt inside the 6th forward/backward, after the batch was drawn."""

    calls = 0

    def loss_and_backward(self, batch_size, rng):
        loss = super().loss_and_backward(batch_size, rng)
        type(self).calls += 1
        if type(self).calls == 6:
            raise KeyboardInterrupt
        return loss


def test_ctrl_c_inside_a_step_rewinds_the_generator_and_saves_the_previous_step(straight, tmp_path):
    trainer = make_trainer(tmp_path, task_cls=InterruptMidStep)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 5"):
        trainer.train()
    resumed = make_trainer(tmp_path)
    resumed.resume()
    resumed.train()
    assert_same_run(straight, resumed)


class NaNAtStep13(Toy2DTask):
    calls = 0

    def loss_and_backward(self, batch_size, rng):
        loss = super().loss_and_backward(batch_size, rng)
        type(self).calls += 1
        return float("nan") if type(self).calls == 13 else loss


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, task_cls=NaNAtStep13, checkpoint_every=5)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 13.*last good checkpoint \(step 10\)") as info:
        trainer.train()
    assert info.value.step == 13
    assert trainer.step == 12  # the NaN step changed nothing
    assert all(np.all(np.isfinite(v)) for v in trainer.model.state_dict().values())
    ck = load_checkpoint(tmp_path / "checkpoint")
    assert ck.training_state["step"] == 10
    assert (tmp_path / "loss.png").exists()


def test_infinite_gradient_stops_too(tmp_path):
    class InfGrad(Toy2DTask):
        def loss_and_backward(self, batch_size, rng):
            loss = super().loss_and_backward(batch_size, rng)
            self.model.out.grads["bias"][0] = np.inf
            return loss

    trainer = make_trainer(task_cls=InfGrad)
    with pytest.raises(NonFiniteLossError, match="gradient norm is not finite at step 1.*No checkpoint had been"):
        trainer.train()


def test_resume_refuses_a_different_configuration(tmp_path):
    make_trainer(tmp_path, steps=4).train()
    other = make_trainer(tmp_path, steps=4, lr=3e-2, checkpoint_every=2)  # checkpoint_every may change
    with pytest.raises(CheckpointError, match=r"train\.lr: 0\.01 in the checkpoint, 0\.03 now"):
        other.resume()
    assert make_trainer(tmp_path / "none").resume() is False


def test_task_from_checkpoint_gives_the_ema_weights(tmp_path):
    trainer = make_trainer(tmp_path, steps=4)
    trainer.train()
    ck = load_checkpoint(tmp_path / "checkpoint")
    task = task_from_checkpoint(ck)
    raw = task_from_checkpoint(ck, use_ema=False)
    for name, value in task.model.state_dict().items():
        assert np.array_equal(value, trainer.ema.shadow[name])
        assert np.array_equal(raw.model.state_dict()[name], trainer.model.state_dict()[name])
    x = task.sample("euler", 3, 10, seed=0)
    assert x.shape == (10, 2) and np.all(np.isfinite(x))


def test_task_registry():
    assert get_task("toy2d") is Toy2DTask
    assert [get_task(name).name for name in ("digits", "shapes-vae", "shapes")] == ["digits", "shapes-vae", "shapes"]
    TASKS["later"] = None  # a planned task that is not written yet
    try:
        with pytest.raises(TaskNotAvailable, match="task 'later' is not available yet"):
            get_task("later")
    finally:
        del TASKS["later"]
    with pytest.raises(LookupError, match="unknown task 'mnist'; choose one of toy2d, digits"):
        get_task("mnist")


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        TrainConfig(steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=-1.0)


def test_loss_plot_is_a_png_and_leaves_pyplot_alone(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    path = save_loss_plot(np.linspace(2, 1, 300), tmp_path / "loss.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert matplotlib.get_backend() == backend
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]  # the temporary was renamed
