"""Reading and writing models: checkpoints in safetensors + JSON (no pickles), and
real Stable Diffusion 1.x weights (diffusers folders or original single files), and
the LoRA files people share (diffusers/peft and kohya layouts)."""

from diffusion_np.io.checkpoint import (
    PICKLE_SUFFIXES,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from diffusion_np.io.diffusers import WeightsError, load_controlnet, load_model, load_pipeline, load_single_file
from diffusion_np.io.lora import load_lora, load_lora_weights, save_lora

__all__ = [
    "PICKLE_SUFFIXES",
    "Checkpoint",
    "CheckpointError",
    "WeightsError",
    "load_checkpoint",
    "load_controlnet",
    "load_lora",
    "load_lora_weights",
    "load_model",
    "load_pipeline",
    "load_single_file",
    "save_checkpoint",
    "save_lora",
]
