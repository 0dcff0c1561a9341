"""The MoE router's selection step on the CPU: one Numba call instead of ~8 torch ops.

Given the router's float32 scores (sigmoid or softmax of the logits, computed by torch), the selection adds
the correction bias, keeps the best ``topk_group`` groups when the model is group-limited, takes the top
``num_experts_per_tok`` experts, reads their *unbiased* scores, normalises them and applies
``routed_scaling_factor`` -- what :class:`kimi_local.model.Gate` does in torch.  torch's ``topk`` costs
~4 ns per candidate on CPU (0.8 ms for a 512-token prefill of a 384-expert layer); a single pass that keeps
the k best in a small sorted list costs a fraction of that, and a decode step saves the per-op overheads.

Ties keep the lower expert id; a NaN score ranks above every number (as torch's ``topk`` ranks it).
:func:`install` hands the fast path to every Gate of a CPU model; the Gate's torch code stays the reference
(``tests/test_cpu_router.py`` compares the two).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .fp8_moe import get_num_threads, kernel_threads

__all__ = ["select", "install", "PARALLEL_MIN_ROWS"]

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
    for j in range(E):
        choice[j] = s[j] + bias[j] if has_bias else s[j]
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
    gscore = np.empty(max(n_group, 1), np.float32)
    gkeep = np.empty(max(n_group, 1), np.bool_)
    vals = np.empty(max(k, 2), np.float32)
    ids = np.empty(max(k, 2), np.int64)
    gv = np.empty(max(topk_group, 1), np.float32)
    gi = np.empty(max(topk_group, 1), np.int64)
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


class _Fast:
    """A Gate's fast path: float32 bias kept (refreshed if the parameter changes); None (the torch code runs)
    for what it does not cover (other devices or dtypes, autograd)."""

    def __init__(self, gate):
        from kimi_local.model import Derived
        a = gate.args
        self.gate = gate
        self.bias = Derived()
        grouped = a.n_group > 1 and a.topk_method in ("noaux_tc", "group_limited_greedy")
        self.n_group = a.n_group if grouped else 1
        self.topk_group = a.topk_group if grouped else 1
        self.group_mode = GROUP_TOP2_SUM if a.topk_method == "noaux_tc" else GROUP_MAX
        self.k = a.num_experts_per_tok
        self.norm = a.norm_topk_prob
        self.scale = a.routed_scaling_factor

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


def install(model: torch.nn.Module) -> int:
    """Give every router (Gate) of ``model`` the Numba selection (compiled now); returns how many got it."""
    from kimi_local.cpu_kernels import install_fast
    from kimi_local.model import Gate
    n = install_fast(model, Gate, _Fast)
    if n:
        warmup()
    return n
