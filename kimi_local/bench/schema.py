"""The JSON schema of ``kimi-local bench`` output (all modes), and a small validator.

``SCHEMA`` is plain JSON Schema (draft 2020-12 subset: type, properties, required, items, minimum, enum), so
``jsonschema.validate(doc, SCHEMA)`` works where jsonschema is installed; :func:`validate` is a dependency-free
checker of the same subset plus the rule that each mode run has its section (``MODE_SECTIONS``).  Extra keys
are always allowed: the listed ones are the figures tracked over time.
"""

from __future__ import annotations

import math
from typing import Any

NUM = {"type": "number"}
NUM0 = {"type": "number", "minimum": 0}
POS = {"type": "number", "exclusiveMinimum": 0}
INT0 = {"type": "integer", "minimum": 0}
NUM_OR_NULL = {"type": ["number", "null"]}
STR = {"type": "string"}
BOOL = {"type": "boolean"}


def obj(required: dict, optional: dict | None = None) -> dict:
    props = dict(required)
    props.update(optional or {})
    return {"type": "object", "properties": props, "required": list(required)}


SPLIT_KEYS = ("attention", "router", "shared_expert", "routed_cpu", "routed_gpu", "transfers", "sampling", "other")

_split = obj({
    "seconds_per_token": NUM0,
    "per_token_seconds": obj({k: NUM0 for k in SPLIT_KEYS}, {"dense_mlp": NUM0}),
    "fraction": obj({k: NUM0 for k in SPLIT_KEYS}),
    "tokens": INT0,
})

_traffic = obj({
    "bytes_per_expert": INT0,
    "ram_bytes_per_token": NUM0,
    "gpu_bytes_per_token": NUM0,
    "disk_bytes_per_token": NUM0,
    "dram_bw_fraction": NUM_OR_NULL,
})

E2E = obj({
    "threads": INT0,
    "model": obj({"hidden_size": INT0, "layers": INT0, "n_routed_experts": INT0, "ctx": INT0}),
    "load": obj({"seconds_to_ready": NUM0, "bytes": {"type": ["integer", "null"]}, "bytes_per_s": NUM_OR_NULL}),
    "prefill": {"type": "array", "minItems": 1,
                "items": obj({"requested_tokens": INT0, "prompt_tokens": INT0, "tok_s": NUM0})},
    "decode": {"type": "array", "minItems": 1,
               "items": obj({"context": INT0, "prompt_tokens": INT0, "new_tokens": INT0, "tok_s": NUM0,
                             "split": _split, "expert_traffic": _traffic})},
    "mem_read_gbps": POS,
    "expert_traffic": _traffic,
})

COMPARE_HF = obj({"available": BOOL, "prefill_ratio": NUM_OR_NULL, "decode_ratio": NUM_OR_NULL},
                 {"ours_prefill_tok_s": NUM0, "hf_prefill_tok_s": NUM0, "ours_decode_tok_s": NUM0,
                  "hf_decode_tok_s": NUM0, "threads": INT0, "dtype": STR, "reason": STR})

KERNELS = obj({
    "decode": obj({"seconds_per_moe_layer": POS, "weight_bytes_per_layer": INT0, "weight_bytes_per_s": POS,
                   "gbps": POS}),
    "mem_read_gbps": POS,
    "decode_bw_fraction": NUM0,
    "prefill": obj({"tokens": INT0, "tokens_per_expert": NUM0, "seconds": POS, "tokens_per_s": POS,
                    "effective_gbps": POS, "precision": STR}),
    "prefill_other_precision": obj({"effective_gbps": POS, "precision": STR, "over_decode": POS}),
    "torch_reference": obj({"seconds_per_moe_layer": POS, "gbps": POS, "speedup_numba_over_torch": POS}),
    "compile_seconds": NUM0,
    "threads": INT0,
    "shapes": obj({"hidden": INT0, "inter": INT0, "n_experts": INT0}),
})

_nonrouted = obj({"device": STR, "decode_attention_seconds": POS, "decode_router_shared_seconds": POS,
                  "decode_weight_gbps": POS, "prefill_tokens": INT0, "prefill_attention_seconds": POS,
                  "prefill_router_shared_seconds": POS})

K2_LAYER = obj({
    "experts": INT0,
    "bytes_per_expert": INT0,
    "threads": INT0,
    "mem_read_gbps": POS,
    "decode": obj({"seconds_per_layer": POS, "weight_bytes_per_layer": INT0, "gbps": POS}),
    "decode_bw_fraction": NUM0,
    "decode_bw_fraction_bursts": {"type": "array", "items": NUM0, "minItems": 1},
    "decode_bw_fraction_vs_run_max": NUM0,
    "prefill": obj({"tokens": INT0, "tokens_per_expert": NUM0, "seconds": POS, "tokens_per_s": POS,
                    "effective_gbps": POS, "seconds_per_full_layer_512_tokens": POS}),
    "nonrouted_cpu": _nonrouted,
})

_formula = obj({"formula": STR, "inputs": {"type": "object"}})

