"""The Numba MLA decode core (kimi_local.cpu_kernels.attention) against the module's own torch code."""

import dataclasses

import pytest
import torch

from kimi_local.config import ModelArgs
from kimi_local.cpu_kernels import attention
from kimi_local.model import MLA, KVCache, rope_inv_freq, rope_rotation

K2_LIKE = dict(hidden_size=256, num_attention_heads=3, q_lora_rank=192, kv_lora_rank=512, qk_nope_head_dim=128,
               qk_rope_head_dim=64, v_head_dim=128)
TINY_LIKE = dict(hidden_size=192, num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                 qk_rope_head_dim=16, v_head_dim=32)
NO_Q_LORA = dict(TINY_LIKE, q_lora_rank=None)
ODD = dict(hidden_size=96, num_attention_heads=3, q_lora_rank=40, kv_lora_rank=48, qk_nope_head_dim=20,
           qk_rope_head_dim=8, v_head_dim=24)     # nothing a multiple of 16


def _pair(shape, dtype, seed=0):
    args = dataclasses.replace(ModelArgs(), num_key_value_heads=shape["num_attention_heads"], **shape,
                               rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
                                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    g = torch.Generator().manual_seed(seed)
    ref = MLA(args, 0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 + (1.0 if p.ndim == 1 else 0.0))
    ref = ref.to(dtype)
    fast = MLA(args, 0).to(dtype)
    fast.load_state_dict(ref.state_dict())

    assert attention.install(torch.nn.ModuleList([fast])) == 1 and fast.fast is not None
    return args, ref, fast


def _decode_both(shape, dtype, n_ctx, seed=0):
    """Prefill n_ctx random positions through the torch code into two caches, then one decode step each."""
    args, ref, fast = _pair(shape, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    inv, amp = rope_inv_freq(args, torch.device("cpu"))
    caches = [KVCache(args, n_ctx + 4, 1, dtype=torch.float32) for _ in range(2)]
    with torch.inference_mode():
        xp = torch.randn(1, n_ctx, args.hidden_size, generator=g).to(dtype)
        for c in caches:
            ref(xp, 0, rope_rotation(inv, amp, 0, n_ctx), c, "naive")
        x = torch.randn(1, 1, args.hidden_size, generator=g).to(dtype)
        rot = rope_rotation(inv, amp, n_ctx, 1)
        want = ref(x, n_ctx, rot, caches[0], "auto")
        got = fast(x, n_ctx, rot, caches[1], "auto")
    return want, got, caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [TINY_LIKE, K2_LIKE, NO_Q_LORA], ids=["tiny", "k2-like", "no-q-lora"])
@pytest.mark.parametrize("n_ctx", [3, 37, 300])
def test_fast_decode_matches_torch(shape, dtype, n_ctx):
    want, got, (c_ref, c_fast) = _decode_both(shape, dtype, n_ctx)
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    else:   # the same values up to float32 summation order, then one bf16 rounding in o_proj's input
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=2e-3)
    # the new position went into the cache the same way (latent exact, rotated key up to rounding)
    torch.testing.assert_close(c_fast.kvpe, c_ref.kvpe, rtol=1e-6, atol=1e-6)
    assert c_fast.kvpe[0, 0, n_ctx].abs().sum() > 0


def test_parallel_heads_match_serial(monkeypatch):
    want, got_serial, _ = _decode_both(K2_LIKE, torch.float32, 50)
    monkeypatch.setattr(attention, "PARALLEL_MIN_WORK", 0)
    _, got_parallel, _ = _decode_both(K2_LIKE, torch.float32, 50)
    torch.testing.assert_close(got_parallel, got_serial, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_parallel, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [TINY_LIKE, K2_LIKE, ODD], ids=["tiny", "k2-like", "odd"])
@pytest.mark.parametrize("start,S", [(0, 1), (0, 7), (0, 61), (13, 30), (50, 3)])
def test_fast_prefill_matches_torch(shape, start, S):
    """The naive form's causal core (prefill chunks, from position 0 or after a cached prefix)."""
    args, ref, fast = _pair(shape, torch.float32, seed=S)
    g = torch.Generator().manual_seed(start)
    inv, amp = rope_inv_freq(args, torch.device("cpu"))
    caches = [KVCache(args, start + S + 2, 1, dtype=torch.float32) for _ in range(2)]
    with torch.inference_mode():
        if start:
            xp = torch.randn(1, start, args.hidden_size, generator=g)
            for c in caches:
                ref(xp, 0, rope_rotation(inv, amp, 0, start), c, "naive")
        x = torch.randn(1, S, args.hidden_size, generator=g)
        rot = rope_rotation(inv, amp, start, S)
        want = ref(x, start, rot, caches[0], "naive")
        got = fast(x, start, rot, caches[1], "naive")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(caches[1].kvpe, caches[0].kvpe)


