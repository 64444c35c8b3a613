"""Which of the T training timesteps a sampler visits with N inference steps.

diffusers' names (Lin et al. 2023, Table 2), T = num_train_timesteps::

    linspace   round(linspace(0, T-1, N)) reversed        T=1000, N=50: 999, 979, 958, ..., 20, 0
    leading    arange(N) * (T // N) reversed + offset      steps_offset=1: 981, 961, ..., 21, 1
    trailing   round(arange(T, 0, -T/N)) - 1               999, 979, ..., 39, 19

"leading" never visits T-1, so with zero terminal SNR the pure-noise step is
skipped: use "trailing" there (REFERENCE pitfall 2).

The sigma samplers may also visit noise levels between training timesteps: Karras
et al.'s spacing of sigma (:func:`karras_sigmas`) and the fractional timestep of a
sigma (:func:`sigma_to_t`) are here too.

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
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
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


# ----------------------------------------------------------------------------- noise levels between timesteps
def karras_sigmas(num_inference_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """EDM Eq. (5): N noise levels evenly spaced in sigma^(1/rho), from sigma_max down to sigma_min.

    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0..N-1.
    rho = 7 is the paper's choice: it spends more steps at low noise, where detail forms.
    The trailing 0 is appended by the sampler, not here.
    """
    ramp = np.linspace(0.0, 1.0, num_inference_steps, dtype=np.float64)
    min_inv_rho = sigma_min ** (1.0 / rho)
    max_inv_rho = sigma_max ** (1.0 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: linear interpolation of log sigma.

    ``log_sigmas`` = log of ``NoiseSchedule.sampling_sigmas`` (increasing in t). For each sigma,
    find the neighbouring training steps lo, lo + 1 with log_sigmas[lo] <= log sigma, and
    return t = lo + w with w = (log_sigmas[lo] - log sigma) / (log_sigmas[lo] - log_sigmas[lo + 1]),
    clipped to [0, 1] (so sigmas outside the training range map to 0 or T-1).
    This is diffusers' ``_sigma_to_t`` (from k-diffusion), vectorised over sigmas.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))  # 1e-10 floor: sigma = 0 maps to t = 0, not log(0)
    dists = log_sigma[None, :] - log_sigmas[:, None]  # (T, n)
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0.0, 1.0)
    return (1.0 - w) * low_idx + w * high_idx
