import numpy as np
import pytest

pytest.importorskip("sklearn")

from diffusion_np.data.digits import (  # noqa: E402
    DIGIT_WORDS,
    DigitsDataset,
    _bilinear_matrix,
    digit_captions,
    load_digits,
    stratified_split,
)


@pytest.mark.parametrize("image_size,upsample", [(8, "bilinear"), (16, "bilinear"), (16, "nearest"), (12, "bilinear")])
def test_shapes_range_and_captions(image_size, upsample):
    images, captions, labels = load_digits("all", image_size=image_size, upsample=upsample)
    assert images.shape == (1797, image_size, image_size, 1) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert labels.shape == (1797,) and labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))
    assert captions[0] == f"the digit {DIGIT_WORDS[labels[0]]}" and len(captions) == 1797
    assert digit_captions(np.array([7, 0])) == ["the digit seven", "the digit zero"]


def test_values_match_sklearn_and_upsampling():
    from sklearn.datasets import load_digits as sklearn_load_digits

    raw = sklearn_load_digits().images
    images, _, _ = load_digits("all", image_size=8)
    np.testing.assert_allclose(images[..., 0], raw / 8.0 - 1.0, atol=1e-7)
    nearest, _, _ = load_digits("all", image_size=16, upsample="nearest")
    np.testing.assert_array_equal(nearest[:, ::2, ::2], images)
    np.testing.assert_array_equal(nearest[:, 1::2, 1::2], images)
    bilinear, _, _ = load_digits("all", image_size=16)
    # a constant image stays constant, and the mean of every image is about kept
    np.testing.assert_allclose(_bilinear_matrix(8, 16).sum(axis=1), 1.0)
    np.testing.assert_allclose(bilinear.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=0.05)


def test_split_is_deterministic_disjoint_and_stratified():
    _, _, all_labels = load_digits("all")
    train_images, _, train_labels = load_digits("train", seed=0)
    test_images, _, test_labels = load_digits("test", seed=0)
    assert len(train_labels) + len(test_labels) == 1797
    # per digit, round(0.2 * count) in test
    np.testing.assert_array_equal(np.bincount(test_labels), np.round(0.2 * np.bincount(all_labels)))
    np.testing.assert_array_equal(load_digits("test", seed=0)[0], test_images)
    assert not np.array_equal(load_digits("test", seed=1)[0], test_images)
    # the two splits are complementary parts of the full set, each in its original order
    mask = stratified_split(all_labels, 0.2, seed=0)
    full, _, _ = load_digits("all")
    np.testing.assert_array_equal(full[mask], test_images)
    np.testing.assert_array_equal(full[~mask], train_images)


def test_stratified_split_on_small_labels():
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    mask = stratified_split(labels, 0.4, seed=3)
    np.testing.assert_array_equal(np.bincount(labels[mask]), [2, 2, 2])
    np.testing.assert_array_equal(mask, stratified_split(labels, 0.4, seed=3))


def test_dataset_sampling():
    ds = DigitsDataset("train", image_size=16, seed=0)
    assert len(ds) == 1438
    images, captions, labels = ds.sample(32)
    assert images.shape == (32, 16, 16, 1) and len(captions) == 32 and labels.shape == (32,)
    assert captions == ds.caption(labels)
    a = DigitsDataset("train", seed=5).sample(16)
    b = DigitsDataset("train", seed=5).sample(16)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(ds.sample(8, rng=2)[2], ds.sample(8, rng=2)[2])


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        load_digits("valid")
    with pytest.raises(ValueError, match="upsample must be one of"):
        load_digits(upsample="bicubic")
    with pytest.raises(ValueError, match="multiple of 8"):
        load_digits(image_size=12, upsample="nearest")
    with pytest.raises(ValueError, match="image_size"):
        load_digits(image_size=4)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)
    with pytest.raises(ValueError, match="0..9"):
        digit_captions(np.array([10]))
    with pytest.raises(ValueError, match="n must be"):
        DigitsDataset().sample(0)


def test_missing_sklearn_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match=r"pip install 'diffusion-np\[data\]'"):
        load_digits()


@pytest.mark.crosscheck
def test_bilinear_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    images, _, _ = load_digits("all", image_size=8)
    x = images[:20, :, :, 0].astype(np.float64)
    for size in (16, 12, 32):
        ours, _, _ = load_digits("all", image_size=size)
        ref = torch.nn.functional.interpolate(
            torch.tensor(x)[:, None], size=(size, size), mode="bilinear", align_corners=False
        )[:, 0].numpy()
        np.testing.assert_allclose(ours[:20, :, :, 0], ref, atol=1e-6)
