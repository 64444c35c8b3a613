"""Prompt accuracy for the captioned shapes: read colour, shape, size and position back from an image.

A generated image is scored the way GenEval scores a text-to-image model (Ghosh et
al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment"): a detector reads the attributes from the picture, and an image counts
as correct only when *every* attribute of its prompt is right. Our "detector" is a
few lines of deterministic image statistics, exact on the data of
:mod:`diffusion_np.data.shapes`, so no trained classifier can drift or be fooled:

1. Foreground weight ``w`` in [0, 1]: the brightest channel of the image mapped
   from [-1, 1] to [0, 1] (the background is black, and every colour has a channel
   at 1), with weights below 0.4 set to 0 so that noise on the background counts
   for nothing (Gaussian noise of std 0.15 on every pixel leaves the accuracy at 100%).
2. Profiles: ``p_x = max over rows of w`` and ``p_y = max over columns of w``. Their
   sums are the object's width and height (the sides of its bounding box, read
   with sub-pixel precision from the anti-aliased edges) and their centres of mass
   the centre of that box.
3. colour = the nearest of the seven colours (the six of the base data and orange,
   :data:`~diffusion_np.data.shapes.CONCEPT_COLOURS`) to the ``w``-weighted mean RGB, after
   dividing it by its largest channel (so a dim red is still red).
4. shape from two normalised central moments of ``w`` (Hu 1962), both free of
   position and scale; with (dx, dy) the offset of a pixel from the centre of mass
   and mu_pq the ``w``-weighted mean of dx^p dy^q:

   * skewness of y, mu_03 / mu_02^(3/2): an upward triangle has its mass at its
     base, with the skewness of a triangular density, -2 sqrt(2) / 5 = -0.57;
     circles and squares are symmetric, 0. Below -0.25: triangle.
   * corners, mu_22 / (mu_20 mu_02): a square's dx and dy are independent, so 1;
     a disc is wide at mid-height and narrow at top and bottom, so dx^2 and dy^2
     are anti-correlated, 2/3. Below 0.86: circle, above: square.

   On the data (20000 images) the triangles' skewness lies in [-0.77, -0.40] and
   the others' in [-0.13, 0.13]; the corners of circles in [0.56, 0.80], of squares
   in [0.98, 1.08] (small shapes spread most: a 6-pixel disc is blocky).

   The star (the shape added for personalisation) is told apart by two more numbers:

   * compactness, area / (2 pi (mu_20 + mu_02)): 1 for a disc (the most compact shape
     has the least second moment for its area), 3/pi = 0.95 for a square, 0.70..0.88
     for the star, whose points carry mass far from the centre.
   * fill ratio, area / (width x height) of the box: 1 (square), pi/4 (circle),
     0.46..0.82 for the star (a small one is blocky).

   Star: compactness below 0.9 and fill below 0.83, unless the skewness says triangle
   (below -0.4; a small star's lies in [-0.43, 0.35] because its two lower points are
   often drawn fatter than the top one). On 20000 clean renders of all four shapes
   this reads circles, squares and triangles as before (100%) and 99.9% of stars
   (the rest are small stars read as triangles); with noise of std 0.15, 99.2% of
   triangles and 99.9% of stars.
   (The fill ratio area / box area, 1, pi/4 and 1/2, is the intuitive feature, but
   noise on the background inflates the box and blurs circle vs square.)
5. size from the half-width (width + height) / 4 of the box, read at weight 0.4:
   small objects give 2.3..3.6 pixels, large ones 4.4..6.1 (at 32 x 32); the
   threshold is 4.0.
6. position = the nearest of the five box centres of the data (8 pixels of margin).

Garbage is labelled -1 ("none"), which never equals a true label, so it counts as
wrong: an image with non-finite values, with (almost) no foreground, or with more
foreground than any object has (noise) gets -1 in every column; an attribute whose
statistic lies outside the range any real object gives (a colour far from all six,
a fill ratio or size no shape has, a box centre far from every position) gets -1 in
its column.

:func:`score_shapes` sums this up for a set of images: the share right in every
attribute and in each, on seen and on held-out prompts, and the share unreadable.

Left out on purpose: several objects per image (the data has one), and any learned
component.
"""

from __future__ import annotations

import numpy as np

from diffusion_np.backend import asnumpy, get_xp
from diffusion_np.data.shapes import COLOUR_RGB, LABEL_COLUMNS, POSITION_XY, parse_caption

#: label value meaning "could not be read"
NONE = -1

