import itertools

import matplotlib

matplotlib.use("Agg")  # figures without a display; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from diffusion_np.data.shapes import (  # noqa: E402
    COLOUR_RGB,
    COLOURS,
    HELDOUT_COMBOS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    all_prompts,
    caption,
    combos,
    is_heldout,
    parse_caption,
    plot_shapes_grid,
    render,
)

N_VALUES = (len(COLOURS), len(SHAPES), len(SIZES), len(POSITIONS))


def _rows(labels):
    return {tuple(r) for r in np.asarray(labels).tolist()}


@pytest.mark.parametrize("split", ["train", "heldout", "all"])
def test_sample_shapes_dtype_range_and_captions(split):
    images, captions, labels = ShapesDataset(split, seed=0).sample(64)
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert labels.shape == (64, 4) and labels.dtype == np.int64
    assert np.all(labels >= 0) and np.all(labels < np.array(N_VALUES))
    assert captions == caption(labels) and len(captions) == 64
    np.testing.assert_array_equal(parse_caption(captions), labels)
    # background black (-1) in the corners, where no object reaches
    assert np.all(images[:, 0, 0] == -1.0) and np.all(images[:, -1, -1] == -1.0)


def test_determinism_by_seed():
    a = ShapesDataset("train", seed=3).sample(32)
    b = ShapesDataset("train", seed=3).sample(32)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2], b[2])
    assert a[1] == b[1]
    c = ShapesDataset("train", seed=4).sample(32)
    assert not np.array_equal(a[0], c[0])
    # the dataset's own generator moves on; an explicit rng is reproducible
    ds = ShapesDataset("train", seed=3)
    first, second = ds.sample(8)[0], ds.sample(8)[0]
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(ds.sample(8, rng=11)[0], ds.sample(8, rng=np.random.default_rng(11))[0])


def test_image_size_scales_geometry():
    images, _, labels = ShapesDataset("all", seed=0, image_size=64).sample(8)
    assert images.shape == (8, 64, 64, 3) and images.dtype == np.float32


@given(seed=st.integers(0, 2**32 - 1))
def test_heldout_never_in_train_only_in_heldout(seed):
    _, captions, train = ShapesDataset("train", seed=seed).sample(200)
    assert not is_heldout(train).any()
    assert not set(captions) & set(all_prompts("heldout"))
    _, _, held = ShapesDataset("heldout", seed=seed).sample(50)
    assert is_heldout(held).all()


def test_heldout_list_is_ten_percent_and_documented_rule():
    assert HELDOUT_COMBOS.shape == (18, 4)
    c, s, z, p = HELDOUT_COMBOS.T
    np.testing.assert_array_equal(z, (c + s) % 2)
    np.testing.assert_array_equal(p, (2 * c + s) % 5)
    assert len(combos("train")) == 162 and len(combos("heldout")) == 18 and len(combos("all")) == 180
    assert _rows(combos("train")) | _rows(combos("heldout")) == _rows(combos("all"))
    assert not _rows(combos("train")) & _rows(combos("heldout"))
    assert len(all_prompts("all")) == len(set(all_prompts("all"))) == 180


def test_every_value_and_every_pair_appears_in_train():
    _, _, labels = ShapesDataset("train", seed=0).sample(3000)
    for j, n in enumerate(N_VALUES):
        assert set(labels[:, j].tolist()) == set(range(n))
    for a, b in itertools.combinations(range(4), 2):
        want = set(itertools.product(range(N_VALUES[a]), range(N_VALUES[b])))
        assert _rows(combos("train")[:, [a, b]]) == want
        assert _rows(labels[:, [a, b]]) == want


def test_heldout_split_draws_every_heldout_combo():
    _, _, labels = ShapesDataset("heldout", seed=0).sample(500)
    assert _rows(labels) == _rows(HELDOUT_COMBOS)


def test_anti_aliasing_and_colours():
    images, _, labels = ShapesDataset("all", seed=1).sample(256)
    rgb = (images + 1.0) / 2.0
    coverage = rgb.max(axis=3)  # (B, H, W): every colour has a channel at 1
    # every image has partly covered edge pixels, and fully covered interior pixels
    edge = (coverage > 0.05) & (coverage < 0.95)
    assert np.all(edge.sum(axis=(1, 2)) >= 4)
    assert np.all((coverage == 1.0).sum(axis=(1, 2)) >= 4)
    # every pixel is coverage * the image's colour: no other hue appears
    expected = coverage[..., None] * COLOUR_RGB[labels[:, 0]][:, None, None, :]
    np.testing.assert_allclose(rgb, expected, atol=1e-6)


def test_shape_areas_match_geometry():
    # without jitter the total coverage is close to the analytic area: pi r^2, 4 r^2, 2 r^2
    labels = np.array([[0, 0, 1, 4], [0, 1, 1, 4], [0, 2, 1, 4]])
    rng = np.random.default_rng(0)
    images = render(labels, rng)
    area = ((images + 1.0) / 2.0).max(axis=3).sum(axis=(1, 2))
    r_lo, r_hi = 5.5 * 0.9, 5.5 * 1.1
    for got, k in zip(area, (np.pi, 4.0, 2.0)):
        assert k * r_lo**2 - 1.0 < got < k * r_hi**2 + 1.0


def test_caption_parse_roundtrip_all_combos():
    rows = combos("all")
    np.testing.assert_array_equal(parse_caption(caption(rows)), rows)
    assert caption(np.array([0, 0, 0, 0])) == "a small red circle in the top left"
    assert caption([5, 2, 1, 4]) == "a large cyan triangle in the center"
    np.testing.assert_array_equal(parse_caption("Top-left: a RED, small circle!"), [0, 0, 0, 0])
    np.testing.assert_array_equal(parse_caption("a large blue square in the centre"), [2, 1, 1, 4])
    assert parse_caption([]).shape == (0, 4)


@pytest.mark.parametrize(
    "text,match",
    [
        ("a small purple circle in the top left", "unknown word 'purple'"),
        ("a small red circle", "no position"),
        ("a small red circle in the top", "'top' must be followed by 'left' or 'right'"),
        ("a small large red circle in the center", "more than one size"),
        ("a red circle in the center", "no size"),
    ],
)
def test_parse_caption_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_caption(text)


def test_caption_bad_labels():
    with pytest.raises(ValueError, match="out of range"):
        caption([7, 0, 0, 0])  # colour 6 is orange, the new concept; 7 is none
    with pytest.raises(ValueError, match="out of range"):
        caption([0, 4, 0, 0])  # shape 3 is the star; 4 is none
    with pytest.raises(ValueError, match=r"\(4,\) or \(B, 4\)"):
        caption([0, 0, 0])
    with pytest.raises(TypeError, match="integers"):
        caption(np.zeros(4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        ShapesDataset("test")
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(image_size=8)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        ShapesDataset().sample(0)
    with pytest.raises(ValueError, match="split must be one of"):
        combos("valid")


def test_plot_shapes_grid():
    images, captions, _ = ShapesDataset("all", seed=0).sample(10)
    fig = plot_shapes_grid(images, captions, ncols=4)
    try:
        axes = fig.get_axes()
        assert len(axes) == 12  # 3 rows of 4, the last two blank
        assert axes[0].get_title().replace("\n", " ") == captions[0]
        shown = axes[0].get_images()[0].get_array()
        np.testing.assert_allclose(shown, (images[0] + 1.0) / 2.0, atol=1e-6)
        assert not axes[11].get_images()
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="captions"):
        plot_shapes_grid(images, captions[:3])
