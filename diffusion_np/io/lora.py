"""LoRA files as people share them: read into our U-Net and text encoder, and written back.

Two layouts are in circulation for Stable Diffusion 1.x, both safetensors files:

* **diffusers / peft** (``pytorch_lora_weights.safetensors``, written by diffusers'
  ``save_lora_weights`` and its training scripts)::

      unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   (r, in)
      unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   (out, r)
      text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight

  with the alphas, if anywhere, in the file's metadata (``lora_adapter_metadata``: JSON
  ``{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {...}, ...}``, a peft
  ``LoraConfig`` per model); without it alpha = r (scale 1), as diffusers assumes. Older
  diffusers files name the pair ``...to_q.lora.down.weight`` / ``lora.up.weight``, or
  ``...attn1.processor.to_q_lora.down.weight`` (attention processors, diffusers < 0.20),
  ``...q_proj.lora_linear_layer.down.weight`` for the text encoder; keys without a
  ``unet.`` / ``text_encoder.`` prefix are the U-Net's. Files saved from transformers 5's
  ``CLIPTextModel`` (which has no ``text_model`` submodule) name the text encoder's layers
  ``text_encoder.encoder.layers.0.self_attn.q_proj...``: read as the ``text_model.`` paths, as
  the weights loader reads such text encoders.

* **kohya / A1111** (sd-scripts, the web UIs, most files on model sites)::

      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight
      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha          ()
      lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight

  the diffusers module path with ``_`` for ``.`` (ambiguous by itself: ``down_blocks``
  holds an underscore too, so a name is resolved against the model's own module paths),
  and one alpha per layer.

Either way a layer's update is ``(alpha / r) up @ down`` (:mod:`diffusion_np.nn.lora`):
``down`` is LoRA's A, ``up`` its B. Tensors are converted as the weights loader does
(:func:`diffusion_np.io.diffusers.convert_tensor`: float16/bfloat16 widened, conv weights
transposed to our (kh, kw, C_in, C_out)). Every problem (a key of no known layout, a layer
the model lacks, a shape that does not fit) is collected and raised as one
:class:`~diffusion_np.io.diffusers.WeightsError`.

Left out: SDXL files (``lora_te1_``/``lora_te2_``), LyCORIS variants (LoHa ``hada_``,
LoKr ``lokr_``, DoRA ``dora_scale``), kohya files with the original LDM names
(``lora_unet_input_blocks_1_1_...``), and pickle files (refused, as everywhere).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors.numpy import save_file

from diffusion_np.backend import asnumpy
from diffusion_np.io.diffusers import WeightsError, convert_tensor, read_safetensors
from diffusion_np.nn.conv import Conv2d
from diffusion_np.nn.linear import Linear
from diffusion_np.nn.lora import _LoRALayer, add_lora, lora_layers
from diffusion_np.nn.module import Module

__all__ = ["LORA_WEIGHT_NAME", "LoRATensors", "load_lora", "load_lora_weights", "parse_lora_spec", "read_lora",
           "save_lora"]

#: the file name diffusers writes and looks for in a folder
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_COMPONENTS = ("unet", "text_encoder")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


class LoRATensors(NamedTuple):
    """One layer's adapter as stored: PyTorch layout, the file's dtype."""

    down: np.ndarray  # A: (r, in) or (r, C_in, kh, kw)
    up: np.ndarray  # B: (out, r) or (C_out, r, 1, 1)
    alpha: float | None  # None: not in the file (alpha = r)


# ============================================================================ reading
#: (regex on the key without its component prefix, A/B) for the diffusers layouts, newest first
_DIFFUSERS_PATTERNS = (
    (re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])\.weight$"), None),
    (re.compile(r"^(?P<path>.+)\.lora\.(?P<ab>down|up)\.weight$"), None),
    (re.compile(r"^(?P<path>.+)\.lora_linear_layer\.(?P<ab>down|up)\.weight$"), None),
    (re.compile(r"^(?P<parent>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ab>down|up)\.weight$"),
     "processor"),
)
_KOHYA = re.compile(
    r"^(?P<path>lora_(?:unet|te)_[A-Za-z0-9_]+)\.(?:(?P<ab>lora_down|lora_up)\.weight|(?P<alpha>alpha))$"
)
_UNSUPPORTED = (("lora_te1_", "SDXL"), ("lora_te2_", "SDXL"), (".hada_", "LyCORIS LoHa"), (".lokr_", "LyCORIS LoKr"),
                (".dora_scale", "DoRA"))


def _read_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors header ({} if none): 8-byte length, then JSON."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            return json.loads(f.read(n)).get("__metadata__") or {}
        except ValueError:
            return {}  # read_safetensors has already said what is wrong with such a file


def _resolve_file(path) -> Path:
    path = Path(path)
    return path / LORA_WEIGHT_NAME if path.is_dir() else path


def read_lora(path) -> tuple[dict[str, dict[str, LoRATensors]], str]:
    """The adapters of a LoRA file (or of a folder's ``pytorch_lora_weights.safetensors``).

    Returns ``({"unet": {layer: LoRATensors}, "text_encoder": {...}}, layout)`` with
    ``layout`` "diffusers" or "kohya". Layer names are diffusers module paths
    (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``) for diffusers files;
    for kohya files they are the flat names (``down_blocks_0_attentions_0_..._to_q``), which
    :func:`load_lora` resolves against a model.
    """
    path = _resolve_file(path)
    tensors = read_safetensors(path)
    problems = [f"{key}: {what} is not supported" for key in tensors for marker, what in _UNSUPPORTED if marker in key]
    if problems:
        raise WeightsError(f"{path}: " + "; ".join(problems))
    kohya = any(key.startswith(tuple(_KOHYA_PREFIXES)) for key in tensors)
    parts: dict[str, dict[str, dict]] = {c: {} for c in _COMPONENTS}
    unknown = []
    for key, array in tensors.items():
        found = _parse_kohya(key) if kohya else _parse_diffusers(key)
        if found is None:
            unknown.append(key)
            continue
        component, layer, field = found
        parts[component].setdefault(layer, {})[field] = array
    alphas = {} if kohya else _metadata_alphas(_read_metadata(path), parts)
    out: dict[str, dict[str, LoRATensors]] = {c: {} for c in _COMPONENTS}
    for component, layers in parts.items():
        for layer, fields in layers.items():
            if "down" not in fields or "up" not in fields:
                unknown.append(f"{component} {layer}: has {sorted(fields)}, needs both down (A) and up (B)")
                continue
            alpha = fields.get("alpha")
            alpha = float(np.asarray(alpha, dtype=np.float64).reshape(-1)[0]) if alpha is not None else None
            out[component][layer] = LoRATensors(fields["down"], fields["up"],
                                                alpha if alpha is not None else alphas.get((component, layer)))
    if unknown:
        raise WeightsError(f"{path}: {len(unknown)} key(s) of no LoRA layout this reader knows: " + ", ".join(unknown))
    if not any(out.values()):
        raise WeightsError(f"{path} holds no LoRA layers")
    return out, "kohya" if kohya else "diffusers"


def _text_model_path(component: str, path: str, sep: str = ".") -> str:
    """A text-encoder layer path with CLIPTextModel's ``text_model`` prefix (``sep``: "." or kohya's "_"):
    transformers 5 flattened the model, so its LoRA files name ``encoder.layers.0...``; ours keeps the prefix."""
    prefix = "text_model" + sep
    return path if component != "text_encoder" or path.startswith(prefix) else prefix + path


def _parse_diffusers(key: str):
    """``(component, module path, "down"|"up"|"alpha")`` of a diffusers-layout key, or None."""
    component = "unet"
    for prefix in _COMPONENTS:
        if key.startswith(prefix + "."):
            component, key = prefix, key[len(prefix) + 1:]
            break
    if key.endswith(".alpha"):  # some converted files keep kohya's alphas beside diffusers names
        return component, _text_model_path(component, key[: -len(".alpha")]), "alpha"
    for pattern, kind in _DIFFUSERS_PATTERNS:
        m = pattern.match(key)
        if m is None:
            continue
        field = {"A": "down", "B": "up", "down": "down", "up": "up"}[m["ab"]]
        if kind == "processor":  # attn1.processor.to_out_lora -> attn1.to_out.0
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            return component, f"{m['parent']}.{proj}", field
        return component, _text_model_path(component, m["path"]), field
    return None


def _parse_kohya(key: str):
    m = _KOHYA.match(key)
    if m is None:
        return None
    flat = m["path"]
    for prefix, component in _KOHYA_PREFIXES.items():
        if flat.startswith(prefix):
            field = "alpha" if m["alpha"] else ("down" if m["ab"] == "lora_down" else "up")
            return component, _text_model_path(component, flat[len(prefix):], "_"), field
    return None  # pragma: no cover - the regex admits only these prefixes


def _metadata_alphas(metadata: dict, parts: dict) -> dict:
    """{(component, layer): alpha} from diffusers' ``lora_adapter_metadata`` (peft LoraConfig fields:
    ``lora_alpha`` for all layers, ``alpha_pattern`` {name: alpha} for those whose path ends in name)."""
    raw = metadata.get(_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise WeightsError(f"the file's {_METADATA_KEY} is not JSON") from None
    alphas = {}
    for component, layers in parts.items():
        default = config.get(f"{component}.lora_alpha")
        pattern = config.get(f"{component}.alpha_pattern") or {}
        for layer in layers:
            alpha = default
            for name, value in pattern.items():
                if layer == name or layer.endswith("." + name):
                    alpha = value
            if alpha is not None:
                alphas[(component, layer)] = float(alpha)
    return alphas


# ============================================================================ into a model
def _adaptable_paths(model: Module) -> dict[str, str]:
    """{flat kohya name: module path} of every Linear, Conv2d or LoRA layer of ``model``."""
    return {path.rstrip(".").replace(".", "_"): path.rstrip(".") for path, m in model.named_modules()
            if isinstance(m, (Linear, Conv2d, _LoRALayer))}


def load_lora(path, unet: Module | None = None, text_encoder: Module | None = None, adapter_name: str = "default",
              scale: float = 1.0) -> dict[str, list[str]]:
    """Add the adapters of a LoRA file to ``unet`` and/or ``text_encoder`` (the file's other parts must be
    given a model too), as adapter ``adapter_name`` with user scale ``scale``.

    Each layer gets rank r = the file's down.shape[0] and its alpha (r when the file has none).
    The models' other parameters are frozen (:func:`~diffusion_np.nn.lora.add_lora`). Nothing is
    changed unless every tensor fits. Returns ``{component: [adapted module paths]}``.
    """
    models = {"unet": unet, "text_encoder": text_encoder}
    parts, layout = read_lora(path)
    plan, problems = [], []
    for component, layers in parts.items():
        if not layers:
            continue
        model = models[component]
        if model is None:
            problems.append(f"the file has {len(layers)} {component} layer(s) but no {component} was given")
            continue
        paths = _adaptable_paths(model)
        modules = dict(model.named_modules())
        for layer, t in layers.items():
            target = paths.get(layer) if layout == "kohya" else (layer if layer + "." in modules else None)
            module = modules.get(target + ".") if target is not None else None
            if module is None or not isinstance(module, (Linear, Conv2d, _LoRALayer)):
                problems.append(f"{component}: no Linear or Conv2d layer {layer}")
                continue
            rank = int(t.down.shape[0])
            shapes = _adapter_shapes(module, rank)
            down, up = convert_tensor(t.down, shapes[0], module.weight.dtype), convert_tensor(t.up, shapes[1],
                                                                                             module.weight.dtype)
            if down is None or up is None:
                problems.append(f"{component} {layer}: down {tuple(t.down.shape)} / up {tuple(t.up.shape)} do not fit "
                                f"the layer (rank {rank})")
                continue
            if isinstance(module, _LoRALayer) and adapter_name in module.ranks:
                problems.append(f"{component} {layer} already has an adapter {adapter_name!r}")
                continue
            plan.append((component, model, target, rank, t.alpha, down, up))
    if problems:
        raise WeightsError(f"{_resolve_file(path)} does not fit the models:\n  " + "\n  ".join(problems))
    done: dict[str, list[str]] = {}
    for component, model, target, rank, alpha, down, up in plan:
        add_lora(model, target=target, rank=rank, alpha=alpha, adapter_name=adapter_name)
        layer = lora_layers(model)[target]
        layer.lora_A[adapter_name].weight[...] = down
        layer.lora_B[adapter_name].weight[...] = up
        layer.set_scale(adapter_name, scale)
        done.setdefault(component, []).append(target)
    return done


def _adapter_shapes(module: Module, rank: int) -> tuple[tuple, tuple]:
    """Our shapes of A and B for a rank-``rank`` adapter on ``module``."""
    if isinstance(module, (Conv2d,)) or (isinstance(module, _LoRALayer) and module.weight.ndim == 4):
        kh, kw, C_in, C_out = module.weight.shape
        return (kh, kw, C_in, rank), (1, 1, rank, C_out)
    out_features, in_features = module.weight.shape
    return (rank, in_features), (out_features, rank)


def load_lora_weights(pipeline, path, adapter_name: str = "default", scale: float = 1.0) -> dict[str, list[str]]:
    """:func:`load_lora` into a pipeline's ``unet`` and ``text_encoder`` (e.g. one that
    :func:`diffusion_np.io.load_pipeline` made from SD 1.5): diffusers' ``pipe.load_lora_weights``."""
    return load_lora(path, unet=pipeline.unet, text_encoder=getattr(pipeline, "text_encoder", None),
                     adapter_name=adapter_name, scale=scale)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``"PATH[:SCALE]"`` -> (path, scale); ``pretrained:NAME[:SCALE]`` keeps its prefix."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--lora must be PATH or PATH:SCALE, got {spec!r}")
    head, sep, tail = spec.rpartition(":")
    if sep and head and head != "pretrained":
        try:
            return head, float(tail)
        except ValueError:
            pass  # a colon that is part of the path
    return spec, 1.0


