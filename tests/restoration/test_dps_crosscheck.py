"""The DPS measurement gradient against PyTorch autograd through diffusers' U-Net (live, ``-m crosscheck``).

The degradations are written again in PyTorch, independently of ours: the blur as a grouped
``conv2d`` (a cross-correlation, as ours) on a circularly padded image, the downsampling as
``avg_pool2d``; autograd then differentiates ||y - A(x0_hat(x_t))||^2 through diffusers'
``UNet2DConditionModel`` with the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.cases_unet import TINY_UNET, torch_layout, weights_for
from helpers import assert_close

from diffusion_np.models.unet import UNet2DConditionModel
from diffusion_np.restoration import Blur, Downsample, measurement_gradient

pytestmark = pytest.mark.crosscheck


@pytest.mark.parametrize("kind", ["blur", "downsample"])
@pytest.mark.parametrize("t, alpha_bar", [(900, 0.05), (300, 0.7)])
def test_measurement_gradient_matches_torch_autograd(kind, t, alpha_bar):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    F = torch.nn.functional
    ours = UNet2DConditionModel(**TINY_UNET)
    weights = weights_for({k: tuple(v.shape) for k, v in ours.state_dict().items()})
    ours.load_state_dict(weights)
    theirs = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    theirs.load_state_dict({k: torch.tensor(torch_layout(k, v)) for k, v in weights.items()})

    rng = np.random.default_rng(11)
    C, S = 4, 8  # the tiny U-Net's 4 channels stand for an image of 4 channels
    skewed = rng.uniform(0.1, 1.0, (3, 3))
    op = Blur(skewed / skewed.sum(), S, C, 0.05) if kind == "blur" else Downsample(2, S, C, 0.05)
    y = op.degrade(rng.uniform(-1, 1, (2, S, S, C)).astype(np.float32), rng)
    x_t = rng.standard_normal((2, S, S, C)).astype(np.float32)
    ctx = rng.standard_normal((2, 4, 32)).astype(np.float32)
    m = measurement_gradient(ours, ctx, x_t, t, alpha_bar, y, op)

    def A(img):  # (B, C, S, S) in PyTorch
        if kind == "blur":
            k = torch.tensor(op.kernel, dtype=img.dtype)[None, None].repeat(C, 1, 1, 1)  # (C, 1, 3, 3)
            return F.conv2d(F.pad(img, (1, 1, 1, 1), mode="circular"), k, groups=C)
        return F.avg_pool2d(img, 2)

    tx = torch.tensor(x_t.transpose(0, 3, 1, 2).copy(), requires_grad=True)
    eps = theirs(tx, torch.tensor([t]), torch.tensor(ctx)).sample
    x0 = (tx - np.sqrt(1 - alpha_bar) * eps) / np.sqrt(alpha_bar)
    loss = ((torch.tensor(y.transpose(0, 3, 1, 2).copy()) - A(x0)) ** 2).sum(dim=(1, 2, 3))
    loss.sum().backward()
    assert_close(m.loss, loss.detach().numpy(), rtol=1e-4, atol=1e-4, what="loss")
    ref = tx.grad.numpy().transpose(0, 2, 3, 1)
    assert_close(m.grad, ref, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(ref).max())), what="grad")
