"""DRAM read-bandwidth ceiling: a Numba streaming-read kernel written to be as fast as the hardware allows.

Each thread streams its own contiguous part of a large buffer with 512-bit loads (64-bit lanes) into four
independent accumulators (so load latency never serialises the loop), in a parallel region of exactly the
requested thread count.  Each pass runs two variants of the loop -- plain loads (best at one thread on Zen 4)
and loads with software prefetches 8 KiB ahead into L2 (the same trick the GEMV uses; at two threads it can
raise the achievable rate by keeping more misses in flight) -- and the best of several passes over the whole
buffer (>= 2 GiB by default) is reported, so the ceiling is never below what the kernels themselves reach.
"""

from __future__ import annotations

import time

import numba
import numpy as np
from numba import njit, prange

from .simd import add_u64x8, hsum_u64x8, load_u64x8, prefetch_l2, zero_u64x8


@njit(nogil=True, cache=True, parallel=True)
def _read_kernel(a, nparts):
    n = a.size
    per = (n // nparts) // 32 * 32
    sums = np.zeros(nparts, np.uint64)
    for t in prange(nparts):
        b = t * per
        s0 = zero_u64x8()
        s1 = zero_u64x8()
        s2 = zero_u64x8()
        s3 = zero_u64x8()
        for i in range(b, b + per, 32):
            s0 = add_u64x8(s0, load_u64x8(a, i))
            s1 = add_u64x8(s1, load_u64x8(a, i + 8))
            s2 = add_u64x8(s2, load_u64x8(a, i + 16))
            s3 = add_u64x8(s3, load_u64x8(a, i + 24))
        sums[t] = hsum_u64x8(add_u64x8(add_u64x8(s0, s1), add_u64x8(s2, s3)))
    return sums.sum()


PF_ELEMS = 1024   # prefetch distance of the prefetching variant: 8 KiB


@njit(nogil=True, cache=True, parallel=True)
def _read_kernel_pf(a, nparts):
    n = a.size
    per = (n // nparts) // 32 * 32
    sums = np.zeros(nparts, np.uint64)
    for t in prange(nparts):
        b = t * per
        s0 = zero_u64x8()
        s1 = zero_u64x8()
        s2 = zero_u64x8()
        s3 = zero_u64x8()
        for i in range(b, b + per, 32):
            prefetch_l2(a, i + PF_ELEMS)
            prefetch_l2(a, i + PF_ELEMS + 8)
            prefetch_l2(a, i + PF_ELEMS + 16)
            prefetch_l2(a, i + PF_ELEMS + 24)
            s0 = add_u64x8(s0, load_u64x8(a, i))
            s1 = add_u64x8(s1, load_u64x8(a, i + 8))
            s2 = add_u64x8(s2, load_u64x8(a, i + 16))
            s3 = add_u64x8(s3, load_u64x8(a, i + 24))
        sums[t] = hsum_u64x8(add_u64x8(add_u64x8(s0, s1), add_u64x8(s2, s3)))
    return sums.sum()


def mem_read_gbps(threads: int, nbytes: int = 2 << 30, passes: int = 4, buf: np.ndarray | None = None) -> float:
    """Best-of-``passes`` (x 2 loop variants) read bandwidth in GB/s (1e9 B/s) over an ``nbytes`` buffer with
    ``threads`` threads."""
    if buf is None:
        buf = np.empty(nbytes // 8, np.uint64)
        buf.fill(1)  # touch every page (no zero-page shortcut)
    prev = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for kern in (_read_kernel, _read_kernel_pf):
            kern(buf[:4096], threads)
        best = 0.0
        for _ in range(passes):
            for kern in (_read_kernel, _read_kernel_pf):
                t0 = time.perf_counter()
                kern(buf, threads)
                dt = time.perf_counter() - t0
                best = max(best, buf.nbytes / dt / 1e9)
    finally:
        numba.set_num_threads(prev)
    return best
