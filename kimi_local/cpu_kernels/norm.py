"""RMSNorm on the CPU in one Numba call instead of ~8 torch ops.

A decode step of the tiny model runs 13 RMSNorms over a single row each; through torch every one costs
~15-30 us of per-op overhead (upcast, square, mean, rsqrt, multiply, downcast, weight multiply), more than
the arithmetic by two orders of magnitude.  :func:`rms_norm` computes the same thing in one pass with
exactly the torch path's rounding steps: the row in float32, ``x * rsqrt(mean(x^2) + eps)`` rounded to the
activation dtype, then times the weight and rounded again (what ``weight * xn.to(dtype)`` does in bf16).

Prefill-sized bf16 batches (more than ``MAX_ROWS`` rows) take an explicit-SIMD kernel, rows split over the
kernel threads, where the CPU has AVX-512 BF16 (``vcvtneps2bf16`` rounds to nearest even like torch's
conversion): a 512 x 192 norm of the tiny model went from ~70-100 us in torch to ~45 us per call (~16 us of it in
the kernel, 2 threads).  Elsewhere those batches stay on torch.

:func:`install` hands it to every :class:`~kimi_local.model.RMSNorm` of a CPU model; the module's own torch
code stays the reference (``tests/test_cpu_norm.py`` compares the two).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from . import as_numpy
from .fp8_moe import kernel_threads
from .simd import (add_f32x16, bf16_to_f32, bitcast_f32_u32, bitcast_u32_f32, cvt_f32_bf16, have_avx512_bf16,
                   hsum_f32x16, load_f32x16, load_u16x16, mul_f32x16, splat_f32x16, store_u16x16, zero_f32x16)

__all__ = ["rms_norm", "install", "MAX_ROWS"]

MAX_ROWS = 64      # larger batches (prefill): the SIMD kernel (AVX-512 BF16, bf16 rows) or torch


@njit(inline="always", nogil=True, cache=True)
def _bf16_round(f):
    """float32 -> nearest bf16 (ties to even), returned as its 16 bits; NaN stays (quiet) NaN."""
    b = bitcast_f32_u32(np.float32(f))
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
    b = b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
    return np.uint16(b >> np.uint32(16))


@njit(inline="always", nogil=True, cache=True)
def _bf16_f32(h):
    return bitcast_u32_f32(np.uint32(h) << np.uint32(16))


@njit(nogil=True, cache=True)
def _rms_bf16(x, w, eps, out):
    n, d = x.shape
    tmp = np.empty(d, np.float32)
    for i in range(n):
        acc = np.float32(0.0)
        for j in range(d):
            v = _bf16_f32(x[i, j])
            tmp[j] = v
            acc += v * v
        r = np.float32(1.0) / np.sqrt(acc / np.float32(d) + eps)
        for j in range(d):
            xn = _bf16_f32(_bf16_round(tmp[j] * r))
            out[i, j] = _bf16_round(xn * w[j])


@njit(nogil=True, cache=True)
def _rms_f32(x, w, eps, out):
    n, d = x.shape
    for i in range(n):
        acc = np.float32(0.0)
        for j in range(d):
            acc += x[i, j] * x[i, j]
        r = np.float32(1.0) / np.sqrt(acc / np.float32(d) + eps)
        for j in range(d):
            out[i, j] = w[j] * (x[i, j] * r)


@njit(nogil=True, cache=True, parallel=True, fastmath={"contract", "reassoc", "nsz", "arcp", "afn"})
def _rms_bf16_simd(x, w, eps, out):
    """_rms_bf16 for many rows of a width that is a multiple of 16, 16 lanes at a time (AVX-512 BF16 only)."""
    n, d = x.shape
    nv = d // 16
    for i in prange(n):
        acc = zero_f32x16()
        for v in range(nv):
            xv = bf16_to_f32(load_u16x16(x[i], 16 * v))
            acc = add_f32x16(acc, mul_f32x16(xv, xv))
        r = splat_f32x16(np.float32(1.0) / np.sqrt(hsum_f32x16(acc) / np.float32(d) + eps))
        for v in range(nv):
            xn = bf16_to_f32(cvt_f32_bf16(mul_f32x16(bf16_to_f32(load_u16x16(x[i], 16 * v)), r)))
            store_u16x16(out[i], 16 * v, cvt_f32_bf16(mul_f32x16(xn, load_f32x16(w, 16 * v))))


def _simd_ok(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.shape[-1] % 16 == 0 and have_avx512_bf16()


def rms_norm(x: torch.Tensor, weight_f32: np.ndarray, eps: float) -> torch.Tensor:
    """RMSNorm of a bf16 or float32 CPU tensor [..., D] with a float32 numpy weight [D] (same dtype out).
    Works on numpy views of the tensor's memory (torch's own per-call costs are what this avoids)."""
    d = x.shape[-1]
    xa = as_numpy(x)
    if x.dtype == torch.bfloat16:
        o = np.empty(xa.shape, np.uint16)
        rows = xa.reshape(-1, d)
        if rows.shape[0] > MAX_ROWS and rows.strides[1] == rows.itemsize and _simd_ok(x):   # unit-stride rows
            with kernel_threads():
                _rms_bf16_simd(rows, weight_f32, np.float32(eps), o.reshape(-1, d))
        else:
            _rms_bf16(rows, weight_f32, np.float32(eps), o.reshape(-1, d))
        return torch.from_numpy(o.view(np.int16)).view(torch.bfloat16)
    o = np.empty(xa.shape, np.float32)
    _rms_f32(xa.reshape(-1, d), weight_f32, np.float32(eps), o.reshape(-1, d))
    return torch.from_numpy(o)


class _Fast:
    """The per-module fast path: float32 weight kept (refreshed if the parameter changes), torch fallback for
    what the kernel does not cover (other dtypes or devices, mixed dtypes, big batches, autograd)."""

    def __init__(self, module):
        from kimi_local.model import Derived
        self.module = module
        self.w32 = Derived()

    def __call__(self, x: torch.Tensor):
        if (x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32) or x.requires_grad
                or x.dtype != self.module.weight.dtype
                or (x.numel() > MAX_ROWS * x.shape[-1] and not (_simd_ok(x) and x.stride(-1) == 1))):
            return None          # (a weight of another dtype would promote the torch result's dtype)
        w32 = self.w32.get(self.module.weight, lambda t: t.detach().float().contiguous().numpy())
        return rms_norm(x, w32, self.module.eps)


def install(model: torch.nn.Module) -> int:
    """Give every RMSNorm of ``model`` the Numba fast path (compiled now, for bf16 and float32 rows, so a fresh
    install never compiles on the first token); returns how many got it."""
    from kimi_local.cpu_kernels import install_fast
    from kimi_local.model import RMSNorm
    n = install_fast(model, RMSNorm, _Fast)
    if n:
        w = np.ones(16, np.float32)
        for dtype in (torch.bfloat16, torch.float32):
            rms_norm(torch.ones(1, 16, dtype=dtype), w, 1e-6)
        if have_avx512_bf16():    # the prefill-sized SIMD kernel (bf16 only)
            rms_norm(torch.ones(MAX_ROWS + 1, 16, dtype=torch.bfloat16), w, 1e-6)
    return n
