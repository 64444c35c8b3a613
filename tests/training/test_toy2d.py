"""End-to-end: a toy model trained in seconds must sample the data distribution.

The bar (issue: within 2x of the data-vs-data baseline) is the floor any model can
reach: two independent draws of the data set differ by that much. With 10,000
points the bar separates a model that has learnt the spiral (4000 steps: 1.1x)
from one that has learnt only a blurred band around it (2000 steps: 2.1x).
"""

import numpy as np
import pytest

from diffusion_np.samplers import DDIMSampler, DPMSolverMultistepSampler
from diffusion_np.training.toy2d import evaluate_toy2d, train_toy2d

CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


@pytest.fixture(scope="module")
def run():
    return train_toy2d("swiss_roll", steps=4000, batch_size=512, progress=False, seed=0)


def test_loss_goes_down(run):
    first, last = np.mean(run.losses[:50]), np.mean(run.losses[-200:])
    assert last < 0.7 * first, (first, last)


def test_samples_land_within_twice_the_data_baseline(run):
    samplers = {
        "ddim-50": (DDIMSampler(clip_sample=False, **CONFIG), 50),
        "dpm++-20": (DPMSolverMultistepSampler(**CONFIG), 20),
    }
    results = evaluate_toy2d(run, "swiss_roll", samplers, n=10_000)
    baseline = results["data_vs_data"]
    assert results["ddim-50"] < 2 * baseline, results
    assert results["dpm++-20"] < 2 * baseline, results


def test_untrained_model_fails_the_same_bar():
    # the bar can fail: one training step is not enough
    run = train_toy2d("swiss_roll", steps=1, batch_size=64, progress=False, seed=0)
    results = evaluate_toy2d(run, "swiss_roll", {"ddim-50": (DDIMSampler(clip_sample=False, **CONFIG), 50)}, n=10_000)
    assert results["ddim-50"] > 2 * results["data_vs_data"], results


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
        train_toy2d(steps=0)
