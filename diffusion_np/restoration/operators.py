"""Degradation operators y = A(x) + n, each with its backward (for a linear A: the adjoint A^T).

Image repair starts from a *forward model* of the damage: a known operator A that
turned the clean image x into the measurement y, plus noise n ~ N(0, sigma_y^2 I)::

    blur        A x = k * x                  circular convolution with a normalised kernel k
    superres    A x = avgpool_f(x)           the mean of every f x f block (f = 2 or 4)
    denoise     A x = x                      only the noise n damages the image
    inpaint     A x = m . x                  m = 1 where the pixel was observed, 0 in the hole

All four are linear, so the gradient of anything through A is the adjoint A^T applied
to the upstream gradient, and ``backward(dout) = A^T dout``: the same contract as every
layer's backward (``dout`` of the output's shape in, the input's gradient out). Diffusion
posterior sampling (:mod:`diffusion_np.restoration.dps`) needs exactly this backward to
push ``d ||y - A(x0)||^2 / d A(x0)`` back onto the image.

Conventions. Images are channels-last ``(B, H, W, C)`` in [-1, 1]; every operator is made
for one image size and channel count and says so clearly when it gets another (as
``check_image`` does for layers). The blur is *circular* (the image wraps around at its
edges): then A is diagonal in the Fourier basis, Wiener deconvolution
(:mod:`diffusion_np.restoration.baselines`) inverts it exactly, and the adjoint is the
correlation with the same kernel. On the project's images (a black background) wrapping
changes nothing visible. The noise is drawn on the host from ``numpy.random.default_rng``
and moved to the data's device, as the sampling loop does.

Left out: non-linear degradations (JPEG, phase retrieval: DPS handles them, but a linear
operator keeps the classical baselines exact), motion-blur kernels (any normalised kernel
works, only the Gaussian is built here), and bicubic *down*sampling (average pooling has
the simplest adjoint).
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_np.backend import get_xp
from diffusion_np.nn.validate import check_image

__all__ = [
    "TASKS",
    "Blur",
    "Degradation",
    "Denoise",
    "Downsample",
    "Inpaint",
    "box_mask",
    "gaussian_kernel",
    "make_degradation",
]

#: the repair tasks the CLI and the benchmark know
TASKS = ("deblur", "superres", "denoise", "inpaint")

# a kernel counts as normalised when its sum is 1 within this (float32 sums of 81 taps stay inside 1e-6)
_KERNEL_SUM_TOL = 1e-4


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """A ``size x size`` Gaussian blur kernel exp(-(u^2 + v^2) / (2 sigma^2)), normalised to sum 1 (float64)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise ValueError(f"gaussian_kernel: size must be an odd positive int, got {size!r}")
    if not (isinstance(sigma, (int, float, np.integer, np.floating)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"gaussian_kernel: sigma must be a positive finite number, got {sigma!r}")
    u = np.arange(size) - (size - 1) / 2.0  # offsets from the centre tap
    g = np.exp(-(u**2) / (2.0 * float(sigma) ** 2))
    k = np.outer(g, g)  # separable: (size,) x (size,) -> (size, size)
    return k / k.sum()


def box_mask(image_size: int, hole: int, centre: tuple[int, int] | None = None) -> np.ndarray:
    """An ``(image_size, image_size)`` float mask: 1 (observed) everywhere but a ``hole x hole``
    square of 0 (missing), centred on the image unless ``centre`` (row, column) is given."""
    if not 0 < hole < image_size:
        raise ValueError(f"box_mask: hole must be between 1 and image_size - 1 = {image_size - 1}, got {hole}")
    r, c = (image_size // 2, image_size // 2) if centre is None else centre
    top, left = r - hole // 2, c - hole // 2
    if top < 0 or left < 0 or top + hole > image_size or left + hole > image_size:
        raise ValueError(f"box_mask: a {hole}x{hole} hole centred at {(r, c)} leaves the "
                         f"{image_size}x{image_size} image")
    mask = np.ones((image_size, image_size))
    mask[top:top + hole, left:left + hole] = 0.0
    return mask


class Degradation:
    """A known linear degradation ``y = A(x) + n`` for images of one size and channel count.

    Subclasses define ``forward(x) -> A x`` and ``backward(dout) -> A^T dout`` and set
    ``out_size`` (the measurement's side). ``noise_std`` is sigma_y of the additive noise.

    Parameters
    ----------
    image_size : int
        H = W of the clean images.
    channels : int
        C of the clean images (and of the measurement).
    noise_std : float >= 0
        sigma_y, in the units of images in [-1, 1].
    """

    name = "degradation"

    def __init__(self, image_size: int, channels: int, noise_std: float = 0.0) -> None:
        for arg, value in (("image_size", image_size), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{type(self).__name__}: {arg} must be a positive int, got {value!r}")
        if not (isinstance(noise_std, (int, float, np.integer, np.floating)) and math.isfinite(noise_std)
                and noise_std >= 0):  # fmt: skip
            raise ValueError(f"{type(self).__name__}: noise_std must be a finite number >= 0, got {noise_std!r}")
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.noise_std = float(noise_std)
        self.out_size = self.image_size

    # ---- checks ---------------------------------------------------------------------------------
    def check_image(self, x, what: str = "x") -> None:
        """ValueError unless ``x`` is (B, image_size, image_size, channels)."""
        check_image(type(self).__name__, x, self.channels, what)
        if x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ValueError(
                f"{type(self).__name__} expects {what} of {self.image_size}x{self.image_size} pixels, "
                f"got {x.shape[1]}x{x.shape[2]} (shape {tuple(x.shape)})"
            )

    def check_measurement(self, y, what: str = "y") -> None:
        """ValueError unless ``y`` is (B, out_size, out_size, channels): a measurement this operator made."""
        check_image(type(self).__name__, y, self.channels, what)
        if y.shape[1] != self.out_size or y.shape[2] != self.out_size:
            raise ValueError(
                f"{type(self).__name__} expects the measurement {what} of {self.out_size}x{self.out_size} pixels "
                f"(images of {self.image_size}x{self.image_size}), got {y.shape[1]}x{y.shape[2]} "
                f"(shape {tuple(y.shape)})"
            )

    # ---- the operator ---------------------------------------------------------------------------
    def forward(self, x):
        """A x: (B, S, S, C) -> (B, s, s, C)."""
        raise NotImplementedError

    def backward(self, dout):
        """A^T dout: (B, s, s, C) -> (B, S, S, C), the gradient of <dout, A x> with respect to x."""
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def degrade(self, x, rng=None):
        """A measurement ``y = A x + sigma_y z``, z ~ N(0, I) drawn on the host from ``rng`` (a seed or Generator)."""
        y = self.forward(x)
        if self.noise_std == 0.0:
            return y
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        z = get_xp(y).asarray(rng.standard_normal(y.shape), dtype=y.dtype)
        return y + self.noise_std * z

    def naive_inverse(self, y):
        """The measurement shown at the image's size (what the ``degraded`` rows of the benchmark score):
        y itself, or for super-resolution each low-resolution pixel repeated f x f times."""
        self.check_measurement(y)
        return y

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, channels={self.channels}, "
                f"noise_std={self.noise_std})")


class Blur(Degradation):
    """Circular convolution with a normalised 2-D kernel k (odd side K, sum 1)::

        (A x)[i, j] = sum_{u, v} k[u, v] x[(i + u - c) mod S, (j + v - c) mod S],   c = (K - 1) / 2

    (written as a correlation: for the symmetric kernels used here it is the same thing).
    The adjoint moves every tap the other way: (A^T d)[i, j] = sum_{u, v} k[u, v] d[(i - u + c), (j - v + c)].
    One ``roll`` per tap: K^2 whole-image passes, cheap for the 5x5 and 9x9 kernels used here.
    """

    name = "deblur"

    def __init__(self, kernel, image_size: int, channels: int, noise_std: float = 0.0) -> None:
        super().__init__(image_size, channels, noise_std)
        kernel = np.asarray(kernel, dtype=np.float64)
        if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
            raise ValueError(f"Blur: kernel must be a square 2-D array with an odd side, got shape {kernel.shape}")
        if kernel.shape[0] > self.image_size:
            raise ValueError(f"Blur: the {kernel.shape[0]}x{kernel.shape[0]} kernel is larger than the "
                             f"{self.image_size}x{self.image_size} image")
        if not np.all(np.isfinite(kernel)):
            raise ValueError("Blur: kernel holds NaN or Inf")
        total = float(kernel.sum())
        if abs(total - 1.0) > _KERNEL_SUM_TOL:
            raise ValueError(
                f"Blur: kernel must be normalised (its entries sum to 1, so a flat image stays as it is), "
                f"but they sum to {total:.6g}; divide it by its sum"
            )
        self.kernel = kernel
        self._centre = (kernel.shape[0] - 1) // 2
        # only the non-zero taps, as (row offset, column offset, weight) with Python floats (keeps float32)
        self._taps = [(u - self._centre, v - self._centre, float(kernel[u, v]))
                      for u in range(kernel.shape[0]) for v in range(kernel.shape[1]) if kernel[u, v] != 0.0]

    def forward(self, x):
        self.check_image(x)
        xp = get_xp(x)
        out = xp.zeros_like(x)
        for du, dv, w in self._taps:
            # x[(i + du) mod S, (j + dv) mod S] lands on (i, j): roll by -du, -dv
            out += w * xp.roll(x, (-du, -dv), axis=(1, 2))
        return out

    def backward(self, dout):
        self.check_measurement(dout, "dout")
        xp = get_xp(dout)
        dx = xp.zeros_like(dout)
        for du, dv, w in self._taps:
            dx += w * xp.roll(dout, (du, dv), axis=(1, 2))  # the forward's roll, reversed
        return dx

    def __repr__(self) -> str:
        return f"Blur(kernel {self.kernel.shape[0]}x{self.kernel.shape[0]}, image_size={self.image_size}, " \
               f"channels={self.channels}, noise_std={self.noise_std})"


class Downsample(Degradation):
    """Average pooling by ``factor`` f: every f x f block becomes its mean (a low-resolution camera
    whose pixels integrate the light over their area)::

        (A x)[i, j] = (1 / f^2) sum_{a, b < f} x[f i + a, f j + b]        (S, S) -> (S / f, S / f)
        (A^T d)[f i + a, f j + b] = d[i, j] / f^2                         each value spread back over its block
    """

    name = "superres"

    def __init__(self, factor: int, image_size: int, channels: int, noise_std: float = 0.0) -> None:
        super().__init__(image_size, channels, noise_std)
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 2:
            raise ValueError(f"Downsample: factor must be an int >= 2, got {factor!r}")
        if self.image_size % factor:
            raise ValueError(f"Downsample: image_size {self.image_size} is not divisible by factor {factor}")
        self.factor = int(factor)
        self.out_size = self.image_size // self.factor

    def forward(self, x):
        self.check_image(x)
        B, S, _, C = x.shape
        f, s = self.factor, self.out_size
        blocks = x.reshape(B, s, f, s, f, C)  # (B, s, f, s, f, C): row = f i + a, column = f j + b
        return blocks.mean(axis=(2, 4))  # (B, s, s, C)

    def backward(self, dout):
        self.check_measurement(dout, "dout")
        f = self.factor
        up = get_xp(dout).repeat(get_xp(dout).repeat(dout, f, axis=1), f, axis=2)  # (B, S, S, C)
        return up * (1.0 / (f * f))

    def naive_inverse(self, y):
        """Each low-resolution pixel repeated f x f times (nearest-neighbour upsampling): f^2 A^T y."""
        return self.backward(y) * float(self.factor**2)

    def __repr__(self) -> str:
        return f"Downsample(factor={self.factor}, image_size={self.image_size}, channels={self.channels}, " \
               f"noise_std={self.noise_std})"


class Denoise(Degradation):
    """A = I: the measurement is the image plus noise of std ``noise_std``; the backward passes ``dout`` through."""

    name = "denoise"

    def forward(self, x):
        self.check_image(x)
        return x * 1.0  # a copy, so changing y never changes x

    def backward(self, dout):
        self.check_measurement(dout, "dout")
        return dout * 1.0


class Inpaint(Degradation):
    """A x = m . x with a fixed 0/1 mask m (1 = observed): the missing pixels read 0 (mid grey).
    A is its own adjoint (a diagonal matrix): A^T d = m . d."""

    name = "inpaint"

    def __init__(self, mask, image_size: int, channels: int, noise_std: float = 0.0) -> None:
        super().__init__(image_size, channels, noise_std)
        mask = np.asarray(mask, dtype=np.float64)
        if mask.shape != (self.image_size, self.image_size):
            raise ValueError(f"Inpaint: mask must be ({self.image_size}, {self.image_size}) like the images, "
                             f"got {mask.shape}")
        if not np.all((mask == 0.0) | (mask == 1.0)):
            raise ValueError("Inpaint: mask must hold only 0 (missing) and 1 (observed)")
        if mask.all():
            raise ValueError("Inpaint: mask has no missing pixel (no zero): there is nothing to inpaint")
        self.mask = mask

    def _mask_like(self, x):
        return get_xp(x).asarray(self.mask[None, :, :, None], dtype=x.dtype)  # (1, S, S, 1) broadcasts

    def forward(self, x):
        self.check_image(x)
        return x * self._mask_like(x)

    def backward(self, dout):
        self.check_measurement(dout, "dout")
        return dout * self._mask_like(dout)

    def degrade(self, x, rng=None):
        """As :meth:`Degradation.degrade`, with the hole kept at exactly 0: nothing was measured there."""
        y = super().degrade(x, rng)
        return y * self._mask_like(y)


def make_degradation(task: str, image_size: int, channels: int, factor: int = 4, blur_sigma: float | None = None,
                     noise_std: float | None = None, hole: int | None = None) -> Degradation:
    """The degradation of a repair task with the project's defaults, scaled to the image size.

    ``deblur``: a Gaussian kernel of sigma ``image_size / 16``, at least 1 (1 px at 8x8, 2 px at
    32x32) and side 2 * ceil(2 sigma) + 1, noise 0.05; ``superres``: average pooling by ``factor``
    (2 or 4), noise 0.05; ``denoise``: noise 0.3; ``inpaint``: a centred square hole of side
    ``image_size * 3 // 8``, noise 0.05. sigma_y is in the units of images in [-1, 1].
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "deblur":
        sigma = float(blur_sigma) if blur_sigma is not None else max(1.0, image_size / 16.0)
        side = 2 * math.ceil(2.0 * sigma) + 1
        side = min(side, image_size if image_size % 2 else image_size - 1)
        return Blur(gaussian_kernel(side, sigma), image_size, channels, 0.05 if noise_std is None else noise_std)
    if task == "superres":
        if factor not in (2, 4):
            raise ValueError(f"factor must be 2 or 4, got {factor!r}")
        return Downsample(factor, image_size, channels, 0.05 if noise_std is None else noise_std)
    if task == "denoise":
        return Denoise(image_size, channels, 0.3 if noise_std is None else noise_std)
    hole = image_size * 3 // 8 if hole is None else hole
    return Inpaint(box_mask(image_size, hole), image_size, channels, 0.05 if noise_std is None else noise_std)

