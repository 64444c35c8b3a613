"""Hypothesis strategies for noise-schedule and sampler code.

Draw valid configurations and let `hypothesis <https://hypothesis.readthedocs.io>`_
search them for a counter-example to your property; when it finds one it
shrinks it to the simplest failing input (small T, round betas)::

    from hypothesis import given
    from diffusion_np.testing.strategies import noise_schedules
    from diffusion_np.testing.invariants import check_alpha_bar

    @given(noise_schedules())
    def test_my_alpha_bar(schedule):
        check_alpha_bar(my_alpha_bar(schedule.betas))

What is drawn, and the ranges (chosen so that every draw is a valid schedule
whose alpha_bar stays representable in float64):

* :func:`schedule_configs`: keyword dicts for ``NoiseSchedule.from_config`` (and
  diffusers' schedulers): every named kind, T in [1, 1000], 1e-5 <= beta_start
  <= beta_end <= 0.05. (Much larger betas over T = 1000 steps underflow
  alpha_bar to exactly 0 in float64: a real limit of the arithmetic, not of the
  schedule, so it is kept out of the default range; widen ``max_beta`` to see it.)
* :func:`noise_schedules`: ``NoiseSchedule`` instances, from configs or from
  ``trained_betas`` (arbitrary, unsorted betas).
* :func:`inference_steps`: (T, N, spacing, steps_offset) combinations that
  ``make_timesteps`` must accept.
* :func:`timestep_sequences`: arbitrary strictly decreasing timestep sequences
  in [0, T-1] (custom skips, for samplers that take any sequence).
* :func:`images`: small float arrays, channels last, values in [-1, 1].

Needs the ``hypothesis`` package (a test dependency, not a runtime one).
Left out: continuous-time schedules, sigma-space (Karras) configurations.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from diffusion_np.samplers.timesteps import SPACINGS
from diffusion_np.schedules import NoiseSchedule

#: the kinds diffusers' schedulers know (``cosine`` is our alias of squaredcos_cap_v2)
SCHEDULE_KINDS = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


@st.composite
def schedule_configs(
    draw,
    kinds=SCHEDULE_KINDS,
    min_T: int = 1,
    max_T: int = 1000,
    max_beta: float = 0.05,
    zero_terminal_snr: bool | None = False,
) -> dict:
    """Keyword dicts for ``NoiseSchedule.from_config``: a valid (kind, T, beta_start, beta_end).

    ``zero_terminal_snr``: False (never), True (always) or None (either) sets
    ``rescale_betas_zero_snr``; rescaling needs T >= 2, so min_T is raised to 2 then.
    The cosine kind ignores beta_start/beta_end (as diffusers does); they are drawn anyway.
    """
    kind = draw(st.sampled_from(kinds))
    rescale = draw(st.booleans()) if zero_terminal_snr is None else zero_terminal_snr
    T = draw(st.integers(max(min_T, 2) if rescale else min_T, max_T))
    beta_start = draw(st.floats(1e-5, max_beta, allow_nan=False, allow_infinity=False))
    beta_end = draw(st.floats(beta_start, max_beta, allow_nan=False, allow_infinity=False))
    return {
        "beta_schedule": kind,
        "num_train_timesteps": T,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "rescale_betas_zero_snr": rescale,
    }


@st.composite
def trained_betas(draw, min_T: int = 1, max_T: int = 200, max_beta: float = 0.05) -> np.ndarray:
    """User-supplied betas: any float64 values in [1e-6, max_beta], in any order."""
    T = draw(st.integers(min_T, max_T))
    elements = st.floats(1e-6, max_beta, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(np.float64, T, elements=elements))


@st.composite
def noise_schedules(draw, zero_terminal_snr: bool | None = False, **config_kwargs) -> NoiseSchedule:
    """``NoiseSchedule`` instances: 3 in 4 from a named config, 1 in 4 from ``trained_betas``.

    Extra keywords go to :func:`schedule_configs`.
    """
    if draw(st.integers(0, 3)) == 0 and not zero_terminal_snr:
        return NoiseSchedule(draw(trained_betas()))
    return NoiseSchedule.from_config(**draw(schedule_configs(zero_terminal_snr=zero_terminal_snr, **config_kwargs)))


class InferenceConfig(NamedTuple):
    """A (T, N, spacing, steps_offset) combination; unpack into ``make_timesteps(N, T, spacing, offset)``."""

    num_train_timesteps: int
    num_inference_steps: int
    timestep_spacing: str
    steps_offset: int


@st.composite
def inference_steps(draw, T: int | None = None, max_T: int = 1000, spacings=SPACINGS) -> InferenceConfig:
    """Valid (T, N, spacing, steps_offset): 1 <= N <= T, offset 0 or 1.

    "leading" adds the offset, so (N - 1) * (T // N) + offset must stay <= T - 1
    (REFERENCE pitfall 3: offset 1 with N = T is invalid and is never drawn here);
    the other spacings ignore the offset, as diffusers does.
    """
    T = draw(st.integers(1, max_T)) if T is None else T
    N = draw(st.integers(1, T))
    spacing = draw(st.sampled_from(spacings))
    offset = draw(st.integers(0, 1))
    if spacing == "leading" and (N - 1) * (T // N) + offset > T - 1:
        offset = 0
    return InferenceConfig(T, N, spacing, offset)


def timestep_sequences(T: int, min_size: int = 1, max_size: int | None = None):
    """Strictly decreasing int64 arrays of distinct timesteps in [0, T-1] (any skip pattern)."""
    max_size = T if max_size is None else min(max_size, T)
    return st.sets(st.integers(0, T - 1), min_size=min_size, max_size=max_size).map(
        lambda s: np.array(sorted(s, reverse=True), dtype=np.int64)
    )


def images(shapes=None, dtype=np.float32, quantized: bool = False):
    """Small float arrays (B, H, W, C) with values in [-1, 1].

    ``shapes``: a strategy for the shape (default: B 1-3, H and W 1-5, C 1-3).
    ``quantized=True`` puts the values on the 256 levels -1 + 2k/255 of 8-bit data
    (what the discretized decoder likelihood expects).
    """
    if shapes is None:
        shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 3))
    if quantized:
        return shapes.flatmap(
            lambda s: hnp.arrays(np.int64, s, elements=st.integers(0, 255)).map(
                lambda k: (k / 127.5 - 1.0).astype(dtype)
            )
        )
    # width=32 keeps float32 draws exactly representable
    elements = st.floats(-1.0, 1.0, allow_nan=False, width=32 if np.dtype(dtype) == np.float32 else 64)
    return shapes.flatmap(lambda s: hnp.arrays(dtype, s, elements=elements))
