"""CuPy vs NumPy parity and CuPy vs PyTorch CUDA speed, in one run.

    PYTHONPATH=. python3 -m benchmarks.gpu --json bench-gpu.json     (on a machine with a CUDA GPU)
    python -m benchmarks.gpu --dry-run                                (anywhere: checks this script)

Three parts:

1. **Parity.** Every op (conv2d in each formulation, GroupNorm, LayerNorm, SiLU,
   GELU, attention, Linear) runs forward + backward on NumPy and on CuPy with the
   same float32 inputs; the row gives the largest absolute difference over the
   output and every gradient (``max_abs_err``; float32 rounding gives ~1e-6).
2. **Training-step speed.** The U-Net, VAE and text-encoder steps of
   ``benchmarks/train.py`` (same configs and batch sizes) on CuPy against
   diffusers/transformers on ``torch.cuda``: ``cupy_s``, ``torch_s``, ``ratio``,
   best of ``--repeats`` after a warm-up, each timed run ending with a device
   synchronise.
3. **Speed-up over the CPU.** The NumPy step on the host's CPU (all its cores,
   one run) divided by the CuPy step: ``speedup_vs_numpy_cpu``.

``--dry-run`` needs no GPU and no CuPy: NumPy stands in for CuPy and torch runs
on the CPU, at batch 2 with one repeat, so every line of the CuPy path runs once
(``make test`` does not run it; ``benchmarks/README.md`` says how to). The
numbers of a dry run mean nothing.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks import train
from benchmarks.common import machine_info


class Device:
    """Where the "GPU" side runs: CuPy + torch.cuda, or (dry run) NumPy + torch on the CPU."""

    def __init__(self, dry_run: bool):
        import torch

        self.dry_run = dry_run
        if dry_run:
            self.xp, self.name, self.torch_device = np, "numpy", torch.device("cpu")
        else:
            import cupy

            if not cupy.cuda.is_available():
                raise SystemExit("benchmarks.gpu: no CUDA device visible to CuPy (use --dry-run to check the script)")
            if not torch.cuda.is_available():
                raise SystemExit("benchmarks.gpu: torch does not see a CUDA device")
            self.xp, self.name, self.torch_device = cupy, "cupy", torch.device("cuda")

    def put(self, a):
        return self.xp.asarray(a)

    def get(self, a) -> np.ndarray:
        return np.asarray(a) if self.dry_run else self.xp.asnumpy(a)

    def sync(self) -> None:
        if not self.dry_run:
            import torch

            self.xp.cuda.Device().synchronize()
            torch.cuda.synchronize()

    def describe(self) -> dict:
        if self.dry_run:
            return {"dry_run": True}
        import torch

        props = self.xp.cuda.runtime.getDeviceProperties(0)
        return {"gpu": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
                "cupy": self.xp.__version__, "torch_cuda": torch.version.cuda}


# ----------------------------------------------------------------------------- 1. parity
def _f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def parity_cases(rng):
    """(name, fwd, bwd, inputs): ``fwd(*inputs) -> (y, cache)``, ``bwd(dy, cache) -> grads``."""
    from diffusion_np.nn import activation, attention, conv, linear, norm

    x, w, b = _f32(rng, 4, 16, 16, 8), _f32(rng, 3, 3, 8, 16, scale=0.2), _f32(rng, 16)
    for method in conv.METHODS:
        if method == "matmul":
            continue

        def fwd(x, w, b, method=method):
            return conv.conv2d_forward(x, w, b, 1, 1, method=method)

        yield f"conv2d_{method}_16x16", fwd, conv.conv2d_backward, (x, w, b)
    yield ("conv2d_stride2_vae", lambda x, w, b: conv.conv2d_forward(x, w, b, 2, (0, 1, 0, 1)),
           conv.conv2d_backward, (x, _f32(rng, 3, 3, 8, 8, scale=0.2), _f32(rng, 8)))
    yield ("conv2d_1x1", lambda x, w, b: conv.conv2d_forward(x, w, b), conv.conv2d_backward,
           (x, _f32(rng, 1, 1, 8, 12), _f32(rng, 12)))
    g, be = _f32(rng, 32), _f32(rng, 32)
    yield ("group_norm", lambda x, g, b: norm.group_norm_forward(x, g, b, 8, 1e-5), norm.group_norm_backward,
           (_f32(rng, 4, 8, 8, 32), g, be))
    yield ("layer_norm", lambda x, g, b: norm.layer_norm_forward(x, g, b), norm.layer_norm_backward,
           (_f32(rng, 4, 16, 32), g, be))
    yield "silu", activation.silu_forward, activation.silu_backward, (_f32(rng, 4, 8, 8, 32),)
    yield "gelu", activation.gelu_forward, activation.gelu_backward, (_f32(rng, 4, 16, 64),)
    q, k, v = _f32(rng, 2, 4, 64, 16), _f32(rng, 2, 4, 16, 16), _f32(rng, 2, 4, 16, 16)
    yield "attention", attention.sdpa_forward, attention.sdpa_backward, (q, k, v)
    yield ("linear", linear.linear_forward, linear.linear_backward,
           (_f32(rng, 4, 16, 32), _f32(rng, 24, 32, scale=0.2), _f32(rng, 24)))


def _as_list(grads):
    return [g for g in (grads if isinstance(grads, tuple) else (grads,)) if g is not None]


def parity(dev: Device) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for name, fwd, bwd, inputs in parity_cases(rng):
        y, cache = fwd(*inputs)
        dy = _f32(rng, *y.shape)
        ref = [y, *_as_list(bwd(dy, cache))]
        y_d, cache_d = fwd(*(dev.put(a) for a in inputs))
        got = [y_d, *_as_list(bwd(dev.put(dy), cache_d))]
        if len(got) != len(ref):
            raise AssertionError(f"{name}: {len(got)} outputs on {dev.name}, {len(ref)} on numpy")
        err = max(float(np.max(np.abs(dev.get(a) - r))) for a, r in zip(got, ref))
        scale = max(float(np.max(np.abs(r))) for r in ref)
        rows.append({"name": name, "max_abs_err": err, "max_abs_value": scale})
    return rows


# ----------------------------------------------------------------------------- 2. training steps
def _time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def step_cases(dev: Device, batch: int):
    """(name, device step, torch step, numpy CPU step): the train.py steps, moved to the device."""
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel as TorchUNet
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusion_np.models import AutoencoderKL, TextEncoder, TextEncoderConfig, UNet2DConditionModel
    from diffusion_np.nn.losses import mse_loss_backward, mse_loss_forward
    from diffusion_np.optim import AdamW

    rng = np.random.default_rng(0)
    tdev = dev.torch_device
    lr, wd = train.LR, train.WEIGHT_DECAY

    def ours(model, put, loss_step):
        model = model.to(dev.name) if put else model
        opt = AdamW(model, lr=lr, weight_decay=wd)

        def step():
            opt.zero_grad()
            loss_step(model)
            opt.step()

        return step

    def torch_step(tmodel, loss):
        tmodel = tmodel.to(tdev)
        opt = torch.optim.AdamW(tmodel.parameters(), lr=lr, weight_decay=wd)

        def step():
            opt.zero_grad()
            loss(tmodel).backward()
            opt.step()

        return step

    # U-Net
    cfg = train.unet_config()
    x, t, ctx, noise = train._rng_arrays(rng, batch, cfg, "unet")

    def unet_loss(data):
        def run(model):
            xx, tt, cc, nn = data
            _, cache = mse_loss_forward(model(xx, tt, cc), nn)
            model.backward(mse_loss_backward(cache))

        return run

    dev_data = tuple(dev.put(a) for a in (x, t, ctx, noise))
    tx, tt, tctx, tn = (torch.tensor(a).to(tdev) for a in (x.transpose(0, 3, 1, 2).copy(), t, ctx,
                                                          noise.transpose(0, 3, 1, 2).copy()))
    torch.manual_seed(0)
    yield ("unet_train_step",
           ours(UNet2DConditionModel(**cfg, rng=np.random.default_rng(0)), True, unet_loss(dev_data)),
           torch_step(TorchUNet(**cfg), lambda m: torch.nn.functional.mse_loss(m(tx, tt, tctx).sample, tn)),
           ours(UNet2DConditionModel(**cfg, rng=np.random.default_rng(0)), False, unet_loss((x, t, ctx, noise))))

    # VAE
    vcfg = train.vae_config()
    img = rng.uniform(-1, 1, (batch, train.IMAGE, train.IMAGE, vcfg["in_channels"])).astype(np.float32)
    img_d = dev.put(img)
    timg = torch.tensor(img.transpose(0, 3, 1, 2).copy()).to(tdev)

    def vae_loss(data):
        def run(model):
            model.loss(data, beta=1e-6, recon="l1")
            model.loss_backward()

        return run

    def torch_vae_loss(m):
        posterior = m.encode(timg).latent_dist
        rec = m.decode(posterior.sample()).sample
        return (rec - timg).abs().sum() / batch + 1e-6 * posterior.kl().mean()

    yield ("vae_train_step", ours(AutoencoderKL(**vcfg, rng=np.random.default_rng(0)), True, vae_loss(img_d)),
           torch_step(TorchVAE(**vcfg), torch_vae_loss),
           ours(AutoencoderKL(**vcfg, rng=np.random.default_rng(0)), False, vae_loss(img)))

    # text encoder
    tcfg = train.text_config()
    ids = rng.integers(4, tcfg["vocab_size"], (batch, train.TOKENS))
    target = rng.standard_normal((batch, train.TOKENS, tcfg["hidden_size"])).astype(np.float32)

    def text_loss(data):
        def run(model):
            i, tg = data
            _, cache = mse_loss_forward(model(i), tg)
            model.backward(mse_loss_backward(cache))

        return run

    tids, ttarget = torch.tensor(ids).to(tdev), torch.tensor(target).to(tdev)
    yield ("text_encoder_train_step",
           ours(TextEncoder(TextEncoderConfig(**tcfg)), True, text_loss((dev.put(ids), dev.put(target)))),
           torch_step(CLIPTextModel(CLIPTextConfig(**tcfg, **train.TORCH_TEXT_IDS)),
                      lambda m: torch.nn.functional.mse_loss(m(input_ids=tids).last_hidden_state, ttarget)),
           ours(TextEncoder(TextEncoderConfig(**tcfg)), False, text_loss((ids, target))))


def steps(dev: Device, batch: int, repeats: int) -> list[dict]:
    rows = []
    for name, dev_step, torch_step, cpu_step in step_cases(dev, batch):
        dev_s = _time(dev_step, repeats, dev.sync)
        torch_s = _time(torch_step, repeats, dev.sync)
        cpu_s = _time(cpu_step, 1, lambda: None)
        rows.append({"name": name, "batch": batch, f"{dev.name}_s": dev_s, "torch_s": torch_s,
                     "ratio": dev_s / torch_s, "numpy_cpu_s": cpu_s, "speedup_vs_numpy_cpu": cpu_s / dev_s})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--dry-run", action="store_true", help="NumPy and torch CPU stand in for the GPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=train.BATCH)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.batch, args.repeats = 2, 1
    dev = Device(args.dry_run)

    par = parity(dev)
    print(f"\nparity: {dev.name} vs numpy, forward + backward, max |difference|")
    for r in par:
        print(f"  {r['name']:28s} {r['max_abs_err']:.2e}   (largest value {r['max_abs_value']:.1f})")
    bad = [r["name"] for r in par if not r["max_abs_err"] <= 1e-4 * max(1.0, r["max_abs_value"])]

    st = steps(dev, args.batch, args.repeats)
    print(f"\ntraining steps, batch {args.batch}: {dev.name} vs torch {dev.torch_device}, best of {args.repeats}")
    print(f"  {'name':28s} {dev.name + ' ms':>10s} {'torch ms':>10s} {'ratio':>7s} {'cpu ms':>10s} {'speedup':>8s}")
    for r in st:
        print(f"  {r['name']:28s} {1e3 * r[dev.name + '_s']:10.2f} {1e3 * r['torch_s']:10.2f} {r['ratio']:7.2f} "
              f"{1e3 * r['numpy_cpu_s']:10.2f} {r['speedup_vs_numpy_cpu']:8.2f}")
    result = {"machine": {**machine_info(), **dev.describe()}, "parity": par, "steps": st}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if bad:
        raise SystemExit(f"parity failed for {bad}")
    return result


if __name__ == "__main__":
    main()
