"""``diffusion-np sample --model PATH``: text-to-image with real Stable Diffusion 1.x weights.

The options and the command live in :mod:`diffusion_np.io.diffusers`
(:func:`~diffusion_np.io.diffusers.add_sample_arguments`,
:func:`~diffusion_np.io.diffusers.sample_from_model`); this module gives them a
stand-alone parser, so the command also runs as::

    python -m diffusion_np.cli_real sample --model PATH --prompt "a red bicycle" \\
        --steps 25 --sampler dpm++ --guidance-scale 7.5 -o out.png

Left out: image-to-image and inpainting from the command line.
"""

from __future__ import annotations

import argparse
import sys

from diffusion_np.io.diffusers import add_sample_arguments, sample_from_model


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser: ``sample`` with the real-model options."""
    from diffusion_np.samplers import SAMPLERS

    parser = argparse.ArgumentParser(prog="diffusion-np", description="Sample real Stable Diffusion 1.x weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    smp = sub.add_parser("sample", help="text-to-image with a diffusers folder or a single-file checkpoint")
    add_sample_arguments(smp)
    smp.add_argument("--sampler", choices=list(SAMPLERS), default="dpm++", help="sampling method (default dpm++)")
    smp.add_argument("--steps", type=int, default=25, metavar="N", help="sampling steps (default 25)")
    smp.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the noise (default 0)")
    smp.add_argument("-o", "--output", metavar="PNG", default="out.png", help="PNG to write (default out.png)")
    smp.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is None:
        print("diffusion-np: error: sample needs --model PATH", file=sys.stderr)
        return 2
    return sample_from_model(args)


if __name__ == "__main__":
    sys.exit(main())
