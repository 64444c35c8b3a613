"""What the latent tasks need from a trained VAE: reconstructions, their error, the latent scale, loading.

* :func:`reconstruct` and :func:`vae_reconstruction_mse`: ``decode(mode of q(z | x))``
  and its mean squared error on shapes the training split never shows, the number a
  ``shapes-vae`` run is judged by.
* :func:`latent_scaling_factor`: Rombach et al. (Sec. 4.3.2 and Appendix D.1: "we rescale
  the latents by the component-wise standard deviation" estimated on a batch, which gave
  SD's 0.18215), computed as 1 / std of sampled latents of 256 training images. The
  ``shapes`` config computes it once, when it is made, and stores it (and in the VAE's
  config), so checkpoints and resumes use the same value.
* :func:`load_vae`: the VAE of a ``shapes-vae`` run or the frozen one inside a ``shapes``
  checkpoint.

Left out: perceptual (LPIPS) or adversarial reconstruction measures.
"""

from __future__ import annotations

import numpy as np

from diffusion_np.backend import asnumpy, device_of, to_device
from diffusion_np.data.shapes import ShapesDataset
from diffusion_np.io.checkpoint import CheckpointError, load_checkpoint
from diffusion_np.models.vae import AutoencoderKL
from diffusion_np.training.trainer import task_from_checkpoint

__all__ = ["latent_scaling_factor", "load_vae", "reconstruct", "vae_reconstruction_mse"]


def reconstruct(vae: AutoencoderKL, images, batch: int = 64) -> np.ndarray:
    """``decode(mode of q(z | x))`` of host images (N, H, W, 3), in chunks; host float32 out."""
    device = device_of(vae.quant_conv.weight)
    out = []
    for i in range(0, len(images), batch):
        x = to_device(np.ascontiguousarray(images[i:i + batch]), device)
        out.append(asnumpy(vae.decode(vae.encode(x).mode())))
    return np.concatenate(out).astype(np.float32)


def vae_reconstruction_mse(vae: AutoencoderKL, n: int = 256, split: str = "heldout", seed: int = 12345) -> float:
    """Mean squared error (per value, images in [-1, 1]) between ``n`` shapes of ``split`` and
    their reconstructions through the posterior mode.

    ``split="heldout"`` draws the 18 combinations the training split never shows; any
    split with a ``seed`` other than the training one gives images never seen in training.
    """
    images, _, _ = ShapesDataset(split, seed=seed).sample(n)
    return float(np.mean((reconstruct(vae, images) - images) ** 2))


def latent_scaling_factor(vae: AutoencoderKL, n: int = 256, seed: int = 0) -> tuple[float, float]:
    """(1 / std, std) of sampled latents z ~ q(z | x) of ``n`` training shapes.

    As Rombach et al. (Sec. 4.3.2, Appendix D.1) set SD's 0.18215: the standard
    deviation over every entry of a batch of unscaled latents, inverted, so the diffusion
    model sees latents of about unit variance. ``seed`` fixes the images and the posterior noise.
    """
    rng = np.random.default_rng(seed)
    images, _, _ = ShapesDataset("train", seed=seed).sample(n)
    device = device_of(vae.quant_conv.weight)
    latents = []
    for i in range(0, n, 64):
        posterior = vae.encode(to_device(images[i:i + 64], device))
        latents.append(asnumpy(posterior.sample(rng)))
    std = float(np.concatenate(latents).astype(np.float64).std())
    return 1.0 / std, std


def load_vae(path) -> AutoencoderKL:
    """The VAE of a ``shapes-vae`` run (its EMA weights), or the frozen VAE inside a ``shapes``
    checkpoint such as ``"pretrained:shapes"``; ``path`` may be a run directory or its ``checkpoint/``."""
    checkpoint = load_checkpoint(path)
    task = checkpoint.config.get("task")
    if task not in ("shapes-vae", "shapes"):
        raise CheckpointError(f"{path} holds no shapes VAE (its task is {task!r}, not shapes-vae or shapes)")
    model = task_from_checkpoint(checkpoint).model
    return model if task == "shapes-vae" else model.vae
