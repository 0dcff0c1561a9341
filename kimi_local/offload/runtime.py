"""The offload runtime: routed experts across a fast tier (GPU, or emulated), host RAM and the disk.

Tiers, per MoE layer:

* **fast** (``--gpu-expert-slots N``): N expert slots on the GPU (or, with ``--gpu-tier emulate``, a
  separate CPU store with its own budget).  Experts there are computed by torch on that device.
  Loads into it are asynchronous (a CUDA copy stream / a loader thread) and bounded per step; a step
  never waits for one: an expert whose copy has not finished runs on the CPU instead.
* **ram**: packed FP8 slots computed by the Numba CPU kernels.  With the whole budget (default) every
  expert of every layer is resident (slot == expert id).  With ``--expert-ram`` below the experts'
  size, each layer gets a fixed number of slots; a miss reads the expert from the checkpoint on disk.
* **disk**: the checkpoint's own safetensors, read with ``pread`` and dropped from the page cache
  afterwards (``POSIX_FADV_DONTNEED``) so the RAM budget is real, not hidden in the page cache.

Per layer call: experts resident *and ready* on the fast tier are computed there while the CPU kernels
run the rest in a worker thread (Numba releases the GIL); results are summed in one place.  Then layer
l+1's router is applied to layer l's hidden state; the predictor blends that hint with online
recency/frequency statistics, and the predicted experts are prefetched: disk -> RAM in a background
thread, RAM -> fast tier on the copy stream.  Prefetching never changes results: every expert is
computed from the same FP8 bytes whichever tier holds it.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from kimi_local.checkpoint import CheckpointError, CheckpointReader, TensorInfo
from kimi_local.config import ModelArgs
from kimi_local.errors import UserError
from kimi_local.fp8 import FP8BlockWeight
from kimi_local.offload.cuda import CopyStream, cuda_available, pinned_allocator
from kimi_local.offload.host_experts import PROJS, fp8_numpy, host_f32, hugepage_alloc
from kimi_local.offload.policies import make_cache
from kimi_local.offload.predictor import ExpertPredictor, PredictionStats

log = logging.getLogger(__name__)


@dataclass
class OffloadOptions:
    expert_ram: Optional[str] = None      # SIZE or PERCENT of the routed experts' bytes; None = all
    fast_slots: int = 0                   # per-layer fast-tier slots
    fast_tier: str = "auto"               # auto | cuda | emulate | off
    policy: str = "predictive"            # lru | lfu | predictive
    trace_path: Optional[str] = None
    device: str = "cpu"
    fast_loads_per_step: float = 2.0      # fast-tier refill budget per layer per step (PCIe is the limit)
    prefetch: bool = True

    @classmethod
    def from_args(cls, args) -> "OffloadOptions":
        if args.gpu_expert_slots < 0:
            raise UserError(f"--gpu-expert-slots must be >= 0, got {args.gpu_expert_slots}")
        return cls(expert_ram=args.expert_ram, fast_slots=args.gpu_expert_slots, fast_tier=args.gpu_tier,
                   policy=args.cache_policy, trace_path=args.trace_routing, device=getattr(args, "device", "cpu"))


def expert_nbytes(args: ModelArgs) -> int:
    """Checkpoint bytes of one routed expert: 3 FP8 matrices + their float32 block scales (44,050,944 for K2)."""
    D, I = args.hidden_size, args.moe_intermediate_size
    b0, b1 = args.weight_block_size
    g = lambda r, c: (-(-r // b0)) * (-(-c // b1))
    return 3 * D * I + 4 * (2 * g(I, D) + g(D, I))


class DiskExperts:
    """Reads one expert's six tensors straight from the checkpoint shards, bypassing the page cache's
    long-term memory: each read is followed by ``POSIX_FADV_DONTNEED`` on the range."""

    def __init__(self, model_dir: str, tensors: dict[str, TensorInfo], args: ModelArgs):
        self.reader = CheckpointReader(model_dir, tensors)
        self.args = args
        self.bytes_read = 0

    def _read(self, name: str, dtype) -> np.ndarray:
        info = self.reader.tensors.get(name)
        if info is None:
            raise CheckpointError(f"missing tensor '{name}' needed by the disk tier")
        out = np.empty(info.shape, dtype=dtype)
        self.reader.read_into(name, memoryview(out.reshape(-1).view(np.uint8)).cast("B"), drop_cache=True)
        self.bytes_read += info.nbytes
        return out

    def read(self, layer: int, expert: int) -> tuple:
        """(gate_q, gate_s, up_q, up_s, down_q, down_s): uint8 e4m3 bytes and float32 scale grids."""
        out = []
        for proj in PROJS:
            name = f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
            out.append(self._read(name, np.uint8))
            out.append(self._read(name + "_scale_inv", np.float32))
        return tuple(out)

    def close(self) -> None:
        self.reader.close()


@dataclass
class LayerStats:
    tokens: int = 0
    expert_uses: int = 0          # (token, expert) pairs
    fast_uses: int = 0            # ... computed on the fast tier
    ram_hits: int = 0             # distinct experts per call found in RAM
    ram_misses: int = 0           # ... read from disk on demand
    disk_prefetch: int = 0        # experts read from disk ahead of use
    disk_bytes: int = 0
    fast_loads: int = 0
    fast_bytes: int = 0
    cpu_seconds: float = 0.0
    fast_seconds: float = 0.0

    def add(self, o: "LayerStats") -> "LayerStats":
        return LayerStats(**{k: getattr(self, k) + getattr(o, k) for k in self.__dataclass_fields__})


class OffloadedExperts:
    """Routed-expert backend over the fast/RAM/disk tiers (the loader and the model see one callable)."""

    def __init__(self, args: ModelArgs, opts: OffloadOptions):
        from kimi_local.cpu_kernels import fp8_moe
        self._k = fp8_moe
        self.args, self.opts = args, opts
        self.layers = args.moe_layer_ids
        self.E, self.K = args.n_routed_experts, args.num_experts_per_tok
        self.expert_bytes = expert_nbytes(args)
        total = self.expert_bytes * self.E * len(self.layers)
        self.ram_slots = self._ram_slots(opts.expert_ram, total)
        self.resident_all = self.ram_slots >= self.E
        # Fast tier.
        kind = opts.fast_tier
        if kind == "auto":
            kind = "cuda" if (opts.fast_slots > 0 and cuda_available()) else "off"
        if kind == "cuda" and not cuda_available():
            raise UserError("--gpu-tier cuda: no CUDA device is available (use --gpu-tier emulate to test the cache on CPU)")
        if kind != "off" and opts.fast_slots <= 0:
            kind = "off"
        self.fast_kind = kind
        self.fast_device = torch.device(opts.device if kind == "cuda" and str(opts.device).startswith("cuda") else
                                        ("cuda" if kind == "cuda" else "cpu"))
        self.fast_slots = opts.fast_slots if kind != "off" else 0
        self.copy = CopyStream(self.fast_device) if kind != "off" else None
        alloc, self.pin_report = pinned_allocator(kind == "cuda", fallback=hugepage_alloc)
        self.packed = {L: fp8_moe.PackedExperts.allocate(min(self.ram_slots, self.E), args.hidden_size,
                                                         args.moe_intermediate_size, args.weight_block_size, alloc,
                                                         zeroed=kind != "cuda")   # pinned memory is not zeroed
                       for L in self.layers}
        # expert -> RAM slot, per layer; with everything resident, slot == expert.
        self.slot_of: dict[int, dict[int, int]] = {L: {} for L in self.layers}
        self.ram_ready: dict[int, set[int]] = {L: set() for L in self.layers}   # slots holding valid bytes
        self.ram_policy = {L: make_cache(opts.policy, min(self.ram_slots, self.E)) for L in self.layers}
        self.fast_policy = {L: make_cache(opts.policy, self.fast_slots) for L in self.layers} if self.fast_slots else {}
        self.fast_store: dict[int, dict[int, tuple]] = {L: {} for L in self.layers}   # expert -> (weights, event)
        self.predictor = ExpertPredictor(self.E, self.K)
        self.pred_stats = PredictionStats()
        self._predicted: dict[int, list[int]] = {}
        self._hints: dict[int, list[int]] = {}     # last layer-ahead candidates, recorded in traces
        self._ram_pending: dict[int, dict[int, cf.Future]] = {L: {} for L in self.layers}
        self._fast_begun: set[int] = set()
        self.stats_by_layer = {L: LayerStats() for L in self.layers}
        self.disk: Optional[DiskExperts] = None
        self.gates: dict[int, object] = {}
        self._pending_add: dict[tuple[int, int], dict[str, FP8BlockWeight]] = {}
        self._add_lock = threading.Lock()
        self._io = cf.ThreadPoolExecutor(1, thread_name_prefix="kimi-disk-prefetch")
        self._cpu = cf.ThreadPoolExecutor(1, thread_name_prefix="kimi-cpu-experts")
        self._fast_io = cf.ThreadPoolExecutor(1, thread_name_prefix="kimi-fast-load") if self.fast_slots else None
        self._pos = 0
        self._step = 0
        self.trace = None
        if opts.trace_path:
            from kimi_local.offload.traces import TraceWriter
            self.trace = TraceWriter(opts.trace_path, self.E, self.K, self.layers)
        self.compile_seconds: Optional[float] = None

    # ------------------------------------------------------------------ construction helpers

    def _ram_slots(self, spec: Optional[str], total: int) -> int:
        if spec is None:
            return self.E
        from kimi_local.offload.placement import parse_size
        budget = parse_size(spec, what="--expert-ram", percent_of=total, percent_base_name="the routed experts")
        per_layer = budget // (self.expert_bytes * len(self.layers))
        if per_layer < self.K:
            raise UserError(
                f"--expert-ram {spec}: {budget} bytes give {per_layer} expert slots per MoE layer; at least "
                f"{self.K} (num_experts_per_tok) x {self.expert_bytes} bytes x {len(self.layers)} layers = "
                f"{self.K * self.expert_bytes * len(self.layers)} bytes are needed")
        return int(min(per_layer, self.E))

    @classmethod
    def from_args(cls, model_dir: str, opts: OffloadOptions) -> "OffloadedExperts":
        return cls(ModelArgs.from_model_dir(model_dir), opts)

    # ------------------------------------------------------------------ loader protocol

    def bind_checkpoint(self, tensors: dict[str, TensorInfo], model_dir: str) -> None:
        """The loader tells us where every expert lives on disk (used when RAM holds only part of them)."""
        self.disk = DiskExperts(model_dir, tensors, self.args)

    def accepts(self, layer: int, expert: int) -> bool:
        """Whether the loader should read this expert now: the first ``ram_slots`` experts of each layer
        warm the RAM tier; the rest stay on disk until routed to."""
        return expert < self.ram_slots

    def add(self, layer: int, expert: int, proj: str, weight) -> None:
        if not isinstance(weight, FP8BlockWeight):
            raise CheckpointError(f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight is not FP8: the offload "
                                  "runtime runs block-FP8 experts only")
        with self._add_lock:  # the loader calls from several threads
            parts = self._pending_add.setdefault((layer, expert), {})
            parts[proj] = weight
            complete = len(parts) == 3
            if complete:
                del self._pending_add[(layer, expert)]
        if complete:
            arrays = []
            for p in PROJS:
                arrays.extend(fp8_numpy(parts[p]))
            self._fill_ram(layer, expert, expert, arrays)
            with self._add_lock:
                self.slot_of[layer][expert] = expert
                self.ram_policy[layer].prefetch([expert])   # mark resident in the policy's bookkeeping

    def finalize(self) -> None:
        for L in self.layers:
            if len(self.slot_of[L]) < min(self.ram_slots, self.E):
                raise CheckpointError(f"model.layers.{L}: routed experts incomplete after loading")
            self.ram_policy[L].begin_step(None)
        if not self.resident_all and self.disk is None:
            raise UserError("the RAM budget holds only part of the experts but no checkpoint was bound for the disk tier")
        self.compile_seconds = self._k.warmup()

    def attach_model(self, model) -> None:
        """Give the predictor each MoE layer's router (layer l+1's gate is applied to layer l's state)."""
        from kimi_local.model import MoE
        for i, layer in enumerate(model.model.layers):
            if isinstance(layer.mlp, MoE):
                self.gates[i] = layer.mlp.gate

    def begin_forward(self, start_pos: int, n_tokens: int) -> None:
        self._pos = start_pos
        self._step += 1

    # ------------------------------------------------------------------ tiers

    def _fill_ram(self, layer: int, expert: int, slot: int, arrays) -> None:
        try:
            self.packed[layer].set_slot(slot, *arrays)
        except ValueError as e:
            raise CheckpointError(f"model.layers.{layer}.mlp.experts.{expert}: {e}") from None
        self.ram_ready[layer].add(expert)

    def _wait_ram_prefetch(self, layer: int) -> None:
        """Before a layer runs: drop its prefetches that have not started, wait for the one in flight."""
        pending = self._ram_pending[layer]
        for e, fut in list(pending.items()):
            if not fut.cancel():
                try:
                    fut.result()
                except Exception as ex:   # a failed prefetch must not break the step: read on demand instead
                    log.warning("prefetch of layer %d expert %d failed: %s", layer, e, ex)
        pending.clear()

    def _sync_slots(self, layer: int) -> list[tuple[int, int]]:
        """Reconcile expert->slot with the RAM policy's residents; returns new (expert, slot) assignments,
        whose slots hold nothing valid until filled."""
        policy, slot_of, ready = self.ram_policy[layer], self.slot_of[layer], self.ram_ready[layer]
        resident = policy.resident()
        for e in [e for e in slot_of if e not in resident]:
            del slot_of[e]
            ready.discard(e)
        used = set(slot_of.values())
        free = [s for s in range(self.packed[layer].n_slots) if s not in used]
        new = []
        for e in sorted(resident):
            if e not in slot_of:
                s = free.pop()
                slot_of[e] = s
                new.append((e, s))
        return new

    def _ensure_ram(self, layer: int, experts: list[int], st: LayerStats) -> None:
        """Make ``experts`` resident in RAM (they fit: callers group them by the slot count)."""
        if self.resident_all:
            return
        policy = self.ram_policy[layer]
        policy.begin_step(None)
        for e in experts:
            if policy.access(e) and e in self.ram_ready[layer]:
                st.ram_hits += 1
            else:
                st.ram_misses += 1
        self._sync_slots(layer)
        for e in experts:
            if e not in self.ram_ready[layer]:   # a miss, or a prefetch that was dropped
                arrays = self.disk.read(layer, e)
                self._fill_ram(layer, e, self.slot_of[layer][e], arrays)
                st.disk_bytes += sum(a.nbytes for a in arrays)

    def _prefetch_ram(self, layer: int, experts: list[int]) -> None:
        if self.resident_all or not experts:
            return
        policy = self.ram_policy[layer]
        policy.begin_step(None)
        # At most half the slots: the step still needs room for experts the prediction missed.
        policy.prefetch(experts[: max(1, self.packed[layer].n_slots // 2)])
        st = self.stats_by_layer[layer]
        for e, s in self._sync_slots(layer):
            def job(e=e, s=s):
                arrays = self.disk.read(layer, e)
                self._fill_ram(layer, e, s, arrays)
                st.disk_bytes += sum(a.nbytes for a in arrays)
            st.disk_prefetch += 1
            self._ram_pending[layer][e] = self._io.submit(job)

    def _fast_weights(self, layer: int, expert: int) -> list[torch.Tensor]:
        """The expert's FP8 bytes + scales as host tensors.  From RAM when every expert is resident (slots
        never change then); otherwise from disk, so a fast-tier load never races a RAM slot being refilled."""
        if self.resident_all:
            arrays = self.packed[layer].get_slot(expert)
        else:
            arrays = self.disk.read(layer, expert)
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]

    def _fast_load(self, layer: int, experts: list[int]) -> None:
        st = self.stats_by_layer[layer]
        store = self.fast_store[layer]
        for e in experts:
            store.pop(e, None)   # the slot is being refilled: not usable until the copy lands

            def job(e=e):
                host = self._fast_weights(layer, e)
                dev, event = self.copy.copy(host)
                if e in self.fast_policy[layer]:   # still wanted (not evicted while loading)
                    store[e] = (dev, event)
            st.fast_loads += 1
            st.fast_bytes += self.expert_bytes
            self._fast_io.submit(job)

    def _fast_begin(self, layer: int) -> None:
        if layer not in self._fast_begun:
            self.fast_policy[layer].begin_step(self.opts.fast_loads_per_step)
            self._fast_begun.add(layer)

    def _fast_update(self, layer: int, before: frozenset) -> None:
        after = self.fast_policy[layer].resident()
        for e in before - after:
            self.fast_store[layer].pop(e, None)
        new = sorted(after - before)
        if new:
            self._fast_load(layer, new)

    def _fast_ready(self, layer: int, expert: int) -> bool:
        item = self.fast_store[layer].get(expert)
        return item is not None and CopyStream.ready(item[1])

    # ------------------------------------------------------------------ compute

    def _cpu_part(self, layer: int, x: np.ndarray, idx: np.ndarray, w: np.ndarray, st: LayerStats,
                  precision: str) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.zeros((x.shape[0], self.args.hidden_size), np.float32)
        needed = [int(e) for e in np.unique(idx[idx >= 0])]
        cap = self.packed[layer].n_slots
        for g in range(0, len(needed), cap):
            group = needed[g: g + cap]
            self._ensure_ram(layer, group, st)
            slot_of = self.slot_of[layer]
            lut = np.full(self.E, -1, np.int64)
            for e in group:
                lut[e] = e if self.resident_all else slot_of[e]
            slots = np.where(idx >= 0, lut[np.maximum(idx, 0)], -1)
            out += self._k.moe_forward(self.packed[layer], x, slots, w, precision=precision)
        st.cpu_seconds += time.perf_counter() - t0
        return out

    def _fast_part(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, experts: list[int],
                   st: LayerStats) -> torch.Tensor:
        t0 = time.perf_counter()
        dev = self.fast_device
        xf = x.to(dev, torch.float32)
        out = torch.zeros_like(xf)
        block = self.args.weight_block_size
        for e in experts:
            (gq, gs, uq, us, dq, ds), event = self.fast_store[layer][e]
            self.copy.make_current_wait(event)
            tok, k = torch.nonzero(idx == e, as_tuple=True)
            tok_d = tok.to(dev)
            h = xf[tok_d]
            gw = FP8BlockWeight(gq, gs, block).dequantize(torch.float32)
            uw = FP8BlockWeight(uq, us, block).dequantize(torch.float32)
            dw = FP8BlockWeight(dq, ds, block).dequantize(torch.float32)
            y = (torch.nn.functional.silu(h @ gw.T) * (h @ uw.T)) @ dw.T
            out.index_add_(0, tok_d, y * w[tok, k].to(dev, torch.float32)[:, None])
        st.fast_seconds += time.perf_counter() - t0
        return out

    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.submit(layer, x, idx, weights)()

    def submit(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor):
        """Start the layer's routed experts; returns a function that finishes them and gives the output.

        When the activations live on a GPU, the CPU kernels start at once in a worker thread (Numba
        releases the GIL) and the caller computes the shared expert on the GPU meanwhile
        (:class:`~kimi_local.model.MoE` does); on a CPU-only model they run right here (there is nothing
        to overlap with).  The caller then calls the result function, which computes the fast tier's
        experts, joins the CPU part, sums, and prefetches for the next layer.
        """
        st = self.stats_by_layer[layer]
        self._wait_ram_prefetch(layer)
        idx_c = idx.to("cpu")
        idx_np = idx_c.numpy().astype(np.int64)
        needed = np.unique(idx_np)
        st.tokens += idx_np.shape[0]
        st.expert_uses += idx_np.size
        if layer in self._predicted:
            self.pred_stats.record(layer, self._predicted.pop(layer), needed.tolist())
        self.predictor.observe(layer, needed.tolist())
        if self.trace is not None:
            hints = self._hints.get(layer)
            for t in range(idx_np.shape[0]):
                self.trace.write(layer, self._pos + t, idx_np[t].tolist(), hints=hints,
                                 step=self._step if idx_np.shape[0] > 1 else None)

        fast_experts: list[int] = []
        if self.fast_slots:
            self._fast_begin(layer)
            policy = self.fast_policy[layer]
            before = policy.resident()
            ready_before = {e for e in needed.tolist() if self._fast_ready(layer, int(e))}
            for e in needed.tolist():
                policy.access(int(e))
            self._fast_update(layer, before)
            self._fast_begun.discard(layer)
            # Only experts whose copy had landed *before* this step's loads are used: never wait on a transfer.
            fast_experts = sorted(e for e in ready_before if self._fast_ready(layer, e))

        w_np = host_f32(weights)
        x_np = host_f32(x)
        cpu_idx = idx_np
        if fast_experts:
            on_fast = np.isin(idx_np, fast_experts)
            cpu_idx = np.where(on_fast, -1, idx_np)
            st.fast_uses += int(on_fast.sum())
        args = (layer, x_np, cpu_idx, w_np, st, self._k.precision_for(x.dtype))
        if x.device.type == "cpu":
            # Nothing to overlap with: the caller's next work (the shared expert) runs on the same cores, and a
            # second thread calling the kernels brings its own OpenMP team that spins against this one
            # (measured on the tiny model: 4-5 ms per decode step instead of 1.5).
            fut = cf.Future()
            try:
                fut.set_result(self._cpu_part(*args))
            except BaseException as e:   # surfaces in finish(), as from the worker
                fut.set_exception(e)
        else:
            fut = self._cpu.submit(self._cpu_part, *args)

        def finish() -> torch.Tensor:
            y_fast = self._fast_part(layer, x, idx_c, weights, fast_experts, st) if fast_experts else None
            y = torch.from_numpy(fut.result())            # the CPU part ran alongside the work above
            if y_fast is not None:
                y = y.to(y_fast.device) + y_fast
            if self.opts.prefetch:
                self._predict_and_prefetch(layer, x)
            return y.to(device=x.device, dtype=x.dtype)
        return finish


    def _next_layer(self, layer: int) -> Optional[int]:
        i = self.layers.index(layer)
        return self.layers[i + 1] if i + 1 < len(self.layers) else None

    def _predict_and_prefetch(self, layer: int, x: torch.Tensor) -> None:
        nxt = self._next_layer(layer)
        if nxt is None or (self.resident_all and not self.fast_slots):
            return
        hint = None
        gate = self.gates.get(nxt)
        if gate is not None:
            # Layer l+1's router on layer l's (normalised) hidden state: the layer-ahead guess.
            logits = torch.nn.functional.linear(x.float(), gate.weight.float())
            scores = logits.sigmoid() if self.args.scoring_func == "sigmoid" else logits.softmax(-1)
            if gate.e_score_correction_bias is not None:
                scores = scores + gate.e_score_correction_bias.float()
            hint = scores.amax(dim=0).cpu().numpy().astype(np.float64)
        k = min(self.E, self.K * max(1, x.shape[0]))
        pred = self.predictor.predict(nxt, hint, k=k)
        self._predicted[nxt] = pred
        self._hints[nxt] = pred[: self.K]
        self._prefetch_ram(nxt, pred)
        if self.fast_slots:
            self._fast_begin(nxt)
            policy = self.fast_policy[nxt]
            before = policy.resident()
            policy.prefetch(pred[: self.fast_slots])
            self._fast_update(nxt, before)

    # ------------------------------------------------------------------ figures

    def stats(self) -> dict:
        """Per-layer and total figures: hit rates per tier, prediction precision/recall, bytes moved, times."""
        total = LayerStats()
        for s in self.stats_by_layer.values():
            total = total.add(s)
        tokens = max(1, total.tokens // max(1, len(self.layers)))
        ram_acc = total.ram_hits + total.ram_misses

        def layer_dict(s: LayerStats) -> dict:
            d = dict(s.__dict__)
            d["fast_hit_rate"] = s.fast_uses / s.expert_uses if s.expert_uses else 0.0
            d["ram_hit_rate"] = s.ram_hits / (s.ram_hits + s.ram_misses) if (s.ram_hits + s.ram_misses) else 1.0
            return d

        return {
            "tiers": {"fast": self.fast_kind, "fast_slots_per_layer": self.fast_slots,
                      "ram_slots_per_layer": min(self.ram_slots, self.E), "experts_per_layer": self.E,
                      "resident_all": self.resident_all, "policy": self.opts.policy,
                      "ram_bytes": sum(p.nbytes for p in self.packed.values()), **self.pin_report},
            "total": {**layer_dict(total),
                      "ram_hit_rate": (total.ram_hits / ram_acc) if ram_acc else 1.0,
                      "disk_bytes_per_token": total.disk_bytes / tokens,
                      "fast_bytes_per_token": total.fast_bytes / tokens,
                      "prediction_precision": self.pred_stats.precision(),
                      "prediction_recall": self.pred_stats.recall()},
            "layers": {L: layer_dict(s) for L, s in self.stats_by_layer.items()},
        }

    def close(self) -> None:
        self._io.shutdown(wait=True)
        self._cpu.shutdown(wait=True)
        if self._fast_io:
            self._fast_io.shutdown(wait=True)
        if self.trace is not None:
            self.trace.close()
            self.trace = None
        if self.disk is not None:
            self.disk.close()
