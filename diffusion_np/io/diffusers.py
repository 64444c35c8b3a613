"""Real Stable Diffusion weights: diffusers folders and original single-file SD 1.x checkpoints.

Two ways Stable Diffusion 1.x is distributed, both read here into our modules
(:class:`~diffusion_np.models.UNet2DConditionModel`, :class:`~diffusion_np.models.AutoencoderKL`,
:class:`~diffusion_np.models.TextEncoder`, :class:`~diffusion_np.models.clip_tokenizer.CLIPTokenizer`)
and handed back as a :class:`~diffusion_np.pipelines.TextToImagePipeline`:

* a **diffusers folder** (:func:`load_pipeline`)::

      model_index.json
      unet/config.json           unet/diffusion_pytorch_model.safetensors
      vae/config.json            vae/diffusion_pytorch_model.safetensors
      text_encoder/config.json   text_encoder/model.safetensors
      tokenizer/vocab.json       tokenizer/merges.txt   (+ tokenizer_config.json, special_tokens_map.json)
      scheduler/scheduler_config.json

  The state_dict keys are already ours (our parameter names are diffusers'), so
  loading is: build each model from its config, convert each tensor's layout, copy.

* an **original single file** (:func:`load_single_file`), ``v1-5-pruned-emaonly.safetensors``
  and its kin: one safetensors file with the CompVis/LDM names
  (``model.diffusion_model.input_blocks.1.0.in_layers.0.weight``,
  ``first_stage_model.encoder.down.0.block.0.norm1.weight``,
  ``cond_stage_model.transformer.text_model.*``), translated to diffusers' names
  by :func:`ldm_to_diffusers` (the same translation as diffusers'
  ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``). Such a file has no
  configs (SD 1.x's are built in, or read from a diffusers folder) and no tokenizer
  files (give a ``tokenizer/`` folder).

* a **diffusers ControlNet folder** (:func:`load_controlnet`): ``config.json`` and
  ``diffusion_pytorch_model.safetensors``, as ``ControlNetModel.save_pretrained`` writes it
  (``lllyasviel/sd-controlnet-canny`` and its kin for SD 1.5), read into a
  :class:`~diffusion_np.models.controlnet.ControlNetModel` that steers the U-Net of either
  of the above (``sample --model ... --controlnet DIR --control IMAGE``).

What conversion means, tensor by tensor (:func:`convert_tensor`):

* dtype: float16 is widened to float32; bfloat16, which NumPy lacks, is read as its raw
  16-bit patterns and shifted left by 16 bits into float32 (a bf16 number *is* the top
  half of a float32), exactly;
* conv weights: PyTorch's (C_out, C_in, kh, kw) become ours (kh, kw, C_in, C_out),
  once, at load time (``w.transpose(2, 3, 1, 0)``);
* 1x1-conv-shaped projections ((C, C, 1, 1), the VAE attention of LDM files and of old
  diffusers files) become Linear weights (C, C);
* legacy names: the VAE attention's ``query``/``key``/``value``/``proj_attn`` (diffusers
  before 0.14) become ``to_q``/``to_k``/``to_v``/``to_out.0``; the duplicate
  ``Conv2d_0.*`` alias that diffusers' ``Downsample2D`` can carry is dropped;
  transformers 5 writes the text encoder without the ``text_model.`` prefix, older files keep it:
  both load.

Every problem is collected before anything is copied and raised as ONE
:class:`WeightsError` listing, per model, the missing, unexpected and mis-shaped keys.

Pickle files (``.ckpt``, ``.bin``, ``.pt``, ...) are refused: unpickling runs code
stored in the file (see :mod:`diffusion_np.io.checkpoint`). Convert them to safetensors
with the library that wrote them.

Memory: loaded models keep no gradient buffers unless ``keep_grads=True`` (a
read-only zero stands in for each; training needs the real ones), which halves the
footprint of inference: SD 1.5 in float32 takes about 4.3 GB (U-Net 3.4, text encoder
0.5, VAE 0.3). Without gradient buffers they are also put in inference mode
(:meth:`Module.inference`): forwards keep no caches for a backward, so activations
are freed layer by layer. Attention is computed in query chunks
(``attention_chunk_size``, see :func:`diffusion_np.nn.attention.sdpa_chunked_forward`).

Left out: sharded weight files (``*.safetensors.index.json``), ControlNets in the original
single-file layout (``control_v11p_sd15_canny.pth``: a pickle; convert it with diffusers), SD 2.x/SDXL single files
(v-prediction, OpenCLIP text encoders), textual-inversion files (LoRA files: :mod:`diffusion_np.io.lora`),
the safety checker and feature extractor, and float16 computation. The folder's scheduler (SD 1.5's
PNDM) is ours by default; any other sampler can be named and gets the config's noise schedule.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

from diffusion_np.io.checkpoint import _PICKLE_REFUSAL, PICKLE_SUFFIXES, writable_path
from diffusion_np.io.diffusers_config import controlnet_config, unet_config
from diffusion_np.models.clip_tokenizer import CLIPTokenizer
from diffusion_np.models.controlnet import ControlNetModel
from diffusion_np.models.text_encoder import TextEncoder, TextEncoderConfig
from diffusion_np.models.unet import UNet2DConditionModel
from diffusion_np.models.vae import AutoencoderKL
from diffusion_np.nn.attention import set_attention_chunk_size
from diffusion_np.nn.module import Module
from diffusion_np.pipelines.controlnet import ControlNetPipeline
from diffusion_np.pipelines.image_io import load_control_image, save_image
from diffusion_np.pipelines.text_to_image import TextToImagePipeline
from diffusion_np.samplers import SAMPLERS

__all__ = [
    "SD1_SCHEDULER_CONFIG",
    "SD1_TEXT_ENCODER_CONFIG",
    "SD1_UNET_CONFIG",
    "SD1_VAE_CONFIG",
    "WeightsError",
    "convert_tensor",
    "ldm_to_diffusers",
    "load_controlnet",
    "load_model",
    "load_pipeline",
    "load_single_file",
    "load_weights",
    "read_safetensors",
    "sampler_from_config",
    "text_encoder_config",
]


class WeightsError(ValueError):
    """Weights that cannot be read, or do not fit the model their config describes."""


# ============================================================================ SD 1.x configs
#: Stable Diffusion 1.x U-Net (the defaults of diffusers' UNet2DConditionModel, CLIP ViT-L/14's width)
SD1_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2, "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
#: Stable Diffusion 1.x VAE (f = 8, 4 latent channels, scaling factor 0.18215)
SD1_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
#: CLIP ViT-L/14's text tower, as in SD 1.x's text_encoder/config.json (transformers' field names)
SD1_TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768,
    "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 2,
}
#: SD 1.x's scheduler/scheduler_config.json (PNDM with PLMS steps)
SD1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "trained_betas": None, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "clip_sample": False,
}


# ============================================================================ safetensors with f16 / bf16
#: safetensors dtype names -> little-endian NumPy dtypes (BF16 is handled by bit shifting)
_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file, as (memory-mapped, read-only) NumPy arrays.

    The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header
    length n, n bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``
    (plus an optional ``__metadata__``), then the raw little-endian bytes. The file is
    memory-mapped, so nothing is read until a tensor is used, and a 4 GB checkpoint
    does not need 4 GB of extra memory to open.

    float16 and float32 tensors come back as they are stored; bfloat16 tensors come back
    as float32 (:func:`bf16_to_float32`). Pickle files are refused with the reason.
    """
    path = Path(path)
    _refuse_pickle(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path} is not a safetensors file: shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise WeightsError(f"{path} is not a safetensors file: its header is not JSON ({err})") from None
    size = path.stat().st_size - 8 - n
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(size,)) if size > 0 else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        kind = info.get("dtype")
        if kind not in _DTYPES:
            raise WeightsError(f"{path}: tensor {name} has dtype {kind}, which this reader does not support "
                               f"(supported: {', '.join(_DTYPES)})")
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
        dtype = np.dtype(_DTYPES[kind])
        if not 0 <= begin <= end <= size or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise WeightsError(f"{path} is damaged: tensor {name} {shape} {kind} does not fit bytes {begin}..{end} "
                               f"of {size}")
        array = data[begin:end].view(dtype).reshape(shape)
        tensors[name] = bf16_to_float32(array) if kind == "BF16" else array
    return tensors


