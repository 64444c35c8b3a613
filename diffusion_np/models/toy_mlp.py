"""A small MLP denoiser for 2-D toy data: the first end-to-end diffusion model.

    t --sinusoidal(time_dim)--> temb                       (Vaswani et al. 3.5; DDPM App. B)
    h_0 = concat(x, temb)                                   (B, 2 + time_dim)
    h_{i+1} = silu(Linear_i(h_i))          i = 0 .. depth-1 (B, hidden)
    out = Linear_out(h_depth)                               (B, 2): eps, x0 or v, as trained

Backward runs the same steps in reverse; the gradient that reaches temb is
dropped, since timesteps are not differentiated.

Left out: residual connections and normalisation (unnecessary at this size).
"""

from __future__ import annotations

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, get_xp
from diffusion_np.nn.activation import SiLU
from diffusion_np.nn.embedding import timestep_embedding
from diffusion_np.nn.linear import Linear
from diffusion_np.nn.module import Module, ModuleList
from diffusion_np.nn.validate import check_features, check_input_finite


class ToyDenoiser(Module):
    """MLP ``(x (B, dim), t (B,)) -> (B, dim)``. Parameters: ``layers.i.*``, ``out.*``."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32, rng=None,
                 dtype=DEFAULT_DTYPE):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.dim, self.time_dim = dim, time_dim
        widths = [dim + time_dim] + [hidden] * depth
        self.layers = ModuleList(Linear(a, b, rng=rng, dtype=dtype) for a, b in zip(widths[:-1], widths[1:]))
        self.acts = ModuleList(SiLU() for _ in range(depth))
        self.out = Linear(hidden, dim, rng=rng, dtype=dtype)

    def forward(self, x, t):
        check_features(self, x, self.dim, min_ndim=2)
        check_input_finite(self, x)
        xp = get_xp(x)
        t = xp.asarray(np.broadcast_to(np.asarray(t), (x.shape[0],)) if np.ndim(t) == 0 else t)  # (B,)
        temb = timestep_embedding(t, self.time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        h = xp.concatenate([x, temb.astype(x.dtype)], axis=-1)  # (B, dim + time_dim)
        for linear, act in zip(self.layers, self.acts):
            h = act(linear(h))  # (B, hidden)
        self._set_cache(True)
        return self.out(h)

    def backward(self, dout):
        self._pop_cache()
        dh = self.out.backward(dout)
        for linear, act in zip(reversed(list(self.layers)), reversed(list(self.acts))):
            dh = linear.backward(act.backward(dh))
        return dh[:, : self.dim]  # the temb part of the gradient is dropped: t is not differentiated
