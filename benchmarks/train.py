"""Whole training steps and a sampling run: NumPy vs PyTorch CPU, same process, same threads.

    python -m benchmarks.train --json bench-train.json [--threads 1 2] [--repeats 5] [--only unet]
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.train --json bench-train.json

(``make bench`` runs both.) Rows:

``unet_train_step``
    U-Net forward + MSE loss on the noise + hand-written backward + AdamW, batch 64
    of 8x8x4 latents with a text context; diffusers' ``UNet2DConditionModel`` with
    the same config on the torch side (autograd, ``torch.optim.AdamW``).
``vae_train_step``
    AutoencoderKL: encode, sample the posterior, decode, L1 + beta*KL, backward,
    AdamW; batch 64 of 32x32 RGB; diffusers' ``AutoencoderKL`` on the torch side.
``text_encoder_train_step``
    CLIP text encoder, batch 64 of 16 tokens, MSE to a random target, backward,
    AdamW; transformers' ``CLIPTextModel`` on the torch side.
``sample_ddim50_cfg``
    Text-to-image sampling: encode 8 prompts and "" once, 50 DDIM steps with
    classifier-free guidance (the U-Net at batch 16), decode with the VAE. The
    row also gives images per second. Inference mode on our side, ``no_grad`` on torch's.
``sd15_unet_forward``
    One forward of Stable Diffusion 1.5's U-Net (860 M parameters, random weights:
    diffusers' initialisation, loaded into ours) on a 64x64 latent at batch 2 (one
    guided step of a 512x512 image), 77 context tokens; inference mode and attention
    in chunks of 1024 queries on our side (as ``load_pipeline`` sets it), ``no_grad``
    on torch's. About 7 GB for the two models; 30-40 s a forward on one core, so it runs
    with ``--repeats`` capped at 3 and is left out of ``--quick``.

``--quick``: two repeats, one thread, no memory measurement and no SD 1.5 row unless
``--only`` names it; a check that every row runs, in about a minute.

Timing: the machine this was written on is shared, so every row alternates one
NumPy run and one torch run ``repeats`` times after a warm-up and reports the
*best* time of each side (``numpy_s``, ``torch_s``, the ratio of the two), the
medians (``numpy_median_s``, ``torch_median_s``) and the best CPU time of the process
(``numpy_cpu_s``, ``torch_cpu_s``, ``cpu_ratio``; at one thread the measure the other
jobs of a shared machine disturb least). The best time is the one least
disturbed by other processes; the medians show how noisy the run was.

Peak memory (``numpy_peak_mb``, ``torch_peak_mb``, measured once per row at the
first thread count, outside the timed runs): the extra resident memory one warm
training step needs. Before the step, unused heap memory is handed back to the
OS (``malloc_trim``) and the kernel's high-water mark is reset (writing 5 to
``/proc/self/clear_refs``); the number is ``VmHWM`` after the step minus ``VmRSS``
before it. It counts the activations, caches, gradients and temporaries of the
step, and the same for both libraries. Caveats: it counts pages, not bytes
(an array allocated but never written does not count), torch frees its gradients
at ``zero_grad`` (set to None) and allocates them again in the step while ours
stay allocated (a few MB here), and another thread of the process allocating at
the same time would be counted. For NumPy the exact peak of the bytes NumPy
allocated, from ``tracemalloc`` (NumPy reports its data buffers to it), is
``numpy_peak_traced_mb``; tracemalloc cannot see torch's allocator. Where
``/proc/self/clear_refs`` is missing (not Linux) the RSS fields are None.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import time
import tracemalloc

import numpy as np

from benchmarks.common import print_table, read_results, row, threads, write_json
from diffusion_np.malloc import tune_malloc

# ----------------------------------------------------------------------------- configurations
# The configurations come from diffusion_np.training.presets (the "full" presets of the
# shapes tasks, see unet_config etc.); these are used only where that module is missing,
# and are the ones the first measurements in docs/performance.md were taken with.
#: A U-Net for 8x8x4 latents with a text context of width 64, diffusers' field names.
UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32,
)
#: The VAE: 32x32 RGB <-> 8x8x4 latents (two halvings).
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=32, sample_size=32,
)
#: The text encoder (CLIP-style), hidden size = the U-Net's cross_attention_dim.
TEXT_CONFIG = dict(
    vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
    max_position_embeddings=16, hidden_act="quick_gelu",
)
#: transformers' CLIPTextConfig also wants the special ids of our tokenizer (<pad> 0, <bos> 2, <eos> 3)
TORCH_TEXT_IDS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
BATCH, TOKENS, IMAGE, SAMPLE_BATCH, SAMPLE_STEPS, GUIDANCE = 64, 16, 32, 8, 50, 7.5
LR, WEIGHT_DECAY = 1e-4, 1e-2


def _preset(task: str, part: str) -> dict | None:
    """``part`` of the "full" preset of ``task`` from diffusion_np.training.presets, or None."""
    try:
        from diffusion_np.training.presets import get_preset  # noqa: PLC0415
    except ImportError:
        return None
    return get_preset(task, "full").get(part)


def unet_config() -> dict:
    """The shapes task's "full" U-Net (presets.py) on 8x8x4 latents with a 64-wide context;
    UNET_CONFIG where the presets are missing."""
    cfg = _preset("shapes", "unet")
    if cfg is None:
        return dict(UNET_CONFIG)
    return {**cfg, "sample_size": 8, "in_channels": 4, "out_channels": 4,
            "cross_attention_dim": text_config()["hidden_size"]}


def vae_config() -> dict:
    """The shapes-vae task's "full" VAE (presets.py), 32x32 RGB; VAE_CONFIG where missing."""
    cfg = _preset("shapes-vae", "vae")
    return dict(VAE_CONFIG) if cfg is None else {**cfg, "in_channels": 3, "out_channels": 3}


