"""``kimi-local cachesim``: replay a routing trace through expert-cache policies.

Reports, per policy and slot count, the hit rate of the per-layer cache and the bytes it moves per token: loads
into the cache (RAM->GPU for the GPU tier, disk->RAM for the disk tier) and misses (expert bytes the slower tier
computes from, i.e. the CPU's RAM reads).  Bytes per expert come from ``--model``'s config, else Kimi-K2's.

    kimi-local cachesim TRACE --slots 16 --policy all
    kimi-local cachesim --synthetic --skew 1.0 --locality 0.5 --tokens 1000 --sweep
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Optional

from kimi_local.config import ModelArgs
from kimi_local.errors import UserError
from kimi_local.offload.placement import format_bytes, kimi_k2_args, model_sizes
from kimi_local.offload.policies import POLICIES, CacheStats, LayeredCache
from kimi_local.offload.predictor import ExpertPredictor, PredictionStats
from kimi_local.offload.traces import RoutingTrace, SyntheticSpec, read_trace, synthetic_trace

DEFAULT_SWEEP = (8, 16, 24, 32, 48, 64, 96, 128)


@dataclass
class SimResult:
    """One replay: a policy at a slot count, with per-layer counters and (predictive) prediction figures."""

    policy: str
    slots: int
    tokens: int
    bytes_per_expert: int
    uploads_per_step: Optional[float]
    per_layer: dict[int, CacheStats]
    prediction: Optional[PredictionStats] = None
    seconds: float = 0.0

    @property
    def total(self) -> CacheStats:
        total = CacheStats()
        for s in self.per_layer.values():
            total = total + s
        return total

    def per_token(self, count: int) -> float:
        """``count`` experts' bytes divided over the replayed tokens."""
        return count * self.bytes_per_expert / self.tokens if self.tokens else 0.0

    def to_dict(self, per_layer: bool = True) -> dict:
        """JSON-ready figures; bytes per token are per decoded token across all layers."""
        t = self.total
        d = {
            "policy": self.policy, "slots": self.slots, "tokens": self.tokens,
            "bytes_per_expert": self.bytes_per_expert, "uploads_per_step": self.uploads_per_step,
            "hit_rate": t.hit_rate, "loads_per_token": t.loads / self.tokens if self.tokens else 0.0,
            "load_bytes_per_token": self.per_token(t.loads), "miss_bytes_per_token": self.per_token(t.misses),
            "total": t.to_dict(), "seconds": self.seconds,
        }
        if self.prediction is not None:
            d["prediction"] = self.prediction.to_dict() if per_layer else {
                "precision": self.prediction.precision(), "recall": self.prediction.recall()}
        if per_layer:
            d["per_layer"] = {str(l): s.to_dict() for l, s in sorted(self.per_layer.items())}
        return d


def simulate(trace: RoutingTrace, policy: str, slots: int, bytes_per_expert: int,
             uploads_per_step: Optional[float] = None, warmup: int = 0, use_hints: bool = True,
             prefetch_k: Optional[int] = None, policy_kwargs: Optional[dict] = None,
             predictor_kwargs: Optional[dict] = None) -> SimResult:
    """Replay ``trace`` through one cache per layer; counters exclude the first ``warmup`` token positions.

    The predictive policy prefetches ``prefetch_k`` (default top_k) experts predicted before each step, from the
    trace's recorded hints (if any and ``use_hints``) combined with online statistics.
    """
    t0 = time.perf_counter()
    caches = LayeredCache(policy, slots, trace.layers, **(policy_kwargs or {}))
    predictor = None
    if policy == "predictive":
        predictor = ExpertPredictor(trace.n_experts, trace.top_k, **(predictor_kwargs or {}))
    k = trace.top_k if prefetch_k is None else prefetch_k
    counting = warmup <= 0
    counted_positions: set[int] = set()
    for layer, positions, experts, hints in trace.steps():
        if not counting and max(positions) >= warmup:
            counting = True
            caches.reset_stats()
            if predictor is not None:
                predictor.stats.reset()
        cache = caches[layer]
        cache.begin_step(uploads_per_step)
        if predictor is not None:
            predicted = predictor.predict(layer, hints if use_hints else None, k=k)
            cache.prefetch(predicted)
            predictor.stats.record(layer, predicted, experts)
        for e in experts:
            cache.access(e)
        if predictor is not None:
            predictor.observe(layer, experts)
        if counting:
            counted_positions.update(positions)
    return SimResult(policy=policy, slots=slots, tokens=len(counted_positions), bytes_per_expert=bytes_per_expert,
                     uploads_per_step=uploads_per_step, per_layer=caches.stats_by_layer(),
                     prediction=predictor.stats if predictor is not None else None,
                     seconds=time.perf_counter() - t0)


