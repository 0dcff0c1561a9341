"""Sampling on hand-made logits vectors: each filter alone, the factory, seeds and validation."""

import math
from collections import Counter

import pytest
import torch

from kimi_local.errors import UserError
from kimi_local.sampling import (
    SamplingError, SamplingParams, apply_logit_bias, apply_min_p, apply_penalties, apply_top_k, apply_top_p,
    draw, make_sampler)


def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def kept(logits):
    return torch.isfinite(logits).nonzero().flatten().tolist()


# ------------------------------------------------------------------ pure transforms


def test_top_k_keeps_k_largest():
    x = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert kept(apply_top_k(x, 2)) == [1, 3]
    assert kept(apply_top_k(x, 1)) == [1]
    assert apply_top_k(x, 0) is x  # off
    assert apply_top_k(x, 99) is x
    assert x.isfinite().all()  # input untouched


def test_top_p_smallest_set_reaching_mass():
    x = logits_of([0.1, 0.5, 0.25, 0.15])
    assert kept(apply_top_p(x, 0.5)) == [1]            # 0.5 alone reaches 0.5
    assert kept(apply_top_p(x, 0.6)) == [1, 2]         # 0.5 + 0.25
    assert kept(apply_top_p(x, 0.8)) == [1, 2, 3]      # 0.5 + 0.25 + 0.15 = 0.9
    assert kept(apply_top_p(x, 0.01)) == [1]           # the top token always survives
    assert kept(apply_top_p(x, 1.0)) == [0, 1, 2, 3]


def test_min_p_relative_to_top_token():
    x = logits_of([0.1, 0.5, 0.25, 0.15])
    assert kept(apply_min_p(x, 0.5)) == [1, 2]         # threshold 0.25
    assert kept(apply_min_p(x, 0.3)) == [1, 2, 3]      # threshold 0.15
    assert kept(apply_min_p(x, 1.0)) == [1]
    assert apply_min_p(x, 0.0) is x


def test_logit_bias_adds_to_named_tokens():
    x = torch.zeros(4)
    y = apply_logit_bias(x, {1: 2.5, 3: -100})
    assert y.tolist() == [0.0, 2.5, 0.0, -100.0]
    assert x.tolist() == [0.0] * 4


def test_penalties_openai_formula_and_repetition():
    x = torch.tensor([2.0, -2.0, 1.0, 0.5])
    hist = [0, 0, 1, 0]
    y = apply_penalties(x, hist, presence=0.5, frequency=0.25)
    # token 0 seen 3x: 2 - 0.5 - 0.75; token 1 seen once: -2 - 0.5 - 0.25; others untouched
    assert y.tolist() == pytest.approx([0.75, -2.75, 1.0, 0.5])
    y = apply_penalties(x, hist, repetition=2.0)
    assert y.tolist() == pytest.approx([1.0, -4.0, 1.0, 0.5])  # positive halved, negative doubled
    assert apply_penalties(x, [], presence=1.0) is x
    assert apply_penalties(x, hist) is x


def test_draw_is_categorical():
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = Counter(draw(probs, g) for _ in range(n))
    assert counts[2] == 0  # zero probability never wins the race
    for i, p in enumerate(probs.tolist()):
        assert abs(counts[i] / n - p) < 0.015, (i, counts)


# ------------------------------------------------------------------ the factory


def test_greedy_is_argmax_after_bias_and_penalties():
    x = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert make_sampler(SamplingParams(temperature=0))(x, []) == 1
    assert make_sampler(SamplingParams(temperature=0, logit_bias={3: 10}))(x, []) == 3
    assert make_sampler(SamplingParams(temperature=0, presence_penalty=1.5))(x, [1]) == 2
    assert make_sampler(SamplingParams(temperature=0, repetition_penalty=2.0))(x, [1]) == 2
    # greedy ignores the seed and is the same every call
    s = make_sampler(SamplingParams(temperature=0))
    assert {s(x, []) for _ in range(20)} == {1}


