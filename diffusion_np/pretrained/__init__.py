"""Weights trained by this project and shipped inside the package.

Seven results, each trained with the project's own ``diffusion-np train`` (or ``finetune``, ``distill``) commands and
exported with ``diffusion-np export`` (EMA weights, float16, no training state):

    pretrained:digits              text-conditioned pixel-space U-Net on 8x8 digits ("the digit seven")
    pretrained:shapes              latent text-to-image on 32x32 shapes: VAE + U-Net + text encoder
    pretrained:shapes-controlnet   a ControlNet for pretrained:shapes: a 32x32 mask places the shape
                                   (the ControlNet only; pretrained:shapes loads with it)
    pretrained:shapes-lora-star    LoRA adapters and the new word "star" for pretrained:shapes
                                   (``diffusion-np finetune lora``; ``--lora pretrained:shapes-lora-star``)
    pretrained:shapes-embedding-orange   the learned embedding of the new word "orange"
                                   (``diffusion-np finetune textual-inversion``; ``--embedding ...``)
    pretrained:shapes-lcm          pretrained:shapes distilled to 1-8 steps (latent consistency distillation,
                                   ``diffusion-np distill lcm``): sample with ``--sampler lcm --steps 4``
    pretrained:digits-lcm          pretrained:digits distilled the same way (a shorter run)

Wherever a checkpoint directory is accepted (``diffusion-np sample --checkpoint``,
``diffusion-np evaluate --checkpoint``, :func:`~diffusion_np.io.load_checkpoint`,
:meth:`~diffusion_np.training.model.TextToImageModel.load` for the first two), the name
``pretrained:NAME`` stands for the shipped directory. Each directory has a model card,
``MODEL_CARD.md``, with the training command, the number of steps, the time it took and
the measured metrics.
"""

from __future__ import annotations

# The names live beside the checkpoint loader that resolves them (no import cycle between the two).
from diffusion_np.io.checkpoint import PRETRAINED, pretrained_path, resolve_checkpoint
from diffusion_np.io.checkpoint import PRETRAINED_PREFIX as PREFIX

__all__ = ["PREFIX", "PRETRAINED", "pretrained_path", "resolve_checkpoint"]
