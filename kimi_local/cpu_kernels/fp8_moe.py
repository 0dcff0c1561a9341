"""Block-FP8 (e4m3, 128x128 float32 scale_inv blocks) routed-expert kernels for the CPU.

One call, :func:`moe_forward`, computes a MoE layer's routed experts for a batch of tokens::

    out[t] = sum_k weights[t, k] * W2_e (silu(W1_e x_t) * (W3_e x_t)),   e = slots[t, k]   (slot -1 = skip)

directly from the checkpoint's FP8 bytes: nothing is converted to a wider type offline and no dequantised copy of
a weight matrix is ever kept -- weights are decoded in registers and used at once.

Design (issue 4, "CPU expert kernels"):

* **Layout.** :class:`PackedExperts` permutes each projection's bytes once, at load, into *16-row blocks*: groups
  of ``RG`` = 16 rows, and inside a group one 64-byte block per 4 columns holding those 16 rows x 4 columns.  The
  byte order inside a block is chosen so that the decode below turns one 512-bit load straight into two
  ``vdpbf16ps`` operands whose 16 lanes are the 16 rows and whose two words are a column pair -- no transposes
  at run time.  A group's blocks are one contiguous stream (16 rows x K bytes), and so is a whole matrix.  Rows
  are zero-padded to a multiple of 16 and columns to a multiple of ``KALIGN`` = 8; padded bytes decode to +0
  and never reach an output.
* **Outer products.** A 16-row group times a tile of up to 16 tokens keeps one float32 accumulator vector per
  token in registers for the whole reduction: each 64-byte block is decoded once and multiplied by every token's
  broadcast activation pair (``bcast2_u16x32``).  Each accumulator ends as 16 finished outputs, stored with one
  vector: no horizontal sums, no decoded tile in memory.  Token tiles are 16, 12, 8 or 4 wide (a tile's unused
  columns repeat its last token: computed, never used), with 2- and 1-token versions (the 1-token GEMV keeps four
  accumulators to hide the dot-product latency).  A prefill gives each K2 expert ~11 tokens: one 12-wide tile
  reads the weights once from DRAM and runs at ~90% of the core's ``vdpbf16ps`` peak; a decode streams them
  through the GEMV at DRAM speed.
* **Scales on the activation side.** The scale of weight block (rb, cb) multiplies the activations instead of the
  weights: for every 128-row block the kernel builds ``xs = x * scale_inv[rb, col // 128]`` once per token (1/128
  of the multiply-adds), so the inner loop is pure decode + dot product.
* **Decode (fast path, AVX-512 VBMI + BF16).** e4m3 -> bf16 is *exact* for every finite e4m3 value, subnormals
  included (they become normal bf16 numbers, so neither FTZ/DAZ nor vdpbf16ps' denormal flushing can touch
  them).  Two ``vpermi2b`` 128-entry byte tables give the bf16 high and low bytes of 64 weights at once, the
  sign bit is OR-ed in, and ``vpunpck[lh]bw`` interleaves them into the two operands.  Activations are split as
  ``xs = hi + lo`` (two bf16) in ``"bf16x2"`` precision (about 16 significant bits, float32-like), or rounded
  to one bf16 in ``"bf16"`` precision (half the dot products; the rounding a bf16 model applies to its
  activations anyway).  Products are exact and accumulate in float32.  The expert backends pick the precision
  from the model's activation dtype (:func:`precision_for`): bf16 models (the default) run ``"bf16"``, float32
  models ``"bf16x2"``; :func:`set_precision` overrides both.
* **Portable path** (any x86-64 / other CPU): bit-shift decode to float32 -- magnitude << 20 with the
  e4m3->fp32 exponent bias (120) *added* so that normal codes come out exact and subnormal codes are produced
  with the classic "+1 exponent, subtract 2^-6" fix-up; no float32 denormal is ever formed (FTZ/DAZ-safe).
* **Work split.** Gate/up (fused: one task computes a 128-row block of both and writes silu(g)*u) are split
  over (expert, 128-row block) tasks; down over 128-row blocks of the output (each task loops over the
  experts, so no two threads write the same output row).  Models with fewer than 4 row blocks per thread (small
  hidden sizes) also give each thread its own share of the experts in the down projection, and add the shares'
  partial sums at the end.  Each thread takes a contiguous range of tasks and keeps its own scratch.
* **Memory system.** The weight streams are software-prefetched ``PF_DIST`` bytes ahead *into L2*
  (prefetcht2): L1 prefetches are limited by the L1 fill buffers and left the compute-light GEMV at ~0.5 of the
  DRAM read ceiling on one core; L2 prefetches keep enough misses in flight to reach ~0.7-0.8.

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
from numba.extending import intrinsic as _intrinsic

from . import simd
from .mathf import exp_f32 as _exp_f32
from .simd import (add_f32x16, add_u8x64, and_u8x64, as_u16x32, bcast2_u16x32, bf16_to_f32, bitcast_u32_f32,
                   cvt_f32_bf16, dpbf16, load_f32x16, load_u8x64, mul_f32x16, or_u8x64, perm2_u8x64, prefetch_l2,
                   splat_f32x16, splat_u8x64, store_f32x16, store_transpose16_u32, store_u8x64, store_u16x16,
                   sub_f32x16, unpackhi_u8_to_u16, unpacklo_u8_to_u16, zero_f32x16)

__all__ = ["PackedExperts", "moe_forward", "moe_forward_ref", "set_num_threads", "get_num_threads", "warmup",
           "set_precision", "get_precision", "precision_for", "fast_path_available", "e4m3_decode_table",
           "RG", "KALIGN"]

RG = 16         # rows per group: one decoded vector = 16 rows x one column pair
KALIGN = 8      # columns are padded to a multiple of this (the GEMV reads two blocks per step)
TILE = 16       # widest token tile (one accumulator vector per token, all in registers)
PF_DIST = 8192  # software-prefetch distance (bytes, into L2) of the weight streams (compile-time constant)
SB = 128        # scale block (rows and columns) of the fast path
XPAD = 32       # spare words after each token's prepared activations (see _moe_fast)

# fastmath without nnan/ninf: inf/NaN inputs (e.g. overflowing activations) propagate like in torch
_FM = {"contract", "reassoc", "nsz", "arcp", "afn"}
# error_model="numpy": a float division is plain IEEE (inf / NaN, as in torch) -- Python's model checks every
# divisor for zero, which keeps loops such as the silu epilogue from vectorising (measured: ~10x slower)
_NB_OPTS = dict(nogil=True, cache=True, fastmath=_FM, error_model="numpy")
_NBP_OPTS = dict(nogil=True, cache=True, fastmath=_FM, parallel=True, error_model="numpy")
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
def _padded(R: int, C: int) -> tuple[int, int]:
    """Padded (rows, columns) of an R x C matrix in the packed layout."""
    return _ceil(R, RG), _ceil(C, KALIGN)


def _pack_matrix(q: np.ndarray, out: np.ndarray) -> None:
    """q [R, C] uint8 -> out flat in the 16-row block layout (zero padding): the plain numpy reference of
    :func:`_pack_count_nan`, which set_slot uses.

    Block (g, c) -- rows 16g..16g+15, columns 4c..4c+3 -- is the 64 bytes at (g * Cp/4 + c) * 64, and its byte
    b = 16 L + 8 h + 2 j + e holds row 16g + 4L + j, column 4c + 2h + e: ``vpunpcklbw`` of the decoded bytes then
    yields the words (row 4L + j, columns 4c, 4c + 1) in 32-bit lane 4L + j, and ``vpunpckhbw`` the pair
    (4c + 2, 4c + 3) -- each a ``vdpbf16ps`` operand whose lanes are the 16 rows."""
    R, C = q.shape
    Rp, Cp = _padded(R, C)
    if Rp == R and Cp == C:
        src = q
    else:
        src = np.zeros((Rp, Cp), np.uint8)
        src[:R, :C] = q
    # src [g, L, j, c, h, e] -> out [g, c, L, h, j, e]
    out.reshape(Rp // RG, Cp // 4, 4, 2, 4, 2)[...] = src.reshape(Rp // RG, 4, 4, Cp // 4, 2, 2).transpose(
        0, 3, 1, 4, 2, 5)


def _block_perm() -> tuple:
    """Byte b of a packed block comes from byte t of the 16 x 4 block stored row-major (row r = 4L + j, column
    2h + e at t = 4r + 2h + e): the in-lane shuffle applied after a 16 x 16 transpose of 32-bit words."""
    perm = []
    for b in range(64):
        L, h, j, e = b >> 4, (b >> 3) & 1, (b >> 1) & 3, b & 1
        perm.append(4 * (4 * L + j) + 2 * h + e)
    return tuple(perm)


_BLOCK_PERM = _block_perm()


@_intrinsic
def _block_shuffle(typingctx, v):
    """Reorder one 64-byte row-major 16 x 4 block into the packed byte order (an in-lane byte shuffle)."""
    from llvmlite import ir as _ir
    if v != simd.V64u8:
        return None
    sig = simd.V64u8(v)

    def codegen(context, builder, sig, args):
        mask = _ir.Constant(_ir.VectorType(_ir.IntType(32), 64), list(_BLOCK_PERM))
        return builder.shuffle_vector(args[0], args[0], mask)
    return sig, codegen


@njit(inline="always", nogil=True, cache=True)
def _nan_bits(v, m7, one):
    """((b & 0x7F) + 1): bit 7 is set exactly for the e4m3 NaN codes 0x7F / 0xFF."""
    return add_u8x64(and_u8x64(v, m7), one)


@njit(nogil=True, cache=True)
def _pack_count_nan(q, out):
    """_pack_matrix and the e4m3 NaN-code count in one pass over q; returns the count.  Whole 16-row x 64-column
    regions move as 16 512-bit loads, a 16 x 16 transpose of 32-bit words and 16 in-lane byte shuffles (plain
    LLVM vector ops: any x86-64), and are screened with ((b & 0x7F) + 1) & 0x80, which is set exactly for the
    NaN codes 0x7F / 0xFF; edges go byte by byte.  nogil: the loader packs experts from several threads at
    once."""
    R, C = q.shape
    Rp = (R + RG - 1) // RG * RG
    Cp = (C + KALIGN - 1) // KALIGN * KALIGN
    nb = Cp // 4                      # 64-byte blocks per row group
    ngr = Rp // RG
    full_r = R // RG                  # row groups with all 16 rows present
    full_c = C // 64                  # 64-column regions with all columns present
    flat = q.ravel()
    tmp = np.empty(512, np.uint16)
    tmp8 = tmp.view(np.uint8)
    m7 = splat_u8x64(0x7F)
    one = splat_u8x64(1)
    acc = and_u8x64(m7, splat_u8x64(0))
    bad = 0
    for g in range(ngr):
        c_vec = full_c if g < full_r else 0
        for c in range(c_vec):
            o = g * RG * C + c * 64
            v0 = load_u8x64(flat, o)
            v1 = load_u8x64(flat, o + C)
            v2 = load_u8x64(flat, o + 2 * C)
            v3 = load_u8x64(flat, o + 3 * C)
            v4 = load_u8x64(flat, o + 4 * C)
            v5 = load_u8x64(flat, o + 5 * C)
            v6 = load_u8x64(flat, o + 6 * C)
            v7 = load_u8x64(flat, o + 7 * C)
            v8 = load_u8x64(flat, o + 8 * C)
            v9 = load_u8x64(flat, o + 9 * C)
            v10 = load_u8x64(flat, o + 10 * C)
            v11 = load_u8x64(flat, o + 11 * C)
            v12 = load_u8x64(flat, o + 12 * C)
            v13 = load_u8x64(flat, o + 13 * C)
            v14 = load_u8x64(flat, o + 14 * C)
            v15 = load_u8x64(flat, o + 15 * C)
            a = or_u8x64(or_u8x64(or_u8x64(_nan_bits(v0, m7, one), _nan_bits(v1, m7, one)),
                                  or_u8x64(_nan_bits(v2, m7, one), _nan_bits(v3, m7, one))),
                         or_u8x64(or_u8x64(_nan_bits(v4, m7, one), _nan_bits(v5, m7, one)),
                                  or_u8x64(_nan_bits(v6, m7, one), _nan_bits(v7, m7, one))))
            b = or_u8x64(or_u8x64(or_u8x64(_nan_bits(v8, m7, one), _nan_bits(v9, m7, one)),
                                  or_u8x64(_nan_bits(v10, m7, one), _nan_bits(v11, m7, one))),
                         or_u8x64(or_u8x64(_nan_bits(v12, m7, one), _nan_bits(v13, m7, one)),
                                  or_u8x64(_nan_bits(v14, m7, one), _nan_bits(v15, m7, one))))
            acc = or_u8x64(acc, or_u8x64(a, b))
            # vector p of the transpose = the 16 rows' 4 bytes of columns 64c + 4p .. + 3, row-major
            store_transpose16_u32(tmp, 0, as_u16x32(v0), as_u16x32(v1), as_u16x32(v2), as_u16x32(v3),
                                  as_u16x32(v4), as_u16x32(v5), as_u16x32(v6), as_u16x32(v7), as_u16x32(v8),
                                  as_u16x32(v9), as_u16x32(v10), as_u16x32(v11), as_u16x32(v12), as_u16x32(v13),
                                  as_u16x32(v14), as_u16x32(v15))
            ob = (g * nb + c * 16) * 64
            for p in range(16):
                store_u8x64(out, ob + 64 * p, _block_shuffle(load_u8x64(tmp8, 64 * p)))
        for cb in range(c_vec * 16, nb):   # edge blocks, byte by byte
            ob = (g * nb + cb) * 64
            for b in range(64):
                row = g * RG + 4 * (b >> 4) + ((b >> 1) & 3)
                col = 4 * cb + 2 * ((b >> 3) & 1) + (b & 1)
                if row < R and col < C:
                    v = q[row, col]
                    bad += (v & 0x7F) == 0x7F
                    out[ob + b] = v
                else:
                    out[ob + b] = 0
    lanes = np.empty(64, np.uint8)
    store_u8x64(lanes, 0, acc)
    if np.any(lanes & 0x80):   # some vector region held a NaN code: count them exactly
        for row in range(full_r * RG):
            for j in range(full_c * 64):
                bad += (q[row, j] & 0x7F) == 0x7F
    return bad


def _unpack_matrix(flat: np.ndarray, R: int, C: int) -> np.ndarray:
    Rp, Cp = _padded(R, C)
    return flat.reshape(Rp // RG, Cp // 4, 4, 2, 4, 2).transpose(0, 2, 4, 1, 3, 5).reshape(Rp, Cp)[:R, :C]


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


class PackedExperts:
    """FP8 weights of ``n_slots`` expert slots of one MoE layer, laid out for the kernels.

    Arrays (all allocated through ``alloc(shape, dtype)``):
      w1, w3: uint8 [n_slots, ceil16(I) * ceil8(D)]   gate / up, 16-row block layout (see module doc)
      w2:     uint8 [n_slots, ceil16(D) * ceil8(I)]   down
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
            # the portable kernel assumes the scale block covers whole 16-row groups and 8-column steps
            if block[1] % KALIGN or block[0] % RG:
                raise ValueError(f"block {block}: columns must be a multiple of {KALIGN}, rows of {RG}")
        if n_slots < 1 or hidden < 1 or inter < 1:
            raise ValueError(f"bad sizes n_slots={n_slots} hidden={hidden} inter={inter}")
        D, I = int(hidden), int(inter)
        n13 = _ceil(I, RG) * _ceil(D, KALIGN)
        n2 = _ceil(D, RG) * _ceil(I, KALIGN)
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
    """64 packed e4m3 bytes -> the two bf16 operands of their block (16 rows x columns 4c, 4c+1 / 4c+2, 4c+3)."""
    hi = or_u8x64(perm2_u8x64(th0, q, th1), and_u8x64(q, sg))
    lo = perm2_u8x64(tl0, q, tl1)
    return unpacklo_u8_to_u16(lo, hi), unpackhi_u8_to_u16(lo, hi)


