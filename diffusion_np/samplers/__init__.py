"""Samplers: turn a denoiser into images, one file per method.

Every sampler has diffusers' scheduler interface (``set_timesteps``,
``timesteps``, ``init_noise_sigma``, ``scale_model_input``, ``step``,
``add_noise``) and keyword names, so a diffusers loop ports line for line;
:func:`sample` is that loop, with a progress bar and optional trajectories.
:class:`DDIMInverseSampler` runs DDIM upwards, from an image to its noise (for editing);
it is not in ``SAMPLERS``, which lists the samplers that generate.
"""

from diffusion_np.samplers.base import Sampler, StepOutput
from diffusion_np.samplers.ddim import DDIMSampler
from diffusion_np.samplers.ddim_inverse import DDIMInverseSampler
from diffusion_np.samplers.ddpm import DDPMSampler
from diffusion_np.samplers.dpm_solver import DPMSolverMultistepSampler
from diffusion_np.samplers.euler import EulerSampler
from diffusion_np.samplers.euler_ancestral import EulerAncestralSampler
from diffusion_np.samplers.heun import HeunSampler
from diffusion_np.samplers.lcm import LCMSampler
from diffusion_np.samplers.loop import Trajectory, sample
from diffusion_np.samplers.pndm import PNDMSampler
from diffusion_np.samplers.timesteps import make_timesteps
from diffusion_np.samplers.unipc import UniPCSampler

#: the CLI's short names
SAMPLERS = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "euler": EulerSampler,
    "euler-a": EulerAncestralSampler,
    "heun": HeunSampler,
    "dpm++": DPMSolverMultistepSampler,
    "pndm": PNDMSampler,
    "unipc": UniPCSampler,
    "lcm": LCMSampler,
}

__all__ = [
    "SAMPLERS",
    "DDIMInverseSampler",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverMultistepSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "HeunSampler",
    "LCMSampler",
    "PNDMSampler",
    "Sampler",
    "StepOutput",
    "Trajectory",
    "UniPCSampler",
    "make_timesteps",
    "sample",
]
