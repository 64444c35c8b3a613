"""The ``diffusion-np`` command (also ``python -m diffusion_np``).

    diffusion-np demo        gradient checks, then a 2-D model trained and sampled (what `make demo` runs)
    diffusion-np gradcheck   the same report, with options
    diffusion-np train TASK  train a model (toy2d, digits, shapes-vae, shapes) with
                             checkpoints, --resume, Ctrl-C saving and preview PNGs
    diffusion-np distill M   distil a trained model to a few steps (lcm: latent consistency distillation),
                             with the same checkpoints and --resume as train
    diffusion-np sample      draw samples from a checkpoint with any sampler, write a PNG
    diffusion-np finetune M  teach a shapes model a new concept from 8 images: lora, textual-inversion
                             or dreambooth (checkpoints, --resume and Ctrl-C as for train)
    diffusion-np export      a training checkpoint's EMA weights, float16, without optimizer state
    diffusion-np evaluate    sample-quality metrics of a checkpoint (digit accuracy and Frechet distance,
                             shapes prompt accuracy, 2-D distances), as a table and JSON
    diffusion-np restore     repair a blurred, low-resolution, noisy or holed image by diffusion
                             posterior sampling (and the classical baseline beside it)

A checkpoint argument is a run directory, its ``checkpoint/``, or ``pretrained:digits`` /
``pretrained:shapes`` / ``pretrained:shapes-lcm``: the weights shipped with the package
(:mod:`diffusion_np.pretrained`).

Bad arguments print one line and exit with status 2; ``--help`` on every command.
A task's own ``train`` options come from its class (``add_arguments``), the shared
ones from :class:`~diffusion_np.training.trainer.TrainConfig`; registering a task in
:data:`~diffusion_np.training.trainer.TASKS` is all the CLI needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from diffusion_np.demo import run_demo
from diffusion_np.gradcheck import gradcheck_report
from diffusion_np.io.checkpoint import CheckpointError, load_checkpoint, writable_path
from diffusion_np.io.diffusers import add_sample_arguments, sample_from_model
from diffusion_np.io.lora import load_lora_weights, parse_lora_spec
from diffusion_np.malloc import tune_malloc
from diffusion_np.metrics.evaluate import evaluate_checkpoint, format_report, format_sweep, write_json
from diffusion_np.pipelines.image_io import load_control_image, load_image, load_mask, save_image
from diffusion_np.pretrained import PREFIX, PRETRAINED, resolve_checkpoint
from diffusion_np.restoration import TASKS as RESTORE_TASKS
from diffusion_np.restoration import Inpaint, baseline, dps_restore, make_degradation, training_power
from diffusion_np.samplers import SAMPLERS
from diffusion_np.training.model import TextToImageModel
from diffusion_np.training.personalise import (
    FINETUNE_PREFIX,
    METHODS,
    apply_personalisation,
    evaluate_personalised_checkpoint,
    format_personalised_report,
    is_finetune_checkpoint,
)
from diffusion_np.training.plots import save_image_grid
from diffusion_np.training.trainer import (
    DISTILL_TASKS,
    TASKS,
    NonFiniteLossError,
    TaskNotAvailable,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    export_checkpoint,
    get_task,
    run_from_checkpoint,
    task_from_checkpoint,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + traceback
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _UsageError(Exception):
    """A bad argument found after parsing (missing directory, conflicting --resume options)."""


def _output(flag: str, path, directory: bool = False) -> Path:
    """The output path of option ``flag``, checked writable before any work (else a usage error)."""
    try:
        return writable_path(path, flag, directory=directory)
    except ValueError as err:
        raise _UsageError(str(err)) from None


# ----------------------------------------------------------------------------- argument types
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _float_in(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must be in {bracket}{low}, {high}], got {text}")
        return value

    return parse


# ----------------------------------------------------------------------------- parser
_TRAIN_EPILOG = """examples:
  diffusion-np train toy2d --dataset swiss_roll --steps 3000 --out runs/swiss
  diffusion-np train toy2d --out runs/swiss --resume      # continue after Ctrl-C or a crash
  diffusion-np train digits --preset demo --out runs/digits
  diffusion-np train shapes-vae --preset demo --out runs/vae
  diffusion-np train shapes --preset demo --vae runs/vae --out runs/shapes

The run directory gets checkpoint/ (the latest checkpoint, replaced atomically),
loss.png and samples/step-NNNNNN.png. Ctrl-C finishes the current step, saves a
checkpoint and exits; --resume then continues the exact same run."""

_DISTILL_EPILOG = """examples:
  diffusion-np distill lcm --teacher pretrained:shapes --out runs/shapes-lcm
  diffusion-np distill lcm --teacher pretrained:shapes --out runs/shapes-lcm --resume
  diffusion-np evaluate --checkpoint runs/shapes-lcm --sampler lcm --steps 1,2,4,8

The student samples with --sampler lcm in 1-8 steps and no guidance (the teacher's is distilled
into it). The run directory is laid out as train's; Ctrl-C saves, --resume continues exactly."""

