"""The DPS measurement gradient against PyTorch autograd through diffusers' U-Net: the golden fixture
(tests/fixtures/dps.npz, made by cases_dps.py) and, under ``make crosscheck``, live."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.cases_dps import CASES, C, S
from fixtures.cases_unet import TINY_UNET, weights_for
from helpers import SOURCES, assert_close, reference

from diffusion_np.models.unet import UNet2DConditionModel
from diffusion_np.restoration import Blur, Downsample, measurement_gradient


@pytest.fixture(scope="module", params=SOURCES)
def torch_cases(request):
    return reference("dps", request.param)


@pytest.mark.parametrize("name, kind, t, alpha_bar", CASES, ids=[c[0] for c in CASES])
def test_measurement_gradient_matches_torch_autograd(torch_cases, name, kind, t, alpha_bar):
    case = torch_cases[name]
    ours = UNet2DConditionModel(**TINY_UNET)
    ours.load_state_dict(weights_for({k: tuple(v.shape) for k, v in ours.state_dict().items()}))
    op = Blur(case["kernel"], S, C) if kind == "blur" else Downsample(2, S, C)
    m = measurement_gradient(ours, case["context"], case["x_t"], t, alpha_bar, case["y"], op)
    assert_close(m.loss, case["loss"], rtol=1e-4, atol=1e-4, what="loss")
    ref = case["grad"]
    assert_close(m.grad, ref, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(ref).max())), what="grad")
