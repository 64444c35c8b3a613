"""Handwritten digits that ship with scikit-learn: 1797 grey 8 x 8 images, with captions.

scikit-learn's ``load_digits`` (the UCI "Optical Recognition of Handwritten Digits"
test set, Alpaydin and Kaynak 1998) holds 1797 images of 8 x 8 pixels with integer
values 0..16 (ink counts in 4 x 4 blocks of a 32 x 32 bitmap) and their digit 0..9.
It is inside the scikit-learn wheel, so nothing is downloaded.

What this file does to them:

* values: x / 8 - 1 maps 0..16 onto [-1, 1] (0 is background, -1);
* layout: channels-last (N, H, W, 1), float32, as every image in diffusion_np;
* size: optionally upsampled to ``image_size`` (16 is the usual choice) by
  **bilinear** interpolation with half-pixel centres (PyTorch's
  ``interpolate(mode="bilinear", align_corners=False)``, edge pixels clamped), written
  as one (image_size, 8) matrix A applied on both sides, ``A @ x @ A.T``: every output
  is a convex combination of inputs, so values stay in [-1, 1]. ``upsample="nearest"``
  repeats pixels instead (image_size must then be a multiple of 8);
* captions: "the digit seven" (:data:`DIGIT_WORDS`);
* split: a deterministic stratified split, ``test_fraction`` (20%) of each digit's
  images in "test", the rest in "train": within each digit the images are ordered by
  a seeded random key and the first round(test_fraction * count) go to "test".

scikit-learn is an optional dependency (the ``data`` extra); it is imported only when
digits are loaded.

Left out on purpose: the 70000-image MNIST (it needs a download), and augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "test", "all")
UPSAMPLING = ("bilinear", "nearest")


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) float64 in 0..16 and targets (1797,) int."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as err:
        raise ImportError(
            "the digits dataset comes from scikit-learn, which is not installed: pip install 'diffusion-np[data]'"
        ) from err
    bunch = sklearn_load_digits()
    return bunch.images, bunch.target


def digit_captions(labels) -> list[str]:
    """Captions "the digit seven" for digit labels (N,)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"digit labels must lie in 0..9, got min {labels.min()} max {labels.max()}")
    return [f"the digit {DIGIT_WORDS[k]}" for k in labels.tolist()]


def stratified_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Boolean mask (N,), True for the test items: round(test_fraction * count) of every class.

    Vectorised: sort by (class, random key); an item's rank inside its class is its
    position in that order minus the position where its class starts.
    """
    labels = np.asarray(labels)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    key = np.random.default_rng(seed).random(len(labels))
    order = np.lexsort((key, labels))  # by class, then by key
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - np.repeat(starts, counts)  # rank inside the class
    n_test = np.round(test_fraction * counts).astype(np.int64)  # (classes,)
    class_of = np.searchsorted(classes, labels)
    return rank < n_test[class_of]


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with half-pixel centres (align_corners=False).

    Output pixel i sits at input coordinate s = (i + 0.5) n_in / n_out - 0.5, clamped
    to [0, n_in - 1]; it takes (1 - f) of input floor(s) and f of the next, f = s - floor(s).
    """
    s = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    left = np.floor(s).astype(np.int64)
    right = np.minimum(left + 1, n_in - 1)
    frac = s - left
    A = np.zeros((n_out, n_in))
    A[np.arange(n_out), left] += 1.0 - frac
    A[np.arange(n_out), right] += frac
    return A


def _resize(images: np.ndarray, image_size: int, upsample: str) -> np.ndarray:
    """(N, 8, 8) -> (N, image_size, image_size), bilinear or nearest (see the module docstring)."""
    N, H, W = images.shape
    if image_size == H:
        return images
    if upsample == "nearest":
        if image_size % H:
            raise ValueError(f"nearest upsampling needs image_size a multiple of {H}, got {image_size}")
        k = image_size // H
        return images.repeat(k, axis=1).repeat(k, axis=2)
    A = _bilinear_matrix(H, image_size)  # (S, 8)
    return A @ images @ A.T  # (S, 8) @ (N, 8, 8) @ (8, S) -> (N, S, S)


def load_digits(
    split: str = "train",
    image_size: int = 8,
    upsample: str = "bilinear",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The digits of a split as images in [-1, 1], captions and labels.

    Parameters
    ----------
    split : {"train", "test", "all"}
    image_size : int
        8 (as shipped) or larger, e.g. 16.
    upsample : {"bilinear", "nearest"}
    test_fraction : float
        Share of each digit's images in the test split.
    seed : int
        Seed of the split; the same seed always gives the same split.

    Returns
    -------
    images : float32 (N, image_size, image_size, 1) in [-1, 1]
    captions : list of N str, "the digit seven"
    labels : int64 (N,) digits 0..9
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if upsample not in UPSAMPLING:
        raise ValueError(f"upsample must be one of {UPSAMPLING}, got {upsample!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    raw, labels = _load_sklearn_digits()
    labels = labels.astype(np.int64)
    if split != "all":
        test = stratified_split(labels, test_fraction, seed)
        keep = test if split == "test" else ~test
        raw, labels = raw[keep], labels[keep]
    images = raw / 8.0 - 1.0  # 0..16 -> [-1, 1]
    images = _resize(images, int(image_size), upsample)
    images = images[..., None].astype(np.float32)  # (N, S, S, 1) channels-last
    return images, digit_captions(labels), labels


class DigitsDataset:
    """The digits of one split held in memory, with random batches (see :func:`load_digits`).

    Attributes ``images`` (N, S, S, 1), ``captions`` and ``labels`` (N,) hold the
    whole split; ``sample(n)`` draws a batch with replacement.
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 8,
        upsample: str = "bilinear",
        test_fraction: float = 0.2,
        seed: int = 0,
    ):
        self.split = split
        self.images, self.captions, self.labels = load_digits(split, image_size, upsample, test_fraction, seed)
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, n: int, rng: np.random.Generator | int | None = None):
        """``n`` items drawn uniformly with replacement: (images, captions, labels).

        ``rng`` is a Generator or a seed; by default the dataset's own, which moves on with each call.
        """
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        rng = self._rng if rng is None else np.random.default_rng(rng)
        idx = rng.integers(0, len(self.labels), size=n)
        return self.images[idx], [self.captions[i] for i in idx.tolist()], self.labels[idx]

    @staticmethod
    def caption(labels: Sequence[int] | np.ndarray) -> list[str]:
        """Captions "the digit seven" for digit labels (N,)."""
        return digit_captions(np.asarray(labels))
