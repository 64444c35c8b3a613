import numpy as np
import pytest

from diffusion_np.metrics import mmd_rbf, sliced_wasserstein


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
