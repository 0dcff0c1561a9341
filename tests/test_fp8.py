"""Block-FP8 dequantisation equals torch's float8_e4m3fn conversion times the block scales."""

import pytest
import torch

from kimi_local.fp8 import FP8_DTYPE, FP8BlockWeight, dequantize, expand_scales, quantize


@pytest.mark.parametrize("shape", [(128, 128), (576, 300), (130, 7), (1, 129), (256, 384)])
def test_dequantize_matches_torch_conversion(shape):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x00  # no NaN codes
    q = codes.view(FP8_DTYPE)
    grid = (-(-shape[0] // 128), -(-shape[1] // 128))
    s = torch.rand(grid, generator=g) * 3 + 0.01
    expected = q.to(torch.float32) * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    got = dequantize(q, s)
    assert torch.equal(got, expected)
    # Element rule, edge blocks included: W[i, j] = q[i, j] * s[i // 128, j // 128].
    i, j = shape[0] - 1, shape[1] - 1
    assert got[i, j] == q[i, j].float() * s[i // 128, j // 128]
    assert torch.equal(expand_scales(s, shape, (128, 128)), s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]])


def test_every_e4m3_code_including_subnormals():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F].view(1, -1)
    q = codes.view(FP8_DTYPE)
    got = dequantize(q, torch.tensor([[2.0, 2.0]]))
    assert torch.equal(got, q.float() * 2.0)
    assert (got.abs() > 0).sum() == 252  # 254 finite codes, +0 and -0 are zero
    assert got[0, 1].item() == 2.0 * 2 ** -9  # smallest subnormal, 2^-9


def test_quantize_roundtrip_and_scale_grid():
    w = torch.randn(300, 200)
    fw = quantize(w)
    assert fw.scale_inv.shape == (3, 2)
    assert fw.q.dtype == FP8_DTYPE
    rel = (fw.dequantize() - w).abs().max() / w.abs().max()
    assert rel < 0.07  # e4m3 has 3 mantissa bits
    with pytest.raises(ValueError, match="expected"):
        FP8BlockWeight(fw.q, torch.ones(2, 2))
