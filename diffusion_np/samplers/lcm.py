"""Multistep consistency sampling of Latent Consistency Models (Luo et al. 2023, Algorithm 1).

A consistency model learns one function that maps any point of a probability-flow ODE
trajectory to the trajectory's origin (Song et al. 2023). LCM parametrises it on top of a
diffusion network's x0 estimate (Luo et al. 2023, Eq. 9)::

    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred(x_t, t)
    c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2),   c_out(t) = s t / sqrt((s t)^2 + sigma_data^2)

with s = ``timestep_scaling`` (10) and sigma_data = 0.5 (:func:`~diffusion_np.diffusion.consistency_scalings`).
One evaluation is already a sample; more steps alternate denoising and re-noising
(Song et al. 2023, Algorithm 1; LCM Algorithm 1)::

    for t_i in timesteps:
        denoised = f(x, t_i)                                                   "consistency function"
        x = sqrt(alpha_bar_{t_{i+1}}) denoised + sqrt(1 - alpha_bar_{t_{i+1}}) z    z ~ N(0, I)
    (the last step returns ``denoised`` without noise)

Timesteps, as diffusers' ``LCMScheduler`` lays them out: the distillation visits the
``original_inference_steps`` (N', 50) timesteps ``k * (1..N') - 1`` with the skipping interval
k = T // N' (T = 1000: 999, 979, ..., 19); N inference steps take N of those, evenly spaced
in index from the top::

    origin  = (k * arange(1, int(N' * strength) + 1) - 1) reversed
    timesteps = origin[floor(linspace(0, len(origin), N, endpoint=False))]     T=1000, N=4: 999, 759, 499, 259

So a sampler step only visits timesteps the student was distilled on. ``timestep_spacing``,
``steps_offset`` and ``set_alpha_to_one`` are accepted for diffusers' config and, as in
diffusers, do not change the walk (the last step ends on ``denoised``).

Code -> paper notation::

    model_output     eps_theta / x0 / v, the network's output at (x_t, t)
    x0_pred          the network's x_0 estimate (before the boundary condition)
    denoised         f_theta(x_t, t), the consistency function (pred_original_sample of StepOutput)
    prev_sample      x at the next timestep of the sequence: denoised re-noised, or denoised itself

Left out: per-sample timesteps.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_np.diffusion import consistency_scalings, x0_and_eps
from diffusion_np.samplers.base import ClipsX0, Sampler, StepOutput


class LCMSampler(ClipsX0, Sampler):
    """Latent Consistency Model sampler (Luo et al. 2023), diffusers ``LCMScheduler`` keywords and defaults.

    Parameters beyond :class:`~diffusion_np.samplers.base.Sampler`'s
    ----------------------------------------------------------------
    original_inference_steps : int
        N', the number of timesteps the distillation visited (skipping interval k = T // N').
    clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value
        x0 clipping before the boundary condition, as DDIM's (:func:`~diffusion_np.samplers.base.clip_x0`).
    set_alpha_to_one : bool
        Accepted for diffusers' config; the last step returns ``denoised`` whatever it says.
    timestep_scaling : float > 0
        s of c_skip and c_out (10 in LCM): larger makes f closer to the x0 estimate at small t.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            prediction_type, timestep_spacing, steps_offset, rescale_betas_zero_snr,
        )  # fmt: skip
        self._keep_clip_config(
            clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value
        )
        self.original_inference_steps = _check_original_steps(original_inference_steps, self.num_train_timesteps)
        if not timestep_scaling > 0:
            raise ValueError(f"timestep_scaling must be > 0, got {timestep_scaling!r}")
        self.timestep_scaling = float(timestep_scaling)
        self.set_alpha_to_one = bool(set_alpha_to_one)

    @property
    def final_alpha_bar(self) -> float:
        """alpha_bar after the last step by ``set_alpha_to_one`` (diffusers' config; the walk never uses it)."""
        return 1.0 if self.set_alpha_to_one else float(self.alpha_bar[0])

    def origin_timesteps(self, original_inference_steps: int | None = None, strength: float = 1.0) -> np.ndarray:
        """The distillation's timesteps k * (1..int(N' * strength)) - 1, increasing (k = T // N')."""
        n_orig = self.original_inference_steps if original_inference_steps is None else _check_original_steps(
            original_inference_steps, self.num_train_timesteps)
        k = self.num_train_timesteps // n_orig
        return np.arange(1, int(n_orig * strength) + 1, dtype=np.int64) * k - 1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        original_inference_steps: int | None = None,
        timesteps=None,
        strength: float = 1.0,
    ) -> None:
        """Choose the timesteps: N of the distillation's, evenly spaced in index (module docstring).

        Parameters
        ----------
        num_inference_steps : int, optional
            N, at most ``original_inference_steps * strength``. Exactly one of this and ``timesteps``.
        original_inference_steps : int, optional
            N' for this call (the constructor's by default).
        timesteps : sequence of int, optional
            A custom decreasing sequence below T (diffusers warns where it leaves the distillation's grid).
        strength : float in (0, 1]
            Image-to-image: keep the first ``strength`` fraction of the grid (of the custom list).
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps: pass exactly one of num_inference_steps and timesteps")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must lie in (0, 1], got {strength!r}")
        origin = self.origin_timesteps(original_inference_steps, strength)
        if timesteps is not None:
            custom = np.asarray(timesteps, dtype=np.int64)
            if custom.ndim != 1 or custom.size == 0:
                raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {custom.shape}")
            if np.any(np.diff(custom) >= 0):
                raise ValueError(f"timesteps must be strictly decreasing, got {custom.tolist()}")
            if custom[0] >= self.num_train_timesteps or custom[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {custom.tolist()}")
            n = len(custom)
            t_start = max(n - min(int(n * strength), n), 0)  # diffusers' image-to-image cut
            self.timesteps, self.num_inference_steps = custom[t_start:], n
            return
        if (isinstance(num_inference_steps, (bool, np.bool_)) or not isinstance(num_inference_steps, (int, np.integer))
                or not 1 <= num_inference_steps <= len(origin)):
            raise ValueError(
                f"num_inference_steps must be an integer in [1, {len(origin)}] (original_inference_steps x strength), "
                f"got {num_inference_steps!r}"
            )
        # N of the grid's indices from its top, evenly spaced: floor(linspace(0, len, N, endpoint=False))
        index = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[::-1][index]
        self.num_inference_steps = int(num_inference_steps)

    def boundary_scalings(self, t) -> tuple[float, float]:
        """(c_skip, c_out) at timestep t (:func:`~diffusion_np.diffusion.consistency_scalings`)."""
        return consistency_scalings(float(t), self.timestep_scaling)

    def step(self, model_output, t, sample, noise=None, rng: np.random.Generator | None = None) -> StepOutput:
        """One multistep consistency step: denoise with f(x_t, t), re-noise to the next timestep.

        Parameters
        ----------
        model_output : array (B, ..., C)
            The network's output at (sample, t), of this sampler's ``prediction_type``.
        t : int
            The current timestep, an entry of ``self.timesteps``.
        sample : array (B, ..., C)
            x_t.
        noise : array like ``sample``, optional
            z of the re-noising; drawn from ``rng`` (host side) when not given. Unused on the last step.
        rng : numpy Generator, optional

        Returns
        -------
        StepOutput(prev_sample=x at the next timestep (or denoised on the last step), pred_original_sample=denoised)
        """
        index = self._position(t)
        self._check_output(model_output, sample)
        t = int(t)

        # 1. the next timestep of the sequence (none after the last step)
        last = index + 1 == len(self.timesteps)

        # 2. the boundary condition's scalings at t
        c_skip, c_out = self.boundary_scalings(t)

        # 3. x0_pred from the model output, clipped or thresholded if asked (wrong for latents: pitfall 6)
        x0_pred, _ = x0_and_eps(model_output, sample, t, self.alpha_bar, self.prediction_type)
        x0_pred = self._clip(x0_pred)

        # 4. the consistency function f(x_t, t) = c_skip x_t + c_out x0_pred (LCM Eq. 9)
        denoised = c_out * x0_pred + c_skip * sample
        if last:
            return StepOutput(denoised, denoised)

        # 5. re-noise to the next timestep: q(x_prev | x_0 = denoised), DDPM Eq. 4
        ab_prev = float(self.alpha_bar[int(self.timesteps[index + 1])])
        z = self._noise_like(sample, noise, rng)
        prev_sample = math.sqrt(ab_prev) * denoised + math.sqrt(1.0 - ab_prev) * z
        return StepOutput(prev_sample, denoised)


def _check_original_steps(original_inference_steps, T: int) -> int:
    """original_inference_steps as an int in [1, T], or TypeError / ValueError naming it."""
    if isinstance(original_inference_steps, (bool, np.bool_)) or not isinstance(
            original_inference_steps, (int, np.integer)):
        raise TypeError(f"original_inference_steps must be an int >= 1, got {original_inference_steps!r}")
    if not 1 <= original_inference_steps <= T:
        raise ValueError(f"original_inference_steps must lie in [1, num_train_timesteps={T}], "
                         f"got {original_inference_steps}")
    return int(original_inference_steps)
