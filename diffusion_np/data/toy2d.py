"""2-D toy distributions: the smallest data on which diffusion can be watched working.

Each sampler returns ``n`` points as a float32 array of shape (n, 2), roughly
centred with unit-ish scale (the scales used in the score-matching literature),
drawn from a seeded NumPy generator so that a seed gives the same points everywhere.

Left out: densities (only samples are needed to train and to compare).
"""

from __future__ import annotations

import numpy as np

DATASETS = ("swiss_roll", "two_moons", "eight_gaussians", "checkerboard")


def swiss_roll(n: int, rng: np.random.Generator, noise: float = 0.25) -> np.ndarray:
    """A 2-D swiss roll: angle u ~ 1.5 pi (1 + 2 U(0, 1)), point u (cos u, sin u) / 5 + noise."""
    u = 1.5 * np.pi * (1 + 2 * rng.random(n))
    x = np.stack([u * np.cos(u), u * np.sin(u)], axis=1) / 5.0
    return (x + noise / 5.0 * rng.standard_normal((n, 2))).astype(np.float32)


def two_moons(n: int, rng: np.random.Generator, noise: float = 0.08) -> np.ndarray:
    """Two interleaved half circles (as scikit-learn's make_moons), centred and scaled by 1.5."""
    n_top = n // 2
    angle = np.pi * rng.random(n)
    top = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    bottom = np.stack([1 - np.cos(angle), 0.5 - np.sin(angle)], axis=1)
    x = np.where((np.arange(n) < n_top)[:, None], top, bottom)
    x = (x - np.array([0.5, 0.25])) * 1.5
    return (x + noise * rng.standard_normal((n, 2))).astype(np.float32)


def eight_gaussians(n: int, rng: np.random.Generator, radius: float = 2.0, std: float = 0.1) -> np.ndarray:
    """Eight Gaussians of std ``std`` evenly spaced on a circle of ``radius``."""
    angles = 2 * np.pi * rng.integers(0, 8, n) / 8
    centres = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return (centres + std * rng.standard_normal((n, 2))).astype(np.float32)


def checkerboard(n: int, rng: np.random.Generator, squares: int = 4) -> np.ndarray:
    """Uniform on the black squares of a ``squares`` x ``squares`` board spanning [-2, 2]^2."""
    side = 4.0 / squares
    # pick a black square (i + j even), then a uniform point inside it
    cells = np.array([(i, j) for i in range(squares) for j in range(squares) if (i + j) % 2 == 0])
    chosen = cells[rng.integers(0, len(cells), n)]
    x = -2.0 + (chosen + rng.random((n, 2))) * side
    return x.astype(np.float32)


def sample_toy2d(name: str, n: int, seed: int | None = 0) -> np.ndarray:
    """``n`` points from the named toy distribution, shape (n, 2), float32."""
    if name not in DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    return {"swiss_roll": swiss_roll, "two_moons": two_moons, "eight_gaussians": eight_gaussians,
            "checkerboard": checkerboard}[name](n, rng)
