"""The Module base class: named parameters, their gradients, and nothing hidden.

A Module is a container for parameters (``self.params``), their gradients
(``self.grads``, same names and shapes) and child modules. It does two things
with data:

* ``forward(*inputs)`` computes the output and keeps what the backward pass will
  need in ``self._cache`` (one cache: the module remembers its *last* call);
* ``backward(dout)`` turns the gradient of the loss w.r.t. the output into the
  gradient w.r.t. the inputs, and **adds** the parameter gradients into
  ``self.grads`` (``+=``). Zeroing is explicit: call ``zero_grad()`` once per step.

There is no tape and no autograd: composite modules write their backward by
hand, in the reverse order of their forward.

Names are dotted paths built from attribute names, exactly as PyTorch builds
``state_dict`` keys, so ``unet.down_blocks[0].resnets[1].conv1`` owns the
parameter ``down_blocks.0.resnets.1.conv1.weight`` as in diffusers.

Left out on purpose: hooks, buffers that are not parameters, parameter sharing
between modules (a module used twice in one forward would overwrite its cache;
composite modules that need that must handle it explicitly).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from diffusion_np.backend import DEFAULT_DTYPE, asnumpy, device_of, to_device
from diffusion_np.nn import validate
from diffusion_np.nn.fast import parallel


class BlockGrads(NamedTuple):
    """What the backward of every composite block returns: one shape for all of them.

    ``dx`` is the gradient w.r.t. the block's main input (an image ``(B, H, W, C)``
    or tokens ``(B, L, C)``); the other fields are ``None`` where the block has no
    such input (a block without attention has no ``dcontext``; only U-Net down/up
    blocks have skip connections; only a ControlNet and the U-Net it steers use
    ``dmid`` and ``dcond``). Unpack by name, ``g.dx``, ``g.dcontext``.
    """

    dx: Any
    dtemb: Any = None  # (B, temb_dim): the timestep embedding, for blocks that take one
    dcontext: Any = None  # (B, L, D_ctx): the encoder states of cross-attention
    dskips: Any = None  # tuple of skip gradients: outputs of a down block, inputs of an up block
    # (a U-Net given ControlNet residuals: the gradient of each down_block_additional_residual)
    dmid: Any = None  # a U-Net given ControlNet residuals: the gradient of its mid_block_additional_residual
    dcond: Any = None  # (B, H, W, C_cond): a ControlNet's control image


def _one_blas_thread(method):
    """``method`` run with OpenBLAS on one thread while the layers run on two threads or more
    (:data:`diffusion_np.nn.fast.parallel.one_blas_thread`: the layers' own threads split
    the large products, and OpenBLAS's threads would compete with them for the cores)."""

    @functools.wraps(method)
    def scoped(self, *args, **kwargs):
        if parallel.get_threads() <= 1:
            return method(self, *args, **kwargs)
        with parallel.one_blas_thread:
            return method(self, *args, **kwargs)

    return scoped


class Module:
    """Base class of every layer and model. See the module docstring."""

    #: Names of ``forward`` arguments that may hold NaN or Inf on purpose (an attention mask's
    #: -inf): the input check of the outermost call (``__call__``) leaves them out.
    unchecked_inputs: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "backward" in cls.__dict__:  # every backward, as every call (__call__ below)
            cls.backward = _one_blas_thread(cls.__dict__["backward"])

    def __init__(self) -> None:
        # object.__setattr__ avoids our own __setattr__ before these exist
        object.__setattr__(self, "params", {})
        object.__setattr__(self, "grads", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_cache", None)
        object.__setattr__(self, "_keep_cache", True)

    # ------------------------------------------------------------------ structure
    def add_param(self, name: str, value, trainable: bool = True) -> None:
        """Register a parameter and, when ``trainable``, a zero gradient of the same shape.

        A frozen parameter (``trainable=False``) has no gradient buffer at all: it is in
        ``state_dict`` and moves with ``to()``, but no backward writes it, and
        :meth:`parameters_and_grads` (what optimizers walk) leaves it out. LoRA's base
        weights are frozen this way (:mod:`diffusion_np.nn.lora`).
        """
        if "." in name:
            raise ValueError(f"parameter names must not contain '.', got {name!r}")
        self.params[name] = value
        if trainable:
            self.grads[name] = value * 0  # same shape, dtype and device as the value
        else:
            self.grads.pop(name, None)

    def add_grad(self, name: str, value) -> None:
        """``grads[name] += value``: what every backward does with a parameter's gradient;
        nothing for a frozen parameter, which has no gradient buffer (:meth:`freeze`)."""
        if name in self.grads:
            self.grads[name] += value

    def freeze(self) -> Module:
        """Freeze every parameter of this module and its children: their gradient buffers are
        dropped, backward passes no longer accumulate into them, optimizers skip them.
        The input gradients still flow through (fine-tuning a part of a model, LoRA)."""
        for _, module in self.named_modules():
            module.grads.clear()
        return self

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, Module):
            self._modules[name] = value
        elif name in self.__dict__.get("params", {}):
            raise AttributeError(
                f"{type(self).__name__}.{name} is a parameter; change it with "
                f"load_state_dict or in place (self.{name}[...] = ...)"
            )
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str):
        # only called when normal lookup fails: expose parameters as attributes,
        # so a layer can write `self.weight` for `self.params["weight"]`.
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """All modules below this one (itself first), with their dotted names."""
        yield prefix, self
        for child_name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}{child_name}.")

    def named_parameters(self) -> Iterator[tuple[str, object]]:
        """(dotted name, parameter array) for every parameter, in registration order."""
        for prefix, module in self.named_modules():
            for name, value in module.params.items():
                yield prefix + name, value

    def named_grads(self) -> Iterator[tuple[str, object]]:
        """(dotted name, gradient array), aligned with :meth:`named_parameters`."""
        for prefix, module in self.named_modules():
            for name, value in module.grads.items():
                yield prefix + name, value

    def parameters_and_grads(self) -> Iterator[tuple[str, object, object]]:
        """(name, parameter, gradient) triples of the trainable parameters: what an optimizer
        walks over (frozen ones, with no gradient, are left out)."""
        for prefix, module in self.named_modules():
            for name, value in module.params.items():
                if name in module.grads:
                    yield prefix + name, value, module.grads[name]

    def num_parameters(self) -> int:
        """Total number of scalar parameters."""
        return int(sum(int(np.prod(p.shape)) for _, p in self.named_parameters()))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """{dotted name: parameter} (the arrays themselves, not copies)."""
        return dict(self.named_parameters())

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy parameters from ``state`` (arrays of any device; cast to each
        parameter's dtype and device).

        With ``strict=True`` (the default) the names must match exactly; every
        missing, unexpected and mis-shaped key is listed in one ValueError.
        """
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        mismatched = [
            f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
            for k in own
            if k in state and tuple(own[k].shape) != tuple(state[k].shape)
        ]
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            problems.append("shape mismatches: " + "; ".join(mismatched))
        if problems:
            raise ValueError(f"{type(self).__name__}.load_state_dict: " + " | ".join(problems))
        for prefix, module in self.named_modules():
            for name, value in module.params.items():
                key = prefix + name
                if key in state:
                    src = to_device(asnumpy(state[key]), device_of(value))
                    module.params[name] = src.astype(value.dtype, copy=True)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> Module:
        """Training mode (dropout active) for this module and all children."""
        for _, module in self.named_modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> Module:
        """Evaluation mode: ``train(False)``."""
        return self.train(False)

    def inference(self, enabled: bool = True) -> Module:
        """Forward-only mode for this module and all children: forwards keep no cache.

        A cache holds what backward needs (inputs, normalised activations, im2col
        columns...), so a model that only samples pays for it in memory: for Stable
        Diffusion's U-Net at 64x64 latents, gigabytes. In inference mode every
        cache is dropped as soon as the forward that made it returns; backward then
        raises. ``inference(False)`` goes back to training. Independent of
        ``train()``/``eval()``, which switch dropout.
        """
        for _, module in self.named_modules():
            object.__setattr__(module, "_keep_cache", not enabled)
            object.__setattr__(module, "_cache", None)
        return self

    def zero_grad(self) -> None:
        """Set every gradient to zero, in place."""
        for _, g in self.named_grads():
            g[...] = 0

    def to(self, device: str = "numpy", dtype=None) -> Module:
        """Move (and optionally cast) every parameter and gradient.

        ``device`` is "numpy" or "cupy"; ``dtype`` e.g. ``np.float64`` for
        gradient checks. Caches of previous forwards are dropped.
        """
        for _, module in self.named_modules():
            for store in (module.params, module.grads):
                for name, value in store.items():
                    value = to_device(value, device)
                    if dtype is not None:
                        value = value.astype(dtype)
                    store[name] = value
            object.__setattr__(module, "_cache", None)
        return self

    # ------------------------------------------------------------------ calling
    @_one_blas_thread
    def __call__(self, *args, **kwargs):
        # the inputs are checked here, where they come in; the calls are counted so that
        # the layers this call makes skip their own checks (diffusion_np.nn.validate)
        depth = validate.calls.depth
        if depth == 0:
            validate.check_call_inputs(self, args, kwargs)
        validate.calls.depth = depth + 1
        try:
            return self.forward(*args, **kwargs)
        finally:
            validate.calls.depth = depth

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, dout):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def _pop_cache(self):
        """The cache of the last forward; a clear error if there was none.

        Backward consumes the cache so that calling backward twice for one
        forward (which would add the parameter gradients twice) fails loudly.
        """
        cache = self._cache
        if cache is None and not self._keep_cache:
            raise RuntimeError(
                f"{type(self).__name__}.backward: the module is in inference mode and kept no cache; "
                "call inference(False) before the forward whose gradient you need"
            )
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a preceding forward "
                "(or twice for one forward)"
            )
        object.__setattr__(self, "_cache", None)
        return cache

    def _set_cache(self, cache) -> None:
        # in inference mode the cache is dropped here (see inference()), and so is the one an
        # earlier training forward left: a backward must not pair it with this forward
        object.__setattr__(self, "_cache", cache if self._keep_cache else None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_parameters():,} parameters)"


@contextmanager
def inference_mode(*modules):
    """Within the block, ``modules`` (and their children) keep no backward caches
    (:meth:`Module.inference`): each forward drops its cache, and the one an earlier
    training forward left, so a backward raises instead of pairing a stale cache with
    this forward. Afterwards each module goes back to the mode it had. Arguments that
    are not Modules (None, plain functions) are ignored."""
    saved = [(m, m._keep_cache) for module in modules if isinstance(module, Module) for _, m in module.named_modules()]
    for module, _ in saved:
        object.__setattr__(module, "_keep_cache", False)
    try:
        yield
    finally:
        for module, keep in saved:
            object.__setattr__(module, "_keep_cache", keep)


class ModuleList(Module):
    """An indexable list of modules whose names are their positions: ``resnets.0``."""

    def __init__(self, modules=()) -> None:
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> None:
        self._modules[str(len(self._modules))] = module

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


def init_uniform(rng: np.random.Generator, shape: tuple, fan_in: int, dtype=DEFAULT_DTYPE):
    """PyTorch's default init for Linear/Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)
