"""Which array library runs the math: NumPy on the CPU, CuPy on a GPU.

Every op in diffusion_np takes its array module from the data it is given::

    xp = get_xp(x)          # numpy for numpy arrays, cupy for cupy arrays
    y = xp.exp(x)

so the same code runs on either device, and moving a model is one word:
``model.to("cupy")``. This file is the only place that knows the two libraries
differ; where they do (scatter-add, the error function), it wraps the difference
once, here.

A third device, "strict", exists for tests: NumPy doing the math with CuPy's
rules made errors (no implicit device -> host copies, no NumPy functions on
device arrays; :mod:`diffusion_np.testing.strict_backend`). :func:`asnumpy` is
the one deliberate way back to the host on every device.

Left out on purpose: automatic device placement, mixed-device arithmetic, and any
global "current device" switch: the arrays say where the work happens.
"""

from __future__ import annotations

import sys

import numpy as np

try:  # CuPy imports fine on a machine without a GPU; creating an array then fails.
    import cupy as _cupy
except Exception:  # noqa: BLE001 - any import failure means "no CuPy"
    _cupy = None

#: dtype of parameters and activations unless a caller asks for another.
DEFAULT_DTYPE = np.float32

#: names accepted by :func:`to_device` and ``Module.to`` ("strict": the test device, see above).
DEVICES = ("numpy", "cupy", "strict")


def _strict():
    """The strict test backend, or None while nothing has imported it (then no strict arrays exist)."""
    return sys.modules.get("diffusion_np.testing.strict_backend")


def gpu_available() -> bool:
    """True when CuPy is importable and a CUDA device can be used."""
    if _cupy is None:
        return False
    try:
        return bool(_cupy.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver counts as "no GPU"
        return False


def get_xp(*arrays):
    """The array module (``numpy`` or ``cupy``) that holds ``arrays``.

    Non-array arguments (Python scalars, None) are ignored. With no CuPy
    installed this is always ``numpy``.
    """
    strict = _strict()
    if strict is not None and any(strict.is_strict(a) for a in arrays):
        return strict.xp
    if _cupy is None:
        return np
    return _cupy.get_array_module(*[a for a in arrays if a is not None])


def is_cupy(x) -> bool:
    """True when ``x`` is a CuPy array."""
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def asnumpy(x):
    """Bring an array back to the host as a NumPy array (for plotting, saving, tests).

    The one deliberate device -> host copy: on a GPU it waits for the device to
    finish, so call it at a boundary (a logged loss, a finished sample), not
    inside a loop, and never hide it in ``float(x)`` or ``if x:``.
    """
    if is_cupy(x):
        return _cupy.asnumpy(x)
    strict = _strict()
    if strict is not None and strict.is_strict(x):
        return strict.to_host(x)
    return np.asarray(x)


def to_device(x, device: str):
    """Copy ``x`` to ``device`` ("numpy" or "cupy"); a no-op when it is already there."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "numpy":
        return asnumpy(x)
    if device == "strict":
        # the test device, loaded only when asked for (diffusion_np.testing imports modules that import this one)
        from diffusion_np.testing import strict_backend

        return x if strict_backend.is_strict(x) else strict_backend.asarray(x)
    if not gpu_available():
        raise RuntimeError(
            "device 'cupy' needs CuPy and a CUDA GPU; install the 'gpu' extra "
            "(pip install 'diffusion-np[gpu]') on a machine with a GPU"
        )
    return _cupy.asarray(x)


def device_of(x) -> str:
    """"cupy" for CuPy arrays, "strict" for the test device's, "numpy" otherwise."""
    strict = _strict()
    if strict is not None and strict.is_strict(x):
        return "strict"
    return "cupy" if is_cupy(x) else "numpy"


def scatter_add(target, indices, values) -> None:
    """In place: ``target[indices] += values`` with repeated indices summed.

    Plain ``target[indices] += values`` keeps only one of the repeated entries;
    NumPy spells the unbuffered version ``np.add.at``, CuPy ``cupyx.scatter_add``.
    """
    if is_cupy(target):
        import cupyx

        cupyx.scatter_add(target, indices, values)
    elif device_of(target) == "strict":
        _strict().scatter_add(target, indices, values)
    else:
        np.add.at(target, indices, values)


def erf(x):
    """The error function, elementwise, on the array's own device."""
    if device_of(x) == "strict":
        return _strict().erf(x)
    if is_cupy(x):
        from cupyx.scipy.special import erf as _erf
    else:
        from scipy.special import erf as _erf
    return _erf(x)


def default_rng(seed=None) -> np.random.Generator:
    """A NumPy random generator (host side). Draw on the host, then move with
    :func:`to_device`, so a seed gives the same numbers on every device."""
    return np.random.default_rng(seed)
