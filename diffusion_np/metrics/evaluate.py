"""Evaluate a checkpoint: generate samples, score them, report a table and a JSON-ready dict.

What ``diffusion-np evaluate`` runs. One call, :func:`evaluate_checkpoint`, loads a
checkpoint (a run directory, its ``checkpoint/``, an export, or ``pretrained:NAME``),
draws samples with any sampler and scores them with the metrics beside this file:

* ``digits``: images for the captions "the digit zero" ... "the digit nine", cycled.
  Scored by :func:`~diffusion_np.metrics.digits.score_digits` with the shipped digit
  classifier: the conditional accuracy (chance is 0.1) and the Frechet distance to the
  *test* split, which the model never saw, beside the same distance for as many real
  *train* digits (the floor).
* ``shapes``: GenEval-style prompt accuracy (Ghosh et al. 2023) read by
  :func:`~diffusion_np.metrics.shapes.analyse_shapes`, scored by
  :func:`~diffusion_np.metrics.shapes.score_shapes`:

  - *seen* prompts: the 162 combinations of the training split, cycled in a seeded
    shuffled order (320 images by default: every prompt once or twice);
  - *held-out* prompts: the 18 combinations never trained on (8 images each by
    default): does the model compose words it has only seen apart?

  An image counts for "all" only when colour, shape, size and position are all
  right; chance is 1/6 * 1/3 * 1/2 * 1/5 = 1/180.
* ``shapes-controlnet``: images generated under held-out control images (free geometry,
  :func:`~diffusion_np.training.controlnet.heldout_controls`), scored by
  :func:`~diffusion_np.metrics.control.score_control`: the IoU of each shape's mask with
  the control's (``control_iou``), beside what the caption's words alone would give, and the
  prompt accuracy on colour and shape.
* ``lcm`` and ``progressive`` (distilled students, :mod:`~diffusion_np.training.distill`,
  :mod:`~diffusion_np.training.progressive`): scored as their teacher's task (``digits`` or ``shapes``),
  with ``sampler="lcm"`` and 1-8 steps, or ``"ddim"`` and the round's steps.
* ``toy2d``: :func:`~diffusion_np.training.toy2d.evaluate_toy2d` gives the sliced
  Wasserstein distance to fresh data and the data-vs-data floor; the squared MMD
  with a Gaussian kernel (:func:`~diffusion_np.metrics.distances.mmd_rbf`) is added
  on the first 2000 points, with one bandwidth for the model and its floor; and the
  verdict, :func:`~diffusion_np.metrics.distances.toy2d_verdict` (an MMD with a kernel
  narrower than the data's structure, against the band of several fresh draws).

Generation and scoring are separate functions, so that a set of real images (an
"oracle" model) can be scored to show what a perfect model gets.

Noise: each batch of images is seeded from ``seed`` and the batch's index (a
:class:`numpy.random.SeedSequence` per batch), so the same call gives the same
numbers, and seen and held-out images never share their starting noise.

Defaults were sized on a 2-core machine: the shipped shapes model (a (64, 128) U-Net)
took 180 s of wall time for 320 + 144 images with 50 DDIM steps and guidance, the
shipped digits model 186 s for its 500 images (one BLAS thread, another job running on
the second core); DPM-Solver++ with 20 steps takes about 75 s for either.

Left out: the VAE task (``shapes-vae``; its number is
:func:`~diffusion_np.training.vae_helpers.vae_reconstruction_mse`), negative
prompts, and confidence intervals (run with several seeds to see the spread).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffusion_np import __version__
from diffusion_np.data.digits import digit_captions
from diffusion_np.data.shapes import COLOURS, LABEL_COLUMNS, POSITIONS, SHAPES, SIZES, all_prompts
from diffusion_np.data.toy2d import sample_toy2d
from diffusion_np.io.checkpoint import CheckpointError, load_checkpoint
from diffusion_np.metrics.digits import score_digits
from diffusion_np.metrics.distances import mmd_rbf, toy2d_verdict
from diffusion_np.metrics.shapes import score_shapes
from diffusion_np.optim import EMA
from diffusion_np.pretrained import resolve_checkpoint
from diffusion_np.samplers import SAMPLERS
from diffusion_np.training.controlnet import evaluate_controlnet
from diffusion_np.training.toy2d import ToyRun, evaluate_toy2d
from diffusion_np.training.trainer import task_from_checkpoint

__all__ = [
    "DEFAULT_HELDOUT_SAMPLES",
    "DEFAULT_NUM_SAMPLES",
    "EVALUATED_TASKS",
    "digits_prompts",
    "evaluate_checkpoint",
    "format_report",
    "format_sweep",
    "generate_images",
    "heldout_shapes_prompts",
    "seen_shapes_prompts",
]

#: the tasks :func:`evaluate_checkpoint` scores
EVALUATED_TASKS = ("digits", "shapes", "toy2d", "shapes-controlnet", "lcm", "progressive")
#: distilled students: scored as their teacher's task (``task_config["teacher_task"]``)
DISTILLED_TASKS = ("lcm", "progressive")
#: samples per task when ``num_samples`` is None (for shapes: images of seen prompts)
DEFAULT_NUM_SAMPLES = {"digits": 500, "shapes": 320, "toy2d": 10_000, "shapes-controlnet": 128}
#: images of the 18 held-out shapes prompts when ``heldout_samples`` is None: 8 per prompt
DEFAULT_HELDOUT_SAMPLES = 144
#: points of each set the MMD uses: its kernel matrix is (2m, 2m) float64, 128 MiB at m = 2000
MMD_POINTS = 2000
#: chance level of each shapes attribute, and of all four at once
_SHAPES_CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "size": 1 / len(SIZES),
                  "position": 1 / len(POSITIONS)}
_SHAPES_CHANCE_ALL = float(np.prod(list(_SHAPES_CHANCE.values())))


# ----------------------------------------------------------------------------- generation
def generate_images(model, prompts: list[str], sampler: str = "ddim", steps: int = 50,
                    guidance_scale: float = 3.0, seed: int = 0, stream: int = 0, batch_size: int = 64,
                    progress: bool = False, desc: str = "generating") -> np.ndarray:
    """One image per prompt from a :class:`~diffusion_np.training.model.TextToImageModel`,
    in batches of ``batch_size`` (each doubled by classifier-free guidance).

    Batch ``b`` is seeded with ``SeedSequence([seed, stream, b])``: reproducible, and
    independent between batches and between streams (seen vs held-out prompts).
    With ``progress`` a tqdm bar counts the batches.

    Returns
    -------
    images : float32 (len(prompts), H, W, C) in [-1, 1], on the host.
    """
    starts = range(0, len(prompts), batch_size)
    batch_seeds = np.random.SeedSequence([seed, stream]).spawn(len(starts))
    images = []
    for start, seq in zip(tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False), batch_seeds):
        batch_seed = int(seq.generate_state(1)[0])  # a 32-bit seed for the sampler's default_rng
        images.append(model.generate(prompts[start:start + batch_size], sampler, steps, guidance_scale,
                                     batch_seed))
    return np.concatenate(images)


def _cycle(prompts: list[str], n: int) -> list[str]:
    return [prompts[i % len(prompts)] for i in range(n)]


def digits_prompts(n: int) -> tuple[list[str], np.ndarray]:
    """(captions, labels) of ``n`` digits 0, 1, ..., 9, 0, 1, ...: every digit equally often."""
    labels = np.arange(n) % 10
    return digit_captions(labels), labels


def seen_shapes_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts of the training split: all 162 in a shuffled order (seeded), then again."""
    prompts = all_prompts("train")
    order = np.random.default_rng(seed).permutation(len(prompts))
    return _cycle([prompts[i] for i in order], n)


