"""The offload runtime: results do not depend on placement (all in RAM, a RAM budget with the disk tier,
an emulated fast tier, every policy), prefetch never changes results, a failed prefetch never breaks a
step, and routing traces replay in cachesim."""

import json

import pytest
import torch

from kimi_local.checkpoint import load_model
from kimi_local.config import ModelArgs
from kimi_local.errors import UserError
from kimi_local.offload.runtime import OffloadedExperts, OffloadOptions, expert_nbytes
from kimi_local.offload.traces import read_trace

from helpers import greedy

PROMPT = list(range(5, 40))


@pytest.fixture(scope="module")
def reference(tiny_dir):
    torch.set_num_threads(1)
    m = load_model(tiny_dir, dtype=torch.float32, expert_backend="numba")
    return greedy(m, PROMPT)


def run(tiny_dir, **kw):
    ex = OffloadedExperts(ModelArgs.from_model_dir(tiny_dir), OffloadOptions(**kw))
    try:
        m = load_model(tiny_dir, dtype=torch.float32, expert_backend=ex)
        return greedy(m, PROMPT), ex.stats(), ex
    finally:
        ex.close()


PLACEMENTS = [
    dict(),
    dict(expert_ram="30%"),
    dict(fast_slots=12, fast_tier="emulate"),
    dict(expert_ram="30%", fast_slots=8, fast_tier="emulate"),
    dict(expert_ram="30%", prefetch=False),
]


@pytest.mark.parametrize("policy", ["lru", "lfu", "predictive"])
@pytest.mark.parametrize("placement", PLACEMENTS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "all-ram")
def test_placements_are_token_identical(tiny_dir, reference, placement, policy):
    (toks, logits), stats, _ = run(tiny_dir, policy=policy, **placement)
    assert toks == reference[0]
    assert (logits - reference[1]).abs().max() < 1e-3
    total = stats["total"]
    if "expert_ram" in placement:
        assert not stats["tiers"]["resident_all"]
        assert total["disk_bytes"] > 0 and 0 < total["ram_hit_rate"] < 1
    if placement.get("fast_slots"):
        assert stats["tiers"]["fast"] == "emulate" and total["fast_loads"] > 0
        assert total["fast_uses"] > 0, "some experts should have been computed on the fast tier"


def test_ram_budget_is_real(tiny_dir):
    args = ModelArgs.from_model_dir(tiny_dir)
    ex = OffloadedExperts(args, OffloadOptions(expert_ram="25%"))
    per_layer = ex.packed[args.moe_layer_ids[0]].n_slots
    assert per_layer == int(0.25 * args.n_routed_experts)
    assert ex.stats()["tiers"]["ram_bytes"] <= 0.27 * expert_nbytes(args) * args.n_routed_experts * len(args.moe_layer_ids)
    ex.close()
    with pytest.raises(UserError, match="at least 8"):
        OffloadedExperts(args, OffloadOptions(expert_ram="1%"))
    with pytest.raises(UserError, match="--expert-ram"):
        OffloadedExperts(args, OffloadOptions(expert_ram="lots"))


def test_failed_prefetch_never_breaks_a_step(tiny_dir, reference, monkeypatch):
    from kimi_local.offload import runtime

    real_read = runtime.DiskExperts.read
    calls = {"n": 0}

    def flaky(self, layer, expert):
        import threading
        if threading.current_thread().name.startswith("kimi-disk-prefetch"):
            calls["n"] += 1
            raise OSError("simulated disk error")
        return real_read(self, layer, expert)

    monkeypatch.setattr(runtime.DiskExperts, "read", flaky)
    (toks, _), stats, _ = run(tiny_dir, expert_ram="30%")
    assert calls["n"] > 0
    assert toks == reference[0]


def test_slow_prefetch_never_changes_results(tiny_dir, reference, monkeypatch):
    import threading
    import time

    from kimi_local.offload import runtime
    real_read = runtime.DiskExperts.read

    def slow(self, layer, expert):
        if threading.current_thread().name.startswith("kimi-disk-prefetch"):
            time.sleep(0.01)
        return real_read(self, layer, expert)

    monkeypatch.setattr(runtime.DiskExperts, "read", slow)
    (toks, _), _, _ = run(tiny_dir, expert_ram="30%", fast_slots=8, fast_tier="emulate")
    assert toks == reference[0]


def test_trace_routing_replays_in_cachesim(tiny_dir, tmp_path):
    path = tmp_path / "trace.jsonl"
    (toks, _), stats, _ = run(tiny_dir, trace_path=str(path))
    trace = read_trace(str(path))
    args = ModelArgs.from_model_dir(tiny_dir)
    assert trace.n_experts == args.n_routed_experts and trace.top_k == args.num_experts_per_tok
    # prefill (35 tokens) + 12 decode steps per MoE layer, minus the last token fed (its logits only)
    assert len(trace) == len(args.moe_layer_ids) * (len(PROMPT) + 12)
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "kimi_local.cli", "cachesim", str(path), "--slots", "16",
                        "--policy", "all", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out


def test_offload_flags_on_the_command_line(tiny_dir):
    import subprocess
    import sys
    base = [sys.executable, "-m", "kimi_local.cli", "generate", "--model", tiny_dir, "--prompt", "Once upon a time",
            "--max-tokens", "6", "--json"]
    a = json.loads(subprocess.run(base, capture_output=True, text=True, timeout=300, check=True).stdout)
    b = json.loads(subprocess.run(base + ["--expert-ram", "30%", "--gpu-tier", "emulate", "--gpu-expert-slots", "8",
                                          "--cache-policy", "lru"], capture_output=True, text=True, timeout=300,
                                  check=True).stdout)
    assert a["token_ids"] == b["token_ids"]
