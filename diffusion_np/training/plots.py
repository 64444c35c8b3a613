"""The pictures training writes: the loss curve, 2-D scatter plots, image grids.

Each draws on a bare ``matplotlib.figure.Figure`` with the Agg canvas, so none of them
touches pyplot's global state or the user's chosen backend. Images are channels-last
(B, H, W, 1 or 3) in [-1, 1], as every model here makes them.

Left out: interactive plots (the notebooks draw their own with pyplot).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffusion_np.backend import asnumpy

__all__ = ["draw_image_grid", "save_image_grid", "save_loss_plot", "save_scatter"]


def _figure(figsize: tuple[float, float]):
    """A bare matplotlib Figure on the Agg canvas, 100 dpi."""
    # matplotlib loads on the first picture, not when training is imported (it adds about 0.5 s)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_loss_plot(losses, path, title: str = "training loss") -> Path:
    """Plot the loss per step (and a running mean) to a PNG at ``path``.

    The file is written beside ``path`` and renamed, so a viewer never sees half a PNG.
    """
    losses = np.asarray(losses, dtype=np.float64)
    steps = np.arange(1, len(losses) + 1)
    fig = _figure((6, 3.5))
    ax = fig.add_subplot()
    ax.plot(steps, losses, lw=0.6, alpha=0.4, color="C0", label="per step")
    window = max(1, len(losses) // 50)
    if window > 1:  # a running mean over ~2% of the run shows the trend through the minibatch noise
        mean = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], mean, color="C0", label=f"mean of {window}")
        ax.legend()
    if np.all(losses > 0):
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def save_scatter(points, path, reference=None, title: str = "") -> Path:
    """A square scatter plot PNG of (n, 2) ``points``, optionally over grey ``reference`` points."""
    points = asnumpy(points)
    fig = _figure((4.5, 4.5))
    ax = fig.add_subplot()
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.8", label="data")
        lim = 1.15 * float(np.abs(reference).max())  # the data's extent; far-off samples fall outside on purpose
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim))
    ax.scatter(points[:, 0], points[:, 1], s=2, c="C0", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8, markerscale=4)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)


def save_image_grid(images, path, titles=None, ncols: int = 8, title: str = "") -> Path:
    """A PNG grid of images (B, H, W, 1 or 3) in [-1, 1], each with an optional small title."""
    B, H, W, _ = images.shape
    ncols = max(1, min(ncols, B))
    nrows = -(-B // ncols)
    cell = 1.3 * max(1.0, W / H)
    fig = _figure((cell * ncols, 1.5 * nrows + 0.4))
    draw_image_grid(fig, images, titles, ncols)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)


def draw_image_grid(container, images, titles=None, ncols: int = 8) -> None:
    """Draw images (B, H, W, 1 or 3) in [-1, 1] as a grid of axes on a matplotlib Figure or
    SubFigure, each with an optional small title (long ones wrap onto two lines)."""
    images = np.clip((asnumpy(images) + 1.0) / 2.0, 0.0, 1.0)  # [-1, 1] -> [0, 1]
    B, C = images.shape[0], images.shape[-1]
    ncols = max(1, min(ncols, B))
    nrows = -(-B // ncols)
    for i in range(B):
        ax = container.add_subplot(nrows, ncols, i + 1)
        ax.axis("off")
        if C == 1:
            ax.imshow(images[i, :, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(images[i], interpolation="nearest")
        if titles is not None and titles[i]:
            words = titles[i].split()
            half = (len(words) + 1) // 2 if len(words) > 4 else len(words)
            ax.set_title(" ".join(words[:half]) + ("\n" + " ".join(words[half:]) if half < len(words) else ""),
                         fontsize=6)
