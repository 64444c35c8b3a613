"""How well a generated shape follows its control image: mask IoU, plus colour and shape from the prompt.

A ControlNet on the captioned shapes (:mod:`diffusion_np.data.shapes`, free geometry) is
asked for "a small red circle in the top left" *and* a control image that says exactly
where the circle is and how large. Two questions, two measurements:

1. Does the shape sit where the control says? Intersection over union of two masks::

       IoU = |G and C| / |G or C|

   ``G``: the generated image's foreground, its brightest channel mapped from [-1, 1] to
   [0, 1] at >= 0.5 (the background is black and every colour has a channel at 1, so this
   is the shape's coverage >= 1/2); ``C``: the target, the coverage of the shape drawn with
   the control's geometry at >= 1/2 (for a mask control, the control image itself). A
   one-pixel shift of a disc of radius 4 already costs about 0.25 of IoU, so the number is
   strict about position and size.
2. Does the prompt still decide what is drawn? The shapes analyser
   (:func:`~diffusion_np.metrics.shapes.analyse_shapes`) reads colour and shape back; size
   and position words are only the nearest names of the control's geometry, so they are
   not scored here.

:func:`score_control` also gives the IoU the caption alone could reach: that of the shape
drawn at its caption's named position and size (no jitter) with the control's, the best a
model that ignored the control image and followed the words perfectly would score on average.

Left out on purpose: edge-map agreement (an edge control is scored by the mask of the
geometry it outlines), and any learned detector.
"""

from __future__ import annotations

import numpy as np

from diffusion_np.backend import asnumpy
from diffusion_np.data.shapes import POSITION_XY, SIZE_RADIUS, render_at
from diffusion_np.metrics.shapes import analyse_shapes

__all__ = ["mask_iou", "score_control", "shape_mask"]


def shape_mask(images) -> np.ndarray:
    """The foreground of shapes images (B, H, W, 3) in [-1, 1]: bool (B, H, W), brightest channel >= 1/2."""
    images = asnumpy(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"shape_mask expects images (B, H, W, 3) in [-1, 1], got {images.shape}")
    return (images.max(axis=-1) + 1.0) / 2.0 >= 0.5


def mask_iou(a, b) -> np.ndarray:
    """Intersection over union of boolean masks (B, H, W) -> (B,); two empty masks agree (IoU 1)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"mask_iou expects two (B, H, W) masks of one shape, got {a.shape} and {b.shape}")
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def score_control(images, target_masks, labels) -> dict:
    """Score images generated under control: IoU with the target masks, and colour and shape.

    Parameters
    ----------
    images : (B, H, W, 3) in [-1, 1]
    target_masks : bool (B, H, W): where each shape should be (the control's geometry, coverage >= 1/2)
    labels : int (B, 4): (colour, shape, size, position) of each prompt; size and position are not scored

    Returns
    -------
    dict: ``control_iou`` (mean IoU), ``control_iou_median``, ``control_iou_at_least_0.5`` (share
    of images), ``caption_geometry_iou`` (the caption-only reference of the module docstring),
    ``prompt_accuracy`` (colour and shape both right), ``per_attribute`` ({colour, shape}),
    ``unreadable`` (no object found), ``num_images``.
    """
    images, labels = asnumpy(images), np.asarray(labels)
    target_masks = np.asarray(target_masks, dtype=bool)
    if labels.ndim != 2 or labels.shape[1] != 4 or len(labels) != len(images) or len(target_masks) != len(images):
        raise ValueError(f"got {len(images)} images, {len(target_masks)} target masks and labels of shape "
                         f"{labels.shape}: they must match, with labels (B, 4)")
    iou = mask_iou(shape_mask(images), target_masks)
    read = analyse_shapes(images)
    colour, shape = read[:, 0] == labels[:, 0], read[:, 1] == labels[:, 1]
    return {
        "control_iou": float(iou.mean()),
        "control_iou_median": float(np.median(iou)),
        "control_iou_at_least_0.5": float((iou >= 0.5).mean()),
        "caption_geometry_iou": float(_caption_geometry_iou(labels, target_masks).mean()),
        "prompt_accuracy": float((colour & shape).mean()),
        "per_attribute": {"colour": float(colour.mean()), "shape": float(shape.mean())},
        "unreadable": float(np.all(read == -1, axis=1).mean()),
        "num_images": len(images),
    }


def _caption_geometry_iou(labels, target_masks) -> np.ndarray:
    """IoU of each target with its shape drawn at the caption's named position and size, without jitter."""
    side = target_masks.shape[1]
    scale = side / 32.0
    centre = POSITION_XY[labels[:, 3]] * scale
    radius = np.array(SIZE_RADIUS)[labels[:, 2]] * scale
    return mask_iou(shape_mask(render_at(labels[:, :2], centre, radius, side)), target_masks)