def bf16_to_float32(bits) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly.

    bfloat16 is float32 with the low 16 mantissa bits cut off (same sign bit, same
    8-bit exponent), so putting its 16 bits in the high half of a 32-bit word gives the
    float32 of the same value: ``(uint32(bits) << 16).view(float32)``.
    """
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise TypeError(f"bf16_to_float32 expects the raw uint16 bit patterns, got {bits.dtype}")
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(_PICKLE_REFUSAL.format(path=path, suffix=path.suffix))


# ============================================================================ tensors into modules
def convert_tensor(array, target_shape: tuple, dtype=np.float32):
    """One tensor from PyTorch's layout into ours, as a contiguous array of ``dtype``.

    * 4-D -> 4-D (conv weight): (C_out, C_in, kh, kw) -> (kh, kw, C_in, C_out);
    * (C_out, C_in, 1, 1) or (C_out, C_in, 1) -> (C_out, C_in) where we hold a Linear
      (1x1-conv-shaped attention projections of LDM and old diffusers files);
    * otherwise unchanged.

    Returns None when the result does not have ``target_shape`` (the caller lists it).
    """
    view = _layout(array, target_shape)
    if view is None:
        return None
    return np.ascontiguousarray(view, dtype=dtype)  # one copy: out of the memory map, converted, laid out


def _layout(array, target_shape: tuple):
    """:func:`convert_tensor`'s reordering as a view (no copy), or None when the shape does not fit."""
    target_shape = tuple(target_shape)
    if array.ndim == 4 and len(target_shape) == 4:
        array = array.transpose(2, 3, 1, 0)  # (C_out, C_in, kh, kw) -> (kh, kw, C_in, C_out)
    elif array.ndim in (3, 4) and len(target_shape) == 2 and all(s == 1 for s in array.shape[2:]):
        array = array.reshape(array.shape[:2])  # a 1x1 conv is a Linear
    return array if tuple(array.shape) == target_shape else None


#: VAE attention names of diffusers before 0.14 -> today's
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
#: buffers that some files store next to the weights; they are not parameters
_BUFFERS = ("text_model.embeddings.position_ids",)


def _rename(key: str, component: str) -> str:
    """A key as stored -> our parameter name (legacy aliases of the module docstring)."""
    if component == "text_encoder" and not key.startswith("text_model."):
        key = "text_model." + key  # transformers 5 state_dict keys have no prefix
    if component == "vae" and ".mid_block.attentions." in key:
        for old, new in _LEGACY_ATTENTION.items():
            key = key.replace(old, new)
    return key