@njit(inline="always", **_NB_OPTS)
def _tables(tbl):
    return load_u8x64(tbl, 0), load_u8x64(tbl, 64), load_u8x64(tbl, 128), load_u8x64(tbl, 192), splat_u8x64(0x80)


# ---- token tiles: res[(g * TILE + j) * 16 + r] = row r of group g . token j ---------------------------------
# A tile computes ng row groups (16 rows each, nb blocks, the first at w[base:], the next gstride bytes on) for a
# few tokens (activations at xs[x_j:], bf16; the "lo" half of the bf16x2 split at x_j + KX).  One call covers a
# whole row block, so call overheads stay small even for tiny models.  The tiles are the same multiply-add
# pattern unrolled for different numbers of accumulators, written out so that the accumulators stay in registers.
@njit(**_NB_OPTS)
def _t1(w, base, ng, gstride, nb, xs, x0, KX, nsplit, tbl, res):
    """One token (GEMV): four accumulators over pairs of blocks hide the dot-product latency (nb is even)."""
    th0, th1, tl0, tl1, sg = _tables(tbl)
    for gi in range(ng):
        a0 = zero_f32x16()
        a1 = zero_f32x16()
        a2 = zero_f32x16()
        a3 = zero_f32x16()
        for s in range(nsplit):
            xo = x0 + s * KX
            for c in range(0, nb, 2):
                o = base + gi * gstride + c * 64
                prefetch_l2(w, o + PF_DIST)
                prefetch_l2(w, o + PF_DIST + 64)
                A, B = _dec(load_u8x64(w, o), th0, th1, tl0, tl1, sg)
                C, D = _dec(load_u8x64(w, o + 64), th0, th1, tl0, tl1, sg)
                k = xo + 4 * c
                a0 = dpbf16(a0, A, bcast2_u16x32(xs, k))
                a1 = dpbf16(a1, B, bcast2_u16x32(xs, k + 2))
                a2 = dpbf16(a2, C, bcast2_u16x32(xs, k + 4))
                a3 = dpbf16(a3, D, bcast2_u16x32(xs, k + 6))
        store_f32x16(res, gi * TILE * RG, add_f32x16(add_f32x16(a0, a1), add_f32x16(a2, a3)))


