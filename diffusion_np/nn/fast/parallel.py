"""Blocks of the batch, and the threads that run them: the second core for the per-image work.

NumPy runs its elementwise passes on one thread, and OpenBLAS runs a small matrix
product (one image's share of a convolution) on one thread too, so at two threads a
NumPy training step left one core idle for most of its time. Both release the GIL, so
Python threads can run them side by side: :func:`run_blocks` splits the batch into
blocks of images and gives them to a small pool of threads. A block that fits the
cache also pays on one thread: a 32x32, 32-channel convolution ran 1.6x faster per
image in blocks of 4-8 images than over a batch of 64 (docs/performance.md).

The switch is the number of threads, :func:`get_threads`:

* ``DIFFUSION_NP_THREADS=n`` in the environment (read once, at import), else
  ``OPENBLAS_NUM_THREADS`` or ``OMP_NUM_THREADS`` (the variables NumPy's OpenBLAS
  reads: "one thread" means one thread for both), else the number of cores;
* ``with diffusion_np.nn.fast.threads(n):`` for a block of code (the benchmarks set it
  to the BLAS and PyTorch thread count of each row).

Blocks are contiguous ranges of the batch axis, each processed entirely by one
thread and written to its own slice of the output, so the result does not depend on
the number of threads; sums over the batch (weight gradients) add the blocks' partial
sums in block order. Only NumPy arrays are split: on a GPU, one kernel already uses
the whole device.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np


def _threads_from_env() -> int:
    for name in ("DIFFUSION_NP_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise ValueError(f"{name} must be a positive int, got {value!r}") from None
    return os.cpu_count() or 1


_threads = _threads_from_env()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def get_threads() -> int:
    """How many threads :func:`run_blocks` uses now."""
    return _threads


@contextmanager
def threads(n: int):
    """Run the blocks of the batch on ``n`` threads inside the ``with`` block (1: no threads)."""
    global _threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads: n must be a positive int, got {n!r}")
    before, _threads = _threads, n
    try:
        yield
    finally:
        _threads = before


def _one_blas_thread_here() -> None:
    """Make OpenBLAS run the calls of this thread on this thread only (a pool thread's
    per-image products are the parallel work already; OpenBLAS splitting each of them
    again would make the pool threads queue for its own threads). Uses
    ``openblas_set_num_threads_local`` of the OpenBLAS that NumPy's wheel bundles;
    elsewhere (another BLAS, no such symbol) nothing changes."""
    import ctypes
    import glob

    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))
    for path in libs:
        try:
            ctypes.CDLL(path).openblas_set_num_threads_local(1)
            return
        except (OSError, AttributeError):
            continue


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size < n:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="diffusion_np", initializer=_one_blas_thread_here)
        _pool_size = n
    return _pool


def block_size(n_items: int, bytes_per_item: int, budget_bytes: int = 2 * 2**20) -> int:
    """Items per block: as many as fit ``budget_bytes`` (at least one), and small enough
    that every thread gets a block."""
    per_block = max(1, budget_bytes // max(1, bytes_per_item))
    return max(1, min(per_block, -(-n_items // _threads)))  # ceil(n / threads)


def run_blocks(fn: Callable[[int, int], object], n_items: int, per_block: int) -> list:
    """``[fn(lo, hi) for each block]`` over ``range(n_items)`` in blocks of ``per_block``,
    on :func:`get_threads` threads; results in block order. ``fn`` must write only its
    own slice of any shared output."""
    spans = [(lo, min(lo + per_block, n_items)) for lo in range(0, n_items, per_block)]
    n = min(_threads, len(spans))
    if n <= 1:
        return [fn(lo, hi) for lo, hi in spans]
    return list(_get_pool(n).map(lambda span: fn(*span), spans))




# ----------------------------------------------------------------------------- an op pair in blocks
class BlockCaches(NamedTuple):
    """The caches of an op pair run in blocks of the batch: one per block, with its span."""

    spans: tuple  # ((lo, hi), ...)
    caches: tuple


def splits(arrays: tuple, min_per_block: int = 1) -> bool:
    """Whether an op on these batch-first arrays runs in blocks: two threads or more, NumPy
    arrays, and a batch of at least two blocks."""
    return _threads > 1 and all(isinstance(a, np.ndarray) for a in arrays) and arrays[0].shape[0] >= 2 * min_per_block


def forward_in_blocks(forward: Callable, arrays: tuple, out_shape: tuple, *args):
    """``y, cache = forward(*arrays, *args)`` computed per block of the batch (axis 0 of every
    array in ``arrays``) on the threads; ``y`` (``out_shape``, batch first) is assembled in place
    and the cache is a :class:`BlockCaches`. ``args`` are passed to every block as they are."""
    B = arrays[0].shape[0]
    y = np.empty(out_shape, dtype=np.result_type(*arrays))
    per_block = -(-B // _threads)  # one block per thread: these ops stream, they do not block for the cache

    def block(lo: int, hi: int):
        y_block, cache = forward(*(a[lo:hi] for a in arrays), *args)
        y[lo:hi] = y_block
        return (lo, hi), cache

    results = run_blocks(block, B, per_block)
    return y, BlockCaches(tuple(r[0] for r in results), tuple(r[1] for r in results))


def backward_in_blocks(backward: Callable, dout, cache: BlockCaches, n_batch_grads: int = 1):
    """The gradients of :func:`forward_in_blocks`: ``backward(dout[lo:hi], cache)`` per block.

    The first ``n_batch_grads`` gradients are batch-first (the inputs') and are assembled;
    the others (parameters: gamma, beta) are sums over the batch, so the blocks' parts are
    added in block order. None stays None."""
    results = [None] * len(cache.spans)

    def block(i: int, _):
        lo, hi = cache.spans[i]
        results[i] = backward(dout[lo:hi], cache.caches[i])

    run_blocks(block, len(cache.spans), 1)
    grads = []
    for k in range(len(results[0])):
        parts = [r[k] for r in results]
        if parts[0] is None:
            grads.append(None)
        elif k < n_batch_grads:
            grads.append(np.concatenate(parts, axis=0))
        else:
            total = parts[0].copy()
            for part in parts[1:]:
                total += part
            grads.append(total)
    return tuple(grads)


__all__ = ["BlockCaches", "backward_in_blocks", "block_size", "forward_in_blocks", "get_threads", "run_blocks",
           "splits", "threads"]
