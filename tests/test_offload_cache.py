"""Expert-cache policies, the predictor, routing traces and cachesim on small hand-made and synthetic traces."""

import json

import numpy as np
import pytest

from kimi_local import cli
from kimi_local.offload.cachesim import simulate
from kimi_local.offload.policies import LayeredCache, LFUDecayCache, LRUCache, PredictiveCache, make_cache
from kimi_local.offload.predictor import ExpertPredictor, PredictionStats
from kimi_local.offload.traces import (
    RoutingTrace, TraceError, TraceWriter, read_trace, synthetic_trace,
)


def run_steps(cache, steps, budget=None):
    """Each step: begin_step then access its experts; returns the hits per step."""
    hits = []
    for step in steps:
        cache.begin_step(budget)
        hits.append([cache.access(e) for e in step])
    return hits


# ---------------------------------------------------------------------------------------------- policies


def test_lru_evicts_least_recent():
    c = LRUCache(2)
    hits = run_steps(c, [[1], [2], [1], [3]])
    assert hits == [[False], [False], [True], [False]]
    assert c.resident() == {1, 3}  # 2 was least recently used
    assert run_steps(c, [[2]]) == [[False]]
    assert c.resident() == {2, 3}
    assert c.stats.accesses == 5 and c.stats.hits == 1 and c.stats.evictions == 2


def test_experts_in_use_this_step_are_not_evicted():
    c = LRUCache(2)
    run_steps(c, [[1, 2, 3]])
    assert c.resident() == {1, 2}  # 3 is not admitted at the cost of an expert the same step uses


def test_lfu_decay_forgets_old_popularity():
    old_then_new = [[1]] * 50 + [[2], [3]] * 10
    plain = LFUDecayCache(2, half_life=float("inf"))
    run_steps(plain, old_then_new)
    assert 1 in plain.resident()  # plain LFU keeps the once-popular expert forever
    decayed = LFUDecayCache(2, half_life=2.0)
    run_steps(decayed, old_then_new)
    assert decayed.resident() == {2, 3}  # with decay the new working set wins
    assert decayed.stats.hits > plain.stats.hits


def test_lfu_prefers_frequent_over_recent():
    c = LFUDecayCache(2, half_life=1000.0)
    run_steps(c, [[1], [1], [1], [2], [3]])
    assert 1 in c.resident()  # LRU would have evicted 1 for 3


def test_load_budget_caps_loads_per_step():
    c = LRUCache(16)
    run_steps(c, [[0, 1, 2, 3]], budget=2)
    assert len(c) == 2 and c.stats.demand_loads == 2 and c.stats.denied_loads == 2
    c = LRUCache(64)
    run_steps(c, [[10 * i + j for j in range(4)] for i in range(10)], budget=0.5)
    assert c.stats.loads == 5  # one load every other step


def test_prefetch_loads_and_protects():
    c = PredictiveCache(3)
    c.begin_step()
    assert c.prefetch([5, 6]) == [5, 6]
    assert c.access(5) and not c.access(7)
    assert c.stats.prefetch_loads == 2 and c.stats.prefetch_used == 1
    assert c.resident() == {5, 6, 7}
    c.begin_step()
    c.prefetch([8])  # evicts 6: prefetched and never used, the lowest score
    c.access(9)      # evicts 7 (used once) rather than 5 (used once and predicted); 8 is protected this step
    assert c.resident() == {5, 8, 9}
    c = PredictiveCache(2)
    c.begin_step()
    c.access(1), c.access(2)
    assert c.prefetch([3]) == []  # both slots hold experts this step uses


def test_zero_capacity_never_loads():
    c = make_cache("lru", 0)
    assert run_steps(c, [[1, 2]]) == [[False, False]]
    assert c.stats.loads == 0 and c.prefetch([3]) == []


def test_make_cache_rejects_unknown_policy():
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_cache("fifo", 4)


def test_layered_cache_keeps_per_layer_stats():
    lc = LayeredCache("lru", 2, [1, 2])
    for layer, experts in ((1, [0]), (2, [5]), (1, [0])):
        lc[layer].begin_step()
        for e in experts:
            lc[layer].access(e)
    assert lc.stats_by_layer()[1].hits == 1 and lc.stats_by_layer()[2].hits == 0
    assert lc.total_stats().accesses == 3