@njit(**_NB_OPTS)
def _t2(w, base, ng, gstride, nb, xs, x0, x1, KX, nsplit, tbl, res):
    """Two tokens, two accumulators each (one per operand of a block)."""
    th0, th1, tl0, tl1, sg = _tables(tbl)
    for gi in range(ng):
        a0 = zero_f32x16()
        b0 = zero_f32x16()
        a1 = zero_f32x16()
        b1 = zero_f32x16()
        for s in range(nsplit):
            so = s * KX
            for c in range(nb):
                o = base + gi * gstride + c * 64
                prefetch_l2(w, o + PF_DIST)
                A, B = _dec(load_u8x64(w, o), th0, th1, tl0, tl1, sg)
                k = so + 4 * c
                a0 = dpbf16(a0, A, bcast2_u16x32(xs, x0 + k))
                b0 = dpbf16(b0, B, bcast2_u16x32(xs, x0 + k + 2))
                a1 = dpbf16(a1, A, bcast2_u16x32(xs, x1 + k))
                b1 = dpbf16(b1, B, bcast2_u16x32(xs, x1 + k + 2))
        r = gi * TILE * RG
        store_f32x16(res, r, add_f32x16(a0, b0))
        store_f32x16(res, r + 16, add_f32x16(a1, b1))