def text_config() -> dict:
    """The shapes task's "full" text encoder (presets.py), vocabulary 64, 16 positions; TEXT_CONFIG where missing."""
    cfg = _preset("shapes", "text_encoder")
    if cfg is None:
        return dict(TEXT_CONFIG)
    return {**cfg, "vocab_size": TEXT_CONFIG["vocab_size"], "max_position_embeddings": TOKENS,
            "hidden_act": "quick_gelu"}


# ----------------------------------------------------------------------------- memory
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    return _LIBC


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_peak_mb(fn) -> float | None:
    """Extra resident memory (MB) that ``fn()`` needs at its peak: VmHWM after - VmRSS before
    (heap trimmed and high-water mark reset first; see the module docstring)."""
    gc.collect()
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024


def traced_peak_mb(fn) -> float:
    """Peak of the bytes Python and NumPy allocate during ``fn()``, above what was live before (MB)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (peak - base) / 2**20


# ----------------------------------------------------------------------------- timing
def best_of_alternating(np_fn, torch_fn, repeats: int, warmup: int = 1) -> dict:
    """Run numpy, torch, numpy, torch, ... ``repeats`` times each; best and median of each side."""
    for _ in range(warmup):
        np_fn()
        torch_fn()
    t_np, t_torch, cpu_np, cpu_torch = [], [], [], []
    for _ in range(repeats):
        for fn, times, cpu in ((np_fn, t_np, cpu_np), (torch_fn, t_torch, cpu_torch)):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {
        "numpy_s": min(t_np), "torch_s": min(t_torch),
        "numpy_median_s": float(np.median(t_np)), "torch_median_s": float(np.median(t_torch)),
        # CPU time of the process (all its threads): what the other jobs on a shared machine disturb
        # least at one thread; at two it also counts threads that spin while they wait
        "numpy_cpu_s": min(cpu_np), "torch_cpu_s": min(cpu_torch), "cpu_ratio": min(cpu_np) / min(cpu_torch),
    }


# ----------------------------------------------------------------------------- the cases
def _rng_arrays(rng, batch: int, cfg: dict, kind: str):
    f32 = np.float32
    if kind == "unet":
        s = cfg["sample_size"]
        x = rng.standard_normal((batch, s, s, cfg["in_channels"])).astype(f32)
        ctx = rng.standard_normal((batch, TOKENS, cfg["cross_attention_dim"])).astype(f32)
        noise = rng.standard_normal((batch, s, s, cfg["out_channels"])).astype(f32)
        t = rng.integers(0, 1000, batch)
        return x, t, ctx, noise
    raise ValueError(kind)


def unet_step_case(rng):
    """(numpy step, torch step, config): one training step of the U-Net each."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from diffusion_np.models import UNet2DConditionModel
    from diffusion_np.nn.losses import mse_loss_backward, mse_loss_forward
    from diffusion_np.optim import AdamW

    cfg = unet_config()
    x, t, ctx, noise = _rng_arrays(rng, BATCH, cfg, "unet")
    model = UNet2DConditionModel(**cfg, rng=np.random.default_rng(0))
    opt = AdamW(model, lr=LR, weight_decay=WEIGHT_DECAY)

    def np_step():
        opt.zero_grad()
        pred = model(x, t, ctx)
        _, cache = mse_loss_forward(pred, noise)
        model.backward(mse_loss_backward(cache))
        opt.step()

    torch.manual_seed(0)
    tmodel = TorchUNet(**cfg)
    topt = torch.optim.AdamW(tmodel.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    tx = torch.tensor(x.transpose(0, 3, 1, 2).copy())
    tt, tctx = torch.tensor(t), torch.tensor(ctx)
    tnoise = torch.tensor(noise.transpose(0, 3, 1, 2).copy())

    def torch_step():
        topt.zero_grad()
        pred = tmodel(tx, tt, tctx).sample
        torch.nn.functional.mse_loss(pred, tnoise).backward()
        topt.step()

    info = {"config": cfg, "batch": BATCH, "tokens": TOKENS, "parameters": model.num_parameters()}
    return np_step, torch_step, info


def vae_step_case(rng):
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    from diffusion_np.models import AutoencoderKL
    from diffusion_np.optim import AdamW

    cfg = vae_config()
    x = rng.uniform(-1, 1, (BATCH, IMAGE, IMAGE, cfg["in_channels"])).astype(np.float32)
    model = AutoencoderKL(**cfg, rng=np.random.default_rng(0))
    opt = AdamW(model, lr=LR, weight_decay=WEIGHT_DECAY)
    beta = 1e-6

    def np_step():
        opt.zero_grad()
        model.loss(x, beta=beta, recon="l1")
        model.loss_backward(input_grad=False)  # as the trainer, and as torch for tx (no requires_grad)
        opt.step()

    torch.manual_seed(0)
    tmodel = TorchVAE(**cfg)
    topt = torch.optim.AdamW(tmodel.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    tx = torch.tensor(x.transpose(0, 3, 1, 2).copy())

    def torch_step():
        topt.zero_grad()
        posterior = tmodel.encode(tx).latent_dist
        rec = tmodel.decode(posterior.sample()).sample
        loss = (rec - tx).abs().sum() / BATCH + beta * posterior.kl().mean()
        loss.backward()
        topt.step()

    info = {"config": cfg, "batch": BATCH, "loss": "l1 (sum / B) + 1e-6 * KL", "parameters": model.num_parameters()}
    return np_step, torch_step, info


def text_encoder_step_case(rng):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusion_np.models import TextEncoder, TextEncoderConfig
    from diffusion_np.nn.losses import mse_loss_backward, mse_loss_forward
    from diffusion_np.optim import AdamW

    cfg = text_config()
    ids = rng.integers(4, cfg["vocab_size"], (BATCH, TOKENS))
    target = rng.standard_normal((BATCH, TOKENS, cfg["hidden_size"])).astype(np.float32)
    model = TextEncoder(TextEncoderConfig(**cfg), rng=np.random.default_rng(0))
    opt = AdamW(model, lr=LR, weight_decay=WEIGHT_DECAY)

    def np_step():
        opt.zero_grad()
        _, cache = mse_loss_forward(model(ids), target)
        model.backward(mse_loss_backward(cache))
        opt.step()

    torch.manual_seed(0)
    tmodel = CLIPTextModel(CLIPTextConfig(**cfg, **TORCH_TEXT_IDS))
    topt = torch.optim.AdamW(tmodel.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    tids, ttarget = torch.tensor(ids), torch.tensor(target)

    def torch_step():
        topt.zero_grad()
        out = tmodel(input_ids=tids).last_hidden_state
        torch.nn.functional.mse_loss(out, ttarget).backward()
        topt.step()

    info = {"config": cfg, "batch": BATCH, "tokens": TOKENS, "parameters": model.num_parameters()}
    return np_step, torch_step, info


def sample_case(rng):
    """DDIM-50 with classifier-free guidance at batch SAMPLE_BATCH, text encoding and VAE decode included."""
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import DDIMScheduler
    from diffusers import UNet2DConditionModel as TorchUNet
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusion_np.models import AutoencoderKL, TextEncoder, TextEncoderConfig, UNet2DConditionModel
    from diffusion_np.nn.module import inference_mode
    from diffusion_np.pipelines.text_to_image import GuidedDenoiser
    from diffusion_np.samplers import DDIMSampler
    from diffusion_np.samplers.loop import sample

    ucfg, vcfg, tcfg = unet_config(), vae_config(), text_config()
    B, s, C = SAMPLE_BATCH, ucfg["sample_size"], ucfg["in_channels"]
    ids = rng.integers(4, tcfg["vocab_size"], (B, TOKENS))
    empty = np.zeros((B, TOKENS), dtype=np.int64)
    empty[:, 0], empty[:, 1] = 2, 3  # <bos> <eos> <pad> ...
    noise = rng.standard_normal((B, s, s, C)).astype(np.float32)
    unet = UNet2DConditionModel(**ucfg, rng=np.random.default_rng(0)).eval()
    vae = AutoencoderKL(**vcfg, rng=np.random.default_rng(1)).eval()
    text = TextEncoder(TextEncoderConfig(**tcfg), rng=np.random.default_rng(2)).eval()

    def np_sample():  # in inference mode, as the pipelines sample (torch: no_grad)
        with inference_mode(unet, vae, text):
            denoiser = GuidedDenoiser(unet, text(ids), text(empty), GUIDANCE)
            latents = sample(denoiser, noise.shape, DDIMSampler(), SAMPLE_STEPS, noise=noise, progress=False)
            return vae.decode_latents(latents)

    torch.manual_seed(0)
    tunet, tvae = TorchUNet(**ucfg).eval(), TorchVAE(**vcfg).eval()
    ttext = CLIPTextModel(CLIPTextConfig(**tcfg, **TORCH_TEXT_IDS)).eval()
    tids, tempty = torch.tensor(ids), torch.tensor(empty)
    tnoise = torch.tensor(noise.transpose(0, 3, 1, 2).copy())
    scheduler = DDIMScheduler()

    @torch.no_grad()
    def torch_sample():
        ctx = torch.cat([ttext(input_ids=tempty).last_hidden_state, ttext(input_ids=tids).last_hidden_state])
        scheduler.set_timesteps(SAMPLE_STEPS)
        x = tnoise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = tunet(torch.cat([x, x]), t, ctx).sample
            uncond, cond = out.chunk(2)
            x = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
        return tvae.decode(x / tvae.config.scaling_factor).sample

    info = {"batch": B, "steps": SAMPLE_STEPS, "guidance": GUIDANCE, "unet_batch": 2 * B}
    return np_sample, torch_sample, info


def sd15_unet_case(rng):
    """One SD 1.5 U-Net forward at a 64x64 latent, batch 2, the same random weights in both."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from diffusion_np.io.diffusers import SD1_UNET_CONFIG, _NoInit, _release_gradients, load_weights
    from diffusion_np.models import UNet2DConditionModel
    from diffusion_np.nn.attention import set_attention_chunk_size

    torch.manual_seed(0)
    tmodel = TorchUNet(**SD1_UNET_CONFIG).eval()
    model = UNet2DConditionModel.from_config(SD1_UNET_CONFIG, rng=_NoInit())  # zeros: the weights come next
    _release_gradients(model)  # no gradient buffers: inference only, 3.4 GB less
    load_weights(model, {k: v.numpy() for k, v in tmodel.state_dict().items()}, "unet", keep_grads=False)
    model.inference()
    set_attention_chunk_size(model, 1024)
    latent = rng.standard_normal((SD15_BATCH, 64, 64, 4)).astype(np.float32)
    context = rng.standard_normal((SD15_BATCH, 77, 768)).astype(np.float32)
    t = np.array([500] * SD15_BATCH)
    tlatent, tcontext = torch.tensor(latent.transpose(0, 3, 1, 2).copy()), torch.tensor(context)

    def np_forward():
        return model(latent, t, context)

    @torch.no_grad()
    def torch_forward():
        return tmodel(tlatent, 500, tcontext).sample

    info = {"batch": SD15_BATCH, "latent": "64x64x4", "tokens": 77, "parameters": model.num_parameters(),
            "attention_chunk_size": 1024}
    return np_forward, torch_forward, info


SD15_BATCH = 2
#: rows too slow for --quick and capped at 3 repeats
SLOW_CASES = ("sd15_unet_forward",)

CASES = {
    "unet_train_step": unet_step_case,
    "vae_train_step": vae_step_case,
    "text_encoder_train_step": text_encoder_step_case,
    "sample_ddim50_cfg": sample_case,
    "sd15_unet_forward": sd15_unet_case,
}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write results here (merged with rows already in the file)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side (best and median kept)")
    parser.add_argument("--only", help="run only rows whose name contains this")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's default malloc thresholds")
    parser.add_argument("--quick", action="store_true",
                        help="2 repeats, 1 thread, no memory, no SD 1.5 row unless --only names it")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.threads, args.no_memory = min(args.repeats, 2), [1], True
    if args.json:
        read_results(args.json)  # an unreadable --json fails now, not after the timing
    malloc = "default" if args.default_malloc or not tune_malloc() else "tuned"
    rows = []
    for name, make in CASES.items():
        if args.only and args.only not in name:
            continue
        if name in SLOW_CASES and args.quick and not args.only:
            continue
        repeats = min(args.repeats, 3) if name in SLOW_CASES else args.repeats
        measure_memory = not args.no_memory and name not in SLOW_CASES  # a forward only: nothing to compare
        with threads(args.threads[0]):
            np_fn, torch_fn, info = make(np.random.default_rng(0))
            memory = {}
            if measure_memory:
                np_fn(), torch_fn()  # warm: optimizer state and caches exist before measuring
                memory = {
                    "numpy_peak_traced_mb": traced_peak_mb(np_fn),
                    "numpy_peak_mb": rss_peak_mb(np_fn),
                    "torch_peak_mb": rss_peak_mb(torch_fn),
                    "memory_threads": args.threads[0],
                }
        for n in args.threads:
            with threads(n):
                timing = best_of_alternating(np_fn, torch_fn, repeats)
            extra = {k: v for k, v in timing.items() if k not in ("numpy_s", "torch_s")}
            if name.startswith("sample"):
                extra["numpy_images_per_s"] = info["batch"] / timing["numpy_s"]
                extra["torch_images_per_s"] = info["batch"] / timing["torch_s"]
            rows.append(row(name, n, timing["numpy_s"], timing["torch_s"], malloc=malloc, timing="best of "
                            f"{repeats}, alternating", **extra, **memory, **info))
        del np_fn, torch_fn
        gc.collect()
    print_table(rows, "training steps: best time, numpy / torch CPU")
    print("  CPU time (best, ms; all threads of the process):")
    for r in rows:
        print(f"  {r['name']:32s} {r['threads']:3d}  numpy {1e3 * r['numpy_cpu_s']:9.1f}  torch "
              f"{1e3 * r['torch_cpu_s']:9.1f}  ratio {r['cpu_ratio']:.2f}")
    for r in rows:
        if r.get("numpy_peak_mb") is not None and r["threads"] == r.get("memory_threads"):
            print(f"  {r['name']:32s} peak MB  numpy {r['numpy_peak_mb']:8.1f} (traced {r['numpy_peak_traced_mb']:.1f})"
                  f"  torch {r['torch_peak_mb']:8.1f}  ratio {r['numpy_peak_mb'] / max(r['torch_peak_mb'], 1e-9):.2f}")
    if args.json:
        write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
