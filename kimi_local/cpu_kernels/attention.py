"""MLA attention cores on the CPU: Numba calls in place of the torch ops around the projections.

**Decode** (:func:`mla_decode`, one new token, batch 1, the absorbed form).  :class:`kimi_local.model.MLA` hands
over what its projections produced -- the query heads ``q`` [H, Dn + Dr], the normalised latent ``c_kv`` [C] and
the raw shared key ``k_pe`` [Dr] -- and gets back the attention output [H, Dv] before ``o_proj``.  In between,
the same steps as the module's torch code, in float32 (the CPU attention dtype):

* YaRN RoPE on the interleaved pairs of every query head's rope part and of ``k_pe`` (complex multiply by the
  position's rotation);
* the latent and the rotated key written to the KV cache at the position;
* ``q_lat[h] = q_nope[h] . W_kv_b[h, :Dn]`` (kv_b folded into the query), then scores against every cached
  ``[c_kv, k_pe]`` row with the softmax scale applied to the query, softmax, the probability-weighted sum of the
  cached latents, and ``o[h] = o_lat[h] . W_kv_b[h, Dn:]^T``.

A decode step of a small model spends its attention time in torch's per-op overhead (1-10 us per op, for
arithmetic that takes less than a microsecond); this kernel removes it.  Heads run in parallel when the work is
big enough to pay for waking threads (K2's 64 heads, long contexts), one thread otherwise.

**Prefill** (:func:`causal_prefill`, the naive form's core, batch 1): causal softmax attention of the new
queries over the keys ``[k_nope, k_pe]`` and values that kv_b_proj made of every cached latent, 4 queries x 32
keys at a time in registers, each query block stopping at the last key it may see -- about half the work of the
masked square product, and no score matrix in memory.

The module's torch code stays the reference (``tests/test_cpu_attention.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from . import as_numpy
from .fp8_moe import get_num_threads, kernel_threads
from .mathf import exp_f32
from .simd import (add_f32x16, bitcast_u32_f32, load_f32x16, max_f32x16, mul_f32x16, splat_f32x16, store_f32x16,
                   zero_f32x16)

__all__ = ["mla_decode", "causal_prefill", "install", "PARALLEL_MIN_WORK"]

PARALLEL_MIN_WORK = 1 << 16   # H * (T + C) * C multiply-adds above which heads are split over threads

# fastmath without nnan/ninf (the -inf of an empty softmax row, NaN inputs propagate as in torch); reassociation
# lets the dot products and sums vectorise
_FM = {"contract", "reassoc", "nsz", "arcp", "afn"}


def _f32(v):
    """A bf16 (as its uint16 bits) or float32 element as float32 (Numba-only helper)."""
    raise NotImplementedError


@overload(_f32, inline="always")
def _f32_impl(v):
    if v == types.uint16:
        return lambda v: bitcast_u32_f32(np.uint32(v) << np.uint32(16))
    return lambda v: np.float32(v)


@njit(inline="always", nogil=True, cache=True, fastmath=_FM)
def _rope(src, off, rot, dst):
    """dst[2i], dst[2i+1] = (src[off+2i] + i src[off+2i+1]) * (rot[i, 0] + i rot[i, 1])."""
    for i in range(rot.shape[0]):
        a = _f32(src[off + 2 * i])
        b = _f32(src[off + 2 * i + 1])
        c = rot[i, 0]
        d = rot[i, 1]
        dst[2 * i] = a * c - b * d
        dst[2 * i + 1] = a * d + b * c


@njit(nogil=True, cache=True, fastmath=_FM)
def _heads(q, kvpe, T, w, nope, vdim, scale, rot, out, h0, h1):
    """Heads h0 .. h1 - 1 (their scratch allocated once)."""
    C = w.shape[2]
    R = kvpe.shape[1] - C
    qcat = np.empty(C + R, np.float32)
    p = np.empty(T, np.float32)
    olat = np.empty(C, np.float32)
    qpe = np.empty(R, np.float32)
    for h in range(h0, h1):
        # q_lat = q_nope . W_kv_b[h, :nope]  (then the rope part), both times the softmax scale
        for c in range(C):
            qcat[c] = 0.0
        for d in range(nope):
            qd = _f32(q[h, d])
            for c in range(C):
                qcat[c] += qd * w[h, d, c]
        _rope(q[h], nope, rot, qpe)
        for c in range(C):
            qcat[c] = qcat[c] * scale
        for r in range(R):
            qcat[C + r] = qpe[r] * scale
        m = -np.inf
        for t in range(T):
            s = np.float32(0.0)
            for c in range(C + R):
                s += qcat[c] * kvpe[t, c]
            p[t] = s
            m = max(m, s)
        tot = np.float32(0.0)
        for t in range(T):
            e = exp_f32(p[t] - m)
            p[t] = e
            tot += e
        inv = np.float32(1.0) / tot
        for c in range(C):
            olat[c] = 0.0
        for t in range(T):
            pt = p[t] * inv
            for c in range(C):
                olat[c] += pt * kvpe[t, c]
        for v in range(vdim):
            s = np.float32(0.0)
            for c in range(C):
                s += olat[c] * w[h, nope + v, c]
            out[h, v] = s


@njit(nogil=True, cache=True)
def _write_cache(ckv, kpe, rot, kvpe, pos):
    C = ckv.shape[0]
    for c in range(C):
        kvpe[pos, c] = _f32(ckv[c])
    tmp = np.empty(kvpe.shape[1] - C, np.float32)
    _rope(kpe, 0, rot, tmp)
    for r in range(tmp.shape[0]):
        kvpe[pos, C + r] = tmp[r]


@njit(nogil=True, cache=True)
def _decode_serial(q, ckv, kpe, rot, kvpe, pos, w, nope, vdim, scale, out):
    _write_cache(ckv, kpe, rot, kvpe, pos)
    _heads(q, kvpe, pos + 1, w, nope, vdim, scale, rot, out, 0, q.shape[0])


@njit(nogil=True, cache=True, parallel=True)
def _decode_parallel(q, ckv, kpe, rot, kvpe, pos, w, nope, vdim, scale, out):
    _write_cache(ckv, kpe, rot, kvpe, pos)
    for h in prange(q.shape[0]):
        _heads(q, kvpe, pos + 1, w, nope, vdim, scale, rot, out, h, h + 1)


QB = 8   # queries per register block of the prefill scores and outputs


@njit(nogil=True, cache=True, fastmath=_FM, parallel=True)
def _causal(qn, qp, kvb, pe, start, scale, out):
    """Causal attention of S new queries (positions start .. start + S - 1) over T = start + S keys, every head:
    out[i, h] = softmax_t(scale * (qn[i, h] . kvb[t, h, :Dn] + qp[i, h] . pe[t]))  .  kvb[t, h, Dn:].

    Keys are transposed once ([H, Dn + Dr, T], zero padded to 16) and values gathered per head ([H, T, Dv]);
    scores are computed 16 keys x 4 queries at a time in registers, and each query block scores only the keys
    its last query sees (about half of the square when start = 0)."""
    S, H, Dn = qn.shape
    R = qp.shape[2]
    T = kvb.shape[0]
    Dv = kvb.shape[2] - Dn
    Dq = Dn + R
    Tp = (T + 15) // 16 * 16
    Dvp = (Dv + 15) // 16 * 16
    kt = np.zeros((H, Dq, Tp), np.float32)
    vt = np.zeros((H, T, Dvp), np.float32)
    for h in prange(H):
        for t in range(T):
            for d in range(Dn):
                kt[h, d, t] = kvb[t, h, d]
            for r in range(R):
                kt[h, Dn + r, t] = pe[t, r]
            for c in range(Dv):
                vt[h, t, c] = kvb[t, h, Dn + c]
    nqb = (S + QB - 1) // QB
    for task in prange(H * nqb):
        h = task // nqb
        i0 = (task - h * nqb) * QB
        nq = min(QB, S - i0)
        qs = np.empty((QB, Dq), np.float32)     # scaled queries; rows past nq repeat the last one
        for j in range(QB):
            i = i0 + min(j, nq - 1)
            for d in range(Dn):
                qs[j, d] = qn[i, h, d] * scale
            for r in range(R):
                qs[j, Dn + r] = qp[i, h, r] * scale
        nb = (start + i0 + nq + 15) // 16      # key blocks the block's last query sees
        sc = np.empty((QB, nb * 16), np.float32)
        W = nb * 16
        kbase = h * Dq * Tp
        for b in range(0, nb, 2):                # 8 queries x 2 key blocks per pass: 16 accumulators
            b1 = min(b + 1, nb - 1)              # (an odd last block is computed twice, stored once)
            a0 = zero_f32x16(); a1 = zero_f32x16(); a2 = zero_f32x16(); a3 = zero_f32x16()  # noqa: E702
            a4 = zero_f32x16(); a5 = zero_f32x16(); a6 = zero_f32x16(); a7 = zero_f32x16()  # noqa: E702
            c0 = zero_f32x16(); c1 = zero_f32x16(); c2 = zero_f32x16(); c3 = zero_f32x16()  # noqa: E702
            c4 = zero_f32x16(); c5 = zero_f32x16(); c6 = zero_f32x16(); c7 = zero_f32x16()  # noqa: E702
            for d in range(Dq):
                kv = load_f32x16(kt, kbase + d * Tp + b * 16)
                kw = load_f32x16(kt, kbase + d * Tp + b1 * 16)
                q = splat_f32x16(qs[0, d])
                a0 = add_f32x16(a0, mul_f32x16(q, kv)); c0 = add_f32x16(c0, mul_f32x16(q, kw))  # noqa: E702
                q = splat_f32x16(qs[1, d])
                a1 = add_f32x16(a1, mul_f32x16(q, kv)); c1 = add_f32x16(c1, mul_f32x16(q, kw))  # noqa: E702
                q = splat_f32x16(qs[2, d])
                a2 = add_f32x16(a2, mul_f32x16(q, kv)); c2 = add_f32x16(c2, mul_f32x16(q, kw))  # noqa: E702
                q = splat_f32x16(qs[3, d])
                a3 = add_f32x16(a3, mul_f32x16(q, kv)); c3 = add_f32x16(c3, mul_f32x16(q, kw))  # noqa: E702
                q = splat_f32x16(qs[4, d])
                a4 = add_f32x16(a4, mul_f32x16(q, kv)); c4 = add_f32x16(c4, mul_f32x16(q, kw))  # noqa: E702
                q = splat_f32x16(qs[5, d])
                a5 = add_f32x16(a5, mul_f32x16(q, kv)); c5 = add_f32x16(c5, mul_f32x16(q, kw))  # noqa: E702
                q = splat_f32x16(qs[6, d])
                a6 = add_f32x16(a6, mul_f32x16(q, kv)); c6 = add_f32x16(c6, mul_f32x16(q, kw))  # noqa: E702
                q = splat_f32x16(qs[7, d])
                a7 = add_f32x16(a7, mul_f32x16(q, kv)); c7 = add_f32x16(c7, mul_f32x16(q, kw))  # noqa: E702
            for j, (x, y) in enumerate(((a0, c0), (a1, c1), (a2, c2), (a3, c3), (a4, c4), (a5, c5), (a6, c6),
                                        (a7, c7))):
                store_f32x16(sc, j * W + b * 16, x)
                store_f32x16(sc, j * W + b1 * 16, y)
        inv = np.zeros(QB, np.float32)
        mx = np.empty(16, np.float32)
        for j in range(QB):
            if j >= nq:                           # padding rows: zero weights
                for t in range(W):
                    sc[j, t] = 0.0
                continue
            n = start + i0 + j + 1              # keys 0 .. start + i
            mv = splat_f32x16(np.float32(-np.inf))
            for b in range(n // 16):              # the max in vectors (a scalar max loop does not vectorise)
                mv = max_f32x16(load_f32x16(sc, j * W + b * 16), mv)
            store_f32x16(mx, 0, mv)
            m = np.float32(-np.inf)
            for r in range(16):
                m = max(m, mx[r])
            for t in range(n // 16 * 16, n):
                m = max(m, sc[j, t])
            tot = np.float32(0.0)
            for t in range(n):
                e = exp_f32(sc[j, t] - m)
                sc[j, t] = e
                tot += e
            for t in range(n, W):                 # keys this query does not see
                sc[j, t] = 0.0
            inv[j] = np.float32(1.0) / tot
        nlast = start + i0 + nq
        acc = np.empty((QB, Dvp), np.float32)
        ncb = Dvp // 16
        for cb in range(0, ncb, 2):              # 8 queries x 2 value blocks per pass: 16 accumulators
            cb1 = min(cb + 1, ncb - 1)
            o0 = zero_f32x16(); o1 = zero_f32x16(); o2 = zero_f32x16(); o3 = zero_f32x16()  # noqa: E702
            o4 = zero_f32x16(); o5 = zero_f32x16(); o6 = zero_f32x16(); o7 = zero_f32x16()  # noqa: E702
            p0 = zero_f32x16(); p1 = zero_f32x16(); p2 = zero_f32x16(); p3 = zero_f32x16()  # noqa: E702
            p4 = zero_f32x16(); p5 = zero_f32x16(); p6 = zero_f32x16(); p7 = zero_f32x16()  # noqa: E702
            vbase = h * T * Dvp
            for t in range(nlast):
                v = load_f32x16(vt, vbase + t * Dvp + cb * 16)
                u = load_f32x16(vt, vbase + t * Dvp + cb1 * 16)
                w = splat_f32x16(sc[0, t])
                o0 = add_f32x16(o0, mul_f32x16(w, v)); p0 = add_f32x16(p0, mul_f32x16(w, u))  # noqa: E702
                w = splat_f32x16(sc[1, t])
                o1 = add_f32x16(o1, mul_f32x16(w, v)); p1 = add_f32x16(p1, mul_f32x16(w, u))  # noqa: E702
                w = splat_f32x16(sc[2, t])
                o2 = add_f32x16(o2, mul_f32x16(w, v)); p2 = add_f32x16(p2, mul_f32x16(w, u))  # noqa: E702
                w = splat_f32x16(sc[3, t])
                o3 = add_f32x16(o3, mul_f32x16(w, v)); p3 = add_f32x16(p3, mul_f32x16(w, u))  # noqa: E702
                w = splat_f32x16(sc[4, t])
                o4 = add_f32x16(o4, mul_f32x16(w, v)); p4 = add_f32x16(p4, mul_f32x16(w, u))  # noqa: E702
                w = splat_f32x16(sc[5, t])
                o5 = add_f32x16(o5, mul_f32x16(w, v)); p5 = add_f32x16(p5, mul_f32x16(w, u))  # noqa: E702
                w = splat_f32x16(sc[6, t])
                o6 = add_f32x16(o6, mul_f32x16(w, v)); p6 = add_f32x16(p6, mul_f32x16(w, u))  # noqa: E702
                w = splat_f32x16(sc[7, t])
                o7 = add_f32x16(o7, mul_f32x16(w, v)); p7 = add_f32x16(p7, mul_f32x16(w, u))  # noqa: E702
            for j, (x, y) in enumerate(((o0, p0), (o1, p1), (o2, p2), (o3, p3), (o4, p4), (o5, p5), (o6, p6),
                                        (o7, p7))):
                store_f32x16(acc, j * Dvp + cb * 16, x)
                store_f32x16(acc, j * Dvp + cb1 * 16, y)
        for j in range(nq):
            for c in range(Dv):
                out[i0 + j, h, c] = acc[j, c] * inv[j]


def causal_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, kvb: torch.Tensor, pe: torch.Tensor, start_pos: int,
                   scale: float) -> torch.Tensor:
    """Attention output [S, H, Dv] float32 for S new tokens at positions start_pos.. (batch 1).

    q_nope [S, H, Dn] and q_pe [S, H, Dr] (rotated) float32; kvb [T, H, Dn + Dv] the keys' no-rope part and
    values (kv_b_proj of every cached latent); pe [T, Dr] the rotated shared keys; T = start_pos + S."""
    S, H, _ = q_nope.shape
    Dv = kvb.shape[2] - q_nope.shape[2]
    out = np.empty((S, H, Dv), np.float32)
    with kernel_threads():
        _causal(_np(q_nope), _np(q_pe), _np(kvb), _np(pe), start_pos, np.float32(scale), out)
    return torch.from_numpy(out)


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a C-contiguous numpy array (bf16 as its uint16 bits), no copy when contiguous."""
    return as_numpy(t.detach().contiguous())