@njit(**_NB_OPTS)
def _t4(w, base, ng, gstride, nb, xs, x0, x1, x2, x3, KX, nsplit, tbl, res):
    """Four tokens, two accumulators each."""
    th0, th1, tl0, tl1, sg = _tables(tbl)
    for gi in range(ng):
        a0 = zero_f32x16(); b0 = zero_f32x16(); a1 = zero_f32x16(); b1 = zero_f32x16()  # noqa: E702
        a2 = zero_f32x16(); b2 = zero_f32x16(); a3 = zero_f32x16(); b3 = zero_f32x16()  # noqa: E702
        for s in range(nsplit):
            so = s * KX
            for c in range(nb):
                o = base + gi * gstride + c * 64
                prefetch_l2(w, o + PF_DIST)
                A, B = _dec(load_u8x64(w, o), th0, th1, tl0, tl1, sg)
                k = so + 4 * c
                a0 = dpbf16(a0, A, bcast2_u16x32(xs, x0 + k)); b0 = dpbf16(b0, B, bcast2_u16x32(xs, x0 + k + 2))  # noqa: E702,E501
                a1 = dpbf16(a1, A, bcast2_u16x32(xs, x1 + k)); b1 = dpbf16(b1, B, bcast2_u16x32(xs, x1 + k + 2))  # noqa: E702,E501
                a2 = dpbf16(a2, A, bcast2_u16x32(xs, x2 + k)); b2 = dpbf16(b2, B, bcast2_u16x32(xs, x2 + k + 2))  # noqa: E702,E501
                a3 = dpbf16(a3, A, bcast2_u16x32(xs, x3 + k)); b3 = dpbf16(b3, B, bcast2_u16x32(xs, x3 + k + 2))  # noqa: E702,E501
        r = gi * TILE * RG
        store_f32x16(res, r, add_f32x16(a0, b0))
        store_f32x16(res, r + 16, add_f32x16(a1, b1))
        store_f32x16(res, r + 32, add_f32x16(a2, b2))
        store_f32x16(res, r + 48, add_f32x16(a3, b3))


