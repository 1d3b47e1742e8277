"""GPTQ (Frantar et al., 2022): one-shot weight quantization with second-order error compensation.

For a linear layer y = x W^T with calibration inputs X (n, in), the layer's output error of a quantized Q is

    E(Q) = ||X W^T - X Q^T||_F^2 = tr((W - Q) H (W - Q)^T),   H = X^T X  (in, in)

GPTQ quantizes the columns of W one at a time (optionally in decreasing order of diag(H): "act-order") and,
after column j, spreads its error over the columns not yet quantized, the optimal update for E given that
column j is frozen (Optimal Brain Surgeon):

    e_j = (w_j - q_j) / [H^-1]_jj,     W[:, k] -= e_j [H^-1]_jk  for k > j

where H^-1 is the inverse of the damped Hessian restricted to the remaining columns; its upper Cholesky factor U
(H^-1 = U^T U) gives those rows directly ([H^-1 restricted]_j,k>=j = U_jj U_j,k). Updates are applied lazily
per block of columns. Groups take their (scale, zero) from the current (already error-updated) columns when
the first column of the group is reached, as in the reference implementation.
"""
from __future__ import annotations

import torch

from megaseek.quant.groupwise import QuantizedWeight, check_bits, group_params, quantize_codes


def output_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error tr((W-Q) H (W-Q)^T) / tr(W H W^T) on the calibration inputs behind H."""
    d = (w - q).double()
    h = hessian.double()
    num = torch.einsum("oi,ij,oj->", d, h, d)
    den = torch.einsum("oi,ij,oj->", w.double(), h, w.double())
    return float(num / den)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, act_order: bool = True,
         damp: float = 0.01, block: int = 128) -> QuantizedWeight:
    """Quantize weight (out, in) against the input Hessian H = X^T X (in, in) of its calibration data."""
    check_bits(bits, group_size)
    W = weight.detach().double().clone()  # (out, in)
    H = hessian.detach().double().clone()  # (in, in)
    out, n = W.shape
    gs = min(int(group_size), n)
    dead = torch.diag(H) == 0  # inputs never active: any value is free, take zero
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H^-1 = U^T U

    codes = torch.zeros(out, n, dtype=torch.uint8)
    n_groups = (n + gs - 1) // gs
    scales = torch.ones(out, n_groups, dtype=torch.float64)
    zeros = torch.zeros(out, n_groups, dtype=torch.float64)
    s = z = None
    for a in range(0, n, block):
        b = min(a + block, n)
        W1, E1, U1 = W[:, a:b].clone(), torch.zeros(out, b - a, dtype=W.dtype), U[a:b, a:b]  # (out, B), (B, B)
        for i in range(b - a):
            j = a + i  # column in act-order
            if j % gs == 0:  # a new group: parameters from its current (error-updated) columns
                span = torch.cat([W1[:, i:], W[:, b:]], 1)[:, :gs]  # (out, <= gs)
                s, z = group_params(span, bits)
                scales[:, j // gs], zeros[:, j // gs] = s, z
            w = W1[:, i]  # (out,)
            c = quantize_codes(w, s, z, bits)
            codes[:, j] = c.to(torch.uint8)
            e = (w - (c - z) * s) / U1[i, i]  # (out,)
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            E1[:, i] = e
        W[:, b:] -= E1 @ U[a:b, b:]  # the block's errors, spread over the later columns
    inv = torch.argsort(perm)
    g_idx = (torch.arange(n) // gs)[inv]  # column c (original order) sat at act-order position inv[c]
    return QuantizedWeight(codes=codes[:, inv].contiguous(), scales=scales.float(), zeros=zeros.to(torch.uint8),
                           g_idx=g_idx.to(torch.int32), bits=int(bits))