def mla_decode(q: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, rot: torch.Tensor, kvpe: torch.Tensor,
               pos: int, w_kv_b: torch.Tensor, nope: int, v_dim: int, scale: float) -> torch.Tensor:
    """Attention output [H, v_dim] float32 for one token at position ``pos``.

    q [H, nope + Dr] and c_kv [C] / k_pe [Dr] in bf16 or float32; rot [Dr/2] complex64 (this position's
    rotation); kvpe the layer's cache rows [max_len, C + Dr] float32 (written at ``pos``); w_kv_b [H, nope +
    v_dim, C] float32."""
    qa = _np(q)
    H = qa.shape[0]
    C = w_kv_b.shape[2]
    rot_ri = torch.view_as_real(rot.reshape(-1)).numpy()
    kv = kvpe.numpy()
    out = np.empty((H, v_dim), np.float32)
    args = (qa, _np(c_kv).reshape(-1), _np(k_pe).reshape(-1), rot_ri, kv, pos, w_kv_b.detach().numpy(), nope, v_dim,
            np.float32(scale), out)
    if H * (pos + 1 + C) * C >= PARALLEL_MIN_WORK and H > 1 and get_num_threads() > 1:
        with kernel_threads():
            _decode_parallel(*args)
    else:
        _decode_serial(*args)
    return torch.from_numpy(out)


