import numpy as np
import pytest

from diffusion_np.gradcheck import check_module
from diffusion_np.models.toy_mlp import ToyDenoiser


def test_toy_denoiser_gradcheck():
    model = ToyDenoiser(hidden=9, depth=2, time_dim=6, rng=np.random.default_rng(3)).to(dtype=np.float64)
    x = np.random.default_rng(4).standard_normal((5, 2))
    errors = check_module(model, x, np.array([0, 3, 999, 500, 1]))
    assert max(errors.values()) < 1e-6, errors
    assert {"input0", "layers.0.weight", "layers.1.bias", "out.weight"} <= set(errors)


def test_toy_denoiser_scalar_timestep_broadcasts():
    model = ToyDenoiser(hidden=8, depth=1, time_dim=4)
    x = np.ones((3, 2), np.float32)
    np.testing.assert_allclose(model(x, 7), model(x, np.array([7, 7, 7])))


def test_toy_denoiser_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"ToyDenoiser expects x of shape \(\.\.\., 2\)"):
        ToyDenoiser()(np.zeros((4, 3), np.float32), 0)
