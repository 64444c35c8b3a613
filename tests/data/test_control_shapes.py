"""Free geometry and control images of the shapes data (ControlNet's training data)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from diffusion_np.data.shapes import (
    FREE_MARGIN,
    FREE_RADIUS,
    POSITION_JITTER,
    POSITION_XY,
    SIZE_JITTER,
    SIZE_RADIUS,
    ControlShapesDataset,
    control_images,
    nearest_labels,
    parse_caption,
    render,
    render_at,
    sample_free_geometry,
)


def test_geometry_goes_beyond_the_named_sizes_and_positions_and_stays_inside():
    centre, radius = sample_free_geometry(4000, 0)
    assert radius.min() < SIZE_RADIUS[0] * 0.9 and radius.max() > SIZE_RADIUS[1] * 1.1  # beyond both named sizes
    assert FREE_RADIUS[0] <= radius.min() and radius.max() <= FREE_RADIUS[1]
    assert (centre - radius[:, None] >= FREE_MARGIN).all() and (centre + radius[:, None] <= 32 - FREE_MARGIN).all()
    far = np.linalg.norm(centre[:, None] - POSITION_XY[None], axis=2).min(axis=1)  # distance to the nearest named spot
    assert far.max() > 5.0  # many boxes sit far from every position a caption can name


def test_render_is_render_at_its_jittered_geometry():
    """render() draws a jitter and a size factor, then draws the shape: render_at() at that geometry."""
    labels = np.array([[0, 0, 0, 0], [3, 2, 1, 4], [5, 1, 1, 2]])
    rng = np.random.default_rng(5)  # the draws of render(labels, 5), in its order
    centre = POSITION_XY[labels[:, 3]] + rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=(3, 2))
    radius = np.array(SIZE_RADIUS)[labels[:, 2]] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER, size=3)
    np.testing.assert_array_equal(render(labels, 5), render_at(labels[:, :2], centre, radius))


@given(st.integers(0, 2**31 - 1))
def test_masks_are_the_images_coverage_and_edges_outline_them(seed):
    images, captions, labels, masks = ControlShapesDataset("mask", seed=seed).sample(6)
    assert masks.shape == (6, 32, 32, 1) and masks.dtype == np.float32 and 0 <= masks.min() and masks.max() <= 1
    np.testing.assert_allclose((images.max(axis=-1) + 1) / 2, masks[..., 0], atol=1e-6)  # the brightest channel
    np.testing.assert_array_equal(parse_caption(captions), labels)
    _, _, _, edges = ControlShapesDataset("edges", seed=seed).sample(6)  # the same draws, as an outline
    inside = masks[..., 0] == 1.0
    interior = inside & np.roll(inside, 1, 1) & np.roll(inside, -1, 1) & np.roll(inside, 1, 2) & np.roll(inside, -1, 2)
    assert not edges[..., 0][interior].any() and not edges[..., 0][masks[..., 0] == 0.0].max() > 0.5
    assert (edges[..., 0] > 0.5).sum() > 0.5 * ((masks[..., 0] > 0) & ~interior).sum()  # the boundary is drawn


def test_captions_name_the_nearest_size_and_position():
    colour_shape = np.array([[1, 0], [2, 1], [4, 2]])
    centre = np.array([[9.0, 10.0], [17.0, 14.0], [26.0, 20.0]])
    radius = np.array([2.6, 4.5, 7.9])
    labels = nearest_labels(colour_shape, centre, radius)
    np.testing.assert_array_equal(labels, [[1, 0, 0, 0], [2, 1, 1, 4], [4, 2, 1, 3]])
    np.testing.assert_array_equal(nearest_labels(colour_shape, 2 * centre, 2 * radius, image_size=64), labels)


def test_same_seed_same_draws_and_sample_geometry_matches_sample():
    a = ControlShapesDataset("edges", seed=3).sample(5)
    b = ControlShapesDataset("edges", seed=3).sample(5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    colour_shape, centre, radius = ControlShapesDataset("edges").sample_geometry(5, 3)
    np.testing.assert_array_equal(control_images(colour_shape[:, 1], centre, radius, "edges"),
                                  ControlShapesDataset("edges").sample(5, 3)[3])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind must be one of"):
        ControlShapesDataset("depth")
    with pytest.raises(ValueError, match="kind must be one of"):
        control_images(np.array([0]), np.array([[16.0, 16.0]]), np.array([4.0]), "pose")
    with pytest.raises(ValueError, match=r"centre must be \(2, 2\)"):
        render_at(np.array([[0, 0], [1, 1]]), np.zeros((3, 2)), np.ones(2))
    with pytest.raises(ValueError, match="colour_shape out of range"):
        render_at(np.array([[6, 0]]), np.zeros((1, 2)), np.ones(1))
    with pytest.raises(ValueError, match="radius must be > 0"):
        render_at(np.array([[0, 0]]), np.zeros((1, 2)), np.zeros(1))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        sample_free_geometry(0)
