"""diffusion_np: Stable Diffusion in plain NumPy with hand-written backprop.

The most used names are importable from the top level::

    from diffusion_np import NoiseSchedule, DDIMSampler, sample, check_module

Layers live in :mod:`diffusion_np.nn`, samplers in :mod:`diffusion_np.samplers`,
models in :mod:`diffusion_np.models`.
"""

from diffusion_np.backend import asnumpy, get_xp, gpu_available, to_device
from diffusion_np.diffusion import q_sample, training_target, v_target, x0_and_eps
from diffusion_np.gradcheck import check_module, check_op, rel_error
from diffusion_np.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverMultistepSampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
    LCMSampler,
    PNDMSampler,
    UniPCSampler,
    sample,
)
from diffusion_np.schedules import NoiseSchedule, make_betas, rescale_zero_terminal_snr

__version__ = "0.1.0"

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverMultistepSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "HeunSampler",
    "LCMSampler",
    "NoiseSchedule",
    "PNDMSampler",
    "UniPCSampler",
    "__version__",
    "asnumpy",
    "check_module",
    "check_op",
    "get_xp",
    "gpu_available",
    "make_betas",
    "q_sample",
    "rel_error",
    "rescale_zero_terminal_snr",
    "sample",
    "to_device",
    "training_target",
    "v_target",
    "x0_and_eps",
]
