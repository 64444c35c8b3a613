"""Images and masks on disk <-> arrays the pipelines take: PNG in, float32 in [-1, 1] out, and back.

The pipelines work on channels-last float32 arrays scaled to [-1, 1], the range
the diffusion models (and Stable Diffusion's VAE) are trained on::

    x = uint8 / 127.5 - 1          uint8 = round((x + 1) * 127.5), clipped to 0..255

Masks for inpainting are grey-scale images: white (>= 50 % grey) marks the pixels
to repaint (1), black the pixels to keep (0), as in diffusers' inpainting pipelines.

Reading and writing goes through Pillow (a dependency of the package), so any format
Pillow reads works; PNG is the one to write, because it is lossless.

Left out: colour management and ICC profiles, 16-bit images, alpha channels (dropped
on load), and EXIF orientation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffusion_np.backend import asnumpy

#: Pillow's resampling filter for ``size=``: Lanczos (windowed sinc) keeps edges sharp when shrinking
_RESAMPLE = "LANCZOS"


def from_uint8(images) -> np.ndarray:
    """uint8 pixels 0..255 -> float32 in [-1, 1]: x = u / 127.5 - 1 (any shape)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"from_uint8 expects a uint8 array, got {images.dtype}")
    return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """float in [-1, 1] -> uint8 0..255: round((x + 1) * 127.5), values outside the range clipped.

    Takes NumPy or CuPy arrays of any shape; returns a NumPy array on the host.
    """
    images = asnumpy(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"to_uint8 expects floats in [-1, 1], got {images.dtype}")
    if not np.isfinite(images).all():
        raise ValueError("to_uint8: the images hold NaN or Inf")
    return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def load_image(path: str | Path, size: tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """Read an image file as (H, W, channels) float32 in [-1, 1].

    Parameters
    ----------
    path : the file (PNG, JPEG, ... anything Pillow reads).
    size : (height, width) to resize to, in our (H, W) order (Pillow's own order is (W, H));
        None keeps the file's size.
    channels : 3 for RGB (alpha dropped, grey expanded) or 1 for grey-scale.
    """
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"load_image: channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    with Image.open(path) as img:
        img = img.convert("RGB" if channels == 3 else "L")
        if size is not None:
            img = img.resize(_pil_size(size, "load_image"), getattr(Image.Resampling, _RESAMPLE))
        pixels = np.asarray(img, dtype=np.uint8)  # (H, W, 3) or (H, W)
    return from_uint8(pixels.reshape(pixels.shape[0], pixels.shape[1], channels))


def load_mask(path: str | Path, size: tuple[int, int] | None = None, threshold: float = 0.5) -> np.ndarray:
    """Read an inpainting mask as (H, W) float32 with 1 = repaint (white) and 0 = keep (black).

    The file is read as grey-scale in [0, 1] and binarised: ``grey >= threshold`` is 1.
    ``size`` = (height, width) resizes first (nearest neighbour, so the mask stays sharp).
    """
    from PIL import Image

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"load_mask: threshold must lie in (0, 1], got {threshold!r}")
    with Image.open(path) as img:
        img = img.convert("L")
        if size is not None:
            img = img.resize(_pil_size(size, "load_mask"), Image.Resampling.NEAREST)
        grey = np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0  # (H, W) in [0, 1]
    return (grey >= threshold).astype(np.float32)


def load_control_image(path: str | Path) -> np.ndarray:
    """Read a ControlNet control image as (H, W, C) float32 in [0, 1] (not [-1, 1]: diffusers' control
    images are not normalised), at the file's own size and channels: a grey-scale file (modes L, 1, I, F)
    gives C = 1, any other C = 3 (RGB, alpha dropped). The ControlNet checks that C and the size fit it."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if img.mode in ("L", "1", "I", "F", "I;16") else "RGB")
        pixels = np.asarray(img, dtype=np.uint8)  # (H, W) or (H, W, 3)
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return pixels.astype(np.float32) / 255.0


def save_image(path: str | Path, images, ncols: int | None = None) -> Path:
    """Write float images in [-1, 1] to a file (PNG recommended: lossless); returns the path.

    ``images`` is (H, W), (H, W, C) or a batch (B, H, W, C) with C in {1, 3}; a batch
    is written as one grid (see :func:`make_grid`). Values outside [-1, 1] are clipped.
    """
    from PIL import Image

    images = asnumpy(images)
    if images.ndim == 4:
        images = make_grid(images, ncols)
    if images.ndim == 2:
        images = images[:, :, None]
    if images.ndim != 3 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"save_image expects (H, W), (H, W, C) or (B, H, W, C) with C in (1, 3), got {tuple(images.shape)}"
        )
    pixels = to_uint8(images)
    path = Path(path)
    Image.fromarray(pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels).save(path)
    return path


def make_grid(images, ncols: int | None = None, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile a batch (B, H, W, C) into one (rows * (H + p) - p, ncols * (W + p) - p, C) image.

    ``ncols`` defaults to B (one row); cells are separated by ``padding`` pixels of
    ``pad_value`` (1.0 = white in [-1, 1]). Empty cells of the last row are filled with it too.
    A NaN or Inf in ``images`` is refused (it would become an arbitrary pixel).
    """
    images = asnumpy(images)
    if images.ndim != 4:
        raise ValueError(f"make_grid expects images as a batch (B, H, W, C), got shape {tuple(images.shape)}")
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise TypeError(f"make_grid expects images of real numbers, got dtype {images.dtype}")
    B, H, W, C = images.shape
    if B == 0:
        raise ValueError(f"make_grid: images is an empty batch, shape {tuple(images.shape)}")
    if not np.all(np.isfinite(images)):
        raise ValueError("make_grid: images hold NaN or Inf")
    ncols = B if ncols is None else _count(ncols, "ncols", 1)
    padding = _count(padding, "padding", 0)
    nrows = -(-B // ncols)  # ceil(B / ncols)
    cells = np.full((nrows * ncols, H + padding, W + padding, C), pad_value, dtype=images.dtype)
    cells[:B, :H, :W] = images
    # (rows, cols, H + p, W + p, C) -> (rows, H + p, cols, W + p, C) -> one image
    grid = cells.reshape(nrows, ncols, H + padding, W + padding, C).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(nrows * (H + padding), ncols * (W + padding), C)
    return grid[: grid.shape[0] - padding, : grid.shape[1] - padding]


def _count(value, name: str, minimum: int) -> int:
    """An int >= ``minimum`` for make_grid's ``ncols`` / ``padding``; TypeError or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"make_grid: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"make_grid: {name} must be >= {minimum}, got {value}")
    return int(value)


def _pil_size(size, where: str) -> tuple[int, int]:
    """Our (height, width) -> Pillow's (width, height), checked."""
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in size)
    ):
        raise ValueError(f"{where}: size must be (height, width) of positive ints, got {size!r}")
    return int(size[1]), int(size[0])