# foreground weights below this are background (noise, the faint outer rim of anti-aliasing);
# 0.4 measured best: 0.35 lets more noise in, 0.5 drops too much of small shapes' anti-aliased rim
_FOREGROUND = 0.4
# an object's area (sum of w) in pixels at 32 x 32: a small triangle has >= 13, a large square <= 12.1^2 = 146
_MIN_AREA, _MAX_AREA = 6.0, 300.0
# shape thresholds, from the values of the data (module docstring) with margins on both sides
_TRIANGLE_SKEW, _MIN_SKEW, _MAX_SKEW = -0.25, -1.2, 0.4
# the star: compactness and fill ratio below these, and a skewness above _STAR_SKEW (measured in the docstring)
_STAR_COMPACTNESS, _STAR_FILL, _STAR_SKEW = 0.9, 0.83, -0.4
_CIRCLE_SQUARE, _MIN_CORNERS, _MAX_CORNERS = 0.86, 0.4, 1.4
# half-width of the box read at weight 0.4, pixels at 32 x 32: small <= 3.6, large >= 4.4 (see above)
_SMALL_LARGE = 4.0
_MIN_HALF_WIDTH, _MAX_HALF_WIDTH = 1.5, 9.0
# box centres lie within 1.5 * sqrt(2) = 2.1 pixels of their position; the positions are 11.3 apart
_MAX_POSITION_DISTANCE = 5.0
# the normalised colour of real data is exactly a palette colour; palette colours are 1 apart
_MAX_COLOUR_DISTANCE = 0.5