_SAMPLE_EPILOG = """example:
  diffusion-np sample --checkpoint runs/swiss --sampler dpm++ --steps 20 -n 2000 -o swiss.png
  diffusion-np sample --checkpoint runs/shapes --prompt "a large blue square in the center" -n 4 -o blue.png
  diffusion-np sample --checkpoint pretrained:shapes-controlnet --control mask.png --prompt "a red circle" -o red.png
  diffusion-np sample --model sd15 --prompt "a red bicycle" --sampler dpm++ --steps 25 -o bike.png"""

_FINETUNE_EPILOG = """examples:
  diffusion-np finetune lora --checkpoint pretrained:shapes --concept star --out runs/star
  diffusion-np finetune lora --concept star --out runs/star --resume       # after Ctrl-C
  diffusion-np finetune textual-inversion --concept orange --out runs/orange
  diffusion-np finetune dreambooth --concept star --out runs/star-db
  diffusion-np sample --checkpoint pretrained:shapes --lora runs/star --prompt "a large green star in the center"
  diffusion-np evaluate --checkpoint runs/star --json star.json

The run directory gets checkpoint/ (the learned weights only: adapters, the new token's row;
for DreamBooth the U-Net) and loss.png; the base model is loaded again from --checkpoint."""

_EVALUATE_EPILOG = """examples:
  diffusion-np evaluate --checkpoint pretrained:digits --json digits.json
  diffusion-np evaluate --checkpoint runs/shapes --sampler dpm++ --steps 20 --guidance-scale 4
  diffusion-np evaluate --checkpoint runs/swiss --num-samples 20000
  diffusion-np evaluate --checkpoint pretrained:shapes-lcm --sampler lcm --steps 1,2,4,8 \\
      --baseline pretrained:shapes ddim 50 4 --baseline pretrained:shapes dpm++ 20 4
  diffusion-np evaluate --checkpoint pretrained:shapes --lora pretrained:shapes-lora-star --sampler dpm++ --steps 20

What is scored (sizes are the defaults):
  digits  500 images, the ten digits in turn: the classifier's accuracy on the digit asked
          for, and the Frechet distance of its features to the test digits, beside the
          same distance for 500 real train digits (the floor)
  shapes  320 images of the 162 training prompts and 144 of the 18 held-out ones:
          the share with colour, shape, size and position all right, and each alone
  toy2d   10000 points: sliced Wasserstein distance and MMD to fresh data, beside
          the same distances between two draws of the data (the floor)
  personalised (a finetune run, or --lora / --embedding): the concept on its 8 trained
          prompts (4 images each) and in 64 combinations never shown with it, and the
          180 base prompts with the personalised and with the base model (retention)
  lcm, progressive  distilled students: scored as their teacher (shapes or digits)

Shipped weights: pretrained:digits, pretrained:shapes, pretrained:shapes-controlnet,
pretrained:shapes-lcm and pretrained:digits-lcm (distilled to 1-8 LCM steps: --sampler lcm --steps 4)."""


_RESTORE_EPILOG = """examples:
  diffusion-np restore --task deblur --checkpoint pretrained:digits --input blurred.png -o sharp.png
  diffusion-np restore --task superres --checkpoint pretrained:shapes --input small8x8.png -o big.png
  diffusion-np restore --task deblur --checkpoint pretrained:shapes --input blurred.png --warm-start 0 -o cold.png
  diffusion-np restore --task inpaint --checkpoint pretrained:shapes --input photo.png --degrade \\
      --baseline harmonic.png -o dps.png

Defaults (images in [-1, 1]): deblur, a Gaussian blur of sigma max(1, side / 16) px, noise 0.05;
superres, average pooling by --factor, noise 0.05; denoise, noise 0.3; inpaint, noise 0.05."""


def _add_train_options(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """The options every task shares (TrainConfig fields, --out, --resume, --quiet).

    Defaults are argparse.SUPPRESS so that an option the user did not give is
    absent from the namespace: --resume then takes it from the checkpoint.
    """
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="run directory for the checkpoint, loss.png and samples/ (required; created if missing)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint (options not given are taken from it; "
                             "starts from step 0 if there is none)")

    def option(flag: str, type_, text: str) -> None:
        key = flag[2:].replace("-", "_")
        default = defaults[key] if defaults[key] is not None else "steps // 20"
        metavar = "X" if type_ not in (_positive_int, _nonnegative_int) else "N"
        parser.add_argument(flag, type=type_, default=argparse.SUPPRESS, metavar=metavar,
                            help=f"{text} (default {default})")

    option("--steps", _positive_int, "total optimizer steps; the learning-rate schedule ends there")
    option("--batch-size", _positive_int, "examples per step")
    option("--lr", _float_in(0.0, 10.0, low_open=True), "peak learning rate of the linear-warmup + cosine schedule")
    option("--warmup-steps", _nonnegative_int, "steps of linear learning-rate warmup")
    option("--weight-decay", _float_in(0.0, 1.0), "decoupled weight decay; > 0 switches Adam to AdamW")
    option("--ema-decay", _float_in(0.0, 1.0), "decay of the EMA of the weights used for samples")
    option("--grad-clip", _float_in(0.0, float("inf")), "clip the global gradient norm to this; 0: no clipping")
    option("--seed", _nonnegative_int, "seed of initialisation, batches, timesteps and noise")
    option("--checkpoint-every", _nonnegative_int, "write a checkpoint every N steps; 0: only at the end")
    option("--sample-every", _nonnegative_int, "write a preview PNG every N steps; 0: only at the end")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _steps_list(text: str) -> list[int]:
    """``4`` or ``1,2,4,8``: a steps sweep for evaluate."""
    return [_positive_int(part) for part in text.split(",")]


