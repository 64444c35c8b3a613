"""Classical repairs that know the degradation but have no learned prior: what DPS must beat.

* **Wiener deconvolution** (Wiener 1949; Gonzalez & Woods, "Digital Image Processing",
  Sec. 5.8) for the blur. The circular blur is diagonal in the Fourier basis,
  Y(w) = H(w) X(w) + N(w), and the linear estimate with the least mean squared error is::

      X_hat(w) = conj(H(w)) P(w) / (|H(w)|^2 P(w) + S^2 sigma_y^2) * Y(w)

  P(w) = E|X(w)|^2 is the power spectrum of clean images (a *second-order* prior, measured
  on training images by :func:`signal_power`), S^2 sigma_y^2 the noise's (white noise has the
  same power at every frequency; S^2 from NumPy's unnormalised FFT of S x S pixels). Where the
  blur kills a frequency (|H| small) the filter gives up on it instead of amplifying noise.
  Without P, a constant noise-to-signal ratio ``nsr`` replaces S^2 sigma_y^2 / P(w).
* **Bicubic interpolation** (Keys 1981, a = -0.5, the kernel of PIL's and OpenCV's bicubic)
  for super-resolution: each low-resolution pixel sits at the centre of its f x f block.
* **The adaptive Wiener filter** (Lim 1990, Eq. 9.44; ``scipy.signal.wiener``) for noise:
  shrinks every pixel towards its local mean by ``max(0, 1 - sigma_y^2 / local variance)``.
* **Harmonic inpainting**: the hole is filled with the solution of Laplace's equation whose
  boundary values are the observed pixels around it (Jacobi iterations: every missing pixel
  becomes the mean of its four neighbours until nothing changes), a smooth membrane.

All run on the host (NumPy/SciPy), images ``(B, H, W, C)`` in [-1, 1]. Left out: Richardson-Lucy,
total-variation deconvolution, Lanczos and edge-directed interpolation, exemplar inpainting.
"""

from __future__ import annotations

import numpy as np
import scipy.signal

from diffusion_np.backend import asnumpy
from diffusion_np.data.digits import load_digits
from diffusion_np.data.shapes import combos, render
from diffusion_np.restoration.operators import Blur, Degradation, Denoise, Downsample, Inpaint

__all__ = [
    "baseline",
    "bicubic_matrix",
    "bicubic_upsample",
    "harmonic_inpaint",
    "kernel_transfer",
    "signal_power",
    "training_power",
    "wiener_deconvolution",
    "wiener_filter",
]


def _host(x, name: str) -> np.ndarray:
    x = np.asarray(asnumpy(x), dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"{name} must be (B, H, W, C) images, got shape {x.shape}")
    return x


def kernel_transfer(kernel, image_size: int) -> np.ndarray:
    """H(w), the (S, S) transfer function of :class:`~diffusion_np.restoration.operators.Blur`'s
    circular correlation with ``kernel``: the kernel's centre tap moved to pixel (0, 0), then
    FFT-ed and conjugated (correlation = convolution with the flipped kernel)."""
    kernel = np.asarray(kernel, dtype=np.float64)
    K, c = kernel.shape[0], (kernel.shape[0] - 1) // 2
    padded = np.zeros((image_size, image_size))
    for u in range(K):
        for v in range(K):
            padded[(u - c) % image_size, (v - c) % image_size] += kernel[u, v]
    return np.conj(np.fft.fft2(padded))  # (S, S) complex


def signal_power(images) -> np.ndarray:
    """P(w) = mean over images and channels of |FFT2(x)|^2: the power spectrum of clean images, (S, S)."""
    x = _host(images, "images")
    spectra = np.fft.fft2(x, axes=(1, 2))  # (B, S, S, C)
    return np.mean(np.abs(spectra) ** 2, axis=(0, 3))  # (S, S)


def training_power(dataset: str, image_size: int) -> np.ndarray:
    """P(w) of the training images of ``dataset`` ("digits": scikit-learn's train split, resized to
    ``image_size``; "shapes": 512 renders of the training captions, seed 99): what the Wiener
    baseline knows about images (the DPS prior knows the same images through the model)."""
    if dataset == "digits":
        return signal_power(load_digits("train", image_size=image_size)[0])
    if dataset == "shapes":
        rng = np.random.default_rng(0)
        return signal_power(render(combos("train")[rng.choice(162, 512)], 99, image_size=image_size))
    raise ValueError(f"dataset must be 'digits' or 'shapes', got {dataset!r}")


