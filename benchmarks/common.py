"""Shared benchmark machinery: timing, thread limits, machine description, JSON rows.

Every number is a ratio against PyTorch measured in the same process, at the same
thread count, so the machine's speed cancels out. Timings are the median of
``repeats`` runs after ``warmup`` runs.

Rows have the shape ``{"name", "threads", "blas_env", "numpy_s", "torch_s", "ratio"}``
(plus optional fields such as ``numpy_peak_mb``); ``blas_env`` says whether the
OpenBLAS tuning variables (OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE, see TOOLING.md)
were set ("as-is") or removed ("unset") for the run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np


def blas_env() -> str:
    return "as-is" if ("OPENBLAS_CORETYPE" in os.environ or "OPENBLAS_L2_SIZE" in os.environ) else "unset"


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "openblas_env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ},
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "filepath")}
            for p in threadpool_info()
        ]
    except ImportError:
        pass
    return info


def blas_kernel() -> str:
    """The OpenBLAS kernel NumPy runs (e.g. 'SkylakeX', or 'Haswell' when OPENBLAS_CORETYPE forces it)."""
    try:
        from threadpoolctl import threadpool_info

        for p in threadpool_info():
            if p.get("internal_api") == "openblas" and "numpy" in (p.get("filepath") or ""):
                return str(p.get("architecture"))
        return ",".join(str(p.get("architecture")) for p in threadpool_info())
    except ImportError:
        return "unknown"


@contextmanager
def threads(n: int):
    """Limit NumPy's BLAS, diffusion_np's blocks (``nn.fast.threads``) and PyTorch to ``n`` threads inside the block."""
    from threadpoolctl import threadpool_limits

    from diffusion_np.nn import fast

    try:
        import torch
    except ImportError:
        torch = None
    old = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(n)
    with threadpool_limits(limits=n), fast.threads(n):
        yield
    if torch:
        torch.set_num_threads(old)


def median_time(fn: Callable[[], object], repeats: int = 7, warmup: int = 2, sync: Callable[[], None] | None = None):
    """Median wall time of ``fn()`` in seconds (``sync`` waits for a GPU before the clock stops)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(name: str, n_threads: int, numpy_s: float, torch_s: float, **extra) -> dict:
    return {
        "name": name,
        "threads": n_threads,
        "blas_env": blas_env(),
        "numpy_s": numpy_s,
        "torch_s": torch_s,
        "ratio": numpy_s / torch_s,
        **extra,
    }


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}  (BLAS kernel: {blas_kernel()}, OpenBLAS env: {blas_env()})")
    print(f"{'name':34s} {'thr':>3s} {'numpy ms':>10s} {'torch ms':>10s} {'ratio':>7s}")
    for r in rows:
        print(
            f"{r['name']:34s} {r['threads']:3d} {1e3 * r['numpy_s']:10.2f} {1e3 * r['torch_s']:10.2f} {r['ratio']:7.2f}"
        )


def read_results(path: str) -> list[dict]:
    """The rows already in the JSON file ``path``: none when it does not exist or is empty
    (as ``mktemp`` makes it); SystemExit naming the file when it holds something else, so a
    benchmark calls this before it starts timing instead of failing minutes later."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except ValueError as err:
        raise SystemExit(f"--json {path}: not a JSON file of benchmark results ({err}); give another file") from None
    if not isinstance(data, dict) or not isinstance(data.get("results", []), list):
        raise SystemExit(f'--json {path}: not a benchmark results file (expected {{"machine", "results": [...]}})')
    return data.get("results", [])


def write_json(path: str, rows: list[dict]) -> None:
    """Write ``{"machine": ..., "results": rows}``, merging with rows already in the file
    (so runs with and without the OpenBLAS variables can share one file)."""
    keys = {(r["name"], r["threads"], r["blas_env"]) for r in rows}
    results = [r for r in read_results(path) if (r.get("name"), r.get("threads"), r.get("blas_env")) not in keys]
    with open(path, "w") as f:
        json.dump({"machine": machine_info(), "results": results + rows}, f, indent=2)
