"""Shared helpers of the benchmarks: machine description, a peak-RSS sampler, timing statistics."""

from __future__ import annotations

import os
import platform
import threading
from typing import Optional

GB = 1e9


def machine_info(threads: Optional[int] = None) -> dict:
    """CPU model, ISA flags, cores, RAM, GPU (if any): the context every figure needs."""
    import psutil
    import torch

    vm = psutil.virtual_memory()
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "memory_bytes": int(p.total_memory)}
    from kimi_local.sysinfo import cpu_model, isa_flags

    return {
        "cpu_model": cpu_model(),
        "isa_flags": isa_flags(),
        "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "ram_total_bytes": int(vm.total),
        "ram_available_bytes": int(vm.available),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _proc_status_kb(keys=("VmRSS", "RssAnon", "RssFile")) -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def current_rss() -> dict:
    """{'rss': ..., 'anon': ..., 'file': ...} bytes of this process now (Linux /proc; psutil elsewhere)."""
    s = _proc_status_kb()
    if "VmRSS" in s:
        return {"rss": s["VmRSS"], "anon": s.get("RssAnon", s["VmRSS"]), "file": s.get("RssFile", 0)}
    import psutil
    r = psutil.Process().memory_info().rss
    return {"rss": r, "anon": r, "file": 0}


class PeakRSS:
    """Samples this process's RSS (total, anonymous, file-backed) every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = {"rss": 0, "anon": 0, "file": 0}
        self._stop = threading.Event()
        self._t: Optional[threading.Thread] = None

    def _sample(self) -> None:
        cur = current_rss()
        for k, v in cur.items():
            if v > self.peak[k]:
                self.peak[k] = v

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._sample()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join()
        self._sample()


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n:.0f} B"
