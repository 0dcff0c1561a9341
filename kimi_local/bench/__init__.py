"""``kimi-local bench``: measured speed, honest comparisons, and a Kimi-K2 projection for this machine.

Modes (``kimi-local bench [MODE] [--json FILE] [--plot FILE.png] [--quick]``):

* ``e2e`` (default)  load, prefill tok/s at 128/512/2048 tokens, decode tok/s at contexts 0/512/2048, the per-token
                     time split, expert traffic per tier with the achieved fraction of the DRAM read ceiling
                     (measured in the same run), and ours/theirs ratios against Hugging Face transformers'
                     DeepseekV3 on the same model, prompts and threads (``compare_hf``).
* ``kernels``        the CPU FP8 expert kernels on full-size K2 expert shapes (kimi_local.cpu_kernels.bench).
* ``k2-layer``       one full-size K2 MoE layer (synthetic FP8 experts, as many as RAM allows) through the real
                     kernels and dispatch, and the projected full-model decode/prefill tok/s with a what-if table.
* ``load``           loader throughput from the page cache vs a plain sequential read, and peak RSS vs resident.
* ``offload``        the disk tier (decode tok/s, RAM hit rate and disk bytes per token at RAM budgets of
                     100/50/25% of the routed experts, with and without prediction), the layer-ahead
                     predictor's precision/recall on the model's own routing, and cachesim hit rate vs slots
                     per policy on a synthetic K2-shaped trace.
* ``all``            every mode above in one run.

Everything goes into one JSON document (schema: :mod:`kimi_local.bench.schema`); stdout gets a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

MODES = ("e2e", "kernels", "k2-layer", "load", "offload", "all")
GPUS = ("none", "4090", "h100")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kimi_local.cli_common import add_model_args

    parser.add_argument("mode", nargs="?", choices=MODES, default="e2e",
                        help="what to measure (default e2e; 'all' runs every mode)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON to FILE")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="draw decode tok/s vs context, the time split, and (with offload data) hit rate vs "
                             "cache size (needs matplotlib: pip install 'kimi-local[bench]')")
    parser.add_argument("--quick", action="store_true", help="CI-size run: small shapes, a few seconds per mode")
    parser.add_argument("--no-hf", action="store_true", help="e2e: skip the Hugging Face transformers comparison")
    g = parser.add_argument_group("k2-layer")
    g.add_argument("--k2-experts", type=int, default=None, metavar="N",
                   help="synthetic full-size experts to build (default: as many of 384 as 40%% of available RAM holds)")
    g.add_argument("--dram-gbps", type=float, action="append", default=None, metavar="X",
                   help="what-if: project for a machine with X GB/s DRAM read bandwidth (repeatable)")
    g.add_argument("--gpu", choices=GPUS, action="append", default=None,
                   help="what-if: GPU holding the non-routed weights (repeatable; default: all of none, 4090, h100)")
    g = parser.add_argument_group("kernels / load")
    g.add_argument("--n-experts", type=int, default=32, metavar="N",
                   help="kernels: distinct full-size experts cycled (>= 32 so weights stream from DRAM)")
    g.add_argument("--load-gb", type=float, default=None, metavar="GB",
                   help="load: size of the synthetic checkpoint (default 1.5 GB; quick 0.05 GB)")
    add_model_args(parser)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _MemRead:
    """The DRAM read ceiling (kimi_local.cpu_kernels.membw), measured once per thread count per run."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.cache: dict[int, float] = {}
        self.history: list[float] = []

    def __call__(self, threads: int, fresh: bool = False) -> float:
        """The ceiling at ``threads``; ``fresh`` measures again now (next to the figure it is compared with:
        the 2-thread ceiling swings with the neighbours' load) instead of reusing this run's earlier value."""
        if threads in self.cache and not fresh:
            return self.cache[threads]
        from kimi_local.cpu_kernels import membw
        nbytes, passes = ((64 << 20), 2) if self.quick else ((2 << 30), 4)
        v = membw.mem_read_gbps(threads, nbytes=nbytes, passes=passes)
        self.cache[threads] = v
        self.history.append(v)
        return v


def run(args) -> int:
    from kimi_local import __version__
    from kimi_local.bench.common import machine_info
    from kimi_local.bench.report import summary
    from kimi_local.bench.schema import validate
    from kimi_local.cli_common import apply_expert_precision, apply_threads

    modes = ("e2e", "kernels", "k2-layer", "load", "offload") if args.mode == "all" else (args.mode,)
    threads = apply_threads(args.threads)
    apply_expert_precision(args.expert_precision)   # every mode's kernels, not only those loading a model
    mem = _MemRead(args.quick)
    doc: dict = {
        "schema_version": 1,
        "kimi_local_version": __version__,
        "mode": args.mode,
        "quick": bool(args.quick),
        "command": "kimi-local bench " + " ".join(sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else []),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(threads),
    }
    t_all = time.perf_counter()
    for mode in modes:
        t0 = time.perf_counter()
        if mode == "e2e":
            from kimi_local.bench.e2e import run_e2e
            res = run_e2e(args, quick=args.quick, log=_log, mem_read_gbps=mem)
            doc["compare_hf"] = res.pop("compare_hf")
            doc["e2e"] = res
        elif mode == "kernels":
            from kimi_local.cpu_kernels.bench import bench_kernels
            _log("kernels: full-size K2 expert shapes ..." if not args.quick else "kernels: quick shapes ...")
            doc["kernels"] = bench_kernels(threads, quick=args.quick, n_experts=args.n_experts)
        elif mode == "k2-layer":
            from kimi_local.bench.k2layer import run_k2_layer
            res = run_k2_layer(args, threads=threads, quick=args.quick, log=_log, mem_read_gbps=mem)
            doc["k2_layer"] = res["k2_layer"]
            doc["k2_projection"] = res["k2_projection"]
        elif mode == "load":
            from kimi_local.bench.load import run_load
            doc["load"] = run_load(args, threads=threads, quick=args.quick, log=_log)
        elif mode == "offload":
            from kimi_local.cli_common import resolve_model_dir
            from kimi_local.offload.bench import bench_offload
            _log("offload: disk tier at RAM budgets, predictor, cachesim ...")
            doc["offload"] = bench_offload(resolve_model_dir(args.model), quick=args.quick)
        doc.setdefault("seconds", {})[mode] = time.perf_counter() - t0
    doc.setdefault("seconds", {})["total"] = time.perf_counter() - t_all
    if mem.history:
        doc["mem_read_gbps_measurements"] = mem.history   # every ceiling measured in this run, in order

    errors = validate(doc)
    if errors:  # a bug in the bench itself: say so loudly, but still write what was measured
        _log("bench: JSON does not match the schema:\n  " + "\n  ".join(errors[:10]))
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, default=_jsonable)
            f.write("\n")
    if args.plot:
        from kimi_local.bench.plot import plot
        msg = plot(doc, args.plot)
        if msg:
            _log(msg)
    print(summary(doc))
    return 1 if errors else 0


def _jsonable(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
