"""Group-wise asymmetric integer weight quantization (round to nearest), packing, dequantization.

A weight W (out, in) is cut along its input dimension into groups of `group_size` columns (the last group may be
shorter; group_size >= in means one group per row). For a group g of row r with values w:

    lo = min(min w, 0),  hi = max(max w, 0)          (0 is always representable)
    scale = (hi - lo) / (2^b - 1)                     (1 where hi == lo)
    zero  = round(-lo / scale)          in [0, 2^b - 1]
    q     = clamp(round(w / scale) + zero, 0, 2^b - 1)     (b-bit unsigned codes)
    w'    = (q - zero) * scale

so every group holds at most 2^b distinct values. `g_idx` (in,) names the group of every input column; it is
arange(in) // group_size except after GPTQ's act-order, which forms groups in another column order.
Codes of b <= 4 bits are stored two per byte (low nibble = even column).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class QuantizedWeight:
    codes: torch.Tensor   # (out, in) uint8, values in [0, 2^bits - 1]
    scales: torch.Tensor  # (out, n_groups) float32
    zeros: torch.Tensor   # (out, n_groups) uint8 integer zero points
    g_idx: torch.Tensor   # (in,) int32: the group of each input column
    bits: int

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return (self.codes.float() - self.zeros.float()[:, g]) * self.scales[:, g]  # (out, in)


def check_bits(bits: int, group_size: int) -> None:
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bits={bits} must be in [2, 8]")
    if int(group_size) < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")


def group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of each row of w (rows, n): asymmetric min/max over the row, zero point integer."""
    qmax = 2 ** bits - 1
    lo = w.min(dim=1).values.clamp(max=0)  # (rows,)
    hi = w.max(dim=1).values.clamp(min=0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w (rows, n) or (rows,) under per-row (scale, zero): clamp(round(w/scale) + zero, 0, 2^b - 1)."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


def rtn(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Round-to-nearest with one (scale, zero) per row and group of consecutive columns."""
    check_bits(bits, group_size)
    w = weight.detach().float()  # (out, in)
    out, n = w.shape
    gs = min(int(group_size), n)
    codes, scales, zeros = [], [], []
    for a in range(0, n, gs):
        s, z = group_params(w[:, a:a + gs], bits)  # (out,) each
        codes.append(quantize_codes(w[:, a:a + gs], s, z, bits))
        scales.append(s)
        zeros.append(z)
    return QuantizedWeight(codes=torch.cat(codes, 1).to(torch.uint8), scales=torch.stack(scales, 1),
                           zeros=torch.stack(zeros, 1).to(torch.uint8),
                           g_idx=(torch.arange(n) // gs).to(torch.int32), bits=int(bits))


# --- storage: two 4-bit codes per byte ---
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, in) uint8 codes -> (out, ceil(in/2)) uint8 for bits <= 4 (column 2j in the low nibble), else as is."""
    if bits > 4:
        return codes.to(torch.uint8).contiguous()
    c = codes.to(torch.uint8)
    if c.shape[1] % 2:
        c = torch.cat([c, c.new_zeros(c.shape[0], 1)], 1)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack`: (out, cols) uint8 codes."""
    if bits > 4:
        return packed
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)[:, :cols].contiguous()


def distinct_per_group(w: torch.Tensor, g_idx: Optional[torch.Tensor], group_size: int) -> int:
    """The largest number of distinct values in any (row, group) of a dequantized weight (out, in)."""
    n = w.shape[1]
    g = (torch.arange(n) // min(group_size, n)) if g_idx is None else g_idx.long()
    worst = 0
    for k in torch.unique(g).tolist():
        cols = w[:, g == k]  # (out, |group|)
        worst = max(worst, max(int(torch.unique(row).numel()) for row in cols))
    return worst
