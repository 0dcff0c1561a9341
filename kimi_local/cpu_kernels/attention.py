"""MLA decode attention core on the CPU: one Numba call instead of ~30 torch ops per layer and token.

For one new token (batch 1, the absorbed form), :class:`kimi_local.model.MLA` hands over what its projections
produced -- the query heads ``q`` [H, Dn + Dr], the normalised latent ``c_kv`` [C] and the raw shared key
``k_pe`` [Dr] -- and gets back the attention output [H, Dv] before ``o_proj``.  In between, the same steps as
the module's torch code, in float32 (the CPU attention dtype):

* YaRN RoPE on the interleaved pairs of every query head's rope part and of ``k_pe`` (complex multiply by the
  position's rotation);
* the latent and the rotated key written to the KV cache at the position;
* ``q_lat[h] = q_nope[h] . W_kv_b[h, :Dn]`` (kv_b folded into the query), then scores against every cached
  ``[c_kv, k_pe]`` row with the softmax scale applied to the query, softmax, the probability-weighted sum of the
  cached latents, and ``o[h] = o_lat[h] . W_kv_b[h, Dn:]^T``.

A decode step of a small model spends its attention time in torch's per-op overhead (1-10 us per op, for
arithmetic that takes less than a microsecond); this kernel removes it.  Heads run in parallel when the work is
big enough to pay for waking threads (K2's 64 heads at long contexts), one thread otherwise.  The module's
torch code stays the reference (``tests/test_cpu_attention.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from .mathf import exp_f32
from .simd import bitcast_u32_f32

__all__ = ["mla_decode", "install", "PARALLEL_MIN_WORK"]

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


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as numpy (bf16 as its uint16 bits), no copy when contiguous."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


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
    if H * (pos + 1 + C) * C >= PARALLEL_MIN_WORK and H > 1:
        _decode_parallel(*args)
    else:
        _decode_serial(*args)
    return torch.from_numpy(out)


class _Fast:
    """An MLA module's decode fast path: None (the torch code runs) for what it does not cover (batches,
    several new tokens, no cache, other devices or cache dtypes, autograd)."""

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


def install(model: torch.nn.Module) -> int:
    """Give every MLA of ``model`` the Numba decode core; returns how many got it."""
    from kimi_local.cpu_kernels import install_fast
    from kimi_local.model import MLA
    return install_fast(model, MLA, _Fast)
