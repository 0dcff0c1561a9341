"""The MoE router on the CPU: its logits and its selection step, one Numba call each instead of torch ops.

**Logits** (:func:`logits`).  A bf16 model's router multiplies bf16 activations by a bf16 weight in float32
(``F.linear(x.float(), w.float())``): every product is exact in float32, so ``vdpbf16ps`` (two exact products
added into a float32 accumulator) computes the same sums at twice the float32 FMA rate and without upcasting the
activations -- only the summation order differs, as between any two BLAS libraries.  The weight is kept once in
an outer-product layout (16 experts x one column pair per vector), and 8 tokens share each weight vector.
AVX-512 BF16 only, bf16 activations and weights only; anything else stays on torch.

**Selection** (:func:`select`).  Given the router's float32 scores (sigmoid or softmax of the logits, computed by
torch), the selection adds the correction bias, keeps the best ``topk_group`` groups when the model is
group-limited, takes the top ``num_experts_per_tok`` experts, reads their *unbiased* scores, normalises them and
applies ``routed_scaling_factor`` -- what :class:`kimi_local.model.Gate` does in torch.  torch's ``topk`` costs
~4 ns per candidate on CPU (0.8 ms for a 512-token prefill of a 384-expert layer); a pass that keeps the k best
in a small sorted list costs a fraction of that, and a decode step saves the per-op overheads.  Without groups
the pass first takes the k-th best of the 16-wide blocks' maxima, which no winner can be below, and then scans
only the blocks that reach it (~k of E / 16): 350 -> 110 us for that 512-token prefill.

Ties keep the lower expert id; a NaN score ranks above every number (as torch's ``topk`` ranks it).
:func:`install` hands the fast paths to every Gate of a CPU model; the Gate's torch code stays the reference
(``tests/test_cpu_router.py`` compares the two).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from . import as_numpy
from .fp8_moe import get_num_threads, kernel_threads
from .simd import (add_f32x16, bcast2_u16x32, dpbf16, have_avx512_bf16, load_u16x32, store_f32x16,
                   zero_f32x16)

__all__ = ["select", "logits", "pack_weight", "install", "PARALLEL_MIN_ROWS"]

PARALLEL_MIN_ROWS = 256   # below this the thread wake-up costs more than the work (decode: one row)

GROUP_TOP2_SUM = 0        # noaux_tc: a group's score is the sum of its two best choice values
GROUP_MAX = 1             # group_limited_greedy: its best value


@njit(inline="always", nogil=True, cache=True)
def _better(a, b):
    """a ranks above b: larger, or NaN over a number."""
    return a > b or (a != a and b == b)


@njit(inline="always", nogil=True, cache=True)
def _insert(vals, ids, n, k, v, j):
    """Insert (v, j) into the sorted (best first) list vals/ids of length n <= k; returns the new length.
    Equal values keep their order of arrival (the lower id first, as ids arrive in increasing order)."""
    if n == k:
        if not _better(v, vals[k - 1]):
            return n
        p = k - 1
    else:
        p = n
        n += 1
    while p > 0 and _better(v, vals[p - 1]):
        vals[p] = vals[p - 1]
        ids[p] = ids[p - 1]
        p -= 1
    vals[p] = v
    ids[p] = j
    return n


@njit(inline="always", nogil=True, cache=True)
def _select_row(s, bias, has_bias, n_group, topk_group, group_mode, k, norm, scale, idx_out, w_out,
                choice, gscore, gkeep, vals, ids, gv, gi):
    E = s.shape[0]
    nan = False
    for j in range(E):
        c = s[j] + bias[j] if has_bias else s[j]
        choice[j] = c
        nan |= c != c
    if n_group > 1:
        gsz = E // n_group
        top = 1 if group_mode == GROUP_MAX else 2
        for g in range(n_group):
            m = 0
            for j in range(g * gsz, (g + 1) * gsz):
                m = _insert(vals, ids, m, top, choice[j], j)
            gscore[g] = vals[0] + vals[1] if m == 2 else vals[0]
        m = 0
        for g in range(n_group):
            m = _insert(gv, gi, m, topk_group, gscore[g], g)
        for g in range(n_group):
            gkeep[g] = False
        for q in range(m):
            gkeep[gi[q]] = True
        n = 0
        for g in range(n_group):
            for j in range(g * gsz, (g + 1) * gsz):
                # groups left out rank as -inf (as the torch code masks them); kept ones by their value
                v = choice[j] if gkeep[g] else -np.inf
                n = _insert(vals, ids, n, k, v, j)
    elif E % 16 == 0 and E >= 16 * k and not nan:
        # The k-th best of the 16-wide blocks' maxima is at most the k-th best value (k distinct elements reach
        # it), so only blocks whose maximum reaches it can hold a winner: ~k blocks of E / 16 are scanned.
        nb = E // 16
        m = 0
        for b in range(nb):
            mx = choice[16 * b]
            for j in range(16 * b + 1, 16 * b + 16):
                mx = max(mx, choice[j])
            gscore[b] = mx
            m = _insert(gv, gi, m, k, mx, b)
        tau = gv[k - 1]
        n = 0
        for b in range(nb):
            if gscore[b] >= tau:
                for j in range(16 * b, 16 * b + 16):
                    if choice[j] >= tau:
                        n = _insert(vals, ids, n, k, choice[j], j)
    else:
        n = 0
        for j in range(E):
            n = _insert(vals, ids, n, k, choice[j], j)
    total = np.float32(0.0)
    for q in range(k):
        idx_out[q] = ids[q]
        w_out[q] = s[ids[q]]
        total += w_out[q]
    if norm:
        d = total + np.float32(1e-20)
        for q in range(k):
            w_out[q] = w_out[q] / d
    for q in range(k):
        w_out[q] = w_out[q] * scale


@njit(nogil=True, cache=True)
def _rows(scores, bias, has_bias, n_group, topk_group, group_mode, k, norm, scale, idx, w, t0, t1):
    """Rows t0 .. t1 - 1, with their scratch allocated once."""
    E = scores.shape[1]
    choice = np.empty(E, np.float32)
    gscore = np.empty(max(n_group, E // 16, 1), np.float32)      # group scores, or the 16-wide blocks' maxima
    gkeep = np.empty(max(n_group, 1), np.bool_)
    vals = np.empty(max(k, 2), np.float32)
    ids = np.empty(max(k, 2), np.int64)
    gv = np.empty(max(topk_group, k, 1), np.float32)
    gi = np.empty(max(topk_group, k, 1), np.int64)
    for t in range(t0, t1):
        _select_row(scores[t], bias, has_bias, n_group, topk_group, group_mode, k, norm, scale, idx[t], w[t],
                    choice, gscore, gkeep, vals, ids, gv, gi)


@njit(nogil=True, cache=True, parallel=True)
def _rows_parallel(scores, bias, has_bias, n_group, topk_group, group_mode, k, norm, scale, idx, w, chunk):
    N = scores.shape[0]
    for c in prange((N + chunk - 1) // chunk):
        _rows(scores, bias, has_bias, n_group, topk_group, group_mode, k, norm, scale, idx, w,
              c * chunk, min(N, (c + 1) * chunk))


def select(scores: torch.Tensor, bias, n_group: int, topk_group: int, group_mode: int, k: int, norm: bool,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [N, k] int64, weights [N, k] float32) from float32 CPU scores [N, E]; ``bias`` a float32
    numpy array [E] or None."""
    s = scores.detach().contiguous().numpy()
    N, E = s.shape
    idx = np.empty((N, k), np.int64)
    w = np.empty((N, k), np.float32)
    has_bias = bias is not None
    b = bias if has_bias else np.zeros(1, np.float32)
    a = (s, b, has_bias, n_group, topk_group, group_mode, k, bool(norm and k > 1), np.float32(scale), idx, w)
    if N >= PARALLEL_MIN_ROWS and get_num_threads() > 1:
        with kernel_threads():
            _rows_parallel(*a, 64)
    else:
        _rows(*a, 0, N)
    return torch.from_numpy(idx), torch.from_numpy(w)