def wiener_deconvolution(y, kernel, noise_std: float, power=None, nsr: float = 1e-2) -> np.ndarray:
    """Wiener deconvolution of circularly blurred ``y`` (module docstring), per channel.

    Parameters
    ----------
    y : (B, S, S, C) the blurred, noisy measurement
    kernel : (K, K) the blur kernel (as given to ``Blur``)
    noise_std : sigma_y of the measurement's noise
    power : (S, S) P(w) from :func:`signal_power`, optional
    nsr : the constant noise-to-signal ratio used when ``power`` is None

    Returns
    -------
    (B, S, S, C) float32 on the host.
    """
    y = _host(y, "y")
    S = y.shape[1]
    H = kernel_transfer(kernel, S)[None, :, :, None]  # (1, S, S, 1)
    Y = np.fft.fft2(y, axes=(1, 2))
    if power is None:
        gain = np.conj(H) / (np.abs(H) ** 2 + float(nsr))
    else:
        P = np.asarray(power, dtype=np.float64)
        if P.shape != (S, S):
            raise ValueError(f"power must be ({S}, {S}) like the images, got {P.shape}")
        P = P[None, :, :, None]
        gain = np.conj(H) * P / (np.abs(H) ** 2 * P + S * S * float(noise_std) ** 2 + 1e-12)  # 1e-12: P = 0 at w
    return np.real(np.fft.ifft2(gain * Y, axes=(1, 2))).astype(np.float32)


def _keys(s: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (Keys 1981, Eq. 15 with a = -0.5)."""
    s = np.abs(s)
    near = (a + 2) * s**3 - (a + 3) * s**2 + 1  # |s| <= 1
    far = a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a  # 1 < |s| < 2
    return np.where(s <= 1, near, np.where(s < 2, far, 0.0))


def bicubic_matrix(n_in: int, factor: int) -> np.ndarray:
    """(n_in * factor, n_in) bicubic interpolation weights along one axis. Output pixel u sits at
    (u + 0.5) / f - 0.5 in input coordinates (pixel centres aligned, as average pooling made them);
    indices beyond the edge repeat the edge pixel."""
    n_out = n_in * factor
    M = np.zeros((n_out, n_in))
    for u in range(n_out):
        s = (u + 0.5) / factor - 0.5
        base = int(np.floor(s))
        for j in range(base - 1, base + 3):
            M[u, min(max(j, 0), n_in - 1)] += _keys(np.array(s - j))
    return M


def bicubic_upsample(y, factor: int) -> np.ndarray:
    """(B, s, s, C) -> (B, s f, s f, C) by bicubic interpolation (separable: rows, then columns)."""
    y = _host(y, "y")
    M = bicubic_matrix(y.shape[1], factor)  # (S, s)
    N = bicubic_matrix(y.shape[2], factor)
    # (S, s) @ (B, s, s', C) over rows, then columns
    up = np.einsum("us,bstc->butc", M, y)
    up = np.einsum("vt,butc->buvc", N, up)
    return up.astype(np.float32)


def wiener_filter(y, noise_std: float, size: int = 3) -> np.ndarray:
    """The adaptive (local) Wiener filter of every channel, ``size x size`` windows (scipy.signal.wiener)."""
    y = _host(y, "y")
    out = np.empty_like(y)
    for b in range(y.shape[0]):
        for c in range(y.shape[3]):
            out[b, :, :, c] = scipy.signal.wiener(y[b, :, :, c], (size, size), noise=float(noise_std) ** 2)
    return out.astype(np.float32)


def harmonic_inpaint(y, mask, iterations: int = 500) -> np.ndarray:
    """Fill the pixels where ``mask`` is 0 with the harmonic (Laplace) interpolation of their
    surroundings: Jacobi iterations, each missing pixel the mean of its 4 neighbours (edges repeat)."""
    y = _host(y, "y")
    keep = np.asarray(mask, dtype=np.float64)[None, :, :, None]  # (1, S, S, 1)
    observed = y * keep
    # start the hole at the mean of the observed pixels of each image and channel
    mean = observed.sum(axis=(1, 2), keepdims=True) / keep.sum()
    x = observed + (1.0 - keep) * mean
    for _ in range(int(iterations)):
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        neighbours = 0.25 * (p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:])
        x = observed + (1.0 - keep) * neighbours
    return x.astype(np.float32)


def baseline(degradation: Degradation, y, power=None) -> np.ndarray:
    """The classical repair of ``y`` for ``degradation``'s task (host float32, clipped to [-1, 1]):
    Wiener deconvolution, bicubic, the adaptive Wiener filter, or harmonic inpainting."""
    degradation.check_measurement(y)
    if isinstance(degradation, Blur):
        out = wiener_deconvolution(y, degradation.kernel, degradation.noise_std, power)
    elif isinstance(degradation, Downsample):
        out = bicubic_upsample(y, degradation.factor)
    elif isinstance(degradation, Denoise):
        out = wiener_filter(y, degradation.noise_std)
    elif isinstance(degradation, Inpaint):
        out = harmonic_inpaint(y, degradation.mask)
    else:
        raise TypeError(f"no classical baseline for {type(degradation).__name__}")
    return np.clip(out, -1.0, 1.0)
