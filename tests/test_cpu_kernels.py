"""CPU block-FP8 routed-expert kernels (kimi_local.cpu_kernels) against their torch twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kimi_local.cpu_kernels import fp8_moe as m

from helpers import greedy

FAST = m.fast_path_available()
# (backend env value, precision, relative tolerance vs max |ref|)
BACKENDS = [("portable", None, 2e-6)]
if FAST:
    BACKENDS = [("fast", "bf16x2", 2e-5), ("fast", "bf16", 1.5e-2)] + BACKENDS


@pytest.fixture(params=BACKENDS, ids=lambda b: f"{b[0]}-{b[1] or 'f32'}")
def backend(request, monkeypatch):
    kind, prec, tol = request.param
    monkeypatch.setenv("KIMI_CPU_KERNELS_PORTABLE", "1" if kind == "portable" else "0")
    if prec:
        m.set_precision(prec)
    yield tol
    m.set_precision(None)


def _rand_q(rng, shape):
    q = rng.integers(0, 256, shape, dtype=np.uint8)
    q[(q & 0x7F) == 0x7F] ^= 0x01          # no NaN codes
    return q


def _grid(shape):
    return (-(-shape[0] // 128), -(-shape[1] // 128))


def _make(rng, n, D, I, scale=2.0 ** -8):
    p = m.PackedExperts.allocate(n, D, I)
    for s in range(n):
        def sc(shape):
            return (rng.uniform(0.5, 2.0, _grid(shape)) * scale).astype(np.float32)
        p.set_slot(s, _rand_q(rng, (I, D)), sc((I, D)), _rand_q(rng, (I, D)), sc((I, D)),
                   _rand_q(rng, (D, I)), sc((D, I)))
    return p


def _inputs(rng, n, D, T, k, slot_dtype=np.int32):
    """A call's inputs: activations [T, D], k distinct experts of n per token, router weights."""
    x = rng.standard_normal((T, D)).astype(np.float32)
    slots = np.stack([rng.permutation(n)[:k] for _ in range(T)]).astype(slot_dtype)
    w = rng.random((T, k)).astype(np.float32)
    return x, slots, w


def _check(p, x, slots, w, tol):
    ref = m.moe_forward_ref(p, x, slots, w)
    got = m.moe_forward(p, x, slots, w)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.all(np.isfinite(got))
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(got - ref).max()) / scale
    assert err <= tol, f"max rel error {err:.3g} > {tol}"
    return got, ref


# ------------------------------------------------------------------------------------------- e4m3 decoding
def test_bitshift_decoder_matches_torch_all_codes():
    codes = np.arange(256, dtype=np.uint8)
    want = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    got = m._bitshift_decode_all()
    finite = (codes & 0x7F) != 0x7F
    assert finite.sum() == 254
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))  # bit-exact, +-0
    sub = finite & ((codes & 0x78) == 0) & ((codes & 0x07) != 0)
    assert sub.sum() == 14 and np.all(np.abs(got[sub]) < 2.0 ** -6)   # subnormals, exact and non-zero
    np.testing.assert_array_equal(m.e4m3_decode_table()[finite], want[finite])


def test_bf16_tables_match_torch_all_codes():
    codes = np.arange(128, dtype=np.uint8)
    want = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    bits = (m._TBL_HI.astype(np.uint32) << 24) | (m._TBL_LO.astype(np.uint32) << 16)
    got = bits.view(np.float32)
    np.testing.assert_array_equal(got[:127], want[:127])
    # decoded bf16 of subnormal codes are *normal* numbers: no denormal flushing can touch them
    assert np.all((bits[1:8] >> 23) & 0xFF > 0)


def test_denormal_mode_check():
    """The portable decoder never forms a float32 denormal (FTZ/DAZ safe): every intermediate bit pattern
    has a non-zero exponent."""
    for b in range(256):
        a = b & 0x7F
        if a == 0x7F:
            continue
        bits = (a << 20) + ((120 + (1 if a < 8 else 0)) << 23)
        assert (bits >> 23) & 0xFF != 0


