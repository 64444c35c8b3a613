"""Distances between two point clouds: how close are generated samples to the data?

* Sliced Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015): project both
  sets on ``n_projections`` random unit directions; in 1-D the Wasserstein-p distance
  between equal-size empirical distributions is the mean |sorted(a) - sorted(b)|^p.
  SW_p = (mean over directions of W_p^p)^(1/p).
* Maximum mean discrepancy with a Gaussian kernel (Gretton et al. 2012, Eq. 3, the
  biased V-statistic): MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y).

Both are zero for identical sets and are compared against the data-vs-data baseline
(two independent draws of the same size), which is the floor any model can reach.
"""

from __future__ import annotations

import numpy as np

from diffusion_np.backend import asnumpy


def _points(x, name: str) -> np.ndarray:
    x = np.asarray(asnumpy(x), dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (n, d) points, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def sliced_wasserstein(x, y, n_projections: int = 256, p: int = 2, seed: int = 0) -> float:
    """Sliced Wasserstein-p distance between point sets x (n, d) and y (m, d).

    With n != m the larger set's sorted projections are interpolated at the smaller
    set's quantile levels.
    """
    x, y = _points(x, "x"), _points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((x.shape[1], n_projections))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)  # (d, P) unit columns
    px = np.sort(x @ directions, axis=0)  # (n, P)
    py = np.sort(y @ directions, axis=0)  # (m, P)
    if px.shape[0] != py.shape[0]:
        n = min(px.shape[0], py.shape[0])
        levels = (np.arange(n) + 0.5) / n

        def at_levels(a):
            grid = (np.arange(a.shape[0]) + 0.5) / a.shape[0]
            return np.stack([np.interp(levels, grid, a[:, j]) for j in range(a.shape[1])], axis=1)

        px, py = at_levels(px), at_levels(py)
    return float(np.mean(np.abs(px - py) ** p) ** (1.0 / p))


def mmd_rbf(x, y, bandwidth: float | None = None) -> float:
    """Squared MMD with a Gaussian kernel exp(-|a - b|^2 / (2 h^2)); h = median pairwise distance by default."""
    x, y = _points(x, "x"), _points(y, "y")
    z = np.concatenate([x, y])
    sq = np.sum(z**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)  # (n+m, n+m) squared distances
    if bandwidth is None:
        bandwidth = float(np.sqrt(np.median(d2[np.triu_indices_from(d2, k=1)]) / 2))
    k = np.exp(-d2 / (2 * bandwidth**2))
    n = len(x)
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())
