"""Offload benchmarks: the disk tier under RAM budgets, the predictor on the model's own routing, and
cachesim sweeps on synthetic K2-shaped traces.  Used by ``kimi-local bench offload``."""

from __future__ import annotations

import time
from typing import Optional

import torch

from kimi_local.config import ModelArgs


def _decode_run(model, prompt: list[int], n_decode: int) -> float:
    """Greedy decode ``n_decode`` tokens after ``prompt``; returns decode tok/s."""
    cache = model.new_cache(len(prompt) + n_decode + 1)
    logits = model(torch.tensor([prompt]), 0, cache, last_only=True)
    pos = len(prompt)
    t0 = time.perf_counter()
    for _ in range(n_decode):
        t = int(logits[0, -1].argmax())
        logits = model(torch.tensor([[t]]), pos, cache, last_only=True)
        pos += 1
    return n_decode / (time.perf_counter() - t0)


def bench_disk_tier(model_dir: str, budgets=(None, "50%", "25%"), n_prompt: int = 64, n_decode: int = 32,
                    policy: str = "predictive") -> list[dict]:
    """Decode tok/s, RAM hit rate and disk bytes per token for each RAM budget, with and without prediction."""
    from kimi_local.checkpoint import load_model
    from kimi_local.offload.runtime import OffloadedExperts, OffloadOptions

    args = ModelArgs.from_model_dir(model_dir)
    prompt = [(i * 7919) % (args.vocab_size - 256) for i in range(n_prompt)]
    rows = []
    for budget in budgets:
        for prefetch in ((True, False) if budget else (True,)):
            ex = OffloadedExperts(args, OffloadOptions(expert_ram=budget, policy=policy, prefetch=prefetch))
            try:
                model = load_model(model_dir, expert_backend=ex)
                tok_s = _decode_run(model, prompt, n_decode)
                st = ex.stats()["total"]
            finally:
                ex.close()
            rows.append({"expert_ram": budget or "100%", "prefetch": prefetch, "decode_tok_s": tok_s,
                         "ram_hit_rate": st["ram_hit_rate"], "disk_bytes_per_token": st["disk_bytes_per_token"],
                         "prediction_precision": st["prediction_precision"] if prefetch else None,
                         "prediction_recall": st["prediction_recall"] if prefetch else None})
    return rows


def bench_predictor(model_dir: str, n_prompt: int = 64, n_decode: int = 48) -> dict:
    """Precision/recall of the layer-ahead predictor on the model's own routing (decode steps)."""
    from kimi_local.checkpoint import load_model
    from kimi_local.offload.runtime import OffloadedExperts, OffloadOptions

    args = ModelArgs.from_model_dir(model_dir)
    # A budget below 100% turns prediction on; fast-tier-free so only the predictor is measured.
    ex = OffloadedExperts(args, OffloadOptions(expert_ram="50%"))
    try:
        model = load_model(model_dir, expert_backend=ex)
        prompt = [(i * 104729) % (args.vocab_size - 256) for i in range(n_prompt)]
        _decode_run(model, prompt, n_decode)
        ps = ex.pred_stats
        return {"precision": ps.precision(), "recall": ps.recall(), "layers_predicted": len(args.moe_layer_ids) - 1,
                "decode_tokens": n_decode}
    finally:
        ex.close()


def bench_cachesim(tokens: int = 400, slots=(8, 16, 24, 32, 48, 64), seed: int = 0) -> list[dict]:
    """Hit rate vs slots per layer for each policy on a synthetic K2-shaped trace (60 x 384 x top-8)."""
    from kimi_local.offload.cachesim import sweep
    from kimi_local.offload.placement import kimi_k2_args, model_sizes
    from kimi_local.offload.policies import POLICIES
    from kimi_local.offload.traces import synthetic_trace

    trace = synthetic_trace(tokens=tokens, seed=seed)
    bpe = model_sizes(kimi_k2_args()).bytes_per_expert
    return [r.to_dict(per_layer=False) for r in sweep(trace, sorted(POLICIES), list(slots), bpe)]


def bench_offload(model_dir: Optional[str] = None, quick: bool = False) -> dict:
    from kimi_local.tiny import ensure_tiny

    model_dir = model_dir or ensure_tiny()
    n_decode = 8 if quick else 48
    return {
        "disk_tier": bench_disk_tier(model_dir, n_decode=n_decode, n_prompt=16 if quick else 64),
        "predictor": bench_predictor(model_dir, n_decode=n_decode, n_prompt=16 if quick else 64),
        "cachesim": bench_cachesim(tokens=40 if quick else 400, slots=(8, 16) if quick else (8, 16, 24, 32, 48, 64)),
    }
