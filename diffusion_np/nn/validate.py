"""Input checks shared by every layer, so that a mistake gives a sentence, not
an IndexError from deep inside a matmul (STYLE.md, rule 11).

Each check names the layer, what it expected and what it got::

    ValueError: Conv2d expects x of shape (B, H, W, C) with C=4, got (2, 3, 32, 32)

:func:`check_finite` is one sum (a fast reduction with no temporary array), NaN/Inf
exactly when an entry is, or when the sum overflows; only then is the exact
elementwise test run. A layer checks its input where data comes in:
``Module.__call__`` checks the floating inputs of the outermost call
(:func:`check_call_inputs`, named as in the layer's ``forward``), and a layer's own
check (:func:`check_input_finite`) is skipped inside a call (:data:`calls`), where its
input is the output of the layer before it. (Run in every layer, the sums were a few
% of a training step: docs/performance.md, sixth round.) A NaN that a model makes
itself (a diverged weight) reaches its output, where the trainers' finite-loss check
stops the run. :func:`check_finite` itself always checks (losses, the diffusion
functions). Both check NumPy arrays only: on a GPU the answer would have to be copied
to the host, a synchronisation in every call (see docs/performance.md, "Device rules").
"""

from __future__ import annotations

import functools
import inspect
import threading

import numpy as np

from diffusion_np.backend import get_xp


def _name(layer) -> str:
    return layer if isinstance(layer, str) else type(layer).__name__


def check_float(layer, x, what: str = "x") -> None:
    """TypeError unless ``x`` is an array of floating dtype."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{_name(layer)} expects {what} to be an array, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"{_name(layer)} expects {what} with a floating dtype (float32 or float64), got {x.dtype}"
        )


def check_features(layer, x, features: int, min_ndim: int = 2, what: str = "x") -> None:
    """x must be float, have at least ``min_ndim`` dims, and ``features`` on the last axis."""
    check_float(layer, x, what)
    if x.ndim < min_ndim or x.shape[-1] != features:
        raise ValueError(
            f"{_name(layer)} expects {what} of shape (..., {features}) with at least {min_ndim} dims, "
            f"got {tuple(x.shape)}"
        )


def check_image(layer, x, channels: int | None = None, what: str = "x") -> None:
    """x must be a float (B, H, W, C) array, channels-last, with C == channels if given."""
    check_float(layer, x, what)
    if x.ndim != 4 or (channels is not None and x.shape[-1] != channels):
        want = f"C={channels}" if channels is not None else "any C"
        raise ValueError(
            f"{_name(layer)} expects {what} of shape (B, H, W, C) with {want} (channels last), "
            f"got {tuple(x.shape)}"
        )


class _Calls(threading.local):
    """How many :class:`~diffusion_np.nn.module.Module` calls are in progress on this thread
    (``Module.__call__`` counts them): 0 outside any, 1 inside the forward of the layer
    that was called, 2 or more inside the layers it calls."""

    depth = 0


calls = _Calls()


def check_finite(layer, x, what: str = "x") -> None:
    """ValueError if ``x`` holds NaN or Inf (NumPy arrays; device arrays are not checked, see above)."""
    xp = get_xp(x)
    if xp is not np:  # the `if` below would wait for the device
        return
    with np.errstate(invalid="ignore", over="ignore"):  # inf + (-inf) in the sum is the case being looked for
        if bool(xp.isfinite(x.sum())):  # NaN and Inf propagate through a sum
            return
    if not bool(xp.isfinite(x).all()):  # the sum may only have overflowed
        raise ValueError(f"{_name(layer)} got a non-finite value (NaN or Inf) in {what}")


def check_input_finite(layer, x, what: str = "x") -> None:
    """A layer's check of its own input: :func:`check_finite`, except inside a Module call,
    whose inputs were checked where the call began (``Module.__call__``)."""
    if calls.depth == 0:
        check_finite(layer, x, what)


@functools.cache
def _signature(cls) -> inspect.Signature:
    return inspect.signature(cls.forward)


def check_call_inputs(layer, args: tuple, kwargs: dict) -> None:
    """:func:`check_finite` on every floating NumPy array passed to ``layer``'s outermost call, and
    on those in a list or tuple passed to it, named as in its ``forward`` (the entries of a
    ``*args``, a list or a tuple as ``name[i]``). A layer lists the inputs that may hold NaN or
    Inf on purpose (an attention mask's -inf) in its ``unchecked_inputs``."""
    signature = _signature(type(layer))
    try:
        bound = signature.bind(layer, *args, **kwargs)
    except TypeError:  # the call does not fit forward's signature: forward raises its own error
        return
    unchecked = getattr(layer, "unchecked_inputs", ())
    for name, value in list(bound.arguments.items())[1:]:  # after self
        kind = signature.parameters[name].kind
        if name in unchecked:
            continue
        if kind is inspect.Parameter.VAR_KEYWORD:
            items = [(f"{name}[{key!r}]", v) for key, v in value.items()]
        elif kind is inspect.Parameter.VAR_POSITIONAL or isinstance(value, (list, tuple)):
            items = [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(name, value)]
        for what, array in items:
            if isinstance(array, np.ndarray) and array.dtype.kind == "f":
                check_finite(layer, array, what)


def check_number(layer, name: str, value, positive: bool = False) -> float:
    """A finite real number (``positive``: > 0), such as a normalisation's eps; returned as a Python float.

    TypeError for a string, a list, None or a bool; ValueError for NaN, Inf, or (``positive``) 0 or less.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{_name(layer)}: {name} must be a number, got {value!r} ({type(value).__name__})")
    if not np.isfinite(value) or (positive and not value > 0):
        kind = "positive finite" if positive else "finite"
        raise ValueError(f"{_name(layer)}: {name} must be a {kind} number, got {value}")
    return float(value)


def check_size(layer, name: str, value) -> int:
    """A size (channels, features, groups, heads, ...) must be a positive int.

    TypeError for a float, a string or a bool (``True`` is an int to Python, never
    a size here); ValueError for 0 or a negative. Returns it as a Python int.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{_name(layer)}: {name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{_name(layer)}: {name} must be a positive int, got {value}")
    return int(value)
