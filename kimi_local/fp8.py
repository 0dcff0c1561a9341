"""The one block-FP8 weight type used everywhere in kimi-local.

A checkpoint FP8 weight is an e4m3 tensor ``q`` of shape [out, in] plus a float32 ``scale_inv`` grid of
shape [ceil(out/bo), ceil(in/bi)] (bo = bi = 128 for Kimi-K2 / DeepSeek-V3).  Dequantisation is a
*multiply* despite the name:  ``W[i, j] = float(q[i, j]) * scale_inv[i // bo, j // bi]``.  Edge blocks
of shapes that are not multiples of the block size share the edge scale entry (the quantiser padded
them with zeros before computing the scale, then cut the padding off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def scale_grid_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


@dataclass
class FP8BlockWeight:
    """Block-scaled e4m3 weight.  ``q`` is float8_e4m3fn [out, in]; ``scale_inv`` float32 grid."""

    q: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        if self.q.dtype == torch.uint8:
            self.q = self.q.view(FP8_DTYPE)
        if self.q.dtype != FP8_DTYPE:
            raise TypeError(f"FP8BlockWeight.q must be float8_e4m3fn, got {self.q.dtype}")
        if self.q.dim() != 2:
            raise ValueError(f"FP8BlockWeight.q must be 2-D, got shape {tuple(self.q.shape)}")
        want = scale_grid_shape(tuple(self.q.shape), self.block)
        if tuple(self.scale_inv.shape) != want:
            raise ValueError(
                f"scale_inv shape {tuple(self.scale_inv.shape)} does not match weight shape "
                f"{tuple(self.q.shape)} with {self.block[0]}x{self.block[1]} blocks (expected {want})")

    def nan_codes(self) -> int:
        """Number of e4m3 NaN codes (0x7F / 0xFF) in the weight: a valid checkpoint has none."""
        return int(((self.q.view(torch.uint8) & 0x7F) == 0x7F).sum())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale_inv.numel() * 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale_inv, self.block, dtype)

    def to(self, device) -> "FP8BlockWeight":
        return FP8BlockWeight(self.q.to(device), self.scale_inv.to(device), self.block)


def expand_scales(scale_inv: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Blow the block grid up to one scale per element (edge blocks cut to the weight's true shape)."""
    s = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return s[: shape[0], : shape[1]]


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
               dtype: torch.dtype = torch.float32, band_rows: int = 4096) -> torch.Tensor:
    """Reference dequantisation: float32(q) * per-block scale, computed in float32, cast at the end.

    Works on bands of ``band_rows`` rows (a multiple of the block height), each in one broadcast
    multiply, so a big matrix never needs a full-size float32 copy and a small one costs a few torch ops.
    """
    if q.dtype == torch.uint8:
        q = q.view(FP8_DTYPE)
    rows, cols = q.shape
    bo, bi = block
    band_rows = max(bo, band_rows // bo * bo)
    out = torch.empty((rows, cols), dtype=dtype, device=q.device)
    s_cols = scale_inv.float().repeat_interleave(bi, 1)[:, :cols]           # [row blocks, cols]
    for r0 in range(0, rows, band_rows):
        r1 = min(rows, r0 + band_rows)
        full = (r1 - r0) // bo * bo                                            # rows in whole blocks
        b0 = r0 // bo
        if full:
            blocks = q[r0: r0 + full].float().view(full // bo, bo, cols)
            blocks.mul_(s_cols[b0: b0 + full // bo, None, :])
            out[r0: r0 + full] = blocks.view(full, cols).to(dtype)
        if r0 + full < r1:                                                     # partial last block
            out[r0 + full: r1] = (q[r0 + full: r1].float() * s_cols[b0 + full // bo]).to(dtype)
    return out


def quantize(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> FP8BlockWeight:
    """Quantise a float weight to block FP8 the way DeepSeek's tooling does: per 128x128 block,
    scale = amax / 448, with edge blocks zero-padded for the amax (padding never changes an amax)."""
    w = w.float()
    rows, cols = w.shape
    gr, gc = scale_grid_shape((rows, cols), block)
    pad = torch.zeros(gr * block[0], gc * block[1], dtype=torch.float32, device=w.device)
    pad[:rows, :cols] = w
    blocks = pad.view(gr, block[0], gc, block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    qf = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = qf.view(gr * block[0], gc * block[1])[:rows, :cols].to(FP8_DTYPE).contiguous()
    return FP8BlockWeight(q, scale.contiguous(), block)