# ------------------------------------------------------------------------------------------- set_slot
def test_set_slot_validation():
    rng = np.random.default_rng(0)
    D, I = 256, 128
    p = m.PackedExperts.allocate(2, D, I)
    good = dict(w1_q=_rand_q(rng, (I, D)), w1_s=np.ones((1, 2), np.float32),
                w3_q=_rand_q(rng, (I, D)), w3_s=np.ones((1, 2), np.float32),
                w2_q=_rand_q(rng, (D, I)), w2_s=np.ones((2, 1), np.float32))
    p.set_slot(0, **good)
    for name, key, bad in [
        ("w1", "w1_q", _rand_q(rng, (I + 1, D))),
        ("w3", "w3_q", _rand_q(rng, (I, D)).astype(np.int8)),
        ("w2", "w2_s", np.ones((2, 2), np.float32)),
        ("w1", "w1_s", np.ones((1, 2), np.float64)),
        ("w3", "w3_s", np.array([[1.0, np.inf]], np.float32)),
        ("w2", "w2_s", np.array([[np.nan], [1.0]], np.float32)),
    ]:
        args = dict(good, **{key: bad})
        with pytest.raises(ValueError, match=name):
            p.set_slot(1, **args)
    for code in (0x7F, 0xFF):
        q = good["w2_q"].copy()
        q[5, 7] = code
        with pytest.raises(ValueError, match=r"w2.*NaN"):
            p.set_slot(1, **dict(good, w2_q=q))
    assert not p.filled[1]
    back = p.get_slot(0)
    for a, b in zip(back, good.values()):
        np.testing.assert_array_equal(a, b)
    assert p.nbytes >= 3 * D * I and (p.n_slots, p.hidden, p.inter, p.block) == (2, D, I, (128, 128))


