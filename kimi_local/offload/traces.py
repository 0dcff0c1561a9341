"""Routing traces: which experts each MoE layer chose for each token, in execution order.

Written by ``--trace-routing FILE`` and replayed by ``kimi-local cachesim``.  Two encodings, chosen by extension:

* JSON lines (any name but ``.npz``): a header object, then one record per (layer, forward)::

      {"kimi_local_routing_trace": 1, "n_experts": 384, "top_k": 8, "layers": [1, ..., 60], "model": "..."}
      {"layer": 1, "pos": 0, "experts": [17, 3, ...]}
      {"layer": 1, "pos": 0, "experts": [...], "hints": [...], "step": 0}   # hints, step: optional

* ``.npz``: arrays ``layer`` (N,), ``pos`` (N,), ``experts`` (N, top_k), optional ``hints`` (N, m) padded with
  -1 and ``step`` (N,) (-1: none), and ``meta`` (the header as a JSON string).

``hints`` are the layer-ahead predictor's candidates for that record (layer l+1's router applied to layer l's
hidden state), recorded so a replay can measure prefetching with the real predictor.  ``step`` numbers forward
passes: consecutive records of one layer with the same step (the tokens of a prefill chunk) are replayed as one
step of that layer.  Without it every record is its own step (decode).

Synthetic traces with Kimi-K2's shape (60 MoE layers x 384 experts x top-8) have tunable popularity skew (Zipf)
and temporal locality (reuse of the layer's recent experts), and optional simulated hints of a given accuracy.
"""

from __future__ import annotations

import bisect
import json
import os
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from kimi_local.errors import UserError

FORMAT_KEY = "kimi_local_routing_trace"
FORMAT_VERSION = 1


class TraceError(UserError, ValueError):
    """A trace file that cannot be read; the message names the file and line."""


