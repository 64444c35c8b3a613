"""Draw the figures of the concept pages with diffusion_np itself.

Run from the repository root (about half a minute on a laptop CPU)::

    .venv/bin/python docs/_gen/make_figures.py

It writes PNGs into docs/img/, which are committed, so building the site needs
neither this script nor a trained model. Every number in a figure comes from the
library: the schedules from :class:`NoiseSchedule`, the noisy images from
:func:`q_sample`, the samples from a toy model trained by :func:`train_toy2d`
and drawn by the samplers. Rerun it after changing any of those.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script that only writes files; never imported by the site build
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_np import NoiseSchedule, q_sample, sample  # noqa: E402
from diffusion_np.data import sample_toy2d  # noqa: E402
from diffusion_np.metrics import sliced_wasserstein  # noqa: E402
from diffusion_np.samplers import DDIMSampler, DDPMSampler, DPMSolverMultistepSampler  # noqa: E402
from diffusion_np.training.toy2d import train_toy2d  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "img"
DPI = 90
CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
# Adam steps of the toy model. At 2000 steps (the unit test's budget) the samples fill the
# roll's bounding region but not yet the spiral; by 6000 they lie on it.
STEPS = 6000


def _save(fig, name: str) -> None:
    path = OUT / name
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path.relative_to(OUT.parents[1])} ({path.stat().st_size / 1024:.0f} KiB)")


def test_image(size: int = 64) -> np.ndarray:
    """The image of tutorial 01: a colour gradient, a yellow disc and a black bar, (size, size, 3) in [-1, 1]."""
    v, u = np.mgrid[0:size, 0:size] / (size - 1)  # (H, W) each: row and column coordinate in [0, 1]
    img = np.stack([u, v, 0.5 + 0.5 * np.sin(2 * np.pi * (u + v))], axis=-1)  # (H, W, 3) in [0, 1]
    disc = (u - 0.4) ** 2 + (v - 0.42) ** 2 < 0.22**2
    img[disc] = (1.0, 0.9, 0.1)
    img[int(0.78 * size) : int(0.88 * size), int(0.15 * size) : int(0.85 * size)] = 0.0
    return (2.0 * img - 1.0).astype(np.float32)


def schedules_figure() -> None:
    """alpha_bar, log-SNR and sigma of the four named schedules and of zero terminal SNR."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    configs = {
        "linear (DDPM)": dict(beta_schedule="linear"),
        "scaled_linear (SD)": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        "cosine": dict(beta_schedule="squaredcos_cap_v2"),
        "sigmoid": dict(beta_schedule="sigmoid"),
        "scaled_linear, zero terminal SNR": dict(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
        ),
    }
    for label, config in configs.items():
        NoiseSchedule.from_config(1000, **config).plot(axes, label=label)
    axes[0].legend(fontsize=8)
    fig.suptitle("Noise schedules, T = 1000 (computed by NoiseSchedule)", y=1.02)
    _save(fig, "schedules.png")


def forward_process_figure() -> None:
    """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps for a few t, with one fixed eps (DDPM Eq. 4)."""
    schedule = NoiseSchedule.from_config(**CONFIG)
    x0 = test_image()[None]  # (1, H, W, 3)
    eps = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)
    ts = [0, 50, 100, 200, 350, 500, 750, 999]
    fig, axes = plt.subplots(1, len(ts), figsize=(1.6 * len(ts), 2.0))
    for ax, t in zip(axes, ts):
        x_t = q_sample(x0, np.array([t]), eps, schedule.alpha_bar)[0]
        ax.imshow(np.clip((x_t + 1.0) / 2.0, 0.0, 1.0))  # [-1, 1] -> [0, 1], clipped for display only
        ax.set_title(f"t = {t}\n" + r"$\bar\alpha_t$" + f" = {schedule.alpha_bar[t]:.3f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("Forward process q(x_t | x_0), linear schedule", y=1.08)
    _save(fig, "forward_process.png")


def toy_samples_figure() -> None:
    """A toy denoiser trained on the swiss roll, sampled by three samplers, with the SW distance to data."""
    start = time.perf_counter()
    run = train_toy2d("swiss_roll", steps=STEPS, batch_size=512, progress=False, seed=0)
    print(f"trained the toy model in {time.perf_counter() - start:.0f} s")
    n = 2000
    reference = sample_toy2d("swiss_roll", n, seed=1001)
    baseline = sliced_wasserstein(sample_toy2d("swiss_roll", n, seed=2001), reference)
    samplers = {
        "DDPM, 1000 steps": (DDPMSampler(clip_sample=False, **CONFIG), 1000),
        "DDIM, 50 steps": (DDIMSampler(clip_sample=False, **CONFIG), 50),
        "DPM-Solver++(2M), 20 steps": (DPMSolverMultistepSampler(**CONFIG), 20),
    }
    fig, axes = plt.subplots(1, 1 + len(samplers), figsize=(3.2 * (1 + len(samplers)), 3.3), sharex=True, sharey=True)
    axes[0].scatter(reference[:, 0], reference[:, 1], s=2, alpha=0.5, color="k")
    axes[0].set_title(f"data (SW of a 2nd draw: {baseline:.3f})", fontsize=9)
    with run.ema.average_parameters(run.model):
        for ax, (label, (sampler, steps)) in zip(axes[1:], samplers.items()):
            x = sample(lambda x, t: run.model(x, t), (n, 2), sampler, steps, seed=1, progress=False)
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
            ax.set_title(f"{label}\nSW to data: {sliced_wasserstein(x, reference):.3f}", fontsize=9)
    for ax in axes:
        ax.set_aspect("equal")
    fig.suptitle(f"Toy model ({STEPS} Adam steps on the swiss roll), samples from three samplers", y=1.04)
    _save(fig, "toy_samples.png")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    schedules_figure()
    forward_process_figure()
    toy_samples_figure()


if __name__ == "__main__":
    main()
