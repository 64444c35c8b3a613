"""Layers with hand-written backward passes.

Each file holds forward/backward function pairs (``out, cache = op_forward(...)``,
``grads = op_backward(dout, cache)``) and the Module that composes them.
Activations are channels-last: images (B, H, W, C), tokens (B, L, C).
"""

# The fast variants that build on nn/conv.py and nn/norm.py, imported here so that those two can reach them
# as fast.conv and fast.norm without importing them back (an import cycle: see nn/fast/__init__.py)
import diffusion_np.nn.fast.conv  # noqa: F401
import diffusion_np.nn.fast.norm  # noqa: F401
from diffusion_np.nn.activation import (
    GEGLU,
    GELU,
    Dropout,
    QuickGELU,
    Sigmoid,
    SiLU,
    dropout_backward,
    dropout_forward,
    geglu_backward,
    geglu_forward,
    gelu_backward,
    gelu_forward,
    quick_gelu_backward,
    quick_gelu_forward,
    sigmoid_backward,
    sigmoid_forward,
    silu_backward,
    silu_forward,
)
from diffusion_np.nn.attention import Attention, causal_mask, sdpa_backward, sdpa_forward
from diffusion_np.nn.classification import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from diffusion_np.nn.conv import Conv2d, conv2d_backward, conv2d_forward
from diffusion_np.nn.embedding import (
    Embedding,
    TimestepEmbedding,
    Timesteps,
    embedding_backward,
    embedding_forward,
    timestep_embedding,
)
from diffusion_np.nn.linear import Linear, linear_backward, linear_forward
from diffusion_np.nn.lora import LoRAConv2d, LoRALinear, add_lora, merge_lora, unmerge_lora
from diffusion_np.nn.losses import (
    gaussian_kl_backward,
    gaussian_kl_forward,
    l1_loss_backward,
    l1_loss_forward,
    mse_loss_backward,
    mse_loss_forward,
    pseudo_huber_loss_backward,
    pseudo_huber_loss_forward,
)
from diffusion_np.nn.module import BlockGrads, Module, ModuleList
from diffusion_np.nn.norm import (
    GroupNorm,
    LayerNorm,
    group_norm_backward,
    group_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
)
from diffusion_np.nn.resample import (
    Downsample2D,
    Upsample2D,
    avg_pool2x2_backward,
    avg_pool2x2_forward,
    upsample_nearest2x_backward,
    upsample_nearest2x_forward,
)

__all__ = [
    "GEGLU",
    "GELU",
    "Attention",
    "Conv2d",
    "Downsample2D",
    "Dropout",
    "Embedding",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "LoRAConv2d",
    "LoRALinear",
    "BlockGrads",
    "Module",
    "ModuleList",
    "QuickGELU",
    "SiLU",
    "Sigmoid",
    "TimestepEmbedding",
    "Timesteps",
    "Upsample2D",
    "avg_pool2x2_backward",
    "avg_pool2x2_forward",
    "causal_mask",
    "conv2d_backward",
    "conv2d_forward",
    "dropout_backward",
    "dropout_forward",
    "embedding_backward",
    "embedding_forward",
    "add_lora",
    "gaussian_kl_backward",
    "gaussian_kl_forward",
    "geglu_backward",
    "geglu_forward",
    "gelu_backward",
    "gelu_forward",
    "group_norm_backward",
    "group_norm_forward",
    "l1_loss_backward",
    "l1_loss_forward",
    "layer_norm_backward",
    "layer_norm_forward",
    "linear_backward",
    "linear_forward",
    "merge_lora",
    "mse_loss_backward",
    "mse_loss_forward",
    "pseudo_huber_loss_backward",
    "pseudo_huber_loss_forward",
    "quick_gelu_backward",
    "quick_gelu_forward",
    "sdpa_backward",
    "sdpa_forward",
    "sigmoid_backward",
    "sigmoid_forward",
    "silu_backward",
    "silu_forward",
    "softmax_cross_entropy_backward",
    "softmax_cross_entropy_forward",
    "timestep_embedding",
    "unmerge_lora",
    "upsample_nearest2x_backward",
    "upsample_nearest2x_forward",
]