def _plan(module: Module, state: dict, component: str) -> tuple[dict, list[str]]:
    """Match ``state`` to ``module``: ({our name: view in our layout}, [problems]). Copies nothing."""
    own = {name: tuple(p.shape) for name, p in module.named_parameters()}
    loaded, unexpected, mismatched, misfit = {}, [], [], set()
    keys = set(state)
    for key, array in state.items():
        if ".Conv2d_0." in key and key.replace(".Conv2d_0.", ".conv.") in keys:
            continue  # diffusers' Downsample2D alias of the same conv: one copy is enough
        name = _rename(key.replace(".Conv2d_0.", ".conv."), component)
        if name in _BUFFERS:
            continue
        if name not in own:
            unexpected.append(key)
            continue
        value = _layout(array, own[name])
        if value is None:
            mismatched.append(f"{key}: file has {tuple(array.shape)}, the model expects {_torch_shape(own[name])}")
            misfit.add(name)
            continue
        loaded[name] = value
    missing = [name for name in own if name not in loaded and name not in misfit]
    problems = []
    if missing:
        problems.append(f"{component}: {len(missing)} missing key(s): " + ", ".join(missing))
    if unexpected:
        problems.append(f"{component}: {len(unexpected)} unexpected key(s): " + ", ".join(sorted(unexpected)))
    if mismatched:
        problems.append(f"{component}: {len(mismatched)} mis-shaped key(s): " + "; ".join(mismatched))
    return loaded, problems


def _torch_shape(ours: tuple) -> tuple:
    """Our parameter shape written as PyTorch would hold it (for error messages)."""
    return (ours[3], ours[2], ours[0], ours[1]) if len(ours) == 4 else ours


def _load_all(models: dict[str, Module], states: dict[str, dict], where, dtype, keep_grads: bool,
              extra_problems=()) -> None:
    """Check every component, raise ONE WeightsError if anything is wrong, then copy tensor by tensor.

    Peak memory stays near one model: the gradient buffers go first, and each converted
    tensor replaces (frees) the placeholder it stands for before the next is made.
    """
    plans, problems = {}, list(extra_problems)
    for component, module in models.items():
        plans[component], found = _plan(module, states[component], component)
        problems.extend(found)
    if problems:
        raise WeightsError(f"{where}: the weights do not fit the models:\n  " + "\n  ".join(problems))
    for component, module in models.items():
        if not keep_grads:
            _release_gradients(module)
            module.inference()  # no gradient buffers, so no caches for a backward either
        for prefix, sub in module.named_modules():
            for name in list(sub.params):
                # one copy: out of the file's memory map, widened to dtype, in our layout
                sub.params[name] = np.ascontiguousarray(plans[component][prefix + name], dtype=dtype)


def load_weights(module: Module, state: dict, component: str, dtype=np.float32, keep_grads: bool = True) -> None:
    """Copy a PyTorch-layout state dict (NumPy arrays, diffusers/transformers names) into ``module``.

    ``component`` is "unet", "vae" or "text_encoder" (it selects the legacy-name rules).
    E.g. ``load_weights(unet, {k: v.numpy() for k, v in diffusers_unet.state_dict().items()}, "unet")``.
    Raises one :class:`WeightsError` listing every missing, unexpected and mis-shaped key.
    """
    if component not in _WEIGHT_FILES:
        raise ValueError(f"component must be one of {', '.join(_WEIGHT_FILES)}, got {component!r}")
    _load_all({component: module}, {component: state}, type(module).__name__, dtype, keep_grads)


def _release_gradients(module: Module) -> None:
    """Replace every gradient buffer by a read-only zero of the same shape (no memory).

    Sampling never writes a gradient, and the buffers would double the memory of a
    loaded model. A backward pass on such a model stops with "output array is read-only";
    load with ``keep_grads=True`` to train.
    """
    for _, sub in module.named_modules():
        for name, g in sub.grads.items():
            sub.grads[name] = np.broadcast_to(np.zeros((), dtype=g.dtype), g.shape)


# ============================================================================ configs
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise WeightsError(f"{path} is not valid JSON: {err}") from None


#: CLIPTextConfig fields that make no difference to inference with our TextEncoder
_TEXT_IGNORED = {
    "_name_or_path", "architectures", "model_type", "attention_dropout", "dropout", "initializer_factor",
    "initializer_range", "bos_token_id", "pad_token_id", "projection_dim", "torch_dtype", "dtype",
    "transformers_version", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
    "use_return_dict", "return_dict", "tie_word_embeddings", "is_encoder_decoder",
}
_TEXT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id")


def text_encoder_config(config: dict) -> TextEncoderConfig:
    """transformers' ``CLIPTextConfig`` dict (``text_encoder/config.json``) -> :class:`TextEncoderConfig`.

    Dropout and initialisation fields are ignored (inference); a model other than
    ``CLIPTextModel`` (e.g. SDXL's ``CLIPTextModelWithProjection``) is refused, naming the field.
    Other generic transformers fields are ignored.
    """
    arch = config.get("architectures") or ["CLIPTextModel"]
    if list(arch) != ["CLIPTextModel"] or config.get("model_type", "clip_text_model") != "clip_text_model":
        raise WeightsError(
            f"text encoder: architectures={arch!r}, model_type={config.get('model_type')!r} is not supported; "
            "only transformers' CLIPTextModel (model_type 'clip_text_model', Stable Diffusion 1.x) is"
        )
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise WeightsError(f"text encoder: position_embedding_type={config['position_embedding_type']!r} "
                           "is not supported (only 'absolute')")
    fields = {k: config[k] for k in _TEXT_FIELDS if k in config}
    missing = [k for k in _TEXT_FIELDS[:6] if k not in fields]
    if missing:
        raise WeightsError(f"text encoder config lacks {', '.join(missing)}")
    try:
        return TextEncoderConfig(**fields)
    except ValueError as err:
        raise WeightsError(f"text encoder config: {err}") from None


