"""glibc's malloc, set for a process that trains or samples: freed memory is kept for the next step.

A NumPy training step allocates the same arrays every step: activations, caches,
gradients, a few MB each. By default glibc gives every block above 128 KiB back to
the OS when it is freed, so the next step's arrays of the same size page-fault again,
and each helper thread of :mod:`diffusion_np.nn.fast.parallel` gets its own arena,
whose extra 64 MiB heaps are unmapped whenever they empty (after every backward) and
faulted in again. What it costs and what this saves: docs/performance.md, sixth round.

:func:`tune_malloc` raises the mmap and trim thresholds (256 MiB / 512 MiB) and keeps
one arena for all threads. It is a choice for a whole process, so the library never
makes it by itself: the ``diffusion-np`` command makes it at start, and the benchmarks
make it for both sides of each ratio (PyTorch's CPU allocator is glibc's malloc too).
A script calls it once, first. The cost: the process keeps its peak memory until it
exits instead of returning it between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt's parameters, from <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def tune_malloc() -> bool:
    """Keep freed memory for reuse (see above). Returns False where there is no glibc (then
    nothing changes), True when every setting took."""
    name = ctypes.util.find_library("c")
    if not name or platform.system() != "Linux":
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # a libc without mallopt (musl)
        return False
    settings = ((M_MMAP_THRESHOLD, 256 * 2**20), (M_TRIM_THRESHOLD, 512 * 2**20), (M_ARENA_MAX, 1))
    return all(mallopt(param, value) == 1 for param, value in settings)


__all__ = ["tune_malloc"]
