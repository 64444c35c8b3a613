"""One training loop for every model: progress bar, checkpoints, exact resume, Ctrl-C, NaN guard, plots.

The loop is the same for the 2-D toy, the digits U-Net, the shapes VAE and the
text-to-image model. What differs between them (the data, the loss, how to draw
samples) lives in a small *task* object that the :class:`Trainer` drives.

The task protocol
-----------------
A task is any class with these members (:class:`TrainingTask` spells them out
with types; :class:`~diffusion_np.training.toy2d.Toy2DTask` is the worked example)::

    class DigitsTask:
        name = "digits"                  # its key in TASKS, stored in every checkpoint
        description = "a U-Net on ..."   # one line for `diffusion-np train --help`
        Config = DigitsConfig            # a dataclass of JSON values: all that rebuilds the task
        train_defaults = {"lr": 2e-4}    # TrainConfig fields whose defaults differ for this task

        def __init__(self, config: DigitsConfig, rng: np.random.Generator):
            self.config = config
            self.model = UNet2D(..., rng=rng)     # the network being trained (initialised from rng)

        def modules(self) -> dict[str, Module]:
            return {"unet": self.model}           # what a checkpoint stores; include frozen parts (a VAE)

        def loss_and_backward(self, batch_size: int, rng: np.random.Generator) -> float:
            # draw a batch, t and the noise FROM rng ONLY, run forward and the loss, and
            # backward into self.model's gradients (the trainer has zeroed them); return the loss

        def save_preview(self, path: Path, seed: int, title: str) -> None:
            # sample with the current weights (the trainer swaps the EMA weights in) and write a PNG;
            # draw from np.random.default_rng(seed), never from the training rng

        def sample(self, sampler: str, steps: int, n: int, seed: int, progress: bool = False):
            # n samples with sampler (a key of diffusion_np.samplers.SAMPLERS); for `diffusion-np sample`

        def save_png(self, samples, path: Path, title: str) -> None:
            # a picture of `sample`'s output: a scatter plot, an image grid

        # optional: state_dict() -> dict and load_state_dict(dict), training state of the task's own
        # (arrays and JSON values) that the checkpoint keeps and --resume restores, as distillation's
        # EMA target network

        @staticmethod
        def add_arguments(parser: argparse.ArgumentParser) -> None:
            # the task's own options for `diffusion-np train <name>`, one per Config field,
            # each with default=argparse.SUPPRESS (so --resume can tell what was given)

To make a new task available on the command line, point its entry of
:data:`TASKS` at the class.

Exact resume
------------
All randomness of training comes from one ``numpy.random.Generator`` that the
trainer owns and saves (its ``bit_generator.state``) with the weights, the
optimizer moments, the learning-rate scheduler, the EMA and the loss history.
So ``train 20 steps`` and ``train 10, save, load, train 10`` give the same
losses and weights bit for bit on NumPy. Previews use their own seed and swap
the EMA weights in and out exactly, so they change nothing either.

Ctrl-C and NaN
--------------
In the main thread the first Ctrl-C only sets a flag: the current step finishes,
a checkpoint is written, and :class:`TrainingInterrupted` (a KeyboardInterrupt)
names it. A second Ctrl-C stops at once (and saves only if no update was under
way). A NaN or Inf loss (or gradient norm) stops training *before* the update
with :class:`NonFiniteLossError`, naming the step; the last checkpoint, written
before things went wrong, is left as it was.

Left out: gradient accumulation, mixed precision, multiple optimizers or
parameter groups, keeping more than the latest checkpoint, validation losses.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import signal
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from tqdm.auto import tqdm

from diffusion_np.io.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from diffusion_np.nn.module import Module
from diffusion_np.optim import EMA, Adam, AdamW, LRScheduler, clip_grad_norm, linear_warmup_cosine
from diffusion_np.training.plots import save_loss_plot

__all__ = [
    "DISTILL_TASKS",
    "TASKS",
    "NonFiniteLossError",
    "TaskNotAvailable",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "TrainingTask",
    "export_checkpoint",
    "get_task",
    "run_from_checkpoint",
    "task_from_checkpoint",
]

#: Task name -> "module:Class" of its task class, imported on first use (task modules
#: import this one, so naming the class directly would be a circular import).
#: ``None``: planned, not written yet; ``get_task`` then says so.
TASKS: dict[str, str | None] = {
    "toy2d": "diffusion_np.training.toy2d:Toy2DTask",
    "digits": "diffusion_np.training.tasks:DigitsTask",
    "shapes-vae": "diffusion_np.training.tasks:ShapesVAETask",
    "shapes": "diffusion_np.training.tasks:ShapesTask",
    "shapes-controlnet": "diffusion_np.training.controlnet:ShapesControlNetTask",
    "lcm": "diffusion_np.training.distill:LCMDistillTask",
    # `diffusion-np finetune lora|textual-inversion|dreambooth` (not listed under `train`)
    "finetune-lora": "diffusion_np.training.personalise:LoRAFinetuneTask",
    "finetune-textual-inversion": "diffusion_np.training.personalise:TextualInversionTask",
    "finetune-dreambooth": "diffusion_np.training.personalise:DreamBoothTask",
    "progressive": "diffusion_np.training.progressive:ProgressiveDistillTask",
}
#: the tasks that distil a trained teacher: ``diffusion-np distill NAME`` rather than ``train NAME``
DISTILL_TASKS = ("lcm", "progressive")


class TrainingTask(Protocol):
    """What the :class:`Trainer` needs from a task (see the module docstring)."""

    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type]
    train_defaults: ClassVar[dict]
    config: Any
    model: Module

    def modules(self) -> dict[str, Module]: ...

    def loss_and_backward(self, batch_size: int, rng: np.random.Generator) -> float: ...

    def save_preview(self, path: Path, seed: int, title: str) -> None: ...

    def sample(self, sampler: str, steps: int, n: int, seed: int, progress: bool = False): ...

    def save_png(self, samples, path: Path, title: str) -> None: ...


class TaskNotAvailable(LookupError):
    """The task is registered in :data:`TASKS` but not implemented yet."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`Trainer.train`; ``checkpoint`` is where the state was saved (or None)."""

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN or Inf; ``step`` is the step that produced it."""

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


def get_task(name: str) -> type:
    """The task class registered under ``name`` in :data:`TASKS`."""
    if name not in TASKS:
        raise LookupError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    target = TASKS[name]
    if target is None:
        raise TaskNotAvailable(f"task {name!r} is not available yet")
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


# ----------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """How to train (the task's Config says *what*). Saved in every checkpoint.

    Parameters
    ----------
    steps : int
        Total number of optimizer steps; the learning-rate schedule ends there.
    batch_size : int
        Examples per step, passed to ``task.loss_and_backward``.
    lr : float
        Peak learning rate of the linear-warmup + cosine schedule.
    warmup_steps : int or None
        Linear warmup length; None means ``steps // 20``.
    weight_decay : float
        0 uses Adam; > 0 uses AdamW with this decoupled decay.
    ema_decay : float
        Decay of the EMA of the weights used for previews and sampling.
    grad_clip : float or None
        Clip the global gradient norm to this value (None: no clipping). A
        NaN/Inf norm stops training (checked only when clipping).
    seed : int
        Seeds the generator behind initialisation, batches, timesteps and noise.
    checkpoint_every : int
        Write a checkpoint (and the loss curve) every this many steps; 0: only at the end.
    sample_every : int
        Write a preview PNG every this many steps; 0: only at the end.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    sample_every: int = 500

    #: fields that do not change the trained weights: they may differ when resuming
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = ("checkpoint_every", "sample_every")

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {what}")

        need(_is_int(self.steps) and self.steps >= 1, f"steps must be an integer >= 1, got {self.steps!r}")
        need(_is_int(self.batch_size) and self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(
            self.warmup_steps is None or (_is_int(self.warmup_steps) and 0 <= self.warmup_steps <= self.steps),
            f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps!r}",
        )
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be >= 0")
        need(0 <= self.ema_decay <= 1, f"ema_decay must be in [0, 1], got {self.ema_decay!r}")
        need(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        need(_is_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("checkpoint_every", "sample_every"):
            value = getattr(self, name)
            need(_is_int(value) and value >= 0, f"{name} must be an integer >= 0, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Train ``task.model`` with Adam(W), warmup + cosine, gradient clipping and an EMA.

    One step is DDPM Algorithm 1 as the task writes it, wrapped as::

        1. zero the gradients
        2. loss = task.loss_and_backward(batch_size, rng)       (forward + backward)
        3. stop if the loss or the gradient norm is NaN/Inf      (nothing updated yet)
        4. clip the gradient norm; optimizer step; scheduler step; EMA update

    Parameters
    ----------
    task : TrainingTask
        See the module docstring.
    config : TrainConfig
    out_dir : str or Path, optional
        Run directory: ``checkpoint/`` (the latest checkpoint), ``loss.png`` and
        ``samples/step-NNNNNN.png``. None trains in memory only.
    rng : numpy.random.Generator, optional
        The training generator; default ``default_rng(config.seed)``. Pass the
        one that initialised the model to reproduce a run from its seed alone.
    progress : bool
        Show a tqdm bar with the loss, the learning rate and it/s.
    callbacks : iterable of callable(trainer)
        Called after every completed step (after any checkpoint of that step).
    """

    def __init__(
        self,
        task: TrainingTask,
        config: TrainConfig,
        out_dir=None,
        rng: np.random.Generator | None = None,
        progress: bool = True,
        callbacks: Iterable[Callable[[Trainer], None]] = (),
    ) -> None:
        self.task = task
        self.config = config
        self.model = task.model
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.rng = rng if rng is not None else np.random.default_rng(config.seed)
        self.progress = progress
        self.callbacks = list(callbacks)
        if config.weight_decay > 0:
            self.optimizer = AdamW(self.model, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = Adam(self.model, lr=config.lr)
        warmup = config.warmup_steps if config.warmup_steps is not None else config.steps // 20
        self.scheduler = LRScheduler(
            self.optimizer, linear_warmup_cosine, base_lr=config.lr, warmup_steps=warmup, total_steps=config.steps
        )
        self.ema = EMA(self.model, decay=config.ema_decay)
        self.step = 0  # completed optimizer steps
        self.losses: list[float] = []
        self.last_checkpoint_step: int | None = None
        self._updating = False  # True while the weights are half updated (never save then)

    # ------------------------------------------------------------------ paths
    @property
    def checkpoint_dir(self) -> Path | None:
        """``out_dir / "checkpoint"`` (None without an out_dir)."""
        return None if self.out_dir is None else self.out_dir / "checkpoint"

    # ------------------------------------------------------------------ state
    def checkpoint_config(self) -> dict:
        """What ``config.json`` records: the task's name and config and the TrainConfig."""
        return {
            "task": self.task.name,
            "task_config": dataclasses.asdict(self.task.config),
            "train": dataclasses.asdict(self.config),
        }

    def state_dict(self) -> dict:
        """Everything that changes during training, besides the weights; ``"task"`` holds the task's
        own training state where it has one (a ``state_dict`` method: distillation's target network)."""
        state = {
            "step": self.step,
            "losses": np.asarray(self.losses, dtype=np.float64),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict(),
            "rng": self.rng.bit_generator.state,  # ints and strings: JSON-serialisable
        }
        if hasattr(self.task, "state_dict"):
            state["task"] = self.task.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the weights are loaded separately)."""
        saved_generator = state["rng"]["bit_generator"]
        if saved_generator != type(self.rng.bit_generator).__name__:
            raise CheckpointError(
                f"the checkpoint's generator is {saved_generator}, this trainer's is "
                f"{type(self.rng.bit_generator).__name__}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])  # after the optimizer: it sets optimizer.lr
        self.ema.load_state_dict(state["ema"])
        self.rng.bit_generator.state = state["rng"]
        self.step = int(state["step"])
        self.losses = [float(v) for v in np.asarray(state["losses"]).tolist()]
        if hasattr(self.task, "load_state_dict"):
            if "task" not in state:
                raise CheckpointError(f"the checkpoint has no training state of the {self.task.name} task")
            self.task.load_state_dict(state["task"])

    def save_checkpoint(self) -> Path:
        """Write the weights, the config and the training state to :attr:`checkpoint_dir`."""
        if self.out_dir is None:
            raise ValueError("this Trainer has no out_dir to save checkpoints in")
        path = save_checkpoint(self.checkpoint_dir, self.task.modules(), self.checkpoint_config(), self.state_dict())
        self.last_checkpoint_step = self.step
        return path

    def resume(self, checkpoint: Checkpoint | None = None) -> bool:
        """Continue from ``checkpoint`` (default: :attr:`checkpoint_dir`, if one is there).

        Returns False when there is nothing to resume from. The checkpoint must
        come from the same task and configuration (apart from
        ``TrainConfig.RESUMABLE_CHANGES``); otherwise a CheckpointError lists the differences.
        """
        if checkpoint is None:
            if self.checkpoint_dir is None or not self.checkpoint_dir.exists():
                return False
            checkpoint = load_checkpoint(self.checkpoint_dir)
        if checkpoint.training_state is None:
            raise CheckpointError(f"{checkpoint.directory} has weights only (no training state) and cannot be resumed")
        differences = config_differences(checkpoint.config, self.checkpoint_config())
        if differences:
            raise CheckpointError(
                f"{checkpoint.directory} was trained with a different configuration: " + "; ".join(differences)
            )
        checkpoint.load_weights(self.task.modules())
        self.load_state_dict(checkpoint.training_state)
        self.last_checkpoint_step = self.step
        return True

    # ------------------------------------------------------------------ the loop
    def train(self, stop_at: int | None = None) -> list[float]:
        """Run steps until ``config.steps`` (or ``stop_at``, to train in chunks); return all losses.

        With an out_dir: checkpoints every ``checkpoint_every`` steps and at the
        end, previews every ``sample_every`` steps and at the end, and
        ``loss.png`` with each checkpoint.
        """
        end = self.config.steps if stop_at is None else min(int(stop_at), self.config.steps)
        if self.step >= end:
            return self.losses
        bar = tqdm(total=self.config.steps, initial=self.step, desc=f"train {self.task.name}",
                   disable=not self.progress, mininterval=0.5, dynamic_ncols=True)
        try:
            with _sigint_between_steps() as interrupt, bar:
                while self.step < end:
                    loss = self._one_step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.optimizer.lr:.2e}", refresh=False)
                    self._periodic_outputs(final=self.step == end)
                    for callback in self.callbacks:
                        callback(self)
                    if interrupt.requested:
                        raise KeyboardInterrupt
        except NonFiniteLossError:
            self._write_loss_plot()  # the curve up to the last finite loss helps diagnose
            raise
        except KeyboardInterrupt as err:
            raise self._interrupted() from err
        return self.losses

    def _one_step(self) -> float:
        rng_state = self.rng.bit_generator.state  # to rewind if Ctrl-C lands before the update
        try:
            self.optimizer.zero_grad()  # 1.
            loss = float(self.task.loss_and_backward(self.config.batch_size, self.rng))  # 2.
            if not math.isfinite(loss):  # 3.
                raise NonFiniteLossError(self._nonfinite_message(f"loss is {loss}"), self.step + 1,
                                         self.checkpoint_dir)
            if self.config.grad_clip is not None:
                try:  # raises before scaling when the norm is NaN/Inf
                    clip_grad_norm(self.model, self.config.grad_clip, error_if_nonfinite=True)
                except RuntimeError:
                    raise NonFiniteLossError(self._nonfinite_message("gradient norm is not finite"),
                                             self.step + 1, self.checkpoint_dir) from None
        except KeyboardInterrupt:
            # only gradients changed so far: rewinding the generator makes the state "end of the last step"
            self.rng.bit_generator.state = rng_state
            raise
        self._updating = True  # 4. an interruption from here on would leave half-updated weights
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update()
        self.step += 1
        self.losses.append(loss)
        self._updating = False
        return loss

    def _nonfinite_message(self, what: str) -> str:
        message = f"the {what} at step {self.step + 1}; stopped before updating the weights. "
        if self.last_checkpoint_step is not None:
            return message + (
                f"The last good checkpoint (step {self.last_checkpoint_step}) is {self.checkpoint_dir}; "
                "try a lower learning rate"
            )
        return message + "No checkpoint had been written yet; try a lower learning rate"

    def _interrupted(self) -> TrainingInterrupted:
        if self._updating:
            kept = (f"the last checkpoint (step {self.last_checkpoint_step}) in {self.checkpoint_dir} is kept"
                    if self.last_checkpoint_step is not None else "no checkpoint was written")
            return TrainingInterrupted(f"interrupted during the update of step {self.step + 1}; nothing saved, {kept}",
                                       self.step, None)
        if self.out_dir is None:
            return TrainingInterrupted(f"interrupted at step {self.step} (no out_dir: nothing saved)", self.step, None)
        path = self.save_checkpoint()
        self._write_loss_plot()
        return TrainingInterrupted(f"interrupted at step {self.step}; checkpoint saved to {path}", self.step, path)

    def _periodic_outputs(self, final: bool) -> None:
        if self.out_dir is None:
            return
        every_ckpt, every_sample = self.config.checkpoint_every, self.config.sample_every
        if final or (every_ckpt and self.step % every_ckpt == 0):
            self.save_checkpoint()
            self._write_loss_plot()
        if final or (every_sample and self.step % every_sample == 0):
            self.save_preview()

    # ------------------------------------------------------------------ pictures
    def save_preview(self, path=None) -> Path:
        """A PNG of samples from the EMA weights (default ``out_dir/samples/step-NNNNNN.png``)."""
        if path is None:
            path = self.out_dir / "samples" / f"step-{self.step:06d}.png"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.ema.average_parameters(self.model):  # puts the trained weights back exactly afterwards
            self.task.save_preview(path, seed=self.config.seed, title=f"{self.task.name}, step {self.step} (EMA)")
        return path

    def _write_loss_plot(self) -> None:
        if self.out_dir is not None and self.losses:
            save_loss_plot(self.losses, self.out_dir / "loss.png", title=f"{self.task.name} training loss")


def config_differences(saved: dict, current: dict) -> list[str]:
    """``"train.lr: 0.003 in the checkpoint, 0.01 now"`` for every differing field."""
    differences = []
    if saved.get("task") != current.get("task"):
        return [f"task: {saved.get('task')!r} in the checkpoint, {current.get('task')!r} now"]
    for section in ("task_config", "train"):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if section == "train" and key in TrainConfig.RESUMABLE_CHANGES:
                continue
            if old.get(key) != new.get(key):
                differences.append(f"{section}.{key}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now")
    return differences


def run_from_checkpoint(checkpoint: Checkpoint) -> tuple[Any, TrainConfig, np.random.Generator]:
    """The task and the TrainConfig that a checkpoint's ``config.json`` records, checked field by field.

    Every command that reads a run (``sample``, ``export``, ``evaluate``, ``train --resume``)
    comes through here, so a hand-edited config.json (an unknown dataset, ``"steps": "many"``,
    a deleted section) gives one CheckpointError that names the file and the field instead
    of a traceback from wherever the value is first used.

    Returns ``(task, train_config, rng)``: the task built with fresh weights (load the
    checkpoint's into it), drawn from ``rng``, a generator seeded with the run's seed as
    in training, which a Trainer resuming the run continues with.
    """
    where, config = checkpoint.directory / "config.json", checkpoint.config
    name = config.get("task")
    if name is None:
        raise CheckpointError(f"{checkpoint.directory} is not a training checkpoint (its config names no task)")
    if not isinstance(name, str) or name not in TASKS:
        raise CheckpointError(f'{where}: "task" is {name!r}; the tasks are {", ".join(TASKS)}')
    cls = get_task(name)
    for section in ("task_config", "train"):
        if not isinstance(config.get(section), dict):
            got = f"got {config[section]!r}" if section in config else "it is missing"
            raise CheckpointError(f'{where}: "{section}" must be a JSON object with the {name} run\'s settings; {got}')
    for section, config_class in (("task_config", cls.Config), ("train", TrainConfig)):
        unknown = sorted(set(config[section]) - {f.name for f in dataclasses.fields(config_class)})
        if unknown:
            raise CheckpointError(f"{where}: {section}.{unknown[0]} is not a setting of {config_class.__name__}")
    try:
        train_config = TrainConfig(**config["train"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: train{_mistyped(config['train'], TrainConfig)}: {err}") from None
    rng = np.random.default_rng(train_config.seed)
    try:
        task = cls(cls.Config(**config["task_config"]), rng)  # the task's own checks of its settings
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: task_config{_mistyped(config['task_config'], cls.Config)} of the "
                              f"{name} task: {err}") from None
    return task, train_config, rng


def _mistyped(values: dict, config_class) -> str:
    """``".lr = 'fast'"`` for the first field holding text where its default is not (or the reverse):
    a TypeError from deep inside a check then still names the field. "" when none is."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    for key, value in values.items():
        default = defaults.get(key)
        if value is not None and default is not None and isinstance(value, str) != isinstance(default, str):
            return f".{key} = {value!r}"
    return ""


def task_from_checkpoint(checkpoint: Checkpoint, use_ema: bool = True):
    """Rebuild the task stored in ``checkpoint`` with its weights (the EMA weights by default)."""
    task, _, _ = run_from_checkpoint(checkpoint)  # the random init is overwritten just below
    checkpoint.load_weights(task.modules())
    state = checkpoint.training_state
    if use_ema and state is not None and "ema" in state:
        task.model.load_state_dict(state["ema"]["shadow"])
    return task


def export_checkpoint(source, directory, dtype=np.float16, use_ema: bool = True) -> Path:
    """Write the weights of training checkpoint ``source`` for sampling only: no optimizer
    state, the EMA weights in place of the raw ones, cast to ``dtype`` (float16 halves the files).

    This is how the shipped weights (:mod:`diffusion_np.pretrained`) were made. The
    result is still a training checkpoint of the same task without a training state, so
    everything that reads one (``sample``, ``evaluate``, ``TextToImageModel.load``) reads it;
    ``--resume`` cannot continue it. Paths to other runs (a shapes run's ``--vae``) are
    dropped: the exported directory holds every weight it needs. The config records the
    step and the training options under ``"exported_from"``.
    """
    checkpoint = load_checkpoint(source)
    task = task_from_checkpoint(checkpoint, use_ema=use_ema)
    config = dict(checkpoint.config)
    task_config = dict(config["task_config"])
    if isinstance(task_config.get("vae"), str):
        task_config["vae"] = None  # the weights travel in vae.safetensors; the config keeps vae_config
    state = checkpoint.training_state
    config["task_config"] = task_config
    config["exported_from"] = {"step": None if state is None else state.get("step"),
                               "weights": "ema" if use_ema and state is not None and "ema" in state else "raw",
                               "dtype": np.dtype(dtype).name}
    return save_checkpoint(directory, task.modules(), config, dtype=dtype)


# ----------------------------------------------------------------------------- helpers
@contextmanager
def _sigint_between_steps():
    """Turn the first Ctrl-C into a flag checked between steps; a second one interrupts at once.

    Signal handlers can only be installed from the main thread; elsewhere this
    does nothing and Ctrl-C raises KeyboardInterrupt wherever it lands.
    """
    flag = _Flag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        tqdm.write("Ctrl-C: finishing this step, then saving a checkpoint (press Ctrl-C again to stop at once)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


class _Flag:
    requested = False
