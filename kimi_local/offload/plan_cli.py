"""``kimi-local plan``: print the GPU/RAM/disk placement plan for a model from its config.json alone.

The weights need not exist, so a user can check that Kimi-K2 fits a machine (this one, or one described by
``--profile`` and flags) before downloading a terabyte.
"""

from __future__ import annotations

import argparse
import json
import os

from kimi_local.config import ModelArgs
from kimi_local.errors import UserError
from kimi_local.offload.placement import (
    PlacementPlan, add_placement_arguments, format_bytes, placement_from_args,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kimi-local plan``."""
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory (only config.json is read) or the config.json itself")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_placement_arguments(parser)


def load_model_args(path: str) -> ModelArgs:
    """ModelArgs from a model directory or a direct path to its config.json."""
    if os.path.isfile(path):
        d = os.path.dirname(path) or "."
        if os.path.basename(path) != "config.json":
            raise UserError(f"{path}: expected a model directory or its config.json")
        return ModelArgs.from_model_dir(d)
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such model directory")
    return ModelArgs.from_model_dir(path)


def run(args: argparse.Namespace) -> int:
    """Compute and print the plan; exit status 1 when the verdict is 'bad'."""
    model = load_model_args(args.model)
    plan = placement_from_args(model, args)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan, title=f"Placement plan for {args.model}")
    return 1 if plan.verdict == "bad" else 0


def plan_rows(plan: PlacementPlan) -> list[tuple[str, str, str, str]]:
    """(section, item, value, note) rows of the human-readable plan."""
    s, m, o, src = plan.sizes, plan.machine, plan.options, plan.sources
    b = format_bytes
    per_slot = s.bytes_per_expert * s.n_moe_layers
    rows = [
        ("model", "routed experts", f"{s.n_moe_layers} layers x {s.n_routed_experts}, top-{s.top_k}",
         f"{s.n_moe_layers * s.n_routed_experts:,} experts"),
        ("model", "bytes per expert", f"{s.bytes_per_expert:,} B", "gate+up+down with block scales"),
        ("model", "routed weights, total", b(s.routed_total), b(s.routed_total, decimal=False)),
        ("model", "routed weights per token", b(s.routed_per_token), f"{s.n_moe_layers} x {s.top_k} experts"),
        ("model", "non-routed weights", b(s.nonrouted_total), "GPU side unless cpu-only"),
        *[("model", f"  {k.replace('_', ' ')}", b(v), "") for k, v in s.nonrouted.items() if v],
        ("model", "KV cache per token", f"{s.kv_bytes_per_token(o.kv_dtype):,} B", o.kv_dtype),
        ("machine", "GPU", f"{m.gpu_name}, {both(m.gpu_mem)}" if m.gpu_mem else "none", src.get("gpu_mem", "")),
        ("machine", "RAM", both(m.ram), src.get("ram", "")),
        ("machine", "CPU cores (physical)", str(m.cpu_cores), src.get("cpu_cores", "")),
        ("machine", "RAM bandwidth", f"{b(m.ram_bandwidth)}/s" if m.ram_bandwidth else "unknown",
         f"x {o.ram_efficiency:.0%} achieved" if m.ram_bandwidth else "--ram-bw"),
        ("machine", "disk bandwidth", f"{b(m.disk_bandwidth)}/s" if m.disk_bandwidth else "unknown",
         src.get("disk_bandwidth", "")),
        ("plan", "mode", plan.mode, "non-routed weights + KV on the GPU" if plan.mode == "gpu+cpu"
         else "everything in RAM, computed on the CPU"),
        ("plan", "context", f"{o.ctx:,} tokens", src.get("ctx", "")),
    ]
    if plan.mode == "gpu+cpu":
        rows += [
            ("GPU", "reserved", b(o.gpu_reserved), "CUDA context, activations"),
            ("GPU", "non-routed weights", b(plan.gpu_nonrouted), ""),
            ("GPU", "KV cache", b(plan.gpu_kv), f"max context that fits: {plan.max_ctx_on_gpu:,}"),
            ("GPU", "left for the expert cache", b(max(0, plan.gpu_free_for_experts)),
             f"{b(per_slot)} per slot (one expert in every MoE layer)"),
            ("GPU", "expert-cache slots per layer", f"{plan.gpu_expert_slots} of {s.n_routed_experts}",
             f"fit: {plan.gpu_slots_fit}" + (f", {src['gpu_expert_slots']}" if src.get("gpu_expert_slots") in
                                             ("flag", "profile") else "")),
        ]
    rows += [
        ("RAM", "reserved", b(o.ram_reserved), "OS and the rest"),
    ]
    if plan.ram_nonrouted:
        rows.append(("RAM", "non-routed weights + KV", b(plan.ram_nonrouted), "cpu-only mode"))
    rows += [
        ("RAM", "left for routed experts", b(max(0, plan.ram_available_for_experts)), ""),
        ("RAM", "routed-expert budget", b(plan.expert_ram), f"{plan.resident_fraction:.1%} of routed experts"),
        ("RAM", "tier", "all routed experts in RAM" if plan.tier == "ram" else "disk tier (misses read from disk)",
         "" if plan.tier == "ram" else f"{b(s.routed_total - plan.expert_ram)} stays on disk"),
    ]
    if plan.mode == "gpu+cpu":
        rows.append(("per token", "GPU expert hit rate", f"{plan.gpu_hit_rate:.1%}", src.get("gpu_hit_rate", "")
                     if o.gpu_hit_rate is not None else "no-locality floor: slots / experts"))
    rows.append(("per token", "read from RAM by the CPU", b(plan.ram_bytes_per_token),
                 "routed experts" + (" + non-routed weights" if plan.mode == "cpu-only" else "")))
    if plan.tier == "disk":
        rows += [
            ("per token", "RAM hit rate of routed experts", f"{plan.ram_hit_rate:.1%}",
             src.get("ram_hit_rate", "") if o.ram_hit_rate is not None else "no-locality floor: resident fraction"),
            ("per token", "read from disk", b(plan.disk_bytes_per_token), ""),
        ]
    rows.append(("per token", "decode ceiling",
                 f"{plan.decode_ceiling:.1f} tok/s" if plan.decode_ceiling is not None else "unknown",
                 f"bound by {plan.bound}" if plan.decode_ceiling is not None else "needs bandwidths"))
    return rows


def both(n: int) -> str:
    """A memory size in decimal and binary units: ``25.77 GB / 24.00 GiB``."""
    return f"{format_bytes(n)} / {format_bytes(n, decimal=False)}"


def print_plan(plan: PlacementPlan, title: str = "Placement plan") -> None:
    """Print the plan as a rich table followed by its verdict and notes."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: wide enough that the table's columns are not truncated
        console = Console(width=120)
    table = Table(title=title, title_justify="left")
    for col in ("", "item", "value", "note"):
        table.add_column(col)
    last = None
    for section, item, value, note in plan_rows(plan):
        table.add_row(section if section != last else "", item, value, note, end_section=False)
        last = section
    console.print(table)
    colour = {"ok": "green", "warn": "yellow", "bad": "red"}[plan.verdict]
    console.print(f"verdict: [{colour}]{plan.verdict}[/{colour}]")
    for note in plan.notes:
        console.print(f"  - {note}", highlight=False)