def analyse_shapes(images) -> np.ndarray:
    """Read (colour, shape, size, position) from each image (see the module docstring).

    Parameters
    ----------
    images : (B, H, W, 3) float array in [-1, 1], NumPy or CuPy, H = W (32 for the
        default data; the geometry scales with H / 32).

    Returns
    -------
    labels : int64 NumPy array (B, 4), columns (colour, shape, size, position) as in
        :mod:`diffusion_np.data.shapes` (colour 6 is orange, shape 3 the star: the new
        concepts); -1 where an attribute could not be read.
    """
    xp = get_xp(images)
    if not hasattr(images, "ndim") or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", type(images).__name__)
        raise ValueError(f"analyse_shapes expects images of shape (B, H, W, 3) (channels last), got {shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"analyse_shapes expects float images in [-1, 1], got dtype {images.dtype}")
    B, H, W, _ = images.shape
    if H != W:
        raise ValueError(f"analyse_shapes expects square images, got H={H}, W={W}")
    scale = H / 32.0
    finite = xp.isfinite(images).all(axis=(1, 2, 3))  # (B,)
    rgb = xp.clip((xp.nan_to_num(images.astype(xp.float32)) + 1.0) / 2.0, 0.0, 1.0)  # (B, H, W, 3) in [0, 1]

    # 1. foreground weight (B, H, W)
    w = rgb.max(axis=3)
    w = xp.where(w >= _FOREGROUND, w, 0.0)
    area = w.sum(axis=(1, 2))  # (B,)
    found = finite & (area >= _MIN_AREA * scale**2) & (area <= _MAX_AREA * scale**2)
    safe_area = xp.maximum(area, 1e-6)  # blank images: no 0 / 0

    # 2. profiles of the bounding box: (B, W) and (B, H)
    p_x = w.max(axis=1)
    p_y = w.max(axis=2)
    width, height = p_x.sum(axis=1), p_y.sum(axis=1)  # (B,)
    centres = xp.arange(H, dtype=xp.float32) + 0.5  # pixel centres, H == W
    box_x = (p_x * centres).sum(axis=1) / xp.maximum(width, 1e-6)
    box_y = (p_y * centres).sum(axis=1) / xp.maximum(height, 1e-6)

    # 3. colour: weighted mean RGB (B, 3), scaled so its largest channel is 1, nearest palette colour
    mean_rgb = (rgb * w[..., None]).sum(axis=(1, 2)) / safe_area[:, None]
    mean_rgb = mean_rgb / xp.maximum(mean_rgb.max(axis=1, keepdims=True), 1e-6)
    palette = xp.asarray(COLOUR_RGB)  # (7, 3): the six base colours, then orange
    colour_dist = xp.sqrt(((mean_rgb[:, None, :] - palette[None, :, :]) ** 2).sum(axis=2))  # (B, 7)
    colour = xp.where(colour_dist.min(axis=1) <= _MAX_COLOUR_DISTANCE, colour_dist.argmin(axis=1), NONE)

    # 4. shape from two moments of the foreground (pixel offsets from its centre of mass)
    #    skewness of y: mu_03 / mu_02^1.5; a triangle has its mass at the base (-0.57), circles and squares 0
    #    corners: mu_22 / (mu_20 mu_02); a square's x and y are independent (1), a disc's are not (2/3)
    mass_x = (w.sum(axis=1) * centres).sum(axis=1) / safe_area  # (B,)
    mass_y = (w.sum(axis=2) * centres).sum(axis=1) / safe_area
    dx = centres[None, None, :] - mass_x[:, None, None]  # (B, 1, W)
    dy = centres[None, :, None] - mass_y[:, None, None]  # (B, H, 1)
    mu_20 = (w * dx**2).sum(axis=(1, 2)) / safe_area
    mu_02 = (w * dy**2).sum(axis=(1, 2)) / safe_area
    mu_22 = (w * dx**2 * dy**2).sum(axis=(1, 2)) / safe_area
    mu_03 = (w * dy**3).sum(axis=(1, 2)) / safe_area
    skew_y = mu_03 / xp.maximum(mu_02, 1e-6) ** 1.5
    corners = mu_22 / xp.maximum(mu_20 * mu_02, 1e-6)
    shape = xp.where(skew_y < _TRIANGLE_SKEW, 2, xp.where(corners < _CIRCLE_SQUARE, 0, 1))  # triangle, circle, square
    #    the star: less compact than a disc or a square, fills less of its box, not skewed like a triangle
    compactness = area / xp.maximum(2 * np.pi * (mu_20 + mu_02), 1e-6)
    fill = area / xp.maximum(width * height, 1e-6)
    star = (compactness < _STAR_COMPACTNESS) & (fill < _STAR_FILL) & ((shape != 2) | (skew_y > _STAR_SKEW))
    shape = xp.where(star, 3, shape)
    plausible = (skew_y > _MIN_SKEW) & (skew_y < _MAX_SKEW) & (corners > _MIN_CORNERS) & (corners < _MAX_CORNERS)
    shape = xp.where(plausible, shape, NONE)

    # 5. size from the half-width of the box
    half_width = (width + height) / 4.0 / scale
    size = xp.where(half_width < _SMALL_LARGE, 0, 1)
    size = xp.where((half_width >= _MIN_HALF_WIDTH) & (half_width <= _MAX_HALF_WIDTH), size, NONE)

    # 6. position: nearest box centre of the data
    anchors = xp.asarray(POSITION_XY * scale, dtype=xp.float32)  # (5, 2) as (x, y)
    offset = xp.stack([box_x, box_y], axis=1)[:, None, :] - anchors[None, :, :]  # (B, 5, 2)
    position_dist = xp.sqrt((offset**2).sum(axis=2))  # (B, 5)
    position = xp.where(position_dist.min(axis=1) <= _MAX_POSITION_DISTANCE * scale, position_dist.argmin(axis=1), NONE)

    labels = xp.stack([colour, shape, size, position], axis=1).astype(xp.int64)  # (B, 4)
    labels = xp.where(found[:, None], labels, NONE)
    return asnumpy(labels)


def prompt_accuracy(images, labels) -> dict:
    """GenEval-style accuracy of images against the labels of their prompts.

    Parameters
    ----------
    images : (B, H, W, 3) float array in [-1, 1]
    labels : (B, 4) int array, the (colour, shape, size, position) each image was asked for
        (``diffusion_np.data.shapes.parse_caption(prompts)`` turns prompts into labels).

    Returns
    -------
    {"per_attribute": {"colour": a, "shape": a, "size": a, "position": a}, "all": a}
        each a fraction in [0, 1]; "all" counts images with every attribute right.
    """
    labels = np.asarray(asnumpy(labels))
    if labels.ndim != 2 or labels.shape[1] != 4:
        raise ValueError(f"labels must be (B, 4) (colour, shape, size, position), got {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} label rows")
    correct = analyse_shapes(images) == labels  # (B, 4) bool
    return {
        "per_attribute": {name: float(correct[:, j].mean()) for j, name in enumerate(LABEL_COLUMNS)},
        "all": float(correct.all(axis=1).mean()),
    }


def score_shapes(images, prompts: list[str], heldout_images=None, heldout_prompts: list[str] | None = None) -> dict:
    """Prompt accuracy of shapes images on seen prompts and, if given, on held-out ones.

    Returns
    -------
    dict with ``prompt_accuracy_all`` and ``per_attribute`` ({colour, shape, size,
    position}) of the seen prompts, ``heldout_prompt_accuracy_all`` and
    ``heldout_per_attribute`` (None without held-out images), ``distinct_prompts``
    and ``heldout_distinct_prompts``, and ``unreadable``: the share of all images
    the reader could not read at all (no object found).
    """
    seen = prompt_accuracy(images, parse_caption(list(prompts)))
    unreadable = [np.all(analyse_shapes(images) == -1, axis=1)]
    held = None
    if heldout_images is not None and len(heldout_images):
        held = prompt_accuracy(heldout_images, parse_caption(list(heldout_prompts)))
        unreadable.append(np.all(analyse_shapes(heldout_images) == -1, axis=1))
    return {
        "prompt_accuracy_all": seen["all"],
        "per_attribute": seen["per_attribute"],
        "heldout_prompt_accuracy_all": None if held is None else held["all"],
        "heldout_per_attribute": None if held is None else held["per_attribute"],
        "distinct_prompts": len(set(prompts)),
        "heldout_distinct_prompts": 0 if held is None else len(set(heldout_prompts)),
        "unreadable": float(np.concatenate(unreadable).mean()),
    }
