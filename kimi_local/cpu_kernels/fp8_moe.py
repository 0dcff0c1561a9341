"""Block-FP8 (e4m3, 128x128 float32 scale_inv blocks) routed-expert kernels for the CPU.

One call, :func:`moe_forward`, computes a MoE layer's routed experts for a batch of tokens::

    out[t] = sum_k weights[t, k] * W2_e (silu(W1_e x_t) * (W3_e x_t)),   e = slots[t, k]   (slot -1 = skip)

directly from the checkpoint's FP8 bytes: nothing is converted offline and no dequantised copy of a weight
matrix is ever kept -- weights are decoded in registers (decode / GEMV path) or into a per-thread tile of a few
rows (prefill / GEMM path) and used at once.

Design (issue 4, "CPU expert kernels"):

* **Layout.** :class:`PackedExperts` repacks each projection at load into *row-group-major* tiles: groups of
  ``RG`` = 4 rows, and inside a group, for every 64-column chunk, the 4 rows' 64 bytes back to back.  A block of
  128 rows is therefore one contiguous stream and the kernel reads 4 rows per x load.  Rows are zero-padded to a
  multiple of 4 and columns to a multiple of 64; padded bytes decode to +0 and never reach an output.
* **Scales on the activation side.** The scale of weight block (rb, cb) multiplies the activation chunk instead
  of the weights: for every 128-row block the kernel builds ``xs = x * scale_inv[rb, col // 128]`` once (1/128 of
  the multiply-adds) and the inner loop is then pure decode + dot product.
* **Decode (fast path, AVX-512 VBMI + BF16).** e4m3 -> bf16 is *exact* for every finite e4m3 value, subnormals
  included (they become normal bf16 numbers, so neither FTZ/DAZ nor vdpbf16ps' denormal flushing can touch
  them).  Two ``vpermi2b`` 128-entry byte tables give the bf16 high and low bytes of 64 weights at once, the
  sign bit is OR-ed in, ``vpunpck[lh]bw`` interleaves them into 2x32 bf16 words and ``vdpbf16ps`` multiplies
  them with the activation chunk (whose order is permuted once per call to match the unpack order).
  Activations are split as ``xs = hi + lo`` (two bf16) in ``"bf16x2"`` precision (about 16 significant bits,
  float32-like), or rounded to one bf16 in ``"bf16"`` precision (half the dot products; the rounding a bf16
  model applies to its activations anyway).  Products are exact and accumulate in float32.  The expert
  backends pick the precision from the model's activation dtype (:func:`precision_for`): bf16 models (the
  default) run ``"bf16"``, float32 models ``"bf16x2"``; :func:`set_precision` overrides both.
* **Portable path** (any x86-64 / other CPU): bit-shift decode to float32 -- magnitude << 20 with the
  e4m3->fp32 exponent bias (120) *added* so that normal codes come out exact and subnormal codes are produced
  with the classic "+1 exponent, subtract 2^-6" fix-up; no float32 denormal is ever formed (FTZ/DAZ-safe).
* **Work split.** Gate/up (fused: one task computes a 128-row block of both and writes silu(g)*u) are split
  over (expert, 128-row block) tasks; down over 128-row blocks of the output (each task loops over the
  experts, so no two threads write the same output row).  Experts with few tokens stream their weights as a
  GEMV (each 4-row group decoded once per token, straight from DRAM); experts with many tokens decode each 4-row
  group once into a small bf16 buffer and run a 4-row x 4-token register-blocked GEMM over it.
* **Small models: outer-product tiles.** With a reduction length of a few hundred (the tiny test models:
  192 x 160), a 4 x 4 dot-product tile finishes each output after 6 k-steps and then spends as long on its
  16-lane horizontal sums and the per-output scatter.  Those shapes (:func:`use_outer_product`, both sizes <=
  ``OP_MAX_K``) decode 16 rows at a time, transpose them in registers into k-pair-major order (one ``dpbf16``
  operand = 16 rows x one k-pair) and multiply by broadcast activation pairs of 8 (or 4) tokens: each
  accumulator is 16 finished outputs, stored with one vector (~20% less expert time on the tiny model; slower
  from ~512 on, where the transposes cost more than the sums they save).
* **Memory system.** The weight streams are software-prefetched ``PF_DIST`` bytes ahead *into L2*
  (prefetcht2): L1 prefetches are limited by the L1 fill buffers and left the compute-heavy GEMV at ~0.5 of the
  DRAM read ceiling on one core; L2 prefetches keep enough misses in flight to reach ~0.7.  The GEMM path works
  in K blocks of ``KBC`` chunks so the decoded bf16 tile (4 x 2048 x 2 bytes) stays in L1 while all of the
  expert's tokens use it, and tiles tokens 4 or 3 at a time so no token's dot products are computed twice.
  In ``"bf16x2"`` precision the GEMM runs at about the vdpbf16ps throughput limit (two dot products per weight
  and token); ``"bf16"`` halves that work.

The plain torch twin :func:`moe_forward_ref` (dequantise then matmul, float32) is the verification oracle and
the ``torch`` backend.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time

import numba
import numpy as np
from numba import njit, prange

from . import simd
from .mathf import exp_f32 as _exp_f32
from .simd import (add_f32x16, add_u8x64, and_u8x64, bcast2_u16x32, bf16_to_f32, bitcast_u32_f32, cvt_f32_bf16,
                   dpbf16, hsum_f32x16, hsum16_f32x16, load_f32x16, load_u8x64, load_u16x32, mul_f32x16, or_u8x64,
                   perm2_u8x64, prefetch_l2, splat_f32x16, splat_u8x64, store_f32x16, store_transpose16_u32,
                   store_u8x64, store_u16x16, sub_f32x16, unpackhi_u8_to_u16, unpacklo_u8_to_u16, zero_f32x16)

__all__ = ["PackedExperts", "moe_forward", "moe_forward_ref", "set_num_threads", "get_num_threads", "warmup",
           "set_precision", "get_precision", "precision_for", "fast_path_available", "e4m3_decode_table",
           "RG", "CHUNK"]

RG = 4          # rows per group in the packed layout (= rows per GEMV / GEMM register block)
CHUNK = 64      # columns per chunk (one 512-bit load of e4m3 bytes)
NT = 4          # tokens per GEMM register block (3-token tiles fill in so that no token is computed twice)
GEMM_MIN_TOKENS = 3   # an expert with at least this many tokens in a call takes the GEMM (tile reuse) path
KBC = 32              # GEMM K block in 64-column chunks: the decoded 4 x 2048 bf16 tile (16 KiB) stays in L1
KBC_OP = 16           # outer-product GEMM K block: the transposed 16 x 1024 bf16 tile (32 KiB)
PF_DIST = 8192        # software-prefetch distance (bytes, into L2) of the weight streams (compile-time constant)

# fastmath without nnan/ninf: inf/NaN inputs (e.g. overflowing activations) propagate like in torch
_FM = {"contract", "reassoc", "nsz", "arcp", "afn"}
_NB_OPTS = dict(nogil=True, cache=True, fastmath=_FM)
_NBP_OPTS = dict(nogil=True, cache=True, fastmath=_FM, parallel=True)
_NB_OPTS_EXACT = dict(nogil=True, cache=True)  # no fastmath where NaN/inf semantics or exact bit tricks matter


# ============================================================================================ e4m3 tables
def e4m3_decode_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn codes (NaN for 0x7F/0xFF), computed from the bit fields."""
    c = np.arange(256)
    s = np.where(c & 0x80, -1.0, 1.0)
    e = (c >> 3) & 0xF
    m = c & 0x7
    v = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1.0 + m / 8.0) * 2.0 ** (e - 7.0))
    v = (s * v).astype(np.float32)
    v[[0x7F, 0xFF]] = np.nan
    return v


