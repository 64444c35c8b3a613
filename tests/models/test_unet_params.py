"""unet_param_shapes: the parameters of a UNet2DConditionModel from its config, name by name and shape by shape."""

import numpy as np
import pytest

from diffusion_np.models.unet import UNet2DConditionModel
from diffusion_np.models.unet_params import params_per_block, params_per_kind, unet_param_shapes

TINY = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (16, 24, 32, 32), "layers_per_block": 2,
    "cross_attention_dim": 16, "attention_head_dim": 4, "norm_num_groups": 4,
}
VARIANTS = [
    TINY,
    {**TINY, "layers_per_block": 1, "use_linear_projection": True, "transformer_layers_per_block": 2},
    {**TINY, "block_out_channels": (16, 24), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
     "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "attention_head_dim": (2, 3)},
]


@pytest.mark.parametrize("cfg", VARIANTS, ids=["tiny", "linear-proj-2-layers", "two-levels"])
def test_shapes_match_a_real_model(cfg):
    model = UNet2DConditionModel(**cfg)
    assert unet_param_shapes(cfg) == {name: tuple(p.shape) for name, p in model.named_parameters()}


def test_stable_diffusion_15_count():
    sd15 = {**TINY, "sample_size": 64, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
            "attention_head_dim": 8, "norm_num_groups": 32}
    shapes = unet_param_shapes(sd15)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 859_520_964  # diffusers' count for this config
    assert len(shapes) == 686
    assert sum(params_per_block(shapes).values()) == 859_520_964
    assert abs(sum(params_per_kind(shapes).values()) - 1.0) < 1e-12


def test_rejects_a_non_config():
    with pytest.raises(ValueError, match="block_out_channels"):
        unet_param_shapes({"in_channels": 4})
