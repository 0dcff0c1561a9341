"""``kimi-local bench`` (e2e): load, prefill, decode, the per-token time split, expert traffic, and the
comparison with Hugging Face transformers — on the model given by ``--model`` (default: the tiny demo model).
"""

from __future__ import annotations

import time
from typing import Callable


from kimi_local.bench.prompts import random_prompt

PREFILL_LENGTHS = (128, 512, 2048)
DECODE_CONTEXTS = (0, 512, 2048)
QUICK_PREFILL_LENGTHS = (16, 64)
QUICK_DECODE_CONTEXTS = (0, 64)


def expert_nbytes(args) -> int:
    """Checkpoint bytes of one routed expert (3 FP8 matrices + float32 block scales); 44,050,944 for K2."""
    D, I = args.hidden_size, args.moe_intermediate_size
    if not args.is_fp8:
        return 3 * D * I * 2
    b0, b1 = args.weight_block_size
    g = lambda r, c: (-(-r // b0)) * (-(-c // b1))  # noqa: E731
    return 3 * D * I + 4 * (2 * g(I, D) + g(D, I))


def _generate(engine, prompt: list[int], n_new: int) -> tuple[object, list[float]]:
    """Run one greedy generation (stop tokens off); returns (timings, per-chunk timestamps)."""
    from kimi_local.sampling import SamplingParams
    stamps, timings = [], None
    for ch in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=n_new, stop_token_ids=[])):
        stamps.append(time.perf_counter())
        if ch.timings is not None:
            timings = ch.timings
    return timings, stamps


def _fit(n: int, ctx: int, reserve: int) -> int:
    return max(1, min(n, ctx - reserve - 1))


