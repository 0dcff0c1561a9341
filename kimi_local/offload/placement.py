"""Placement plan: where each weight lives (GPU, host RAM, disk) for a model on a machine.

Everything here is arithmetic on the model's config.json and a few machine figures, so a user can check that a
real Kimi-K2 fits before downloading it.  The plan is computed in three layers of settings, later ones winning:

    defaults  <  detected machine  <  TOML profile (``configs/*.toml``)  <  command-line flags

Sizes are written like ``24GB`` (10^9), ``24GiB`` / ``24G`` (2^30, the ``dd``/``ulimit`` convention for a bare
letter), ``1.5TB``, a plain byte count, or ``30%`` of a base that each setting names (detected RAM, detected GPU
memory, the routed experts' total size...).  Bandwidths are sizes per second (``300GB/s`` or ``300GB``).

Reference figures for Kimi-K2 (see docs/anchors.md §6): 44,050,944 B per expert with its block scales, 21.14 GB
of routed weights per decoded token, 1.015 TB for all 23,040 routed experts, 70,272 B of MLA KV cache per token
in bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from kimi_local.config import ModelArgs
from kimi_local.errors import UserError

KiB, MiB, GiB, TiB = 1024, 1024 ** 2, 1024 ** 3, 1024 ** 4

# Unit suffix -> multiplier.  A bare letter is binary like dd(1) and `ulimit`; "B" after it means decimal.
_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": KiB, "m": MiB, "g": GiB, "t": TiB,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
    "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
}

KV_DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}


class PlanError(UserError, ValueError):
    """A size, profile or option the plan cannot use; the message names the setting."""


# ---------------------------------------------------------------------------------------------- size parsing


def parse_size(text: Any, *, what: str = "size", percent_of: Optional[int] = None,
               percent_base_name: str = "") -> int:
    """Parse ``24GB``, ``24GiB``, ``512G``, ``1.5TB``, ``123456`` or ``30%`` (of ``percent_of``) into bytes.

    ``what`` names the setting in error messages.  Numbers (from TOML) are taken as bytes.
    """
    if isinstance(text, bool):
        raise PlanError(f"{what}: expected a size like 24GiB, got {text!r}")
    if isinstance(text, (int, float)):
        if text < 0 or not math.isfinite(text):
            raise PlanError(f"{what}: must be a non-negative size, got {text!r}")
        return int(text)
    if not isinstance(text, str):
        raise PlanError(f"{what}: expected a size like 24GiB, got {text!r}")
    s = text.strip().replace(" ", "").replace("_", "").lower()
    if s.endswith("/s"):  # bandwidths are written as sizes per second
        s = s[:-2]
    if s.endswith("%"):
        number = _parse_number(s[:-1], what, text)
        if not 0 <= number <= 100:
            raise PlanError(f"{what}: a percentage must be between 0% and 100%, got {text!r}")
        if percent_of is None:
            raise PlanError(f"{what}: a percentage needs a base ({percent_base_name or 'unknown here'}); "
                            f"give an absolute size like 24GiB")
        return int(percent_of * number / 100)
    split = len(s)
    for i, ch in enumerate(s):
        if not (ch.isdigit() or ch == "."):
            split = i
            break
    number = _parse_number(s[:split], what, text)
    unit = s[split:]
    if unit not in _UNITS:
        raise PlanError(f"{what}: unknown unit {unit!r} in {text!r} (use B, KB/MB/GB/TB for 10^3 steps, "
                        f"K/M/G/T or KiB/MiB/GiB/TiB for 2^10 steps, or a percentage)")
    return int(number * _UNITS[unit])


def _parse_number(s: str, what: str, original: str) -> float:
    """The numeric part of a size; a clear error when it is missing or malformed."""
    try:
        value = float(s)
    except ValueError:
        raise PlanError(f"{what}: {original!r} is not a size (examples: 24GiB, 512G, 1.5TB, 30%)") from None
    if value < 0 or not math.isfinite(value):
        raise PlanError(f"{what}: must be a non-negative size, got {original!r}")
    return value


def parse_bandwidth(text: Any, *, what: str = "bandwidth") -> float:
    """Parse ``300GB/s`` (or ``300GB``) into bytes per second; must be positive."""
    value = parse_size(text, what=what)
    if value <= 0:
        raise PlanError(f"{what}: must be positive, got {text!r}")
    return float(value)


def format_bytes(n: Optional[float], decimal: bool = True) -> str:
    """``21.14 GB`` (decimal, default) or ``19.69 GiB``; ``-`` for None."""
    if n is None:
        return "-"
    step, units = (1000.0, ["B", "KB", "MB", "GB", "TB"]) if decimal else (1024.0, ["B", "KiB", "MiB", "GiB", "TiB"])
    value, i = float(n), 0
    while abs(value) >= step and i < len(units) - 1:
        value /= step
        i += 1
    return f"{value:.0f} {units[i]}" if i == 0 else f"{value:.2f} {units[i]}"


# ---------------------------------------------------------------------------------------------- model sizes


def _linear_bytes(out_features: int, in_features: int, fp8: bool, block: tuple[int, int]) -> int:
    """Bytes of one linear weight: FP8 plus its fp32 block scales (``weight_scale_inv``), or bf16."""
    if not fp8:
        return out_features * in_features * 2
    scales = math.ceil(out_features / block[0]) * math.ceil(in_features / block[1])
    return out_features * in_features + scales * 4


@dataclass(frozen=True)
class ModelSizes:
    """Byte counts derived from config.json (tensor shapes as in docs/kimi-k2-format.md §4)."""

    bytes_per_expert: int            # gate + up + down with block scales
    n_moe_layers: int
    n_routed_experts: int
    top_k: int
    nonrouted: dict[str, int]        # GPU-side weights by group
    kv_values_per_token: int         # (kv_lora_rank + qk_rope_head_dim) x layers
    embed_row_bytes: int             # one row of embed_tokens (all a token reads of the embedding)

    @property
    def routed_total(self) -> int:
        """All routed experts of all MoE layers."""
        return self.bytes_per_expert * self.n_routed_experts * self.n_moe_layers

    @property
    def routed_per_token(self) -> int:
        """Routed expert bytes one decoded token reads: top_k experts in every MoE layer."""
        return self.bytes_per_expert * self.top_k * self.n_moe_layers

    @property
    def nonrouted_total(self) -> int:
        return sum(self.nonrouted.values())

    @property
    def nonrouted_read_per_token(self) -> int:
        """Non-routed bytes read per decoded token: everything but the embedding table, plus one of its rows."""
        return self.nonrouted_total - self.nonrouted["embeddings"] + self.embed_row_bytes

    def kv_bytes_per_token(self, kv_dtype: str = "bf16") -> int:
        """MLA cache bytes per token of context: the latent and the rope key, every layer."""
        return self.kv_values_per_token * KV_DTYPE_BYTES[kv_dtype]


def model_sizes(args: ModelArgs) -> ModelSizes:
    """Compute the byte counts of every weight group from the config alone."""
    fp8, blk = args.is_fp8, args.weight_block_size
    H, V = args.hidden_size, args.vocab_size
    heads = args.num_attention_heads
    lin = lambda o, i: _linear_bytes(o, i, fp8, blk)  # noqa: E731 - local shorthand
    n_layers = args.num_hidden_layers
    moe_ids = args.moe_layer_ids
    n_moe, n_dense = len(moe_ids), n_layers - len(moe_ids)

    # Attention (MLA), one layer.
    if args.q_lora_rank:
        attn = lin(args.q_lora_rank, H) + args.q_lora_rank * 2 + lin(heads * args.qk_head_dim, args.q_lora_rank)
    else:
        attn = lin(heads * args.qk_head_dim, H)
    attn += lin(args.kv_lora_rank + args.qk_rope_head_dim, H) + args.kv_lora_rank * 2
    attn += lin(heads * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank)
    attn += lin(H, heads * args.v_head_dim)

    I, Im = args.intermediate_size, args.moe_intermediate_size
    dense_mlp = 2 * lin(I, H) + lin(H, I)
    shared_width = args.n_shared_experts * Im
    shared = (2 * lin(shared_width, H) + lin(H, shared_width)) if shared_width else 0
    router = args.n_routed_experts * H * 2 + args.n_routed_experts * 4  # bf16 gate + fp32 correction bias
    expert = 2 * lin(Im, H) + lin(H, Im)

    nonrouted = {
        "embeddings": V * H * 2,
        "lm_head": V * H * 2,
        "attention": attn * n_layers,
        "dense_mlp": dense_mlp * n_dense,
        "shared_experts": shared * n_moe,
        "router": router * n_moe,
        "norms": (2 * H * n_layers + H) * 2,
    }
    return ModelSizes(
        bytes_per_expert=expert,
        n_moe_layers=n_moe,
        n_routed_experts=args.n_routed_experts,
        top_k=args.num_experts_per_tok,
        nonrouted=nonrouted,
        kv_values_per_token=(args.kv_lora_rank + args.qk_rope_head_dim) * n_layers,
        embed_row_bytes=H * 2,
    )


def kimi_k2_args() -> ModelArgs:
    """Kimi-K2-Instruct's config (the ModelArgs defaults) with its block-FP8 quantization."""
    return ModelArgs.from_dict({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                        "weight_block_size": [128, 128]}})


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Machine:
    """The machine figures the plan needs.  ``gpu_mem`` 0 means no GPU."""

    gpu_mem: int = 0
    gpu_name: str = "none"
    ram: int = 0
    cpu_cores: int = 1
    ram_bandwidth: Optional[float] = None   # bytes/s, theoretical (channels x MT/s x 8)
    disk_bandwidth: Optional[float] = None  # bytes/s, sequential read where the checkpoint lives


