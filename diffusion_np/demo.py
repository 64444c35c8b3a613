"""``make demo`` / ``diffusion-np demo``: the whole story on built-in data, in about a minute.

1. Every layer's hand-written backward against finite differences (float64).
2. Text-to-image with the shipped weights (:mod:`diffusion_np.pretrained`): prompts
   for the latent shapes model (four of them combinations it never saw in training)
   and the ten digits, DDIM with classifier-free guidance; each image is read back by
   the project's metrics (the shapes analyser, the digit classifier) and the count of
   images that match their prompt is printed. Then ``pretrained:shapes-controlnet`` draws four
   shapes where four control masks say (``<out>/controlnet.png``, with each shape's IoU).
   Then image repair (``<out>/repair.png``): four blurred test digits, their Wiener
   deconvolution and their diffusion posterior sampling restoration with ``pretrained:digits``
   as the prior, each with its PSNR and the digit the classifier reads.
   And ``pretrained:shapes-lcm`` draws eight prompts in 4 steps beside the teacher's 50 guided DDIM steps,
   with both times (``<out>/few_step.png``).
3. A diffusion model trained on the 2-D swiss roll (DDPM Algorithm 1, Adam, EMA),
   sampled with DDPM (1000 steps), DDIM (50) and DPM-Solver++ (20), and judged by
   :func:`~diffusion_np.metrics.distances.toy2d_verdict`: a squared MMD with a kernel
   narrower than the spiral's arm spacing, beside the band that fresh draws of the
   data span (the floor band); a sampler is "within the floor" or "above" it. The
   sliced Wasserstein distance is printed beside it, but not judged by: projections
   smear the arms together, and a visibly off spiral scored 0.75x one floor draw.

Writes ``<out>/demo.png`` (the prompts and their images), ``<out>/controlnet.png``, ``<out>/repair.png``,
``<out>/few_step.png``, ``<out>/toy2d_samplers.png`` (data and the three samplers side by side) and
``<out>/toy2d_loss.png``, and prints where they are. ``make demo-train`` retrains the shipped models from
scratch (an hour or more on 2 cores).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from diffusion_np.data.digits import digit_captions, load_digits
from diffusion_np.data.shapes import parse_caption
from diffusion_np.gradcheck import gradcheck_report
from diffusion_np.io.checkpoint import load_checkpoint
from diffusion_np.metrics.control import mask_iou, score_control, shape_mask
from diffusion_np.metrics.digits import classifier_logits
from diffusion_np.metrics.distances import toy2d_verdict
from diffusion_np.metrics.shapes import analyse_shapes
from diffusion_np.restoration import baseline, dps_restore, make_degradation, training_power
from diffusion_np.samplers import DDIMSampler, DDPMSampler, DPMSolverMultistepSampler
from diffusion_np.training.controlnet import heldout_controls
from diffusion_np.training.model import TextToImageModel
from diffusion_np.training.plots import draw_image_grid, save_loss_plot
from diffusion_np.training.toy2d import evaluate_toy2d, train_toy2d
from diffusion_np.training.trainer import task_from_checkpoint

CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")

#: the demo's shapes prompts: every colour, shape, size and position at least once ...
SHAPES_PROMPTS = [
    "a large red circle in the center", "a small green square in the top left",
    "a large blue triangle in the bottom right", "a small yellow circle in the top right",
    "a large magenta square in the bottom left", "a small cyan triangle in the center",
    "a large green circle in the top left", "a small blue square in the bottom right",
    "a large yellow triangle in the top left", "a small magenta circle in the center",
    "a large cyan square in the bottom right", "a small red triangle in the top right",
]
#: ... and four combinations the training split never shows (compositional generalisation)
HELDOUT_PROMPTS = [
    "a large green triangle in the center", "a small blue circle in the center",
    "a large magenta square in the center", "a small cyan square in the top right",
]


def run_demo(out_dir="demo", steps: int = 6000, n: int = 10_000, progress: bool = True, out=None) -> dict:
    """Run the demo; returns ``{"worst_gradcheck_error", "sliced_wasserstein": {...}, "toy2d_verdict": {...},
    "files": [...], "text_to_image": {...}}``."""
    out = out if out is not None else sys.stdout
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. gradients
    worst = gradcheck_report(out=out)

    # 2. text-to-image with the shipped weights
    result = text_to_image_demo(out_dir / "demo.png", progress=progress, out=out)
    control = controlnet_panel(out_dir / "controlnet.png", progress=progress, out=out)  # a mask -> its image
    repair = repair_panel(out_dir / "repair.png", progress=progress, out=out)  # blurred digits -> Wiener, DPS
    few = few_step_panel(out_dir / "few_step.png", progress=progress, out=out)  # 4 LCM steps vs 50 guided DDIM

    # 3. a 2-D diffusion model, trained and sampled three ways
    print(f"\nTraining a diffusion model on the 2-D swiss roll ({steps} steps)...", file=out)
    start = time.perf_counter()
    run = train_toy2d("swiss_roll", steps=steps, progress=progress)
    trained = time.perf_counter() - start
    samplers = {
        "DDPM, 1000 steps": (DDPMSampler(clip_sample=False, **CONFIG), 1000),
        "DDIM, 50 steps": (DDIMSampler(clip_sample=False, **CONFIG), 50),
        "DPM-Solver++, 20 steps": (DPMSolverMultistepSampler(**CONFIG), 20),
    }
    distances, samples = evaluate_toy2d(run, "swiss_roll", samplers, n=n, return_samples=True)
    verdicts = {label: toy2d_verdict(samples[label], "swiss_roll") for label in samplers}
    first = next(iter(verdicts.values()))
    print(f"trained in {trained:.0f} s; squared MMD to fresh data ({first['points']} points, kernel width "
          f"{first['bandwidth']}; the spiral's arms are 1.26 apart), sliced Wasserstein ({n} points) beside it:",
          file=out)
    print(f"  {'data vs data (floor band)':28s} {first['floor']:.5f} +- {first['floor_std']:.5f}, "
          f"up to {first['floor_high']:.5f}   SW {distances['data_vs_data']:.4f}", file=out)
    for label, v in verdicts.items():
        ratio = v["distance"] / v["floor"]
        verdict = "within the floor band" if v["within_floor"] else f"ABOVE the floor band ({ratio:.1f}x the floor)"
        print(f"  {label:28s} {v['distance']:.5f}  {verdict:40s} SW {distances[label]:.4f}", file=out)

    files = [result["file"], control["file"], repair["file"], few["file"],
             _save_panels(samples, verdicts, out_dir / "toy2d_samplers.png"),
             save_loss_plot(run.losses, out_dir / "toy2d_loss.png")]
    print("\nwrote " + ", ".join(str(f) for f in files), file=out)
    return {"worst_gradcheck_error": worst, "sliced_wasserstein": distances, "toy2d_verdict": verdicts, "files": files,
            "text_to_image": {k: v for k, v in result.items() if k != "file"},
            "controlnet": {k: v for k, v in control.items() if k != "file"},
            "repair": {k: v for k, v in repair.items() if k != "file"},
            "few_step": {k: v for k, v in few.items() if k != "file"}}


def text_to_image_demo(path, steps: int = 25, guidance_scale: float = 4.0, seed: int = 0,
                       progress: bool = True, out=None) -> dict:
    """Sample the shipped shapes and digits models, score the images, write one PNG with the prompts.

    Returns ``{"shapes_correct", "shapes_total", "heldout_correct", "heldout_total",
    "digits_correct", "digits_total", "seconds", "file"}``: an image is "correct" when the
    shapes analyser reads every attribute of its prompt, or when the digit classifier
    reads the digit it was asked for.
    """
    # matplotlib on first use: importing the demo (as the CLI does) should not load it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = out if out is not None else sys.stdout
    print(f"\nText-to-image with the shipped weights (DDIM {steps} steps, guidance {guidance_scale})...", file=out)
    start = time.perf_counter()
    prompts = SHAPES_PROMPTS + HELDOUT_PROMPTS
    shapes = TextToImageModel.load("pretrained:shapes").generate(prompts, "ddim", steps, guidance_scale, seed=seed,
                                                                  progress=progress)
    digit_labels = np.arange(20) % 10
    digits = TextToImageModel.load("pretrained:digits").generate(digit_captions(digit_labels), "ddim", steps,
                                                                  guidance_scale, seed=seed, progress=progress)
    seconds = time.perf_counter() - start

    shapes_ok = (analyse_shapes(shapes) == parse_caption(prompts)).all(axis=1)  # (16,) every attribute right
    digits_ok = classifier_logits(digits).argmax(axis=1) == digit_labels  # (20,)
    seen = len(SHAPES_PROMPTS)
    result = {"shapes_correct": int(shapes_ok[:seen].sum()), "shapes_total": seen,
              "heldout_correct": int(shapes_ok[seen:].sum()), "heldout_total": len(HELDOUT_PROMPTS),
              "digits_correct": int(digits_ok.sum()), "digits_total": len(digits_ok), "seconds": seconds}
    print(f"sampled {len(prompts) + len(digits)} images in {seconds:.0f} s; read back by the project's metrics:\n"
          f"  shapes, every attribute as prompted: {result['shapes_correct']}/{seen} seen combinations, "
          f"{result['heldout_correct']}/{len(HELDOUT_PROMPTS)} held-out ones\n"
          f"  digits, the digit asked for:         {result['digits_correct']}/{len(digits_ok)}", file=out)

    fig = Figure(figsize=(13, 8.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.45, 1])
    marks = ["" if ok else " (x)" for ok in shapes_ok]
    titles = [p.removeprefix("a ") + m for p, m in zip(prompts[:seen], marks)]
    titles += ["held out: " + p.removeprefix("a ") + m for p, m in zip(prompts[seen:], marks[seen:])]
    draw_image_grid(top, shapes, titles, ncols=8)
    top.suptitle("pretrained:shapes (latent diffusion, 32x32); the last four are combinations never trained on; "
                 "(x): the analyser disagrees with the prompt", fontsize=9)
    draw_image_grid(bottom, digits, [p.removeprefix("the digit ") for p in digit_captions(digit_labels)], ncols=10)
    bottom.suptitle("pretrained:digits (pixel space, 8x8)", fontsize=9)
    fig.savefig(path, format="png")
    return {**result, "file": Path(path)}


def controlnet_panel(path, steps: int = 25, seed: int = 0, progress: bool = True, out=None) -> dict:
    """``make demo``'s ControlNet panel: four held-out control masks and what ``pretrained:shapes-controlnet``
    draws from them (DDIM, the checkpoint's guidance), each titled with its IoU; writes a PNG to ``path``.

    Returns ``{"control_iou", "caption_geometry_iou", "prompt_accuracy", "file"}`` (means over the four).
    """
    # matplotlib on first use, as in text_to_image_demo
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = out if out is not None else sys.stdout
    task = task_from_checkpoint(load_checkpoint("pretrained:shapes-controlnet"))
    prompts, controls, masks, labels = heldout_controls(4, seed=seed)
    images = task.generate(prompts, controls, "ddim", steps, seed=seed, progress=progress)
    scores = score_control(images, masks, labels)
    iou = mask_iou(shape_mask(images), masks)
    print(f"\nControlNet (pretrained:shapes-controlnet, DDIM {steps} steps): 4 control masks at places and sizes "
          f"no caption names;\n  IoU of each shape with its mask {', '.join(f'{v:.2f}' for v in iou)} (mean "
          f"{scores['control_iou']:.2f}; the caption's words alone would give {scores['caption_geometry_iou']:.2f}), "
          f"colour and shape as prompted: {round(4 * scores['prompt_accuracy'])}/4", file=out)
    fig = Figure(figsize=(6.5, 3.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1)
    draw_image_grid(top, controls * 2.0 - 1.0, ["control mask"] * 4, ncols=4)
    draw_image_grid(bottom, images, [f"{p.removeprefix('a ')} (IoU {v:.2f})" for p, v in zip(prompts, iou)], ncols=4)
    fig.suptitle("pretrained:shapes-controlnet: the mask says where and how large, the prompt what", fontsize=9)
    fig.savefig(path, format="png")
    return {**{k: scores[k] for k in ("control_iou", "caption_geometry_iou", "prompt_accuracy")}, "file": Path(path)}


def repair_panel(path, steps: int = 100, zeta: float = 0.5, seed: int = 0, progress: bool = True, out=None) -> dict:
    """``make demo``'s repair panel: four test digits blurred (Gaussian, sigma 1 px, noise 0.05), their Wiener
    deconvolution and their DPS restoration (``pretrained:digits``, unconditional, DDIM ``steps``), each titled
    with its PSNR and the digit the classifier reads; writes a PNG to ``path``.

    Returns ``{"psnr": {"blurred", "wiener", "dps"}, "correct": {...}, "seconds", "file"}`` (means and counts
    over the four digits).
    """
    # matplotlib on first use, as in text_to_image_demo
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = out if out is not None else sys.stdout
    images, _, labels = load_digits("test")
    keep = [3, 14, 15, 92]  # four different digits of the test split
    clean, labels = images[keep], labels[keep]
    op = make_degradation("deblur", 8, 1)
    y = op.degrade(clean, rng=seed)
    start = time.perf_counter()
    wiener = baseline(op, y, training_power("digits", 8))
    dps = dps_restore(TextToImageModel.load("pretrained:digits"), op, y, steps=steps, zeta=zeta, seed=seed,
                      progress=progress).images
    seconds = time.perf_counter() - start
    rows = {"blurred": np.clip(y, -1.0, 1.0), "wiener": wiener, "dps": dps}
    psnr = {k: 10.0 * np.log10(4.0 / np.mean((v - clean) ** 2, axis=(1, 2, 3))) for k, v in rows.items()}
    read = {k: classifier_logits(v).argmax(axis=1) for k, v in rows.items()}
    print(f"\nImage repair (4 test digits, Gaussian blur sigma 1 px + noise 0.05; DPS with pretrained:digits, "
          f"DDIM {steps} steps, {seconds:.0f} s):", file=out)
    for k in rows:
        print(f"  {k:8s} PSNR {psnr[k].mean():5.1f} dB, digits read right {int((read[k] == labels).sum())}/4",
              file=out)
    fig = Figure(figsize=(6.0, 6.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subfigures(4, 1)
    draw_image_grid(panels[0], clean, [f"clean {d}" for d in labels], ncols=4)
    names = {"blurred": "blurred", "wiener": "Wiener", "dps": "DPS"}
    for panel, (k, v) in zip(panels[1:], rows.items()):
        draw_image_grid(panel, v, [f"{names[k]} {p:.1f} dB, reads {d}" for p, d in zip(psnr[k], read[k])], ncols=4)
    fig.suptitle("repair: a blurred digit, its Wiener deconvolution and its DPS restoration", fontsize=9)
    fig.savefig(path, format="png")
    return {"psnr": {k: float(v.mean()) for k, v in psnr.items()},
            "correct": {k: int((v == labels).sum()) for k, v in read.items()}, "seconds": seconds,
            "file": Path(path)}


def few_step_panel(path, steps: int = 4, teacher_steps: int = 50, guidance_scale: float = 4.0, seed: int = 0,
                   progress: bool = True, out=None) -> dict:
    """``make demo``'s few-step panel: eight shapes prompts (two held out) from the teacher, ``pretrained:shapes``
    with ``teacher_steps`` guided DDIM steps, and from its consistency-distilled student ``pretrained:shapes-lcm``
    with ``steps`` LCM steps (no guidance), same seed, each timed; writes a PNG to ``path``.

    Returns ``{"teacher_seconds", "student_seconds", "speedup", "teacher_correct", "student_correct", "total",
    "file"}`` (seconds for the eight images; "correct": every attribute read as prompted).
    """
    # matplotlib on first use, as in text_to_image_demo
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = out if out is not None else sys.stdout
    prompts = SHAPES_PROMPTS[:6] + HELDOUT_PROMPTS[:2]
    teacher, student = TextToImageModel.load("pretrained:shapes"), TextToImageModel.load("pretrained:shapes-lcm")
    start = time.perf_counter()
    slow = teacher.generate(prompts, "ddim", teacher_steps, guidance_scale, seed=seed, progress=progress)
    teacher_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fast = student.generate(prompts, "lcm", steps, 1.0, seed=seed, progress=progress)
    student_seconds = time.perf_counter() - start
    truth = parse_caption(prompts)
    ok_slow, ok_fast = ((analyse_shapes(x) == truth).all(axis=1) for x in (slow, fast))
    result = {"teacher_seconds": teacher_seconds, "student_seconds": student_seconds,
              "speedup": teacher_seconds / student_seconds, "teacher_correct": int(ok_slow.sum()),
              "student_correct": int(ok_fast.sum()), "total": len(prompts)}
    print(f"\nFew-step generation: pretrained:shapes-lcm, {steps} LCM steps without guidance, "
          f"{student_seconds:.2f} s for {len(prompts)} images; its teacher pretrained:shapes, {teacher_steps} DDIM "
          f"steps with guidance {guidance_scale:g}, {teacher_seconds:.2f} s ({result['speedup']:.0f}x slower);\n"
          f"  every attribute as prompted: student {result['student_correct']}/{len(prompts)}, teacher "
          f"{result['teacher_correct']}/{len(prompts)}", file=out)
    fig = Figure(figsize=(9, 3.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1)
    titles = [p.removeprefix("a ") for p in prompts]
    draw_image_grid(top, slow, [t + ("" if ok else " (x)") for t, ok in zip(titles, ok_slow)], ncols=8)
    top.suptitle(f"teacher pretrained:shapes: DDIM {teacher_steps} steps, guidance {guidance_scale:g} "
                 f"({2 * teacher_steps} U-Net evaluations), {teacher_seconds:.2f} s", fontsize=9)
    draw_image_grid(bottom, fast, [t + ("" if ok else " (x)") for t, ok in zip(titles, ok_fast)], ncols=8)
    bottom.suptitle(f"student pretrained:shapes-lcm: LCM {steps} steps, no guidance ({steps} evaluations), "
                    f"{student_seconds:.2f} s", fontsize=9)
    fig.savefig(path, format="png")
    return {**result, "file": Path(path)}


def _save_panels(samples: dict, verdicts: dict, path: Path) -> Path:
    """One scatter panel per entry of ``samples`` (the data first), titled with its verdict."""
    # matplotlib on first use, as in text_to_image_demo
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(samples), 3.6), dpi=100, layout="constrained")  # room for 2-line titles
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(samples))
    for ax, (label, x) in zip(axes, samples.items()):
        ax.scatter(x[:, 0], x[:, 1], s=0.5, c="0.3" if label == "data" else "C0")
        if label == "data":
            title = "data"
        else:
            v = verdicts[label]
            where = "within" if v["within_floor"] else "above"
            title = f"{label}\nMMD {v['distance'] / v['floor']:.1f}x floor: {where}"
        ax.set_title(title, fontsize=9)
        ax.set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), xticks=[], yticks=[], aspect="equal")
    fig.savefig(path, format="png")
    return Path(path)
