"""Sample-quality metrics: distances for 2-D points, a digit classifier's accuracy and
Frechet distance, prompt accuracy for shapes, and :func:`evaluate_checkpoint`, which
samples a checkpoint and scores it with them (``diffusion-np evaluate``)."""

from diffusion_np.metrics.digits import (
    DigitClassifier,
    conditional_accuracy,
    digits_frechet_distance,
    frechet_distance,
    load_digit_classifier,
    real_baseline,
    train_digit_classifier,
)
from diffusion_np.metrics.distances import floor_band, mmd_rbf, sliced_wasserstein, toy2d_verdict
from diffusion_np.metrics.evaluate import evaluate_checkpoint, format_report, score_digits, score_shapes
from diffusion_np.metrics.shapes import analyse_shapes, prompt_accuracy

__all__ = [
    "DigitClassifier",
    "analyse_shapes",
    "conditional_accuracy",
    "digits_frechet_distance",
    "evaluate_checkpoint",
    "floor_band",
    "format_report",
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
