"""Plain-arithmetic float32 math for Numba kernels: loops over these vectorise, where libm's scalar calls do not.

Shared by several kernel modules, so it is watched (with simd.py) by the package's stale-cache check.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .simd import bitcast_u32_f32

__all__ = ["exp_f32"]

_FM = {"contract", "reassoc", "nsz", "arcp", "afn"}   # no nnan/ninf: NaN and inf arguments keep their meaning


@njit(inline="always", nogil=True, cache=True, fastmath=_FM)
def exp_f32(x):
    """exp for float32 in plain arithmetic (Cephes expf: range reduction by ln 2, degree-6 polynomial, 2^n by
    exponent bits; ~1 ulp), so that loops over it vectorise -- libm's scalar expf per element cost a third of
    a small model's prefill.  Arguments are clamped to [-87.3, 88.0] (no inf, no denormal result); a NaN
    argument gives NaN."""
    x = min(max(x, np.float32(-87.3)), np.float32(88.0)) if x == x else x
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    z = r * r
    p = (((((np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)) * r + np.float32(8.3334519073e-3)) * r
           + np.float32(4.1665795894e-2)) * r + np.float32(1.6666665459e-1)) * r + np.float32(5.0000001201e-1))
    p = p * z + r + np.float32(1.0)
    return p * bitcast_u32_f32(np.uint32(np.int32(n) + np.int32(127)) << np.uint32(23))