@njit(inline="always", **_NB_OPTS)
def _op(acc, A, B, xs, k):
    """acc += A . (token's column pair at k) + B . (the pair at k + 2): one token's share of a block."""
    return dpbf16(dpbf16(acc, A, bcast2_u16x32(xs, k)), B, bcast2_u16x32(xs, k + 2))


@njit(**_NB_OPTS)
def _t8(w, base, ng, gstride, nb, xs, x0, x1, x2, x3, x4, x5, x6, x7, KX, nsplit, tbl, res):
    """Eight tokens, one accumulator each."""
    th0, th1, tl0, tl1, sg = _tables(tbl)
    for gi in range(ng):
        a0 = zero_f32x16(); a1 = zero_f32x16(); a2 = zero_f32x16(); a3 = zero_f32x16()  # noqa: E702
        a4 = zero_f32x16(); a5 = zero_f32x16(); a6 = zero_f32x16(); a7 = zero_f32x16()  # noqa: E702
        for s in range(nsplit):
            so = s * KX
            for c in range(nb):
                o = base + gi * gstride + c * 64
                prefetch_l2(w, o + PF_DIST)
                A, B = _dec(load_u8x64(w, o), th0, th1, tl0, tl1, sg)
                k = so + 4 * c
                a0 = _op(a0, A, B, xs, x0 + k); a1 = _op(a1, A, B, xs, x1 + k)  # noqa: E702
                a2 = _op(a2, A, B, xs, x2 + k); a3 = _op(a3, A, B, xs, x3 + k)  # noqa: E702
                a4 = _op(a4, A, B, xs, x4 + k); a5 = _op(a5, A, B, xs, x5 + k)  # noqa: E702
                a6 = _op(a6, A, B, xs, x6 + k); a7 = _op(a7, A, B, xs, x7 + k)  # noqa: E702
        r = gi * TILE * RG
        store_f32x16(res, r, a0); store_f32x16(res, r + 16, a1); store_f32x16(res, r + 32, a2)  # noqa: E702
        store_f32x16(res, r + 48, a3); store_f32x16(res, r + 64, a4); store_f32x16(res, r + 80, a5)  # noqa: E702
        store_f32x16(res, r + 96, a6); store_f32x16(res, r + 112, a7)  # noqa: E702


@njit(**_NB_OPTS)
def _t12(w, base, ng, gstride, nb, xs, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, KX, nsplit, tbl, res):
    """Twelve tokens, one accumulator each (a K2 prefill gives each expert ~11)."""
    th0, th1, tl0, tl1, sg = _tables(tbl)
    for gi in range(ng):
        a0 = zero_f32x16(); a1 = zero_f32x16(); a2 = zero_f32x16(); a3 = zero_f32x16()  # noqa: E702
        a4 = zero_f32x16(); a5 = zero_f32x16(); a6 = zero_f32x16(); a7 = zero_f32x16()  # noqa: E702
        a8 = zero_f32x16(); a9 = zero_f32x16(); a10 = zero_f32x16(); a11 = zero_f32x16()  # noqa: E702
        for s in range(nsplit):
            so = s * KX
            for c in range(nb):
                o = base + gi * gstride + c * 64
                prefetch_l2(w, o + PF_DIST)
                A, B = _dec(load_u8x64(w, o), th0, th1, tl0, tl1, sg)
                k = so + 4 * c
                a0 = _op(a0, A, B, xs, x0 + k); a1 = _op(a1, A, B, xs, x1 + k)  # noqa: E702
                a2 = _op(a2, A, B, xs, x2 + k); a3 = _op(a3, A, B, xs, x3 + k)  # noqa: E702
                a4 = _op(a4, A, B, xs, x4 + k); a5 = _op(a5, A, B, xs, x5 + k)  # noqa: E702
                a6 = _op(a6, A, B, xs, x6 + k); a7 = _op(a7, A, B, xs, x7 + k)  # noqa: E702
                a8 = _op(a8, A, B, xs, x8 + k); a9 = _op(a9, A, B, xs, x9 + k)  # noqa: E702
                a10 = _op(a10, A, B, xs, x10 + k); a11 = _op(a11, A, B, xs, x11 + k)  # noqa: E702
        r = gi * TILE * RG
        store_f32x16(res, r, a0); store_f32x16(res, r + 16, a1); store_f32x16(res, r + 32, a2)  # noqa: E702
        store_f32x16(res, r + 48, a3); store_f32x16(res, r + 64, a4); store_f32x16(res, r + 80, a5)  # noqa: E702
        store_f32x16(res, r + 96, a6); store_f32x16(res, r + 112, a7); store_f32x16(res, r + 128, a8)  # noqa: E702
        store_f32x16(res, r + 144, a9); store_f32x16(res, r + 160, a10); store_f32x16(res, r + 176, a11)  # noqa: E702


