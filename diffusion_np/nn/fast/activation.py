"""The normal CDF Phi(x) of exact GELU in float32, beside the reference (SciPy's erf) in nn/activation.py.

Exact GELU is ``x Phi(x)`` with ``Phi(x) = (1 + erf(x / sqrt 2)) / 2``. The reference
calls ``scipy.special.erf``, which evaluates every float32 number in double precision
through a scalar function call: 12-25 ns a number on this CPU (6-14 ms for one GEGLU
gate of the small U-Net at batch 16), the largest single cost of a sampling step after
the convolutions. :func:`normal_cdf` computes Phi with a handful of NumPy passes
instead, from the complementary error function (Numerical Recipes, 2nd ed., Sec. 6.2,
``erfcc``; fractional error below 1.2e-7 everywhere)::

    t = 1 / (1 + z / 2),   z = |x| / sqrt 2
    erfc(z) = t exp(-z^2 + P(t)),        P a degree-9 polynomial (coefficients below)
    Phi(x) = 1/2 + sign(x) (1/2 - erfc(z) / 2)

It runs for float32 NumPy arrays only: there its error (2.4e-7 at most, tested; as
absolute as the reference's, whose ``1 + erf`` also rounds the left tail away) is of
the size of float32 rounding itself, so the numbers of a float32 model stay the same
to float32 precision. Float64 arrays, the gradient checks and every other device keep the
reference, so "equal to the reference in float64" holds by construction; the tests
compare this function against the float64 reference instead. ``gelu_forward`` runs it
unless reference mode is on (:func:`diffusion_np.nn.fast.reference_mode`).
Measured (16 x 64 x 512 float32, one thread): 3.3 ms against 11.8 ms for the reference.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_np.backend import get_xp

_F32 = np.float32
#: Numerical Recipes' erfcc: P(t) = c0 + c1 t + ... + c9 t^9 (c0 first).
_ERFC_COEFFS = tuple(_F32(c) for c in (
    -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
    0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277,
))


def applies_to(x) -> bool:
    """Whether :func:`normal_cdf` computes Phi for ``x`` itself (float32 NumPy arrays)."""
    return get_xp(x) is np and x.dtype == np.float32


def normal_cdf(x):
    """Phi(x), the standard normal CDF, of a float32 NumPy array (see the module docstring).

    x (any shape, float32) -> Phi(x), float32, a new array. Every pass but the first
    and the last runs in place on the (N,) temporaries ``z``, ``t`` and ``p``.
    """
    z = np.abs(x)
    z *= _F32(1.0 / math.sqrt(2.0))  # z = |x| / sqrt 2
    t = z * _F32(0.5)
    t += _F32(1.0)
    np.reciprocal(t, out=t)  # t = 1 / (1 + z / 2)
    p = t * _ERFC_COEFFS[9]  # Horner: P(t) = c0 + t (c1 + t (c2 + ... + t c9))
    for c in _ERFC_COEFFS[8:0:-1]:
        p += c
        p *= t
    p += _ERFC_COEFFS[0]
    z *= z
    p -= z  # -z^2 + P(t)
    np.exp(p, out=p)
    p *= t  # erfc(z)
    p *= _F32(0.5)  # Phi(-|x|)
    # Phi(x) = 1/2 + sign(x) (1/2 - Phi(-|x|)): copysign is one branch-free pass, where
    # np.where (or a masked copy) on signs in random order took 7-15x as long
    p -= _F32(0.5)
    np.negative(p, out=p)
    np.copysign(p, x, out=p)
    p += _F32(0.5)
    return p
