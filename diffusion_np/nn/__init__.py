"""Layers with hand-written backward passes: each file holds forward/backward
function pairs and the Module that composes them."""

from diffusion_np.nn.linear import Linear, linear_backward, linear_forward
from diffusion_np.nn.module import Module, ModuleList

__all__ = ["Linear", "Module", "ModuleList", "linear_backward", "linear_forward"]
