import numpy as np
import pytest

from diffusion_np.data.toy2d import sample_toy2d
from diffusion_np.metrics import floor_band, mmd_rbf, sliced_wasserstein, toy2d_verdict


def test_sliced_wasserstein_of_a_shift_is_its_projected_length():
    # x and x + c project to 1-D sets shifted by c.theta, so SW_2^2 = E[(c.theta)^2] = |c|^2 / d
    x = np.random.default_rng(0).standard_normal((500, 2))
    c = np.array([3.0, -4.0])
    sw = sliced_wasserstein(x, x + c, n_projections=4000)
    np.testing.assert_allclose(sw, 5.0 / np.sqrt(2), rtol=0.02)


def test_sliced_wasserstein_zero_for_identical_and_symmetric():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((300, 3)), rng.standard_normal((300, 3)) * 2
    assert sliced_wasserstein(x, x) == 0.0
    np.testing.assert_allclose(sliced_wasserstein(x, y), sliced_wasserstein(y, x), rtol=1e-12)


def test_sliced_wasserstein_unequal_sizes_close_to_equal_sizes():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((400, 2)), rng.standard_normal((1000, 2)) + 1.0
    np.testing.assert_allclose(sliced_wasserstein(x, y), sliced_wasserstein(x, y[:400]), rtol=0.15)


def test_mmd_separates_distributions():
    rng = np.random.default_rng(3)
    x, x2, y = rng.standard_normal((400, 2)), rng.standard_normal((400, 2)), rng.standard_normal((400, 2)) + 1
    assert mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)
    assert mmd_rbf(x, y) > 10 * mmd_rbf(x, x2)


@pytest.mark.parametrize("bad,match", [(np.zeros(5), r"must be \(n, d\)"), (np.full((3, 2), np.nan), "NaN")])
def test_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        sliced_wasserstein(bad, np.zeros((3, 2)))


# ------------------------------------------------------------------ the toy2d verdict and its floor band
def _swiss_roll_cut(n, seed, cut):
    """The swiss roll with the innermost ``cut`` of its angle range removed (a cut inner arm)."""
    rng = np.random.default_rng(seed)
    u = 1.5 * np.pi * (1 + 2 * (cut + (1 - cut) * rng.random(n)))
    return np.stack([u * np.cos(u), u * np.sin(u)], axis=1) / 5.0 + 0.05 * rng.standard_normal((n, 2))


def _swiss_roll_blurred(n, seed, std):
    return sample_toy2d("swiss_roll", n, seed=seed) + std * np.random.default_rng(seed + 1).standard_normal((n, 2))


ARM_SPACING = 2 * np.pi / 5  # the swiss roll's radius grows by this much a turn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_toy2d_verdict_fresh_data_is_within_the_floor(seed):
    v = toy2d_verdict(sample_toy2d("swiss_roll", 2000, seed=500 + seed), "swiss_roll")
    assert v["within_floor"], v


@pytest.mark.parametrize("name,points", [
    ("inner tenth cut", lambda: _swiss_roll_cut(2000, 7, 0.1)),
    ("inner quarter cut", lambda: _swiss_roll_cut(2000, 7, 0.25)),
    ("blurred by 0.1 arm spacing", lambda: _swiss_roll_blurred(2000, 8, 0.1 * ARM_SPACING)),
    ("blurred by 0.3 arm spacing", lambda: _swiss_roll_blurred(2000, 8, 0.3 * ARM_SPACING)),
])
def test_toy2d_verdict_a_visibly_worse_spiral_scores_clearly_above_the_floor(name, points):
    v = toy2d_verdict(points(), "swiss_roll")
    assert not v["within_floor"] and v["distance"] > 2 * v["floor_high"], (name, v)


def test_floor_band_needs_two_draws():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="fresh_draws"):
        floor_band(sliced_wasserstein, x, x, [x])