@dataclass
class RoutingTrace:
    """Records in execution order: ``layer[i]`` chose ``experts[i]`` for token position ``pos[i]``."""

    meta: dict[str, Any]
    layer: np.ndarray                       # (N,) int
    pos: np.ndarray                         # (N,) int
    experts: np.ndarray                     # (N, top_k) int
    hints: Optional[np.ndarray] = None      # (N, m) int, -1 padded; None when not recorded
    step: Optional[np.ndarray] = None       # (N,) forward-pass number, -1 for none; None when not recorded

    def __post_init__(self) -> None:
        self.layer = np.asarray(self.layer, dtype=np.int32).reshape(-1)
        self.pos = np.asarray(self.pos, dtype=np.int64).reshape(-1)
        self.experts = np.asarray(self.experts, dtype=np.int32).reshape(len(self.layer), -1)
        if self.hints is not None:
            self.hints = np.asarray(self.hints, dtype=np.int32).reshape(len(self.layer), -1)
        if self.step is not None:
            self.step = np.asarray(self.step, dtype=np.int64).reshape(-1)
        self.meta.setdefault("n_experts", int(self.experts.max()) + 1 if self.experts.size else 0)
        self.meta.setdefault("top_k", int(self.experts.shape[1]))
        self.meta.setdefault("layers", sorted(int(l) for l in np.unique(self.layer)))

    def __len__(self) -> int:
        return int(self.layer.shape[0])

    @property
    def n_experts(self) -> int:
        return int(self.meta["n_experts"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def layers(self) -> list[int]:
        return [int(l) for l in self.meta["layers"]]

    @property
    def n_tokens(self) -> int:
        """Distinct token positions."""
        return int(np.unique(self.pos).size)

    def steps(self) -> Iterator[tuple[int, list[int], list[int], Optional[list[int]]]]:
        """Yield (layer, positions, experts used, hints) per step of a layer (one record, or a prefill chunk)."""
        n = len(self)
        step = self.step
        i = 0
        while i < n:
            j = i + 1
            if step is not None and step[i] >= 0:
                while j < n and self.layer[j] == self.layer[i] and step[j] == step[i]:
                    j += 1
            experts = list(dict.fromkeys(int(e) for e in self.experts[i:j].reshape(-1) if e >= 0))
            hints = None
            if self.hints is not None:
                hints = list(dict.fromkeys(int(e) for e in self.hints[i:j].reshape(-1) if e >= 0))
            yield int(self.layer[i]), [int(p) for p in self.pos[i:j]], experts, hints
            i = j

    def save(self, path: str) -> None:
        """Write to ``path`` (npz if it ends in .npz, else JSON lines)."""
        with TraceWriter(path, n_experts=self.n_experts, top_k=self.top_k, layers=self.layers,
                         **{k: v for k, v in self.meta.items() if k not in ("n_experts", "top_k", "layers")}) as w:
            for i in range(len(self)):
                w.write(int(self.layer[i]), int(self.pos[i]), self.experts[i],
                        None if self.hints is None else self.hints[i],
                        None if self.step is None or self.step[i] < 0 else int(self.step[i]))


class TraceWriter:
    """Streaming writer for ``--trace-routing``: ``write(layer, pos, experts, hints=None, step=None)`` per record.

    JSON lines are written as they come (a crash keeps what was written); npz is buffered and saved on close.
    Use as a context manager or call ``close()``.
    """

    def __init__(self, path: str, n_experts: int, top_k: int, layers: Optional[Sequence[int]] = None,
                 **meta: Any):
        self.path = path
        self.npz = path.endswith(".npz")
        self.meta = {FORMAT_KEY: FORMAT_VERSION, "n_experts": int(n_experts), "top_k": int(top_k)}
        if layers is not None:
            self.meta["layers"] = [int(l) for l in layers]
        self.meta.update(meta)
        self._rows: list[tuple[int, int, list[int], Optional[list[int]], int]] = []
        self._file = None
        if not self.npz:
            self._file = open(path, "w", encoding="utf-8")
            self._file.write(json.dumps(self.meta) + "\n")

    def write(self, layer: int, pos: int, experts: Sequence[int], hints: Optional[Sequence[int]] = None,
              step: Optional[int] = None) -> None:
        """Record that ``layer`` routed token ``pos`` to ``experts``.

        ``hints``: the layer-ahead predictor's candidates, if any.  ``step``: the forward pass number, the same for
        all tokens of one prefill chunk (omit for one-token decode steps).
        """
        row = [int(e) for e in experts]
        hint_row = None if hints is None else [int(e) for e in hints if int(e) >= 0]
        if self.npz:
            self._rows.append((int(layer), int(pos), row, hint_row, -1 if step is None else int(step)))
            return
        rec: dict[str, Any] = {"layer": int(layer), "pos": int(pos), "experts": row}
        if hint_row is not None:
            rec["hints"] = hint_row
        if step is not None:
            rec["step"] = int(step)
        self._file.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def close(self) -> None:
        """Flush and close (npz: write the file now)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            return
        if not self.npz:
            return
        rows = self._rows
        k = max((len(r[2]) for r in rows), default=int(self.meta["top_k"]))
        experts = np.full((len(rows), k), -1, dtype=np.int16)
        for i, r in enumerate(rows):
            experts[i, :len(r[2])] = r[2]
        arrays = {"layer": np.array([r[0] for r in rows], dtype=np.int16),
                  "pos": np.array([r[1] for r in rows], dtype=np.int64), "experts": experts}
        if any(r[3] is not None for r in rows):
            m = max((len(r[3]) for r in rows if r[3] is not None), default=0)
            hints = np.full((len(rows), max(m, 1)), -1, dtype=np.int16)
            for i, r in enumerate(rows):
                if r[3]:
                    hints[i, :len(r[3])] = r[3]
            arrays["hints"] = hints
        if any(r[4] >= 0 for r in rows):
            arrays["step"] = np.array([r[4] for r in rows], dtype=np.int64)
        with open(self.path, "wb") as f:  # a file object keeps np.savez from appending ".npz"
            np.savez_compressed(f, meta=np.array(json.dumps(self.meta)), **arrays)
        self._rows = []
        self.npz = False  # closed

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_trace(path: str) -> RoutingTrace:
    """Read a trace written by ``TraceWriter`` (format by extension); malformed input raises TraceError."""
    if not os.path.isfile(path):
        raise TraceError(f"{path}: no such trace file")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                hints = z["hints"] if "hints" in z.files else None
                step = z["step"] if "step" in z.files else None
                trace = RoutingTrace(meta, z["layer"], z["pos"], z["experts"], hints, step)
        except (OSError, KeyError, ValueError) as e:
            raise TraceError(f"{path}: not a routing trace npz ({e})") from None
        _validate(trace, path)
        return trace
    layers, poss, experts, hints, steps = [], [], [], [], []
    any_hints = any_steps = False
    with open(path, "r", encoding="utf-8") as f:
        header_line = f.readline()
        try:
            meta = json.loads(header_line)
        except json.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict) or FORMAT_KEY not in meta:
            raise TraceError(f"{path}:1: missing the trace header ({{\"{FORMAT_KEY}\": 1, ...}})")
        for lineno, line in enumerate(f, start=2):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                layers.append(int(rec["layer"]))
                poss.append(int(rec["pos"]))
                experts.append([int(e) for e in rec["experts"]])
                h = rec.get("hints")
                hints.append(None if h is None else [int(e) for e in h])
                any_hints = any_hints or h is not None
                steps.append(int(rec.get("step", -1)))
                any_steps = any_steps or "step" in rec
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise TraceError(f"{path}:{lineno}: malformed record ({e})") from None
    k = max((len(r) for r in experts), default=int(meta.get("top_k", 0)))
    exp_arr = np.full((len(experts), k), -1, dtype=np.int32)
    for i, r in enumerate(experts):
        exp_arr[i, :len(r)] = r
    hint_arr = None
    if any_hints:
        m = max((len(h) for h in hints if h), default=1)
        hint_arr = np.full((len(hints), max(m, 1)), -1, dtype=np.int32)
        for i, h in enumerate(hints):
            if h:
                hint_arr[i, :len(h)] = h
    trace = RoutingTrace(meta, np.array(layers, dtype=np.int32), np.array(poss, dtype=np.int64), exp_arr, hint_arr,
                         np.array(steps, dtype=np.int64) if any_steps else None)
    _validate(trace, path)
    return trace


def _validate(trace: RoutingTrace, path: str) -> None:
    """Expert ids within [0, n_experts) (or -1 padding) and layers among the header's."""
    n = trace.n_experts
    if trace.experts.size and (trace.experts.max() >= n or trace.experts.min() < -1):
        raise TraceError(f"{path}: expert ids outside 0..{n - 1}")
    known = set(trace.layers)
    extra = set(int(l) for l in np.unique(trace.layer)) - known
    if extra:
        raise TraceError(f"{path}: layers {sorted(extra)} are not in the header's layers")


# ---------------------------------------------------------------------------------------------- synthetic


@dataclass
class SyntheticSpec:
    """Parameters of a synthetic trace.  Defaults are Kimi-K2's shape."""

    tokens: int = 1000
    layers: list[int] = field(default_factory=lambda: list(range(1, 61)))
    n_experts: int = 384
    top_k: int = 8
    skew: float = 1.0              # Zipf exponent of per-layer expert popularity (0 = uniform)
    locality: float = 0.5          # chance each choice reuses an expert from the layer's last `window` tokens
    window: int = 8
    drift: float = 0.0             # per token and layer: chance two popularity ranks swap (topic drift)
    hint_accuracy: Optional[float] = None  # simulate layer-ahead hints that contain each used expert w.p. this
    n_hints: Optional[int] = None  # hint list length (default top_k)
    seed: int = 0


def synthetic_trace(spec: Optional[SyntheticSpec] = None, **overrides: Any) -> RoutingTrace:
    """A seeded K2-shaped routing trace (token-major: every layer for token 0, then token 1, ...).

    Each layer has its own random popularity order with Zipf weights 1/rank**skew.  For each of a token's top_k
    distinct choices: with probability ``locality`` reuse a random expert from the layer's last ``window`` tokens,
    otherwise draw from the popularity distribution.
    """
    spec = spec or SyntheticSpec()
    for k, v in overrides.items():
        if not hasattr(spec, k):
            raise TypeError(f"unknown synthetic trace parameter {k!r}")
        setattr(spec, k, v)
    if not 0 <= spec.locality <= 1 or spec.skew < 0 or spec.top_k > spec.n_experts or spec.tokens < 0:
        raise UserError("synthetic trace: need 0 <= locality <= 1, skew >= 0, top_k <= n_experts, tokens >= 0")
    if spec.hint_accuracy is not None and not 0 <= spec.hint_accuracy <= 1:
        raise UserError("synthetic trace: hint accuracy must be between 0 and 1")
    rng = random.Random(spec.seed)
    E, K = spec.n_experts, spec.top_k
    weights = [1.0 / (r + 1) ** spec.skew for r in range(E)]
    cdf, acc = [], 0.0
    for w in weights:
        acc += w
        cdf.append(acc)
    total = acc
    perms = {l: rng.sample(range(E), E) for l in spec.layers}
    recent = {l: deque(maxlen=max(1, spec.window)) for l in spec.layers}
    n_hints = spec.n_hints or K

    def popular(perm: list[int]) -> int:
        return perm[min(E - 1, bisect.bisect_left(cdf, rng.random() * total))]

    n = spec.tokens * len(spec.layers)
    layer_arr = np.empty(n, dtype=np.int32)
    pos_arr = np.empty(n, dtype=np.int64)
    exp_arr = np.empty((n, K), dtype=np.int32)
    hint_arr = np.full((n, n_hints), -1, dtype=np.int32) if spec.hint_accuracy is not None else None
    i = 0
    for t in range(spec.tokens):
        for l in spec.layers:
            perm, hist = perms[l], recent[l]
            if spec.drift and rng.random() < spec.drift:
                a, b = rng.randrange(min(E, 4 * K)), rng.randrange(E)
                perm[a], perm[b] = perm[b], perm[a]
            chosen: list[int] = []
            seen: set[int] = set()
            flat = [e for row in hist for e in row] if hist else []
            tries = 0
            while len(chosen) < K:
                tries += 1
                if flat and tries < 8 * K and rng.random() < spec.locality:
                    e = flat[rng.randrange(len(flat))]
                elif tries < 32 * K:
                    e = popular(perm)
                else:  # pathological settings: fill deterministically
                    e = next(x for x in perm if x not in seen)
                if e not in seen:
                    seen.add(e)
                    chosen.append(e)
            hist.append(chosen)
            layer_arr[i], pos_arr[i] = l, t
            exp_arr[i] = chosen
            if hint_arr is not None:
                hints = [e for e in chosen if rng.random() < spec.hint_accuracy][:n_hints]
                hs = set(hints)
                guard = 0
                while len(hints) < n_hints and guard < 64 * n_hints:
                    guard += 1
                    e = popular(perm)
                    if e not in hs and e not in seen:
                        hs.add(e)
                        hints.append(e)
                rng.shuffle(hints)
                hint_arr[i, :len(hints)] = hints
            i += 1
    meta = {FORMAT_KEY: FORMAT_VERSION, "n_experts": E, "top_k": K, "layers": list(spec.layers),
            "model": "synthetic", "synthetic": {k: v for k, v in vars(spec).items() if k != "layers"}}
    return RoutingTrace(meta, layer_arr, pos_arr, exp_arr, hint_arr)