@dataclass(frozen=True)
class PlanOptions:
    """Choices the user makes; defaults are what ``kimi-local plan`` uses when nothing is given."""

    ctx: int = 32768                        # context length the KV cache must hold
    kv_dtype: str = "bf16"
    gpu_reserved: int = 2 * GiB             # CUDA context, activations, allocator slack
    ram_reserved: int = 8 * GiB             # OS, Python, tokenizer, page cache headroom
    expert_ram: Optional[int] = None        # RAM budget for routed experts (None: all that is left)
    gpu_expert_slots: Optional[int] = None  # per-layer GPU cache slots (None: all that fit)
    ram_efficiency: float = 0.75            # achieved / theoretical RAM bandwidth (anchors §6.2)
    gpu_hit_rate: Optional[float] = None    # None: slots / experts, the no-locality floor
    ram_hit_rate: Optional[float] = None    # None: resident fraction, the no-locality floor


@dataclass(frozen=True)
class Setting:
    """One overridable setting: its profile section, how to parse it, and what a percentage is of."""

    name: str
    section: str            # "machine" or "plan" in a TOML profile
    kind: str               # size | bandwidth | int | float | fraction | choice | str
    help: str
    percent_base: str = ""  # for sizes: what "30%" is a percentage of
    choices: tuple[str, ...] = ()


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("gpu_mem", "machine", "size", "GPU memory to use (default: free memory of GPU 0)", "detected GPU memory"),
    Setting("gpu_name", "machine", "str", "GPU name, for the report"),
    Setting("ram", "machine", "size", "host RAM (default: detected total)", "detected RAM"),
    Setting("cpu_cores", "machine", "int", "physical CPU cores (default: detected)"),
    Setting("ram_bandwidth", "machine", "bandwidth", "theoretical RAM bandwidth, e.g. 307GB/s (for the decode ceiling)"),
    Setting("disk_bandwidth", "machine", "bandwidth", "sequential read bandwidth of the checkpoint's disk, e.g. 7GB/s"),
    Setting("ctx", "plan", "int", "context length the KV cache must hold"),
    Setting("kv_dtype", "plan", "choice", "KV cache dtype", choices=tuple(KV_DTYPE_BYTES)),
    Setting("gpu_reserved", "plan", "size", "GPU memory kept free for CUDA context and activations", "GPU memory"),
    Setting("ram_reserved", "plan", "size", "host RAM kept for the OS and everything else", "RAM"),
    Setting("expert_ram", "plan", "size", "RAM budget for routed experts (smaller than them: disk tier)",
            "the routed experts' total size"),
    Setting("gpu_expert_slots", "plan", "int", "GPU expert-cache slots per MoE layer"),
    Setting("ram_efficiency", "plan", "fraction", "achieved fraction of theoretical RAM bandwidth"),
    Setting("gpu_hit_rate", "plan", "fraction", "GPU expert-cache hit rate assumed for the ceiling"),
    Setting("ram_hit_rate", "plan", "fraction", "RAM hit rate of routed experts assumed when the disk tier is used"),
)}

