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

import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from diffusion_np import nn
from diffusion_np.backend import asnumpy, get_xp
from diffusion_np.nn.module import BlockGrads

#: Seed of the random upstream gradient. Not 0 on purpose: inputs drawn with
#: default_rng(0) would make dout equal to x, and then x^T dout is symmetric and a
#: missing transpose in dW goes unnoticed.
_DOUT_SEED = 20_251_127


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


def grad_rel_error(analytic, numeric, atol: float = 1e-12) -> float:
    """Relative error of a whole gradient: ``||a - n|| / max(||a|| + ||n||, tiny)``.

    Per-entry relative error blows up where a gradient entry is ~0 for reasons
    of cancellation alone; the norm-wise error is the number we gate on. A
    difference below ``atol`` in norm counts as agreement (0.0): when the true
    gradient is exactly zero (a softmax over one key, say), the analytic one is
    ~1e-17 of rounding and the numeric one exactly 0, and their ratio means nothing.
    """
    a = np.asarray(asnumpy(analytic), dtype=np.float64).ravel()
    n = np.asarray(asnumpy(numeric), dtype=np.float64).ravel()
    diff = np.linalg.norm(a - n)
    if diff <= atol:
        return 0.0
    return float(diff / max(np.linalg.norm(a) + np.linalg.norm(n), 1e-30))


def numerical_gradient(loss: Callable[[], float], x, h: float = 1e-6, positions=None):
    """Centred finite differences of ``loss()`` w.r.t. every entry of ``x``.

    ``x`` is perturbed **in place** (and restored), so ``loss`` must read it.
    With ``positions`` (indices into ``x.ravel()``) only those entries are
    differentiated and a 1-D array of their derivatives is returned: the way to
    check a parameter with millions of entries at a few random coordinates.
    """
    flat_x = x.reshape(-1)  # a view: writing it writes x
    whole = positions is None
    positions = range(flat_x.size) if whole else positions
    values = np.zeros(len(positions), dtype=np.float64)
    for j, i in enumerate(positions):  # one coordinate at a time: the definition, not fast
        old = float(flat_x[i])
        flat_x[i] = old + h
        plus = loss()
        flat_x[i] = old - h
        minus = loss()
        flat_x[i] = old
        values[j] = (plus - minus) / (2 * h)
    return get_xp(x).asarray(values).reshape(x.shape) if whole else values


def sampled_grad_error(loss: Callable[[], float], x, analytic, k: int, rng: np.random.Generator,
                       h: float = 1e-6) -> float:
    """Norm-wise relative error of ``analytic`` against finite differences at ``k`` random entries of ``x``
    (all of them when ``x`` has no more than ``k``)."""
    size = int(np.prod(x.shape))
    positions = np.arange(size) if size <= k else rng.choice(size, k, replace=False)
    numeric = numerical_gradient(loss, x, h, positions=positions)
    return grad_rel_error(asnumpy(analytic).reshape(-1)[positions], numeric)


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
    seed: int = _DOUT_SEED,
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


def check_module(module, *inputs, h: float = 1e-6, seed: int = _DOUT_SEED, check_inputs: bool = True,
                 max_coordinates: int | None = None) -> dict:
    """Gradient check of a Module's backward: every input and every parameter.

    The module must already be float64 (``module.to(dtype=np.float64)``) and in
    the mode you want to check (dropout makes a module random: use ``eval()``).
    With ``max_coordinates=k`` each input and parameter is checked at k random
    entries only (two forwards per entry: whole models need this).
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
    if isinstance(dinputs, BlockGrads):  # the inputs' gradients in order: dx, then dtemb / dcontext where given
        dinputs = tuple(g for g in dinputs[:3] if g is not None)
    if not isinstance(dinputs, tuple):
        dinputs = (dinputs,)

    def loss() -> float:
        value = _weighted_sum(module.forward(*inputs), dout)
        module._set_cache(None)  # these forwards are for measuring only
        return value

    def error(x, analytic) -> float:
        if max_coordinates is None:
            return grad_rel_error(analytic, numerical_gradient(loss, x, h))
        return sampled_grad_error(loss, x, analytic, max_coordinates, rng, h)

    report = {}
    if check_inputs:
        for i, (x, dx) in enumerate(zip(inputs, dinputs)):
            if dx is None or not np.issubdtype(x.dtype, np.floating):
                continue
            report[f"input{i}"] = error(x, dx)
    for name, param, grad in module.parameters_and_grads():
        report[name] = error(param, grad)
    return report


# ----------------------------------------------------------------------------- every layer, one report
def _layer_cases(rng: np.random.Generator):
    """(name, module, inputs) for every layer, small float64 shapes, odd sizes on purpose."""
    def r(*shape):
        return rng.standard_normal(shape)

    yield "Linear(5 -> 3)", nn.Linear(5, 3, rng=rng), (r(2, 4, 5),)
    yield "Conv2d 3x3 stride 1", nn.Conv2d(3, 4, 3, padding=1, rng=rng), (r(2, 5, 7, 3),)
    yield "Conv2d 3x3 stride 2", nn.Conv2d(3, 4, 3, stride=2, padding=1, rng=rng), (r(1, 7, 5, 3),)
    yield "GroupNorm(2 groups, 6 ch)", nn.GroupNorm(2, 6), (r(2, 3, 5, 6),)
    yield "LayerNorm(6)", nn.LayerNorm(6), (r(2, 5, 6),)
    yield "SiLU", nn.SiLU(), (r(2, 3, 4),)
    yield "GELU (exact erf)", nn.GELU(), (r(2, 3, 4),)
    yield "GEGLU(6 -> 4)", nn.GEGLU(6, 4, rng=rng), (r(2, 3, 6),)
    yield "Attention self, 2 heads", nn.Attention(8, heads=2, dim_head=3, rng=rng), (r(2, 5, 8),)
    yield "Attention cross, ctx (3, 7)", nn.Attention(8, cross_attention_dim=7, heads=2, dim_head=3, rng=rng), (
        r(2, 5, 8),
        r(2, 3, 7),
    )
    yield "Upsample2D (nearest + conv)", nn.Upsample2D(3, rng=rng), (r(1, 3, 5, 3),)
    yield "Downsample2D (stride-2 conv)", nn.Downsample2D(3, rng=rng), (r(2, 6, 5, 3),)
    yield "Downsample2D (VAE, pad 0,1,0,1)", nn.Downsample2D(3, padding=0, rng=rng), (r(1, 6, 6, 3),)
    yield "TimestepEmbedding(6 -> 8)", nn.TimestepEmbedding(6, 8, rng=rng), (r(3, 6),)


def gradcheck_report(seed: int = 0, out=None) -> float:
    """Print each layer's worst finite-difference relative error; return the worst overall."""
    out = out if out is not None else sys.stdout
    rng = np.random.default_rng(seed)
    print("Hand-written backward vs centred finite differences (float64, random upstream gradient)", file=out)
    print(f"{'layer':36s} {'worst rel. error':>17s}  {'checked':s}", file=out)
    worst_all = 0.0
    start = time.perf_counter()
    for name, module, inputs in _layer_cases(rng):
        module.to(dtype=np.float64).eval()
        errors = check_module(module, *inputs)
        worst = max(errors.values())
        worst_all = max(worst_all, worst)
        verdict = "ok" if worst < 1e-6 else "FAIL"
        print(f"{name:36s} {worst:17.2e}  {verdict}: {', '.join(errors)}", file=out)
    print(f"worst: {worst_all:.2e} (bar 1e-6) in {time.perf_counter() - start:.1f} s", file=out)
    return worst_all