#: diffusers scheduler class -> our sampler's short name (a sampler registered here is chosen for a
#: config of that class and follows that class's fields in :data:`SCHEDULER_FIELDS`)
SCHEDULER_CLASSES = {
    "DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler-a", "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpm++", "PNDMScheduler": "pndm", "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
}
#: Every field of diffusers' schedulers with its default: the ``__init__`` signatures of diffusers 0.42
#: (read with ``inspect.signature``). A scheduler_config.json holds these fields; newer diffusers add
#: fields at values that keep the old behaviour (0.42's ``time_shift_type="exponential"``), so a field
#: at its default is accepted, and only a value we do not implement is refused. A tuple lists the
#: values that give the default's math (DPM-Solver uses variance_type only to cut a learned variance).
#: A new diffusers class, or a new field, is one more entry.
SCHEDULER_FIELDS = {
    "DDPMScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
        "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
        "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
    },
    "DDIMScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
        "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    "EulerDiscreteScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "interpolation_type": "linear",
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None,
        "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete", "steps_offset": 0,
        "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    },
    "HeunDiscreteScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "clip_sample": False, "clip_sample_range": 1.0,
        "timestep_spacing": "linspace", "steps_offset": 0,
    },
    "DPMSolverMultistepScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
        "flow_shift": 1.0, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf, "variance_type": None,
        "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False, "time_shift_type": "exponential",
    },
    "PNDMScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "skip_prk_steps": False, "set_alpha_to_one": False, "prediction_type": "epsilon",
        "timestep_spacing": "leading", "steps_offset": 0,
    },
    "UniPCMultistepScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "predict_x0": True, "solver_type": "bh2",
        "lower_order_final": True, "disable_corrector": [], "solver_p": None, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
        "timestep_spacing": "linspace", "steps_offset": 0, "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False, "use_dynamic_shifting": False, "time_shift_type": "exponential",
        "sigma_min": None, "sigma_max": None, "shift_terminal": None,
    },
    "LCMScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "trained_betas": None, "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
        "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon", "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "timestep_spacing": "leading",
        "timestep_scaling": 10.0, "rescale_betas_zero_snr": False,
    },
}
SCHEDULER_FIELDS["DPMSolverMultistepScheduler"]["variance_type"] = (None, "fixed_small", "fixed_small_log",
                                                                    "fixed_large", "fixed_large_log")
#: every field name diffusers 0.42 knows
_KNOWN_SCHEDULER_FIELDS = {key for fields in SCHEDULER_FIELDS.values() for key in fields}


def sampler_from_config(name: str | None, config: dict):
    """One of our samplers with the noise schedule of a diffusers ``scheduler_config.json``.

    ``name`` is a short name of :data:`diffusion_np.samplers.SAMPLERS` (``"dpm++"``), or
    None for the config's own class when we implement it. Like diffusers'
    ``Scheduler.from_config``, field by field:

    1. a field our sampler takes is passed on (``beta_schedule``, ``steps_offset``,
       ``clip_sample``, ...), and the sampler checks its value;
    2. a field of the diffusers scheduler our sampler implements (:data:`SCHEDULER_CLASSES`)
       that our sampler does not take is accepted at its default (:data:`SCHEDULER_FIELDS`)
       and refused at any other value: we would silently compute something else;
    3. any other field diffusers knows belongs to another scheduler's algorithm (PNDM's
       ``skip_prk_steps`` when we run DDIM) and is dropped;
    4. a field unknown to diffusers 0.42 is refused.

    Every refusal is collected into one WeightsError naming the fields.
    """
    cls_name = config.get("_class_name")
    if name is None:
        if cls_name not in SCHEDULER_CLASSES:
            raise WeightsError(
                f"the scheduler config names {cls_name}, which diffusion_np does not implement; choose a sampler "
                f"({', '.join(SAMPLERS)}): its noise schedule is read from the config ('dpm++' with 20-25 "
                "steps or 'ddim' with 50 are the usual choices)"
            )
        name = SCHEDULER_CLASSES[cls_name]
    if name not in SAMPLERS:
        raise WeightsError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls = SAMPLERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    implemented = {ours: theirs for theirs, ours in SCHEDULER_CLASSES.items()}.get(name)
    defaults = SCHEDULER_FIELDS.get(implemented, {})
    kwargs, problems = {}, []
    for key, value in config.items():
        if key.startswith("_"):  # _class_name, _diffusers_version: bookkeeping
            continue
        if key in accepted:  # 1.
            kwargs[key] = value
        elif key in defaults:  # 2.
            allowed = defaults[key] if isinstance(defaults[key], tuple) else (defaults[key],)
            if value not in allowed:
                problems.append(f"{key}={value!r} (supported: {' or '.join(map(repr, allowed))})")
        elif key not in _KNOWN_SCHEDULER_FIELDS:  # 4. (3. drops the rest)
            problems.append(f"{key} (unknown field)")
    if problems:
        raise WeightsError(f"{cls.__name__} cannot follow this scheduler config: " + "; ".join(problems))
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise WeightsError(f"{cls.__name__} from the scheduler config: {err}") from None


class _NoInit:
    """Stands in for the ``numpy.random.Generator`` of a model's constructor when its weights are
    loaded right after: zeros instead of random numbers.

    The constructors draw a PyTorch-style random initialisation that loading replaces at
    once; for SD 1.5's U-Net drawing 860M random numbers took 18 s of a 20 s build here.
    Only the draws the constructors make are provided (shapes as ``Generator``'s).
    """

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.zeros(size, dtype=np.float32)

    def normal(self, loc=0.0, scale=1.0, size=None):
        return np.zeros(size, dtype=np.float32)

    def standard_normal(self, size=None, dtype=np.float64):
        return np.zeros(size, dtype=np.float32)

    def integers(self, low, high=None, size=None):
        return 0  # the seeds of dropout layers and of the VAE's sampling generator


