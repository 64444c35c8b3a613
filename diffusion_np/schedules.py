"""Noise schedules: how much noise the forward process adds at each step.

A schedule is a sequence of variances ``beta_t``, t = 0..T-1 (diffusers' 0-based
index; DDPM's paper counts 1..T). Everything else follows from it (DDPM Eq. 4)::

    alpha_t     = 1 - beta_t
    alpha_bar_t = prod_{s <= t} alpha_s                 x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    SNR_t       = alpha_bar_t / (1 - alpha_bar_t)       log-SNR lambda_t = log SNR_t
    sigma_t     = sqrt((1 - alpha_bar_t) / alpha_bar_t)  (the k-diffusion / Karras noise level, = 1/sqrt(SNR_t))

and back from a noise level sigma to the coefficients of x_t = alpha_t x_0 + sigma_vp eps
(:func:`vp_coefficients`): alpha_t = sqrt(alpha_bar) = 1 / sqrt(sigma^2 + 1), sigma_vp = sigma alpha_t.

Kinds (diffusers' names, REFERENCE.md):

* ``linear``: beta = linspace(beta_start, beta_end, T) (DDPM, 1e-4 .. 0.02).
* ``scaled_linear``: beta = linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (Stable Diffusion, 0.00085 .. 0.012).
* ``squaredcos_cap_v2`` (alias ``cosine``): Improved DDPM Eq. (17),
  f(u) = cos^2(((u + s) / (1 + s)) pi/2) with s = 0.008, beta_t = min(1 - f((t+1)/T) / f(t/T), 0.999).
* ``sigmoid``: beta = sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start (GeoDiff).
* user-supplied ``trained_betas``.

And the zero-terminal-SNR rescaling of Lin et al. 2023 (Algorithm 1), which
shifts sqrt(alpha_bar) so that alpha_bar_{T-1} = 0 exactly: the last step is
pure noise, as sampling assumes. It needs v-prediction (with eps-prediction the
model's x0 estimate divides by sqrt(alpha_bar_{T-1}) = 0).

Everything is computed in float64: alpha_bar is a product of up to 1000 numbers
close to 1, and float32 loses about three digits of it by the end. Cast when you
use a value in float32 math.

Left out: continuous-time schedules and learned schedules (VDM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "sigmoid")

#: diffusers' stand-in for alpha_bar = 0 (zero terminal SNR) where a sampler needs a finite sigma: 2^-24,
#: the smallest positive float16 subnormal, so sigma_max = sqrt((1 - 2^-24) / 2^-24) = 4096
ZERO_SNR_ALPHA_BAR = 2.0**-24


def vp_coefficients(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)) of the noise level sigma = sqrt((1 - ab) / ab).

    alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t: the coefficients of
    x_t = alpha_t x_0 + sigma_t eps, for samplers that walk sigma (Python floats in and out).
    """
    alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def cosine_alpha_bar(u, s: float = 0.008):
    """Improved DDPM Eq. (17): f(u) = cos^2(((u + s) / (1 + s)) * pi / 2), u = t/T in [0, 1]."""
    return np.cos((np.asarray(u, dtype=np.float64) + s) / (1 + s) * math.pi / 2) ** 2


def make_betas(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    trained_betas=None,
    max_beta: float = 0.999,
) -> np.ndarray:
    """The betas of a named schedule (or ``trained_betas``), float64, shape (T,).

    Raises ValueError for an unknown kind (naming the allowed ones), T < 1,
    betas outside (0, 1), or beta_end < beta_start for the linear kinds.
    """
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"trained_betas must be a non-empty 1-D sequence, got shape {betas.shape}")
        _check_betas(betas, "trained_betas")
        return betas
    T = num_train_timesteps
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"num_train_timesteps must be an integer >= 1, got {T!r}")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; allowed: {', '.join(BETA_SCHEDULES)}")
    if beta_schedule in ("linear", "scaled_linear", "sigmoid"):
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name} must be a number in (0, 1), got {value!r}")
        if not (0 < beta_start < 1 and 0 < beta_end < 1):
            raise ValueError(
                f"beta_start and beta_end must lie in (0, 1), got beta_start={beta_start}, beta_end={beta_end}"
            )
        if beta_end < beta_start:
            raise ValueError(
                f"beta_end ({beta_end}) must be >= beta_start ({beta_start}) for the {beta_schedule!r} schedule"
            )
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif beta_schedule == "sigmoid":
        x = np.linspace(-6, 6, T, dtype=np.float64)
        betas = 1 / (1 + np.exp(-x)) * (beta_end - beta_start) + beta_start
    else:  # cosine: Improved DDPM Eq. (17); beta clipped at max_beta to avoid a singularity at t = T
        t = np.arange(T, dtype=np.float64)
        betas = np.minimum(1 - cosine_alpha_bar((t + 1) / T) / cosine_alpha_bar(t / T), max_beta)
    _check_betas(betas, beta_schedule)
    return betas