def sweep(trace: RoutingTrace, policies: list[str], slot_counts: list[int], bytes_per_expert: int,
          **kwargs) -> list[SimResult]:
    """``simulate`` for every (slot count, policy) pair, slot-major."""
    return [simulate(trace, p, s, bytes_per_expert, **kwargs) for s in slot_counts for p in policies]


# ---------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kimi-local cachesim``."""
    parser.add_argument("trace", nargs="?", help="routing trace (.jsonl or .npz from --trace-routing)")
    parser.add_argument("--slots", default="16", metavar="N[,N...]", help="cache slots per layer (comma list)")
    parser.add_argument("--sweep", action="store_true",
                        help=f"sweep slots over {','.join(map(str, DEFAULT_SWEEP))} (capped at the expert count)")
    parser.add_argument("--policy", default="all", choices=[*POLICIES, "all"], help="cache policy (default all)")
    parser.add_argument("--uploads-per-step", type=float, default=None, metavar="N",
                        help="loads per layer per step, prefetch included; fractions are a rate (0.5 = one load "
                             "every other token per layer; default unlimited)")
    parser.add_argument("--warmup", type=int, default=0, metavar="N", help="leave the first N tokens out of counts")
    parser.add_argument("--model", metavar="DIR", help="bytes per expert from this config.json (default Kimi-K2)")
    parser.add_argument("--no-hints", action="store_true", help="ignore the trace's layer-ahead hints")
    parser.add_argument("--per-layer", action="store_true", help="also print hit rate per layer")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    syn = parser.add_argument_group("synthetic trace (K2 shape: 60 layers x 384 experts x top-8)")
    syn.add_argument("--synthetic", action="store_true", help="generate a synthetic trace instead of reading one")
    syn.add_argument("--tokens", type=int, default=1000, help="tokens (default 1000)")
    syn.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of expert popularity (default 1.0)")
    syn.add_argument("--locality", type=float, default=0.5,
                     help="chance a choice reuses one of the layer's recent experts (default 0.5)")
    syn.add_argument("--window", type=int, default=8, help="recent window in tokens for --locality (default 8)")
    syn.add_argument("--drift", type=float, default=0.0, help="per-token chance of a popularity swap (default 0)")
    syn.add_argument("--hint-accuracy", type=float, default=None, metavar="P",
                     help="simulate layer-ahead hints containing each used expert with probability P")
    syn.add_argument("--layers", type=int, default=60, help="MoE layers (default 60)")
    syn.add_argument("--experts", type=int, default=384, help="experts per layer (default 384)")
    syn.add_argument("--top-k", type=int, default=8, help="experts per token (default 8)")
    syn.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    syn.add_argument("--save-trace", metavar="FILE", help="also write the synthetic trace to FILE")


