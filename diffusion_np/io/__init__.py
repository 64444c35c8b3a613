"""Reading and writing models: checkpoints in safetensors + JSON (no pickles)."""

from diffusion_np.io.checkpoint import (
    PICKLE_SUFFIXES,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["PICKLE_SUFFIXES", "Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]