def _build(kind: str, config: dict, dtype):
    """Construct one model from its config (weights left at zero, to be loaded), turning a config
    ValueError into a WeightsError."""
    rng = _NoInit()
    try:
        if kind == "unet":
            return UNet2DConditionModel.from_config(config, rng=rng, dtype=dtype)
        if kind == "vae":
            return AutoencoderKL.from_config(config, rng=rng, dtype=dtype)
        if kind == "controlnet":
            return ControlNetModel(controlnet_config(config), rng=rng, dtype=dtype)
        return TextEncoder(text_encoder_config(config), rng=rng, dtype=dtype)
    except WeightsError:
        raise
    except (ValueError, TypeError) as err:  # the config dataclasses name the field
        raise WeightsError(f"{kind} config: {err}") from None


def _finish(models: dict, tokenizer, sampler, attention_chunk_size):
    if attention_chunk_size is not None:
        set_attention_chunk_size(models["unet"], attention_chunk_size)
    text, unet = models["text_encoder"], models["unet"]
    if text.config.hidden_size != unet.cross_attention_dim:
        raise WeightsError(f"the text encoder's width {text.config.hidden_size} differs from the U-Net's "
                           f"cross_attention_dim {unet.cross_attention_dim}")
    if text.config.max_position_embeddings < tokenizer.max_length:
        raise WeightsError(f"the tokenizer writes {tokenizer.max_length} tokens but the text encoder has "
                           f"{text.config.max_position_embeddings} positions")
    for model in models.values():
        model.eval()
    return TextToImagePipeline(unet, text, tokenizer, sampler, vae=models["vae"])


# ============================================================================ diffusers folders
#: component -> weight file name in a diffusers folder
_WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                 "controlnet": "diffusion_pytorch_model"}


def _weights_file(folder: Path, stem: str, variant: str | None) -> Path:
    """``<stem>[.<variant>].safetensors`` in ``folder``; pickles refused, alternatives named."""
    names = [f"{stem}.{variant}.safetensors"] if variant else [f"{stem}.safetensors"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    safes = [n for n in present if n.endswith(".safetensors")]
    if not variant and len(safes) == 1 and not safes[0].endswith(".index.json"):
        return folder / safes[0]  # e.g. only diffusion_pytorch_model.fp16.safetensors was downloaded
    pickles = [n for n in present if Path(n).suffix.lower() in PICKLE_SUFFIXES]
    if pickles and not safes:
        raise WeightsError(_PICKLE_REFUSAL.format(path=folder / pickles[0], suffix=Path(pickles[0]).suffix))
    hint = f"; it holds {', '.join(present)}" if present else ""
    raise WeightsError(f"{folder / names[0]} is missing{hint}"
                       + ("; pass variant=... to choose one" if len(safes) > 1 else ""))


def load_pipeline(
    path,
    sampler: str | None = None,
    variant: str | None = None,
    dtype=np.float32,
    attention_chunk_size: int | None = 1024,
    keep_grads: bool = False,
):
    """Load a diffusers Stable Diffusion folder as a :class:`~diffusion_np.pipelines.TextToImagePipeline`.

    Parameters
    ----------
    path : str or Path
        The folder with ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
        ``tokenizer/`` and ``scheduler/``.
    sampler : str, optional
        Short name of a sampler (``"ddim"``, ``"dpm++"``, ...; see ``diffusion_np.samplers.SAMPLERS``)
        built with the folder's noise schedule; None uses the folder's scheduler class when
        we implement it (SD 1.5's PNDM included).
    variant : str, optional
        Weight file variant, e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``.
    dtype : NumPy float dtype
        The models' dtype after loading (float16/bfloat16 files are widened).
    attention_chunk_size : int or None
        Queries per attention chunk in the U-Net (memory; same result); None: no chunking.
    keep_grads : bool
        Allocate gradient buffers (for fine-tuning); off by default to halve the memory.
    """
    root = Path(path)
    _refuse_pickle(root)
    if root.is_file():
        raise WeightsError(f"{root} is a file; load_pipeline reads a diffusers folder (use load_single_file "
                           "for a .safetensors checkpoint)")
    if not root.is_dir():
        raise WeightsError(f"{root} does not exist")
    index = root / "model_index.json"
    if index.is_file():
        classes = _read_json(index)
        expected = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                    "tokenizer": "CLIPTokenizer"}
        wrong = [f"{k}={classes[k][1]!r} (expected {v})" for k, v in expected.items()
                 if isinstance(classes.get(k), list) and classes[k][1] not in (v, v + "Fast")]
        if wrong:
            raise WeightsError(f"{index}: unsupported component(s) " + ", ".join(wrong))
    configs = {
        "unet": _read_json(root / "unet" / "config.json"),
        "vae": _read_json(root / "vae" / "config.json"),
        "text_encoder": _read_json(root / "text_encoder" / "config.json"),
    }
    sampler_obj = sampler_from_config(sampler, _read_json(root / "scheduler" / "scheduler_config.json"))
    tokenizer = CLIPTokenizer.from_pretrained(_find_tokenizer([root / "tokenizer"], str(root)))
    states = {c: read_safetensors(_weights_file(root / c, _WEIGHT_FILES[c], variant)) for c in configs}
    models = {c: _build(c, configs[c], dtype) for c in configs}
    _load_all(models, states, root, dtype, keep_grads)
    return _finish(models, tokenizer, sampler_obj, attention_chunk_size)


