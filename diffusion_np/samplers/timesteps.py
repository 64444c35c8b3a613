"""Which of the T training timesteps a sampler visits with N inference steps.

diffusers' names (Lin et al. 2023, Table 2), T = num_train_timesteps::

    linspace   round(linspace(0, T-1, N)) reversed        T=1000, N=50: 999, 979, 958, ..., 20, 0
    leading    arange(N) * (T // N) reversed + offset      steps_offset=1: 981, 961, ..., 21, 1
    trailing   round(arange(T, 0, -T/N)) - 1               999, 979, ..., 39, 19

"leading" never visits T-1, so with zero terminal SNR the pure-noise step is
skipped: use "trailing" there (REFERENCE pitfall 2).

Where a step at t goes is a second choice (``PREV_TIMESTEP_RULES``). The sequence's
next entry is what the papers mean. diffusers' DDIM and PNDM go to ``t - T // N``
instead, the stride of "leading" spacing, whatever the spacing: the same where
every gap is T // N, and a noise level the sequence never visits where the gaps
are uneven, as for linspace and trailing with N not dividing T (REFERENCE
pitfall 1). DDIM and PNDM follow diffusers by default (``prev_timestep_rule=
"stride"``) and offer the sequence (``"sequence"``); DDPM walks the sequence, as
diffusers' DDPM does.
"""

from __future__ import annotations

import numpy as np

SPACINGS = ("linspace", "leading", "trailing")
#: where a DDIM or PNDM step at t goes: t - T // N (diffusers) or the next entry of the sequence
PREV_TIMESTEP_RULES = ("stride", "sequence")


def make_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    round_linspace: bool = True,
) -> np.ndarray:
    """The N timesteps to visit, strictly decreasing, within [0, T-1].

    Returns int64, or float64 when ``round_linspace=False`` (k-diffusion-style
    samplers such as Euler interpolate sigma between integer timesteps, and
    diffusers' Euler keeps linspace's fractional values).

    Raises ValueError for N < 1, N > T, an unknown spacing, or a steps_offset
    that would index past T-1 (REFERENCE pitfall 3: leading, offset 1, N = T).
    """
    N, T = num_inference_steps, num_train_timesteps
    if not isinstance(N, (int, np.integer)) or N < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {N!r}")
    if N > T:
        raise ValueError(f"num_inference_steps ({N}) cannot exceed num_train_timesteps ({T})")
    if timestep_spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {timestep_spacing!r}")
    if timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, N, dtype=np.float64)[::-1]
        return t.round().astype(np.int64) if round_linspace else t.copy()
    if timestep_spacing == "leading":
        t = np.arange(N, dtype=np.int64)[::-1] * (T // N) + steps_offset
        if t[0] > T - 1:
            raise ValueError(
                f"steps_offset={steps_offset} with {N} leading steps of {T // N} reaches timestep {t[0]}, "
                f"past the last training timestep {T - 1}; lower steps_offset or use 'trailing'"
            )
    else:  # trailing
        # [:N]: the float step of arange can add an (N+1)-th entry ~1e-15 that rounds to timestep -1
        # (T=15, N=13; diffusers 0.42 returns that -1). Keeping arange itself keeps diffusers' rounding.
        t = np.round(np.arange(T, 0, -T / N)[:N]).astype(np.int64) - 1
    return t if round_linspace else t.astype(np.float64)