@njit(**_NB_OPTS)
def _t16(w, base, ng, gstride, nb, xs, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, KX,
         nsplit, tbl, res):
    """Sixteen tokens, one accumulator each."""
    th0, th1, tl0, tl1, sg = _tables(tbl)
    for gi in range(ng):
        a0 = zero_f32x16(); a1 = zero_f32x16(); a2 = zero_f32x16(); a3 = zero_f32x16()  # noqa: E702
        a4 = zero_f32x16(); a5 = zero_f32x16(); a6 = zero_f32x16(); a7 = zero_f32x16()  # noqa: E702
        a8 = zero_f32x16(); a9 = zero_f32x16(); a10 = zero_f32x16(); a11 = zero_f32x16()  # noqa: E702
        a12 = zero_f32x16(); a13 = zero_f32x16(); a14 = zero_f32x16(); a15 = zero_f32x16()  # noqa: E702
        for s in range(nsplit):
            so = s * KX
            for c in range(nb):
                o = base + gi * gstride + c * 64
                prefetch_l2(w, o + PF_DIST)
                A, B = _dec(load_u8x64(w, o), th0, th1, tl0, tl1, sg)
                k = so + 4 * c
                a0 = _op(a0, A, B, xs, x0 + k); a1 = _op(a1, A, B, xs, x1 + k)  # noqa: E702
                a2 = _op(a2, A, B, xs, x2 + k); a3 = _op(a3, A, B, xs, x3 + k)  # noqa: E702
                a4 = _op(a4, A, B, xs, x4 + k); a5 = _op(a5, A, B, xs, x5 + k)  # noqa: E702
                a6 = _op(a6, A, B, xs, x6 + k); a7 = _op(a7, A, B, xs, x7 + k)  # noqa: E702
                a8 = _op(a8, A, B, xs, x8 + k); a9 = _op(a9, A, B, xs, x9 + k)  # noqa: E702
                a10 = _op(a10, A, B, xs, x10 + k); a11 = _op(a11, A, B, xs, x11 + k)  # noqa: E702
                a12 = _op(a12, A, B, xs, x12 + k); a13 = _op(a13, A, B, xs, x13 + k)  # noqa: E702
                a14 = _op(a14, A, B, xs, x14 + k); a15 = _op(a15, A, B, xs, x15 + k)  # noqa: E702
        r = gi * TILE * RG
        store_f32x16(res, r, a0); store_f32x16(res, r + 16, a1); store_f32x16(res, r + 32, a2)  # noqa: E702
        store_f32x16(res, r + 48, a3); store_f32x16(res, r + 64, a4); store_f32x16(res, r + 80, a5)  # noqa: E702
        store_f32x16(res, r + 96, a6); store_f32x16(res, r + 112, a7); store_f32x16(res, r + 128, a8)  # noqa: E702
        store_f32x16(res, r + 144, a9); store_f32x16(res, r + 160, a10); store_f32x16(res, r + 176, a11)  # noqa: E702
        store_f32x16(res, r + 192, a12); store_f32x16(res, r + 208, a13); store_f32x16(res, r + 224, a14)  # noqa: E702
        store_f32x16(res, r + 240, a15)


@njit(**_NB_OPTS)
def _tile(w, base, ng, gstride, nb, xs, xbase, stride, KX, ne, nsplit, tbl, res, j0):
    """The next token tile: tokens j0 .. j0 + nj of the ne (activations at xs[xbase + j * stride]) through ng row
    groups.  Up to 16 remaining tokens go in one tile of the narrowest width that holds them, whose spare columns
    repeat its last token; more take a 16-wide tile first.  Writes res[(g * TILE + j) * 16 + r] for j < nj and
    returns nj."""
    rem = ne - j0
    nj = min(rem, TILE)
    o = xbase + j0 * stride
    last = o + (nj - 1) * stride
    if nj == 1:
        _t1(w, base, ng, gstride, nb, xs, o, KX, nsplit, tbl, res)
    elif nj == 2:
        _t2(w, base, ng, gstride, nb, xs, o, last, KX, nsplit, tbl, res)
    elif nj <= 4:
        _t4(w, base, ng, gstride, nb, xs, o, o + stride, min(o + 2 * stride, last), last, KX, nsplit, tbl, res)
    elif nj <= 8:
        _t8(w, base, ng, gstride, nb, xs, o, o + stride, o + 2 * stride, o + 3 * stride, o + 4 * stride,
            min(o + 5 * stride, last), min(o + 6 * stride, last), last, KX, nsplit, tbl, res)
    elif nj <= 12:
        _t12(w, base, ng, gstride, nb, xs, o, o + stride, o + 2 * stride, o + 3 * stride, o + 4 * stride,
             o + 5 * stride, o + 6 * stride, o + 7 * stride, o + 8 * stride, min(o + 9 * stride, last),
             min(o + 10 * stride, last), last, KX, nsplit, tbl, res)
    else:
        _t16(w, base, ng, gstride, nb, xs, o, o + stride, o + 2 * stride, o + 3 * stride, o + 4 * stride,
             o + 5 * stride, o + 6 * stride, o + 7 * stride, o + 8 * stride, o + 9 * stride, o + 10 * stride,
             o + 11 * stride, o + 12 * stride, min(o + 13 * stride, last), min(o + 14 * stride, last), last, KX,
             nsplit, tbl, res)
    return nj


