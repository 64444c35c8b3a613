"""A strict test device: NumPy doing the math, CuPy's rules enforced.

On a GPU, every device -> host copy is a synchronisation: the CPU waits for the
GPU to finish everything queued before it. CuPy makes some of them an error
(``np.asarray(cupy_array)``) and lets others pass silently (``float(x)``,
``if x.any():``, ``x.item()``): they cost nothing on NumPy, so a CPU-only test
suite never notices them. This module runs the library on the CPU as if it were
on a device, with the device's rules made errors::

    from diffusion_np.testing import strict_backend as strict

    unet.to("strict")                          # the same switch as unet.to("cupy")
    with strict.count_transfers() as counter:
        out = unet(strict.asarray(x), t)       # xp = get_xp(out) is strict.xp
    image = asnumpy(out)                       # the one deliberate device -> host copy
    counter.d2h, counter.h2d                   # how many copies each way

A :class:`StrictArray` wraps a NumPy array and refuses, with a
:class:`DeviceRuleError` that says what to write instead,

* implicit conversion to NumPy: ``np.asarray(x)``, ``np.array(x)``, the buffer
  protocol (CuPy raises here too);
* implicit device -> host copies: ``float(x)``, ``int(x)``, ``bool(x)`` (so
  ``if x:`` and ``max(x, 0)``), ``x.item()``, ``x.tolist()``, ``f"{x:.3f}"``
  (CuPy allows these, at the price of a sync);
* NumPy's functions and ufuncs applied to it (``np.exp(x)``, ``np.concatenate([x,
  y])``: the project's rule is ``xp = get_xp(x)``), and NumPy arrays mixed into
  its arithmetic (``x * host_array``: CuPy raises TypeError).

The only way back to the host is :func:`diffusion_np.backend.asnumpy` (and
``to_device(x, "numpy")``, which calls it); each call counts one device -> host
copy. Host -> device copies (``xp.asarray(host_array)``, ``to_device(x,
"strict")``, a host array used as an index) are allowed and counted: a test can
assert that a sampler step makes none the other way and only small ones this way.

What it does not model: speed, streams, memory limits, and the functions NumPy has
and CuPy lacks (every NumPy function is available as ``xp.<name>``).
"""

from __future__ import annotations

import numbers
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


class DeviceRuleError(TypeError):
    """A NumPy-only habit that CuPy would reject or turn into a device -> host sync."""


@dataclass
class TransferCounter:
    """Copies between host and the strict device since the counter was started."""

    d2h: int = 0  # device -> host copies (asnumpy)
    h2d: int = 0  # host -> device copies (xp.asarray of host data, to_device, host index arrays)
    h2d_bytes: int = 0

    def reset(self) -> None:
        self.d2h = self.h2d = self.h2d_bytes = 0


_COUNTERS: list[TransferCounter] = []  # the active count_transfers() blocks, innermost last


@contextmanager
def count_transfers():
    """Count host <-> device copies inside the ``with`` block (blocks may nest)."""
    counter = TransferCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _count_h2d(nbytes: int) -> None:
    for counter in _COUNTERS:
        counter.h2d += 1
        counter.h2d_bytes += int(nbytes)


def _refuse(what: str, instead: str):
    raise DeviceRuleError(f"{what} on a device array: {instead}")


_TO_HOST = "bring it to the host deliberately, once, with diffusion_np.backend.asnumpy(x)"
_MOVE_IT = "move the host array to the device first (to_device, xp.asarray)"


