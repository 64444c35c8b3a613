"""Train a diffusion model on 2-D toy data, and measure its samples.

DDPM Algorithm 1 (training), one minibatch per iteration::

    1. x_0 ~ q(x_0)                        a batch of data points
    2. t ~ Uniform({0, ..., T-1})
    3. eps ~ N(0, I)
    4. x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps            (Eq. 4)
    5. gradient step on || target - model(x_t, t) ||^2      (Eq. 14; target eps, x_0 or v)

Steps 1-4 and the loss are :meth:`Toy2DTask.loss_and_backward`; the
:class:`~diffusion_np.training.trainer.Trainer` does step 5 with Adam, a
linear-warmup + cosine learning rate, gradient clipping and an EMA of the
weights that is used for sampling, and adds checkpoints, exact resume and plots.
:func:`train_toy2d` is the one-call version for notebooks and tests.

:func:`evaluate_toy2d` samples with several samplers and reports the sliced
Wasserstein distance to fresh data, beside the data-vs-data baseline (two
independent draws of the same size): the floor any model can reach.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np

from diffusion_np.backend import asnumpy, device_of, get_xp, to_device
from diffusion_np.data.toy2d import DATASETS, sample_toy2d
from diffusion_np.diffusion import check_prediction_type, q_sample, training_target
from diffusion_np.metrics.distances import sliced_wasserstein
from diffusion_np.models.toy_mlp import ToyDenoiser
from diffusion_np.nn.losses import mse_loss_backward, mse_loss_forward
from diffusion_np.optim import EMA
from diffusion_np.samplers import SAMPLERS, loop
from diffusion_np.schedules import NoiseSchedule
from diffusion_np.training.argtypes import positive_int
from diffusion_np.training.plots import save_scatter
from diffusion_np.training.trainer import TrainConfig, Trainer

#: points in the training pool: an unlimited dataset in practice
_POOL_SIZE = 100_000


@dataclass
class Toy2DConfig:
    """Everything that rebuilds a :class:`Toy2DTask` (stored in its checkpoints).

    ``trained_betas`` (diffusers' name) replaces the named beta schedule when set.
    """

    dataset: str = "swiss_roll"
    hidden: int = 128
    depth: int = 3
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list | None = None
    data_seed: int = 0  # seed of the training pool (the model and batches use the trainer's generator)

    def schedule_kwargs(self) -> dict:
        """The keywords a sampler (or NoiseSchedule.from_config) takes for this schedule."""
        return dict(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                    beta_end=self.beta_end, beta_schedule=self.beta_schedule, trained_betas=self.trained_betas)


class Toy2DTask:
    """A :class:`ToyDenoiser` on a 2-D toy dataset: the task protocol's worked example
    (see :mod:`diffusion_np.training.trainer`)."""

    name = "toy2d"
    description = "an MLP denoiser on 2-D toy data (swiss roll, two moons, eight Gaussians, checkerboard)"
    Config = Toy2DConfig
    train_defaults = {"steps": 6000, "batch_size": 512, "lr": 3e-3, "ema_decay": 0.995}
    #: what previews draw: 1000 points with 50 DDIM steps
    preview = {"sampler": "ddim", "steps": 50, "n": 1000}

    def __init__(self, config: Toy2DConfig, rng: np.random.Generator) -> None:
        if config.dataset not in DATASETS:
            raise ValueError(f"unknown toy dataset {config.dataset!r}; choose one of {', '.join(DATASETS)}")
        check_prediction_type(config.prediction_type)
        self.config = config
        self.schedule = NoiseSchedule.from_config(**config.schedule_kwargs())
        self.model = ToyDenoiser(hidden=config.hidden, depth=config.depth, rng=rng)
        self._pool = None

    def modules(self) -> dict:
        return {"denoiser": self.model}

    @property
    def pool(self) -> np.ndarray:
        """The training data, (100_000, 2), drawn on first use."""
        if self._pool is None:
            self._pool = sample_toy2d(self.config.dataset, _POOL_SIZE, seed=self.config.data_seed)
        return self._pool

    def loss_and_backward(self, batch_size: int, rng: np.random.Generator) -> float:
        """Steps 1-4 of Algorithm 1 and the loss of step 5, backward into the model's gradients."""
        pool, schedule = self.pool, self.schedule
        x0 = pool[rng.integers(0, len(pool), batch_size)]  # 1. data          (B, 2)
        t = rng.integers(0, schedule.num_train_timesteps, batch_size)  # 2. timesteps  (B,)
        eps = rng.standard_normal(x0.shape).astype(np.float32)  # 3. noise        (B, 2)
        device = device_of(_first_param(self.model))  # drawn on the host, moved to the model's device
        x0, t, eps = to_device(x0, device), to_device(t, device), to_device(eps, device)
        x_t = q_sample(x0, t, eps, schedule.alpha_bar)  # 4. forward process
        target = training_target(x0, eps, t, schedule.alpha_bar, self.config.prediction_type)
        loss, cache = mse_loss_forward(self.model(x_t, t), target)  # 5. the loss, then its gradient
        self.model.backward(mse_loss_backward(cache))
        return float(asnumpy(loss))  # the one deliberate device -> host copy of a step

    def make_sampler(self, name: str):
        """The sampler ``name`` (a key of ``SAMPLERS``) for this task's schedule and prediction type."""
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
        kwargs = dict(self.config.schedule_kwargs(), prediction_type=self.config.prediction_type)
        if name in ("ddpm", "ddim"):
            # the toy data span about [-3, 3]; clipping x0 to [-1, 1] (diffusers' default) would fold them
            kwargs["clip_sample"] = False
        return SAMPLERS[name](**kwargs)

    def sample(self, sampler: str, steps: int, n: int, seed: int, progress: bool = False) -> np.ndarray:
        """``n`` points (n, 2) drawn with the current weights."""
        x = loop.sample(lambda x, t: self.model(x, t), (n, 2), self.make_sampler(sampler), steps, seed=seed,
                        progress=progress, xp=get_xp(_first_param(self.model)))
        return asnumpy(x)

    def save_png(self, samples, path, title: str = "") -> None:
        """Scatter plot of ``samples`` over a grey cloud of real data."""
        save_scatter(samples, path, reference=sample_toy2d(self.config.dataset, 2000, seed=1), title=title)

    def save_preview(self, path, seed: int, title: str) -> None:
        p = self.preview
        samples = self.sample(p["sampler"], p["steps"], p["n"], seed)
        self.save_png(samples, path, f"{title}, {p['sampler']} {p['steps']} steps")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """``diffusion-np train toy2d`` options (defaults from :class:`Toy2DConfig`)."""
        d = Toy2DConfig()
        s = argparse.SUPPRESS
        parser.add_argument("--dataset", choices=DATASETS, default=s,
                            help=f"toy distribution to learn (default {d.dataset})")
        parser.add_argument("--prediction-type", choices=("epsilon", "sample", "v_prediction"), default=s,
                            help=f"what the network predicts: noise, x_0 or v (default {d.prediction_type})")
        parser.add_argument("--hidden", type=positive_int, default=s, metavar="N",
                            help=f"width of the MLP's hidden layers (default {d.hidden})")
        parser.add_argument("--depth", type=positive_int, default=s, metavar="N",
                            help=f"number of hidden layers (default {d.depth})")


@dataclass
class ToyRun:
    """What :func:`train_toy2d` returns: the model, its EMA, the schedule and the loss curve."""

    model: ToyDenoiser
    ema: EMA
    schedule: NoiseSchedule
    prediction_type: str
    losses: list = field(default_factory=list)


def train_toy2d(
    dataset: str = "swiss_roll",
    steps: int = 6000,
    batch_size: int = 512,
    lr: float = 3e-3,
    hidden: int = 128,
    depth: int = 3,
    prediction_type: str = "epsilon",
    schedule: NoiseSchedule | None = None,
    ema_decay: float = 0.995,
    seed: int = 0,
    progress: bool = True,
    out_dir=None,
) -> ToyRun:
    """Train a :class:`ToyDenoiser` on ``dataset`` (see :mod:`diffusion_np.data.toy2d`).

    One generator seeded with ``seed`` initialises the model and then draws every
    batch, timestep and noise. With ``out_dir`` the run also writes checkpoints,
    ``loss.png`` and previews there (see :class:`~diffusion_np.training.trainer.Trainer`).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    config = Toy2DConfig(dataset=dataset, hidden=hidden, depth=depth, prediction_type=prediction_type,
                         data_seed=seed)
    if schedule is not None:
        config.trained_betas = schedule.betas.tolist()  # a float64 list: JSON keeps it exactly
    rng = np.random.default_rng(seed)
    task = Toy2DTask(config, rng)
    train_config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, seed=seed,
                               grad_clip=1.0)
    trainer = Trainer(task, train_config, out_dir=out_dir, rng=rng, progress=progress)
    trainer.train()
    return ToyRun(task.model, trainer.ema, task.schedule, prediction_type, trainer.losses)


def evaluate_toy2d(run: ToyRun, dataset: str, samplers: dict, n: int = 10_000, seed: int = 1,
                   progress: bool = False, return_samples: bool = False):
    """Sliced Wasserstein distance to fresh data for each ``{label: (sampler, steps)}``.

    Returns ``{label: distance, ..., "data_vs_data": baseline}``. Samples come from
    the EMA weights. The baseline shrinks like 1/sqrt(n): at n = 2000 it is as
    large as the error of a model that has learnt only a blurred spiral (measured:
    0.12 vs 0.12), at n = 10,000 the same model is 2.1x the baseline and a
    well-trained one 1.0x. Use n >= 10,000 when the number has to mean something.
    With ``return_samples=True`` also returns ``{label: (n, 2) samples, "data": reference}``.
    """
    reference = sample_toy2d(dataset, n, seed=seed + 1000)
    results = {"data_vs_data": sliced_wasserstein(sample_toy2d(dataset, n, seed=seed + 2000), reference)}
    samples = {"data": reference}
    with run.ema.average_parameters(run.model):
        for label, (sampler, steps) in samplers.items():
            x = loop.sample(lambda x, t: run.model(x, t), (n, 2), sampler, steps, seed=seed, progress=progress,
                            xp=get_xp(_first_param(run.model)))
            samples[label] = asnumpy(x)
            results[label] = sliced_wasserstein(samples[label], reference)
    return (results, samples) if return_samples else results


def _first_param(model):
    """One of ``model``'s parameters: its array module and device are the model's."""
    return next(model.named_parameters())[1]