def load_controlnet(path, variant: str | None = None, dtype=np.float32, keep_grads: bool = False) -> ControlNetModel:
    """Load a diffusers ControlNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    Hand the result to :class:`~diffusion_np.pipelines.controlnet.ControlNetPipeline` with the
    networks of the Stable Diffusion it was trained for (SD 1.5's ControlNets: 3-channel control
    images in [0, 1] at the image's size). ``variant``, ``dtype`` and ``keep_grads`` as for
    :func:`load_pipeline`; every missing, unexpected and mis-shaped key is listed in one WeightsError.
    """
    root = Path(path)
    _refuse_pickle(root)
    if not root.is_dir():
        raise WeightsError(f"{root} is not a folder; a diffusers ControlNet is a folder with config.json and "
                           "diffusion_pytorch_model.safetensors")
    config = _read_json(root / "config.json")
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise WeightsError(f"{root / 'config.json'} describes a {config['_class_name']}, not a ControlNetModel")
    model = _build("controlnet", config, dtype)
    state = read_safetensors(_weights_file(root, _WEIGHT_FILES["controlnet"], variant))
    _load_all({"controlnet": model}, {"controlnet": state}, root, dtype, keep_grads)
    return model.eval()


# ============================================================================ original single files
_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIX = "first_stage_model."
_TEXT_PREFIX = "cond_stage_model.transformer."
_EMA_PREFIX = "model_ema."
#: the LDM training wrapper's schedule buffers and bookkeeping, stored beside the weights
_LDM_BUFFERS = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights"
    r"|model_ema\.decay|model_ema\.num_updates|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids)$"
)
#: LDM ResBlock -> diffusers ResnetBlock2D (U-Net)
_UNET_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
#: LDM AttnBlock -> diffusers' VAE attention
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _unet_tables(config: dict) -> tuple[dict, dict]:
    """LDM block index -> diffusers place, for ``input_blocks.i`` and ``output_blocks.i``.

    LDM numbers the U-Net's blocks in one flat list per direction: ``input_blocks.0`` is
    conv_in, then per level ``layers`` (resnet, attention) blocks and one downsampler
    (except the last level); ``output_blocks`` has ``layers + 1`` blocks per level, the
    last one of a level also holding the upsampler.
    Returns ({i: (level, layer or "down")}, {i: (level, layer, is_last_of_level)}).
    """
    layers = unet_config(config).per_level("layers_per_block")
    n = len(layers)
    inputs, i = {}, 1
    for level in range(n):
        for layer in range(layers[level]):
            inputs[i] = (level, layer)
            i += 1
        if level < n - 1:
            inputs[i] = (level, "down")
            i += 1
    outputs, i = {}, 0
    for level, count in enumerate(reversed(layers)):
        for layer in range(count + 1):
            outputs[i] = (level, layer, layer == count)
            i += 1
    return inputs, outputs


def _map_unet_key(key: str, inputs: dict, outputs: dict, up_types) -> str | None:
    """One LDM U-Net key (prefix removed) -> the diffusers key, or None when it matches no rule."""
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old):]

    def resnet(rest: str) -> str:
        for old, new in _UNET_RESNET:
            if rest.startswith(old):
                return new + rest[len(old):]
        return rest

    m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)$", key)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        if i not in inputs:
            return None
        level, layer = inputs[i]
        if layer == "down":
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}" if j == 0 and rest.startswith("op.") else None
        if j == 0:
            return f"down_blocks.{level}.resnets.{layer}.{resnet(rest)}"
        return f"down_blocks.{level}.attentions.{layer}.{rest}" if j == 1 else None
    m = re.match(r"middle_block\.(\d+)\.(.*)$", key)
    if m:
        j, rest = int(m[1]), m[2]
        return {0: f"mid_block.resnets.0.{resnet(rest)}", 1: f"mid_block.attentions.0.{rest}",
                2: f"mid_block.resnets.1.{resnet(rest)}"}.get(j)
    m = re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)$", key)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        if i not in outputs:
            return None
        level, layer, last = outputs[i]
        has_attention = up_types[level].startswith("CrossAttn")
        if j == 0:
            return f"up_blocks.{level}.resnets.{layer}.{resnet(rest)}"
        if j == 1 and has_attention:
            return f"up_blocks.{level}.attentions.{layer}.{rest}"
        if last and j == (2 if has_attention else 1) and rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.{rest}"
    return None


