"""`kimi-local bench kernels`: the CPU FP8 routed-expert kernels against this machine's read-bandwidth ceiling.

Full size (default): Kimi-K2 expert shapes (hidden 7168, moe_intermediate 2048; gate/up 2048x7168, down
7168x2048, FP8 + 128x128 scales), ``n_experts`` (>= 32) distinct synthetic experts cycled so every decode
streams its weights from DRAM (32 experts = 1.4 GB >> L3).

Figures (one run, same thread count throughout):
  decode            1 token x 8 experts (gate, up, SwiGLU, down) per call: weight bytes/s and s per MoE layer
  mem_read_gbps     streaming-read ceiling (membw.py), best of several passes (two loop variants) over >= 2 GiB,
                    sampled before and after the decode timing
  decode_bw_fraction = decode bytes/s / mem_read_gbps
  prefill           one MoE layer, 8 experts per token, ~11 tokens per expert (512 * n_experts / 384 tokens):
                    tokens/s and effective weight bytes/s = tokens * 8 * bytes per expert / time
  torch_reference   the same decode work through moe_forward_ref (dequantise + matmul), and the speed ratio
  compile_seconds   first-use compile (or cache load) time of every kernel (warmup())

Decode and prefill run in the activation precision of a default (bf16) model, ``"bf16"`` (see
``fp8_moe.precision_for``; ``fp8_moe.set_precision``, or ``--bf16x2`` when run as a module, forces another);
the prefill is also timed in the other precision (``prefill_other_precision``: float32 models use ``"bf16x2"``,
two dot products per weight).  Each figure records the precision it actually ran in.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from . import fp8_moe, membw, simd

from kimi_local.sysinfo import cpu_model, isa_flags

K2_HIDDEN, K2_INTER, TOPK = 7168, 2048, 8


def _synthetic_experts(n: int, hidden: int, inter: int, seed: int = 0) -> fp8_moe.PackedExperts:
    """Random non-NaN e4m3 bytes written straight into the packed arrays (layout is irrelevant for random
    data, and it avoids 1.4 GB of set_slot repacking), scales ~ 2^-8 so activations stay O(1)."""
    p = fp8_moe.PackedExperts.allocate(n, hidden, inter)
    rng = np.random.default_rng(seed)
    for a in (p.w1, p.w3, p.w2):
        for s in range(n):
            row = a[s]
            row[...] = rng.integers(0, 256, row.shape, dtype=np.uint8)
            row[(row & 0x7F) == 0x7F] = 0x00
    for a in (p.s1, p.s3, p.s2):
        a[...] = rng.uniform(0.5, 1.0, a.shape).astype(np.float32) * np.float32(2.0 ** -8)
    p.filled[:] = True
    return p


def _decode_calls(n_experts: int, n_calls: int):
    """Slot lists for successive 1-token decode calls: 8 distinct experts each, cycling through all slots."""
    order = np.arange(n_experts)
    out = []
    for i in range(n_calls):
        sl = np.array([order[(i * TOPK + j) % n_experts] for j in range(TOPK)], np.int32)
        out.append(sl.reshape(1, TOPK))
    return out


def bench_kernels(threads: int | None = None, quick: bool = False, n_experts: int = 32) -> dict:
    """Run the kernel benchmark; returns the JSON-able dict (keys: decode, mem_read_gbps, decode_bw_fraction,
    prefill, torch_reference, compile_seconds, plus extras)."""
    import torch

    prec = fp8_moe.get_precision(fp8_moe.precision_for(torch.bfloat16))
    other = "bf16x2" if prec == "bf16" else "bf16"
    fp8_moe.set_num_threads(threads)
    nthreads = fp8_moe.get_num_threads()
    if quick:
        hidden, inter, n_experts = 512, 256, max(TOPK, min(n_experts, 16))
        mem_bytes, mem_passes, dec_secs, n_torch = 64 << 20, 2, 0.2, 2
    else:
        hidden, inter = K2_HIDDEN, K2_INTER
        n_experts = max(n_experts, 32)
        mem_bytes, mem_passes, dec_secs, n_torch = 2 << 30, 4, 2.0, 2

    compile_s = fp8_moe.warmup()

    p = _synthetic_experts(n_experts, hidden, inter)
    bpe = p.expert_nbytes
    rng = np.random.default_rng(1)

    # the read ceiling is sampled before and after the decode timing (best of both): on a shared machine the
    # achievable DRAM rate drifts over seconds, and the ceiling must not be caught in a slow moment
    membuf = np.empty(mem_bytes // 8, np.uint64)
    membuf.fill(1)  # touch every page (no zero-page shortcut)
    mem_before = membw.mem_read_gbps(nthreads, passes=mem_passes, buf=membuf)

    # ------------------------------------------------------------------ decode
    x1 = rng.standard_normal((1, hidden)).astype(np.float32)
    w1 = np.full((1, TOPK), 1.0 / TOPK, np.float32)
    calls = _decode_calls(n_experts, max(n_experts // TOPK, 1) * 8)
    out = np.empty((1, hidden), np.float32)
    for sl in calls[: max(n_experts // TOPK, 1)]:   # one pass over all experts (page-in, steady state)
        fp8_moe.moe_forward(p, x1, sl, w1, out, precision=prec)
    times = []
    t_end = time.perf_counter() + dec_secs
    i = 0
    while time.perf_counter() < t_end or len(times) < 8:
        t0 = time.perf_counter()
        fp8_moe.moe_forward(p, x1, calls[i % len(calls)], w1, out, precision=prec)
        times.append(time.perf_counter() - t0)
        i += 1
    times = np.array(times)
    t_layer = float(np.median(times))
    dec_bytes = TOPK * bpe
    decode = {
        "seconds_per_moe_layer": t_layer,
        "seconds_per_moe_layer_best": float(times.min()),
        "weight_bytes_per_layer": dec_bytes,
        "weight_bytes_per_s": dec_bytes / t_layer,
        "gbps": dec_bytes / t_layer / 1e9,
        "gbps_best": dec_bytes / float(times.min()) / 1e9,
        "calls": int(len(times)),
        "precision": prec,
    }

    # ------------------------------------------------------------------ read ceiling (same thread count)
    mem_after = membw.mem_read_gbps(nthreads, passes=mem_passes, buf=membuf)
    mem = max(mem_before, mem_after)
    del membuf

    # ------------------------------------------------------------------ prefill
    n_tok = max(TOPK, int(round(512 * n_experts / 384)))
    xs = rng.standard_normal((n_tok, hidden)).astype(np.float32)
    slots = np.stack([rng.permutation(n_experts)[:TOPK] for _ in range(n_tok)]).astype(np.int32)
    ws = rng.random((n_tok, TOPK)).astype(np.float32)
    outp = np.empty((n_tok, hidden), np.float32)

    def time_prefill(precision: str) -> dict:
        fp8_moe.moe_forward(p, xs, slots, ws, outp, precision=precision)
        pt = []
        for _ in range(3 if not quick else 2):
            t0 = time.perf_counter()
            fp8_moe.moe_forward(p, xs, slots, ws, outp, precision=precision)
            pt.append(time.perf_counter() - t0)
        tp = float(min(pt))
        return {
            "tokens": n_tok,
            "tokens_per_expert": n_tok * TOPK / n_experts,
            "seconds": tp,
            "tokens_per_s": n_tok / tp,
            "effective_weight_bytes_per_s": n_tok * TOPK * bpe / tp,
            "effective_gbps": n_tok * TOPK * bpe / tp / 1e9,
            "precision": fp8_moe.get_precision(precision),
        }

    prefill = time_prefill(prec)
    prefill_other = time_prefill(other)

    # ------------------------------------------------------------------ torch reference (same decode work)
    tprev = torch.get_num_threads()
    torch.set_num_threads(nthreads)
    try:
        rt = []
        for j in range(n_torch):
            t0 = time.perf_counter()
            fp8_moe.moe_forward_ref(p, x1, calls[j % len(calls)], w1)
            rt.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(tprev)
    t_ref = float(min(rt))
    torch_reference = {
        "seconds_per_moe_layer": t_ref,
        "weight_bytes_per_s": dec_bytes / t_ref,
        "gbps": dec_bytes / t_ref / 1e9,
        "speedup_numba_over_torch": t_ref / t_layer,
    }

    return {
        "decode": decode,
        "mem_read_gbps": mem,
        "decode_bw_fraction": decode["gbps"] / mem,
        "prefill": prefill,
        "prefill_over_decode": prefill["effective_gbps"] / decode["gbps"],
        "prefill_other_precision": dict(prefill_other,
                                        over_decode=prefill_other["effective_gbps"] / decode["gbps"]),
        "torch_reference": torch_reference,
        "compile_seconds": compile_s,
        "mem_read_gbps_samples": [mem_before, mem_after],
        "threads": nthreads,
        "backend": "numba-avx512bf16" if fp8_moe.fast_path_available() else "numba-portable",
        "shapes": {"hidden": hidden, "inter": inter, "n_experts": n_experts, "topk": TOPK,
                   "bytes_per_expert": bpe, "quick": quick},
        "cpu_model": cpu_model(),
        "llvm_cpu": simd.host_cpu_name(),
        "isa_flags": isa_flags() or sorted(simd.host_features()),
        "numba_threading_layer": _threading_layer(),
    }


def _threading_layer() -> str:
    import numba
    try:
        return numba.threading_layer()
    except ValueError:
        return "not initialised"


if __name__ == "__main__":  # python -m kimi_local.cpu_kernels.bench [threads ...] [--quick] [--bf16|--bf16x2]
    import sys
    args = sys.argv[1:]
    quick = "--quick" in args
    for a in args:
        if a in ("--bf16", "--bf16x2"):
            fp8_moe.set_precision(a[2:])
    ths = [int(a) for a in args if a.isdigit()] or [None]
    for th in ths:
        print(json.dumps(bench_kernels(th, quick=quick), indent=1))
        sys.stdout.flush()
    os._exit(0)
