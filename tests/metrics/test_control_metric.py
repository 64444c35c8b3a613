"""The ControlNet metric: mask IoU with the control's geometry, colour and shape from the prompt."""

import numpy as np
import pytest

from diffusion_np.data.shapes import ControlShapesDataset, control_images, render_at
from diffusion_np.metrics.control import mask_iou, score_control, shape_mask


def _data(n=64, seed=0):
    data = ControlShapesDataset("mask", seed=seed)
    colour_shape, centre, radius = data.sample_geometry(n)
    images = render_at(colour_shape, centre, radius)
    masks = control_images(colour_shape[:, 1], centre, radius)[..., 0] >= 0.5
    _, _, labels, _ = ControlShapesDataset("mask", seed=seed).sample(n)
    return images, masks, labels, (colour_shape, centre, radius)


def test_the_data_itself_scores_perfectly():
    images, masks, labels, _ = _data()
    m = score_control(images, masks, labels)
    assert m["control_iou"] == 1.0 and m["prompt_accuracy"] == 1.0 and m["unreadable"] == 0.0
    assert m["caption_geometry_iou"] < 0.6  # the words alone put the shape somewhere else


def test_a_one_pixel_shift_of_a_disc_costs_about_a_quarter():
    """A disc of radius 4 moved by one pixel: IoU = lens area / union = 0.727 for exact discs."""
    centre = np.array([[16.0, 16.0]])
    disc = shape_mask(render_at(np.array([[0, 0]]), centre, np.array([4.0])))
    moved = shape_mask(render_at(np.array([[0, 0]]), centre + [1.0, 0.0], np.array([4.0])))
    assert abs(float(mask_iou(disc, moved)[0]) - 0.727) < 0.04


def test_wrong_place_colour_and_shape_are_each_counted():
    images, masks, labels, (colour_shape, centre, radius) = _data(n=32)
    moved = render_at(colour_shape, np.clip(centre + 6.0, radius[:, None] + 1, 31 - radius[:, None]), radius)
    assert score_control(moved, masks, labels)["control_iou"] < 0.6
    recoloured = render_at((colour_shape + [1, 0]) % [6, 3], centre, radius)
    m = score_control(recoloured, masks, labels)
    assert m["control_iou"] == 1.0 and m["per_attribute"] == {"colour": 0.0, "shape": 1.0} and m["prompt_accuracy"] == 0
    black = -np.ones_like(images)
    m = score_control(black, masks, labels)
    assert m["control_iou"] == 0.0 and m["unreadable"] == 1.0


def test_iou_edge_cases_and_bad_shapes():
    empty = np.zeros((2, 4, 4), bool)
    np.testing.assert_array_equal(mask_iou(empty, empty), [1.0, 1.0])
    with pytest.raises(ValueError, match="two \\(B, H, W\\) masks"):
        mask_iou(empty, empty[:1])
    with pytest.raises(ValueError, match="shape_mask expects images"):
        shape_mask(np.zeros((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="labels \\(B, 4\\)"):
        score_control(np.zeros((2, 8, 8, 3)), empty[:, :, :], np.zeros((2, 3), int))
