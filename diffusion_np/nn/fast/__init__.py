"""Fast variants of the nn ops, kept beside their reference versions, and the one
switch that turns them all off.

Every op has a *reference* path, the plain code a student reads, in its own file
(``nn/conv.py``: im2col + one matmul, col2im backward; ``nn/norm.py``: GroupNorm,
then SiLU; ``nn/resample.py``: nearest 2x upsampling, then the conv). The faster
formulations of the same numbers live here, one module per op, each tested equal
to its reference in float64:

* :mod:`diffusion_np.nn.fast.conv`: the "im2col" (gather backward), "rows",
  "rows_stacked" and "matmul" convolutions and :func:`~diffusion_np.nn.fast.conv.choose_method`.
* :mod:`diffusion_np.nn.fast.norm`: GroupNorm + SiLU in one pass.
* :mod:`diffusion_np.nn.fast.resample`: nearest 2x upsampling + 3x3 conv as four 2x2 convolutions.
* :mod:`diffusion_np.nn.fast.activation`: exact GELU's normal CDF in float32 without SciPy's scalar erf.
* :mod:`diffusion_np.nn.fast.parallel`: blocks of the batch and the threads that run them;
  ``with threads(n):`` (or ``DIFFUSION_NP_THREADS=n``) sets how many threads.

Selection is local and explicit: ``Conv2d(..., method="auto" | "reference" | "rows" | ...)``,
``GroupNorm(..., silu=True)`` (fused unless reference mode is on), ``Upsample2D`` (fused
unless reference mode is on). ``"auto"`` (the default) picks the fast path.

How the layers reach these modules: ``nn/resample.py`` imports ``nn/fast/resample.py`` as any
module would. ``nn/fast/conv.py`` and ``nn/fast/norm.py`` build on the helpers of ``nn/conv.py``
and ``nn/norm.py``, so those two cannot import them back (an import cycle); they import this
package (which imports nothing) and call ``fast.conv.choose_method(...)``,
``fast.norm.group_norm_silu_forward(...)``. ``diffusion_np/nn/__init__.py`` imports the two
submodules (which import the reference files first), and a package's ``__init__`` always runs
before any of its modules is used, so ``fast.conv`` and ``fast.norm`` are there whenever a layer runs.

Reference mode runs every layer on its reference forward and backward, for
teaching and for bisecting a wrong number::

    with diffusion_np.nn.fast.reference_mode():
        y = model(x)             # conv reference, GroupNorm then SiLU, upsample then conv

or ``DIFFUSION_NP_REFERENCE=1`` in the environment (read once, at import). Only an
explicit per-layer choice overrides it (``Conv2d(..., method="rows")`` still runs
"rows"). The mode is consulted at forward time; the backward follows whatever its
forward cached.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

from diffusion_np.nn.fast import parallel
from diffusion_np.nn.fast.parallel import get_threads, threads

_reference = os.environ.get("DIFFUSION_NP_REFERENCE", "").strip().lower() not in ("", "0", "false", "no")


def reference_on() -> bool:
    """True while every layer is to run its reference path."""
    return _reference


def runs_fused(method: str) -> bool:
    """Whether a layer built with ``method`` ("auto", "fused" or "reference") runs its fused path now."""
    return method == "fused" or (method == "auto" and not _reference)


def splits_batch(*arrays, nbytes: int | None = None) -> bool:
    """Whether a layer runs its op pair in blocks of the batch on the threads now
    (:mod:`diffusion_np.nn.fast.parallel`): not in reference mode, two threads or more,
    NumPy arrays with a batch of two or more, and enough work for every thread (``nbytes``
    of the op's largest array, the first array's where not given)."""
    return not _reference and parallel.splits(arrays, nbytes=nbytes)


def splits_list(arrays: list) -> bool:
    """Whether independent work on each of these arrays (an optimizer's parameters) is shared
    among the threads now: not in reference mode, two threads or more, NumPy arrays, and
    enough bytes in all for every thread (:data:`diffusion_np.nn.fast.parallel.MIN_SPLIT_BYTES`)."""
    return (not _reference and len(arrays) > 1 and all(isinstance(a, np.ndarray) for a in arrays)
            and parallel.worth_splitting(sum(a.nbytes for a in arrays), parallel.MIN_SPLIT_BYTES))


def matmul(a, b):
    """``a @ b`` of a 2-D ``a``, its rows split over the threads when large
    (:func:`diffusion_np.nn.fast.parallel.matmul`); one call in reference mode."""
    return a @ b if _reference else parallel.matmul(a, b)


def matmul_tn(a, b):
    """``a.T @ b``, a sum over the rows split over the threads when large
    (:func:`diffusion_np.nn.fast.parallel.matmul_tn`); one call in reference mode."""
    return a.T @ b if _reference else parallel.matmul_tn(a, b)


@contextmanager
def reference_mode(on: bool = True):
    """Run every layer on its reference path inside the ``with`` block (``on=False``:
    on its fast paths, whatever the environment says); the previous mode comes back after."""
    global _reference
    before, _reference = _reference, bool(on)
    try:
        yield
    finally:
        _reference = before


__all__ = ["get_threads", "matmul", "matmul_tn", "reference_mode", "reference_on", "runs_fused", "splits_batch",
           "splits_list", "threads"]
