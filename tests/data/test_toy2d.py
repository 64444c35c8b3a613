import numpy as np
import pytest

from diffusion_np.data import TOY2D_DATASETS, sample_toy2d


@pytest.mark.parametrize("name", TOY2D_DATASETS)
def test_toy_shapes_dtype_seeding_and_scale(name):
    a = sample_toy2d(name, 1000, seed=3)
    assert a.shape == (1000, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, sample_toy2d(name, 1000, seed=3))
    assert not np.array_equal(a, sample_toy2d(name, 1000, seed=4))
    assert np.all(np.abs(a.mean(axis=0)) < 0.6) and np.all((a.std(axis=0) > 0.3) & (a.std(axis=0) < 2.0))


def test_eight_gaussians_has_eight_modes():
    a = sample_toy2d("eight_gaussians", 4000, seed=0)
    angles = np.round(np.arctan2(a[:, 1], a[:, 0]) / (2 * np.pi / 8)) % 8
    counts = np.bincount(angles.astype(int), minlength=8)
    assert np.all(counts > 350), counts
    np.testing.assert_allclose(np.linalg.norm(a, axis=1).mean(), 2.0, atol=0.05)


def test_checkerboard_only_black_squares():
    a = sample_toy2d("checkerboard", 4000, seed=0)
    cell = np.floor((a + 2.0) / 1.0).astype(int)
    assert np.all((cell.sum(axis=1) % 2) == 0)


@pytest.mark.parametrize("name,n,match", [("spiral", 10, "unknown toy dataset 'spiral'"), ("two_moons", 0, "n must")])
def test_bad_arguments(name, n, match):
    with pytest.raises(ValueError, match=match):
        sample_toy2d(name, n)