# Settings whose percentage base is another setting; parsed after that base is known.
_ORDER = ("gpu_name", "gpu_mem", "ram", "cpu_cores", "ram_bandwidth", "disk_bandwidth", "ctx", "kv_dtype",
          "gpu_reserved", "ram_reserved", "expert_ram", "gpu_expert_slots", "ram_efficiency", "gpu_hit_rate",
          "ram_hit_rate")


def load_profile(path: str) -> dict[str, Any]:
    """Read a TOML profile into ``{setting: raw value}``; unknown sections or keys are errors that name them."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise PlanError(f"profile {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"profile {path}: malformed TOML ({e})") from None
    flat: dict[str, Any] = {}
    for section, body in data.items():
        if section == "description" and isinstance(body, str):
            continue
        if section not in ("machine", "plan") or not isinstance(body, dict):
            raise PlanError(f"profile {path}: unknown section [{section}] (known: [machine], [plan], description)")
        for key, value in body.items():
            s = SETTINGS.get(key)
            if s is None or s.section != section:
                known = ", ".join(n for n, x in SETTINGS.items() if x.section == section)
                raise PlanError(f"profile {path}: unknown key '{key}' in [{section}] (known: {known})")
            flat[key] = value
    return flat


def detect_machine(gpu: bool = True) -> Machine:
    """Detect RAM, physical cores and (if ``gpu`` and torch has CUDA) the free memory of GPU 0."""
    import psutil

    gpu_mem, gpu_name = 0, "none"
    if gpu:
        gpu_mem, gpu_name = detect_gpu()
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return Machine(gpu_mem=gpu_mem, gpu_name=gpu_name, ram=int(psutil.virtual_memory().total), cpu_cores=cores)


def detect_gpu() -> tuple[int, str]:
    """(free bytes, name) of CUDA device 0, or (0, "none") without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return 0, "none"
    if not torch.cuda.is_available():
        return 0, "none"
    free, _total = torch.cuda.mem_get_info(0)
    return int(free), torch.cuda.get_device_name(0)


