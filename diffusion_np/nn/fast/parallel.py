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

Two rules keep the threads from costing more than they give (docs/performance.md,
fifth round):

* The calling thread takes blocks too, beside ``threads - 1`` helper threads that
  sleep between calls, and work below a minimum per thread (:data:`MIN_SPLIT_BYTES`
  for an op pair, :data:`MIN_SPLIT_MACS` for a product) is not split at all: the
  sampling U-Net's small activations cost less than waking a helper.
* One set of threads at a time. OpenBLAS's own threads busy-wait (no yield) for
  about 0.1 s after every call they share; beside the helpers they took the cores
  the helpers needed. So while a :class:`~diffusion_np.nn.module.Module` call or
  backward runs on two threads or more, OpenBLAS runs every product on the thread
  that calls it (:data:`one_blas_thread`), and the layers split the large products
  themselves (:func:`matmul`, :func:`matmul_tn`). OpenBLAS's count comes back after
  the outermost call.
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import os
import queue
import threading
from collections.abc import Callable
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


def _find_blas_local_setter():
    """``openblas_set_num_threads_local`` of the OpenBLAS that NumPy's wheel bundles, or None
    where there is no such symbol (another BLAS, an older OpenBLAS). It returns the previous
    count. Despite its name, in that (pthreads) build it is one variable for the whole
    process, which overrides the thread count of every BLAS call while it is set: a thread
    that sets it sets it for all."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))
    for path in libs:
        try:
            # PyDLL: called with the GIL held; CDLL would release it, and taking it back while
            # a helper thread runs Python code cost up to a switch interval (0.5 ms a call, measured)
            setter = ctypes.PyDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        return setter
    return None


_blas_local = _find_blas_local_setter()


def _set_blas_threads_here(n: int) -> int | None:
    """Make OpenBLAS run its calls on ``n`` threads; the previous count (None: no setter)."""
    return None if _blas_local is None else _blas_local(n)


class _Job:
    """One :func:`run_blocks` call: its blocks, taken one at a time by the calling thread and
    the helpers, whichever is free first (a helper that wakes late finds none left)."""

    __slots__ = ("fn", "spans", "results", "next_index", "remaining", "lock", "finished", "error")

    def __init__(self, fn: Callable, spans: list):
        self.fn, self.spans, self.results = fn, spans, [None] * len(spans)
        self.next_index = itertools.count()  # next() on it is atomic: each block is taken once
        self.remaining, self.lock = len(spans), threading.Lock()
        self.finished = threading.Lock()
        self.finished.acquire()  # released when the last block is done
        self.error: BaseException | None = None

    def work(self) -> None:
        n = len(self.spans)
        while (i := next(self.next_index)) < n:
            try:
                self.results[i] = self.fn(*self.spans[i])
            except BaseException as error:  # handed to the calling thread, which raises it
                self.error = self.error or error
            with self.lock:
                self.remaining -= 1
                last = self.remaining == 0
            if last:
                self.finished.release()


def _helper_loop(inbox: queue.SimpleQueue) -> None:
    _state.inside = True  # a run_blocks inside a block runs its blocks on this thread
    while True:
        inbox.get().work()


_state = threading.local()
_inboxes: list[queue.SimpleQueue] = []  # one per helper thread, started when first needed


def _reset_after_fork() -> None:
    _inboxes.clear()  # a forked child has no helper threads: start new ones when needed


os.register_at_fork(after_in_child=_reset_after_fork)


def _helpers(n: int) -> list[queue.SimpleQueue]:
    while len(_inboxes) < n:
        inbox = queue.SimpleQueue()
        threading.Thread(target=_helper_loop, args=(inbox,), name="diffusion_np-blocks", daemon=True).start()
        _inboxes.append(inbox)
    return _inboxes[:n]


#: An op pair on fewer bytes than this per thread runs in one call: waking a helper and
#: handing it a block costs 10-30 microseconds, as much as a whole GroupNorm of the
#: sampling U-Net's (16, 8, 8, 64) activations (docs/performance.md, fifth round).
MIN_SPLIT_BYTES = 256 * 2**10
#: A product with fewer multiply-adds than this per thread runs in one call.
MIN_SPLIT_MACS = 2**22


def worth_splitting(work: int, per_thread_minimum: int) -> bool:
    """Whether ``work`` (bytes or multiply-adds) gives every thread at least ``per_thread_minimum``."""
    return _threads > 1 and work >= _threads * per_thread_minimum


class _OneBlasThread:
    """While a model's layers run on two threads or more, OpenBLAS runs every product on
    the thread that calls it, and the layers split the large ones themselves
    (:func:`matmul`, :func:`matmul_tn`, the blocks of :func:`run_blocks`): after each
    call it shares out, OpenBLAS's own threads busy-wait (for about 0.1 s, with no yield)
    for the next, and beside the helper threads they made two threads slower than one
    (docs/performance.md, fifth round). Entered around every
    :class:`~diffusion_np.nn.module.Module` call and backward; only the outermost entry
    changes OpenBLAS's count, and its exit restores it."""

    __slots__ = ()

    def __enter__(self):
        depth = getattr(_state, "depth", 0)
        _state.depth = depth + 1
        if depth == 0 and _threads > 1:
            _state.blas_before = _set_blas_threads_here(1)

    def __exit__(self, *exc):
        _state.depth -= 1
        if _state.depth == 0:
            before = getattr(_state, "blas_before", None)
            if before is not None:
                _set_blas_threads_here(before)
                _state.blas_before = None