def _bf16_byte_tables():
    v = e4m3_decode_table()[:128].copy()
    v[0x7F] = 0.0
    bits = v.view(np.uint32)
    assert np.all(bits & 0xFFFF == 0), "e4m3 values are exact in bf16"
    b16 = (bits >> 16).astype(np.uint16)
    return (b16 >> 8).astype(np.uint8), (b16 & 0xFF).astype(np.uint8)


_TBL_HI, _TBL_LO = _bf16_byte_tables()


def _chunk_perm() -> np.ndarray:
    """pos[j]: where activation element j of a 64-chunk goes so it meets weight j in vdpbf16ps after unpack."""
    j = np.arange(64)
    return np.where(j % 16 < 8, 0, 32) + 8 * (j // 16) + (j % 8)


_POS = _chunk_perm().astype(np.int64)


# ============================================================================================ threads / precision
_lock = threading.Lock()
_threads: int | None = None
_precision: str | None = None   # forced precision (set_precision); None: per call


@functools.lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may run on (hyperthreads not counted), capped at Numba's pool."""
    try:
        cores = set()
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((phys, core))
                    phys = core = None
            if core is not None:
                cores.add((phys, core))
        n = len(cores)
    except OSError:
        n = 0
    if n <= 0:
        n = os.cpu_count() or 1
    try:
        n = min(n, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        pass
    return max(1, min(n, numba.config.NUMBA_NUM_THREADS))


def set_num_threads(n: int | None) -> None:
    """Threads the kernels use (None -> physical cores).  Capped at Numba's pool size.  The kernels run
    in the calling thread's Numba pool and release the GIL; call sites that also run torch CPU work in parallel
    should give torch the remaining cores (``torch.set_num_threads``) -- the kernels never start more threads
    than this setting."""
    global _threads
    if n is not None:
        n = int(n)
        if n < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        n = min(n, numba.config.NUMBA_NUM_THREADS)
    _threads = n


def get_num_threads() -> int:
    return _threads if _threads is not None else physical_cores()


PRECISIONS = ("bf16x2", "bf16")


def set_precision(mode: str | None) -> None:
    """Force one activation precision for every call: 'bf16x2' (activations split hi+lo, ~16 significant bits,
    float32-like results) or 'bf16' (activations rounded to bf16 like a bf16 matmul; half the dot products).
    ``None`` or 'auto' restores the default: callers' ``precision`` argument, 'bf16x2' when they give none."""
    global _precision
    if mode in (None, "auto"):
        _precision = None
        return
    if mode not in PRECISIONS:
        raise ValueError(f"precision must be 'auto', 'bf16x2' or 'bf16', got {mode!r}")
    _precision = mode


def get_precision(requested: str | None = None) -> str:
    """The precision a call with ``precision=requested`` runs in (a forced :func:`set_precision` wins)."""
    if _precision is not None:
        return _precision
    return requested if requested in PRECISIONS else "bf16x2"


def precision_for(dtype) -> str:
    """Kernel precision matching a model's activation dtype: activations of a bf16 model are bf16 numbers
    already, and its torch path rounds dequantised weights and products to bf16 too, so one bf16 activation
    ('bf16') loses nothing it keeps; anything wider (float32, float16) gets 'bf16x2'."""
    return "bf16" if str(dtype).endswith("bfloat16") else "bf16x2"


def fast_path_available() -> bool:
    return simd.have_avx512_bf16() and os.environ.get("KIMI_CPU_KERNELS_PORTABLE", "") in ("", "0")


# ============================================================================================ packing
def _pack_matrix(q: np.ndarray, out: np.ndarray) -> None:
    """q [R, C] uint8 -> out flat [Rp*Cp] in the row-group layout [R/RG][C/64][RG][64] (zero padding).
    The plain numpy reference of :func:`_pack_count_nan`, which set_slot uses."""
    R, C = q.shape
    Rp, Cp = _ceil(R, RG), _ceil(C, CHUNK)
    if Rp == R and Cp == C:
        src = q
    else:
        src = np.zeros((Rp, Cp), np.uint8)
        src[:R, :C] = q
    out.reshape(Rp // RG, Cp // CHUNK, RG, CHUNK)[...] = src.reshape(Rp // RG, RG, Cp // CHUNK, CHUNK).transpose(0, 2, 1, 3)


@njit(nogil=True, cache=True)
def _pack_count_nan(q, out):
    """_pack_matrix and the e4m3 NaN-code count in one pass over q (no temporaries); returns the count.
    Whole 64-byte chunks move as one 512-bit load/store and are screened with ((b & 0x7F) + 1) & 0x80, which
    is set exactly for the NaN codes 0x7F / 0xFF (plain LLVM vector ops: any x86-64).  nogil: the loader
    packs experts from several threads at once."""
    R, C = q.shape
    nch = (C + CHUNK - 1) // CHUNK
    ngr = (R + RG - 1) // RG
    full = C // CHUNK
    flat = q.ravel()
    m7 = splat_u8x64(0x7F)
    one = splat_u8x64(1)
    acc = and_u8x64(m7, splat_u8x64(0))
    bad = 0
    for g in range(ngr):
        for r in range(RG):
            row = g * RG + r
            for c in range(nch):
                o = ((g * nch + c) * RG + r) * CHUNK
                if row < R and c < full:
                    v = load_u8x64(flat, row * C + c * CHUNK)
                    acc = or_u8x64(acc, add_u8x64(and_u8x64(v, m7), one))
                    store_u8x64(out, o, v)
                    continue
                c0 = c * CHUNK
                n = min(CHUNK, C - c0) if row < R else 0
                for j in range(n):
                    b = q[row, c0 + j]
                    bad += (b & 0x7F) == 0x7F
                    out[o + j] = b
                for j in range(n, CHUNK):
                    out[o + j] = 0
    lanes = np.empty(CHUNK, np.uint8)
    store_u8x64(lanes, 0, acc)
    if np.any(lanes & 0x80):   # some full chunk held a NaN code: count them exactly
        for row in range(R):
            for j in range(full * CHUNK):
                bad += (q[row, j] & 0x7F) == 0x7F
    return bad


def _unpack_matrix(flat: np.ndarray, R: int, C: int) -> np.ndarray:
    Rp, Cp = _ceil(R, RG), _ceil(C, CHUNK)
    return flat.reshape(Rp // RG, Cp // CHUNK, RG, CHUNK).transpose(0, 2, 1, 3).reshape(Rp, Cp)[:R, :C]


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


class PackedExperts:
    """FP8 weights of ``n_slots`` expert slots of one MoE layer, laid out for the kernels.

    Arrays (all allocated through ``alloc(shape, dtype)``):
      w1, w3: uint8 [n_slots, Ip_rows * Dp]   gate / up, row-group layout (see module doc)
      w2:     uint8 [n_slots, Dp_rows * Ip]   down
      s1, s3: float32 [n_slots, ceil(I/b0), ceil(D/b1)];  s2: float32 [n_slots, ceil(D/b0), ceil(I/b1)]
    The scale grids are the checkpoint's ``weight_scale_inv`` (a multiply), unchanged.
    """

    def __init__(self, n_slots, hidden, inter, block, w1, w3, w2, s1, s3, s2):
        self.n_slots, self.hidden, self.inter, self.block = int(n_slots), int(hidden), int(inter), tuple(block)
        self.w1, self.w3, self.w2, self.s1, self.s3, self.s2 = w1, w3, w2, s1, s3, s2
        self.filled = np.zeros(self.n_slots, dtype=bool)

    @classmethod
    def allocate(cls, n_slots: int, hidden: int, inter: int, block=(128, 128), alloc=np.empty,
                 zeroed: bool = False) -> "PackedExperts":
        """``zeroed=True`` when ``alloc`` returns zero-filled memory (an anonymous mapping): the explicit
        fill is skipped, so pages are first touched when a slot is written, not all up front."""
        block = tuple(int(b) for b in block)
        if block != (128, 128):
            # the kernels assume the scale block covers whole 64-column chunks and 4-row groups
            if block[1] % CHUNK or block[0] % RG:
                raise ValueError(f"block {block}: columns must be a multiple of {CHUNK}, rows of {RG}")
        if n_slots < 1 or hidden < 1 or inter < 1:
            raise ValueError(f"bad sizes n_slots={n_slots} hidden={hidden} inter={inter}")
        D, I = int(hidden), int(inter)
        n13 = _ceil(I, RG) * _ceil(D, CHUNK)
        n2 = _ceil(D, RG) * _ceil(I, CHUNK)
        g13 = (-(-I // block[0]), -(-D // block[1]))
        g2 = (-(-D // block[0]), -(-I // block[1]))
        w1 = alloc((n_slots, n13), np.uint8)
        w3 = alloc((n_slots, n13), np.uint8)
        w2 = alloc((n_slots, n2), np.uint8)
        s1 = alloc((n_slots,) + g13, np.float32)
        s3 = alloc((n_slots,) + g13, np.float32)
        s2 = alloc((n_slots,) + g2, np.float32)
        if not zeroed:  # padding must decode to +0
            for a in (w1, w3, w2, s1, s3, s2):
                a[...] = 0
        return cls(n_slots, D, I, block, w1, w3, w2, s1, s3, s2)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.w1, self.w3, self.w2, self.s1, self.s3, self.s2)))

    @property
    def expert_nbytes(self) -> int:
        """Checkpoint bytes of one expert (3 x FP8 matrix + scale grids), as streamed by a decode."""
        D, I = self.hidden, self.inter
        return 3 * D * I + 4 * (self.s1[0].size + self.s3[0].size + self.s2[0].size)

    def _check(self, name, q, s, shape):
        gshape = (-(-shape[0] // self.block[0]), -(-shape[1] // self.block[1]))
        if not isinstance(q, np.ndarray) or q.dtype != np.uint8 or q.shape != shape:
            raise ValueError(f"{name}: expected uint8 e4m3 bytes of shape {shape}, got "
                             f"{getattr(q, 'dtype', type(q))} {getattr(q, 'shape', None)}")
        if not isinstance(s, np.ndarray) or s.dtype != np.float32 or s.shape != gshape:
            raise ValueError(f"{name}: expected float32 scale_inv grid of shape {gshape}, got "
                             f"{getattr(s, 'dtype', type(s))} {getattr(s, 'shape', None)}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name}: scale_inv has non-finite entries")

    @staticmethod
    def _pack(name, q, out) -> None:
        """Pack q into out and reject e4m3 NaN codes (the slot is left unfilled then)."""
        if _pack_count_nan(np.ascontiguousarray(q), out):
            nan = (q & 0x7F) == 0x7F
            r, c = np.argwhere(nan)[0]
            raise ValueError(f"{name}: e4m3 NaN code 0x{int(q[r, c]):02X} at [{r}, {c}] "
                             f"({int(nan.sum())} NaN codes in total)")

    def set_slot(self, slot: int, w1_q, w1_s, w3_q, w3_s, w2_q, w2_s) -> None:
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.n_slots})")
        D, I = self.hidden, self.inter
        w1_q, w3_q, w2_q = (_as_u8(a) for a in (w1_q, w3_q, w2_q))
        w1_s, w3_s, w2_s = (_as_np(a) for a in (w1_s, w3_s, w2_s))
        self._check("w1 (gate_proj)", w1_q, w1_s, (I, D))
        self._check("w3 (up_proj)", w3_q, w3_s, (I, D))
        self._check("w2 (down_proj)", w2_q, w2_s, (D, I))
        self.filled[slot] = False
        self._pack("w1 (gate_proj)", w1_q, self.w1[slot])
        self._pack("w3 (up_proj)", w3_q, self.w3[slot])
        self._pack("w2 (down_proj)", w2_q, self.w2[slot])
        self.s1[slot] = w1_s
        self.s3[slot] = w3_s
        self.s2[slot] = w2_s
        self.filled[slot] = True

    def get_slot(self, slot: int):
        """The slot's checkpoint-layout arrays back: (w1_q, w1_s, w3_q, w3_s, w2_q, w2_s)."""
        D, I = self.hidden, self.inter
        return (_unpack_matrix(self.w1[slot], I, D), self.s1[slot].copy(),
                _unpack_matrix(self.w3[slot], I, D), self.s3[slot].copy(),
                _unpack_matrix(self.w2[slot], D, I), self.s2[slot].copy())

    def __repr__(self):
        return (f"PackedExperts(n_slots={self.n_slots}, hidden={self.hidden}, inter={self.inter}, "
                f"block={self.block}, nbytes={self.nbytes})")


def _as_np(a):
    if isinstance(a, np.ndarray):
        return a
    try:
        import torch
        if isinstance(a, torch.Tensor):
            t = a.detach().cpu()
            if t.dtype == torch.float8_e4m3fn:
                t = t.view(torch.uint8)
            return t.contiguous().numpy()
    except ImportError:  # pragma: no cover
        pass
    return a


def _as_u8(a):
    return _as_np(a)


# ============================================================================================ routing
@njit(**_NB_OPTS_EXACT)
def _route(slots, weights, n_slots):
    """CSR of (token, weight) pairs grouped by slot.  Returns (uniq slots, start offsets, pair token, pair w)."""
    T, K = slots.shape
    cnt = np.zeros(n_slots, np.int64)
    for t in range(T):
        for k in range(K):
            s = slots[t, k]
            if s >= 0:
                if s >= n_slots:
                    raise ValueError("slot id out of range")
                cnt[s] += 1
    nu = 0
    for s in range(n_slots):
        if cnt[s] > 0:
            nu += 1
    uniq = np.empty(nu, np.int64)
    start = np.empty(nu + 1, np.int64)
    where = np.full(n_slots, -1, np.int64)
    j = 0
    acc = 0
    for s in range(n_slots):
        if cnt[s] > 0:
            uniq[j] = s
            start[j] = acc
            where[s] = acc
            acc += cnt[s]
            j += 1
    start[nu] = acc
    ptok = np.empty(acc, np.int64)
    pw = np.empty(acc, np.float32)
    for t in range(T):
        for k in range(K):
            s = slots[t, k]
            if s >= 0:
                p = where[s]
                ptok[p] = t
                pw[p] = weights[t, k]
                where[s] = p + 1
    return uniq, start, ptok, pw


# ============================================================================================ fast path (AVX-512)
@njit(inline="always", **_NB_OPTS)
def _dec(q, th0, th1, tl0, tl1, sg):
    hi = or_u8x64(perm2_u8x64(th0, q, th1), and_u8x64(q, sg))
    lo = perm2_u8x64(tl0, q, tl1)
    return unpacklo_u8_to_u16(lo, hi), unpackhi_u8_to_u16(lo, hi)


@njit(**_NB_OPTS)
def _gemv4(w, base, nch, xs, xoff, nsplit, tbl):
    """Dot products of the 4 rows of the group at byte offset ``base`` (nch chunks) with the prepared bf16
    activation xs[xoff : xoff + nch*64] (hi) and, when nsplit == 2, xs[xoff + Kp ...] (lo)."""
    th0 = load_u8x64(tbl, 0)
    th1 = load_u8x64(tbl, 64)
    tl0 = load_u8x64(tbl, 128)
    tl1 = load_u8x64(tbl, 192)
    sg = splat_u8x64(0x80)
    a0 = zero_f32x16()
    a1 = zero_f32x16()
    a2 = zero_f32x16()
    a3 = zero_f32x16()
    b0 = zero_f32x16()
    b1 = zero_f32x16()
    b2 = zero_f32x16()
    b3 = zero_f32x16()
    if nsplit == 2:
        lo_off = xoff + nch * 64
        for c in range(nch):
            o = base + c * 256
            xo = xoff + c * 64
            xha = load_u16x32(xs, xo)
            xhb = load_u16x32(xs, xo + 32)
            xla = load_u16x32(xs, lo_off + c * 64)
            xlb = load_u16x32(xs, lo_off + c * 64 + 32)
            prefetch_l2(w, o + PF_DIST)
            prefetch_l2(w, o + PF_DIST + 64)
            prefetch_l2(w, o + PF_DIST + 128)
            prefetch_l2(w, o + PF_DIST + 192)
            A, B = _dec(load_u8x64(w, o), th0, th1, tl0, tl1, sg)
            a0 = dpbf16(dpbf16(a0, A, xha), A, xla)
            b0 = dpbf16(dpbf16(b0, B, xhb), B, xlb)
            A, B = _dec(load_u8x64(w, o + 64), th0, th1, tl0, tl1, sg)
            a1 = dpbf16(dpbf16(a1, A, xha), A, xla)
            b1 = dpbf16(dpbf16(b1, B, xhb), B, xlb)
            A, B = _dec(load_u8x64(w, o + 128), th0, th1, tl0, tl1, sg)
            a2 = dpbf16(dpbf16(a2, A, xha), A, xla)
            b2 = dpbf16(dpbf16(b2, B, xhb), B, xlb)
            A, B = _dec(load_u8x64(w, o + 192), th0, th1, tl0, tl1, sg)
            a3 = dpbf16(dpbf16(a3, A, xha), A, xla)
            b3 = dpbf16(dpbf16(b3, B, xhb), B, xlb)
    else:
        for c in range(nch):
            o = base + c * 256
            xo = xoff + c * 64
            xha = load_u16x32(xs, xo)
            xhb = load_u16x32(xs, xo + 32)
            prefetch_l2(w, o + PF_DIST)
            prefetch_l2(w, o + PF_DIST + 64)
            prefetch_l2(w, o + PF_DIST + 128)
            prefetch_l2(w, o + PF_DIST + 192)
            A, B = _dec(load_u8x64(w, o), th0, th1, tl0, tl1, sg)
            a0 = dpbf16(a0, A, xha)
            b0 = dpbf16(b0, B, xhb)
            A, B = _dec(load_u8x64(w, o + 64), th0, th1, tl0, tl1, sg)
            a1 = dpbf16(a1, A, xha)
            b1 = dpbf16(b1, B, xhb)
            A, B = _dec(load_u8x64(w, o + 128), th0, th1, tl0, tl1, sg)
            a2 = dpbf16(a2, A, xha)
            b2 = dpbf16(b2, B, xhb)
            A, B = _dec(load_u8x64(w, o + 192), th0, th1, tl0, tl1, sg)
            a3 = dpbf16(a3, A, xha)
            b3 = dpbf16(b3, B, xhb)
    return (hsum_f32x16(add_f32x16(a0, b0)), hsum_f32x16(add_f32x16(a1, b1)),
            hsum_f32x16(add_f32x16(a2, b2)), hsum_f32x16(add_f32x16(a3, b3)))


@njit(**_NB_OPTS)
def _decode_group(w, base, c0, nc, tbl, wbuf):
    """Decode chunks c0 .. c0+nc of the 4 rows of a group into wbuf[4, nc*64] bf16 words (unpack order), once
    for all tokens.  Callers keep nc <= KBC so the tile (4 x KBC*64 x 2 bytes) stays in L1."""
    th0 = load_u8x64(tbl, 0)
    th1 = load_u8x64(tbl, 64)
    tl0 = load_u8x64(tbl, 128)
    tl1 = load_u8x64(tbl, 192)
    sg = splat_u8x64(0x80)
    K = nc * 64
    for c in range(nc):
        o = base + (c0 + c) * 256
        prefetch_l2(w, o + PF_DIST)
        prefetch_l2(w, o + PF_DIST + 64)
        prefetch_l2(w, o + PF_DIST + 128)
        prefetch_l2(w, o + PF_DIST + 192)
        for r in range(4):
            A, B = _dec(load_u8x64(w, o + 64 * r), th0, th1, tl0, tl1, sg)
            _store_u16x32(wbuf, r * K + c * 64, A)
            _store_u16x32(wbuf, r * K + c * 64 + 32, B)


from numba.extending import intrinsic as _intrinsic  # noqa: E402


@_intrinsic
def _store_u16x32(typingctx, arr, idx, v):
    from numba import types as _t
    if v != simd.V32u16:
        return None
    sig = _t.void(arr, idx, v)

    def codegen(context, builder, sig, args):
        p = simd._vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], simd.V32u16)
        builder.store(args[2], p, align=1)
        return context.get_dummy_value()
    return sig, codegen


@njit(**_NB_OPTS)
def _gemm4x4(wbuf, K, xs, x0, x1, x2, x3, KX, nsplit, res):
    """res[j * 4 + r] = dot(row r of wbuf [4, K], token j) for 4 rows x 4 tokens; xs offsets x0..x3 of the
    tokens' K activations (hi at off, lo at off + KX).  The 16 sums leave as one vector (hsum16_f32x16)."""
    c00 = zero_f32x16(); c01 = zero_f32x16(); c02 = zero_f32x16(); c03 = zero_f32x16()  # noqa: E702
    c10 = zero_f32x16(); c11 = zero_f32x16(); c12 = zero_f32x16(); c13 = zero_f32x16()  # noqa: E702
    c20 = zero_f32x16(); c21 = zero_f32x16(); c22 = zero_f32x16(); c23 = zero_f32x16()  # noqa: E702
    c30 = zero_f32x16(); c31 = zero_f32x16(); c32 = zero_f32x16(); c33 = zero_f32x16()  # noqa: E702
    for s in range(nsplit):
        so = s * KX
        for k in range(0, K, 32):
            w0 = load_u16x32(wbuf, k)
            w1 = load_u16x32(wbuf, K + k)
            w2 = load_u16x32(wbuf, 2 * K + k)
            w3 = load_u16x32(wbuf, 3 * K + k)
            v = load_u16x32(xs, x0 + so + k)
            c00 = dpbf16(c00, w0, v); c10 = dpbf16(c10, w1, v); c20 = dpbf16(c20, w2, v); c30 = dpbf16(c30, w3, v)  # noqa: E702,E501
            v = load_u16x32(xs, x1 + so + k)
            c01 = dpbf16(c01, w0, v); c11 = dpbf16(c11, w1, v); c21 = dpbf16(c21, w2, v); c31 = dpbf16(c31, w3, v)  # noqa: E702,E501
            v = load_u16x32(xs, x2 + so + k)
            c02 = dpbf16(c02, w0, v); c12 = dpbf16(c12, w1, v); c22 = dpbf16(c22, w2, v); c32 = dpbf16(c32, w3, v)  # noqa: E702,E501
            v = load_u16x32(xs, x3 + so + k)
            c03 = dpbf16(c03, w0, v); c13 = dpbf16(c13, w1, v); c23 = dpbf16(c23, w2, v); c33 = dpbf16(c33, w3, v)  # noqa: E702,E501
    store_f32x16(res, 0, hsum16_f32x16(c00, c10, c20, c30, c01, c11, c21, c31, c02, c12, c22, c32, c03, c13, c23, c33))  # noqa: E501


@njit(**_NB_OPTS)
def _gemm4x3(wbuf, K, xs, x0, x1, x2, KX, nsplit, res):
    """res[j * 4 + r] for 4 rows x 3 tokens (see _gemm4x4)."""
    c00 = zero_f32x16(); c01 = zero_f32x16(); c02 = zero_f32x16()  # noqa: E702
    c10 = zero_f32x16(); c11 = zero_f32x16(); c12 = zero_f32x16()  # noqa: E702
    c20 = zero_f32x16(); c21 = zero_f32x16(); c22 = zero_f32x16()  # noqa: E702
    c30 = zero_f32x16(); c31 = zero_f32x16(); c32 = zero_f32x16()  # noqa: E702
    for s in range(nsplit):
        so = s * KX
        for k in range(0, K, 32):
            w0 = load_u16x32(wbuf, k)
            w1 = load_u16x32(wbuf, 1 * K + k)
            w2 = load_u16x32(wbuf, 2 * K + k)
            w3 = load_u16x32(wbuf, 3 * K + k)
            v = load_u16x32(xs, x0 + so + k)
            c00 = dpbf16(c00, w0, v); c10 = dpbf16(c10, w1, v); c20 = dpbf16(c20, w2, v); c30 = dpbf16(c30, w3, v)  # noqa: E702,E501
            v = load_u16x32(xs, x1 + so + k)
            c01 = dpbf16(c01, w0, v); c11 = dpbf16(c11, w1, v); c21 = dpbf16(c21, w2, v); c31 = dpbf16(c31, w3, v)  # noqa: E702,E501
            v = load_u16x32(xs, x2 + so + k)
            c02 = dpbf16(c02, w0, v); c12 = dpbf16(c12, w1, v); c22 = dpbf16(c22, w2, v); c32 = dpbf16(c32, w3, v)  # noqa: E702,E501
    z = zero_f32x16()
    store_f32x16(res, 0, hsum16_f32x16(c00, c10, c20, c30, c01, c11, c21, c31, c02, c12, c22, c32, z, z, z, z))  # noqa: E501


@njit(**_NB_OPTS)
def _gemm4x2(wbuf, K, xs, x0, x1, KX, nsplit, res):
    """res[j * 4 + r] for 4 rows x 2 tokens (see _gemm4x4)."""
    c00 = zero_f32x16(); c01 = zero_f32x16()  # noqa: E702
    c10 = zero_f32x16(); c11 = zero_f32x16()  # noqa: E702
    c20 = zero_f32x16(); c21 = zero_f32x16()  # noqa: E702
    c30 = zero_f32x16(); c31 = zero_f32x16()  # noqa: E702
    for s in range(nsplit):
        so = s * KX
        for k in range(0, K, 32):
            w0 = load_u16x32(wbuf, k)
            w1 = load_u16x32(wbuf, 1 * K + k)
            w2 = load_u16x32(wbuf, 2 * K + k)
            w3 = load_u16x32(wbuf, 3 * K + k)
            v = load_u16x32(xs, x0 + so + k)
            c00 = dpbf16(c00, w0, v); c10 = dpbf16(c10, w1, v); c20 = dpbf16(c20, w2, v); c30 = dpbf16(c30, w3, v)  # noqa: E702,E501
            v = load_u16x32(xs, x1 + so + k)
            c01 = dpbf16(c01, w0, v); c11 = dpbf16(c11, w1, v); c21 = dpbf16(c21, w2, v); c31 = dpbf16(c31, w3, v)  # noqa: E702,E501
    z = zero_f32x16()
    store_f32x16(res, 0, hsum16_f32x16(c00, c10, c20, c30, c01, c11, c21, c31, z, z, z, z, z, z, z, z))  # noqa: E501


@njit(**_NB_OPTS)
def _gemm_tiles(wbuf, K, xs, xbase, stride, KX, ne, nsplit, res, j0):
    """Next token tile of the GEMM over a decoded tile wbuf [4, K]: tokens j0 .. j0 + nj of the expert (their
    activations at xs[xbase + j * stride], lo split at + KX).  Tiles are 4 or 3 tokens wide (2 or 1 only for
    ne = 5 / ne <= 2), so no token is computed twice.  Writes res[j * 4 + r] for j < nj and returns nj."""
    rem = ne - j0
    o = xbase + j0 * stride
    if rem <= 2:
        nj = rem
        _gemm4x2(wbuf, K, xs, o, o + (rem - 1) * stride, KX, nsplit, res)
    elif rem % 4 == 0:
        nj = 4
        _gemm4x4(wbuf, K, xs, o, o + stride, o + 2 * stride, o + 3 * stride, KX, nsplit, res)
    else:
        nj = 3
        _gemm4x3(wbuf, K, xs, o, o + stride, o + 2 * stride, KX, nsplit, res)
    return nj


# ---- outer-product tiles (small K): 16 output rows per vector, no horizontal sums ---------------------------
@njit(inline="always", **_NB_OPTS)
def _dec_row(w, off, valid, th0, th1, tl0, tl1, sg, z):
    if valid:
        return _dec(load_u8x64(w, off), th0, th1, tl0, tl1, sg)
    return z, z


@njit(**_NB_OPTS)
def _decode_group16(w, base, gstride, ngv, c0, nc, tbl, wbuf):
    """Decode chunks c0 .. c0+nc of 16 rows -- 4 packed row groups at base + g * gstride, the first ngv of them
    present (the others read as zero rows) -- into k-pair-major order: wbuf[(c * 32 + p) * 32 ...] holds the
    16 rows' two words of k-pair p of chunk c, one ``dpbf16`` operand whose lanes are the 16 rows.  The
    activation words of pair p are xs[c * 64 + 2 p ...] (the A half of a chunk is pairs 0-15, B 16-31)."""
    th0 = load_u8x64(tbl, 0)
    th1 = load_u8x64(tbl, 64)
    tl0 = load_u8x64(tbl, 128)
    tl1 = load_u8x64(tbl, 192)
    sg = splat_u8x64(0x80)
    zb = splat_u8x64(0)
    z = unpacklo_u8_to_u16(zb, zb)
    for c in range(nc):
        o = base + (c0 + c) * 256
        a0, b0 = _dec_row(w, o, ngv > 0, th0, th1, tl0, tl1, sg, z)
        a1, b1 = _dec_row(w, o + 64, ngv > 0, th0, th1, tl0, tl1, sg, z)
        a2, b2 = _dec_row(w, o + 128, ngv > 0, th0, th1, tl0, tl1, sg, z)
        a3, b3 = _dec_row(w, o + 192, ngv > 0, th0, th1, tl0, tl1, sg, z)
        o += gstride
        a4, b4 = _dec_row(w, o, ngv > 1, th0, th1, tl0, tl1, sg, z)
        a5, b5 = _dec_row(w, o + 64, ngv > 1, th0, th1, tl0, tl1, sg, z)
        a6, b6 = _dec_row(w, o + 128, ngv > 1, th0, th1, tl0, tl1, sg, z)
        a7, b7 = _dec_row(w, o + 192, ngv > 1, th0, th1, tl0, tl1, sg, z)
        o += gstride
        a8, b8 = _dec_row(w, o, ngv > 2, th0, th1, tl0, tl1, sg, z)
        a9, b9 = _dec_row(w, o + 64, ngv > 2, th0, th1, tl0, tl1, sg, z)
        a10, b10 = _dec_row(w, o + 128, ngv > 2, th0, th1, tl0, tl1, sg, z)
        a11, b11 = _dec_row(w, o + 192, ngv > 2, th0, th1, tl0, tl1, sg, z)
        o += gstride
        a12, b12 = _dec_row(w, o, ngv > 3, th0, th1, tl0, tl1, sg, z)
        a13, b13 = _dec_row(w, o + 64, ngv > 3, th0, th1, tl0, tl1, sg, z)
        a14, b14 = _dec_row(w, o + 128, ngv > 3, th0, th1, tl0, tl1, sg, z)
        a15, b15 = _dec_row(w, o + 192, ngv > 3, th0, th1, tl0, tl1, sg, z)
        store_transpose16_u32(wbuf, c * 1024, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
        store_transpose16_u32(wbuf, c * 1024 + 512, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13,
                              b14, b15)


@njit(**_NB_OPTS)
def _op8(wbuf, npairs, xs, x0, x1, x2, x3, x4, x5, x6, x7, KX, nsplit, res):
    """res[j * 16 + r] = row r of the k-pair-major tile . token j, 16 rows x 8 tokens (activations at xs offsets
    x0..x7, lo split at + KX): each step multiplies one tile vector by 8 broadcast activation pairs."""
    a0 = zero_f32x16(); a1 = zero_f32x16(); a2 = zero_f32x16(); a3 = zero_f32x16()  # noqa: E702
    a4 = zero_f32x16(); a5 = zero_f32x16(); a6 = zero_f32x16(); a7 = zero_f32x16()  # noqa: E702
    for s in range(nsplit):
        so = s * KX
        for p in range(npairs):
            wv = load_u16x32(wbuf, p * 32)
            k = so + 2 * p
            a0 = dpbf16(a0, wv, bcast2_u16x32(xs, x0 + k))
            a1 = dpbf16(a1, wv, bcast2_u16x32(xs, x1 + k))
            a2 = dpbf16(a2, wv, bcast2_u16x32(xs, x2 + k))
            a3 = dpbf16(a3, wv, bcast2_u16x32(xs, x3 + k))
            a4 = dpbf16(a4, wv, bcast2_u16x32(xs, x4 + k))
            a5 = dpbf16(a5, wv, bcast2_u16x32(xs, x5 + k))
            a6 = dpbf16(a6, wv, bcast2_u16x32(xs, x6 + k))
            a7 = dpbf16(a7, wv, bcast2_u16x32(xs, x7 + k))
    store_f32x16(res, 0, a0)
    store_f32x16(res, 16, a1)
    store_f32x16(res, 32, a2)
    store_f32x16(res, 48, a3)
    store_f32x16(res, 64, a4)
    store_f32x16(res, 80, a5)
    store_f32x16(res, 96, a6)
    store_f32x16(res, 112, a7)


@njit(**_NB_OPTS)
def _op4(wbuf, npairs, xs, x0, x1, x2, x3, KX, nsplit, res):
    """res[j * 16 + r] for 16 rows x 4 tokens (see _op8)."""
    a0 = zero_f32x16(); a1 = zero_f32x16(); a2 = zero_f32x16(); a3 = zero_f32x16()  # noqa: E702
    for s in range(nsplit):
        so = s * KX
        for p in range(npairs):
            wv = load_u16x32(wbuf, p * 32)
            k = so + 2 * p
            a0 = dpbf16(a0, wv, bcast2_u16x32(xs, x0 + k))
            a1 = dpbf16(a1, wv, bcast2_u16x32(xs, x1 + k))
            a2 = dpbf16(a2, wv, bcast2_u16x32(xs, x2 + k))
            a3 = dpbf16(a3, wv, bcast2_u16x32(xs, x3 + k))
    store_f32x16(res, 0, a0)
    store_f32x16(res, 16, a1)
    store_f32x16(res, 32, a2)
    store_f32x16(res, 48, a3)


@njit(**_NB_OPTS)
def _op_tiles(wbuf, npairs, xs, xbase, stride, KX, ne, nsplit, res, j0):
    """Next token tile (8 wide, or 4 for the last <= 4 tokens) of the outer-product GEMM over a tile of
    ``npairs`` k-pairs: tokens j0 .. j0 + nj; columns past the last token repeat it (computed, not used).
    Writes res[j * 16 + r] for j < nj and returns nj."""
    rem = ne - j0
    o = xbase + j0 * stride
    last = o + (min(rem, 8) - 1) * stride
    if rem > 4:
        nj = min(rem, 8)
        _op8(wbuf, npairs, xs, o, min(o + stride, last), min(o + 2 * stride, last), min(o + 3 * stride, last),
             min(o + 4 * stride, last), min(o + 5 * stride, last), min(o + 6 * stride, last),
             min(o + 7 * stride, last), KX, nsplit, res)
    else:
        nj = rem
        _op4(wbuf, npairs, xs, o, min(o + stride, last), min(o + 2 * stride, last), min(o + 3 * stride, last),
             KX, nsplit, res)
    return nj


@njit(**_NB_OPTS)
def _prep_xs(src, src_off, nch, srow, nsplit, xs, xs_off):
    """xs[xs_off + i] (hi) / xs[xs_off + K + i] (lo) = bf16 split of src[src_off + i] * srow[chunk // 2];
    src is already in permuted (unpack) order; K = nch * 64."""
    K = nch * 64
    for c in range(nch):
        sv = splat_f32x16(srow[c // 2])
        for q in range(4):
            i = c * 64 + q * 16
            v = mul_f32x16(load_f32x16(src, src_off + i), sv)
            h = cvt_f32_bf16(v)
            store_u16x16(xs, xs_off + i, h)
            if nsplit == 2:
                store_u16x16(xs, xs_off + K + i, cvt_f32_bf16(sub_f32x16(v, bf16_to_f32(h))))


@njit(inline="always", **_NB_OPTS)
def _silu(g):
    return g / (np.float32(1.0) + _exp_f32(-g))


@njit(**_NBP_OPTS)
def _moe_fast(w1, w3, w2, s1, s3, s2, D, I, x, uniq, start, ptok, pw, nsplit, tbl, pos, op, out):
    T = x.shape[0]
    nu = uniq.shape[0]
    npairs = ptok.shape[0]
    Dp = (D + 63) // 64 * 64
    Ip = (I + 63) // 64 * 64
    nchD = Dp // 64
    nchI = Ip // 64
    bo = 128  # scale block rows (checked at allocate for the fast path)
    nrb1 = (I + bo - 1) // bo
    nrb2 = (D + bo - 1) // bo
    # activations, permuted to the unpack order, zero padded
    xp = np.zeros((T, Dp), np.float32)
    for t in prange(T):
        for j in range(D):
            xp[t, (j // 64) * 64 + pos[j % 64]] = x[t, j]
    xp = xp.ravel()
    hp = np.zeros(npairs * Ip, np.float32)   # silu(g)*u per pair, permuted order
    # ---------------------------------------------------------------- phase A: gate/up
    ntask = nu * nrb1
    for task in prange(ntask):
        u = task // nrb1
        rb = task - u * nrb1
        e = uniq[u]
        p0 = start[u]
        ne = start[u + 1] - p0
        r0 = rb * bo
        nr = min(bo, I - r0)
        ng = (nr + 3) // 4
        xs = np.empty(2 * nsplit * ne * Dp, np.uint16)   # [gate|up][pair][split][Dp]
        for i in range(ne):
            t = ptok[p0 + i]
            _prep_xs(xp, t * Dp, nchD, s1[e, rb], nsplit, xs, i * nsplit * Dp)
            _prep_xs(xp, t * Dp, nchD, s3[e, rb], nsplit, xs, (ne + i) * nsplit * Dp)
        gemm = ne >= GEMM_MIN_TOKENS
        ng16 = (ng + 3) // 4
        g = np.empty((ne, ng16 * 16), np.float32)
        uu = np.empty((ne, ng16 * 16), np.float32)
        if gemm and op:                        # outer-product tiles: 16 rows per vector
            wbuf = np.empty(KBC_OP * 1024, np.uint16)
            res = np.empty(128, np.float32)
            for g16 in range(ng16):
                ngv = min(4, ng - 4 * g16)
                base = (r0 + g16 * 16) * Dp
                for m in range(2):
                    wm = w1 if m == 0 else w3
                    dst = g if m == 0 else uu
                    xbase = m * ne * nsplit * Dp
                    for i in range(ne):
                        for r in range(16):
                            dst[i, g16 * 16 + r] = 0.0
                    for c0 in range(0, nchD, KBC_OP):
                        nc = min(KBC_OP, nchD - c0)
                        _decode_group16(wm[e], base, 4 * Dp, ngv, c0, nc, tbl, wbuf)
                        i = 0
                        while i < ne:
                            nj = _op_tiles(wbuf, nc * 32, xs, xbase + c0 * 64, nsplit * Dp, Dp, ne, nsplit, res, i)
                            for j in range(nj):
                                for r in range(16):
                                    dst[i + j, g16 * 16 + r] += res[j * 16 + r]
                            i += nj
        else:                                  # 4-row groups: GEMV, or 4 x 4 dot-product tiles
            if gemm:
                wbuf = np.empty(4 * KBC * 64, np.uint16)
                res = np.empty(16, np.float32)
            for gi in range(ng):
                base = (r0 + gi * 4) * Dp
                for m in range(2):
                    wm = w1 if m == 0 else w3
                    dst = g if m == 0 else uu
                    xbase = m * ne * nsplit * Dp
                    if not gemm:
                        for i in range(ne):
                            v0, v1, v2, v3 = _gemv4(wm[e], base, nchD, xs, xbase + i * nsplit * Dp, nsplit, tbl)
                            dst[i, gi * 4] = v0
                            dst[i, gi * 4 + 1] = v1
                            dst[i, gi * 4 + 2] = v2
                            dst[i, gi * 4 + 3] = v3
                    else:
                        for i in range(ne):
                            for r in range(4):
                                dst[i, gi * 4 + r] = 0.0
                        for c0 in range(0, nchD, KBC):   # K blocks: the decoded tile stays in L1
                            nc = min(KBC, nchD - c0)
                            _decode_group(wm[e], base, c0, nc, tbl, wbuf)
                            i = 0
                            while i < ne:
                                nj = _gemm_tiles(wbuf, nc * 64, xs, xbase + c0 * 64, nsplit * Dp, Dp, ne, nsplit,
                                                 res, i)
                                for j in range(nj):           # token j's 4 rows: contiguous on both sides
                                    for r in range(4):
                                        dst[i + j, gi * 4 + r] += res[j * 4 + r]
                                i += nj
        hrow = np.empty(nr, np.float32)
        for i in range(ne):
            for r in range(nr):                    # vectorised: silu(g) * u
                hrow[r] = _silu(g[i, r]) * uu[i, r]
            hb = (p0 + i) * Ip
            for r in range(nr):
                row = r0 + r
                hp[hb + (row // 64) * 64 + pos[row % 64]] = hrow[r]
    # ---------------------------------------------------------------- phase B: down
    for rb in prange(nrb2):
        r0 = rb * bo
        nr = min(bo, D - r0)
        ng = (nr + 3) // 4
        ng16 = (ng + 3) // 4
        acc = np.zeros((T, ng16 * 16), np.float32)
        wbuf = np.empty(4 * KBC * 64, np.uint16)
        res = np.empty(16, np.float32)
        wbuf16 = np.empty(KBC_OP * 1024 if op else 0, np.uint16)
        res16 = np.empty(128, np.float32)
        for u in range(nu):
            e = uniq[u]
            p0 = start[u]
            ne = start[u + 1] - p0
            xs = np.empty(ne * nsplit * Ip, np.uint16)
            for i in range(ne):
                _prep_xs(hp, (p0 + i) * Ip, nchI, s2[e, rb], nsplit, xs, i * nsplit * Ip)
            gemm = ne >= GEMM_MIN_TOKENS
            if gemm and op:
                for g16 in range(ng16):
                    ngv = min(4, ng - 4 * g16)
                    base = (r0 + g16 * 16) * Ip
                    for c0 in range(0, nchI, KBC_OP):
                        nc = min(KBC_OP, nchI - c0)
                        _decode_group16(w2[e], base, 4 * Ip, ngv, c0, nc, tbl, wbuf16)
                        i = 0
                        while i < ne:
                            nj = _op_tiles(wbuf16, nc * 32, xs, c0 * 64, nsplit * Ip, Ip, ne, nsplit, res16, i)
                            for j in range(nj):
                                t = ptok[p0 + i + j]
                                wt = pw[p0 + i + j]
                                for r in range(16):
                                    acc[t, g16 * 16 + r] += wt * res16[j * 16 + r]
                            i += nj
                continue
            for gi in range(ng):
                base = (r0 + gi * 4) * Ip
                if not gemm:
                    for i in range(ne):
                        v0, v1, v2, v3 = _gemv4(w2[e], base, nchI, xs, i * nsplit * Ip, nsplit, tbl)
                        t = ptok[p0 + i]
                        wt = pw[p0 + i]
                        acc[t, gi * 4] += wt * v0
                        acc[t, gi * 4 + 1] += wt * v1
                        acc[t, gi * 4 + 2] += wt * v2
                        acc[t, gi * 4 + 3] += wt * v3
                else:
                    for c0 in range(0, nchI, KBC):
                        nc = min(KBC, nchI - c0)
                        _decode_group(w2[e], base, c0, nc, tbl, wbuf)
                        i = 0
                        while i < ne:
                            nj = _gemm_tiles(wbuf, nc * 64, xs, c0 * 64, nsplit * Ip, Ip, ne, nsplit, res, i)
                            for j in range(nj):
                                t = ptok[p0 + i + j]
                                wt = pw[p0 + i + j]
                                for r in range(4):
                                    acc[t, gi * 4 + r] += wt * res[j * 4 + r]
                            i += nj
        for t in range(T):
            for r in range(nr):
                out[t, r0 + r] = acc[t, r]
    return out


# ============================================================================================ portable path
@njit(inline="always", **_NB_OPTS_EXACT)
def _e4m3_f32(b):
    """Exact e4m3 -> float32 by shifts, no float32 denormal formed (FTZ/DAZ safe).  NaN codes never get here."""
    a = np.uint32(b & 0x7F)
    sub = np.uint32(1) if a < 8 else np.uint32(0)
    bits = (a << np.uint32(20)) + ((np.uint32(120) + sub) << np.uint32(23))
    v = bitcast_u32_f32(bits) - (np.float32(2.0 ** -6) if sub else np.float32(0.0))
    return -v if b & 0x80 else v


@njit(**_NB_OPTS_EXACT)
def _decode_rows_f32(w, base, nch, buf):
    """Decode a 4-row group into buf[4, nch*64] float32 (natural order), bit-shift decoder."""
    K = nch * 64
    for c in range(nch):
        o = base + c * 256
        for r in range(4):
            for j in range(64):
                buf[r * K + c * 64 + j] = _e4m3_f32(w[o + 64 * r + j])


@njit(**_NBP_OPTS)
def _moe_portable(w1, w3, w2, s1, s3, s2, D, I, x, uniq, start, ptok, pw, out):
    T = x.shape[0]
    nu = uniq.shape[0]
    npairs = ptok.shape[0]
    Dp = (D + 63) // 64 * 64
    Ip = (I + 63) // 64 * 64
    nchD = Dp // 64
    nchI = Ip // 64
    bo = 128
    nrb1 = (I + bo - 1) // bo
    nrb2 = (D + bo - 1) // bo
    h = np.zeros((npairs, Ip), np.float32)
    ntask = nu * nrb1
    for task in prange(ntask):
        u = task // nrb1
        rb = task - u * nrb1
        e = uniq[u]
        p0 = start[u]
        ne = start[u + 1] - p0
        r0 = rb * bo
        nr = min(bo, I - r0)
        ng = (nr + 3) // 4
        xs = np.zeros((2, ne, Dp), np.float32)
        for i in range(ne):
            t = ptok[p0 + i]
            for j in range(D):
                xs[0, i, j] = x[t, j] * s1[e, rb, j // 128]
                xs[1, i, j] = x[t, j] * s3[e, rb, j // 128]
        buf = np.empty(4 * Dp, np.float32)
        gu = np.zeros((2, ne, 4), np.float32)
        for gi in range(ng):
            base = (r0 + gi * 4) * Dp
            for m in range(2):
                _decode_rows_f32(w1[e] if m == 0 else w3[e], base, nchD, buf)
                for i in range(ne):
                    for r in range(4):
                        sacc = np.float32(0.0)
                        for j in range(Dp):
                            sacc += buf[r * Dp + j] * xs[m, i, j]
                        gu[m, i, r] = sacc
            for i in range(ne):
                for r in range(4):
                    row = r0 + gi * 4 + r
                    if row < I:
                        h[p0 + i, row] = _silu(gu[0, i, r]) * gu[1, i, r]
    for rb in prange(nrb2):
        r0 = rb * bo
        nr = min(bo, D - r0)
        ng = (nr + 3) // 4
        acc = np.zeros((T, ng * 4), np.float32)
        buf = np.empty(4 * Ip, np.float32)
        for u in range(nu):
            e = uniq[u]
            p0 = start[u]
            ne = start[u + 1] - p0
            xs = np.zeros((ne, Ip), np.float32)
            for i in range(ne):
                for j in range(I):
                    xs[i, j] = h[p0 + i, j] * s2[e, rb, j // 128]
            for gi in range(ng):
                _decode_rows_f32(w2[e], (r0 + gi * 4) * Ip, nchI, buf)
                for i in range(ne):
                    t = ptok[p0 + i]
                    wt = pw[p0 + i]
                    for r in range(4):
                        sacc = np.float32(0.0)
                        for j in range(Ip):
                            sacc += buf[r * Ip + j] * xs[i, j]
                        acc[t, gi * 4 + r] += wt * sacc
        for t in range(T):
            for r in range(nr):
                out[t, r0 + r] = acc[t, r]
    return out


@njit(**_NB_OPTS_EXACT)
def _bitshift_decode_all():
    """The portable decoder applied to all 256 codes (tests compare it with torch's e4m3 conversion)."""
    lut = np.empty(256, np.float32)
    for b in range(256):
        lut[b] = _e4m3_f32(np.uint8(b))
    return lut


# ============================================================================================ public entry points
_TBL = np.concatenate([_TBL_HI, _TBL_LO])


def _prepare_call(p: PackedExperts, x, slots, weights, out):
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != p.hidden:
        raise ValueError(f"x must be float32 [T, {p.hidden}], got {getattr(x, 'shape', None)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    T = x.shape[0]
    slots = np.ascontiguousarray(slots)
    if slots.dtype not in (np.int32, np.int64):
        slots = slots.astype(np.int64)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if slots.ndim != 2 or slots.shape[0] != T or weights.shape != slots.shape:
        raise ValueError(f"slots/weights must be [T={T}, k], got {slots.shape} / {weights.shape}")
    if slots.size and int(slots.max(initial=-1)) >= p.n_slots:
        raise ValueError(f"slot id {int(slots.max())} out of range (n_slots={p.n_slots})")
    if out is None:
        out = np.empty((T, p.hidden), np.float32)
    elif out.shape != (T, p.hidden) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array [T, hidden]")
    return x, slots, weights, out


def moe_forward(p: PackedExperts, x: np.ndarray, slots: np.ndarray, weights: np.ndarray,
                out: np.ndarray | None = None, precision: str | None = None) -> np.ndarray:
    """out[t] = sum_k weights[t,k] * down(silu(gate x_t) * (up x_t)) over expert slots[t,k] (-1 skips).
    ``precision``: 'bf16x2' (default) or 'bf16' activations on the AVX-512 path (see :func:`precision_for`)."""
    x, slots, weights, out = _prepare_call(p, x, slots, weights, out)
    T = x.shape[0]
    if T == 0:
        return out
    uniq, start, ptok, pw = _route(slots, weights, p.n_slots)
    if uniq.size == 0:
        out[...] = 0.0
        return out
    with kernel_threads():
        if fast_path_available() and p.block == (128, 128):
            _moe_fast(p.w1, p.w3, p.w2, p.s1, p.s3, p.s2, p.hidden, p.inter, x, uniq, start, ptok, pw,
                      2 if get_precision(precision) == "bf16x2" else 1, _TBL, _POS, use_outer_product(p), out)
        else:
            _moe_portable_dispatch(p, x, uniq, start, ptok, pw, out)
    return out


OP_MAX_K = 256   # largest reduction length (hidden / intermediate size) that takes the outer-product tiles
_op_mode = None  # None: by shape; True / False: forced (A/B tests and benchmarks)


def use_outer_product(p: PackedExperts) -> bool:
    """Whether a call's GEMM path uses the outer-product tiles: for small reduction lengths, where the 4 x 4
    dot-product tiles spend as long on their horizontal sums and per-output scatter as on the products."""
    if _op_mode is not None:
        return _op_mode
    return max(p.hidden, p.inter) <= OP_MAX_K


@contextlib.contextmanager
def kernel_threads():
    """Run the enclosed Numba parallel call on the kernels' thread count (:func:`set_num_threads`; every CPU
    kernel module uses this).  Numba's count is per calling thread; the lock keeps concurrent callers tidy."""
    nthreads = get_num_threads()
    with _lock:
        prev = numba.get_num_threads()
        if prev != nthreads:
            numba.set_num_threads(nthreads)
        try:
            yield nthreads
        finally:
            if prev != nthreads:
                numba.set_num_threads(prev)


def _moe_portable_dispatch(p, x, uniq, start, ptok, pw, out):
    if p.block != (128, 128):
        raise NotImplementedError("the numba kernels support 128x128 scale blocks; use moe_forward_ref")
    _moe_portable(p.w1, p.w3, p.w2, p.s1, p.s3, p.s2, p.hidden, p.inter, x, uniq, start, ptok, pw, out)


def moe_forward_ref(p: PackedExperts, x, slots, weights) -> np.ndarray:
    """Torch twin: per expert, dequantise W = float(q) * scale (torch's own e4m3 conversion) and matmul in
    float32.  Same contract as :func:`moe_forward`."""
    import torch
    x, slots, weights, _ = _prepare_call(p, x, slots, weights, None)
    xt = torch.from_numpy(x)
    out = torch.zeros((x.shape[0], p.hidden), dtype=torch.float32)
    sl = torch.from_numpy(slots.astype(np.int64))
    wt = torch.from_numpy(weights)
    bo, bi = p.block

    def deq(q, s):
        w = torch.from_numpy(np.ascontiguousarray(q)).view(torch.float8_e4m3fn).float()
        sc = torch.from_numpy(s).repeat_interleave(bo, 0).repeat_interleave(bi, 1)[: w.shape[0], : w.shape[1]]
        return w * sc

    for e in torch.unique(sl[sl >= 0]).tolist():
        tok, kk = torch.nonzero(sl == e, as_tuple=True)
        w1q, w1s, w3q, w3s, w2q, w2s = p.get_slot(e)
        xe = xt[tok]
        g = xe @ deq(w1q, w1s).T
        u = xe @ deq(w3q, w3s).T
        hh = torch.nn.functional.silu(g) * u
        y = hh @ deq(w2q, w2s).T
        out.index_add_(0, tok, y * wt[tok, kk].unsqueeze(1))
    return out.numpy()


def warmup() -> float:
    """Compile (or load from Numba's cache) every kernel on tiny shapes; returns seconds spent."""
    t0 = time.perf_counter()
    p = PackedExperts.allocate(2, 128, 192)
    rng = np.random.default_rng(0)
    for s in range(2):
        q = lambda r, c: rng.integers(0, 0x7E, (r, c), dtype=np.uint8)  # noqa: E731
        p.set_slot(s, q(192, 128), np.ones((2, 1), np.float32), q(192, 128), np.ones((2, 1), np.float32),
                   q(128, 192), np.ones((1, 2), np.float32))
    x = np.ones((5, 128), np.float32)
    for sl_dtype in (np.int32, np.int64):
        slots = np.zeros((5, 2), sl_dtype)
        slots[:, 1] = 1
        slots[0, 1] = -1
        w = np.full((5, 2), 0.5, np.float32)
        if fast_path_available():
            for prec in PRECISIONS:
                moe_forward(p, x, slots, w, precision=prec)        # GEMM path (5 tokens per expert)
                moe_forward(p, x[:1], slots[:1], w[:1], precision=prec)  # GEMV path
        else:
            moe_forward(p, x, slots, w)
    return time.perf_counter() - t0
