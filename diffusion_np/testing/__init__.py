"""Tools to verify schedule and sampler math: invariants (plain functions) and hypothesis strategies.

``diffusion_np.testing.invariants`` needs only NumPy and SciPy and is imported here;
``diffusion_np.testing.strategies`` needs ``hypothesis`` and is imported on its own::

    from diffusion_np.testing import check_alpha_bar
    from diffusion_np.testing.strategies import noise_schedules
"""

from diffusion_np.testing.invariants import (
    check_alpha_bar,
    check_conversions_roundtrip,
    check_forward_variance,
    check_posterior_variance,
    check_timesteps,
)

__all__ = [
    "check_alpha_bar",
    "check_conversions_roundtrip",
    "check_forward_variance",
    "check_posterior_variance",
    "check_timesteps",
]
