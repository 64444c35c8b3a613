"""LoRA: low-rank adapters on frozen Linear and Conv2d layers, and putting them into a model.

Implements Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
A pretrained weight W0 (d_out x d_in) stays frozen; what is trained is a low-rank
update ``Delta W = B A`` with ``B`` (d_out x r), ``A`` (r x d_in), ``r << min(d_in, d_out)``
(Eq. 3), scaled by ``alpha / r`` (Section 4.1)::

    h = W0 x + (alpha / r) B A x                                       LoRA Eq. (3), Sec. 4.1

For several adapters at once (named, each with its own rank, alpha and a user scale
``lambda``, as peft's ``set_adapter`` / ``set_scale``)::

    h = W0 x + b + sum_a s_a B_a A_a drop_a(x),      s_a = lambda_a * alpha_a / r_a

``drop_a`` is inverted dropout on the adapter's input (peft's ``lora_dropout``), the
identity in eval mode. ``B`` starts at zero, so an untrained adapter changes nothing;
``A`` starts as peft's default, ``kaiming_uniform_(a=sqrt(5))``, which is
U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's Linear/Conv init (the paper uses a Gaussian).

Backward, with ``g = dL/dh`` and ``x_a = drop_a(x)``, ``u_a = A_a x_a`` (the r-wide bottleneck)::

    dL/dB_a = s_a g u_a^T                  dL/dA_a = s_a (B_a^T g) x_a^T
    dL/dx   = W0^T g + sum_a drop_a'(s_a A_a^T B_a^T g)
    dL/dW0  : not computed, not stored (frozen)

The frozen base weight is registered with ``add_param(..., trainable=False)``: it has
no gradient buffer, is absent from ``parameters_and_grads`` (optimizers do not see it)
and is still in ``state_dict`` under its old name. For a Stable Diffusion U-Net with
rank-4 adapters on the attention projections that is 0.8M trainable numbers instead of 860M.

The convolution variant follows peft: ``A`` is a convolution with the base layer's
kernel size, stride and padding (C_in -> r), ``B`` a 1x1 convolution (r -> C_out), so
``Delta W[p, q, c, o] = s sum_k A[p, q, c, k] B[0, 0, k, o]`` (our layout (kh, kw, C_in, C_out)).

Merging (Hu et al. Sec. 4.1: "no additional inference latency"): ``W <- W0 + sum_a s_a Delta W_a``
makes the adapted layer a plain layer again. Floating point does not undo that by a
subtraction (``(W0 + D) - D`` differs from ``W0`` in the last bit where rounding hit),
so :meth:`merge` keeps W0 and :meth:`unmerge` puts it back exactly.

Parameter names follow peft inside a model (``to_q.lora_A.default.weight``,
``to_q.lora_B.default.weight``: one child per adapter name), while the base keeps its
own (``to_q.weight``, not peft's ``to_q.base_layer.weight``), so a loaded checkpoint still
fits. :func:`lora_state_dict` drops the adapter name, which gives the keys of
diffusers' ``pytorch_lora_weights.safetensors`` (``...to_q.lora_A.weight``).

Left out on purpose: rsLoRA, DoRA, LoHa/LoKr, trainable biases on the adapter, and
embedding layers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np

from diffusion_np.backend import device_of
from diffusion_np.nn.activation import Dropout
from diffusion_np.nn.conv import Conv2d, _col2im_dx, conv2d_forward
from diffusion_np.nn.linear import Linear, linear_forward
from diffusion_np.nn.module import Module
from diffusion_np.nn.validate import check_features, check_image, check_input_finite

__all__ = [
    "ATTENTION_TARGETS",
    "TEXT_ENCODER_TARGETS",
    "LoRAConv2d",
    "LoRALinear",
    "add_lora",
    "disable_lora",
    "lora_layers",
    "lora_state_dict",
    "merge_lora",
    "set_lora_adapter",
    "set_lora_scale",
    "unmerge_lora",
]

#: the attention projections of the U-Net (and VAE), diffusers' names: LoRA's usual targets
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: the CLIP text encoder's attention projections (transformers' names), as diffusers targets them
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class _Adapters(Module):
    """A dict of modules named by adapter: its children are ``lora_A.default``, ``lora_A.style``, ..."""

    def __getitem__(self, name: str) -> Module:
        return self._modules[name]

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def add(self, name: str, module: Module) -> None:
        self._modules[name] = module

    def remove(self, name: str) -> None:
        del self._modules[name]


class _LoRALayer(Module):
    """What :class:`LoRALinear` and :class:`LoRAConv2d` share: the adapters and their
    bookkeeping (ranks, alphas, scales, which are active), merging. Subclasses make the
    A/B modules (:meth:`_make_pair`), the delta weight, and the base op's forward/backward."""

    def __init__(self, base: Module) -> None:
        super().__init__()
        for name, value in base.params.items():  # the base's arrays themselves, frozen: no gradient buffer
            self.add_param(name, value, trainable=False)
        self.training = base.training
        self._keep_cache = base._keep_cache
        self.lora_A = _Adapters()
        self.lora_B = _Adapters()
        self.lora_dropout = _Adapters()
        self.ranks: dict[str, int] = {}
        self.alphas: dict[str, float] = {}
        self.scales: dict[str, float] = {}  # the user's lambda_a, 1 unless set_scale changed it
        self.active: list[str] = []
        self.disabled = False
        self._merged: tuple | None = None  # (saved W0, names merged) while merged

    @classmethod
    def wrap(cls, base: Module, name: str = "default", rank: int = 4, alpha: float | None = None,
             dropout: float = 0.0, rng=None, seed: int = 0):
        """``base`` wrapped (its arrays taken over, not copied), with one adapter (:meth:`add_adapter`)."""
        layer = cls(base)
        layer.add_adapter(name, rank, alpha, dropout, rng, seed)
        return layer

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str = "default", rank: int = 4, alpha: float | None = None,
                    dropout: float = 0.0, rng=None, seed: int = 0) -> None:
        """Add an adapter ``name`` of rank ``rank``; scaling ``alpha / rank`` (alpha defaults to rank).

        ``A`` is drawn from ``rng`` (U(-1/sqrt(fan_in), 1/sqrt(fan_in)), peft's default),
        ``B`` is zero. ``dropout`` is the probability of inverted dropout on the adapter's
        input (its generator seeded with ``seed``). The new adapter becomes active, beside
        those already active.
        """
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"add_adapter: name must be a non-empty string without '.', got {name!r}")
        if name in self.ranks:
            raise ValueError(f"add_adapter: {type(self).__name__} already has an adapter {name!r}")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"add_adapter: rank must be a positive int, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if not np.isfinite(alpha):
            raise ValueError(f"add_adapter: alpha must be a finite number, got {alpha!r}")
        if self._merged is not None:
            raise RuntimeError("add_adapter: the layer is merged; unmerge it first")
        rng = rng if rng is not None else np.random.default_rng(0)
        a, b = self._make_pair(int(rank), rng)
        b.params["weight"][...] = 0  # B = 0: the adapted layer starts equal to the base (Hu et al. Sec. 4.1)
        device = device_of(self.weight)
        for module in (a, b):
            module.to(device)
        drop = Dropout(dropout, seed=seed)
        for module in (a, b, drop):
            module.train(self.training)
            if not self._keep_cache:
                module.inference()
        self.lora_A.add(name, a)
        self.lora_B.add(name, b)
        self.lora_dropout.add(name, drop)
        self.ranks[name], self.alphas[name], self.scales[name] = int(rank), alpha, 1.0
        self.active.append(name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` and its parameters."""
        self._check_name(name)
        if self._merged is not None:
            raise RuntimeError("delete_adapter: the layer is merged; unmerge it first")
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            store.remove(name)
        for table in (self.ranks, self.alphas, self.scales):
            del table[name]
        if name in self.active:
            self.active.remove(name)

    def set_adapter(self, names) -> None:
        """Make ``names`` (one name or a list) the active adapters, in that order."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            self._check_name(name)
        if self._merged is not None:
            raise RuntimeError("set_adapter: the layer is merged; unmerge it first")
        self.active = names

    def set_scale(self, name: str, scale: float) -> None:
        """``lambda_a``: the adapter's update is multiplied by ``scale`` (peft's ``set_scale``)."""
        self._check_name(name)
        if self._merged is not None:
            raise RuntimeError("set_scale: the layer is merged; unmerge it first")
        self.scales[name] = float(scale)

    def scaling(self, name: str) -> float:
        """``s_a = lambda_a * alpha_a / r_a`` (a Python float: float32 stays float32)."""
        return self.scales[name] * self.alphas[name] / self.ranks[name]

    def _check_name(self, name: str) -> None:
        if name not in self.ranks:
            raise ValueError(
                f"{type(self).__name__} has no adapter {name!r}; it has {sorted(self.ranks) or 'none'}"
            )

    @property
    def merged(self) -> bool:
        return self._merged is not None

    # ------------------------------------------------------------------ merging
    def delta_weight(self, name: str):
        """``s_a B_a A_a`` in the base weight's layout (see the subclass)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def merge(self) -> None:
        """``W <- W0 + sum over active adapters of s_a Delta W_a``, in place; W0 is kept for :meth:`unmerge`.

        While merged the forward is the base op alone (the adapters are in W), and
        backward raises: unmerge to train.
        """
        if self._merged is not None:
            raise RuntimeError(f"{type(self).__name__} is already merged")
        weight = self.params["weight"]
        saved = weight.copy()  # W0 exactly: a subtraction would not give it back bit for bit
        for name in self.active:
            weight += self.delta_weight(name)
        self._merged = (saved, tuple(self.active))

    def unmerge(self) -> None:
        """Put back W0 as it was before :meth:`merge`, bit for bit."""
        if self._merged is None:
            raise RuntimeError(f"{type(self).__name__} is not merged")
        saved, _ = self._merged
        self.params["weight"][...] = saved
        self._merged = None

    # ------------------------------------------------------------------ forward / backward
    def _base_forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _base_input_grad(self, dout, meta):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        """``h = base(x) + sum_a s_a B_a(A_a(drop_a(x)))`` over the active adapters (module docstring)."""
        y, meta = self._base_forward(x)  # the frozen base: W0 x + b
        ran = []  # (name, s_a) of the adapters this forward used, for the backward
        if not self.disabled and self._merged is None:
            for name in self.active:
                s = self.scaling(name)
                x_a = self.lora_dropout[name](x)  # inverted dropout on the adapter input
                u = self.lora_A[name](x_a)  # (..., in) -> (..., r)   the bottleneck
                y += s * self.lora_B[name](u)  # (..., r) -> (..., out), scaled by alpha / r
                ran.append((name, s))
        self._set_cache((meta, tuple(ran), self._merged is not None))
        return y

    def backward(self, dout):
        """``dx`` of the whole layer; adds ``dA``/``dB`` into the adapters' grads, none for W0, b."""
        meta, ran, merged = self._pop_cache()
        if merged:
            raise RuntimeError(
                f"{type(self).__name__}.backward: the adapters are merged into the weight, so their "
                "gradients are not defined; call unmerge (unmerge_lora) before training"
            )
        dx = self._base_input_grad(dout, meta)  # W0^T g only: no dW0, no db
        for name, s in reversed(ran):  # the forward's adapters, in reverse
            du = self.lora_B[name].backward(s * dout)  # (..., out) -> (..., r); dB += s g u^T
            dx_a = self.lora_A[name].backward(du)  # (..., r) -> (..., in); dA += (s B^T g) x_a^T
            dx += self.lora_dropout[name].backward(dx_a)  # the same dropout mask as the forward
        return dx

    def __repr__(self) -> str:
        adapters = ", ".join(f"{n}: r={self.ranks[n]}, alpha={self.alphas[n]:g}" for n in self.ranks)
        return f"{type(self).__name__}({adapters}{', merged' if self.merged else ''})"


class LoRALinear(_LoRALayer):
    """A frozen :class:`~diffusion_np.nn.Linear` plus LoRA adapters (the module docstring's math).

    Build it from a Linear with :meth:`wrap` (the base's arrays are taken over, not
    copied), or ``LoRALinear(linear)`` and then :meth:`add_adapter`.
    Parameters: ``weight`` (out, in) and ``bias`` (out,), frozen; per adapter
    ``lora_A.<name>.weight`` (r, in) and ``lora_B.<name>.weight`` (out, r),
    peft's shapes and names. Shapes: x (..., in) -> (..., out).
    """

    def __init__(self, base: Linear) -> None:
        if not isinstance(base, Linear):
            raise TypeError(f"LoRALinear wraps a Linear, got {type(base).__name__}")
        super().__init__(base)
        self.in_features, self.out_features = base.in_features, base.out_features

    def _make_pair(self, rank: int, rng):
        dtype = self.weight.dtype
        a = Linear(self.in_features, rank, bias=False, rng=rng, dtype=dtype)  # (r, in), U(+-1/sqrt(in))
        b = Linear(rank, self.out_features, bias=False, rng=rng, dtype=dtype)  # (out, r), zeroed by the caller
        return a, b

    def delta_weight(self, name: str):
        """``s_a B_a A_a``: (out, r) @ (r, in) -> (out, in)."""
        self._check_name(name)
        return self.scaling(name) * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def _base_forward(self, x):
        check_features(self, x, self.in_features, min_ndim=2)
        check_input_finite(self, x)
        # the base Linear's own op, so an adapter at scale 0 gives the base layer's output bit for bit
        y, _ = linear_forward(x, self.weight, self.params.get("bias"))  # (..., in) -> (..., out)
        return y, None  # dx needs only W0: nothing of x is kept for the base

    def _base_input_grad(self, dout, meta):
        n_out = dout.shape[-1]
        dx = dout.reshape(-1, n_out) @ self.weight  # (N, out) @ (out, in): one product, as linear_backward
        return dx.reshape(*dout.shape[:-1], self.in_features)


class LoRAConv2d(_LoRALayer):
    """A frozen :class:`~diffusion_np.nn.Conv2d` plus LoRA adapters, as peft's ``lora.Conv2d``.

    Per adapter ``lora_A.<name>`` is a Conv2d C_in -> r with the base's kernel size,
    stride and padding, ``lora_B.<name>`` a 1x1 Conv2d r -> C_out; so the update is the
    rank-r kernel ``Delta W = s A B`` (see :meth:`delta_weight`). Works for 1x1 and kxk bases.
    Shapes: x (B, H, W, C_in) -> (B, Ho, Wo, C_out).
    """

    def __init__(self, base: Conv2d) -> None:
        if not isinstance(base, Conv2d):
            raise TypeError(f"LoRAConv2d wraps a Conv2d, got {type(base).__name__}")
        super().__init__(base)
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride, self.padding = base.kernel_size, base.stride, base.padding
        self.method = base.method

    def _make_pair(self, rank: int, rng):
        dtype = self.weight.dtype
        a = Conv2d(self.in_channels, rank, self.kernel_size, stride=self.stride, padding=self.padding, bias=False,
                   rng=rng, dtype=dtype, method=self.method)  # (kh, kw, C_in, r)
        b = Conv2d(rank, self.out_channels, 1, bias=False, rng=rng, dtype=dtype)  # (1, 1, r, C_out)
        return a, b

    def delta_weight(self, name: str):
        """``s_a A_a B_a`` as a kernel: (kh*kw*C_in, r) @ (r, C_out) -> (kh, kw, C_in, C_out).

        A 1x1 convolution after a kxk one is one kxk convolution whose kernel is the
        product over the r channels in between.
        """
        self._check_name(name)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        kh, kw, C_in, r = a.shape
        delta = a.reshape(kh * kw * C_in, r) @ b.reshape(r, self.out_channels)  # (K, r) @ (r, C_out)
        return self.scaling(name) * delta.reshape(kh, kw, C_in, self.out_channels)

    def _base_forward(self, x):
        check_image(self, x, self.in_channels)
        check_input_finite(self, x)
        y, cache = conv2d_forward(x, self.weight, self.params.get("bias"), self.stride, self.padding, self.method)
        # only the input shape is kept: dx needs W0 and the geometry, not the forward's columns
        return y, tuple(x.shape)

    def _base_input_grad(self, dout, x_shape):
        _, H, W, _ = x_shape
        # dx alone, as conv2d's reference backward computes it (col2im): no dW0 is formed
        return _col2im_dx(dout, self.weight, self.stride, self.padding, H, W)


# ============================================================================ a whole model

def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    """A dotted module path matches a pattern that equals its tail (``to_q`` matches
    ``...attn1.to_q``; ``attn2.to_k`` matches ``...attn2.to_k``), or a glob over the whole path."""
    for pattern in patterns:
        if path == pattern or path.endswith("." + pattern):
            return True
        if any(ch in pattern for ch in "*?[") and fnmatch.fnmatchcase(path, pattern):
            return True
    return False


def _named_children(model: Module):
    """(path, parent, child name, child) for every module below ``model``."""
    for prefix, parent in model.named_modules():
        for child_name, child in parent._modules.items():
            yield prefix + child_name, parent, child_name, child


def add_lora(model: Module, target: Iterable[str] | str = ATTENTION_TARGETS, rank: int = 4,
             alpha: float | None = None, dropout: float = 0.0, adapter_name: str = "default",
             rng=None, seed: int = 0, freeze_base: bool = True) -> list[str]:
    """Put a LoRA adapter on every Linear/Conv2d of ``model`` whose path matches ``target``.

    ``target``: names matched against the end of each module's dotted path (``"to_q"``
    matches ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``; ``"to_out.0"``
    the output projection), or glob patterns over the whole path
    (``"down_blocks.*.resnets.*.conv1"``). :data:`ATTENTION_TARGETS` for the U-Net,
    :data:`TEXT_ENCODER_TARGETS` for the text encoder.

    A layer met the first time is replaced, in its parent, by a :class:`LoRALinear` or
    :class:`LoRAConv2d` that takes over its arrays (the parameter names of the base stay as
    they were); an already adapted layer gets one more adapter named ``adapter_name``.
    Adapters are drawn from ``rng`` in path order. Returns the adapted paths.

    ``freeze_base`` (the default, as peft's ``get_peft_model``): every other parameter of
    ``model`` is frozen too (:meth:`~diffusion_np.nn.Module.freeze`: no gradient buffers),
    so the model's trainable parameters are the adapters alone and an optimizer built on
    it trains nothing else. Adapters of earlier calls stay trainable.
    Raises ValueError when nothing matches or a match is not a Linear/Conv2d.
    """
    patterns = (target,) if isinstance(target, str) else tuple(target)
    if not patterns:
        raise ValueError("add_lora: target names no layer (an empty sequence)")
    rng = rng if rng is not None else np.random.default_rng(0)
    found = [(path, parent, name, child) for path, parent, name, child in _named_children(model)
             if _matches(path, patterns)]
    if not found:
        raise ValueError(f"add_lora: no module of {type(model).__name__} matches target {patterns}")
    if freeze_base:
        _freeze_base(model)
    done = []
    for i, (path, parent, name, child) in enumerate(found):
        if isinstance(child, _LoRALayer):
            layer = child
        elif isinstance(child, Linear):
            layer = LoRALinear(child)
        elif isinstance(child, Conv2d):
            layer = LoRAConv2d(child)
        else:
            raise ValueError(f"add_lora: {path} is a {type(child).__name__}; LoRA wraps Linear and Conv2d layers")
        layer.add_adapter(adapter_name, rank, alpha, dropout, rng, seed + i)
        if layer is not child:
            _replace_child(parent, name, layer)
        done.append(path)
    return done


def _freeze_base(model: Module) -> None:
    """Drop the gradient buffers of every module of ``model`` except the LoRA adapters."""
    adapters = {id(m) for layer in lora_layers(model).values() for store in (layer.lora_A, layer.lora_B)
                for _, m in store.named_modules()}
    for _, module in model.named_modules():
        if id(module) not in adapters:
            module.grads.clear()


def _replace_child(parent: Module, name: str, new: Module) -> None:
    """Swap a child module in place, keeping its position (so parameter order) and name."""
    parent._modules[name] = new
    if name in parent.__dict__:  # children set as attributes (self.to_q = ...); ModuleList holds them by index
        object.__setattr__(parent, name, new)


def lora_layers(model: Module) -> dict[str, _LoRALayer]:
    """{dotted path: LoRA layer} of every adapted layer in ``model``."""
    return {path[:-1] if path.endswith(".") else path: m for path, m in model.named_modules()
            if isinstance(m, _LoRALayer)}


def _layers_or_raise(model: Module, what: str) -> dict[str, _LoRALayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no LoRA layers (call add_lora first)")
    return layers


def merge_lora(model: Module) -> int:
    """Merge the active adapters of every LoRA layer into its weight; returns how many layers."""
    layers = _layers_or_raise(model, "merge_lora")
    for layer in layers.values():
        layer.merge()
    return len(layers)


def unmerge_lora(model: Module) -> int:
    """Undo :func:`merge_lora`: every base weight back bit for bit; returns how many layers."""
    layers = _layers_or_raise(model, "unmerge_lora")
    for layer in layers.values():
        layer.unmerge()
    return len(layers)


def set_lora_adapter(model: Module, names) -> None:
    """Make ``names`` (one or a list) the active adapters of every LoRA layer that has them all."""
    wanted = [names] if isinstance(names, str) else list(names)
    layers = _layers_or_raise(model, "set_lora_adapter")
    hits = 0
    for layer in layers.values():
        if all(n in layer.ranks for n in wanted):
            layer.set_adapter(wanted)
            hits += 1
    if not hits:
        raise ValueError(f"set_lora_adapter: no LoRA layer has the adapters {wanted}")


@contextmanager
def disable_lora(model: Module) -> Iterator[Module]:
    """Inside ``with disable_lora(model):`` every LoRA layer of ``model`` runs its base alone (peft's
    ``disable_adapter()``): the frozen model's outputs, bit for bit, whatever the adapters hold."""
    layers = list(_layers_or_raise(model, "disable_lora").values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


def set_lora_scale(model: Module, name: str, scale: float) -> None:
    """Set ``lambda`` of adapter ``name`` in every layer that has it (0 switches it off smoothly)."""
    layers = [layer for layer in _layers_or_raise(model, "set_lora_scale").values() if name in layer.ranks]
    if not layers:
        raise ValueError(f"set_lora_scale: no LoRA layer has an adapter {name!r}")
    for layer in layers:
        layer.set_scale(name, scale)


def lora_state_dict(model: Module, adapter_name: str = "default") -> dict:
    """The adapter's parameters only, with peft's saved names: ``<path>.lora_A.weight``, ``<path>.lora_B.weight``.

    The adapter name is dropped (``to_q.lora_A.default.weight`` -> ``to_q.lora_A.weight``), as
    peft's ``get_peft_model_state_dict`` does; arrays in our layout (a conv's A is
    (kh, kw, C_in, r)). :mod:`diffusion_np.io.lora` writes them as diffusers or kohya files.
    """
    out = {}
    for path, layer in _layers_or_raise(model, "lora_state_dict").items():
        if adapter_name in layer.ranks:
            out[f"{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
    if not out:
        raise ValueError(f"lora_state_dict: no LoRA layer has an adapter {adapter_name!r}")
    return out
