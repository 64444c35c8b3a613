"""Sample-quality metrics."""

from diffusion_np.metrics.distances import mmd_rbf, sliced_wasserstein

__all__ = ["mmd_rbf", "sliced_wasserstein"]