def _parse_setting(s: Setting, raw: Any, base: Optional[int]) -> Any:
    """Parse one raw value (string from a flag, or a TOML value) by the setting's kind."""
    what = s.name
    if s.kind == "size":
        return parse_size(raw, what=what, percent_of=base, percent_base_name=s.percent_base)
    if s.kind == "bandwidth":
        return parse_bandwidth(raw, what=what)
    if s.kind == "int":
        text, scale = raw, 1
        if isinstance(raw, str) and raw.strip().lower().endswith("k"):  # ctx 128k = 131072
            text, scale = raw.strip()[:-1], 1024
        try:
            value = int(float(text)) * scale if not isinstance(text, bool) and float(text).is_integer() else None
        except (TypeError, ValueError, OverflowError):
            value = None
        if value is None or value < 0:
            raise PlanError(f"{what}: expected a non-negative integer, got {raw!r}")
        return value
    if s.kind in ("float", "fraction"):
        try:
            value = float(raw) if not isinstance(raw, bool) else None
        except (TypeError, ValueError):
            value = None
        if value is None or not math.isfinite(value) or value < 0 or (s.kind == "fraction" and value > 1):
            rng = "between 0 and 1" if s.kind == "fraction" else "a non-negative number"
            raise PlanError(f"{what}: expected {rng}, got {raw!r}")
        return value
    if s.kind == "choice":
        if raw not in s.choices:
            raise PlanError(f"{what}: {raw!r} is not one of {', '.join(s.choices)}")
        return raw
    return str(raw)


