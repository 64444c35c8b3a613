"""diffusion_np: Stable Diffusion in plain NumPy with hand-written backprop."""

from diffusion_np.backend import asnumpy, get_xp, gpu_available

__version__ = "0.1.0"

__all__ = ["__version__", "asnumpy", "get_xp", "gpu_available"]
