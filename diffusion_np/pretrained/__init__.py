"""Weights trained by this project and shipped inside the package.

Two models, each trained with the project's own ``diffusion-np train`` commands and
exported with ``diffusion-np export`` (EMA weights, float16, no training state):

    pretrained:digits   text-conditioned pixel-space U-Net on 8x8 digits ("the digit seven")
    pretrained:shapes   latent text-to-image on 32x32 shapes: VAE + U-Net + text encoder

Wherever a checkpoint directory is accepted (``diffusion-np sample --checkpoint``,
``diffusion-np evaluate --checkpoint``, :func:`~diffusion_np.io.load_checkpoint`,
:meth:`~diffusion_np.training.text_to_image.TextToImageModel.load`), the name
``pretrained:NAME`` stands for the shipped directory. Each directory has a model card,
``MODEL_CARD.md``, with the training command, the number of steps, the time it took and
the measured metrics.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PREFIX", "PRETRAINED", "pretrained_path", "resolve_checkpoint"]

#: what a checkpoint argument starts with to name shipped weights
PREFIX = "pretrained:"
#: name -> one line on what it is
PRETRAINED = {
    "digits": "text-conditioned U-Net on 8x8 digits, pixel space",
    "shapes": "latent text-to-image on 32x32 shapes (VAE + U-Net + text encoder)",
}
_ROOT = Path(__file__).resolve().parent


def pretrained_path(name: str) -> Path:
    """The directory of shipped model ``name`` (a key of :data:`PRETRAINED`)."""
    from diffusion_np.io.checkpoint import CheckpointError

    if name not in PRETRAINED:
        raise CheckpointError(f"no pretrained model {name!r}; the shipped ones are "
                              + ", ".join(PREFIX + n for n in PRETRAINED))
    path = _ROOT / name
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{PREFIX}{name}: the weights are missing from {path} (this copy of diffusion_np "
                              "was installed without its package data; reinstall it from the repository)")
    return path


def resolve_checkpoint(spec) -> Path:
    """The checkpoint directory that ``spec`` names.

    ``"pretrained:NAME"`` -> the shipped weights; a run directory of ``diffusion-np train``
    (one holding ``checkpoint/``) -> its latest checkpoint; anything else -> ``Path(spec)``
    unchanged (:func:`~diffusion_np.io.load_checkpoint` says what is wrong with it, if anything).
    """
    text = str(spec)
    if text.startswith(PREFIX):
        return pretrained_path(text[len(PREFIX):])
    path = Path(spec)
    if (path / "checkpoint").is_dir() and not (path / "config.json").exists():
        return path / "checkpoint"
    return path