def _slot_counts(args: argparse.Namespace, n_experts: int) -> list[int]:
    """Slot counts from --sweep or --slots, validated."""
    if args.sweep:
        return [s for s in DEFAULT_SWEEP if s <= n_experts] or [n_experts]
    try:
        counts = [int(x) for x in str(args.slots).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--slots: expected integers like 16 or 8,16,32, got {args.slots!r}") from None
    if not counts or any(c < 0 for c in counts):
        raise UserError(f"--slots: expected non-negative integers, got {args.slots!r}")
    return counts


def run(args: argparse.Namespace) -> int:
    """Build or read the trace, replay it, print the results."""
    if args.synthetic == bool(args.trace):
        raise UserError("give a TRACE file or --synthetic (not both)")
    if args.synthetic:
        trace = synthetic_trace(SyntheticSpec(
            tokens=args.tokens, layers=list(range(1, args.layers + 1)), n_experts=args.experts, top_k=args.top_k,
            skew=args.skew, locality=args.locality, window=args.window, drift=args.drift,
            hint_accuracy=args.hint_accuracy, seed=args.seed))
        if args.save_trace:
            trace.save(args.save_trace)
    else:
        trace = read_trace(args.trace)
    if args.model:
        bpe = model_sizes(ModelArgs.from_model_dir(args.model)).bytes_per_expert
    else:
        bpe = model_sizes(kimi_k2_args()).bytes_per_expert
    if args.uploads_per_step is not None and args.uploads_per_step < 0:
        raise UserError("--uploads-per-step: must be >= 0")
    policies = list(POLICIES) if args.policy == "all" else [args.policy]
    counts = _slot_counts(args, trace.n_experts)
    results = sweep(trace, policies, counts, bpe, uploads_per_step=args.uploads_per_step, warmup=args.warmup,
                    use_hints=not args.no_hints)
    if args.json:
        print(json.dumps({"trace": {k: v for k, v in trace.meta.items() if k != "layers"} |
                          {"layers": len(trace.layers), "records": len(trace)},
                          "results": [r.to_dict(per_layer=args.per_layer) for r in results]}, indent=2))
        return 0
    print_results(trace, results, args.per_layer)
    return 0


def describe_trace(trace: RoutingTrace) -> str:
    """One line: shape and, for synthetic traces, their parameters."""
    text = (f"{len(trace.layers)} layers x {trace.n_experts} experts x top-{trace.top_k}, "
            f"{trace.n_tokens} tokens" + (", with hints" if trace.hints is not None else ""))
    syn = trace.meta.get("synthetic")
    if syn:
        text += " (synthetic: " + ", ".join(f"{k} {syn[k]}" for k in ("skew", "locality", "window", "drift",
                                                                       "hint_accuracy", "seed") if k in syn) + ")"
    return text


def print_results(trace: RoutingTrace, results: list[SimResult], per_layer: bool = False) -> None:
    """Rich tables: one row per (slots, policy); optionally hit rate per layer."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: wide enough that the table's columns are not truncated
        console = Console(width=120)
    table = Table(title=f"cachesim: {describe_trace(trace)}", title_justify="left")
    for col in ("slots", "policy", "hit rate", "loads/tok", "loaded/tok", "missed/tok", "pf used", "precision",
                "recall"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    last_slots = None
    for r in results:
        t = r.total
        p = r.prediction
        table.add_row(
            str(r.slots) if r.slots != last_slots else "", r.policy, f"{t.hit_rate:.1%}",
            f"{t.loads / r.tokens:.1f}" if r.tokens else "-", format_bytes(r.per_token(t.loads)),
            format_bytes(r.per_token(t.misses)),
            f"{t.prefetch_used / t.prefetch_loads:.0%}" if t.prefetch_loads else "-",
            f"{p.precision():.1%}" if p else "-", f"{p.recall():.1%}" if p else "-",
            end_section=False)
        last_slots = r.slots
    console.print(table)
    console.print("slots = per layer; loaded = bytes moved into the cache (RAM->GPU); missed = expert bytes the "
                  "slower tier computes (CPU reads from RAM); pf used = prefetched experts used; precision/recall "
                  "of the predictor" + (f"; loads capped at {results[0].uploads_per_step:g} per layer per step"
                                        if results and results[0].uploads_per_step is not None else ""),
                  highlight=False)
    if per_layer:
        first = results[0].slots
        chosen = [r for r in results if r.slots == first]
        lt = Table(title=f"hit rate per layer at {first} slots", title_justify="left")
        lt.add_column("layer", justify="right")
        for r in chosen:
            lt.add_column(r.policy, justify="right")
        for layer in trace.layers:
            lt.add_row(str(layer), *[f"{r.per_layer[layer].hit_rate:.1%}" for r in chosen])
        console.print(lt)
