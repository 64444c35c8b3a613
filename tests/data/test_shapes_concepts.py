"""The new concepts for personalisation: the star and orange, drawn, captioned and split."""

import numpy as np
import pytest

from diffusion_np.data.shapes import (
    COLOUR_RGB,
    CONCEPT_COLOURS,
    CONCEPT_SHAPES,
    CONCEPTS,
    POSITIONS,
    SIZES,
    all_prompts,
    caption,
    concept_images,
    concept_split,
    is_heldout,
    parse_caption,
    render,
    star_vertices,
)


def test_new_concepts_come_after_the_base_values():
    assert CONCEPT_SHAPES[:3] == ("circle", "square", "triangle") and CONCEPT_SHAPES[3] == "star"
    assert CONCEPT_COLOURS[6] == "orange" and COLOUR_RGB.shape == (7, 3)
    np.testing.assert_array_equal(COLOUR_RGB[6], [1.0, 0.5, 0.0])
    prompts = all_prompts("all")  # the 180 base prompts never name a new concept
    assert len(prompts) == 180 and not any("star" in p or "orange" in p for p in prompts)


def test_captions_round_trip_with_the_new_words():
    rows = np.array([[6, 3, 1, 4], [0, 3, 0, 0], [6, 1, 0, 2]])
    assert caption(rows) == ["a large orange star in the center", "a small red star in the top left",
                             "a small orange square in the bottom left"]
    np.testing.assert_array_equal(parse_caption(caption(rows)), rows)
    assert not is_heldout(rows).any()  # not among the 180: never held out


def test_star_geometry_fills_its_box():
    xs, ys = star_vertices(16.0, 16.0, 5.0)
    assert xs.shape == (10,)
    np.testing.assert_allclose([xs.min(), xs.max()], [11.0, 21.0], atol=1e-9)  # 2r wide
    np.testing.assert_allclose((ys.min() + ys.max()) / 2, 16.0, atol=1e-9)  # centred vertically
    assert ys.argmin() == 0  # a point at the top (y points down)
    image = render(np.array([[0, 3, 1, 4]]), 0)[0]
    coverage = (image[..., 0] + 1) / 2
    assert 0.25 < coverage.sum() / (2 * 5.5) ** 2 < 0.5  # less of its box than a triangle (1/2) or circle


@pytest.mark.parametrize("concept", list(CONCEPTS))
def test_concept_split_shown_and_unseen_are_disjoint(concept):
    shown, unseen = concept_split(concept)
    column, value = CONCEPTS[concept]
    j = ("colour", "shape", "size", "position").index(column)
    assert shown.shape == (8, 4) and (shown[:, j] == value).all() and (unseen[:, j] == value).all()
    assert not {tuple(r) for r in shown.tolist()} & {tuple(r) for r in unseen.tolist()}
    assert len(unseen) == (52 if concept == "star" else 22)
    other = 0 if concept == "star" else 1  # the other new attribute keeps base values: no orange star
    assert (unseen[:, other] < (6, 3)[other]).all() and (shown[:, other] < (6, 3)[other]).all()
    assert set(shown[:, 2].tolist()) == set(range(len(SIZES)))
    assert set(shown[:, 3].tolist()) == set(range(len(POSITIONS)))


def test_concept_images():
    images, captions, labels = concept_images("star", n=8, seed=0)
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(parse_caption(captions), labels)
    np.testing.assert_array_equal(labels, concept_split("star")[0])
    images12, _, labels12 = concept_images("orange", n=12)
    assert len(images12) == 12 and (labels12[:, 0] == 6).all()
    for bad in (3, 17, 2.0):
        with pytest.raises(ValueError, match="n must be an integer from 4 to 16"):
            concept_images("star", n=bad)
    with pytest.raises(ValueError, match="concept must be one of"):
        concept_split("heart")