one_blas_thread = _OneBlasThread()


def matmul(a, b):
    """``a @ b`` for a 2-D ``a`` (N, K) and ``b`` (K, M), the rows of ``a`` in blocks on the
    threads when the product is large enough (:data:`MIN_SPLIT_MACS`); each row of the
    result is computed as in one call. Other arrays (a GPU's, more dimensions): ``a @ b``."""
    N, K = a.shape[0], a.shape[-1]
    M = b.shape[-1]
    if not (isinstance(a, np.ndarray) and a.ndim == 2 and worth_splitting(N * K * M, MIN_SPLIT_MACS)):
        return a @ b
    out = np.empty((N, M), dtype=np.result_type(a, b))

    def block(lo: int, hi: int) -> None:
        np.matmul(a[lo:hi], b, out=out[lo:hi])  # (rows, K) @ (K, M)

    run_blocks(block, N, -(-N // _threads))
    return out


def matmul_tn(a, b):
    """``a.T @ b`` for ``a`` (N, K) and ``b`` (N, M), a sum over the N rows (a weight gradient):
    each thread sums a block of rows, and the blocks' (K, M) parts are added in block order
    (the same numbers up to the order of the additions)."""
    N, K = a.shape
    M = b.shape[1]
    if not (isinstance(a, np.ndarray) and worth_splitting(N * K * M, MIN_SPLIT_MACS)):
        return a.T @ b
    parts = run_blocks(lambda lo, hi: a[lo:hi].T @ b[lo:hi], N, -(-N // _threads))  # (K, rows) @ (rows, M)
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


def block_size(n_items: int, bytes_per_item: int, budget_bytes: int = 2 * 2**20) -> int:
    """Items per block: as many as fit ``budget_bytes`` (at least one), and small enough
    that every thread gets a block."""
    per_block = max(1, budget_bytes // max(1, bytes_per_item))
    return max(1, min(per_block, -(-n_items // _threads)))  # ceil(n / threads)


def run_blocks(fn: Callable[[int, int], object], n_items: int, per_block: int, macs: int | None = None) -> list:
    """``[fn(lo, hi) for each block]`` over ``range(n_items)`` in blocks of ``per_block``,
    on :func:`get_threads` threads; results in block order. ``fn`` must write only its
    own slice of any shared output.

    The calling thread takes blocks too, beside ``threads - 1`` helper threads that wait
    for work between calls (no thread pool machinery: a call costs a few microseconds
    more than the loop). While the blocks run, OpenBLAS runs every call on the thread
    that makes it: its own threads would compete with the helpers for the cores. A
    ``run_blocks`` inside a block runs on its thread, in order. ``macs``, the
    multiply-adds of the whole call where given: below :data:`MIN_SPLIT_MACS` per thread
    the blocks run on the calling thread.
    """
    spans = [(lo, min(lo + per_block, n_items)) for lo in range(0, n_items, per_block)]
    n = min(_threads, len(spans))
    if n <= 1 or getattr(_state, "inside", False) or (macs is not None and not worth_splitting(macs, MIN_SPLIT_MACS)):
        return [fn(lo, hi) for lo, hi in spans]
    job = _Job(fn, spans)
    for inbox in _helpers(n - 1):
        inbox.put(job)
    blas_before = _set_blas_threads_here(1)
    _state.inside = True
    try:
        job.work()
    finally:
        _state.inside = False
        if blas_before is not None:
            _set_blas_threads_here(blas_before)
    job.finished.acquire()  # every block is done (a helper may still be finishing one)
    if job.error is not None:
        raise job.error
    return job.results


# ----------------------------------------------------------------------------- an op pair in blocks
class BlockCaches(NamedTuple):
    """The caches of an op pair run in blocks of the batch: one per block, with its span."""

    spans: tuple  # ((lo, hi), ...)
    caches: tuple


def splits(arrays: tuple, min_per_block: int = 1, nbytes: int | None = None) -> bool:
    """Whether an op on these batch-first arrays runs in blocks: two threads or more, NumPy
    arrays, a batch of at least two blocks, and at least :data:`MIN_SPLIT_BYTES` per thread
    of ``nbytes`` (the size of the op's largest array; the first array's where None)."""
    if _threads <= 1 or not all(isinstance(a, np.ndarray) for a in arrays) or arrays[0].shape[0] < 2 * min_per_block:
        return False
    return worth_splitting(arrays[0].nbytes if nbytes is None else nbytes, MIN_SPLIT_BYTES)


def forward_in_blocks(forward: Callable, arrays: tuple, out_shape: tuple, *args, nbytes: int | None = None):
    """``y, cache = forward(*arrays, *args)`` computed per block of the batch (axis 0 of every
    array in ``arrays``) on the threads; ``y`` (``out_shape``, batch first) is assembled in place
    and the cache is a :class:`BlockCaches`. ``args`` are passed to every block as they are.

    Blocks of about 2 MiB of ``nbytes`` (the op's largest array; the first array's where
    None), at least one per thread (:func:`block_size`): GroupNorm + SiLU's passes then find
    their block in the cache, which one block per thread (half the batch) did not
    (docs/performance.md, sixth round)."""
    B = arrays[0].shape[0]
    y = np.empty(out_shape, dtype=np.result_type(*arrays))
    per_block = block_size(B, (arrays[0].nbytes if nbytes is None else nbytes) // B)

    def block(lo: int, hi: int):
        y_block, cache = forward(*(a[lo:hi] for a in arrays), *args)
        y[lo:hi] = y_block
        return (lo, hi), cache

    results = run_blocks(block, B, per_block)
    return y, BlockCaches(tuple(r[0] for r in results), tuple(r[1] for r in results))


def backward_in_blocks(backward: Callable, dout, cache: BlockCaches, n_batch_grads: int = 1):
    """The gradients of :func:`forward_in_blocks`: ``backward(dout[lo:hi], cache)`` per block.

    The first ``n_batch_grads`` gradients are batch-first (the inputs'): each block writes
    its part into them on its own thread (the arrays are made by the first block to
    finish). The others (parameters: gamma, beta) are sums over the batch, so the blocks'
    parts are added in block order. None stays None."""
    B = dout.shape[0]
    batch_grads: list = []
    made = threading.Lock()

    def block(i: int, _):
        lo, hi = cache.spans[i]
        grads = backward(dout[lo:hi], cache.caches[i])
        with made:
            if not batch_grads:
                batch_grads.extend(None if g is None else np.empty((B, *g.shape[1:]), dtype=g.dtype)
                                   for g in grads[:n_batch_grads])
        for out, g in zip(batch_grads, grads[:n_batch_grads]):
            if out is not None:
                out[lo:hi] = g
        return grads[n_batch_grads:]

    results = run_blocks(block, len(cache.spans), 1)
    sums = []
    for k in range(len(results[0])):
        parts = [r[k] for r in results]
        if parts[0] is None:
            sums.append(None)
            continue
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        sums.append(total)
    return (*batch_grads, *sums)


__all__ = ["MIN_SPLIT_BYTES", "MIN_SPLIT_MACS", "BlockCaches", "backward_in_blocks", "block_size",
           "forward_in_blocks", "get_threads", "matmul", "matmul_tn", "one_blas_thread", "run_blocks", "splits",
           "threads", "worth_splitting"]