# ---------------------------------------------------------------------------------------------- predictor


def test_prediction_stats_precision_recall():
    s = PredictionStats()
    s.record(3, [1, 2, 3, 4], [1, 2, 5, 6, 7, 8, 9, 10])
    assert s.precision() == 0.5 and s.recall() == 0.25
    s.record(4, [1], [1])
    assert s.precision(4) == 1.0 and s.recall(4) == 1.0
    assert s.precision() == pytest.approx(3 / 5) and s.recall() == pytest.approx(3 / 9)
    assert s.to_dict()["per_layer"]["3"]["recall"] == 0.25


def test_predictor_router_candidates_come_first_and_stats_fill():
    p = ExpertPredictor(n_experts=16, top_k=4)
    assert p.predict(1) == []  # no evidence yet
    p.observe(1, [7, 8])
    assert set(p.predict(1)) == {7, 8}
    assert p.predict(1, [3, 4], k=4)[:2] == [3, 4]
    assert set(p.predict(1, [3, 4], k=4)) == {3, 4, 7, 8}


def test_predictor_with_router_score_vector():
    p = ExpertPredictor(n_experts=8, top_k=2)
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.0, 0.0, 0.3, 0.1])
    assert p.predict(5, scores) == [1, 3]


def test_predictor_recency_beats_stale_frequency():
    p = ExpertPredictor(n_experts=8, top_k=1, half_life=4.0)
    for _ in range(20):
        p.observe(0, [1])
    for _ in range(6):
        p.observe(0, [2])
    assert p.predict(0) == [2]


# ---------------------------------------------------------------------------------------------- traces


@pytest.mark.parametrize("suffix", [".jsonl", ".npz"])
def test_trace_round_trip(tmp_path, suffix):
    path = str(tmp_path / f"t{suffix}")
    with TraceWriter(path, n_experts=16, top_k=2, layers=[1, 2], model="tiny") as w:
        w.write(1, 0, [3, 4], hints=[3, 9])
        w.write(2, 0, [5, 6])
        w.write(1, 1, [3, 7], hints=[7])
    t = read_trace(path)
    assert t.n_experts == 16 and t.top_k == 2 and t.layers == [1, 2] and t.meta["model"] == "tiny"
    assert t.layer.tolist() == [1, 2, 1] and t.pos.tolist() == [0, 0, 1]
    assert t.experts.tolist() == [[3, 4], [5, 6], [3, 7]]
    steps = list(t.steps())
    assert steps[0] == (1, [0], [3, 4], [3, 9])
    assert steps[1][3] == []  # no hints recorded for that record
    assert steps[2] == (1, [1], [3, 7], [7])


def test_trace_steps_merge_a_prefill_chunk(tmp_path):
    t = RoutingTrace({}, [1, 1, 2, 1, 1], [0, 1, 0, 2, 3], [[1, 2], [2, 3], [4, 5], [1, 6], [6, 7]],
                     step=[0, 0, 0, -1, -1])
    assert [s[:3] for s in t.steps()] == [(1, [0, 1], [1, 2, 3]), (2, [0], [4, 5]), (1, [2], [1, 6]),
                                          (1, [3], [6, 7])]
    for suffix in (".jsonl", ".npz"):
        path = str(tmp_path / f"p{suffix}")
        t.save(path)
        assert [s[:3] for s in read_trace(path).steps()] == [s[:3] for s in t.steps()]


def test_synthetic_round_trip(tmp_path):
    t = synthetic_trace(tokens=3, layers=[1, 2, 3], hint_accuracy=0.5, seed=1)
    for suffix in (".jsonl", ".npz"):
        t.save(str(tmp_path / f"s{suffix}"))
        back = read_trace(str(tmp_path / f"s{suffix}"))
        assert np.array_equal(back.experts, t.experts) and np.array_equal(back.hints, t.hints)
        assert back.meta["synthetic"]["seed"] == 1


def test_bad_traces_are_user_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"layer": 1}\n')
    with pytest.raises(TraceError, match="header"):
        read_trace(str(p))
    p.write_text('{"kimi_local_routing_trace": 1, "n_experts": 4, "top_k": 1}\n{"layer": 1, "pos": 0, '
                 '"experts": [9]}\n')
    with pytest.raises(TraceError, match="outside"):
        read_trace(str(p))
    p.write_text('{"kimi_local_routing_trace": 1, "n_experts": 4, "top_k": 1}\n{"layer": 1}\n')
    with pytest.raises(TraceError, match=":2:"):
        read_trace(str(p))


