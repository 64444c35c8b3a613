"""The ``diffusion-np`` command (also ``python -m diffusion_np``).

    diffusion-np demo        gradient-check report of every layer (what `make demo` runs)
    diffusion-np gradcheck   the same report, with options

Bad arguments print one line and exit with status 2; ``--help`` on every command.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _layer_cases(rng: np.random.Generator):
    """(name, module, inputs) for every layer, small float64 shapes, odd sizes on purpose."""
    from diffusion_np import nn

    def r(*shape):
        return rng.standard_normal(shape)

    yield "Linear(5 -> 3)", nn.Linear(5, 3, rng=rng), (r(2, 4, 5),)
    yield "Conv2d 3x3 stride 1", nn.Conv2d(3, 4, 3, padding=1, rng=rng), (r(2, 5, 7, 3),)
    yield "Conv2d 3x3 stride 2", nn.Conv2d(3, 4, 3, stride=2, padding=1, rng=rng), (r(1, 7, 5, 3),)
    yield "GroupNorm(2 groups, 6 ch)", nn.GroupNorm(2, 6), (r(2, 3, 5, 6),)
    yield "LayerNorm(6)", nn.LayerNorm(6), (r(2, 5, 6),)
    yield "SiLU", nn.SiLU(), (r(2, 3, 4),)
    yield "GELU (exact erf)", nn.GELU(), (r(2, 3, 4),)
    yield "GEGLU(6 -> 4)", nn.GEGLU(6, 4, rng=rng), (r(2, 3, 6),)
    yield "Attention self, 2 heads", nn.Attention(8, heads=2, dim_head=3, rng=rng), (r(2, 5, 8),)
    yield "Attention cross, ctx (3, 7)", nn.Attention(8, cross_attention_dim=7, heads=2, dim_head=3, rng=rng), (
        r(2, 5, 8),
        r(2, 3, 7),
    )
    yield "Upsample2D (nearest + conv)", nn.Upsample2D(3, rng=rng), (r(1, 3, 5, 3),)
    yield "Downsample2D (stride-2 conv)", nn.Downsample2D(3, rng=rng), (r(2, 6, 5, 3),)
    yield "Downsample2D (VAE, pad 0,1,0,1)", nn.Downsample2D(3, padding=0, rng=rng), (r(1, 6, 6, 3),)
    yield "TimestepEmbedding(6 -> 8)", nn.TimestepEmbedding(6, 8, rng=rng), (r(3, 6),)


def gradcheck_report(seed: int = 0, out=None) -> float:
    """Print each layer's worst finite-difference relative error; return the worst overall."""
    out = out if out is not None else sys.stdout
    from diffusion_np.gradcheck import check_module

    rng = np.random.default_rng(seed)
    print("Hand-written backward vs centred finite differences (float64, random upstream gradient)", file=out)
    print(f"{'layer':36s} {'worst rel. error':>17s}  {'checked':s}", file=out)
    worst_all = 0.0
    start = time.perf_counter()
    for name, module, inputs in _layer_cases(rng):
        module.to(dtype=np.float64).eval()
        errors = check_module(module, *inputs)
        worst = max(errors.values())
        worst_all = max(worst_all, worst)
        verdict = "ok" if worst < 1e-6 else "FAIL"
        print(f"{name:36s} {worst:17.2e}  {verdict}: {', '.join(errors)}", file=out)
    print(f"worst: {worst_all:.2e} (bar 1e-6) in {time.perf_counter() - start:.1f} s", file=out)
    return worst_all


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + traceback
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusion-np", description="Stable Diffusion in plain NumPy with hand-written backprop.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("demo", help="run the demo on built-in data (for now: the layer gradient-check report)")
    g = sub.add_parser("gradcheck", help="finite-difference check of every layer's backward")
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs and parameters (default 0)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("demo", "gradcheck"):
        worst = gradcheck_report(seed=getattr(args, "seed", 0))
        return 0 if worst < 1e-6 else 1
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