class StrictArray:
    """A NumPy array that behaves like a CuPy array to the code that uses it (see the module docstring)."""

    __slots__ = ("_a",)

    def __init__(self, data: np.ndarray) -> None:
        object.__setattr__(self, "_a", data)

    # ------------------------------------------------------------ what is refused
    def __array__(self, dtype=None, copy=None):
        _refuse("np.asarray / np.array (an implicit device -> host copy; CuPy raises)", _TO_HOST)

    def __array_function__(self, func, types, args, kwargs):
        if func in _SHAPE_FUNCTIONS:  # np.ndim(x), np.shape(x): shapes are host data (DESIGN.md)
            return func(*_unwrap_all(args, f"np.{func.__name__}"), **kwargs)
        _refuse(f"NumPy's np.{func.__name__}", f"use xp = get_xp(x); xp.{func.__name__}(...)")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        # `np.float32(2) * x` lands here (NumPy's scalar tries first): that is an operator, allowed;
        # np.exp(x), np.maximum(x, 0) and `host_array + x` are not.
        others = [v for v in inputs if v is not self]
        if method == "__call__" and not kwargs and others and all(isinstance(v, np.generic) for v in others):
            return _wrap(getattr(ufunc, method)(*_unwrap_all(inputs, "operator")))
        if any(isinstance(v, np.ndarray) for v in inputs):
            _refuse(f"a NumPy array combined with it by np.{ufunc.__name__}", _MOVE_IT)
        _refuse(f"NumPy's ufunc np.{ufunc.__name__}", f"use xp = get_xp(x); xp.{ufunc.__name__}(...)")

    def __bool__(self):
        _refuse("bool() (`if x:`, `max(x, 0)`: a device -> host sync)", "decide on host numbers, or " + _TO_HOST)

    def __float__(self):
        _refuse("float() (a device -> host sync)", _TO_HOST + " at the boundary, outside the loop")

    def __int__(self):
        _refuse("int() (a device -> host sync)", _TO_HOST)

    def __index__(self):
        _refuse("use as a Python index (a device -> host sync)", _TO_HOST)

    def __complex__(self):
        _refuse("complex() (a device -> host sync)", _TO_HOST)

    def __contains__(self, value):
        _refuse("`in` (a device -> host sync)", _TO_HOST)

    def __format__(self, spec: str) -> str:
        if spec:
            _refuse(f"format spec {spec!r} (a device -> host sync)", _TO_HOST)
        return repr(self)

    def __repr__(self) -> str:  # no values: printing them would be a copy to the host
        return f"StrictArray(shape={self._a.shape}, dtype={self._a.dtype})"

    def __setattr__(self, name, value):
        raise AttributeError(f"StrictArray has no settable attribute {name!r}")

    def __getattr__(self, name: str):
        # dunders stay hidden, so NumPy cannot find __array_interface__ and convert behind our back
        if name == "_a" or name.startswith("__") or name in _REFUSED_METHODS:
            if name in _REFUSED_METHODS:
                _refuse(f"x.{name}() (a device -> host copy)", _TO_HOST)
            raise AttributeError(name)
        value = getattr(self._a, name)
        return _wrap_function(value, f"x.{name}") if callable(value) else _wrap(value)

    # ------------------------------------------------------------ what works as on CuPy
    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    def __getitem__(self, index):
        return _wrap(self._a[_unwrap_index(index)])

    def __setitem__(self, index, value):
        self._a[_unwrap_index(index)] = _unwrap_index(value)

    def __copy__(self):
        return StrictArray(self._a.copy())

    def __deepcopy__(self, memo):
        return StrictArray(self._a.copy())

    def __reduce__(self):  # pickling keeps the device, as CuPy's does
        return (StrictArray, (self._a,))


_SHAPE_FUNCTIONS = {np.ndim, np.shape, np.size}
_REFUSED_METHODS = {"item", "tolist", "tobytes", "tofile", "dump", "dumps", "get"}


def _make_operator(name: str):
    def operator(self, *args):
        return _wrap(getattr(self._a, name)(*_unwrap_all(args, "operator")))

    operator.__name__ = name
    return operator


def _make_inplace(name: str):
    def operator(self, other):
        getattr(self._a, name)(*_unwrap_all((other,), "operator"))
        return self

    operator.__name__ = name
    return operator


for _name in (
    "add sub mul truediv floordiv mod pow matmul and or xor lshift rshift divmod".split()
):
    setattr(StrictArray, f"__{_name}__", _make_operator(f"__{_name}__"))
    setattr(StrictArray, f"__r{_name}__", _make_operator(f"__r{_name}__"))
    if _name != "divmod":
        setattr(StrictArray, f"__i{_name}__", _make_inplace(f"__i{_name}__"))
for _name in "lt le eq ne gt ge neg pos abs invert".split():
    setattr(StrictArray, f"__{_name}__", _make_operator(f"__{_name}__"))
StrictArray.__hash__ = None  # arrays compare elementwise, as NumPy's and CuPy's do


