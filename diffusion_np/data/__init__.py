"""Data made in code or shipped with packages: nothing is downloaded.

* 2-D toys (:mod:`~diffusion_np.data.toy2d`): swiss roll, two moons, 8 Gaussians, checkerboard.
* Captioned shapes (:mod:`~diffusion_np.data.shapes`): "a small red circle in the top left", 32x32 RGB.
* Digits (:mod:`~diffusion_np.data.digits`): scikit-learn's 8x8 digits with captions "the digit seven".
"""

from diffusion_np.data.digits import DigitsDataset
from diffusion_np.data.digits import load_digits as load_digits_dataset
from diffusion_np.data.shapes import ShapesDataset, parse_caption, plot_shapes_grid
from diffusion_np.data.toy2d import DATASETS as TOY2D_DATASETS
from diffusion_np.data.toy2d import sample_toy2d

__all__ = [
    "TOY2D_DATASETS",
    "DigitsDataset",
    "ShapesDataset",
    "load_digits_dataset",
    "parse_caption",
    "plot_shapes_grid",
    "sample_toy2d",
]