def test_filters_restrict_sampled_support():
    x = logits_of([0.1, 0.4, 0.3, 0.2])
    for params, allowed in [
        (SamplingParams(temperature=1.0, top_k=2), {1, 2}),
        (SamplingParams(temperature=1.0, top_p=0.65), {1, 2}),
        (SamplingParams(temperature=1.0, min_p=0.6), {1, 2}),
        (SamplingParams(temperature=1.0, logit_bias={0: -100, 3: -100}), {1, 2}),
    ]:
        s = make_sampler(SamplingParams(**{**params.__dict__, "seed": 1}))
        seen = {s(x, []) for _ in range(300)}
        assert seen == allowed, params


def test_temperature_sharpens():
    x = logits_of([0.3, 0.7])
    hot = make_sampler(SamplingParams(temperature=1.0, seed=0))
    cold = make_sampler(SamplingParams(temperature=0.2, seed=0))
    n = 4000
    p_hot = sum(hot(x, []) for _ in range(n)) / n
    p_cold = sum(cold(x, []) for _ in range(n)) / n
    assert abs(p_hot - 0.7) < 0.03
    expected_cold = 0.7 ** 5 / (0.7 ** 5 + 0.3 ** 5)
    assert abs(p_cold - expected_cold) < 0.02


def test_seed_reproduces_and_differs():
    torch.manual_seed(123)
    x = torch.randn(1000)

    def run(seed):
        return make_sampler(SamplingParams(temperature=1.0, seed=seed))

    a, b, c = run(7), run(7), run(8)
    seq_a = [a(x, []) for _ in range(50)]
    seq_b = [b(x, []) for _ in range(50)]
    seq_c = [c(x, []) for _ in range(50)]
    assert seq_a == seq_b
    assert seq_a != seq_c
    # the global RNG plays no part
    torch.manual_seed(999)
    d = run(7)
    assert [d(x, []) for _ in range(50)] == seq_a


def test_unseeded_samplers_differ():
    x = torch.zeros(1000)
    a = make_sampler(SamplingParams(temperature=1.0))
    b = make_sampler(SamplingParams(temperature=1.0))
    assert [a(x, []) for _ in range(20)] != [b(x, []) for _ in range(20)]


def test_sampler_accepts_bf16_logits_and_does_not_modify_them():
    x = torch.tensor([0.0, 1.0, 2.0], dtype=torch.bfloat16)
    before = x.clone()
    s = make_sampler(SamplingParams(temperature=0.7, top_k=2, presence_penalty=1.0, seed=0))
    assert s(x, [2]) in (1, 2)
    assert torch.equal(x, before)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5), ("min_p", -0.1), ("min_p", 1.1),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0.0),
    ("seed", 1.5), ("seed", True), ("max_tokens", 0), ("max_tokens", -5),
    ("logit_bias", {5: 101}), ("logit_bias", {-1: 1.0}), ("logit_bias", {"x": 1.0}), ("logit_bias", [1, 2]),
    ("stop", [""]), ("stop", [3]), ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]),
])
def test_validation_names_the_field(field, value):
    p = SamplingParams(**{field: value})
    with pytest.raises(SamplingError) as e:
        p.validate()
    assert e.value.field == field
    assert field in str(e.value)
    assert isinstance(e.value, UserError)


def test_validation_accepts_defaults_and_edges():
    SamplingParams().validate()
    SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
                   repetition_penalty=1.3, seed=0, logit_bias={0: -100, 5: 100}, max_tokens=1,
                   stop=["\n\n"], stop_token_ids=[]).validate(vocab_size=10)


def test_vocab_size_bounds_token_ids():
    with pytest.raises(SamplingError, match="logit_bias"):
        SamplingParams(logit_bias={10: 1.0}).validate(vocab_size=10)
    with pytest.raises(SamplingError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[10]).validate(vocab_size=10)


def test_convenience_normalisation():
    p = SamplingParams(stop="END", logit_bias={"7": -100})
    assert p.stop == ["END"]
    assert p.logit_bias == {7: -100}
    p.validate()
    assert not math.isnan(make_sampler(p)(torch.zeros(10), []))
