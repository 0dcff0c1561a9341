"""The Numba RMSNorm fast path (kimi_local.cpu_kernels.norm) against the module's own torch code."""

import pytest
import torch

from kimi_local.cpu_kernels.norm import MAX_ROWS, install
from kimi_local.cpu_kernels.simd import have_avx512_bf16
from kimi_local.model import RMSNorm


def _pair(dim, eps=1e-6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = RMSNorm(dim, eps)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(dim, generator=g) * 0.5 + 1.0)
    fast = RMSNorm(dim, eps)
    fast.load_state_dict(ref.state_dict())

    assert install(torch.nn.ModuleList([fast])) == 1 and fast.fast is not None
    return ref, fast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("shape", [(1, 1, 192), (3, 5, 160), (1, 7168), (2, 1, 40)])
def test_fast_rms_norm_matches_torch(dtype, shape):
    ref, fast = _pair(shape[-1], seed=shape[-1])
    ref, fast = ref.to(dtype), fast.to(dtype)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 3).to(dtype)
    with torch.inference_mode():
        want, got = ref(x), fast(x)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.bfloat16:   # the same rounding steps; mean-of-squares order may move a last bit (see below)
        rel = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30)
        assert float(rel.max()) <= 1.5 * 2 ** -7
        assert float((got != want).float().mean()) < 0.01
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


def test_fast_rms_norm_strided_input_and_special_values():
    ref, fast = _pair(96)
    ref, fast = ref.to(torch.bfloat16), fast.to(torch.bfloat16)
    base = torch.randn(4, 128).to(torch.bfloat16)
    x = base[:, :96]                                   # a split view, as MLA's c_kv is
    assert not x.is_contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref(x), rtol=2 ** -7, atol=0)
        z = torch.zeros(1, 96, dtype=torch.bfloat16)
        assert torch.equal(fast(z), ref(z))           # eps keeps zero rows finite
        n = x.clone()
        n[0, 3] = float("nan")
        assert torch.isnan(fast(n)[0]).all() and torch.isnan(ref(n)[0]).all()


@pytest.mark.skipif(not have_avx512_bf16(), reason="the prefill-sized SIMD kernel needs AVX-512 BF16")
@pytest.mark.parametrize("shape", [(1, 300, 192), (520, 96), (2, 40, 7168)])
def test_simd_rms_norm_for_prefill_batches(shape):
    """bf16 batches above MAX_ROWS rows take the SIMD kernel: the same rounding steps as torch (a last bit may
    move with the order of the sum of squares), zero rows stay finite and NaN rows NaN; other widths decline."""
    ref, fast = _pair(shape[-1], seed=7)
    ref, fast = ref.to(torch.bfloat16), fast.to(torch.bfloat16)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])) * 3).to(torch.bfloat16)
    x.view(-1, shape[-1])[5] = 0.0
    x.view(-1, shape[-1])[9, 3] = float("nan")
    with torch.inference_mode():
        want, got = ref(x), fast(x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)) and torch.isnan(got.view(-1, shape[-1])[9]).all()
    # a sum of 7168 squares in another order can move the scale by an ulp and flip the first rounding (to bf16,
    # before the weight): at most one bf16 step there, plus half a step in the second rounding
    rel = (got.float() - want.float()).abs()[finite] / want.float().abs()[finite].clamp_min(1e-30)
    assert float(rel.max()) <= 1.5 * 2 ** -7
    assert float((got[finite] != want[finite]).float().mean()) < 0.01
    odd_ref, odd = _pair(72)
    odd.to(torch.bfloat16)
    assert odd.fast(torch.randn(MAX_ROWS + 1, 72).to(torch.bfloat16)) is None
    # rows whose elements are not adjacent (a transposed view) decline too; a split view (MLA's c_kv) is fine
    assert fast.fast(x.reshape(-1, shape[-1]).t().contiguous().t()) is None
    wide = (torch.randn(MAX_ROWS + 1, shape[-1] + 16) * 3).to(torch.bfloat16)
    with torch.inference_mode():
        part = wide[:, : shape[-1]]
        assert not part.is_contiguous()
        torch.testing.assert_close(fast(part), ref(part), rtol=1.5 * 2 ** -7, atol=0)


def test_fast_path_declines_what_it_does_not_cover():
    ref, fast = _pair(64)
    big = torch.randn(MAX_ROWS + 1, 64)
    assert fast.fast(big) is None                      # prefill-sized batches stay on torch
    assert fast.fast(torch.randn(2, 64, dtype=torch.float16)) is None
    x = torch.randn(2, 64, requires_grad=True)
    assert fast.fast(x) is None
    xb = torch.randn(2, 64).to(torch.bfloat16)         # float32 weight, bf16 input: torch promotes to float32
    assert fast.fast(xb) is None and fast(xb).dtype == ref(xb).dtype == torch.float32
    torch.testing.assert_close(fast(big), ref(big))


def test_loader_installs_fast_norm_on_cpu(tiny_dir):
    from kimi_local.checkpoint import load_model
    m = load_model(tiny_dir, dtype=torch.float32, expert_backend="torch")
    norms = [mod for mod in m.modules() if isinstance(mod, RMSNorm)]
    assert norms and all(n.fast is not None for n in norms)
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        a = m(tokens)
        for n in norms:
            n.fast = None
        b = m(tokens)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_stale_numba_caches_dropped_when_intrinsics_change(tmp_path, monkeypatch):
    """Numba keys a module's cache on that file alone; the package drops its kernels' caches when simd.py or
    mathf.py (the helpers the kernels inline) change, and leaves them alone otherwise."""
    import kimi_local.cpu_kernels as ck
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    sub = tmp_path / "kimi_local" / "cpu_kernels"
    sub.mkdir(parents=True)
    ours, theirs = sub / "fp8_moe._gemv4-1.py311.nbi", sub / "other_pkg.f-1.py311.nbi"
    also_ours = sub / "attention._heads-1.py311.nbc"
    for f in (ours, theirs, also_ours):
        f.write_bytes(b"x")
    (tmp_path / "kimi-simd-0000000000000000.stamp").write_text("")   # stamp of an older simd.py
    ck._drop_stale_numba_caches()
    assert not ours.exists() and not also_ours.exists() and theirs.exists()
    stamps = list(tmp_path.glob("kimi-simd-*.stamp"))
    assert len(stamps) == 1 and stamps[0].name != "kimi-simd-0000000000000000.stamp"
    ours.write_bytes(b"x")                                             # compiled again for this simd.py
    ck._drop_stale_numba_caches()
    assert ours.exists()