K2_PROJECTION = obj({
    "decode_tok_s": POS,
    "prefill_tok_s": POS,
    "decode": obj({"seconds_per_token": POS, "formula": STR, "inputs": obj(
        {"t_attn": NUM0, "t_router_shared": NUM0, "t_routed": NUM0, "t_tail": NUM0})}),
    "prefill": obj({"seconds_per_512_token_prompt": POS, "formula": STR, "inputs": obj(
        {"t_attn_prefill": NUM0, "t_rs_prefill": NUM0, "t_routed_prefill": NUM0, "t_tail_prefill": NUM0})}),
    "nonrouted_on": STR,
    "constants": obj({"bytes_per_expert": INT0, "layers": INT0, "moe_layers": INT0}),
    "gpu_assumptions": {"type": "object"},
    "dram_assumptions": STR,
    "what_if": {"type": "array", "minItems": 1,
                "items": obj({"machine": STR, "dram_gbps": POS, "gpu": {"type": "string", "enum": ["none", "4090", "h100"]},
                              "decode_tok_s": POS, "prefill_tok_s": POS, "decode": _formula, "prefill": _formula})},
})

LOAD = obj({
    "checkpoint_bytes": INT0,
    "plain_read_bytes_per_s": POS,
    "load_bytes": INT0,
    "load_seconds": POS,
    "load_bytes_per_s": POS,
    "ratio_vs_plain_read": NUM0,
    "compile_seconds": NUM0,
    "resident_bytes": INT0,
    "baseline_rss_bytes": INT0,
    "peak_rss_bytes": INT0,
    "peak_rss_over_resident": NUM,
})

_HIT_ROW = obj({"policy": STR, "slots": INT0, "hit_rate": NUM0, "load_bytes_per_token": NUM0,
                "miss_bytes_per_token": NUM0})
OFFLOAD = obj({
    "disk_tier": {"type": "array", "minItems": 1, "items": obj({
        "expert_ram": STR, "prefetch": BOOL, "decode_tok_s": POS, "ram_hit_rate": NUM0,
        "disk_bytes_per_token": NUM0, "prediction_precision": NUM_OR_NULL, "prediction_recall": NUM_OR_NULL})},
    "predictor": obj({"precision": NUM0, "recall": NUM0}),
    "cachesim": {"type": "array", "minItems": 1, "items": _HIT_ROW},
})

SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "kimi-local bench",
    **obj({
        "schema_version": {"type": "integer", "enum": [1]},
        "kimi_local_version": STR,
        "mode": {"type": "string", "enum": ["e2e", "kernels", "k2-layer", "load", "offload", "all"]},
        "quick": BOOL,
        "machine": obj({"cpu_model": STR, "isa_flags": {"type": "array", "items": STR}, "physical_cores": INT0,
                        "threads": INT0, "ram_total_bytes": INT0}),
        "seconds": obj({"total": NUM0}),
    }, {
        "e2e": E2E,
        "compare_hf": COMPARE_HF,
        "kernels": KERNELS,
        "k2_layer": K2_LAYER,
        "k2_projection": K2_PROJECTION,
        "load": LOAD,
        "offload": OFFLOAD,
    }),
}

MODE_SECTIONS = {
    "e2e": ("e2e", "compare_hf"),
    "kernels": ("kernels",),
    "k2-layer": ("k2_layer", "k2_projection"),
    "load": ("load",),
    "offload": ("offload",),
}
MODE_SECTIONS["all"] = tuple(s for m in ("e2e", "kernels", "k2-layer", "load", "offload") for s in MODE_SECTIONS[m])


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def _check(v: Any, s: dict, path: str, errors: list[str]) -> None:
    t = s.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not any(_TYPES[x](v) for x in types):
            errors.append(f"{path}: expected {'/'.join(types)}, got {type(v).__name__} {v!r:.60}")
            return
    if isinstance(v, float) and not math.isfinite(v):
        errors.append(f"{path}: not a finite number ({v})")
        return
    if "enum" in s and v not in s["enum"]:
        errors.append(f"{path}: {v!r} not one of {s['enum']}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if "minimum" in s and v < s["minimum"]:
            errors.append(f"{path}: {v} < minimum {s['minimum']}")
        if "exclusiveMinimum" in s and v <= s["exclusiveMinimum"]:
            errors.append(f"{path}: {v} <= exclusive minimum {s['exclusiveMinimum']}")
    if isinstance(v, dict):
        for k in s.get("required", ()):
            if k not in v:
                errors.append(f"{path}.{k}: missing")
        for k, sub in s.get("properties", {}).items():
            if k in v:
                _check(v[k], sub, f"{path}.{k}", errors)
    if isinstance(v, list):
        if len(v) < s.get("minItems", 0):
            errors.append(f"{path}: fewer than {s['minItems']} items")
        if "items" in s:
            for i, item in enumerate(v):
                _check(item, s["items"], f"{path}[{i}]", errors)


def validate(doc: Any, schema: dict = SCHEMA) -> list[str]:
    """Every problem found (empty list = valid): schema violations, then sections missing for the mode."""
    errors: list[str] = []
    _check(doc, schema, "$", errors)
    if isinstance(doc, dict) and doc.get("mode") in MODE_SECTIONS:
        for sec in MODE_SECTIONS[doc["mode"]]:
            if sec not in doc:
                errors.append(f"$.{sec}: missing (mode {doc['mode']})")
    return errors


def get(doc: dict, dotted: str) -> Any:
    """``get(doc, "compare_hf.decode_ratio")``: a value by its dotted key (KeyError if absent)."""
    cur: Any = doc
    for part in dotted.split("."):
        cur = cur[part]
    return cur
