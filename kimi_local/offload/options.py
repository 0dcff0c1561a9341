"""Offload flags shared by every command that loads a model, and the expert backend they select."""

from __future__ import annotations

import argparse


def add_offload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offload")
    g.add_argument("--expert-ram", metavar="SIZE|PERCENT", default=None,
                   help="RAM budget for routed experts (e.g. 400GB, 30%%); below the experts' size the rest is read "
                        "from the checkpoint on disk on demand (default: all experts in RAM)")
    g.add_argument("--gpu-expert-slots", type=int, default=0, metavar="N",
                   help="per-layer expert-cache slots on the fast (GPU) tier (default 0: none)")
    g.add_argument("--gpu-tier", choices=["auto", "cuda", "emulate", "off"], default="auto",
                   help="fast tier for cached experts: CUDA, or 'emulate' (a CPU store with its own budget, for "
                        "machines without a GPU); auto = cuda when available and slots > 0")
    g.add_argument("--cache-policy", choices=["lru", "lfu", "predictive"], default="predictive",
                   help="expert-cache eviction/prefetch policy (default predictive)")
    g.add_argument("--trace-routing", metavar="FILE", default=None,
                   help="record routing (layer, position, experts) to FILE for `kimi-local cachesim`")


def wants_offload_runtime(args) -> bool:
    return bool(args.expert_ram or args.gpu_expert_slots or args.trace_routing or args.gpu_tier == "emulate")


def build_expert_backend(args, model_dir: str):
    """A backend name for the loader, or the offload runtime when any offload flag asks for one."""
    if not wants_offload_runtime(args):
        return args.expert_backend
    from kimi_local.offload.runtime import OffloadedExperts, OffloadOptions
    return OffloadedExperts.from_args(model_dir, OffloadOptions.from_args(args))
