"""What this CPU is: model name and ISA flags from /proc/cpuinfo (one reader for doctor and the benches)."""

from __future__ import annotations

import platform

# The flags that decide which kernels and dtypes run fast (reported by the benches, in this order).
ISA_WANTED = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi",
              "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8", "asimd", "sve")


def cpuinfo() -> tuple[str, set[str]]:
    """(model name, all ISA flags); ("<platform name>", empty set) where /proc/cpuinfo does not exist."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo", "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "unknown", flags


def cpu_model() -> str:
    return cpuinfo()[0]


def isa_flags() -> list[str]:
    """The performance-relevant flags this CPU has, in ISA_WANTED order."""
    have = cpuinfo()[1]
    return [w for w in ISA_WANTED if w in have]