def _map_vae_key(key: str, n: int) -> str | None:
    """One LDM VAE key (prefix removed) -> the diffusers key, or None."""
    m = re.match(r"(encoder|decoder)\.(.*)$", key)
    if not m:
        return key if re.match(r"(post_)?quant_conv\.(weight|bias)$", key) else None
    part, rest = m[1], m[2]
    if rest.startswith("norm_out."):
        return f"{part}.conv_norm_out.{rest[9:]}"
    if re.match(r"conv_(in|out)\.", rest):
        return f"{part}.{rest}"
    m = re.match(r"mid\.block_([12])\.(.*)$", rest)
    if m:
        return f"{part}.mid_block.resnets.{int(m[1]) - 1}.{m[2].replace('nin_shortcut.', 'conv_shortcut.')}"
    m = re.match(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", rest)
    if m:
        return f"{part}.mid_block.attentions.0.{_VAE_ATTENTION[m[1]]}.{m[2]}"
    m = re.match(r"(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)$", rest)
    if m and (m[1] == "down") == (part == "encoder"):
        level = int(m[2]) if part == "encoder" else n - 1 - int(m[2])  # LDM's decoder counts up from the bottom
        blocks = "down_blocks" if part == "encoder" else "up_blocks"
        if m[4] is not None:
            return f"{part}.{blocks}.{level}.resnets.{m[4]}.{m[5].replace('nin_shortcut.', 'conv_shortcut.')}"
        if (m[3] == "downsample") == (part == "encoder") and m[5].startswith("conv."):
            return f"{part}.{blocks}.{level}.{m[3]}rs.0.{m[5]}"
    return None


def ldm_to_diffusers(state: dict, unet_config: dict, vae_config: dict, use_ema: bool = True):
    """Split an original SD 1.x checkpoint into diffusers-named state dicts.

    Returns ``({"unet": ..., "vae": ..., "text_encoder": ...}, unmatched)``; ``unmatched`` lists
    the keys that no rule maps (the schedule buffers of LDM's training wrapper are skipped
    silently). With ``use_ema`` and EMA weights in the file (``model_ema.*``, the names
    with their dots removed: ``model_ema.diffusion_modelinput_blocks00weight``), the
    U-Net gets the EMA weights, as diffusers' ``extract_ema=True`` does.
    """
    inputs, outputs = _unet_tables(unet_config)
    up_types = unet_config.get("up_block_types", SD1_UNET_CONFIG["up_block_types"])
    n_vae = len(vae_config["block_out_channels"])
    has_ema = use_ema and sum(k.startswith(_EMA_PREFIX) for k in state) > 100
    out = {"unet": {}, "vae": {}, "text_encoder": {}}
    unmatched = []
    for key, value in state.items():
        if _LDM_BUFFERS.match(key) or key.startswith(_EMA_PREFIX):
            continue
        if key.startswith(_UNET_PREFIX):
            name = _map_unet_key(key[len(_UNET_PREFIX):], inputs, outputs, up_types)
            if has_ema:
                ema_key = _EMA_PREFIX + "diffusion_model" + key[len(_UNET_PREFIX):].replace(".", "")
                value = state.get(ema_key, value)
            component = "unet"
        elif key.startswith(_VAE_PREFIX):
            name, component = _map_vae_key(key[len(_VAE_PREFIX):], n_vae), "vae"
        elif key.startswith(_TEXT_PREFIX):
            name, component = _rename(key[len(_TEXT_PREFIX):], "text_encoder"), "text_encoder"
        else:
            name = None
        if name is None:
            unmatched.append(key)
        else:
            out[component][name] = value
    return out, unmatched


def _is_tokenizer_folder(folder) -> bool:
    """Whether ``folder`` holds a CLIP tokenizer that :meth:`CLIPTokenizer.from_pretrained` reads:
    ``vocab.json`` and ``merges.txt`` (transformers 4), or only ``tokenizer.json`` (transformers 5).
    The one rule of every loader here."""
    folder = Path(folder)
    return ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) or (
        folder / "tokenizer.json").is_file()


def _find_tokenizer(candidates: list[Path], what: str) -> Path:
    """The first of ``candidates`` that :func:`_is_tokenizer_folder`; otherwise a WeightsError."""
    for folder in candidates:
        if _is_tokenizer_folder(folder):
            return folder
    raise WeightsError(
        f"no CLIP tokenizer for {what}. Give the tokenizer folder (vocab.json and merges.txt, or the "
        "tokenizer.json of transformers 5; e.g. the tokenizer/ folder of the Stable Diffusion 1.5 diffusers "
        "repository or of openai/clip-vit-large-patch14); looked in " + " and ".join(map(str, candidates))
    )


def load_single_file(
    path,
    tokenizer=None,
    config=None,
    sampler: str = "dpm++",
    use_ema: bool = True,
    dtype=np.float32,
    attention_chunk_size: int | None = 1024,
    keep_grads: bool = False,
):
    """Load an original single-file SD 1.x checkpoint (``.safetensors``) as a TextToImagePipeline.

    Parameters
    ----------
    path : str or Path
        e.g. ``v1-5-pruned-emaonly.safetensors`` (float32, float16 or bfloat16).
        ``.ckpt`` files are pickles and are refused (see the module docstring).
    tokenizer : str or Path, optional
        A folder with CLIP's ``vocab.json`` and ``merges.txt`` (or transformers 5's
        ``tokenizer.json``); by default ``config``'s ``tokenizer/``, then ``tokenizer/``
        beside the checkpoint, then the checkpoint's own folder.
    config : str or Path, optional
        A diffusers folder whose ``unet/``, ``vae/``, ``text_encoder/`` and ``scheduler/``
        configs describe the network (like diffusers' ``from_single_file(config=...)``);
        its ``tokenizer/`` is the first place looked in when ``tokenizer`` is None. Default: SD 1.x
        (:data:`SD1_UNET_CONFIG` and friends).
    sampler : str
        Short name of the sampler (the schedule is SD 1.x's, or ``config``'s).
    use_ema : bool
        Take the U-Net's EMA weights when the file has both.
    dtype, attention_chunk_size, keep_grads : as :func:`load_pipeline`.
    """
    path = Path(path)
    _refuse_pickle(path)
    if path.is_dir():
        raise WeightsError(f"{path} is a folder; use load_pipeline for a diffusers folder")
    if config is not None:
        root = Path(config)
        configs = {c: _read_json(root / c / "config.json") for c in ("unet", "vae", "text_encoder")}
        scheduler = _read_json(root / "scheduler" / "scheduler_config.json")
    else:
        configs = {"unet": SD1_UNET_CONFIG, "vae": SD1_VAE_CONFIG, "text_encoder": SD1_TEXT_ENCODER_CONFIG}
        scheduler = SD1_SCHEDULER_CONFIG
    if tokenizer is not None:
        candidates = [Path(tokenizer)]
    else:  # the config folder's tokenizer/, else one beside the file
        candidates = [Path(config) / "tokenizer"] if config is not None else []
        candidates += [path.parent / "tokenizer", path.parent]
    what = f"{path.name}: a single-file checkpoint holds no vocabulary"
    tok = CLIPTokenizer.from_pretrained(_find_tokenizer(candidates, what))
    sampler_obj = sampler_from_config(sampler, scheduler)
    states, unmatched = ldm_to_diffusers(read_safetensors(path), configs["unet"], configs["vae"], use_ema=use_ema)
    extra = [f"checkpoint: {len(unmatched)} key(s) that are not SD 1.x weights: " + ", ".join(sorted(unmatched))
             ] if unmatched else []
    models = {c: _build(c, configs[c], dtype) for c in configs}
    _load_all(models, states, path, dtype, keep_grads, extra_problems=extra)
    return _finish(models, tok, sampler_obj, attention_chunk_size)


