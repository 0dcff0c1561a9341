"""The Numba router selection (kimi_local.cpu_kernels.router) against the Gate's own torch code."""

import dataclasses

import pytest
import torch

from kimi_local.config import ModelArgs
from kimi_local.cpu_kernels.router import PARALLEL_MIN_ROWS, install, logits, pack_weight
from kimi_local.cpu_kernels.simd import have_avx512_bf16
from kimi_local.model import Gate

CASES = {   # (n_routed_experts, k, n_group, topk_group, topk_method, scoring_func, norm_topk_prob)
    "k2": (384, 8, 1, 1, "noaux_tc", "sigmoid", True),
    "deepseek-v3": (256, 8, 8, 4, "noaux_tc", "sigmoid", True),
    "greedy-softmax": (64, 6, 1, 1, "greedy", "softmax", False),
    "group-limited-greedy": (160, 6, 8, 3, "group_limited_greedy", "softmax", False),
    "top1": (16, 1, 1, 1, "noaux_tc", "sigmoid", True),
}


def _gates(case, seed=0, hidden=64):
    E, k, ng, tg, method, scoring, norm = CASES[case]
    args = dataclasses.replace(ModelArgs(), hidden_size=hidden, n_routed_experts=E, num_experts_per_tok=k,
                               n_group=ng, topk_group=tg, topk_method=method, scoring_func=scoring,
                               norm_topk_prob=norm, routed_scaling_factor=2.5)
    g = torch.Generator().manual_seed(seed)
    ref = Gate(args)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(E, hidden, generator=g) * 0.2)
        if ref.e_score_correction_bias is not None:
            ref.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.05)
    fast = Gate(args)
    fast.load_state_dict(ref.state_dict())

    assert install(torch.nn.ModuleList([fast])) == 1 and fast.fast is not None
    return ref, fast


def _same_selection(ref, fast, x):
    with torch.inference_mode():
        ri, rw = ref(x)
        fi, fw = fast(x)
    assert fi.dtype == ri.dtype == torch.int64 and fw.dtype == rw.dtype == torch.float32
    assert fi.shape == ri.shape and fw.shape == rw.shape
    # the same experts with the same weights (the order within a row may differ on exact ties only)
    ro, fo = ri.sort(dim=-1), fi.sort(dim=-1)
    assert torch.equal(ro.values, fo.values)
    torch.testing.assert_close(fw.gather(1, fo.indices), rw.gather(1, ro.indices), rtol=2e-7, atol=0)
    return fi, fw


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rows", [1, 7, PARALLEL_MIN_ROWS + 3])
def test_fast_router_matches_torch(case, rows):
    ref, fast = _gates(case, seed=rows)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    _same_selection(ref, fast, x)


