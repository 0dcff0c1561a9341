"""GPU-only checks (marked `cuda`; skipped on machines without CUDA)."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.cuda


def test_pinned_allocator_pins():
    from kimi_local.offload.cuda import pinned_allocator
    alloc, report = pinned_allocator(True)
    a = alloc((1024, 1024), np.uint8)
    a[:] = 7
    assert report["pin_error"] is None and report["pinned_bytes"] == 1024 * 1024
    assert torch.from_numpy(a).is_pinned()


def test_copy_stream_event_and_data():
    from kimi_local.offload.cuda import CopyStream
    cs = CopyStream(torch.device("cuda"))
    host = torch.arange(1 << 20, dtype=torch.float32).pin_memory()
    (dev,), ev = cs.copy([host])
    ev.synchronize()
    assert cs.ready(ev) and torch.equal(dev.cpu(), host)


def test_model_on_cuda_matches_cpu(tiny_dir):
    from kimi_local.checkpoint import load_model
    cpu = load_model(tiny_dir, dtype=torch.float32, expert_backend="numba")
    gpu = load_model(tiny_dir, device="cuda", dtype=torch.float32, expert_backend="numba")
    x = torch.arange(10, 60)[None]
    a = cpu(x)
    b = gpu(x.cuda()).cpu()
    assert (a - b).abs().max() < 1e-3


def test_gpu_expert_cache_is_token_identical(tiny_dir):
    from kimi_local.checkpoint import load_model
    from kimi_local.config import ModelArgs
    from kimi_local.offload.runtime import OffloadedExperts, OffloadOptions

    from helpers import greedy
    prompt = list(range(5, 40))
    ref = greedy(load_model(tiny_dir, device="cuda", dtype=torch.float32, expert_backend="numba"), prompt)[0]
    ex = OffloadedExperts(ModelArgs.from_model_dir(tiny_dir),
                          OffloadOptions(fast_slots=16, fast_tier="cuda", device="cuda"))
    m = load_model(tiny_dir, device="cuda", dtype=torch.float32, expert_backend=ex)
    assert greedy(m, prompt)[0] == ref
    st = ex.stats()
    assert st["tiers"]["fast"] == "cuda" and st["total"]["fast_loads"] > 0
    ex.close()