def heldout_shapes_prompts(n: int) -> list[str]:
    """``n`` prompts cycling over the 18 held-out combinations (each equally often when 18 divides n)."""
    return _cycle(all_prompts("heldout"), n)


# ----------------------------------------------------------------------------- scoring
def _score_toy2d_mmd(samples, reference, fresh) -> dict:
    """Squared MMD of samples and of fresh data to the reference, on their first MMD_POINTS points.

    One bandwidth for both, the median heuristic on the reference (as ``mmd_rbf`` picks
    by default on the pair): with a bandwidth per pair the two numbers would not compare.
    """
    m = min(MMD_POINTS, len(samples), len(reference), len(fresh))
    ref = np.asarray(reference[:m], dtype=np.float64)
    sq = np.sum(ref**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * ref @ ref.T, 0.0)  # (m, m) squared distances
    bandwidth = float(np.sqrt(np.median(d2[np.triu_indices_from(d2, k=1)]) / 2.0))
    return {
        "mmd_rbf": mmd_rbf(samples[:m], ref, bandwidth),
        "mmd_rbf_data_vs_data": mmd_rbf(fresh[:m], ref, bandwidth),
        "mmd_points": int(m),
        "mmd_bandwidth": bandwidth,
    }


# ----------------------------------------------------------------------------- one call
def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def evaluate_checkpoint(
    checkpoint,
    sampler: str = "ddim",
    steps: int = 50,
    guidance_scale: float | None = None,
    num_samples: int | None = None,
    heldout_samples: int | None = None,
    seed: int = 0,
    use_ema: bool = True,
    batch_size: int = 64,
    progress: bool = False,
    device: str = "numpy",
) -> dict:
    """Generate samples from ``checkpoint`` and score them (see the module docstring).

    Parameters
    ----------
    checkpoint : str or Path
        A run directory of ``diffusion-np train``, its ``checkpoint/``, an export, or
        ``"pretrained:digits"`` / ``"pretrained:shapes"``.
    sampler : a key of :data:`~diffusion_np.samplers.SAMPLERS`
    steps : number of sampling steps
    guidance_scale : classifier-free guidance weight (>= 1); default the checkpoint's
        ``guidance_scale``; ignored for toy2d
    num_samples : default :data:`DEFAULT_NUM_SAMPLES` of the task (shapes: seen prompts)
    heldout_samples : shapes only, images of the 18 held-out prompts (default 144; 0: none)
    seed : seeds the noise, the prompt order and the real-data draws
    use_ema : the EMA weights of a training checkpoint (an export holds what it holds)
    batch_size : images per generation batch (text-to-image tasks)
    progress : a tqdm bar over the batches (over the sampling steps for toy2d)
    device : where the networks sample: "numpy", "cupy" (a GPU), or "strict" (the test device);
        scoring runs on the host either way

    Returns
    -------
    dict, JSON-ready: ``task``, ``checkpoint`` (as given), ``checkpoint_dir``, ``step``
    (None if unknown), ``weights`` ("ema" or "raw"), ``sampler``, ``steps``,
    ``guidance_scale`` (None for toy2d), ``num_samples``, ``heldout_samples`` (shapes),
    ``seed``, ``metrics`` (the task's, see :func:`~diffusion_np.metrics.digits.score_digits`,
    :func:`~diffusion_np.metrics.shapes.score_shapes`;
    for toy2d ``sliced_wasserstein``, ``sliced_wasserstein_data_vs_data``, ``mmd_rbf``,
    ``mmd_rbf_data_vs_data``), ``wall_time_s`` and ``diffusion_np_version``.

    Raises
    ------
    CheckpointError (a ValueError) for a missing checkpoint or one of another task;
    ValueError for a bad argument, checked before any sample is drawn.
    """
    start = time.perf_counter()
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = _check_int("steps", steps, 1)
    seed = _check_int("seed", seed, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    if guidance_scale is not None and not float(guidance_scale) >= 1.0:
        raise ValueError(f"guidance_scale must be >= 1 (1: no guidance), got {guidance_scale}")

    directory = resolve_checkpoint(checkpoint)
    loaded = load_checkpoint(directory)
    name = loaded.config.get("task")
    if name not in EVALUATED_TASKS:
        what = f"a {name} run" if name else "not a training checkpoint (no task in its config)"
        hint = " (score a VAE with vae_reconstruction_mse)" if name == "shapes-vae" else ""
        raise CheckpointError(f"evaluate scores {', '.join(EVALUATED_TASKS)} checkpoints; {directory} is {what}{hint}")
    scored = loaded.config["task_config"].get("teacher_task") if name in DISTILLED_TASKS else name
    if scored not in DEFAULT_NUM_SAMPLES:
        raise CheckpointError(f"{directory}: a {name} student of an unknown teacher task {scored!r}")
    n = DEFAULT_NUM_SAMPLES[scored] if num_samples is None else _check_int("num_samples", num_samples, 2)
    if scored == "shapes":
        n_held = DEFAULT_HELDOUT_SAMPLES if heldout_samples is None else _check_int("heldout_samples",
                                                                                    heldout_samples, 0)
    task = task_from_checkpoint(loaded, use_ema=use_ema)
    for module in task.modules().values():
        module.to(device)
    make_sampler = task.make_sampler if name in ("toy2d", "shapes-controlnet") else task.model.make_sampler
    make_sampler(sampler).set_timesteps(steps)  # more steps than training timesteps: fail now, not later

    state, exported = loaded.training_state, loaded.config.get("exported_from") or {}
    result = {
        "task": name,
        "scored_as": scored,
        "checkpoint": str(checkpoint),
        "checkpoint_dir": str(directory),
        "step": state.get("step") if state is not None else exported.get("step"),
        "weights": ("ema" if use_ema and "ema" in state else "raw") if state is not None
        else exported.get("weights", "raw"),
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": None,
        "num_samples": n,
        "seed": seed,
    }
    sampling_start = time.perf_counter()
    if name == "toy2d":
        result["metrics"] = _evaluate_toy2d(task, sampler, steps, n, seed, progress)
    elif name == "shapes-controlnet":
        result["guidance_scale"] = float(guidance_scale or task.config.guidance_scale)
        result["conditioning_scale"] = task.config.conditioning_scale
        result["metrics"] = evaluate_controlnet(task, n, sampler, steps, result["guidance_scale"], seed=seed,
                                                batch_size=batch_size, progress=progress, device=device)
    else:
        w = float(guidance_scale) if guidance_scale is not None else float(task.config.guidance_scale)
        result["guidance_scale"] = w
        gen = dict(sampler=sampler, steps=steps, guidance_scale=w, seed=seed, batch_size=batch_size,
                   progress=progress)
        if scored == "digits":
            prompts, labels = digits_prompts(n)
            images = generate_images(task.model, prompts, stream=0, desc="digits", **gen)
            data_config = getattr(task, "data_task", task).config  # a distilled student: its teacher's data
            result["metrics"] = score_digits(images, labels, data_seed=data_config.data_seed, seed=seed)
        else:
            result["heldout_samples"] = n_held
            prompts, held = seen_shapes_prompts(n, seed), heldout_shapes_prompts(n_held)
            images = generate_images(task.model, prompts, stream=0, desc="seen prompts", **gen)
            held_images = generate_images(task.model, held, stream=1, desc="held-out prompts", **gen) if held else None
            result["metrics"] = score_shapes(images, prompts, held_images, held)
    result["wall_time_s"] = round(time.perf_counter() - start, 2)
    if name != "toy2d":  # generation and scoring together, per image: what a steps sweep compares
        images_made = n + (n_held if scored == "shapes" else 0)
        result["seconds_per_image"] = round((time.perf_counter() - sampling_start) / images_made, 4)
    result["diffusion_np_version"] = __version__
    return result


def _evaluate_toy2d(task, sampler: str, steps: int, n: int, seed: int, progress: bool) -> dict:
    """evaluate_toy2d on the checkpoint's weights, plus the MMD of the same samples."""
    # evaluate_toy2d samples with run.ema's weights: an EMA that starts at the loaded weights is those weights
    run = ToyRun(task.model, EMA(task.model), task.schedule, task.config.prediction_type)
    dataset = task.config.dataset
    distances, samples = evaluate_toy2d(run, dataset, {sampler: (task.make_sampler(sampler), steps)}, n=n,
                                        seed=seed, progress=progress, return_samples=True)
    fresh = sample_toy2d(dataset, min(n, MMD_POINTS), seed=seed + 3000)  # a third independent draw of the data
    return {
        "dataset": dataset,
        "sliced_wasserstein": distances[sampler],
        "sliced_wasserstein_data_vs_data": distances["data_vs_data"],
        **_score_toy2d_mmd(samples[sampler], samples["data"], fresh),
        "verdict": toy2d_verdict(samples[sampler], dataset, seed=seed),
    }


# ----------------------------------------------------------------------------- the table
def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(result: dict) -> str:
    """The table ``diffusion-np evaluate`` prints for a result of :func:`evaluate_checkpoint`."""
    r, m = result, result["metrics"]
    step = "step ?" if r.get("step") is None else f"step {r['step']}"
    weights = "EMA weights" if r.get("weights") == "ema" else "weights"
    guidance = "" if r.get("guidance_scale") is None else f", guidance {r['guidance_scale']:g}"
    counts = f"{r['num_samples']} samples"
    if r.get("scored_as", r["task"]) == "shapes":
        counts = f"{r['num_samples']} + {r.get('heldout_samples', 0)} held-out samples"
    lines = [
        f"{r['task']}: {r['checkpoint']} ({step}, {weights})",
        f"{r['sampler']}, {r['steps']} steps{guidance}, seed {r['seed']}, {counts}, {r['wall_time_s']:.1f} s",
        "",
    ]
    kind = r.get("scored_as", r["task"])
    if kind == "digits":
        lines += [
            f"{'metric':40s} {'model':>8s}  reference",
            f"{'conditional accuracy':40s} {m['conditional_accuracy']:8.3f}  chance 0.100",
            f"{'Frechet distance to test digits':40s} {m['frechet_distance']:8.2f}  "
            f"real digits {m['frechet_distance_real_baseline']:.2f} (n={m['baseline_images']}, "
            f"test n={m['reference_images']})",
            "",
            "accuracy per digit: " + "  ".join(f"{d}:{_num(a, 2)}" for d, a in enumerate(m["per_digit_accuracy"])),
        ]
    elif kind == "shapes-controlnet":
        lines += [
            f"{'metric':44s} {'model':>8s}  reference",
            f"{'control IoU (generated mask vs control mask)':44s} {m['control_iou']:8.3f}  "
            f"the caption's named geometry {m['caption_geometry_iou']:.3f}",
            f"{'  median, share >= 0.5':44s} {m['control_iou_median']:8.3f}  {m['control_iou_at_least_0.5']:.3f}",
            f"{'prompt accuracy (colour and shape)':44s} {m['prompt_accuracy']:8.3f}  chance {1 / 18:.3f}",
            f"{'  colour, shape':44s} {m['per_attribute']['colour']:8.3f}  {m['per_attribute']['shape']:.3f}",
            "",
            f"unreadable images (no object found): {m['unreadable']:.3f}",
        ]
    elif kind == "shapes":
        head = f"{'prompts':24s} {'all':>6s}" + "".join(f" {c:>8s}" for c in LABEL_COLUMNS)

        def row(label, everything, per):
            per = per or {}
            return f"{label:24s} {_num(everything):>6s}" + "".join(f" {_num(per.get(c)):>8s}" for c in LABEL_COLUMNS)

        lines += [
            head,
            row(f"seen ({m['distinct_prompts']} prompts)", m["prompt_accuracy_all"], m["per_attribute"]),
            row(f"held-out ({m['heldout_distinct_prompts']} prompts)", m["heldout_prompt_accuracy_all"],
                m["heldout_per_attribute"]),
            row("chance", _SHAPES_CHANCE_ALL, _SHAPES_CHANCE),
            "",
            f"unreadable images (no object found): {m['unreadable']:.3f}",
        ]
    else:
        lines += [
            f"{m['dataset']}: distances to fresh data",
            f"{'metric':34s} {'model':>10s} {'data vs data':>13s}",
            f"{'sliced Wasserstein-2':34s} {m['sliced_wasserstein']:10.4f} "
            f"{m['sliced_wasserstein_data_vs_data']:13.4f}",
            f"{'MMD^2, RBF (' + str(m['mmd_points']) + ' points)':34s} {m['mmd_rbf']:10.5f} "
            f"{m['mmd_rbf_data_vs_data']:13.5f}",
        ]
        v = m.get("verdict")
        if v is not None:
            lines += [
                f"{'MMD^2, kernel width ' + str(v['bandwidth']):34s} {v['distance']:10.5f} "
                f"{v['floor']:13.5f} +- {v['floor_std']:.5f}",
                "verdict: " + ("within the floor band (indistinguishable from the data at this size)"
                               if v["within_floor"] else f"above the floor band (up to {v['floor_high']:.5f})"),
            ]
    return "\n".join(lines)


def format_sweep(results: list[dict]) -> str:
    """One line per evaluation of a sweep (several step counts, baselines beside them): the headline metric of
    each, for shapes seen and held-out "all" prompt accuracy, for digits the conditional accuracy and the
    Frechet distance, and the wall time per image, all measured in the same run."""
    lines = [f"{'checkpoint':28s} {'sampler':8s} {'steps':>5s} {'w':>4s} {'metric':>8s} {'held-out':>8s} "
             f"{'FD':>7s} {'s/image':>8s}"]
    for r in results:
        m, kind = r["metrics"], r.get("scored_as", r["task"])
        if kind == "shapes":
            main, held, fd = m["prompt_accuracy_all"], m.get("heldout_prompt_accuracy_all"), None
        elif kind == "digits":
            main, held, fd = m["conditional_accuracy"], None, m["frechet_distance"]
        else:
            main, held, fd = None, None, None
        w = "-" if r.get("guidance_scale") is None else f"{r['guidance_scale']:g}"
        per_image = r.get("seconds_per_image")
        lines.append(f"{str(r['checkpoint'])[-28:]:28s} {r['sampler']:8s} {r['steps']:5d} {w:>4s} {_num(main):>8s} "
                     f"{_num(held):>8s} {_num(fd, 2):>7s} {_num(per_image, 4):>8s}")
    return "\n".join(lines)


def write_json(result: dict, path) -> Path:
    """Write ``result`` as indented JSON to ``path``; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
