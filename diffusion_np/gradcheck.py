"""Gradient checking: is a hand-written backward right?

The test every backward in this library passes, and the one students run on
their own layers. For a function ``out = f(x)`` and a random upstream gradient
``dout`` (never all ones: ones hide transposition bugs), the scalar

    L(x) = sum(f(x) * dout)

has gradient ``dL/dx = backward(dout)``. We compare that with centred finite
differences, one coordinate at a time, in float64:

    dL/dx_i ~= (L(x + h e_i) - L(x - h e_i)) / (2 h)          (error O(h^2))

and report the relative error ``|a - b| / max(|a| + |b|, tiny)`` (CS231n).
In float64 with h = 1e-6 a correct backward gives about 1e-8 or smaller;
1e-4 or more means a bug.

Left out on purpose: Jacobian-vector tricks and complex-step differentiation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from diffusion_np.backend import asnumpy, get_xp


def rel_error(a, b, floor: float = 1e-12) -> float:
    """Max relative error ``|a - b| / max(|a| + |b|, floor)`` over all entries.

    The floor keeps entries where both values are ~0 from dividing by zero.
    """
    a = np.asarray(asnumpy(a), dtype=np.float64)
    b = np.asarray(asnumpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), floor)))


def grad_rel_error(analytic, numeric) -> float:
    """Relative error of a whole gradient: ``||a - n|| / max(||a|| + ||n||, tiny)``.

    Per-entry relative error blows up where a gradient entry is ~0 for reasons
    of cancellation alone; the norm-wise error is the number we gate on.
    """
    a = np.asarray(asnumpy(analytic), dtype=np.float64).ravel()
    n = np.asarray(asnumpy(numeric), dtype=np.float64).ravel()
    denom = max(np.linalg.norm(a) + np.linalg.norm(n), 1e-30)
    return float(np.linalg.norm(a - n) / denom)


def numerical_gradient(loss: Callable[[], float], x, h: float = 1e-6):
    """Centred finite differences of ``loss()`` w.r.t. every entry of ``x``.

    ``x`` is perturbed **in place** (and restored), so ``loss`` must read it.
    """
    xp = get_xp(x)
    grad = xp.zeros(x.shape, dtype=np.float64)
    flat_x = x.reshape(-1)  # a view: writing it writes x
    flat_g = grad.reshape(-1)
    for i in range(flat_x.size):  # one coordinate at a time: the definition, not fast
        old = float(flat_x[i])
        flat_x[i] = old + h
        plus = loss()
        flat_x[i] = old - h
        minus = loss()
        flat_x[i] = old
        flat_g[i] = (plus - minus) / (2 * h)
    return grad


def _weighted_sum(out, dout) -> float:
    if isinstance(out, tuple):
        return float(sum(float((o * d).sum()) for o, d in zip(out, dout)))
    return float((out * dout).sum())


def _random_like(out, rng):
    if isinstance(out, tuple):
        return tuple(_random_like(o, rng) for o in out)
    xp = get_xp(out)
    return xp.asarray(rng.standard_normal(out.shape))


def check_op(
    forward: Callable,
    backward: Callable,
    inputs: Sequence,
    wrt: Sequence[int] | None = None,
    kwargs: dict | None = None,
    h: float = 1e-6,
    seed: int = 0,
) -> dict[int, float]:
    """Gradient check of a forward/backward function pair.

    Parameters
    ----------
    forward : ``out, cache = forward(*inputs, **kwargs)``
    backward : ``grads = backward(dout, cache)``; a tuple with one gradient per
        input (None where an input has none), or a single array for one input.
    inputs : float64 arrays (they are perturbed in place and restored).
    wrt : indices of the inputs to check; default every input whose gradient is not None.

    Returns
    -------
    ``{input index: relative error}`` (norm-wise, see :func:`grad_rel_error`).
    """
    kwargs = kwargs or {}
    inputs = list(inputs)
    for i, x in enumerate(inputs):
        if hasattr(x, "dtype") and x.dtype != np.float64:
            raise TypeError(f"check_op: input {i} is {x.dtype}; gradient checks need float64")
    rng = np.random.default_rng(seed)
    out, cache = forward(*inputs, **kwargs)
    dout = _random_like(out, rng)
    grads = backward(dout, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    if wrt is None:
        wrt = [i for i, g in enumerate(grads) if g is not None]

    def loss() -> float:
        return _weighted_sum(forward(*inputs, **kwargs)[0], dout)

    return {i: grad_rel_error(grads[i], numerical_gradient(loss, inputs[i], h)) for i in wrt}


def check_module(module, *inputs, h: float = 1e-6, seed: int = 0, check_inputs: bool = True) -> dict:
    """Gradient check of a Module's backward: every input and every parameter.

    The module must already be float64 (``module.to(dtype=np.float64)``) and in
    the mode you want to check (dropout makes a module random: use ``eval()``).
    ``backward`` returns the input gradient (a tuple when the module has several
    differentiable inputs).

    Returns
    -------
    ``{"input0": err, ..., "<param name>": err, ...}`` with norm-wise relative errors.
    """
    rng = np.random.default_rng(seed)
    module.zero_grad()
    out = module.forward(*inputs)
    dout = _random_like(out, rng)
    dinputs = module.backward(dout)
    if not isinstance(dinputs, tuple):
        dinputs = (dinputs,)

    def loss() -> float:
        value = _weighted_sum(module.forward(*inputs), dout)
        module._set_cache(None)  # these forwards are for measuring only
        return value

    report = {}
    if check_inputs:
        for i, (x, dx) in enumerate(zip(inputs, dinputs)):
            if dx is None or not np.issubdtype(x.dtype, np.floating):
                continue
            report[f"input{i}"] = grad_rel_error(dx, numerical_gradient(loss, x, h))
    for name, param, grad in module.parameters_and_grads():
        report[name] = grad_rel_error(grad, numerical_gradient(loss, param, h))
    return report