def _check_betas(betas: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
        bad = betas[~((betas > 0) & (betas < 1))]
        raise ValueError(f"{what}: every beta must lie in (0, 1); got values such as {bad[:3].tolist()}")


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: rescale so that alpha_bar_{T-1} = 0 (zero terminal SNR).

    s = sqrt(alpha_bar); s <- (s - s_{T-1}) * s_0 / (s_0 - s_{T-1}); alpha_bar' = s^2;
    alpha'_t = alpha_bar'_t / alpha_bar'_{t-1}; beta' = 1 - alpha'. The first
    alpha_bar is kept, the last becomes exactly 0, so beta'_{T-1} = 1.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.size < 2:  # the first alpha_bar is kept and the last set to 0: they must differ
        raise ValueError(f"zero terminal SNR rescaling needs at least 2 timesteps, got {betas.size}")
    s = np.sqrt(np.cumprod(1 - betas))
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    alpha_bar = s**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


@dataclass
class NoiseSchedule:
    """All per-timestep quantities of a beta schedule, in float64 arrays of shape (T,).

    Build one with :meth:`from_config` (diffusers' keyword names) or from betas.
    Index t is 0-based, as in diffusers. ``alpha_bar`` may reach exactly 0 at
    t = T-1 with zero terminal SNR; then ``snr[-1] = 0``, ``log_snr[-1] = -inf``
    and ``sigmas[-1] = inf`` (honest values, not clipped). ``sampling_sigmas`` is
    the same table with that one value finite (:data:`ZERO_SNR_ALPHA_BAR`): the noise
    levels the sigma samplers (Euler, Heun, DPM-Solver++, UniPC) start from.
    """

    betas: np.ndarray
    alphas: np.ndarray = field(init=False)
    alpha_bar: np.ndarray = field(init=False)
    sqrt_alpha_bar: np.ndarray = field(init=False)
    sqrt_one_minus_alpha_bar: np.ndarray = field(init=False)
    snr: np.ndarray = field(init=False)
    log_snr: np.ndarray = field(init=False)
    sigmas: np.ndarray = field(init=False)
    sampling_sigmas: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        # beta = 1 is allowed only as the last entry (zero terminal SNR)
        if np.any(betas[:-1] >= 1) or np.any(betas <= 0) or betas[-1] > 1 or not np.all(np.isfinite(betas)):
            raise ValueError("betas must lie in (0, 1) (beta = 1 only at the last step, for zero terminal SNR)")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bar = np.cumprod(self.alphas)
        self.sqrt_alpha_bar = np.sqrt(self.alpha_bar)
        self.sqrt_one_minus_alpha_bar = np.sqrt(1.0 - self.alpha_bar)
        with np.errstate(divide="ignore"):  # alpha_bar = 0 at T-1 is allowed (zero terminal SNR)
            self.snr = self.alpha_bar / (1.0 - self.alpha_bar)
            self.log_snr = np.log(self.snr)
            self.sigmas = np.sqrt((1.0 - self.alpha_bar) / self.alpha_bar)
        # alpha_bar = 0 (zero terminal SNR) has sigma = inf: a sampler cannot start there, so it
        # starts from diffusers' stand-in alpha_bar = 2^-24 instead (sigma_max = 4096)
        ab = np.where(self.alpha_bar > 0.0, self.alpha_bar, ZERO_SNR_ALPHA_BAR)
        self.sampling_sigmas = np.sqrt((1.0 - ab) / ab)

    @classmethod
    def from_config(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        rescale_betas_zero_snr: bool = False,
    ) -> NoiseSchedule:
        """A schedule from diffusers' scheduler keywords (see :func:`make_betas`)."""
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return int(self.betas.shape[0])

    def __len__(self) -> int:
        return self.num_train_timesteps

    def plot(self, axes=None, label: str | None = None):
        """Plot alpha_bar, log-SNR and sigma against t on three axes; returns the axes.

        Pass ``axes`` (three matplotlib axes) to overlay several schedules.
        """
        import matplotlib.pyplot as plt

        if axes is None:
            _, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        t = np.arange(self.num_train_timesteps)
        axes[0].plot(t, self.alpha_bar, label=label)
        axes[0].set(title=r"$\bar\alpha_t$", xlabel="t")
        with np.errstate(divide="ignore"):
            axes[1].plot(t, self.log_snr, label=label)
        axes[1].set(title=r"log SNR$_t$", xlabel="t")
        axes[2].semilogy(t, self.sigmas, label=label)
        axes[2].set(title=r"$\sigma_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}$", xlabel="t")
        if label is not None:
            axes[0].legend()
        return axes