def test_synthetic_trace_has_k2_shape_and_is_seeded():
    t = synthetic_trace(tokens=4)
    assert t.layers == list(range(1, 61)) and t.n_experts == 384 and t.top_k == 8
    assert t.experts.shape == (4 * 60, 8)
    assert all(len(set(row)) == 8 for row in t.experts.tolist())
    assert t.experts.min() >= 0 and t.experts.max() < 384
    assert np.array_equal(t.experts, synthetic_trace(tokens=4).experts)
    assert not np.array_equal(t.experts, synthetic_trace(tokens=4, seed=1).experts)


def test_synthetic_skew_and_locality_concentrate_routing():
    def top8_share(t):
        counts = np.bincount(t.experts.reshape(-1), minlength=t.n_experts)
        return np.sort(counts)[::-1][:8].sum() / counts.sum()

    spec = dict(tokens=300, layers=[1], locality=0.0)
    assert top8_share(synthetic_trace(skew=1.5, **spec)) > 2 * top8_share(synthetic_trace(skew=0.0, **spec))
    lru = [simulate(synthetic_trace(tokens=300, layers=[1], skew=0.0, locality=loc), "lru", 16, 1).total.hit_rate
           for loc in (0.0, 0.8)]
    assert lru[1] > lru[0] + 0.3


# ---------------------------------------------------------------------------------------------- cachesim


def test_predictive_prefetch_raises_hit_rate_on_a_predictable_trace():
    # Uniform routing with no locality: only the (perfect) layer-ahead hints make it predictable.
    t = synthetic_trace(tokens=200, layers=[1, 2], skew=0.0, locality=0.0, hint_accuracy=1.0)
    lru = simulate(t, "lru", 16, 1).total.hit_rate
    pred = simulate(t, "predictive", 16, 1)
    assert lru < 0.1
    assert pred.total.hit_rate > 0.95
    assert pred.prediction.recall() == 1.0
    blind = simulate(t, "predictive", 16, 1, use_hints=False).total.hit_rate
    assert blind < 0.1  # without hints nothing predicts uniform routing


def test_simulate_counts_bytes_and_warmup():
    t = synthetic_trace(tokens=50, layers=[1, 2, 3], skew=1.0, locality=0.5)
    r = simulate(t, "lru", 16, bytes_per_expert=1000)
    tot = r.total
    assert tot.accesses == 50 * 3 * 8 and r.tokens == 50
    assert r.per_token(tot.misses) == tot.misses * 1000 / 50
    assert tot.loads == tot.misses  # unlimited budget: every miss is admitted
    warm = simulate(t, "lru", 16, bytes_per_expert=1000, warmup=10)
    assert warm.tokens == 40 and warm.total.accesses == 40 * 3 * 8  # the cold start is left out


def test_cachesim_cli_synthetic_json(capsys, tmp_path):
    trace_path = str(tmp_path / "t.npz")
    rc = cli.main(["cachesim", "--synthetic", "--tokens", "30", "--layers", "4", "--slots", "8,16",
                   "--hint-accuracy", "0.8", "--uploads-per-step", "2", "--json", "--per-layer",
                   "--save-trace", trace_path])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["slots"], r["policy"]) for r in out["results"]] == [
        (8, "lru"), (8, "lfu"), (8, "predictive"), (16, "lru"), (16, "lfu"), (16, "predictive")]
    for r in out["results"]:
        assert 0 <= r["hit_rate"] <= 1 and r["bytes_per_expert"] == 44_050_944
        assert set(r["per_layer"]) == {"1", "2", "3", "4"}
        assert r["loads_per_token"] <= 2 * 4 + 1e-9
    assert "prediction" in out["results"][2]
    rc = cli.main(["cachesim", trace_path, "--slots", "8", "--policy", "lru"])
    assert rc == 0 and "lru" in capsys.readouterr().out


def test_cachesim_cli_needs_exactly_one_source(capsys):
    assert cli.main(["cachesim"]) == 2
    assert "TRACE" in capsys.readouterr().err