# ------------------------------------------------------------------------------------------------- logits
def pack_weight(w: torch.Tensor) -> np.ndarray:
    """The router weight [E, D] (bf16) in the kernel's layout: [ceil(E/16), D/2, 32] bf16 words, vector
    (g, p) = experts 16g .. 16g + 15 x columns 2p, 2p + 1 (zero rows pad E to a multiple of 16)."""
    E, D = w.shape
    G = -(-E // 16)
    wb = torch.zeros(G * 16, D, dtype=torch.bfloat16)
    wb[:E] = w.detach().to("cpu", torch.bfloat16)
    a = as_numpy(wb).reshape(G, 16, D // 2, 2).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(a).reshape(G, D // 2, 32)


@njit(nogil=True, cache=True)
def _logit_rows(x, wp, E, out, t0, t1):
    """out[t, e] = x[t] . w[e] for tokens t0 .. t1 - 1: 8 tokens x 16 experts per register block (accumulators
    for 8 tokens), one token at a time for the rest."""
    N, D = x.shape
    G, P, _ = wp.shape
    xf = x.ravel()
    wf = wp.ravel()
    res = np.empty(16, np.float32)
    t = t0
    while t + 8 <= t1:
        o0 = t * D
        for g in range(G):
            a0 = zero_f32x16(); a1 = zero_f32x16(); a2 = zero_f32x16(); a3 = zero_f32x16()  # noqa: E702
            a4 = zero_f32x16(); a5 = zero_f32x16(); a6 = zero_f32x16(); a7 = zero_f32x16()  # noqa: E702
            wb = g * P * 32
            for p in range(P):
                v = load_u16x32(wf, wb + p * 32)
                k = o0 + 2 * p
                a0 = dpbf16(a0, v, bcast2_u16x32(xf, k)); a1 = dpbf16(a1, v, bcast2_u16x32(xf, k + D))  # noqa: E702
                a2 = dpbf16(a2, v, bcast2_u16x32(xf, k + 2 * D)); a3 = dpbf16(a3, v, bcast2_u16x32(xf, k + 3 * D))  # noqa: E702,E501
                a4 = dpbf16(a4, v, bcast2_u16x32(xf, k + 4 * D)); a5 = dpbf16(a5, v, bcast2_u16x32(xf, k + 5 * D))  # noqa: E702,E501
                a6 = dpbf16(a6, v, bcast2_u16x32(xf, k + 6 * D)); a7 = dpbf16(a7, v, bcast2_u16x32(xf, k + 7 * D))  # noqa: E702,E501
            for j, a in enumerate((a0, a1, a2, a3, a4, a5, a6, a7)):
                store_f32x16(res, 0, a)
                for r in range(min(16, E - 16 * g)):
                    out[t + j, 16 * g + r] = res[r]
        t += 8
    while t < t1:
        o0 = t * D
        for g in range(G):
            a0 = zero_f32x16(); a1 = zero_f32x16(); a2 = zero_f32x16(); a3 = zero_f32x16()  # noqa: E702
            wb = g * P * 32
            p = 0
            while p + 4 <= P:            # four accumulators hide the dot-product latency
                k = o0 + 2 * p
                a0 = dpbf16(a0, load_u16x32(wf, wb + p * 32), bcast2_u16x32(xf, k))
                a1 = dpbf16(a1, load_u16x32(wf, wb + p * 32 + 32), bcast2_u16x32(xf, k + 2))
                a2 = dpbf16(a2, load_u16x32(wf, wb + p * 32 + 64), bcast2_u16x32(xf, k + 4))
                a3 = dpbf16(a3, load_u16x32(wf, wb + p * 32 + 96), bcast2_u16x32(xf, k + 6))
                p += 4
            while p < P:
                a0 = dpbf16(a0, load_u16x32(wf, wb + p * 32), bcast2_u16x32(xf, o0 + 2 * p))
                p += 1
            store_f32x16(res, 0, add_f32x16(add_f32x16(a0, a1), add_f32x16(a2, a3)))
            for r in range(min(16, E - 16 * g)):
                out[t, 16 * g + r] = res[r]
        t += 1


@njit(nogil=True, cache=True, parallel=True)
def _logits_parallel(x, wp, E, out, chunk):
    N = x.shape[0]
    for c in prange((N + chunk - 1) // chunk):
        _logit_rows(x, wp, E, out, c * chunk, min(N, (c + 1) * chunk))


def logits(x: torch.Tensor, wp: np.ndarray, E: int) -> torch.Tensor:
    """float32 logits [N, E] of bf16 CPU activations x [N, D] (D even) against a :func:`pack_weight` weight."""
    xa = as_numpy(x.detach().contiguous())
    N = xa.shape[0]
    out = np.empty((N, E), np.float32)
    if N >= 32 and get_num_threads() > 1:
        with kernel_threads():
            _logits_parallel(xa, wp, E, out, 16)
    else:
        _logit_rows(xa, wp, E, out, 0, N)
    return torch.from_numpy(out)


class _Fast:
    """A Gate's fast path: float32 bias kept (refreshed if the parameter changes); None (the torch code runs)
    for what it does not cover (other devices or dtypes, autograd)."""

    def __init__(self, gate):
        from kimi_local.model import Derived
        a = gate.args
        self.gate = gate
        self.bias = Derived()
        self.wpack = Derived()
        grouped = a.n_group > 1 and a.topk_method in ("noaux_tc", "group_limited_greedy")
        self.n_group = a.n_group if grouped else 1
        self.topk_group = a.topk_group if grouped else 1
        self.group_mode = GROUP_TOP2_SUM if a.topk_method == "noaux_tc" else GROUP_MAX
        self.k = a.num_experts_per_tok
        self.norm = a.norm_topk_prob
        self.scale = a.routed_scaling_factor

    def logits(self, x: torch.Tensor):
        """float32 logits [N, E] of x [N, D], or None (the torch code runs): exact-product bf16 inputs only."""
        w = self.gate.weight
        if (x.device.type != "cpu" or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or x.ndim != 2
                or x.shape[1] % 2 or x.requires_grad or w.device.type != "cpu" or not have_avx512_bf16()):
            return None
        return logits(x, self.wpack.get(w, pack_weight), w.shape[0])

    def __call__(self, scores: torch.Tensor):
        if scores.device.type != "cpu" or scores.dtype != torch.float32 or scores.requires_grad or scores.ndim != 2:
            return None
        b = self.gate.e_score_correction_bias
        bias = None if b is None else self.bias.get(b, lambda t: t.detach().float().contiguous().numpy())
        return select(scores, bias, self.n_group, self.topk_group, self.group_mode, self.k, self.norm, self.scale)


def warmup() -> None:
    """Compile (or load from Numba's cache) the serial and parallel selection on a tiny input, so that a fresh
    install compiles at model load and never on the first prompt or token."""
    s = np.zeros((2, 8), np.float32)
    a = (s, np.zeros(8, np.float32), True, 2, 1, GROUP_TOP2_SUM, 2, True, np.float32(1.0),
         np.empty((2, 2), np.int64), np.empty((2, 2), np.float32))
    _rows(*a, 0, 2)
    _rows_parallel(*a, 1)
    if have_avx512_bf16():
        wp = pack_weight(torch.ones(16, 4, dtype=torch.bfloat16))
        x = np.zeros((9, 4), np.uint16)
        _logit_rows(x, wp, 16, np.empty((9, 16), np.float32), 0, 9)
        _logits_parallel(x, wp, 16, np.empty((9, 16), np.float32), 8)


def install(model: torch.nn.Module) -> int:
    """Give every router (Gate) of ``model`` the Numba selection (compiled now); returns how many got it."""
    from kimi_local.cpu_kernels import install_fast
    from kimi_local.model import Gate
    n = install_fast(model, Gate, _Fast)
    if n:
        warmup()
    return n