# ---------------------------------------------------------------- wrapping and unwrapping
def _wrap(value):
    """NumPy results -> strict ones: arrays, and NumPy scalars as 0-d arrays (CuPy's reductions
    and integer indexing return 0-d arrays, not host scalars)."""
    if isinstance(value, np.ndarray):
        return StrictArray(value)
    if isinstance(value, np.generic):
        return StrictArray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _unwrap(value, where: str, host_ok: bool = False):
    """Strict arrays -> their NumPy data; a NumPy array passed in is a mistake unless ``host_ok``."""
    if isinstance(value, StrictArray):
        return value._a
    if isinstance(value, np.ndarray):
        if not host_ok:
            _refuse(f"a NumPy (host) array passed to {where}", _MOVE_IT)
        _count_h2d(value.nbytes)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, where, host_ok) for v in value)
    return value


def _unwrap_all(args, where: str, host_ok: bool = False):
    return [_unwrap(v, where, host_ok) for v in args]


def _unwrap_index(index):
    """Indices and assigned values may be host data (CuPy copies it to the device: counted)."""
    if isinstance(index, tuple):
        return tuple(_unwrap(v, "an index", host_ok=True) for v in index)
    if isinstance(index, list) and not all(isinstance(v, numbers.Number) for v in index):
        return index  # a list of slices etc. is left to NumPy
    return _unwrap(index, "an index", host_ok=True)


def _wrap_function(func, where: str, host_ok: bool = False):
    def call(*args, **kwargs):
        args = _unwrap_all(args, where, host_ok)
        kwargs = {k: _unwrap(v, where, host_ok) for k, v in kwargs.items()}
        return _wrap(func(*args, **kwargs))

    call.__name__ = getattr(func, "__name__", where)
    call.__doc__ = getattr(func, "__doc__", None)
    return call


#: the functions through which host data becomes device data (counted)
_FROM_HOST = {"asarray", "array", "asanyarray", "ascontiguousarray"}


class _Namespace:
    """``xp`` for strict arrays: NumPy's names, taking and returning strict arrays."""

    def __init__(self, module, prefix: str) -> None:
        self._module = module
        self._prefix = prefix

    def __getattr__(self, name: str):
        value = getattr(self._module, name)
        where = f"{self._prefix}.{name}"
        if name in _FROM_HOST:
            return _from_host(value)
        if isinstance(value, type(np)):  # xp.linalg, xp.lib.stride_tricks
            return _Namespace(value, where)
        if isinstance(value, type) or not callable(value):  # dtypes, finfo, pi, newaxis
            return value
        return _wrap_function(value, where)

    def __repr__(self) -> str:
        return f"<strict array namespace {self._prefix}>"


def _from_host(func):
    def from_host(data, *args, **kwargs):
        if isinstance(data, StrictArray):
            return _wrap(func(data._a, *args, **kwargs))
        out = func(_unwrap(data, "xp.asarray", host_ok=True), *args, **kwargs)
        if not isinstance(data, (np.ndarray, list, tuple)):  # a Python or NumPy scalar is host data too
            _count_h2d(np.asarray(out).nbytes)
        return _wrap(out)

    return from_host


#: the array module of strict arrays: what ``get_xp(x)`` returns for them
xp = _Namespace(np, "xp")


# ---------------------------------------------------------------- the device's two doors
def asarray(data, dtype=None) -> StrictArray:
    """Host data -> a strict (device) array: ``to_device(x, "strict")`` calls this (counted)."""
    if isinstance(data, StrictArray):
        return data if dtype is None else StrictArray(data._a.astype(dtype, copy=False))
    array = np.array(data, dtype=dtype, copy=True)  # a copy, as a host -> device transfer is
    _count_h2d(array.nbytes)
    return StrictArray(array)


def to_host(x: StrictArray) -> np.ndarray:
    """Strict array -> NumPy copy: the deliberate device -> host transfer, called by ``backend.asnumpy``."""
    for counter in _COUNTERS:
        counter.d2h += 1
    return x._a.copy()


def is_strict(x) -> bool:
    """True for strict arrays."""
    return isinstance(x, StrictArray)


def scatter_add(target: StrictArray, indices, values) -> None:
    """``backend.scatter_add`` on strict arrays (``np.add.at`` on the data, in place)."""
    np.add.at(target._a, _unwrap_index(indices), _unwrap(values, "scatter_add"))


def erf(x: StrictArray) -> StrictArray:
    """``backend.erf`` on strict arrays."""
    from scipy.special import erf as _erf

    return StrictArray(_erf(x._a))