def _add_sampler_options(parser: argparse.ArgumentParser, model_default: bool = False, sweep: bool = False) -> None:
    """--sampler and --steps, shared by sample and evaluate (``model_default``: None means the model's own;
    ``sweep``: --steps takes a comma-separated list)."""
    help_text = "sampling method (default ddim" + ("; a distilled student: its own, lcm for an lcm run; --model: the "
                                                  "model's own scheduler)" if model_default else ")")
    parser.add_argument("--sampler", choices=list(SAMPLERS), default=None if model_default else "ddim", help=help_text)
    if sweep:
        parser.add_argument("--steps", type=_steps_list, default=[50], metavar="N[,N...]",
                            help="number of sampling steps; a list (1,2,4,8) evaluates each in turn (default 50)")
        return
    parser.add_argument("--steps", type=_positive_int, default=50, metavar="N",
                        help="number of sampling steps (default 50)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusion-np", description="Stable Diffusion in plain NumPy with hand-written backprop.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="the demo on built-in data: every layer's gradient check, then a 2-D "
                                       "diffusion model trained and sampled three ways (about a minute)")
    demo.add_argument("--out", default="demo", metavar="DIR", help="where the PNGs go (default demo/)")
    demo.add_argument("--steps", type=_positive_int, default=6000, metavar="N",
                      help="training steps of the 2-D model (default 6000)")
    demo.add_argument("--points", type=_positive_int, default=10_000, metavar="N",
                      help="samples per sampler for the distances (default 10000; fewer make them noisier)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    g = sub.add_parser("gradcheck", help="finite-difference check of every layer's backward")
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs and parameters (default 0)")

    train = sub.add_parser("train", help="train a model, with checkpoints and --resume",
                           description="Train a model on built-in data. Choose a task; each has its own --help.",
                           epilog=_TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = train.add_subparsers(dest="task", required=True, metavar="TASK", parser_class=_Parser)
    generic = dataclasses.asdict(TrainConfig())
    for name in TASKS:
        if name in DISTILL_TASKS or name.startswith(FINETUNE_PREFIX):
            continue  # under `distill` or `finetune`
        try:
            cls = get_task(name)
        except TaskNotAvailable:
            p = tasks.add_parser(name, help=f"{name} (not available yet)",
                                 description=f"Task {name!r} is not available yet.")
            _add_train_options(p, generic)
            continue
        summary = getattr(cls, "description", name)
        p = tasks.add_parser(name, help=summary, description=summary, epilog=_TRAIN_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_train_options(p, {**generic, **cls.train_defaults})
        cls.add_arguments(p.add_argument_group(f"{name} options"))

    distill = sub.add_parser("distill", help="distil a trained model to a few sampling steps, with checkpoints "
                                             "and --resume", epilog=_DISTILL_EPILOG,
                             description="Distil a trained text-to-image model (the teacher) into a student that "
                                         "samples in a few steps. Choose a method; each has its own --help.",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = distill.add_subparsers(dest="task", required=True, metavar="METHOD", parser_class=_Parser)
    for name in DISTILL_TASKS:
        cls = get_task(name)
        p = methods.add_parser(name, help=cls.description, description=cls.description, epilog=_DISTILL_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_train_options(p, {**generic, **cls.train_defaults})
        cls.add_arguments(p.add_argument_group(f"{name} options"))

    fin = sub.add_parser("finetune", help="teach pretrained:shapes a new concept (star, orange) from a few images",
                         description="Fine-tune a frozen shapes model on a new concept: LoRA adapters, a textual "
                                     "inversion (one new token's embedding) or DreamBooth (the whole U-Net), with "
                                     "checkpoints, --resume and Ctrl-C as for train.",
                         epilog=_FINETUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = fin.add_subparsers(dest="method", required=True, metavar="METHOD", parser_class=_Parser)
    for method in METHODS:
        cls = get_task(FINETUNE_PREFIX + method)
        p = methods.add_parser(method, help=cls.description, description=cls.description, epilog=_FINETUNE_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_train_options(p, {**generic, **cls.train_defaults})
        cls.add_arguments(p.add_argument_group(f"{method} options"))

    smp = sub.add_parser("sample", help="draw samples from a trained checkpoint and write a PNG",
                         description="Draw samples from a checkpoint written by `diffusion-np train` (EMA weights) "
                                     "and write a PNG (a scatter plot for toy2d).",
                         epilog=_SAMPLE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    smp.add_argument("--checkpoint", metavar="DIR", default=None,
                     help="a run directory of `diffusion-np train`, the checkpoint/ inside it, or "
                          "pretrained:digits / pretrained:shapes (the shipped weights)")
    _add_sampler_options(smp, model_default=True)
    smp.add_argument("--seed", type=_nonnegative_int, default=0, metavar="N",
                     help="seed of the initial and per-step noise (default 0)")
    smp.add_argument("-n", type=_positive_int, default=None,
                     help="number of samples (default 1000 points for toy2d, 16 images otherwise); "
                          "with --prompt, images per prompt (default 4)")
    smp.add_argument("--prompt", action="append", metavar="TEXT",
                     help="a caption to draw (digits and shapes checkpoints); repeat for several")
    smp.add_argument("--negative-prompt", metavar="TEXT", default=None,
                     help="the unconditional branch of classifier-free guidance (default: the empty caption)")
    smp.add_argument("--guidance-scale", type=float, default=None, metavar="W",
                     help="classifier-free guidance weight w >= 1 (default: the checkpoint's preview setting)")
    smp.add_argument("-o", "--output", metavar="PNG", default="samples.png",
                     help="PNG file to write; its directory must exist (default samples.png)")
    smp.add_argument("--raw-weights", action="store_true",
                     help="use the trained weights instead of their EMA")
    smp.add_argument("--control", metavar="IMAGE", default=None,
                     help="a ControlNet's control image (PNG; a shapes-controlnet checkpoint: a 32x32 grey-scale mask "
                          "or edge map; --model: with --controlnet)")
    smp.add_argument("--control-scale", type=float, default=None, metavar="S",
                     help="multiplies the ControlNet's residuals: 0 is the base model alone (default: the "
                          "checkpoint's, 1)")
    _add_personal_options(smp)
    smp.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sample_arguments(smp)  # --model and the options that go with it

    exp = sub.add_parser("export", help="write a checkpoint's EMA weights for sampling only (float16, no optimizer)",
                         description="Write the EMA weights of a training checkpoint, cast to float16 by default, "
                                     "without the optimizer state: a quarter of the size, for sharing or shipping. "
                                     "sample and evaluate read the result; --resume cannot continue it.")
    exp.add_argument("--checkpoint", metavar="DIR", required=True,
                     help="a run directory of `diffusion-np train` or the checkpoint/ inside it")
    exp.add_argument("--out", metavar="DIR", required=True, help="the directory to write (new or a checkpoint)")
    exp.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                     help="storage type of the weights (default float16; they load as float32)")
    exp.add_argument("--raw-weights", action="store_true", help="export the trained weights instead of their EMA")

    shipped = "\n".join(f"  {PREFIX}{name:25s} {what}" for name, what in PRETRAINED.items())
    ev = sub.add_parser("evaluate", help="score a checkpoint's samples: a table, and JSON with --json",
                        description="Generate samples from a checkpoint (digits, shapes or toy2d) and score them "
                                    "with the task's metrics; prints a table, writes the numbers as JSON with --json.",
                        epilog=f"{_EVALUATE_EPILOG}\n\nshipped weights (--checkpoint, --lora, --embedding):\n{shipped}",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--checkpoint", metavar="DIR", required=True,
                    help="a run directory of `diffusion-np train`, the checkpoint/ inside it, an export, or "
                         "pretrained:digits / pretrained:shapes (the shipped weights)")
    _add_sampler_options(ev, sweep=True)
    ev.add_argument("--baseline", nargs=4, action="append", metavar=("CHECKPOINT", "SAMPLER", "STEPS", "W"),
                    help="also evaluate CHECKPOINT with SAMPLER, STEPS steps and guidance W in the same run, and "
                         "print a table of every evaluation with its time per image (repeatable)")
    ev.add_argument("--guidance-scale", type=_float_in(1.0, float("inf")), default=None, metavar="W",
                    help="classifier-free guidance weight w >= 1 (default: the checkpoint's; ignored for toy2d)")
    ev.add_argument("--num-samples", type=_positive_int, default=None, metavar="N",
                    help="samples to score (default 500 digits, 320 shapes of seen prompts, 10000 toy2d points)")
    ev.add_argument("--heldout-samples", type=_nonnegative_int, default=None, metavar="N",
                    help="shapes: images of the 18 held-out prompts (default 144, 8 each; 0 skips them)")
    ev.add_argument("--seed", type=_nonnegative_int, default=0, metavar="N",
                    help="seed of the noise, the prompt order and the real-data draws (default 0)")
    ev.add_argument("--json", metavar="FILE", default=None,
                    help="also write the result as JSON here (its directory must exist)")
    ev.add_argument("--raw-weights", action="store_true", help="use the trained weights instead of their EMA")
    _add_personal_options(ev)
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    rs = sub.add_parser("restore", help="repair an image by diffusion posterior sampling",
                        description="Repair a degraded image with a shipped model as the prior (diffusion posterior "
                                    "sampling, Chung et al. 2023). --input is the measurement y = A(x) + n: for "
                                    "superres the small image, otherwise an image of the model's size; with "
                                    "--degrade it is a clean image that is degraded first.",
                        epilog=_RESTORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rs.add_argument("--task", choices=RESTORE_TASKS, required=True, help="the degradation A")
    rs.add_argument("--checkpoint", metavar="NAME", required=True,
                    help="pretrained:digits (8x8 grey) or pretrained:shapes (32x32 RGB), or a run of either task")
    rs.add_argument("--input", metavar="PNG", required=True, help="the measurement (or, with --degrade, a clean image)")
    rs.add_argument("-o", "--output", metavar="PNG", default="restored.png",
                    help="PNG of the DPS restoration (default restored.png)")
    rs.add_argument("--baseline", metavar="PNG", default=None,
                    help="also write the classical repair here (Wiener, bicubic, adaptive Wiener, harmonic)")
    rs.add_argument("--degrade", action="store_true", help="--input is clean: degrade it first (with --seed)")
    rs.add_argument("--factor", type=int, choices=(2, 4), default=4, help="superres: the downsampling factor (4)")
    rs.add_argument("--noise-std", type=_float_in(0.0, 2.0), default=None, metavar="S",
                    help="sigma_y of the measurement noise, images in [-1, 1] (default 0.3 denoise, 0.05 otherwise)")
    rs.add_argument("--mask", metavar="PNG", default=None,
                    help="inpaint: white = missing (default: a centred square of 3/8 of the side)")
    rs.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                    help="DDIM steps (default 100 in pixel space, 50 with a VAE)")
    rs.add_argument("--zeta", type=_float_in(0.0, 100.0), default=None, metavar="Z",
                    help="DPS step size (default 1 in pixel space, 0.5 with a VAE)")
    rs.add_argument("--repeats", type=_positive_int, default=None, metavar="K",
                    help="time-travel repeats per step (default 1; 4 with a VAE and --warm-start 0)")
    rs.add_argument("--warm-start", type=_float_in(0.0, 1.0), default=None, metavar="S",
                    help="start from the classical repair noised to the last S of the schedule; 0 starts from "
                         "noise (default 0.3 with a VAE, 0 in pixel space: what benchmarks/restore.py measured best)")
    rs.add_argument("--prompt", default="", metavar="TEXT", help="condition the prior on a caption (default: none)")
    rs.add_argument("--seed", type=_nonnegative_int, default=0, metavar="N", help="seed of the noise (default 0)")
    rs.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _add_personal_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora", action="append", metavar="PATH[:SCALE]", default=[],
                        help="add LoRA adapters: a `finetune lora` run or pretrained:shapes-lora-star, or a "
                             "diffusers/kohya LoRA file; SCALE multiplies the update (default 1); repeatable")
    parser.add_argument("--embedding", metavar="PATH", default=None,
                        help="add a learned token: a `finetune textual-inversion` run, "
                             "pretrained:shapes-embedding-orange, or a {word: (1, D)} safetensors file")


# ----------------------------------------------------------------------------- commands
def _train(args) -> int:
    if args.command == "finetune":
        args.task = FINETUNE_PREFIX + args.method
    command = f"finetune {args.method}" if args.command == "finetune" else f"{args.command} {args.task}"
    try:
        cls = get_task(args.task)
    except TaskNotAvailable as err:
        raise _UsageError(str(err)) from None
    if args.out is None:
        raise _UsageError(f"{command}: --out DIR is required (where checkpoints and plots go)")
    out = _output("--out", args.out, directory=True)

    given = vars(args)
    if given.get("grad_clip") == 0:
        given["grad_clip"] = None  # 0 on the command line means "no clipping"
    given_train = {f.name: given[f.name] for f in dataclasses.fields(TrainConfig) if f.name in given}
    given_task = {f.name: given[f.name] for f in dataclasses.fields(cls.Config) if f.name in given}

    checkpoint = None
    if (out / "checkpoint").exists():
        if not args.resume:
            raise _UsageError(f"{out} already holds a checkpoint; pass --resume to continue it, "
                              "or choose another --out")
        try:
            checkpoint = load_checkpoint(out / "checkpoint")
        except CheckpointError as err:
            raise _UsageError(str(err)) from None
        saved = checkpoint.config
        if saved.get("task") != cls.name:
            raise _UsageError(f"{out} holds a {saved.get('task')!r} run, not {cls.name!r}")
        try:
            task, saved_train, rng = run_from_checkpoint(checkpoint)  # every field of config.json checked
        except CheckpointError as err:
            raise _UsageError(str(err)) from None
        conflicts = [
            f"--{key.replace('_', '-')} {value} (the checkpoint has {section.get(key)})"
            for section, options in ((saved["train"], given_train), (saved["task_config"], given_task))
            for key, value in options.items()
            if key not in TrainConfig.RESUMABLE_CHANGES and section.get(key) != value
        ]
        if conflicts:
            raise _UsageError("--resume continues the run as configured; these options differ: "
                              + ", ".join(conflicts) + " (drop them, or start a new --out)")
        train_config = dataclasses.replace(saved_train, **given_train)  # only RESUMABLE_CHANGES can differ
    else:
        if args.resume:
            print(f"no checkpoint in {out} yet: starting from step 0", file=sys.stderr)
        try:
            task_config = cls.Config(**given_task)
            # a task with presets (--preset) takes its training defaults from the chosen one
            defaults = cls.train_defaults_for(task_config) if hasattr(cls, "train_defaults_for") else cls.train_defaults
            train_config = TrainConfig(**{**defaults, **given_train})
        except ValueError as err:
            raise _UsageError(str(err)) from None
        rng = np.random.default_rng(train_config.seed)
        try:
            task = cls(task_config, rng)  # the model's initialisation draws from rng first, as in the library calls
        except ValueError as err:  # a CheckpointError too: a base or teacher that cannot serve
            raise _UsageError(str(err)) from None
    trainer = Trainer(task, train_config, out_dir=out, rng=rng, progress=not args.quiet)
    if checkpoint is not None:
        try:
            trainer.resume(checkpoint)
        except CheckpointError as err:
            raise _UsageError(str(err)) from None
        print(f"resuming {out} at step {trainer.step} of {train_config.steps}", file=sys.stderr)
    if trainer.step >= train_config.steps:
        print(f"{out} is already trained to step {trainer.step} (its --steps); nothing to do")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    try:
        trainer.train()
    except TrainingInterrupted as err:
        print(f"diffusion-np: {err}; continue with: diffusion-np {command} --out {out} --resume",
              file=sys.stderr)
        return 130
    except NonFiniteLossError as err:
        print(f"diffusion-np: {err}", file=sys.stderr)
        return 1
    print(f"trained {cls.name} to step {trainer.step}: checkpoint {trainer.checkpoint_dir}, "
          f"loss curve {out / 'loss.png'}, samples in {out / 'samples'}")
    return 0


def _sample(args) -> int:
    if args.model is not None:  # real Stable Diffusion weights (docs/real-weights.md)
        if args.checkpoint is not None:
            raise _UsageError("give either --checkpoint or --model, not both")
        if args.embedding is not None:
            raise _UsageError("--embedding goes with a shapes --checkpoint; --model takes --lora files")
        try:
            specs = [parse_lora_spec(spec) for spec in args.lora]
        except ValueError as err:
            raise _UsageError(str(err)) from None

        def put_loras(pipe) -> None:  # every file checked whole before it is applied (load_lora)
            for i, (path, scale) in enumerate(specs):
                done = load_lora_weights(pipe, path, adapter_name=f"lora{i}", scale=scale)
                print(f"applied LoRA {path} (scale {scale:g}): "
                      + ", ".join(f"{len(v)} {k} layers" for k, v in done.items()))

        return sample_from_model(args, prepare=put_loras if specs else None)
    args.sampler = args.sampler or "ddim"
    if args.checkpoint is None:
        raise _UsageError("sample needs --checkpoint DIR (a trained run) or --model PATH (Stable Diffusion weights)")
    try:
        directory = resolve_checkpoint(args.checkpoint)  # a run directory -> its checkpoint/; pretrained:NAME
    except CheckpointError as err:
        raise _UsageError(str(err)) from None
    if not directory.exists():
        raise _UsageError(f"--checkpoint {directory} does not exist")
    output = _output("-o", args.output)
    if output.suffix.lower() != ".png":
        raise _UsageError(f"-o {output} must end in .png")
    try:
        checkpoint = load_checkpoint(directory)
        task = task_from_checkpoint(checkpoint, use_ema=not args.raw_weights)
    except (CheckpointError, LookupError) as err:
        raise _UsageError(str(err)) from None
    args.sampler = args.sampler or getattr(task, "default_sampler", "ddim")  # a distilled student: its own
    state = checkpoint.training_state
    exported = checkpoint.config.get("exported_from", {})  # diffusion-np export: EMA weights, no state
    step = state["step"] if state is not None else exported.get("step", "?")
    ema = (state is not None and not args.raw_weights) or exported.get("weights") == "ema"
    weights = "EMA weights" if ema else "weights"
    title = f"{task.name}, step {step}, {args.sampler} {args.steps} steps, seed {args.seed}"
    if (args.lora or args.embedding is not None) and not args.prompt:
        raise _UsageError("--lora and --embedding go with at least one --prompt (the prompts may use the new word)")
    try:
        controlled = task.name == "shapes-controlnet" and args.prompt
        if args.control is not None or args.control_scale is not None or controlled:
            n = _sample_control(task, args, output, title)
        elif args.prompt or args.negative_prompt is not None or args.guidance_scale is not None:
            n = _sample_prompts(task, args, output, title)
        else:
            n = args.n if args.n is not None else (1000 if task.name == "toy2d" else 16)
            samples = task.sample(args.sampler, args.steps, n, args.seed, progress=not args.quiet)
            task.save_png(samples, output, title)
    except ValueError as err:  # e.g. more steps than the model's training timesteps, guidance < 1
        raise _UsageError(str(err)) from None
    print(f"wrote {output} ({n} samples, {args.sampler}, {args.steps} steps, {weights} of {directory} "
          f"at step {step})")
    return 0


def _sample_prompts(task, args, output: Path, title: str) -> int:
    """Text-to-image from the command line: each --prompt ``-n`` times, one grid with the prompts as captions."""
    model = task.personalised() if hasattr(task, "personalised") else getattr(task, "model", None)
    if not isinstance(model, TextToImageModel):
        raise _UsageError(f"--prompt, --negative-prompt, --guidance-scale, --lora and --embedding need a digits, "
                          f"shapes or finetune checkpoint, not {task.name}")
    if not args.prompt:
        raise _UsageError("--negative-prompt and --guidance-scale go with at least one --prompt")
    try:
        for line in apply_personalisation(model, [parse_lora_spec(spec) for spec in args.lora], args.embedding,
                                          use_ema=not args.raw_weights):
            print(f"applied {line}")
    except (CheckpointError, OSError) as err:
        raise _UsageError(str(err)) from None
    per_prompt = args.n if args.n is not None else 4
    prompts = [p for p in args.prompt for _ in range(per_prompt)]
    w = args.guidance_scale if args.guidance_scale is not None else task.config.guidance_scale
    images = model.generate(prompts, args.sampler, args.steps, w, args.seed, progress=not args.quiet,
                                 negative_prompt=args.negative_prompt)
    save_image_grid(images, output, prompts, ncols=min(per_prompt, 8), title=f"{title}, guidance {w}")
    return len(prompts)


def _sample_control(task, args, output: Path, title: str) -> int:
    """``--control IMAGE``: each --prompt ``-n`` times under the control image, saved beside it."""
    if task.name != "shapes-controlnet":
        raise _UsageError(f"--control and --control-scale need a shapes-controlnet checkpoint (or --model with "
                          f"--controlnet), not {task.name}")
    if args.control is None or not args.prompt:
        raise _UsageError("--control IMAGE and at least one --prompt go together")
    try:
        control = load_control_image(args.control)  # (H, W, C) in [0, 1]
    except OSError as err:  # missing, or not an image
        raise _UsageError(f"--control {args.control}: {err}") from None
    per_prompt = args.n if args.n is not None else 4
    prompts = [p for p in args.prompt for _ in range(per_prompt)]
    images = task.generate(prompts, control, args.sampler, args.steps, args.guidance_scale, args.seed,
                           args.control_scale, progress=not args.quiet)  # a ValueError names a bad control image
    shown = np.repeat(control[None] * 2.0 - 1.0, 3 // control.shape[-1], axis=-1)  # grey [0, 1] -> RGB [-1, 1]
    scale = args.control_scale if args.control_scale is not None else task.config.conditioning_scale
    save_image_grid(np.concatenate([shown, images]), output, ["control"] + prompts, ncols=min(per_prompt + 1, 8),
                    title=f"{title}, control scale {scale:g}")
    return len(prompts)


def _export(args) -> int:
    _output("--out", args.out, directory=True)
    try:
        out = export_checkpoint(args.checkpoint, args.out, dtype=np.dtype(args.dtype), use_ema=not args.raw_weights)
    except CheckpointError as err:
        raise _UsageError(str(err)) from None
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {args.dtype})")
    return 0


def _evaluate(args) -> int:
    try:
        directory = resolve_checkpoint(args.checkpoint)  # a run directory -> its checkpoint/; pretrained:NAME
    except CheckpointError as err:
        raise _UsageError(str(err)) from None
    if not directory.exists():
        raise _UsageError(f"--checkpoint {directory} does not exist")
    if args.json is not None:  # checked now, not after minutes of sampling
        _output("--json", args.json)
    try:
        personal = args.lora or args.embedding is not None or is_finetune_checkpoint(load_checkpoint(directory))
    except CheckpointError as err:
        raise _UsageError(str(err)) from None
    if personal:
        if len(args.steps) > 1 or args.baseline:
            raise _UsageError("a personalised model is scored at one --steps, without --baseline")
        try:
            result = evaluate_personalised_checkpoint(
                args.checkpoint, [parse_lora_spec(spec) for spec in args.lora], args.embedding, args.sampler,
                args.steps[0], args.guidance_scale, args.seed, use_ema=not args.raw_weights, progress=not args.quiet)
        except (CheckpointError, LookupError, ValueError, OSError) as err:
            raise _UsageError(str(err)) from None
        print(format_personalised_report(result))
        if args.json is not None:
            print(f"wrote {write_json(result, args.json)}")
        return 0
    runs = [(args.checkpoint, args.sampler, steps, args.guidance_scale) for steps in args.steps]
    for checkpoint, sampler, steps, w in args.baseline or []:
        if sampler not in SAMPLERS:
            raise _UsageError(f"--baseline {checkpoint} {sampler}: unknown sampler; choose one of "
                              f"{', '.join(SAMPLERS)}")
        try:
            runs.append((checkpoint, sampler, _positive_int(steps), _float_in(1.0, float("inf"))(w)))
        except argparse.ArgumentTypeError as err:
            raise _UsageError(f"--baseline {checkpoint} {sampler} {steps} {w}: {err}") from None
    results = []
    for checkpoint, sampler, steps, w in runs:
        try:
            result = evaluate_checkpoint(checkpoint, sampler=sampler, steps=steps, guidance_scale=w,
                                         num_samples=args.num_samples, heldout_samples=args.heldout_samples,
                                         seed=args.seed, use_ema=not args.raw_weights, progress=not args.quiet)
        except (CheckpointError, LookupError, ValueError) as err:  # e.g. more steps than training timesteps
            raise _UsageError(str(err)) from None
        ignored = [flag for flag, value, task in (("--guidance-scale", w, "toy2d"),
                                                  ("--heldout-samples", args.heldout_samples, "digits/toy2d"))
                   if value is not None and result.get("scored_as", result["task"]) in task.split("/")]
        if ignored:
            print(f"diffusion-np: note: {' and '.join(ignored)} ignored for {result['task']}", file=sys.stderr)
        print(format_report(result) + ("\n" if len(runs) > 1 else ""))
        results.append(result)
    if len(results) > 1:
        print(format_sweep(results))
    if args.json is not None:
        print(f"wrote {write_json(results[0] if len(results) == 1 else {'runs': results}, args.json)}")
    return 0


def _restore(args) -> int:
    output = _output("--output", args.output)
    extra = _output("--baseline", args.baseline) if args.baseline is not None else None
    try:
        model = TextToImageModel.load(args.checkpoint)
    except (CheckpointError, OSError) as err:
        raise _UsageError(f"--checkpoint {args.checkpoint}: {err}") from None
    latent = model.vae is not None
    size = int(model.unet.config["sample_size"]) * (int(model.vae.downscale) if latent else 1)
    channels = int(model.vae.out_channels if latent else model.unet.in_channels)
    kwargs = {"factor": args.factor, "noise_std": args.noise_std}
    if args.task == "inpaint" and args.mask is not None:
        try:
            missing = load_mask(args.mask, size=(size, size))  # (S, S), 1 = white = missing
        except OSError as err:
            raise _UsageError(f"--mask {args.mask}: {err}") from None
        op = Inpaint(1.0 - missing, size, channels, 0.05 if args.noise_std is None else args.noise_std)
    else:
        op = make_degradation(args.task, size, channels, **kwargs)
    try:
        image = load_image(args.input, channels=channels)[None]  # (1, H, W, C) in [-1, 1]
    except OSError as err:
        raise _UsageError(f"--input {args.input}: {err}") from None
    try:
        if args.degrade:
            op.check_image(image, "--input (a clean image, with --degrade)")
            y = op.degrade(image, rng=args.seed)
        else:
            op.check_measurement(image, "--input (the measurement)")
            y = image
        strength = args.warm_start if args.warm_start is not None else (0.3 if latent else 0.0)
        if latent:
            settings = {"steps": 50, "zeta": 0.5, "repeats": 1 if strength > 0 else 4}
        else:
            settings = {"steps": 100, "zeta": 1.0, "repeats": 1}
        for key in settings:
            if getattr(args, key) is not None:
                settings[key] = getattr(args, key)
        power = training_power("shapes" if latent else "digits", size)
        classical = baseline(op, y, power)
        warm = {"init": classical, "strength": strength} if strength > 0 else {}
        result = dps_restore(model, op, y, prompt=args.prompt, seed=args.seed, progress=not args.quiet, **settings,
                             **warm)
    except ValueError as err:
        raise _UsageError(str(err)) from None
    start = f", from the classical repair at strength {strength:g}" if strength > 0 else ""
    print(f"wrote {save_image(output, result.images[0])} (DPS, {settings['steps']} steps{start}, zeta "
          f"{settings['zeta']:g}, residual ||y - A(x)|| {result.residual_norms[-1]:.3f})")
    if extra is not None:
        print(f"wrote {save_image(extra, classical[0])} (classical baseline)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()  # freed memory kept for the next step (diffusion_np/malloc.py): a choice for this process
    try:
        if args.command == "gradcheck":
            return 0 if gradcheck_report(seed=args.seed) < 1e-6 else 1
        if args.command == "demo":
            result = run_demo(args.out, steps=args.steps, n=args.points, progress=not args.quiet)
            return 0 if result["worst_gradcheck_error"] < 1e-6 else 1
        if args.command in ("train", "distill", "finetune"):
            return _train(args)
        if args.command == "sample":
            return _sample(args)
        if args.command == "export":
            return _export(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "restore":
            return _restore(args)
    except _UsageError as err:
        print(f"diffusion-np: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffusion-np: interrupted", file=sys.stderr)
        return 130
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
