"""Scoring generated digits: a small classifier, conditional accuracy, and a Frechet distance.

A model that draws "the digit seven" is judged the way class-conditional image
generators are (the Inception Score / FID recipe of Salimans et al. 2016 and
Heusel et al. 2017, scaled down to 8 x 8 digits): by a classifier trained on the
real data.

* :class:`DigitClassifier`: a small conv net written with diffusion_np's own
  layers and a hand-written backward::

      x (B, 8, 8, 1)
      -> Conv2d(1, 16, 3, padding 1) -> SiLU -> 2x2 average pool     (B, 4, 4, 16)
      -> Conv2d(16, 32, 3, padding 1) -> SiLU -> 2x2 average pool    (B, 2, 2, 32)
      -> flatten (B, 128) -> Linear(128, 64) -> SiLU                 (B, 64)  = features(x)
      -> Linear(64, 10)                                              (B, 10)  = logits

  It is designed for the 8 x 8 digits as scikit-learn ships them. Larger square
  inputs of side 8 * 2^k (16 x 16, the usual size of generated digits) are first
  average-pooled 2x2, k times, down to 8 x 8. That pooling is the exact inverse of
  ``load_digits(upsample="nearest")``; after the default bilinear upsampling it
  leaves a slight blur (each pooled pixel is 3/4 of the original plus 1/8 of each
  neighbour, per axis), which the classifier tolerates (the accuracy on the
  16 x 16 test split is tested as well).
* :func:`train_digit_classifier`: Adam on the train split of
  :func:`~diffusion_np.data.digits.load_digits`, with random shifts by up to one
  pixel as augmentation. Trained weights ship with the package
  (``metrics/weights/digits_classifier.safetensors``, see the README beside it),
  so :func:`load_digit_classifier` needs no training.
* :func:`conditional_accuracy`: the share of images classified as the digit they
  were generated for (argmax of the logits == intended label).
* :func:`frechet_distance`: the Frechet distance between Gaussians fitted to two
  feature sets (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule
  Converge to a Local Nash Equilibrium", Eq. 6; Dowson and Landau 1982)::

      d^2 = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

  :func:`digits_frechet_distance` computes it in the classifier's 64-d feature
  space (the role Inception-v3's pool features play in FID), and
  :func:`real_baseline` gives the floor: the distance between two disjoint draws
  of real digits of the same size. The estimate is biased upwards for small
  sample sizes (Chong and Forsyth 2020, "Effectively Unbiased FID"), so compare
  a model's value only with a baseline of the same n.

Left out on purpose: the Inception Score, precision/recall of generative models,
kernel (KID) distances, and any pretrained network (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.linalg
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from diffusion_np.backend import DEFAULT_DTYPE, asnumpy, get_xp
from diffusion_np.data.digits import load_digits
from diffusion_np.nn.activation import SiLU
from diffusion_np.nn.classification import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from diffusion_np.nn.conv import Conv2d
from diffusion_np.nn.linear import Linear
from diffusion_np.nn.module import Module
from diffusion_np.nn.resample import avg_pool2x2_backward, avg_pool2x2_forward
from diffusion_np.nn.validate import check_image, check_input_finite
from diffusion_np.optim import Adam, LRScheduler, linear_warmup_cosine

#: the shipped weights, inside the package (see the README.md beside them)
WEIGHTS_PATH = Path(__file__).parent / "weights" / "digits_classifier.safetensors"

#: side of the images the classifier's convolutions see
BASE_SIZE = 8


# ----------------------------------------------------------------------------- the classifier
class DigitClassifierCache(NamedTuple):
    resize: tuple  # ResampleCache of each 2x2 pooling that brought the input down to 8 x 8
    pool1: object  # ResampleCache after conv1
    pool2: object  # ResampleCache after conv2


def _pool_steps(size: int) -> int:
    """How many 2x2 poolings take a size-``size`` image to 8 x 8; -1 if none do."""
    k = 0
    while size > BASE_SIZE and size % 2 == 0:
        size //= 2
        k += 1
    return k if size == BASE_SIZE else -1


class DigitClassifier(Module):
    """Small conv net for digits: ``forward(x)`` gives logits (B, 10), ``features(x)`` the
    penultimate activations (B, hidden). See the module docstring for the layers.

    Parameters
    ----------
    channels : (int, int)
        Channels of the two convolutions.
    hidden : int
        Width of the feature layer.
    num_classes : int
    rng : numpy Generator for the initial weights (PyTorch's default init).
    dtype : parameter dtype.

    Input: float (B, S, S, 1) images in [-1, 1] (the range of
    :func:`~diffusion_np.data.digits.load_digits`), S = 8, 16, 32, ... (larger
    sizes are average-pooled to 8 x 8 first).
    """

    def __init__(
        self,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
        num_classes: int = 10,
        rng=None,
        dtype=DEFAULT_DTYPE,
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        c1, c2 = channels
        self.channels, self.hidden, self.num_classes = (int(c1), int(c2)), int(hidden), int(num_classes)
        self.conv1 = Conv2d(1, c1, 3, padding=1, rng=rng, dtype=dtype)
        self.act1 = SiLU()
        self.conv2 = Conv2d(c1, c2, 3, padding=1, rng=rng, dtype=dtype)
        self.act2 = SiLU()
        # two 2x2 poolings take 8 x 8 to 2 x 2
        self.fc1 = Linear(c2 * 2 * 2, hidden, rng=rng, dtype=dtype)
        self.act3 = SiLU()
        self.fc2 = Linear(hidden, num_classes, rng=rng, dtype=dtype)

    def _check(self, x) -> int:
        check_image(self, x, 1)
        B, H, W, _ = x.shape
        k = _pool_steps(H)
        if H != W or k < 0:
            raise ValueError(
                f"DigitClassifier expects x of shape (B, S, S, 1) with S = 8, 16, 32, ... (square, 8 * 2^k), "
                f"got {tuple(x.shape)}"
            )
        check_input_finite(self, x)
        return k

    def _trunk(self, x):
        """Input -> features, keeping every cache; returns (features, DigitClassifierCache)."""
        k = self._check(x)
        resize = []
        for _ in range(k):  # (B, 2S, 2S, 1) -> (B, S, S, 1), down to 8 x 8
            x, cache = avg_pool2x2_forward(x)
            resize.append(cache)
        h = self.act1(self.conv1(x))  # (B, 8, 8, c1)
        h, pool1 = avg_pool2x2_forward(h)  # (B, 4, 4, c1)
        h = self.act2(self.conv2(h))  # (B, 4, 4, c2)
        h, pool2 = avg_pool2x2_forward(h)  # (B, 2, 2, c2)
        B = h.shape[0]
        h = h.reshape(B, -1)  # (B, 2 * 2 * c2), in (row, column, channel) order
        feats = self.act3(self.fc1(h))  # (B, hidden)
        return feats, DigitClassifierCache(tuple(resize), pool1, pool2)

    def features(self, x):
        """Penultimate activations silu(fc1(...)) (B, hidden): the space of the Frechet distance.

        For evaluation only: it leaves nothing for :meth:`backward`.
        """
        feats, _ = self._trunk(x)
        self._set_cache(None)
        return feats

    def forward(self, x):
        """Logits (B, num_classes) of images x (B, S, S, 1)."""
        feats, cache = self._trunk(x)
        logits = self.fc2(feats)  # (B, hidden) -> (B, num_classes)
        self._set_cache(cache)
        return logits

    def backward(self, dlogits):
        """Gradient w.r.t. the input (B, S, S, 1); parameter gradients are added to ``grads``.

        The forward in reverse: fc2, SiLU, fc1, unflatten, pool, SiLU, conv2, pool,
        SiLU, conv1, then the poolings that brought the input to 8 x 8.
        """
        resize, pool1, pool2 = self._pop_cache()
        d = self.fc2.backward(dlogits)  # (B, hidden)
        d = self.act3.backward(d)
        d = self.fc1.backward(d)  # (B, 2 * 2 * c2)
        B, H2, W2, C2 = pool2.x_shape
        d = d.reshape(B, H2 // 2, W2 // 2, C2)  # undo the flatten: (B, 2, 2, c2)
        d = avg_pool2x2_backward(d, pool2)  # (B, 4, 4, c2)
        d = self.conv2.backward(self.act2.backward(d))  # (B, 4, 4, c1)
        d = avg_pool2x2_backward(d, pool1)  # (B, 8, 8, c1)
        d = self.conv1.backward(self.act1.backward(d))  # (B, 8, 8, 1)
        for cache in reversed(resize):
            d = avg_pool2x2_backward(d, cache)
        return d


# ----------------------------------------------------------------------------- training
def _blas_threads(n: int | None):
    """A context limiting the BLAS to n threads (threadpoolctl), or doing nothing."""
    if n is None:
        return contextlib.nullcontext()
    try:
        # threadpoolctl is optional (a dev extra): without it the BLAS keeps its own thread count
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _random_shift(images, rng: np.random.Generator, max_shift: int = 1):
    """Shift each image by (dy, dx) in {-max_shift..max_shift}^2 pixels, filling with
    background (-1). One gather, no loop over the batch: pad by max_shift, then read
    rows ``dy + max_shift + arange(H)`` and the matching columns of each image."""
    xp = get_xp(images)
    B, H, W, C = images.shape
    m = max_shift
    padded = xp.full((B, H + 2 * m, W + 2 * m, C), -1.0, dtype=images.dtype)
    padded[:, m : m + H, m : m + W] = images
    dy = xp.asarray(rng.integers(-m, m + 1, size=B))
    dx = xp.asarray(rng.integers(-m, m + 1, size=B))
    rows = (m - dy)[:, None] + xp.arange(H)  # (B, H): output row i reads padded row i + m - dy
    cols = (m - dx)[:, None] + xp.arange(W)  # (B, W)
    b = xp.arange(B)[:, None, None]
    return padded[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)


def train_digit_classifier(
    steps: int = 2000,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-2,
    max_shift: int = 1,
    channels: tuple[int, int] = (16, 32),
    hidden: int = 64,
    blas_threads: int | None = 1,
) -> tuple[DigitClassifier, np.ndarray]:
    """Train a :class:`DigitClassifier` on the train split of the 8 x 8 digits.

    1. draw a batch (with replacement) from the train split;
    2. augmentation: replace half of the images by their 16 x 16 bilinear round trip
       (upsampled, then pooled back as :class:`DigitClassifier` pools a 16 x 16 input),
       then shift every image by up to ``max_shift`` pixels in each direction;
    3. logits = classifier(x); loss = softmax cross-entropy with the labels;
    4. backward by hand, one Adam step; the learning rate warms up linearly over
       the first 5% of the steps, then follows a half cosine down to 0.

    Parameters
    ----------
    steps, seed, batch_size, lr, max_shift
        The seed fixes the initial weights, the batches and the shifts.
    channels, hidden
        The classifier's widths (see :class:`DigitClassifier`).
    blas_threads
        BLAS threads while training (needs threadpoolctl; without it, or with None,
        the BLAS runs as configured). The matrices here are tiny ((64*64, 144) @
        (144, 32) at most), so a second thread costs more in hand-off than it saves;
        on a busy 2-core machine spinning BLAS threads made a step 10-15x slower
        (measured: 100 steps in 1.6 s with one thread, 21 s with two).

    Returns
    -------
    classifier : DigitClassifier in eval mode.
    losses : float64 (steps,) training loss of each step.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    rng = np.random.default_rng(seed)
    images, _, labels = load_digits("train", image_size=BASE_SIZE)
    # the same digits upsampled to 16 x 16 (bilinear) and pooled back, as the classifier
    # sees a 16 x 16 image: slightly blurred (see the module docstring)
    round_trip, _ = avg_pool2x2_forward(load_digits("train", image_size=2 * BASE_SIZE)[0])
    model = DigitClassifier(channels, hidden, rng=rng)
    opt = Adam(model, lr=lr)
    sched = LRScheduler(opt, linear_warmup_cosine, base_lr=lr, warmup_steps=max(1, steps // 20), total_steps=steps)
    losses = np.empty(steps)
    with _blas_threads(blas_threads):
        for step in range(steps):
            idx = rng.integers(0, len(labels), size=batch_size)  # 1. a batch
            blurred = rng.random(batch_size) < 0.5  # 2. augmentation: half of them round-tripped,
            x = np.where(blurred[:, None, None, None], round_trip[idx], images[idx])
            if max_shift:
                x = _random_shift(x, rng, max_shift)  # all shifted by up to max_shift pixels
            logits = model(x)  # 3. (B, 10)
            loss, cache = softmax_cross_entropy_forward(logits, labels[idx])
            opt.zero_grad()  # 4.
            model.backward(softmax_cross_entropy_backward(cache))
            opt.step()
            sched.step()
            losses[step] = float(loss)
    return model.eval(), losses


# ----------------------------------------------------------------------------- shipped weights
def save_digit_classifier(classifier: DigitClassifier, path, metadata: dict | None = None) -> None:
    """Write the classifier's weights (float32) with safetensors; widths go in the metadata."""
    meta = {
        "channels": ",".join(map(str, classifier.channels)),
        "hidden": str(classifier.hidden),
        "num_classes": str(classifier.num_classes),
    }
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tensors = {k: np.ascontiguousarray(asnumpy(v), dtype=np.float32) for k, v in classifier.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)


def load_digit_classifier(path=None) -> DigitClassifier:
    """The trained classifier, in eval mode, from ``path`` (default: the weights shipped
    with the package, :data:`WEIGHTS_PATH`)."""
    path = Path(path) if path is not None else WEIGHTS_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"no digit classifier weights at {path}; make them with "
            "`python -m diffusion_np.metrics.digits OUT.safetensors`"
        )
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    channels = tuple(int(c) for c in meta.get("channels", "16,32").split(","))
    model = DigitClassifier(channels, int(meta.get("hidden", 64)), int(meta.get("num_classes", 10)))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# ----------------------------------------------------------------------------- metrics
def _check_images(images, name: str = "images"):
    if not hasattr(images, "shape") or images.ndim != 4 or images.shape[-1] != 1 or images.shape[0] < 1:
        got = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"{name} must be (N, S, S, 1) grey images with N >= 1, got {got}")


def _batched(fn, images, batch_size: int):
    """fn over slices of ``batch_size`` images, concatenated (bounds the memory of the caches)."""
    xp = get_xp(images)
    return xp.concatenate([fn(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])


def classifier_logits(images, classifier: DigitClassifier | None = None, batch_size: int = 500):
    """Logits (N, 10) of images (N, S, S, 1), in batches."""
    _check_images(images)
    classifier = classifier if classifier is not None else load_digit_classifier()
    return _batched(classifier.forward, images, batch_size)


def classifier_features(images, classifier: DigitClassifier | None = None, batch_size: int = 500):
    """Penultimate features (N, hidden) of images (N, S, S, 1), in batches."""
    _check_images(images)
    classifier = classifier if classifier is not None else load_digit_classifier()
    return _batched(classifier.features, images, batch_size)


def conditional_accuracy(images, labels, classifier: DigitClassifier | None = None) -> float:
    """Share of images whose predicted digit (argmax of the logits) is the intended ``labels``.

    Parameters
    ----------
    images : float (N, S, S, 1) in [-1, 1], S = 8 or 16 (see :class:`DigitClassifier`).
    labels : int (N,) the digit each image was generated for.
    classifier : default :func:`load_digit_classifier`.
    """
    _check_images(images)
    labels = np.asarray(asnumpy(labels))
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be an integer array of shape ({images.shape[0]},), got {labels.shape} {labels.dtype}"
        )
    predicted = np.asarray(asnumpy(classifier_logits(images, classifier))).argmax(axis=1)
    return float(np.mean(predicted == labels))


def _features_2d(x, name: str) -> np.ndarray:
    x = np.asarray(asnumpy(x), dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be (n, d) features with n >= 2, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (n, d) and (m, d).

    With mu the mean and S the covariance (unbiased, ``np.cov``) of each set
    (Heusel et al. 2017, Eq. 6)::

        d^2 = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))

    The returned value is d^2, as FID reports it. The square root of S_a S_b
    (a product of two positive semi-definite matrices, so its eigenvalues are real
    and >= 0) comes from ``scipy.linalg.sqrtm``. Numerical error can give it
    (i) non-finite entries when the product is nearly singular: then, as
    pytorch-fid's ``calculate_frechet_distance`` (after TTUR's ``fid.py``) does,
    ``eps`` is added to the diagonal of both covariances and the root recomputed;
    (ii) a tiny imaginary part: it is dropped if the diagonal's imaginary part is
    below 1e-3 (pytorch-fid's tolerance), and anything larger is an error.
    Everything runs in float64 on the host.
    """
    a, b = _features_2d(feats_a, "feats_a"), _features_2d(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)  # (d,)
    S_a, S_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))  # (d, d)
    diff = mu_a - mu_b
    covmean = scipy.linalg.sqrtm(S_a @ S_b)  # (d, d), (S_a S_b)^(1/2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(S_a.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((S_a + offset) @ (S_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: (S_a S_b)^(1/2) has an imaginary part of {np.abs(covmean.imag).max():.3g}"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(S_a) + np.trace(S_b) - 2.0 * np.trace(covmean))


def digits_frechet_distance(images, reference_images, classifier: DigitClassifier | None = None) -> float:
    """Frechet distance between two image sets in the classifier's feature space (the
    digits' FID). Both are (N, S, S, 1) in [-1, 1]; their sizes S may differ."""
    classifier = classifier if classifier is not None else load_digit_classifier()
    return frechet_distance(
        classifier_features(images, classifier, batch_size=500),
        classifier_features(reference_images, classifier, batch_size=500),
    )


def real_baseline(
    n: int, seed: int = 0, image_size: int = BASE_SIZE, classifier: DigitClassifier | None = None
) -> float:
    """The floor of :func:`digits_frechet_distance` at sample size n: the distance between
    two disjoint random draws of n real digits each (from all 1797, so n <= 898).

    A model whose n samples score near this value against n real digits is as close
    to the data as a second sample of the data itself.
    """
    images, _, _ = load_digits("all", image_size=image_size)
    if not isinstance(n, (int, np.integer)) or not 2 <= n <= len(images) // 2:
        raise ValueError(f"n must be an integer in 2..{len(images) // 2}, got {n!r}")
    order = np.random.default_rng(seed).permutation(len(images))
    first, second = images[order[:n]], images[order[n : 2 * n]]  # disjoint
    return digits_frechet_distance(first, second, classifier)


def score_digits(images, labels, image_size: int | None = None, data_seed: int = 0, seed: int = 0,
                 classifier: DigitClassifier | None = None) -> dict:
    """Score digit images asked for ``labels``: conditional accuracy and Frechet distance, with its floor.

    The conditional accuracy is the share of images the shipped classifier reads as the
    digit they were asked for (chance is 0.1). The Frechet distance in the classifier's
    feature space (Heusel et al. 2017, Eq. 6) is to the *test* split, which the model never
    saw; the floor beside it is the same distance for as many real *train* digits against
    the same test split: same reference, same sample size, so the two numbers compare
    directly (Frechet distances are biased upwards at small n, Chong and Forsyth 2020).
    :func:`real_baseline` compares two draws of n from all digits, test split included,
    so it is not that floor.

    Parameters
    ----------
    images : float (N, S, S, 1) in [-1, 1], N >= 2
    labels : int (N,) the digit each image was generated for
    image_size : side of the real digits to compare with (default S, the images' own)
    data_seed : seed of the train/test split the model was trained with
        (``DigitsConfig.data_seed``), so that the reference is really held out
    seed : seed of the draw of real train digits behind the floor
    classifier : default :func:`load_digit_classifier`

    Returns
    -------
    dict with ``conditional_accuracy``, ``per_digit_accuracy`` (10 values, None for a
    digit with no image), ``frechet_distance`` (to the test split),
    ``frechet_distance_real_baseline`` (real train digits to the same test split),
    ``reference_images`` and ``baseline_images`` (the two real set sizes).
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"score_digits needs at least 2 images (N, S, S, 1), got shape {images.shape}")
    classifier = classifier if classifier is not None else load_digit_classifier()
    size = int(image_size) if image_size is not None else images.shape[1]
    reference, _, _ = load_digits("test", image_size=size, seed=data_seed)
    train, _, _ = load_digits("train", image_size=size, seed=data_seed)
    n_base = min(len(images), len(train))  # train has 1437 digits; more samples get a floor at 1437
    baseline = train[np.random.default_rng(seed).choice(len(train), n_base, replace=False)]

    accuracy = conditional_accuracy(images, labels, classifier)  # checks the labels too
    predicted = np.asarray(classifier_logits(images, classifier)).argmax(axis=1)  # (N,) for the per-digit split
    per_digit = [float(np.mean(predicted[labels == d] == d)) if np.any(labels == d) else None for d in range(10)]
    return {
        "conditional_accuracy": accuracy,
        "per_digit_accuracy": per_digit,
        "frechet_distance": digits_frechet_distance(images, reference, classifier),
        "frechet_distance_real_baseline": digits_frechet_distance(baseline, reference, classifier),
        "reference_images": int(len(reference)),
        "baseline_images": int(n_base),
    }


def _main(argv: list[str] | None = None) -> None:
    """python -m diffusion_np.metrics.digits [OUT] [--steps N] [--seed S]: train and save the weights."""
    parser = argparse.ArgumentParser(description="Train the digit classifier used by the digits metrics.")
    parser.add_argument("out", nargs="?", default=str(WEIGHTS_PATH))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model, losses = train_digit_classifier(steps=args.steps, seed=args.seed)
    seconds = time.perf_counter() - start
    test_images, _, test_labels = load_digits("test")
    acc = conditional_accuracy(test_images, test_labels, model)
    acc16 = conditional_accuracy(load_digits("test", image_size=16)[0], test_labels, model)
    save_digit_classifier(
        model,
        args.out,
        {"steps": args.steps, "seed": args.seed, "test_accuracy": f"{acc:.4f}", "test_accuracy_16x16": f"{acc16:.4f}"},
    )
    print(
        f"trained {args.steps} steps in {seconds:.1f} s, final loss {losses[-20:].mean():.4f}; "
        f"test accuracy {acc:.4f} (8x8), {acc16:.4f} (16x16 bilinear); wrote {args.out}"
    )


if __name__ == "__main__":
    _main()