@pytest.mark.parametrize("shape", [(128, 256), (130, 200), (7, 63), (4, 64), (16, 64), (33, 136), (576, 7168 // 8)])
def test_fused_pack_matches_numpy_pack(shape):
    """The one-pass Numba pack + NaN count equals the numpy reference layout, padding zeroed even in a
    dirty destination, and counts every NaN code (inside the vector regions and on the edges)."""
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    q = _rand_q(rng, shape)
    R, C = shape
    n = -(-R // m.RG) * m.RG * (-(-C // m.KALIGN) * m.KALIGN)
    ref, got = np.zeros(n, np.uint8), np.full(n, 0xAB, np.uint8)
    m._pack_matrix(q, ref)
    assert m._pack_count_nan(q, got) == 0
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(m._unpack_matrix(got, R, C), q)
    q[0, 0], q[-1, -1] = 0x7F, 0xFF
    assert m._pack_count_nan(q, got) == (2 if q.size > 1 else 1)
    if R >= 16 and C >= 64:
        q[5, 37] = 0x7F                      # inside a vector-packed region
        assert m._pack_count_nan(q, got) == 3


def test_packed_block_layout():
    """Byte b = 16 L + 8 h + 2 j + e of block (g, c) holds row 16 g + 4 L + j, column 4 c + 2 h + e: the order in
    which vpunpck[lh]bw of the decoded bytes yields two dot-product operands whose 32-bit lanes are the 16 rows."""
    R, C = 32, 16
    rows, cols = np.meshgrid(np.arange(R), np.arange(C), indexing="ij")
    q = (rows * C + cols).astype(np.int64)          # each element's own index (as int64: > 255)
    out = np.empty(R * C, np.int64)
    m._pack_matrix(q, out)
    for g in range(R // 16):
        for c in range(C // 4):
            for b in range(64):
                L, h, j, e = b >> 4, (b >> 3) & 1, (b >> 1) & 3, b & 1
                assert out[(g * (C // 4) + c) * 64 + b] == (16 * g + 4 * L + j) * C + 4 * c + 2 * h + e


def test_allocate_uses_alloc():
    calls = []

    def alloc(shape, dtype):
        calls.append((shape, np.dtype(dtype)))
        return np.empty(shape, dtype)

    m.PackedExperts.allocate(3, 256, 128, alloc=alloc)
    assert len(calls) == 6 and all(s[0] == 3 for s, _ in calls)


# ------------------------------------------------------------------------------------------- kernel vs torch
@pytest.mark.parametrize("D,I,n,T,k", [
    (256, 256, 4, 1, 1),      # multiples of 128, decode
    (256, 128, 8, 1, 8),      # one token, 8 experts
    (200, 130, 5, 3, 2),      # not multiples of 128 (partial blocks, partial chunks)
    (384, 320, 6, 17, 4),     # mixed: GEMV and GEMM experts in one call
    (136, 72, 3, 512, 3),     # many tokens per expert, odd sizes
    (192, 160, 12, 40, 4),    # the tiny model's shape
    (1100, 300, 4, 30, 4),    # several row and scale blocks, partial 16-row group (300 = 18 x 16 + 12)
])
def test_moe_vs_reference(backend, D, I, n, T, k):
    rng = np.random.default_rng(D * 1000 + T)
    p = _make(rng, n, D, I)
    x, slots, w = _inputs(rng, n, D, T, k, np.int64 if T % 2 else np.int32)
    if T > 1:
        slots[0, 0] = -1                    # skipped entry
    _check(p, x, slots, w, backend)


@pytest.mark.skipif(not FAST, reason="the token tiles exist on the AVX-512 BF16 path only")
@pytest.mark.parametrize("per_expert", [1, 2, 3, 4, 5, 8, 9, 12, 13, 16, 17, 20, 33])
def test_every_token_tile_width(per_expert):
    """Each expert gets exactly ``per_expert`` tokens, so every tile width (1, 2, 4, 8, 12, 16, their partly
    used forms, and 16-wide tiles followed by a remainder) is exercised, in both precisions, over several row
    blocks and scale blocks."""
    rng = np.random.default_rng(per_expert)
    D, I, n, k = 272, 144, 4, 2
    p = _make(rng, n, D, I)
    T = per_expert * n // k
    x = rng.standard_normal((T, D)).astype(np.float32)
    slots = ((k * np.arange(T)[:, None] + np.arange(k)[None, :]) % n).astype(np.int32)
    assert np.all(np.bincount(slots.ravel(), minlength=n) == per_expert)
    w = rng.random((T, k)).astype(np.float32)
    ref = m.moe_forward_ref(p, x, slots, w)
    for prec, tol in (("bf16x2", 2e-5), ("bf16", 1.5e-2)):
        got = m.moe_forward(p, x, slots, w, precision=prec)
        assert np.abs(got - ref).max() <= tol * np.abs(ref).max(), (prec, np.abs(got - ref).max())


def test_skew_unused_and_skipped(backend):
    rng = np.random.default_rng(7)
    D, I, n, T, k = 256, 192, 8, 40, 8
    p = _make(rng, n, D, I)
    x = rng.standard_normal((T, D)).astype(np.float32)
    slots = np.full((T, k), -1, np.int32)
    slots[:, 0] = 3                          # expert 3 chosen by every token
    slots[::5, 1] = 5                        # expert 5 by a few (GEMM path), 6 by exactly one (GEMV path)
    slots[7, 2] = 6
    w = rng.random((T, k)).astype(np.float32)
    got, ref = _check(p, x, slots, w, backend)
    # a token whose entries are all -1 gets exactly zero
    slots2 = slots.copy()
    slots2[4, :] = -1
    out = m.moe_forward(p, x, slots2, w)
    assert np.all(out[4] == 0.0)
    allneg = m.moe_forward(p, x, np.full((T, k), -1, np.int32), w)
    assert np.all(allneg == 0.0)


def test_all_e4m3_codes_including_subnormals(backend):
    """Every one of the 254 finite codes (incl. the 14 subnormals) appears in each projection; with one-hot
    activations the gate/up outputs are exact decoded weights."""
    D, I = 256, 256
    rng = np.random.default_rng(3)
    finite = np.array([c for c in range(256) if (c & 0x7F) != 0x7F], np.uint8)

    def allcodes(shape):
        q = rng.permutation(np.resize(finite, shape[0] * shape[1])).reshape(shape).astype(np.uint8)
        return q

    p = m.PackedExperts.allocate(1, D, I)
    one = lambda s: np.ones(_grid(s), np.float32)  # noqa: E731
    p.set_slot(0, allcodes((I, D)), one((I, D)), allcodes((I, D)), one((I, D)), allcodes((D, I)),
               np.full(_grid((D, I)), 2.0 ** -12, np.float32))
    T = 8
    x = np.zeros((T, D), np.float32)
    x[np.arange(T), rng.integers(0, D, T)] = 1.0
    slots = np.zeros((T, 1), np.int32)
    w = np.ones((T, 1), np.float32)
    _check(p, x, slots, w, backend)
    # subnormal-only weights: results are tiny but must not flush to zero
    q_sub = rng.integers(1, 8, (I, D)).astype(np.uint8) | (rng.integers(0, 2, (I, D)).astype(np.uint8) << 7)
    p.set_slot(0, q_sub, one((I, D)), q_sub.copy(), one((I, D)), q_sub.T.copy(), one((D, I)))
    x = rng.standard_normal((1, D)).astype(np.float32)
    got, ref = _check(p, x, np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32), backend)
    assert np.abs(got).max() > 0


def test_zero_and_extreme_scales(backend):
    rng = np.random.default_rng(11)
    D, I, n, T, k = 384, 256, 3, 9, 2
    p = m.PackedExperts.allocate(n, D, I)
    g13, g2 = _grid((I, D)), _grid((D, I))
    for s in range(n):
        s1 = rng.choice(np.float32([0.0, 2.0 ** -100, 2.0 ** 40, 1.0]), g13).astype(np.float32)
        s3 = rng.choice(np.float32([0.0, 2.0 ** -20, 2.0 ** 20, 1.0]), g13).astype(np.float32)
        s2 = rng.choice(np.float32([0.0, 2.0 ** -60, 2.0 ** -30]), g2).astype(np.float32)
        s1[0, 0] = 2.0 ** 40
        s3[0, 0] = 1.0
        s2[0, 0] = 2.0 ** -60
        p.set_slot(s, _rand_q(rng, (I, D)), s1, _rand_q(rng, (I, D)), s3, _rand_q(rng, (D, I)), s2)
    x, slots, w = _inputs(rng, n, D, T, k)
    _check(p, x, slots, w, backend)
    # all-zero scales give exact zeros
    z = m.PackedExperts.allocate(1, D, I)
    z.set_slot(0, _rand_q(rng, (I, D)), np.zeros(g13, np.float32), _rand_q(rng, (I, D)),
               np.zeros(g13, np.float32), _rand_q(rng, (D, I)), np.zeros(g2, np.float32))
    assert np.all(m.moe_forward(z, x, np.zeros((T, 1), np.int32), np.ones((T, 1), np.float32)) == 0.0)


def test_thread_count_independent(backend):
    rng = np.random.default_rng(5)
    D, I, n, T, k = 256, 384, 6, 24, 4
    p = _make(rng, n, D, I)
    x, slots, w = _inputs(rng, n, D, T, k)
    saved = m.get_num_threads()
    try:
        m.set_num_threads(1)
        a = m.moe_forward(p, x, slots, w)
        m.set_num_threads(2)
        b = m.moe_forward(p, x, slots, w)
    finally:
        m.set_num_threads(saved)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(a).max()))


def test_out_argument_and_validation():
    rng = np.random.default_rng(9)
    p = _make(rng, 2, 128, 128)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    slots = np.array([[0, 1], [1, -1], [0, 0]], np.int32)
    w = np.ones((3, 2), np.float32)
    out = np.full((3, 128), np.nan, np.float32)
    r = m.moe_forward(p, x, slots, w, out=out)
    assert r is out and np.all(np.isfinite(out))
    with pytest.raises(ValueError):
        m.moe_forward(p, x, np.array([[0, 2]] * 3, np.int32), w)
    with pytest.raises(ValueError):
        m.moe_forward(p, x[:, :64], slots, w)
    assert m.moe_forward(p, x[:0], slots[:0], w[:0]).shape == (0, 128)


def test_threads_api():
    saved = m.get_num_threads()
    m.set_num_threads(None)
    assert m.get_num_threads() >= 1
    m.set_num_threads(1)
    assert m.get_num_threads() == 1
    with pytest.raises(ValueError):
        m.set_num_threads(0)
    m.set_num_threads(saved)


def test_warmup_and_quick_bench():
    assert m.warmup() >= 0.0
    from kimi_local.cpu_kernels.bench import bench_kernels
    r = bench_kernels(threads=1, quick=True)
    for key in ("decode", "mem_read_gbps", "decode_bw_fraction", "prefill", "torch_reference", "compile_seconds"):
        assert key in r
    assert r["decode"]["weight_bytes_per_s"] > 0 and r["prefill"]["tokens_per_s"] > 0
    assert r["torch_reference"]["speedup_numba_over_torch"] > 0


def test_precision_follows_activation_dtype():
    """bf16 models run one bf16 activation per product, float32/float16 models the hi+lo split; a forced
    set_precision wins over the per-call choice until reset."""
    assert m.precision_for(torch.bfloat16) == "bf16"
    assert m.precision_for(torch.float32) == "bf16x2" and m.precision_for(torch.float16) == "bf16x2"
    assert m.get_precision() == "bf16x2" and m.get_precision("bf16") == "bf16"
    m.set_precision("bf16x2")
    try:
        assert m.get_precision("bf16") == "bf16x2"
    finally:
        m.set_precision("auto")
    assert m.get_precision("bf16") == "bf16"
    with pytest.raises(ValueError):
        m.set_precision("fp8")


@pytest.mark.skipif(not FAST, reason="the bf16 / bf16x2 precisions exist on the AVX-512 BF16 path only")
def test_precision_argument_is_honoured():
    rng = np.random.default_rng(21)
    D, I, n, T, k = 256, 192, 4, 12, 3
    p = _make(rng, n, D, I)
    x, slots, w = _inputs(rng, n, D, T, k)
    ref = m.moe_forward_ref(p, x, slots, w)
    scale = float(np.abs(ref).max())
    hi = m.moe_forward(p, x, slots, w, precision="bf16x2")
    lo = m.moe_forward(p, x, slots, w, precision="bf16")
    err_hi = float(np.abs(hi - ref).max()) / scale
    err_lo = float(np.abs(lo - ref).max()) / scale
    assert err_hi <= 2e-5 and err_lo <= 1.5e-2
    assert err_lo > 10 * err_hi            # the single-bf16 rounding is really applied
    m.set_precision("bf16")
    try:
        np.testing.assert_array_equal(m.moe_forward(p, x, slots, w, precision="bf16x2"), lo)
    finally:
        m.set_precision(None)


def test_expert_backend_picks_precision_from_dtype(tiny_dir, monkeypatch):
    """The model's routed experts call the kernels in the precision of the model's dtype."""
    from kimi_local.checkpoint import load_model
    seen = []
    real = m.moe_forward

    def spy(*a, precision=None, **kw):
        seen.append(precision)
        return real(*a, precision=precision, **kw)

    monkeypatch.setattr(m, "moe_forward", spy)
    for dtype, want in ((torch.bfloat16, "bf16"), (torch.float32, "bf16x2")):
        model = load_model(tiny_dir, dtype=dtype, expert_backend="numba")
        seen.clear()                       # (the load's warm-up compiles both precisions)
        model(torch.tensor([[5, 6, 7]]))
        assert seen and set(seen) == {want}, (dtype, seen)


PROMPTS = (list(range(5, 40)), [7] * 20)


def test_numba_and_torch_backends_generate_the_same_tokens(tiny_dir):
    """Greedy generation on the tiny model (float32): the numba kernels and the torch twin give the same
    tokens, and logits agree to ~1e-5 of their scale."""
    from kimi_local.checkpoint import load_model
    a_model = load_model(tiny_dir, dtype=torch.float32, expert_backend="numba")
    b_model = load_model(tiny_dir, dtype=torch.float32, expert_backend="torch")
    for ids in PROMPTS:
        (ta, la), (tb, lb) = greedy(a_model, ids, 16), greedy(b_model, ids, 16)
        assert ta == tb
        assert float((la - lb).abs().max()) <= 1e-4 * float(lb.abs().max())


def test_numba_bf16_is_as_accurate_as_torch_bf16(tiny_dir):
    """In bf16 both backends round (activations / dequantised weights) differently, so greedy paths may part
    at near-ties; what must hold is that the numba path is no less accurate: scored on the same tokens (the
    float32 greedy continuation), its logits are as close to float32's as the torch bf16 path's are."""
    from kimi_local.checkpoint import load_model
    ref = load_model(tiny_dir, dtype=torch.float32, expert_backend="torch")
    nb = load_model(tiny_dir, dtype=torch.bfloat16, expert_backend="numba")
    tb = load_model(tiny_dir, dtype=torch.bfloat16, expert_backend="torch")
    for ids in PROMPTS:
        toks, _ = greedy(ref, ids, 16)
        seq = torch.tensor([ids + toks])
        want = ref(seq)[0].float()
        got_nb, got_tb = nb(seq)[0].float(), tb(seq)[0].float()
        err_nb = float((got_nb - want).abs().mean())
        err_tb = float((got_tb - want).abs().mean())
        assert err_nb <= 1.5 * err_tb + 1e-3, (err_nb, err_tb)
        # argmax agreement with float32 (random tiny weights leave many near-ties that bf16 flips)
        agree_nb = float((got_nb.argmax(-1) == want.argmax(-1)).float().mean())
        agree_tb = float((got_tb.argmax(-1) == want.argmax(-1)).float().mean())
        assert agree_nb >= agree_tb - 0.1, (agree_nb, agree_tb)


def test_vectorisable_exp_matches_numpy():
    """The kernels' float32 exp (silu in the gate/up epilogue) against numpy's, over the whole useful range,
    plus the clamped ends and NaN."""
    from numba import njit

    @njit
    def run(xs):
        out = np.empty_like(xs)
        for i in range(xs.size):
            out[i] = m._exp_f32(xs[i])
        return out

    x = np.concatenate([np.linspace(-87, 87.9, 200001, dtype=np.float32),
                        np.float32([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5])])
    got, want = run(x), np.exp(x.astype(np.float64))
    rel = np.abs(got.astype(np.float64) - want) / want
    assert rel.max() < 4e-7, rel.max()
    ends = run(np.float32([1000.0, -1000.0, np.inf, -np.inf, np.nan]))
    assert np.isfinite(ends[:4]).all() and ends[0] > 1e38 and 0 <= ends[1] < 1e-37
    assert np.isnan(ends[4])


def test_expert_precision_flag(tiny_dir):
    """--expert-precision forces the kernels' activation precision for a run; auto follows the dtype."""
    import argparse
    from kimi_local.cli_common import add_model_args, apply_expert_precision, load_from_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    try:
        args = p.parse_args(["--model", tiny_dir, "--expert-precision", "bf16x2"])
        _, model, _ = load_from_args(args)
        assert m.get_precision(m.precision_for(torch.bfloat16)) == "bf16x2"
        forced = model(torch.tensor([[5, 6, 7]]))
        apply_expert_precision("auto")
        assert m.get_precision(m.precision_for(torch.bfloat16)) == "bf16"
        auto = model(torch.tensor([[5, 6, 7]]))
        assert not torch.equal(forced, auto)          # the flag really changed the expert arithmetic
        assert p.parse_args(["--model", tiny_dir]).expert_precision == "auto"
        with pytest.raises(SystemExit):
            p.parse_args(["--expert-precision", "fp8"])
    finally:
        apply_expert_precision("auto")