def test_fast_path_declines_what_it_does_not_cover():
    args, ref, fast = _pair(TINY_LIKE, torch.float32)
    inv, amp = rope_inv_freq(args, torch.device("cpu"))
    q = torch.randn(1, 1, 4, 48)
    c_kv, k_pe = torch.randn(1, 1, 64), torch.randn(1, 1, 16)
    rot = rope_rotation(inv, amp, 5, 1)
    cache = KVCache(args, 16, 1, dtype=torch.float32)
    assert fast.fast(q, c_kv, k_pe, rot, None, 5) is None                              # no cache
    assert fast.fast(q.expand(2, 1, 4, 48), c_kv, k_pe, rot, cache, 5) is None          # batch of 2
    assert fast.fast(q, c_kv, k_pe, rot, KVCache(args, 16, 1, dtype=torch.bfloat16), 5) is None
    assert fast.fast(q.requires_grad_(), c_kv, k_pe, rot, cache, 5) is None
    assert fast.fast(q.detach(), c_kv, k_pe, rot, cache, 5) is None                    # weights need grads
    with torch.no_grad():
        assert fast.fast(q.detach(), c_kv, k_pe, rot, cache, 5) is not None
    kvb, pe = torch.randn(1, 9, 4, 64), torch.randn(1, 9, 16)
    qn, qp = torch.randn(1, 4, 4, 32), torch.randn(1, 4, 4, 16)
    assert fast.fast.prefill(qn, qp, kvb, pe, 5) is not None
    assert fast.fast.prefill(qn.expand(2, 4, 4, 32), qp, kvb, pe, 5) is None           # batch of 2
    assert fast.fast.prefill(qn, qp, kvb, pe, 3) is None                               # keys != start + S
    assert fast.fast.prefill(qn.double(), qp, kvb, pe, 5) is None


def test_loader_installs_fast_attention_and_generation_is_unchanged(tiny_dir):
    from kimi_local.checkpoint import load_model
    from helpers import greedy
    m = load_model(tiny_dir, dtype=torch.float32)
    mlas = [mod for mod in m.modules() if isinstance(mod, MLA)]
    assert mlas and all(a.fast is not None for a in mlas)
    ids = list(range(5, 25))
    fast_tokens, fast_logits = greedy(m, ids, 12)
    for a in mlas:
        a.fast = None
    tokens, logits = greedy(m, ids, 12)
    assert tokens == fast_tokens
    torch.testing.assert_close(fast_logits, logits, rtol=1e-4, atol=1e-4)


def test_prefill_result_does_not_depend_on_thread_count():
    from kimi_local.cpu_kernels import fp8_moe
    g = torch.Generator().manual_seed(0)
    qn, qp = torch.randn(37, 3, 20, generator=g), torch.randn(37, 3, 8, generator=g)
    kvb, pe = torch.randn(50, 3, 44, generator=g), torch.randn(50, 8, generator=g)
    before = fp8_moe.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            fp8_moe.set_num_threads(n)
            outs.append(attention.causal_prefill(qn, qp, kvb, pe, 13, 0.3))
    finally:
        fp8_moe.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_loader_compiles_the_cores_before_the_first_token(tiny_dir):
    """A fresh process that only loads the model already holds the compiled attention, router and norm kernels (from
    Numba's cache or compiled then): the first prompt and token never wait for a compile."""
    import json
    import subprocess
    import sys
    code = ("import json, sys\n"
            "from kimi_local.checkpoint import load_model\n"
            "from kimi_local.cpu_kernels import attention, norm, router\n"
            "load_model(sys.argv[1])\n"
            "print(json.dumps({f.__name__: len(f.signatures) for f in (attention._decode_serial,\n"
            "    attention._decode_parallel, attention._causal, router._rows, router._rows_parallel,\n"
            "    norm._rms_bf16, norm._rms_f32)}))\n")
    out = subprocess.run([sys.executable, "-c", code, tiny_dir], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(n >= 1 for n in counts.values()), counts
