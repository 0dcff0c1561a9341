"""Counters behind ``GET /metrics`` (Prometheus text format, llama.cpp-like names under ``kimi_local_``)."""

from __future__ import annotations

import threading
from typing import Any, Optional


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.last_prefill_tok_s = 0.0
        self.last_decode_tok_s = 0.0
        self.generations = 0
        self.cancelled = 0

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def record_generation(self, timings: Any, cancelled: bool = False) -> None:
        if timings is None:
            return
        with self._lock:
            self.generations += 1
            self.cancelled += int(cancelled)
            self.prompt_tokens += int(getattr(timings, "prompt_tokens", 0) or 0)
            self.cached_tokens += int(getattr(timings, "cached_tokens", 0) or 0)
            self.generated_tokens += int(getattr(timings, "generated_tokens", 0) or 0)
            self.prefill_seconds += float(getattr(timings, "prefill_seconds", 0.0) or 0.0)
            self.decode_seconds += float(getattr(timings, "decode_seconds", 0.0) or 0.0)
            self.last_prefill_tok_s = float(getattr(timings, "prefill_tok_s", 0.0) or 0.0)
            self.last_decode_tok_s = float(getattr(timings, "decode_tok_s", 0.0) or 0.0)

    def render(self, *, processing: int, deferred: int, n_ctx: int, loaded: bool,
               engine_stats: Optional[dict] = None) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            full = f"kimi_local_{name}"
            out.append(f"# HELP {full} {help_text}")
            out.append(f"# TYPE {full} {kind}")
            for labels, value in samples:
                out.append(f"{full}{labels} {_num(value)}")

        with self._lock:
            reqs = sorted(self.requests.items())
            metric("requests_total", "counter", "HTTP requests answered, by route and status",
                   [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in reqs] or [("", 0)])
            metric("generations_total", "counter", "generations run", [("", self.generations)])
            metric("generations_cancelled_total", "counter", "generations stopped by a client disconnect",
                   [("", self.cancelled)])
            metric("prompt_tokens_total", "counter", "prompt tokens processed (cached ones included)",
                   [("", self.prompt_tokens)])
            metric("prompt_tokens_cached_total", "counter", "prompt tokens reused from the prefix cache",
                   [("", self.cached_tokens)])
            metric("tokens_predicted_total", "counter", "tokens generated", [("", self.generated_tokens)])
            metric("prompt_seconds_total", "counter", "seconds spent in prefill", [("", self.prefill_seconds)])
            metric("tokens_predicted_seconds_total", "counter", "seconds spent decoding",
                   [("", self.decode_seconds)])
            avg_prefill = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0
            avg_decode = self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0
            metric("prompt_tokens_seconds", "gauge", "average prefill throughput, tokens/s", [("", avg_prefill)])
            metric("predicted_tokens_seconds", "gauge", "average decode throughput, tokens/s", [("", avg_decode)])
            metric("last_prompt_tokens_seconds", "gauge", "prefill tokens/s of the last generation",
                   [("", self.last_prefill_tok_s)])
            metric("last_predicted_tokens_seconds", "gauge", "decode tokens/s of the last generation",
                   [("", self.last_decode_tok_s)])
        metric("requests_processing", "gauge", "generations running now (0 or 1)", [("", processing)])
        metric("requests_deferred", "gauge", "requests waiting in the queue", [("", deferred)])
        metric("n_ctx", "gauge", "context length in tokens", [("", n_ctx)])
        metric("model_loaded", "gauge", "1 once the model is ready", [("", int(loaded))])
        for key, value in _flatten(engine_stats or {}):
            metric(f"engine_{key}", "gauge", f"engine.stats()['{key}']", [("", value)])
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, float]]:
    """Numeric leaves of a (nested) stats dict, with Prometheus-safe names."""
    out = []
    for k, v in d.items():
        name = prefix + "".join(c if c.isalnum() else "_" for c in str(k))
        if isinstance(v, dict):
            out.extend(_flatten(v, name + "_"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((name, v))
        elif isinstance(v, bool):
            out.append((name, int(v)))
    return out