def resolve_settings(model: ModelArgs, profile: Optional[dict[str, Any]] = None,
                     flags: Optional[dict[str, Any]] = None,
                     detect: Optional[Callable[[], Machine]] = None) -> tuple[Machine, PlanOptions, dict[str, str]]:
    """Merge defaults < detected < profile < flags into (Machine, PlanOptions, source of each setting).

    ``detect`` is called only when a machine figure is neither in the profile nor in the flags, or is a
    percentage of the detected value (so planning for another machine never probes this one).
    """
    profile = dict(profile or {})
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    for k in list(profile) + list(flags):
        if k not in SETTINGS:
            raise PlanError(f"unknown setting '{k}'")
    raw: dict[str, tuple[Any, str]] = {k: (v, "profile") for k, v in profile.items()}
    raw.update({k: (v, "flag") for k, v in flags.items()})

    def is_percent(name: str) -> bool:
        return isinstance(raw.get(name, (None,))[0], str) and str(raw[name][0]).strip().endswith("%")

    needs_detect = any(n not in raw or is_percent(n) for n in ("gpu_mem", "ram")) or "cpu_cores" not in raw
    detected = (detect or (lambda: detect_machine(gpu="gpu_mem" not in raw or is_percent("gpu_mem"))))() \
        if needs_detect else Machine()
    machine_defaults = dataclasses.asdict(detected)
    option_defaults = dataclasses.asdict(PlanOptions())
    sources: dict[str, str] = {}
    values: dict[str, Any] = {}
    sizes = model_sizes(model)
    for name in _ORDER:
        s = SETTINGS[name]
        base = {"gpu_mem": detected.gpu_mem, "ram": detected.ram, "gpu_reserved": values.get("gpu_mem"),
                "ram_reserved": values.get("ram"), "expert_ram": sizes.routed_total}.get(name)
        if name in raw:
            value, src = raw[name]
            values[name] = _parse_setting(s, value, base)
            sources[name] = src
        elif name in machine_defaults:
            values[name] = machine_defaults[name]
            sources[name] = "detected" if needs_detect and name in ("gpu_mem", "gpu_name", "ram", "cpu_cores") \
                else "default"
        else:
            values[name] = option_defaults[name]
            sources[name] = "default"
    if sources["gpu_name"] not in ("profile", "flag"):
        # A GPU size given without a name is some other card; a detected name would mislabel it.
        if values["gpu_mem"] == 0:
            values["gpu_name"] = "none"
        elif sources["gpu_mem"] in ("profile", "flag") and not is_percent("gpu_mem"):
            values["gpu_name"] = "GPU"
    if values["ctx"] < 1:
        raise PlanError("ctx: must be at least 1")
    if sources["ctx"] == "default" and values["ctx"] > model.max_position_embeddings:
        values["ctx"] = model.max_position_embeddings   # a small model: plan for its whole context
    if values["ctx"] > model.max_position_embeddings:
        raise PlanError(f"ctx: {values['ctx']} exceeds the model's max_position_embeddings "
                        f"({model.max_position_embeddings})")
    machine = Machine(**{k: values[k] for k in machine_defaults})
    options = PlanOptions(**{k: values[k] for k in option_defaults})
    return machine, options, sources


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class PlacementPlan:
    """Where every weight goes, what it costs, and the verdict; ``to_dict`` is the JSON form."""

    sizes: ModelSizes
    machine: Machine
    options: PlanOptions
    sources: dict[str, str]
    mode: str                       # "gpu+cpu" (non-routed on GPU) or "cpu-only"
    # GPU side
    gpu_nonrouted: int
    gpu_kv: int
    gpu_free_for_experts: int       # after reserved, non-routed weights and KV (may be negative)
    gpu_slots_fit: int              # per-layer slots that fit
    gpu_expert_slots: int           # per-layer slots used (option or all that fit)
    max_ctx_on_gpu: int
    # Host side
    ram_nonrouted: int              # non-routed weights + KV kept in RAM (cpu-only mode)
    ram_available_for_experts: int
    expert_ram: int                 # RAM budget for routed experts actually planned
    resident_fraction: float
    tier: str                       # "ram" (all routed experts resident) or "disk"
    # Per decoded token
    gpu_hit_rate: float
    ram_hit_rate: float
    ram_bytes_per_token: float
    disk_bytes_per_token: float
    decode_ceiling: Optional[float]  # tok/s, None when a needed bandwidth is unknown
    bound: str
    verdict: str                    # ok | warn | bad
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: plain numbers in bytes, bytes/s and tok/s."""
        s = self.sizes
        return {
            "verdict": self.verdict,
            "notes": list(self.notes),
            "mode": self.mode,
            "model": {
                "bytes_per_expert": s.bytes_per_expert,
                "moe_layers": s.n_moe_layers,
                "routed_experts_per_layer": s.n_routed_experts,
                "experts_per_token": s.top_k,
                "routed_total_bytes": s.routed_total,
                "routed_bytes_per_token": s.routed_per_token,
                "nonrouted_bytes": s.nonrouted_total,
                "nonrouted_breakdown": dict(s.nonrouted),
                "kv_bytes_per_token": s.kv_bytes_per_token(self.options.kv_dtype),
            },
            "machine": dataclasses.asdict(self.machine),
            "options": dataclasses.asdict(self.options),
            "sources": dict(self.sources),
            "gpu": {
                "nonrouted_bytes": self.gpu_nonrouted,
                "kv_bytes": self.gpu_kv,
                "reserved_bytes": self.options.gpu_reserved if self.mode == "gpu+cpu" else 0,
                "free_for_experts_bytes": self.gpu_free_for_experts,
                "expert_slots_fit_per_layer": self.gpu_slots_fit,
                "expert_slots_per_layer": self.gpu_expert_slots,
                "expert_cache_bytes": self.gpu_expert_slots * s.bytes_per_expert * s.n_moe_layers,
                "max_ctx": self.max_ctx_on_gpu,
            },
            "ram": {
                "reserved_bytes": self.options.ram_reserved,
                "nonrouted_and_kv_bytes": self.ram_nonrouted,
                "available_for_experts_bytes": self.ram_available_for_experts,
                "expert_ram_bytes": self.expert_ram,
                "resident_fraction": self.resident_fraction,
                "tier": self.tier,
                "disk_resident_bytes": max(0, s.routed_total - self.expert_ram),
            },
            "per_token": {
                "gpu_hit_rate": self.gpu_hit_rate,
                "ram_hit_rate": self.ram_hit_rate,
                "ram_bytes": self.ram_bytes_per_token,
                "disk_bytes": self.disk_bytes_per_token,
                "decode_ceiling_tok_s": self.decode_ceiling,
                "bound": self.bound,
            },
        }


def compute_plan(model: ModelArgs, machine: Machine, options: PlanOptions,
                 sources: Optional[dict[str, str]] = None) -> PlacementPlan:
    """The placement arithmetic: GPU gets non-routed weights + KV + expert slots; RAM the routed experts."""
    s = model_sizes(model)
    notes: list[str] = []
    verdict = "ok"

    def worse(level: str, note: str) -> None:
        nonlocal verdict
        notes.append(note)
        if (level, verdict) in (("warn", "ok"), ("bad", "ok"), ("bad", "warn")):
            verdict = level

    kv_per_token = s.kv_bytes_per_token(options.kv_dtype)
    kv = kv_per_token * options.ctx
    per_slot = s.bytes_per_expert * s.n_moe_layers  # one slot in every MoE layer
    gpu_fixed = options.gpu_reserved + s.nonrouted_total

    # GPU: non-routed weights and KV must fit, else everything runs from RAM on the CPU.
    mode = "gpu+cpu" if machine.gpu_mem > 0 and machine.gpu_mem >= gpu_fixed + kv else "cpu-only"
    if machine.gpu_mem > 0 and mode == "cpu-only":
        worse("warn", f"GPU memory {format_bytes(machine.gpu_mem)} < {format_bytes(gpu_fixed + kv)} needed for "
                      f"non-routed weights, KV cache at ctx {options.ctx} and reserve: running CPU-only "
                      f"(lower --ctx or use --kv-dtype fp8 to fit)")
    if mode == "gpu+cpu":
        gpu_free = machine.gpu_mem - gpu_fixed - kv
        slots_fit = min(s.n_routed_experts, max(0, gpu_free // per_slot))
        max_ctx = min(model.max_position_embeddings, max(0, (machine.gpu_mem - gpu_fixed) // kv_per_token))
        gpu_nonrouted, gpu_kv, ram_nonrouted = s.nonrouted_total, kv, 0
    else:
        gpu_free, slots_fit, max_ctx, gpu_nonrouted, gpu_kv = 0, 0, 0, 0, 0
        ram_nonrouted = s.nonrouted_total + kv
        if machine.gpu_mem == 0:
            notes.append("no GPU: attention, shared experts and all routed experts run on the CPU")
    slots = slots_fit if options.gpu_expert_slots is None else options.gpu_expert_slots
    if options.gpu_expert_slots is not None and options.gpu_expert_slots > slots_fit:
        worse("bad", f"gpu_expert_slots {options.gpu_expert_slots} does not fit: at most {slots_fit} per layer "
                     f"({format_bytes(per_slot)} per slot across {s.n_moe_layers} layers)")
    if mode == "gpu+cpu" and slots_fit < s.top_k:
        notes.append(f"only {slots_fit} expert-cache slots per layer fit (fewer than the {s.top_k} active): "
                     f"the GPU cache will help little")

    # Host RAM: routed experts (the GPU cache holds copies, so RAM needs all of them or the disk tier).
    ram_avail = machine.ram - options.ram_reserved - ram_nonrouted
    if options.expert_ram is not None:
        expert_ram = min(options.expert_ram, s.routed_total)
        if options.expert_ram > max(0, ram_avail):
            worse("bad", f"expert_ram {format_bytes(options.expert_ram)} exceeds the RAM left for experts "
                         f"({format_bytes(max(0, ram_avail))})")
    else:
        expert_ram = max(0, min(ram_avail, s.routed_total))
    resident = expert_ram / s.routed_total if s.routed_total else 1.0
    tier = "ram" if expert_ram >= s.routed_total else "disk"
    if ram_avail <= 0:
        worse("bad", f"RAM {format_bytes(machine.ram)} does not cover the reserve "
                     f"({format_bytes(options.ram_reserved)}) plus non-routed weights and KV "
                     f"({format_bytes(ram_nonrouted)}); no RAM is left for experts")
    elif tier == "disk":
        worse("warn", f"routed experts ({format_bytes(s.routed_total)}) exceed the RAM budget "
                      f"({format_bytes(expert_ram)}): {resident:.0%} resident, misses are read from disk")

    # Per token: what the CPU reads from RAM and what misses RAM and comes from disk.
    h_gpu = options.gpu_hit_rate if options.gpu_hit_rate is not None else slots / s.n_routed_experts
    h_ram = options.ram_hit_rate if options.ram_hit_rate is not None else resident
    if tier == "ram":
        h_ram = 1.0
    cpu_routed = s.routed_per_token * (1.0 - h_gpu)
    ram_bytes = cpu_routed + (s.nonrouted_read_per_token if mode == "cpu-only" else 0)
    disk_bytes = cpu_routed * (1.0 - h_ram)
    ceiling, bound = None, "-"
    times = {}
    if machine.ram_bandwidth:
        times["RAM bandwidth"] = ram_bytes / (machine.ram_bandwidth * options.ram_efficiency)
    if disk_bytes > 0:
        if machine.disk_bandwidth:
            times["disk bandwidth"] = disk_bytes / machine.disk_bandwidth
        else:
            times = {}
            notes.append("give the disk bandwidth (--disk-bw, or `kimi-local doctor --path DIR`) for a ceiling")
    if not machine.ram_bandwidth:
        notes.append("give the RAM bandwidth (--ram-bw, e.g. 307GB/s for 8ch DDR5-4800) for a decode ceiling")
        times = {}
    if times:
        bound = max(times, key=times.get)
        ceiling = 1.0 / times[bound] if times[bound] > 0 else math.inf
        if options.gpu_hit_rate is None and slots:
            notes.append("the ceiling assumes the no-locality GPU hit rate (slots / experts); "
                         "`kimi-local cachesim` estimates real ones")
    return PlacementPlan(
        sizes=s, machine=machine, options=options, sources=dict(sources or {}), mode=mode,
        gpu_nonrouted=gpu_nonrouted, gpu_kv=gpu_kv, gpu_free_for_experts=gpu_free, gpu_slots_fit=slots_fit,
        gpu_expert_slots=slots, max_ctx_on_gpu=max_ctx, ram_nonrouted=ram_nonrouted,
        ram_available_for_experts=ram_avail, expert_ram=expert_ram, resident_fraction=resident, tier=tier,
        gpu_hit_rate=h_gpu, ram_hit_rate=h_ram, ram_bytes_per_token=ram_bytes, disk_bytes_per_token=disk_bytes,
        decode_ceiling=ceiling, bound=bound, verdict=verdict, notes=notes,
    )


def make_plan(model: ModelArgs, profile: Optional[dict[str, Any]] = None, flags: Optional[dict[str, Any]] = None,
              detect: Optional[Callable[[], Machine]] = None) -> PlacementPlan:
    """Resolve settings (defaults < detected < profile < flags) and compute the plan."""
    machine, options, sources = resolve_settings(model, profile, flags, detect)
    return compute_plan(model, machine, options, sources)


# ---------------------------------------------------------------------------------------------- flags

# setting -> flag spelling, for every command that plans (plan, and the model-loading commands).
FLAG_NAMES: dict[str, str] = {
    "gpu_mem": "--gpu-mem", "ram": "--ram", "cpu_cores": "--cpu-cores", "ram_bandwidth": "--ram-bw",
    "disk_bandwidth": "--disk-bw", "ctx": "--ctx", "kv_dtype": "--kv-dtype", "gpu_reserved": "--gpu-reserved",
    "ram_reserved": "--ram-reserved", "expert_ram": "--expert-ram", "gpu_expert_slots": "--gpu-expert-slots",
    "ram_efficiency": "--ram-efficiency", "gpu_hit_rate": "--gpu-hit-rate", "ram_hit_rate": "--ram-hit-rate",
}


def add_placement_arguments(parser: argparse.ArgumentParser, only: Optional[tuple[str, ...]] = None) -> None:
    """Add ``--profile`` and the placement flags (all, or the settings named in ``only``) to a parser."""
    group = parser.add_argument_group("placement (override the profile and detected values)")
    group.add_argument("--profile", metavar="FILE", help="TOML placement profile (see configs/README.md)")
    for name, flag in FLAG_NAMES.items():
        if only is not None and name not in only:
            continue
        s = SETTINGS[name]
        metavar = {"size": "SIZE", "bandwidth": "BW", "int": "N", "float": "X", "fraction": "F"}.get(s.kind)
        extra = f" (a %% is of {s.percent_base})" if s.percent_base else ""
        if s.kind == "choice":
            group.add_argument(flag, dest=f"plan_{name}", choices=s.choices, default=None, help=s.help)
        else:
            group.add_argument(flag, dest=f"plan_{name}", metavar=metavar, default=None, help=s.help + extra)


def placement_from_args(model: ModelArgs, args: argparse.Namespace,
                        detect: Optional[Callable[[], Machine]] = None) -> PlacementPlan:
    """Build the plan from parsed arguments (``--profile`` plus any placement flags present)."""
    profile = load_profile(args.profile) if getattr(args, "profile", None) else None
    flags = {name: getattr(args, f"plan_{name}", None) for name in FLAG_NAMES}
    return make_plan(model, profile, flags, detect)