def run_e2e(args, *, quick: bool, log: Callable[[str], None], mem_read_gbps: Callable[[int], float]) -> dict:
    from kimi_local.bench.split import DecodeSplit
    from kimi_local.cli_common import apply_threads, load_from_args
    from kimi_local.engine import Engine

    threads = apply_threads(args.threads)
    out: dict = {"threads": threads, "quick": quick}

    # ------------------------------------------------------------------ load
    log("e2e: loading the model ...")
    t0 = time.perf_counter()
    model_dir, model, tok = load_from_args(args)
    engine = Engine(model, tok, ctx=args.ctx)
    ready = time.perf_counter() - t0
    margs = model.args
    load_s = getattr(model, "load_seconds", None)
    load_b = getattr(model, "load_bytes", None)
    out["model"] = {"dir": model_dir, "hidden_size": margs.hidden_size, "layers": margs.num_hidden_layers,
                    "moe_layers": len(margs.moe_layer_ids), "n_routed_experts": margs.n_routed_experts,
                    "experts_per_token": margs.num_experts_per_tok, "dtype": args.dtype, "device": args.device,
                    "expert_backend": type(model.experts).__name__, "ctx": engine.ctx_len}
    out["load"] = {"seconds_to_ready": ready, "load_seconds": load_s, "bytes": load_b,
                   "bytes_per_s": (load_b / load_s) if load_s and load_b else None,
                   "compile_seconds": getattr(model.experts, "compile_seconds", None)}
    ctx = engine.ctx_len
    vocab = engine._n_vocab
    n_new = 8 if quick else 32
    reps = 1 if quick else 3

    # ------------------------------------------------------------------ prefill
    lengths = QUICK_PREFILL_LENGTHS if quick else PREFILL_LENGTHS
    engine.reset()
    _generate(engine, random_prompt(8, vocab, 99), 2)   # warm-up (allocator, lazy init)
    prefill = []
    for n in lengths:
        m = _fit(n, ctx, 1)
        prompt = random_prompt(m, vocab, 1)
        rates = []
        for _ in range(reps):
            engine.reset()
            timings, _ = _generate(engine, prompt, 1)
            rates.append(timings.prefill_tok_s)
        rates.sort()
        prefill.append({"requested_tokens": n, "prompt_tokens": m, "tok_s": rates[len(rates) // 2],
                        "tok_s_best": rates[-1], "runs": reps})
        log(f"e2e: prefill {m:5d} tokens: {rates[len(rates) // 2]:9.1f} tok/s")
    out["prefill"] = prefill

    # ------------------------------------------------------------------ decode (+ split, traffic)
    bpe = expert_nbytes(margs)
    contexts = QUICK_DECODE_CONTEXTS if quick else DECODE_CONTEXTS
    decode = []
    for c in contexts:
        m = _fit(max(1, c), ctx, n_new)
        prompt = random_prompt(m, vocab, 2)
        engine.reset()
        rates, stamp_rates = [], []
        for _ in range(reps):
            # The cached prompt is reused on repeats (only its last token is recomputed): decode sees context m.
            timings, stamps = _generate(engine, prompt, n_new)
            rates.append(timings.decode_tok_s)
            if len(stamps) > 1:
                stamp_rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        rates.sort()
        # One more run with the timing hooks in: where the time goes.
        from kimi_local.sampling import SamplingParams
        with DecodeSplit(engine) as split:
            gen = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=n_new, stop_token_ids=[]))
            first = last = None
            count = 0
            for ch in gen:
                now = time.perf_counter()
                if first is None:
                    first = now
                    split.reset()          # the window starts after prefill and the first sample
                else:
                    count += 1
                last = now
            box = split.totals(last - first, count)
        ram_bytes_tok = box["ram_expert_reads_per_token"] * bpe
        fast_bytes_tok = box["fast_expert_reads_per_token"] * bpe
        kernel_s_tok = box["per_token_seconds"]["routed_cpu"]
        entry = {
            "context": c, "prompt_tokens": m, "new_tokens": n_new,
            "tok_s": rates[len(rates) // 2], "tok_s_best": rates[-1],
            "tok_s_first_to_last": (sorted(stamp_rates)[len(stamp_rates) // 2] if stamp_rates else None),
            "runs": reps,
            "split": box,
            "instrumented_tok_s": 1.0 / box["seconds_per_token"] if box["seconds_per_token"] > 0 else None,
            "expert_traffic": {
                "bytes_per_expert": bpe,
                "ram_bytes_per_token": ram_bytes_tok,
                "gpu_bytes_per_token": fast_bytes_tok,
                "disk_bytes_per_token": box["disk_bytes_per_token"],
                "ram_to_gpu_bytes_per_token": box["fast_upload_bytes_per_token"],
                "routed_cpu_gbps": (ram_bytes_tok / kernel_s_tok / 1e9) if kernel_s_tok > 0 else None,
            },
        }
        decode.append(entry)
        log(f"e2e: decode at context {m:5d}: {entry['tok_s']:8.2f} tok/s "
            f"(routed CPU {kernel_s_tok * 1e3:.2f} ms/token, {ram_bytes_tok / 1e6:.2f} MB/token)")
    out["decode"] = decode

    # ------------------------------------------------------------------ DRAM ceiling, same run
    mem = mem_read_gbps(threads)
    ref = decode[0]["expert_traffic"]
    for d in decode:
        g = d["expert_traffic"]["routed_cpu_gbps"]
        d["expert_traffic"]["dram_bw_fraction"] = (g / mem) if (g is not None and mem) else None
    out["mem_read_gbps"] = mem
    out["expert_traffic"] = {**ref, "dram_bw_fraction": decode[0]["expert_traffic"]["dram_bw_fraction"],
                             "context": decode[0]["prompt_tokens"],
                             "note": "routed-expert phase: RAM-tier expert bytes per token / time in the CPU "
                                     "kernels per token, against mem_read_gbps measured in this run"}
    offload_stats = getattr(model.experts, "stats", None)
    if offload_stats is not None:
        out["offload"] = offload_stats()

    # ------------------------------------------------------------------ vs Hugging Face transformers
    if getattr(args, "no_hf", False):
        out["compare_hf"] = {"available": False, "reason": "--no-hf", "prefill_ratio": None, "decode_ratio": None}
    else:
        from kimi_local.bench.hf_compare import compare
        from kimi_local.cli_common import dtype_of
        log("e2e: Hugging Face transformers comparison ...")
        res = compare(engine, model_dir, dtype_of(args), threads,
                      prefill_len=_fit(64 if quick else 512, ctx, 1),
                      decode_ctx=_fit(16 if quick else 128, ctx, n_new),
                      n_new=n_new, repeats=reps, log=log)
        out["compare_hf"] = res
        if res.get("available"):
            log(f"e2e: vs HF: prefill x{res['prefill_ratio']:.2f}, decode x{res['decode_ratio']:.2f}")
    close = getattr(model.experts, "close", None)
    if close is not None:
        close()
    trace_path = getattr(args, "trace_routing", None)
    if trace_path:   # the routing of every run above: replay it through the cache policies (hit rate vs size)
        from kimi_local.offload.cachesim import DEFAULT_SWEEP, sweep
        from kimi_local.offload.traces import read_trace
        trace = read_trace(trace_path)
        slots = [s for s in DEFAULT_SWEEP if s < trace.n_experts] or [trace.top_k]
        out["cache_sweep"] = [{"policy": r.policy, "slots": r.slots, "hit_rate": r.total.hit_rate}
                              for r in sweep(trace, ["lru", "lfu", "predictive"], slots, bpe)]
    return out