def load_model(path, tokenizer=None, sampler: str | None = None, **kwargs):
    """:func:`load_pipeline` for a folder, :func:`load_single_file` for a file (the CLI's ``--model``)."""
    path = Path(path)
    if path.is_dir():
        if tokenizer is not None or kwargs.get("config") is not None:
            raise WeightsError("a tokenizer or config folder is only for a single-file checkpoint; "
                               f"{path} is a diffusers folder with its own")
        return load_pipeline(path, sampler=sampler, **kwargs)
    return load_single_file(path, tokenizer=tokenizer, sampler=sampler or "dpm++", **kwargs)


# ============================================================================ command line
def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``diffusion-np sample --model PATH`` adds to the ``sample`` command.

    ``--prompt``, ``--negative-prompt``, ``--guidance-scale``, ``-n``, ``--sampler``,
    ``--steps``, ``--seed``, ``-o`` and ``--quiet`` are the command's own (diffusion_np.cli).
    """
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="a Stable Diffusion 1.x diffusers folder or single-file .safetensors checkpoint "
                             "(instead of --checkpoint)")
    parser.add_argument("--height", type=int, default=None, metavar="PX",
                        help="image height with --model (default 512)")
    parser.add_argument("--width", type=int, default=None, metavar="PX",
                        help="image width with --model (default 512)")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="CLIP tokenizer folder (vocab.json, merges.txt) for a single-file checkpoint")
    parser.add_argument("--config", metavar="DIR", default=None,
                        help="diffusers folder whose configs describe a single-file checkpoint (default: SD 1.x)")
    parser.add_argument("--attention-chunk", type=int, default=1024, metavar="N",
                        help="queries per attention chunk: less memory, same image (default 1024; 0: off)")
    parser.add_argument("--controlnet", metavar="DIR", default=None,
                        help="a diffusers ControlNet folder for --model, steered by --control IMAGE")


def sample_from_model(args, prepare=None) -> int:
    """Run ``sample --model``: load, sample, write the PNG. Returns the exit status.

    ``prepare(pipe)``, if given, runs after loading (the CLI puts ``--lora`` files on the pipeline there);
    a :class:`WeightsError` it raises is reported like a loading error."""
    if not args.prompt:
        print("diffusion-np: error: --model needs --prompt", file=sys.stderr)
        return 2
    prompts = list(args.prompt)  # --prompt may be repeated
    num_images = args.n if args.n is not None else 1
    guidance_scale = args.guidance_scale if args.guidance_scale is not None else 7.5  # SD's usual default
    try:
        output = writable_path(args.output, "-o")  # before minutes of loading and sampling
    except ValueError as err:
        print(f"diffusion-np: error: {err}", file=sys.stderr)
        return 2
    if output.suffix.lower() != ".png":
        print(f"diffusion-np: error: -o {output} must end in .png", file=sys.stderr)
        return 2
    sampler = getattr(args, "sampler", None)
    controlnet, control = None, None
    control_scale = getattr(args, "control_scale", None)
    if (args.controlnet is None) != (getattr(args, "control", None) is None) or (
            control_scale is not None and args.controlnet is None):
        print("diffusion-np: error: --controlnet DIR and --control IMAGE (and --control-scale) go together with "
              "--model", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        extra = {"config": args.config} if getattr(args, "config", None) else {}
        pipe = load_model(args.model, tokenizer=args.tokenizer, sampler=sampler,
                          attention_chunk_size=args.attention_chunk or None, **extra)
        if args.controlnet is not None:
            controlnet = load_controlnet(args.controlnet)
            control = load_control_image(args.control)
        if prepare is not None:
            prepare(pipe)
    except (WeightsError, OSError) as err:  # OSError: a missing file, or one that is not an image
        print(f"diffusion-np: error: {err}", file=sys.stderr)
        return 2
    loaded = time.perf_counter()
    try:
        negative = None if args.negative_prompt is None else [args.negative_prompt] * len(prompts)
        common = dict(negative_prompt=negative, guidance_scale=guidance_scale, num_inference_steps=args.steps,
                      seed=args.seed, num_images_per_prompt=num_images, progress=not args.quiet)
        if controlnet is None:
            result = pipe(prompts, height=args.height, width=args.width, **common)
        else:  # the control image sets the size
            pipe = ControlNetPipeline(pipe.unet, controlnet, pipe.text_encoder, pipe.tokenizer, pipe.sampler, pipe.vae)
            scale = 1.0 if control_scale is None else control_scale
            result = pipe(prompts, control, conditioning_scale=scale, **common)
    except ValueError as err:
        print(f"diffusion-np: error: {err}", file=sys.stderr)
        return 2
    done = time.perf_counter()
    save_image(output, result.images)
    print(f"wrote {output} ({len(result.images)} image(s) {result.images.shape[1]}x{result.images.shape[2]}, "
          f"{args.steps} {type(pipe.sampler).__name__} steps, guidance {guidance_scale}, seed {args.seed}; "
          f"load {loaded - start:.1f} s, sampling {done - loaded:.1f} s = {(done - loaded) / args.steps:.2f} s/step)")
    return 0
