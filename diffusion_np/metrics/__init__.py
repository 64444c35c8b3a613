"""Sample-quality metrics: distances for 2-D points, prompt accuracy for shapes."""

from diffusion_np.metrics.distances import mmd_rbf, sliced_wasserstein
from diffusion_np.metrics.shapes import analyse_shapes, prompt_accuracy

__all__ = ["analyse_shapes", "mmd_rbf", "prompt_accuracy", "sliced_wasserstein"]
