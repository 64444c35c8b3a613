"""Per-op speed: forward + backward in NumPy vs PyTorch CPU, same process, same threads.

    python -m benchmarks.ops --json bench-ops.json [--threads 1 2] [--repeats 7]
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.ops --json bench-ops.json

(``make bench`` runs both; ``--quick``: 3 repeats at one thread.) Each row times one forward and one backward of the op
with a fixed random upstream gradient, float32, and prints numpy/torch.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import median_time, print_table, read_results, row, threads, write_json
from diffusion_np.malloc import tune_malloc
from diffusion_np.nn.activation import silu_backward, silu_forward
from diffusion_np.nn.attention import sdpa_backward, sdpa_forward
from diffusion_np.nn.conv import conv2d_backward, conv2d_forward
from diffusion_np.nn.norm import group_norm_backward, group_norm_forward

# (name, batch, C_in -> C_out, H = W); the shapes the U-Net of the shapes model uses
CONV_SHAPES = [(64, 32, 16), (64, 64, 8), (64, 128, 4), (16, 64, 32)]
# (batch * heads, tokens, head dim)
ATTENTION_SHAPES = [(256, 64, 32), (64, 256, 64)]


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def cases(rng):
    """Yield (name, numpy_fn, torch_fn): each fn runs forward + backward once."""
    import torch
    import torch.nn.functional as F

    for B, C, H in CONV_SHAPES:
        x, w, b = _f32(rng, B, H, H, C), _f32(rng, 3, 3, C, C) * 0.1, _f32(rng, C)
        dy = _f32(rng, B, H, H, C)
        tx = torch.tensor(x.transpose(0, 3, 1, 2).copy(), requires_grad=True)
        tw = torch.tensor(w.transpose(3, 2, 0, 1).copy(), requires_grad=True)
        tb = torch.tensor(b, requires_grad=True)
        tdy = torch.tensor(dy.transpose(0, 3, 1, 2).copy())

        def np_conv(x=x, w=w, b=b, dy=dy):
            _, cache = conv2d_forward(x, w, b, stride=1, padding=1)
            conv2d_backward(dy, cache)

        def torch_conv(tx=tx, tw=tw, tb=tb, tdy=tdy):
            F.conv2d(tx, tw, tb, padding=1).backward(tdy)

        yield f"conv3x3_b{B}_c{C}_{H}x{H}", np_conv, torch_conv

    for BH, N, d in ATTENTION_SHAPES:
        q, k, v, dy = (_f32(rng, 1, BH, N, d) for _ in range(4))
        tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
        tdy = torch.tensor(dy)

        def np_attn(q=q, k=k, v=v, dy=dy):
            _, cache = sdpa_forward(q, k, v)
            sdpa_backward(dy, cache)

        def torch_attn(tq=tq, tk=tk, tv=tv, tdy=tdy):
            F.scaled_dot_product_attention(tq, tk, tv).backward(tdy)

        yield f"attention_bh{BH}_n{N}_d{d}", np_attn, torch_attn

    x, g, b, dy = _f32(rng, 64, 8, 8, 128), _f32(rng, 128), _f32(rng, 128), _f32(rng, 64, 8, 8, 128)
    tx = torch.tensor(x.transpose(0, 3, 1, 2).copy(), requires_grad=True)
    tg, tb = torch.tensor(g, requires_grad=True), torch.tensor(b, requires_grad=True)
    tdy = torch.tensor(dy.transpose(0, 3, 1, 2).copy())

    def np_gn():
        _, cache = group_norm_forward(x, g, b, 32, 1e-5)
        group_norm_backward(dy, cache)

    def torch_gn():
        F.group_norm(tx, 32, tg, tb, 1e-5).backward(tdy)

    yield "groupnorm32_b64_c128_8x8", np_gn, torch_gn

    xs, dys = _f32(rng, 64, 16, 16, 64), _f32(rng, 64, 16, 16, 64)
    txs, tdys = torch.tensor(xs, requires_grad=True), torch.tensor(dys)

    def np_silu():
        _, cache = silu_forward(xs)
        silu_backward(dys, cache)

    def torch_silu():
        F.silu(txs).backward(tdys)

    yield "silu_b64_c64_16x16", np_silu, torch_silu


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write results here (merged with rows already in the file)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", help="run only cases whose name contains this")
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's default malloc thresholds")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 thread: a check that every row runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.threads = min(args.repeats, 3), [1]
    if args.json:
        read_results(args.json)  # an unreadable --json fails now, not after the timing
    malloc = "default" if args.default_malloc or not tune_malloc() else "tuned"
    rows = []
    for n in args.threads:
        with threads(n):
            for name, np_fn, torch_fn in cases(np.random.default_rng(0)):
                if args.only and args.only not in name:
                    continue
                rows.append(
                    row(name, n, median_time(np_fn, args.repeats), median_time(torch_fn, args.repeats), malloc=malloc)
                )
    print_table(rows, "ops: forward + backward, numpy / torch CPU")
    if args.json:
        write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
