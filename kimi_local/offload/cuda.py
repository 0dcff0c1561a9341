"""Every CUDA-specific piece of the offload runtime: pinned host buffers, a copy stream, readiness events.

Everything else talks to these through small functions that also work without CUDA (plain memory, no
stream, always-ready), so the same code paths run and are tested on CPU-only machines.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

_NP_TO_TORCH = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pinned_allocator(enabled: bool, fallback: Callable = np.empty) -> tuple[Callable, dict]:
    """An ``alloc(shape, dtype) -> np.ndarray`` that page-locks memory when CUDA is present.

    Pinning can fail (RLIMIT_MEMLOCK, container limits); then the buffer falls back to pageable memory
    and the returned report says so, so callers can tell the user instead of dying.
    """
    report = {"pinned_bytes": 0, "pageable_bytes": 0, "pin_error": None}

    def alloc(shape, dtype):
        dtype = np.dtype(dtype)
        if enabled and report["pin_error"] is None:
            try:
                t = torch.empty(tuple(int(s) for s in shape), dtype=_NP_TO_TORCH[dtype], pin_memory=True)
                report["pinned_bytes"] += t.numel() * t.element_size()
                return t.numpy()  # the array's base is the tensor, which keeps the pinned storage alive
            except (RuntimeError, KeyError) as e:  # pinning refused: fall back, remember why
                report["pin_error"] = str(e).splitlines()[0]
                log.warning("pinning host memory failed (%s); using pageable memory", report["pin_error"])
        a = fallback(shape, dtype)
        report["pageable_bytes"] += a.nbytes
        return a

    return alloc, report


class CopyStream:
    """Host->device copies that never block the compute stream; readiness is an event per copy."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None

    def copy(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Optional[object]]:
        """Start copying ``tensors`` to the device; returns (device tensors, event or None when done)."""
        if not self.cuda:
            return [t.to(self.device) for t in tensors], None
        with torch.cuda.stream(self.stream):
            out = [t.to(self.device, non_blocking=True) for t in tensors]
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return out, ev

    @staticmethod
    def ready(event) -> bool:
        return event is None or event.query()

    def make_current_wait(self, event) -> None:
        """Order the compute stream after a finished copy (cheap: the event has completed)."""
        if self.cuda and event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
