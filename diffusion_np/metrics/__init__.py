"""Sample-quality metrics: distances for 2-D points, a digit classifier's accuracy and
Frechet distance, prompt accuracy for shapes.

:func:`~diffusion_np.metrics.evaluate.evaluate_checkpoint`, which samples a checkpoint
and scores it with them (``diffusion-np evaluate``), is imported from
:mod:`diffusion_np.metrics.evaluate`, not from here: it loads checkpoints through the
training tasks, and those use the metrics below (a toy2d run's sliced Wasserstein
distance, a shapes run's prompt accuracy), so the package stays a layer below training.
"""

from diffusion_np.metrics.digits import (
    DigitClassifier,
    conditional_accuracy,
    digits_frechet_distance,
    frechet_distance,
    load_digit_classifier,
    real_baseline,
    score_digits,
    train_digit_classifier,
)
from diffusion_np.metrics.distances import floor_band, mmd_rbf, sliced_wasserstein, toy2d_verdict
from diffusion_np.metrics.shapes import analyse_shapes, prompt_accuracy, score_shapes

__all__ = [
    "DigitClassifier",
    "analyse_shapes",
    "conditional_accuracy",
    "digits_frechet_distance",
    "floor_band",
    "frechet_distance",
    "load_digit_classifier",
    "mmd_rbf",
    "prompt_accuracy",
    "real_baseline",
    "score_digits",
    "score_shapes",
    "sliced_wasserstein",
    "toy2d_verdict",
    "train_digit_classifier",
]