class _Fast:
    """An MLA module's fast paths (decode: ``__call__``, prefill: :meth:`prefill`): None (the torch code runs)
    for what they do not cover (batches, no cache, other devices or cache dtypes, autograd)."""

    def __init__(self, attn):
        self.attn = attn

    def __call__(self, q, c_kv, k_pe, rot, cache, start_pos):
        """q [1, 1, H, nope + Dr], c_kv [1, 1, C], k_pe [1, 1, Dr] -> [1, 1, H * v] float32, or None."""
        a = self.attn
        if (cache is None or q.device.type != "cpu" or q.requires_grad or q.shape[:2] != (1, 1)
                or (torch.is_grad_enabled() and a.kv_b_proj.weight.requires_grad)
                or cache.kvpe.dtype != torch.float32 or q.dtype not in (torch.bfloat16, torch.float32)
                or c_kv.dtype != q.dtype or k_pe.dtype != q.dtype):
            return None
        kvpe = cache.kvpe[a.layer_id, 0]
        if not kvpe.is_contiguous():
            return None
        o = mla_decode(q[0, 0], c_kv[0, 0], k_pe[0, 0], rot, kvpe, start_pos, a._kv_b_weight(torch.float32),
                       a.nope, a.v_dim, a.softmax_scale)
        return o.view(1, 1, -1)

    def prefill(self, q_nope, q_pe, kvb, pe_all, start_pos):
        """The naive form's causal core: q_nope [1, S, H, Dn], q_pe [1, S, H, Dr], kvb [1, T, H, Dn + Dv],
        pe_all [1, T, Dr] (float32) -> [1, S, H, Dv] float32, or None."""
        a = self.attn
        S, T = q_nope.shape[1], kvb.shape[1]
        if (q_nope.device.type != "cpu" or q_nope.shape[0] != 1 or T != start_pos + S
                or any(t.dtype != torch.float32 or t.requires_grad for t in (q_nope, q_pe, kvb, pe_all))):
            return None
        return causal_prefill(q_nope[0], q_pe[0], kvb[0], pe_all[0], start_pos, a.softmax_scale)[None]


def warmup(dtype: torch.dtype) -> None:
    """Compile (or load from Numba's cache) both cores for ``dtype`` activations on tiny shapes, so that a fresh
    install compiles at model load and never on the first prompt or token."""
    H, nope, R, C, dv = 2, 8, 8, 32, 8
    q = torch.zeros(H, nope + R, dtype=dtype)
    args = (_np(q), _np(torch.zeros(C, dtype=dtype)), _np(torch.zeros(R, dtype=dtype)),
            np.ones((R // 2, 2), np.float32), np.zeros((4, C + R), np.float32), 1,
            np.zeros((H, nope + dv, C), np.float32), nope, dv, np.float32(1.0), np.empty((H, dv), np.float32))
    _decode_serial(*args)
    _decode_parallel(*args)
    z = torch.zeros
    causal_prefill(z(3, H, nope), z(3, H, R), z(3, H, nope + dv), z(3, R), 0, 1.0)


def install(model: torch.nn.Module) -> int:
    """Give every MLA of ``model`` the Numba attention cores (compiled now); returns how many got them."""
    from kimi_local.cpu_kernels import install_fast
    from kimi_local.model import MLA
    n = install_fast(model, MLA, _Fast)
    if n:
        warmup(next(model.parameters()).dtype)
    return n
