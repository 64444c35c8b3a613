"""The sampling loop: start from noise, ask the model, let a sampler step, repeat.

The loop is diffusers' canonical one and works with every
:class:`~diffusion_np.samplers.base.Sampler`::

    x = init_noise_sigma * z_T,            z_T ~ N(0, I)
    for i, t in enumerate(sampler.timesteps):
        model_input = sampler.scale_model_input(x, t)      # identity for DDPM/DDIM
        model_output = model_fn(model_input, t)            # eps, x0 or v, per the sampler's prediction_type
        x = sampler.step(model_output, t, x, noise=z_i).prev_sample,   z_i ~ N(0, I)

Second-order samplers (Heun) repeat timesteps in ``sampler.timesteps`` and keep
their half-finished step inside the sampler, as diffusers does, so this loop
never changes with the sampler.

Randomness is drawn on the host with ``numpy.random.default_rng(seed)`` (first
the initial noise, then one draw of z per step, whether or not the sampler uses
it) and moved to the device afterwards: the same seed gives the same numbers on
NumPy and CuPy, and changing eta does not shift the random stream.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6): with ``guidance=w`` the
model function returns a pair (unconditional, conditional) and the loop uses
``uncond + w * (cond - uncond)``; how the pair is computed (two calls, or one
batch of 2B) is the model function's business.

:func:`denoise` is the loop body on its own, for callers that start part of the
way down the schedule (image-to-image). Left out: inpainting masks (the inpaint
pipeline interleaves them with the steps), batched per-sample timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from diffusion_np.backend import default_rng, get_xp
from diffusion_np.samplers.base import Sampler


class Trajectory(NamedTuple):
    """What ``sample(..., return_trajectory=True)`` records, for plots.

    ``x_t[0]`` is the initial noise and ``x_t[i + 1]`` the sample after step i
    (len N + 1); ``x0_pred[i]`` is the model's x_0 estimate at ``timesteps[i]`` (len N).
    Arrays stay on the sampling device: use ``backend.asnumpy`` to plot them.
    """

    timesteps: np.ndarray
    x_t: list
    x0_pred: list


def sample(
    model_fn: Callable,
    shape: tuple,
    sampler: Sampler,
    steps: int,
    seed: int | None = 0,
    noise=None,
    callback: Callable | None = None,
    progress: bool = True,
    guidance: float | None = None,
    xp=None,
    dtype=np.float32,
    return_trajectory: bool = False,
    step_noise: Sequence | None = None,
    **step_kwargs,
):
    """Draw samples by running ``sampler`` for ``steps`` inference steps.

    Parameters
    ----------
    model_fn : callable(x, t) -> array
        The denoiser: x of ``shape`` and the scalar timestep t (as found in
        ``sampler.timesteps``) to a prediction of the sampler's ``prediction_type``.
        With ``guidance`` it returns (uncond, cond) instead.
    shape : tuple of int
        Shape of the samples, channels-last, e.g. (B, H, W, C).
    sampler : Sampler
        Any sampler (DDPM, DDIM, Euler, ...); ``set_timesteps(steps)`` is called here.
    steps : int >= 1
        Number of inference steps.
    seed : int or None
        Seeds the host-side generator for the initial noise and the per-step noise.
    noise : array of ``shape``, optional
        The initial z_T (before scaling by ``sampler.init_noise_sigma``); drawn from the seed if None.
    callback : callable(i, t, x_t, x0_pred), optional
        Called after step i with the new sample (at the next timestep) and the x_0 estimate made at t.
    progress : bool
        Show a tqdm progress bar.
    guidance : float, optional
        Classifier-free guidance weight w (see the module docstring).
    xp : numpy or cupy module, optional
        Where the samples live; numpy by default.
    dtype : float dtype
        dtype of the samples (float32 by default).
    return_trajectory : bool
        Also return a :class:`Trajectory` of every x_t and x0_pred.
    step_noise : sequence of arrays, optional
        z for every step (one per entry of ``sampler.timesteps``), replacing the seeded draws;
        for replaying another implementation's noise.
    **step_kwargs
        Passed to ``sampler.step`` (e.g. ``eta=1.0`` for DDIM).

    Returns
    -------
    x_0, or (x_0, Trajectory) with ``return_trajectory=True``.
    """
    xp = np if xp is None else xp
    if not isinstance(shape, tuple) or not shape or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive ints such as (B, H, W, C), got {shape!r}")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a diffusion_np Sampler, got {type(sampler).__name__}")
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise ValueError(f"dtype must be a floating dtype, got {np.dtype(dtype)}")
    _check_guidance(guidance)

    sampler.set_timesteps(int(steps))
    timesteps = sampler.timesteps
    if step_noise is not None and len(step_noise) != len(timesteps):
        raise ValueError(f"step_noise must hold one array per timestep ({len(timesteps)}), got {len(step_noise)}")
    rng = default_rng(seed)

    # 1. x_T = init_noise_sigma * z_T (host draw, then to the device)
    if noise is None:
        noise = rng.standard_normal(shape)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    x = xp.asarray(noise, dtype=dtype) * float(sampler.init_noise_sigma)

    x, trajectory = denoise(
        model_fn, sampler, x, timesteps, rng, progress=progress, guidance=guidance, callback=callback,
        step_noise=step_noise, return_trajectory=return_trajectory, **step_kwargs,
    )  # fmt: skip
    return (x, trajectory) if return_trajectory else x


def denoise(
    model_fn: Callable,
    sampler: Sampler,
    x,
    timesteps,
    rng: np.random.Generator,
    progress: bool = True,
    guidance: float | None = None,
    callback: Callable | None = None,
    step_noise: Sequence | None = None,
    return_trajectory: bool = False,
    **step_kwargs,
):
    """Steps 2-4 of the loop, from ``x`` at ``timesteps[0]`` through every entry of ``timesteps``.

    :func:`sample` calls it with the full schedule; image-to-image calls it with a
    tail of ``sampler.timesteps`` (``set_timesteps`` already called) and an image
    noised to the first of them. One z per step is drawn from ``rng`` on the host.
    Arguments as in :func:`sample`. Returns ``(x_0, Trajectory or None)``.
    """
    _check_guidance(guidance)
    xp = get_xp(x)
    trajectory = Trajectory(timesteps, [x], []) if return_trajectory else None
    for i, t in enumerate(_progress(timesteps, progress)):
        # 2. the model's prediction at (x_t, t), guided if asked
        model_output = model_fn(sampler.scale_model_input(x, t), t)
        if guidance is not None:
            model_output = _guide(model_output, guidance)
        # 3. z for this step: drawn every step so the stream does not depend on the sampler's settings
        z = rng.standard_normal(x.shape) if step_noise is None else step_noise[i]
        z = xp.asarray(z, dtype=x.dtype)
        # 4. x_t -> x_{t_prev}
        out = sampler.step(model_output, t, x, noise=z, **step_kwargs)
        x = out.prev_sample
        if callback is not None:
            callback(i, t, x, out.pred_original_sample)
        if trajectory is not None:
            trajectory.x_t.append(x)
            trajectory.x0_pred.append(out.pred_original_sample)
    return x, trajectory


def _check_guidance(guidance) -> None:
    """guidance is None or a finite real number (a NaN weight would turn every image into NaN)."""
    if guidance is None:
        return
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.integer, np.floating)):
        raise TypeError(f"guidance must be a number or None, got {type(guidance).__name__}")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")


def _guide(model_output, w: float):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): uncond + w (cond - uncond)."""
    if not (isinstance(model_output, (tuple, list)) and len(model_output) == 2):
        raise ValueError(
            f"with guidance={w} model_fn must return a pair (uncond, cond), got {type(model_output).__name__}"
        )
    uncond, cond = model_output
    return uncond + float(w) * (cond - uncond)


def _progress(timesteps, enabled: bool):
    if not enabled:
        return timesteps
    from tqdm.auto import tqdm

    return tqdm(timesteps, desc="sampling", leave=False)
