"""Routed experts held in host RAM as packed FP8 and computed by the Numba CPU kernels.

This is the default expert backend on every machine: the loader hands each expert's three FP8
projections to :meth:`NumbaRoutedExperts.add_expert` (all three at once) or one at a time to
:meth:`NumbaRoutedExperts.add`; they are packed into the layer's
:class:`~kimi_local.cpu_kernels.fp8_moe.PackedExperts` (the only copy kept), and a MoE layer call runs
:func:`~kimi_local.cpu_kernels.fp8_moe.moe_forward` on them.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

import numpy as np
import torch

from kimi_local.checkpoint import CheckpointError
from kimi_local.config import ModelArgs
from kimi_local.fp8 import FP8BlockWeight

PROJS = ("gate_proj", "up_proj", "down_proj")


def hugepage_alloc(shape, dtype) -> np.ndarray:
    """Zeroed host memory backed by an anonymous mapping advised for transparent huge pages.

    A 1 TB expert store in 4 KiB pages is 250 million page faults on first touch; 2 MiB pages cut that
    512-fold (measured here: first-touch fill 0.47 GB/s with 4 KiB pages, 1.3 GB/s with huge pages).
    """
    import mmap

    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    if n == 0:
        return np.zeros(shape, dtype)
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # THP disabled: plain pages still work
    return np.frombuffer(m, dtype=dtype).reshape(shape)  # the array's base keeps the mapping alive


def host_f32(t: torch.Tensor) -> np.ndarray:
    """A contiguous float32 numpy array of ``t`` (no copy when it already is one on the CPU)."""
    t = t.detach()
    if t.device.type != "cpu" or t.dtype != torch.float32:
        t = t.to("cpu", torch.float32)
    return t.contiguous().numpy()


def fp8_numpy(w: FP8BlockWeight) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 e4m3 bytes, float32 scale grid) numpy views of a CPU FP8BlockWeight."""
    return w.q.view(torch.uint8).numpy(), w.scale_inv.float().numpy()


class NumbaRoutedExperts:
    """All routed experts of every MoE layer resident in RAM (slot == expert id)."""

    def __init__(self, args: ModelArgs, alloc: Callable = hugepage_alloc):
        from kimi_local.cpu_kernels import fp8_moe

        self.args = args
        self._k = fp8_moe
        self.layers = {L: fp8_moe.PackedExperts.allocate(args.n_routed_experts, args.hidden_size,
                                                         args.moe_intermediate_size, args.weight_block_size, alloc,
                                                         zeroed=alloc is hugepage_alloc)
                       for L in args.moe_layer_ids}
        self._pending: dict[tuple[int, int], dict[str, FP8BlockWeight]] = {}
        self._lock = threading.Lock()
        self.compile_seconds: Optional[float] = None

    def add(self, layer_id: int, expert_id: int, proj: str, weight) -> None:
        if not isinstance(weight, FP8BlockWeight):
            raise CheckpointError(
                f"model.layers.{layer_id}.mlp.experts.{expert_id}.{proj}.weight is not FP8: the numba expert "
                "backend runs block-FP8 experts only (use --expert-backend torch for unquantised checkpoints)")
        key = (layer_id, expert_id)
        with self._lock:  # the loader calls from several threads
            parts = self._pending.setdefault(key, {})
            parts[proj] = weight
            complete = len(parts) == 3
            if complete:
                del self._pending[key]
        if complete:
            g, u, d = (fp8_numpy(parts[p]) for p in PROJS)
            self.add_expert(layer_id, expert_id, *g, *u, *d)

    def add_expert(self, layer_id: int, expert_id: int, w1_q, w1_s, w3_q, w3_s, w2_q, w2_s) -> None:
        """One expert's three FP8 projections at once: uint8 e4m3 arrays (only read, by the packer: a reused read
        buffer is fine) and float32 scale grids."""
        try:
            self.layers[layer_id].set_slot(expert_id, w1_q, w1_s, w3_q, w3_s, w2_q, w2_s)
        except ValueError as e:  # e.g. an e4m3 NaN code: name the expert
            raise CheckpointError(f"model.layers.{layer_id}.mlp.experts.{expert_id}: {e}") from None

    def finalize(self) -> None:
        """Check every expert arrived, then compile the kernels now (never on the first token)."""
        for L, packed in self.layers.items():
            missing = np.flatnonzero(~packed.filled)
            if missing.size:
                raise CheckpointError(f"model.layers.{L}.mlp.experts.{int(missing[0])}: expert weights incomplete")
        self.compile_seconds = self._k.warmup()

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.layers.values())

    def __call__(self, layer_id: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = self._k.moe_forward(self.layers[layer_id], host_f32(x), idx.detach().cpu().numpy(), host_f32(weights),
                                  precision=self._k.precision_for(x.dtype))
        y = torch.from_numpy(out)
        return y if x.dtype == torch.float32 and x.device.type == "cpu" else y.to(device=x.device, dtype=x.dtype)
