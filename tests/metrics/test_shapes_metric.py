import numpy as np
import pytest

from diffusion_np.backend import gpu_available
from diffusion_np.data.shapes import ShapesDataset, parse_caption
from diffusion_np.metrics.shapes import NONE, analyse_shapes, prompt_accuracy

ATTRIBUTES = ("colour", "shape", "size", "position")


@pytest.mark.parametrize("split", ["train", "heldout", "all"])
def test_analyser_reads_the_data(split):
    images, captions, labels = ShapesDataset(split, seed=7).sample(2000)
    acc = prompt_accuracy(images, parse_caption(captions))
    assert set(acc["per_attribute"]) == set(ATTRIBUTES)
    for name, value in acc["per_attribute"].items():
        assert value >= 0.99, (name, value)
    assert acc["all"] >= 0.99
    np.testing.assert_array_equal(analyse_shapes(images[:50]), labels[:50])  # exact on clean data


def test_analyser_tolerates_background_noise():
    images, _, labels = ShapesDataset("all", seed=8).sample(1000)
    noisy = np.clip(images + 0.1 * np.random.default_rng(0).standard_normal(images.shape), -1.0, 1.0)
    acc = prompt_accuracy(noisy.astype(np.float32), labels)
    assert min(acc["per_attribute"].values()) >= 0.99, acc


def test_analyser_other_image_size_and_float64():
    images, _, labels = ShapesDataset("all", seed=9, image_size=64).sample(300)
    np.testing.assert_array_equal(analyse_shapes(images.astype(np.float64)), labels)


def test_each_attribute_can_be_wrong():
    # swap a label: exactly that attribute's accuracy drops
    images, _, labels = ShapesDataset("all", seed=2).sample(200)
    for j, name in enumerate(ATTRIBUTES):
        wrong = labels.copy()
        wrong[:, j] = (wrong[:, j] + 1) % (labels[:, j].max() + 1)
        acc = prompt_accuracy(images, wrong)
        assert acc["per_attribute"][name] == 0.0 and acc["all"] == 0.0
        assert all(acc["per_attribute"][other] == 1.0 for other in ATTRIBUTES if other != name)


def _garbage():
    rng = np.random.default_rng(0)
    shape = (3, 32, 32, 3)
    blob = -np.ones(shape, np.float32)
    blob[:, 10:20, 10:20] = 1.0  # a white square: no palette colour
    dot = -np.ones(shape, np.float32)
    dot[:, 5, 5, 0] = 1.0  # one red pixel: too small to be an object
    return {
        "blank": -np.ones(shape, np.float32),
        "grey": np.zeros(shape, np.float32),
        "white": np.ones(shape, np.float32),
        "uniform noise": rng.uniform(-1, 1, shape).astype(np.float32),
        "gaussian noise": rng.standard_normal(shape).astype(np.float32),
        "nan": np.full(shape, np.nan, np.float32),
        "inf": np.full(shape, np.inf, np.float32),
        "white blob": blob,
        "one pixel": dot,
    }


@pytest.mark.parametrize("kind", list(_garbage()))
def test_garbage_images_read_as_none_and_count_wrong(kind):
    images = _garbage()[kind]
    with np.errstate(all="raise"):  # no division by zero or invalid values on the way
        labels = analyse_shapes(images)
    assert labels.shape == (3, 4) and labels.dtype == np.int64
    if kind == "white blob":
        assert np.all(labels[:, 0] == NONE)  # shape, size and position are still readable
    else:
        assert np.all(labels == NONE)
    acc = prompt_accuracy(images, np.zeros((3, 4), np.int64))
    assert acc["all"] == 0.0


def test_nan_in_one_image_leaves_the_others():
    images, _, labels = ShapesDataset("all", seed=3).sample(4)
    images[1, 3, 3, 0] = np.nan
    got = analyse_shapes(images)
    assert np.all(got[1] == NONE)
    np.testing.assert_array_equal(got[[0, 2, 3]], labels[[0, 2, 3]])


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        analyse_shapes(np.zeros((2, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        analyse_shapes(np.zeros((2, 32, 32, 1), np.float32))
    with pytest.raises(TypeError, match="float"):
        analyse_shapes(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="square"):
        analyse_shapes(np.zeros((2, 32, 16, 3), np.float32))
    images, _, labels = ShapesDataset("all", seed=0).sample(4)
    with pytest.raises(ValueError, match="4 images but 3"):
        prompt_accuracy(images, labels[:3])
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        prompt_accuracy(images, labels[:, :3])


@pytest.mark.gpu
def test_cupy_matches_numpy():
    assert gpu_available()
    import cupy

    images, _, labels = ShapesDataset("all", seed=5).sample(500)
    images = np.clip(images + 0.1 * np.random.default_rng(0).standard_normal(images.shape), -1, 1).astype(np.float32)
    np.testing.assert_array_equal(analyse_shapes(cupy.asarray(images)), analyse_shapes(images))


def test_analyser_reads_the_new_concepts_oracle():
    # every combination of the star and of orange (new with base values, and both new), clean renders
    from diffusion_np.data.shapes import CONCEPT_COLOURS, CONCEPT_SHAPES, render

    grids = np.meshgrid(np.arange(len(CONCEPT_COLOURS)), np.arange(len(CONCEPT_SHAPES)), np.arange(2), np.arange(5),
                        indexing="ij")
    rows = np.stack([g.ravel() for g in grids], axis=1)
    rows = rows[(rows[:, 0] == 6) | (rows[:, 1] == 3)]  # the 70 + 8 + ... combinations with a new value
    labels = rows[np.random.default_rng(0).integers(0, len(rows), 3000)]
    images = render(labels, 11)
    acc = prompt_accuracy(images, labels)
    assert acc["all"] >= 0.99, acc
    assert acc["per_attribute"]["colour"] == 1.0  # orange is never read as red or yellow
    base, _, base_labels = ShapesDataset("all", seed=12).sample(2000)  # and the base shapes are still exact
    np.testing.assert_array_equal(analyse_shapes(base), base_labels)
