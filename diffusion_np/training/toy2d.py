"""Train a diffusion model on 2-D toy data, and measure its samples.

DDPM Algorithm 1 (training), one minibatch per iteration::

    1. x_0 ~ q(x_0)                        a batch of data points
    2. t ~ Uniform({0, ..., T-1})
    3. eps ~ N(0, I)
    4. x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps            (Eq. 4)
    5. gradient step on || target - model(x_t, t) ||^2      (Eq. 14; target eps, x_0 or v)

with Adam, a linear-warmup + cosine learning rate, and an EMA of the weights
that is used for sampling.

:func:`evaluate_toy2d` samples with several samplers and reports the sliced
Wasserstein distance to fresh data, beside the data-vs-data baseline (two
independent draws of the same size): the floor any model can reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from diffusion_np.data.toy2d import sample_toy2d
from diffusion_np.diffusion import q_sample, training_target
from diffusion_np.metrics.distances import sliced_wasserstein
from diffusion_np.models.toy_mlp import ToyDenoiser
from diffusion_np.nn.losses import mse_loss_backward, mse_loss_forward
from diffusion_np.optim import EMA, Adam, LRScheduler, clip_grad_norm, linear_warmup_cosine
from diffusion_np.schedules import NoiseSchedule


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
    steps: int = 3000,
    batch_size: int = 512,
    lr: float = 3e-3,
    hidden: int = 128,
    depth: int = 3,
    prediction_type: str = "epsilon",
    schedule: NoiseSchedule | None = None,
    ema_decay: float = 0.995,
    seed: int = 0,
    progress: bool = True,
) -> ToyRun:
    """Train a :class:`ToyDenoiser` on ``dataset`` (see :mod:`diffusion_np.data.toy2d`)."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    schedule = schedule if schedule is not None else NoiseSchedule.from_config(1000, 1e-4, 0.02, "linear")
    rng = np.random.default_rng(seed)
    pool = sample_toy2d(dataset, 100_000, seed=seed)  # an unlimited dataset in practice
    model = ToyDenoiser(hidden=hidden, depth=depth, rng=rng)
    optimizer = Adam(model, lr=lr)
    scheduler = LRScheduler(optimizer, linear_warmup_cosine, base_lr=lr, warmup_steps=steps // 20,
                            total_steps=steps)
    ema = EMA(model, decay=ema_decay)
    run = ToyRun(model, ema, schedule, prediction_type)
    T = schedule.num_train_timesteps
    for _ in tqdm(range(steps), desc=f"toy2d {dataset}", disable=not progress, mininterval=1.0):
        x0 = pool[rng.integers(0, len(pool), batch_size)]  # 1. data
        t = rng.integers(0, T, batch_size)  # 2. timesteps
        eps = rng.standard_normal(x0.shape).astype(np.float32)  # 3. noise
        x_t = q_sample(x0, t, eps, schedule.alpha_bar)  # 4. forward process
        target = training_target(x0, eps, t, schedule.alpha_bar, prediction_type)
        optimizer.zero_grad()  # 5. one gradient step
        loss, cache = mse_loss_forward(model(x_t, t), target)
        model.backward(mse_loss_backward(cache))
        clip_grad_norm(model, 1.0)
        optimizer.step()
        scheduler.step()
        ema.update()
        run.losses.append(float(loss))
    return run


def evaluate_toy2d(run: ToyRun, dataset: str, samplers: dict, n: int = 2000, seed: int = 1,
                   progress: bool = False) -> dict:
    """Sliced Wasserstein distance to fresh data for each ``{label: (sampler, steps)}``.

    Returns ``{label: distance, ..., "data_vs_data": baseline}``. Samples come from
    the EMA weights.
    """
    from diffusion_np.samplers.loop import sample

    reference = sample_toy2d(dataset, n, seed=seed + 1000)
    results = {"data_vs_data": sliced_wasserstein(sample_toy2d(dataset, n, seed=seed + 2000), reference)}
    with run.ema.average_parameters(run.model):
        for label, (sampler, steps) in samplers.items():
            x = sample(lambda x, t: run.model(x, t), (n, 2), sampler, steps, seed=seed, progress=progress)
            results[label] = sliced_wasserstein(x, reference)
    return results
