"""Inference mode on a whole model: the same numbers, no caches, and a backward that says why it cannot run."""

import numpy as np
import pytest

from diffusion_np.models import AutoencoderKL, UNet2DConditionModel
from diffusion_np.nn.module import inference_mode

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4)


def _inputs():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 8, 8, 4)).astype(np.float32), rng.standard_normal((2, 5, 8)).astype(np.float32)


def test_backward_after_an_inference_mode_forward_raises_a_clear_error():
    unet = UNet2DConditionModel(**UNET)
    x, text = _inputs()
    out_train = unet(x, 10, text)
    with inference_mode(unet):
        out = unet(x, 10, text)
        assert all(m._cache is None for _, m in unet.named_modules() if m is not unet)
        with pytest.raises(RuntimeError, match="inference mode and kept no cache; call inference\\(False\\)"):
            unet.backward(np.ones_like(out))
    np.testing.assert_array_equal(out, out_train)
    unet(x, 10, text)  # training mode again after the block: the backward runs
    assert unet.backward(np.ones_like(out)).dx.shape == x.shape


def test_model_inference_flag_and_the_vae():
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4).inference()
    z = vae.decode(np.zeros((1, 4, 4, 4), np.float32))
    assert all(m._cache is None for _, m in vae.named_modules())
    with pytest.raises(RuntimeError, match="inference mode"):
        vae.decoder.backward(np.ones_like(z))
