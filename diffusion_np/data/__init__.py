"""Data made in code or shipped with packages: nothing is downloaded."""

from diffusion_np.data.toy2d import DATASETS as TOY2D_DATASETS
from diffusion_np.data.toy2d import sample_toy2d

__all__ = ["TOY2D_DATASETS", "sample_toy2d"]