def test_fast_router_group_limit_really_limits():
    """DeepSeek-V3 routing: every chosen expert lies in one of the topk_group best groups; a row whose best
    single experts are spread over all groups shows the limit at work (the plain top-k would differ)."""
    ref, fast = _gates("deepseek-v3")
    E, k, ng, tg = 256, 8, 8, 4
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    idx, _ = _same_selection(ref, fast, x)
    per_row = [len(set((r // (E // ng)).tolist())) for r in idx]
    assert max(per_row) <= tg
    with torch.inference_mode():
        scores = torch.sigmoid(torch.nn.functional.linear(x.float(), ref.weight.float()))
        plain = (scores + ref.e_score_correction_bias).topk(k, dim=-1)[1]
    assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(idx, plain))


def test_fast_router_ties_and_nan():
    """Exact ties keep the lower expert id; a NaN score ranks first (as torch's topk ranks it)."""
    ref, fast = _gates("top1")
    scores = torch.zeros(3, 16)
    scores[0, [4, 9]] = 0.7          # tie: expert 4 wins
    scores[1, 2] = float("nan")
    scores[1, 3] = 0.9
    scores[2] = 0.25                  # all equal: expert 0
    with torch.no_grad():
        fast.e_score_correction_bias.zero_()
    idx, _ = fast.fast(scores)
    assert idx[:, 0].tolist() == [4, 2, 0]
    assert torch.topk(scores[1], 1)[1].item() == 2   # torch agrees on the NaN


def test_fast_router_block_prefilter_keeps_exact_top_k():
    """K2-sized rows (384 experts, top-8) take the block-maximum prefilter: the winners must be exactly the 8
    best (value first, then the lower id), with ties straddling the threshold, repeated block maxima, -inf and
    all-equal rows."""
    ref, fast = _gates("k2")
    with torch.no_grad():
        fast.e_score_correction_bias.zero_()
    g = torch.Generator().manual_seed(5)
    rows = [torch.rand(384, generator=g) for _ in range(3)]
    r = torch.zeros(384)
    r[[3, 40, 41, 77, 200, 201, 202, 203, 383, 17]] = 0.5    # ten-way tie for eight places
    rows.append(r)
    r = torch.full((384,), -float("inf"))
    r[[5, 300]] = 1.0                                           # only two finite candidates
    rows.append(r)
    rows.append(torch.full((384,), 0.25))                       # all equal
    r = (torch.arange(384) % 16).float() / 16                   # every block has the same maximum
    rows.append(r)
    scores = torch.stack(rows)
    idx, _ = fast.fast(scores)
    for row, got in zip(scores.tolist(), idx.tolist()):
        want = sorted(range(384), key=lambda j: (-row[j], j))[:8]
        assert got == want


def test_fast_router_declines_and_follows_bias_updates():
    ref, fast = _gates("k2")
    x = torch.randn(5, 64, requires_grad=True)
    assert fast.fast(torch.randn(5, 384, requires_grad=True)) is None      # autograd stays on torch
    assert fast.fast(torch.randn(5, 384, dtype=torch.float64)) is None
    with torch.no_grad():                                                    # in-place bias change is seen
        ref.e_score_correction_bias.add_(torch.linspace(0, 1, 384))
        fast.e_score_correction_bias.add_(torch.linspace(0, 1, 384))
    _same_selection(ref, fast, x.detach())


def test_loader_installs_fast_router_on_cpu(tiny_dir):
    from kimi_local.checkpoint import load_model
    m = load_model(tiny_dir, dtype=torch.float32, expert_backend="torch")
    gates = [mod for mod in m.modules() if isinstance(mod, Gate)]
    assert gates and all(g.fast is not None for g in gates)
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        a = m(tokens)
        for g in gates:
            g.fast = None
        b = m(tokens)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not have_avx512_bf16(), reason="the logits kernel needs AVX-512 BF16")
@pytest.mark.parametrize("N,D,E", [(1, 64, 384), (7, 192, 384), (37, 200, 20), (300, 96, 256), (9, 7168, 48)])
def test_logits_kernel_matches_float32_linear(N, D, E):
    """bf16 x bf16 products are exact in float32: the kernel's logits equal torch's float32 linear up to the
    order of the float32 sums (every token count: 8-token blocks, single tokens, parallel chunks; expert counts
    that are and are not multiples of 16)."""
    g = torch.Generator().manual_seed(N + D)
    x = torch.randn(N, D, generator=g).to(torch.bfloat16)
    w = (torch.randn(E, D, generator=g) * 0.1).to(torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), w.float())
    got = logits(x, pack_weight(w), E)
    assert got.dtype == torch.float32 and got.shape == (N, E)
    torch.testing.assert_close(got, want, rtol=0, atol=4e-7 * D ** 0.5 * float(want.abs().max()))


@pytest.mark.skipif(not have_avx512_bf16(), reason="the logits kernel needs AVX-512 BF16")
def test_bf16_gate_uses_logits_kernel_and_keeps_the_selection():
    """A bf16 Gate computes its logits with the kernel (float32 or float16 inputs stay on torch) and selects the
    same experts as its torch code."""
    ref, fast = _gates("k2", seed=3, hidden=192)
    ref, fast = ref.to(torch.bfloat16), fast.to(torch.bfloat16)
    ref.e_score_correction_bias.data = ref.e_score_correction_bias.data.float()
    fast.e_score_correction_bias.data = fast.e_score_correction_bias.data.float()
    x = torch.randn(300, 192, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert fast.fast.logits(x) is not None
    assert fast.fast.logits(x.float()) is None and fast.fast.logits(x.half()) is None
    _same_selection(ref, fast, x)