# ============================================================================ writing
def _torch_layout(array) -> np.ndarray:
    """Our layout back to PyTorch's: (kh, kw, C_in, C_out) -> (C_out, C_in, kh, kw); Linear unchanged."""
    array = asnumpy(array)
    return np.ascontiguousarray(array.transpose(3, 2, 0, 1) if array.ndim == 4 else array)


def save_lora(path, unet: Module | None = None, text_encoder: Module | None = None, adapter_name: str = "default",
              layout: str = "diffusers", dtype=None) -> Path:
    """Write adapter ``adapter_name`` of the given models as a LoRA file that diffusers and the web UIs read.

    ``layout="diffusers"``: ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` keys and the
    alphas in ``lora_adapter_metadata`` (a peft LoraConfig per model: ``r`` and ``lora_alpha``
    of the most common layer, ``rank_pattern``/``alpha_pattern`` for the others,
    ``target_modules``); a folder ``path`` gets ``pytorch_lora_weights.safetensors``.
    ``layout="kohya"``: ``lora_unet_<path with _>.lora_down.weight`` / ``lora_up.weight`` /
    ``alpha``. ``dtype`` (e.g. ``np.float16``) casts the tensors; None keeps theirs.
    Only the adapter's parameters are written, in PyTorch's layout. Returns the file's path.
    """
    if layout not in ("diffusers", "kohya"):
        raise ValueError(f"save_lora: layout must be 'diffusers' or 'kohya', got {layout!r}")
    models = {c: m for c, m in (("unet", unet), ("text_encoder", text_encoder)) if m is not None}
    if not models:
        raise ValueError("save_lora: give a unet and/or a text_encoder with LoRA adapters")
    tensors, metadata = {}, {"format": "pt"}
    config = {}
    for component, model in models.items():
        layers = {p: layer for p, layer in lora_layers(model).items() if adapter_name in layer.ranks}
        if not layers:
            raise ValueError(f"save_lora: the {component} has no LoRA adapter {adapter_name!r}")
        for p, layer in layers.items():
            down, up = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if dtype is not None:
                down, up = asnumpy(down).astype(dtype), asnumpy(up).astype(dtype)
            if layout == "diffusers":
                tensors[f"{component}.{p}.lora_A.weight"] = _torch_layout(down)
                tensors[f"{component}.{p}.lora_B.weight"] = _torch_layout(up)
            else:
                flat = ("lora_unet_" if component == "unet" else "lora_te_") + p.replace(".", "_")
                tensors[f"{flat}.lora_down.weight"] = _torch_layout(down)
                tensors[f"{flat}.lora_up.weight"] = _torch_layout(up)
                tensors[f"{flat}.alpha"] = np.asarray(layer.alphas[adapter_name], dtype=down.dtype)
        config.update(_peft_config(component, layers, adapter_name))
    if layout == "diffusers":
        metadata[_METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    target = Path(path)
    if target.is_dir():
        target = target / LORA_WEIGHT_NAME
    save_file(tensors, str(target), metadata=metadata)
    return target


def _peft_config(component: str, layers: dict, adapter_name: str) -> dict:
    """A peft LoraConfig for ``layers`` as diffusers stores it (``"<component>.<field>"`` keys)."""
    ranks = {p: layer.ranks[adapter_name] for p, layer in layers.items()}
    alphas = {p: layer.alphas[adapter_name] for p, layer in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    fields = {
        "r": r, "lora_alpha": alpha, "target_modules": sorted(layers),
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
    }
    return {f"{component}.{k}": v for k, v in fields.items()}
