"""Image repair: known degradations y = A(x) + n, classical baselines, and diffusion posterior sampling.

* :mod:`~diffusion_np.restoration.operators`: blur, 2x/4x downsampling, noise, a missing region,
  each with its backward (the adjoint A^T).
* :mod:`~diffusion_np.restoration.baselines`: Wiener deconvolution, bicubic, the adaptive Wiener
  filter, harmonic inpainting.
* :mod:`~diffusion_np.restoration.dps`: diffusion posterior sampling (Chung et al. 2023), whose
  measurement gradient runs through the U-Net's (and the VAE decoder's) hand-written backward.
"""

from diffusion_np.restoration.baselines import (
    baseline,
    bicubic_upsample,
    harmonic_inpaint,
    signal_power,
    training_power,
    wiener_deconvolution,
    wiener_filter,
)
from diffusion_np.restoration.dps import DPSOutput, MeasurementGradient, dps_restore, measurement_gradient
from diffusion_np.restoration.operators import (
    TASKS,
    Blur,
    Degradation,
    Denoise,
    Downsample,
    Inpaint,
    box_mask,
    gaussian_kernel,
    make_degradation,
)

__all__ = [
    "TASKS",
    "Blur",
    "DPSOutput",
    "Degradation",
    "Denoise",
    "Downsample",
    "Inpaint",
    "MeasurementGradient",
    "baseline",
    "bicubic_upsample",
    "box_mask",
    "dps_restore",
    "gaussian_kernel",
    "harmonic_inpaint",
    "make_degradation",
    "measurement_gradient",
    "signal_power",
    "training_power",
    "wiener_deconvolution",
    "wiener_filter",
]
