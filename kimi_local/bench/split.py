"""Where a decoded token's time goes: timing hooks installed for one measured run, then removed.

Nothing here touches the normal path: the hooks are torch forward (pre-)hooks on the model's modules, a
wrapper around the routed-expert callable (``model.set_experts``), a timed wrapper of the module-level
``fp8_moe.moe_forward`` (the CPU kernels), and a timed sampler; :class:`DecodeSplit` installs them on
``__enter__`` and restores everything on ``__exit__``.

Categories (seconds, summed over the measured window):

* ``attention``      MLA modules (projections, RoPE, cache writes, attention itself)
* ``router``         MoE gate (logits, sigmoid, group-limited top-k)
* ``shared_expert``  the shared-expert MLP of every MoE layer
* ``routed_cpu``     time inside the CPU expert kernels (``fp8_moe.moe_forward``)
* ``routed_gpu``     fast-tier (GPU / emulated) expert compute, from the offload runtime's own counters; 0 otherwise
* ``transfers``      the rest of the routed-expert call: activation copies and casts between the attention
                     device and the kernels, disk -> RAM expert fills, fast-tier bookkeeping and prefetch
* ``sampling``       the sampler (logits -> token)
* ``dense_mlp``      the dense first layer(s)' MLP (an extra, not in the issue's list)
* ``other``          everything else: embedding, norms, residual adds, lm_head, engine and Python overhead
                     (total minus the categories above)
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

CATEGORIES = ("attention", "router", "shared_expert", "routed_cpu", "routed_gpu", "transfers", "sampling",
              "dense_mlp", "other")


class _Acc:
    def __init__(self, sync: bool):
        self.t = {c: 0.0 for c in CATEGORIES}
        self.sync = sync
        self.routed_calls = 0
        self.routed_wall = 0.0
        self.ram_expert_reads = 0      # expert computations from host RAM (unique experts per call)
        self.fast_expert_reads = 0     # expert computations on the fast tier
        self.disk_bytes = 0
        self.fast_upload_bytes = 0     # RAM -> fast tier copies


    def reset(self) -> None:
        for c in self.t:
            self.t[c] = 0.0
        self.routed_calls = 0
        self.routed_wall = 0.0
        self.ram_expert_reads = self.fast_expert_reads = self.disk_bytes = self.fast_upload_bytes = 0

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()


class _TimedExperts:
    """Wraps the routed-expert callable; every other attribute goes to the real one."""

    def __init__(self, inner, acc: _Acc):
        self.__dict__["_inner"] = inner
        self.__dict__["_acc"] = acc

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _offload_totals(self) -> Optional[tuple[float, int, int, int]]:
        st = getattr(self._inner, "stats_by_layer", None)
        if not st:
            return None
        fast_s = sum(s.fast_seconds for s in st.values())
        fast_uses = sum(s.fast_uses for s in st.values())
        disk = sum(getattr(s, "disk_bytes", 0) for s in st.values())
        up = sum(getattr(s, "fast_bytes", 0) for s in st.values())
        return fast_s, fast_uses, disk, up

    def __call__(self, layer_id, x, idx, weights):
        acc = self._acc
        before = self._offload_totals()
        t0 = acc.now()
        y = self._inner(layer_id, x, idx, weights)
        dt = acc.now() - t0
        acc.routed_wall += dt
        acc.routed_calls += 1
        n_unique = int(np.unique(idx.detach().to("cpu").numpy()).size)
        fast_uses = 0
        if before is not None:
            after = self._offload_totals()
            acc.t["routed_gpu"] += after[0] - before[0]
            fast_uses = after[1] - before[1]
            acc.disk_bytes += after[2] - before[2]
            acc.fast_upload_bytes += after[3] - before[3]
        fast_unique = min(n_unique, fast_uses)   # exact for one token (decode)
        acc.fast_expert_reads += fast_unique
        acc.ram_expert_reads += n_unique - fast_unique
        return y


class DecodeSplit:
    """Context manager: install the timing hooks on ``engine``'s model; ``reset()`` starts the window."""

    def __init__(self, engine):
        self.engine = engine
        self.model = engine.model
        dev = next(self.model.parameters()).device
        self.acc = _Acc(sync=dev.type == "cuda")
        self._handles: list = []
        self._saved: dict = {}

    # ------------------------------------------------------------------ install / remove
    def _hook(self, module, cat: str) -> None:
        acc = self.acc
        key = "_bench_t0"

        def pre(mod, inp):
            mod.__dict__[key] = acc.now()

        def post(mod, inp, out):
            acc.t[cat] += acc.now() - mod.__dict__.pop(key)

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def __enter__(self) -> "DecodeSplit":
        from kimi_local import engine as engine_mod
        from kimi_local.model import MoE

        for layer in self.model.model.layers:
            self._hook(layer.self_attn, "attention")
            if isinstance(layer.mlp, MoE):
                self._hook(layer.mlp.gate, "router")
                if layer.mlp.shared_experts is not None:
                    self._hook(layer.mlp.shared_experts, "shared_expert")
            else:
                self._hook(layer.mlp, "dense_mlp")
        # routed experts
        self._saved["experts"] = self.model.experts
        self.model.set_experts(_TimedExperts(self.model.experts, self.acc))
        # CPU kernels
        try:
            from kimi_local.cpu_kernels import fp8_moe
        except ImportError:
            fp8_moe = None
        if fp8_moe is not None:
            real = fp8_moe.moe_forward
            acc = self.acc

            def timed_moe_forward(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return real(*a, **kw)
                finally:
                    acc.t["routed_cpu"] += time.perf_counter() - t0

            self._saved["moe_forward"] = (fp8_moe, real)
            fp8_moe.moe_forward = timed_moe_forward
        # sampler
        real_make = engine_mod.make_sampler
        acc = self.acc

        def make_timed_sampler(params):
            s = real_make(params)

            def sample(logits, history):
                t0 = acc.now()
                try:
                    return s(logits, history)
                finally:
                    acc.t["sampling"] += acc.now() - t0
            return sample

        self._saved["make_sampler"] = (engine_mod, real_make)
        engine_mod.make_sampler = make_timed_sampler
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if "experts" in self._saved:
            self.model.set_experts(self._saved.pop("experts"))
        if "moe_forward" in self._saved:
            mod, real = self._saved.pop("moe_forward")
            mod.moe_forward = real
        if "make_sampler" in self._saved:
            mod, real = self._saved.pop("make_sampler")
            mod.make_sampler = real

    # ------------------------------------------------------------------ results
    def reset(self) -> None:
        self.acc.reset()

    def totals(self, total_seconds: float, tokens: int) -> dict:
        """Per-token seconds by category (``other`` = the remainder), and the window's totals."""
        a = self.acc
        t = dict(a.t)
        if a.routed_calls and t["routed_cpu"] == 0.0:
            # no kernel call seen: the torch reference backend, whose whole call is CPU compute
            t["routed_cpu"] = max(0.0, a.routed_wall - t["routed_gpu"])
        t["transfers"] = max(0.0, a.routed_wall - t["routed_cpu"] - t["routed_gpu"])
        measured = sum(v for k, v in t.items() if k != "other")
        t["other"] = max(0.0, total_seconds - measured)
        n = max(1, tokens)
        return {
            "seconds_per_token": total_seconds / n,
            "per_token_seconds": {k: v / n for k, v in t.items()},
            "fraction": {k: (v / total_seconds if total_seconds > 0 else 0.0) for k, v in t.items()},
            "tokens": tokens,
            "routed_calls_per_token": a.routed_calls / n,
            "ram_expert_reads_per_token": a.ram_expert_reads / n,
            "fast_expert_reads_per_token": a.fast_expert_reads / n,
            "disk_bytes_per_token": a.disk_bytes / n,
            "fast_upload_bytes_per_token": a.fast_upload_bytes / n,
            "routed_cpu_seconds_total": t["routed_cpu"],
        }