@njit(**_NB_OPTS)
def _prep_rows(src, RS, rows, i0, n, srow, nsplit, xs, x0, sx, KX):
    """Prepared activations of n tokens, token i (< n) from row r = rows[i0 + i] (or i0 + i when rows is empty)
    of src (row length RS, zero padded to whole vectors): xs[x0 + i sx + k] (hi) / xs[x0 + i sx + KX + k] (lo) =
    bf16 split of src[r, k] * srow[k // 128]."""
    nvec = RS // 16
    for i in range(n):
        r = rows[i0 + i] if rows.shape[0] else i0 + i
        so = r * RS
        xo = x0 + i * sx
        for v in range(nvec):
            k = v * 16
            x = mul_f32x16(load_f32x16(src, so + k), splat_f32x16(srow[k // SB]))
            h = cvt_f32_bf16(x)
            store_u16x16(xs, xo + k, h)
            if nsplit == 2:
                store_u16x16(xs, xo + KX + k, cvt_f32_bf16(sub_f32x16(x, bf16_to_f32(h))))


@njit(inline="always", **_NB_OPTS)
def _silu(g):
    return g / (np.float32(1.0) + _exp_f32(-g))


@njit(**_NBP_OPTS)
def _moe_fast(w1, w3, w2, s1, s3, s2, D, I, x, uniq, start, ptok, pw, nsplit, tbl, nw, out):
    T = x.shape[0]
    nu = uniq.shape[0]
    npairs = ptok.shape[0]
    DS = (D + 15) // 16 * 16        # activation row length: whole vectors, zero padded
    IS = (I + 15) // 16 * 16        # = the gate/up rows computed (16-row groups), the down input's row length
    # Per-token rows of the prepared bf16 activations are XPAD words longer than needed: a tile streams up to 16
    # of them at once, and a stride of a multiple of 4 KiB (K2's down projection: 2048 words) would put all the
    # streams in the same L1 sets.
    DX = DS + XPAD
    IX = IS + XPAD
    nb1 = (D + KALIGN - 1) // KALIGN * KALIGN // 4    # blocks per gate/up row group
    nb2 = (I + KALIGN - 1) // KALIGN * KALIGN // 4    # blocks per down row group
    nrb1 = (I + SB - 1) // SB
    nrb2 = (D + SB - 1) // SB
    nemax = 0
    for u in range(nu):
        nemax = max(nemax, start[u + 1] - start[u])
    xp = np.zeros((T, DS), np.float32)
    for t in prange(T):
        for j in range(D):
            xp[t, j] = x[t, j]
    xp = xp.ravel()
    hp = np.empty(npairs * IS, np.float32)      # silu(g) * u per (token, expert) pair
    noidx = np.empty(0, ptok.dtype)             # (_prep_rows: rows are consecutive pairs)
    # ---------------------------------------------------------------- phase A: gate/up, (expert, row block) tasks
    # Each of the nw workers (= threads) takes a contiguous range of tasks and keeps its own scratch.
    ntask = nu * nrb1
    for wk in prange(nw):
        sx = nsplit * DX
        xs = np.empty(2 * nemax * sx, np.uint16)   # [gate | up][pair][split][DX]
        g = np.empty(SB // RG * TILE * RG, np.float32)     # [group][token][row]
        uu = np.empty(SB // RG * TILE * RG, np.float32)
        for task in range(wk * ntask // nw, (wk + 1) * ntask // nw):
            u = task // nrb1
            rb = task - u * nrb1
            e = uniq[u]
            p0 = start[u]
            ne = start[u + 1] - p0
            r0 = rb * SB
            ng = (min(SB, IS - r0) + RG - 1) // RG
            _prep_rows(xp, DS, ptok, p0, ne, s1[e, rb], nsplit, xs, 0, sx, DX)
            _prep_rows(xp, DS, ptok, p0, ne, s3[e, rb], nsplit, xs, ne * sx, sx, DX)
            base = r0 // RG * nb1 * 64
            i = 0
            while i < ne:
                nj = _tile(w1[e], base, ng, nb1 * 64, nb1, xs, 0, sx, DX, ne, nsplit, tbl, g, i)
                _tile(w3[e], base, ng, nb1 * 64, nb1, xs, ne * sx, sx, DX, ne, nsplit, tbl, uu, i)
                for gi in range(ng):
                    for j in range(nj):
                        hb = (p0 + i + j) * IS + r0 + gi * RG
                        ro = (gi * TILE + j) * RG
                        for r in range(RG):             # vectorised: silu(g) * u
                            hp[hb + r] = _silu(g[ro + r]) * uu[ro + r]
                i += nj
    # ---------------------------------------------------------------- phase B: down, (row block, expert share) tasks
    # Each task sums its experts' outputs for one 128-row block of every token.  With fewer row blocks than
    # workers x 4 (small models) every worker takes its own share of the experts over all row blocks, and the
    # shares' partial sums are added at the end.
    nsh = 1 if nrb2 >= 4 * nw else nw
    part = np.empty((nsh - 1, T, D), np.float32)
    ntask = nrb2 * nsh
    for wk in prange(nw):
        acc = np.empty(T * SB, np.float32)
        res = np.empty(SB // RG * TILE * RG, np.float32)
        sx = nsplit * IX
        xs = np.empty(nemax * sx, np.uint16)
        for task in range(wk * ntask // nw, (wk + 1) * ntask // nw):
            sh = task // nrb2
            rb = task - sh * nrb2
            r0 = rb * SB
            nr = min(SB, D - r0)
            ng = (nr + RG - 1) // RG
            acc[:] = 0.0
            base = r0 // RG * nb2 * 64
            u1 = (sh + 1) * nu // nsh
            for u in range(sh * nu // nsh, u1):
                e = uniq[u]
                p0 = start[u]
                ne = start[u + 1] - p0
                if u + 1 < u1:   # the next expert's block is elsewhere: start its stream now
                    for off in range(0, min(PF_DIST, ng * nb2 * 64), 64):
                        prefetch_l2(w2[uniq[u + 1]], base + off)
                _prep_rows(hp, IS, noidx, p0, ne, s2[e, rb], nsplit, xs, 0, sx, IX)
                i = 0
                while i < ne:
                    nj = _tile(w2[e], base, ng, nb2 * 64, nb2, xs, 0, sx, IX, ne, nsplit, tbl, res, i)
                    for j in range(nj):
                        ao = ptok[p0 + i + j] * SB
                        wt = splat_f32x16(pw[p0 + i + j])
                        for gi in range(ng):
                            a = ao + gi * RG
                            store_f32x16(acc, a, add_f32x16(load_f32x16(acc, a),
                                                            mul_f32x16(wt, load_f32x16(res, (gi * TILE + j) * RG))))
                    i += nj
            dst = out if sh == 0 else part[sh - 1]
            for t in range(T):
                for r in range(nr):
                    dst[t, r0 + r] = acc[t * SB + r]
    if nsh > 1:
        for t in prange(T):
            for r in range(D):
                v = out[t, r]
                for sh in range(nsh - 1):
                    v += part[sh, t, r]
                out[t, r] = v
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
def _decode_group_f32(w, base, nb, buf):
    """Decode the 16-row group at byte offset ``base`` (nb blocks) into buf[16, 4 nb] float32, natural order."""
    K = nb * 4
    for c in range(nb):
        o = base + c * 64
        for b in range(64):
            row = 4 * (b >> 4) + ((b >> 1) & 3)
            col = 4 * c + 2 * ((b >> 3) & 1) + (b & 1)
            buf[row * K + col] = _e4m3_f32(w[o + b])


@njit(**_NBP_OPTS)
def _moe_portable(w1, w3, w2, s1, s3, s2, D, I, x, uniq, start, ptok, pw, out):
    T = x.shape[0]
    nu = uniq.shape[0]
    npairs = ptok.shape[0]
    Dp = (D + KALIGN - 1) // KALIGN * KALIGN
    Ip = (I + KALIGN - 1) // KALIGN * KALIGN
    nb1 = Dp // 4
    nb2 = Ip // 4
    bo = SB
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
        ng = (nr + RG - 1) // RG
        xs = np.zeros((2, ne, Dp), np.float32)
        for i in range(ne):
            t = ptok[p0 + i]
            for j in range(D):
                xs[0, i, j] = x[t, j] * s1[e, rb, j // bo]
                xs[1, i, j] = x[t, j] * s3[e, rb, j // bo]
        buf = np.empty(RG * Dp, np.float32)
        gu = np.zeros((2, ne, RG), np.float32)
        for gi in range(ng):
            base = (r0 // RG + gi) * nb1 * 64
            for m in range(2):
                _decode_group_f32(w1[e] if m == 0 else w3[e], base, nb1, buf)
                for i in range(ne):
                    for r in range(RG):
                        sacc = np.float32(0.0)
                        for j in range(Dp):
                            sacc += buf[r * Dp + j] * xs[m, i, j]
                        gu[m, i, r] = sacc
            for i in range(ne):
                for r in range(RG):
                    row = r0 + gi * RG + r
                    if row < I:
                        h[p0 + i, row] = _silu(gu[0, i, r]) * gu[1, i, r]
    for rb in prange(nrb2):
        r0 = rb * bo
        nr = min(bo, D - r0)
        ng = (nr + RG - 1) // RG
        acc = np.zeros((T, ng * RG), np.float32)
        buf = np.empty(RG * Ip, np.float32)
        for u in range(nu):
            e = uniq[u]
            p0 = start[u]
            ne = start[u + 1] - p0
            xs = np.zeros((ne, Ip), np.float32)
            for i in range(ne):
                for j in range(I):
                    xs[i, j] = h[p0 + i, j] * s2[e, rb, j // bo]
            for gi in range(ng):
                _decode_group_f32(w2[e], (r0 // RG + gi) * nb2 * 64, nb2, buf)
                for i in range(ne):
                    t = ptok[p0 + i]
                    wt = pw[p0 + i]
                    for r in range(RG):
                        sacc = np.float32(0.0)
                        for j in range(Ip):
                            sacc += buf[r * Ip + j] * xs[i, j]
                        acc[t, gi * RG + r] += wt * sacc
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
    with kernel_threads() as nthreads:
        if fast_path_available() and p.block == (128, 128):
            _moe_fast(p.w1, p.w3, p.w2, p.s1, p.s3, p.s2, p.hidden, p.inter, x, uniq, start, ptok, pw,
                      2 if get_precision(precision) == "bf16x2" else 1, _TBL, nthreads, out)
        else:
            _moe_portable_dispatch(p, x, uniq, start, ptok, pw, out)
    return out


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
