"""The training step's hand-written kernels against the plain torch ops they replace (fp32, tp = 1):
the fused gate/up SwiGLU on the interleaved GEMM output, and the cross-entropy that allocates one
(b, s, V) tensor instead of four. Same values and gradients within float rounding; the logits are not
modified; ignored labels (< 0) give no loss and no gradient."""
import torch
import torch.nn.functional as F

from megaseek.model.layers import swiglu_interleaved
from megaseek.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megaseek.tensor_parallel.layers import TPContext


def test_swiglu_interleaved_equals_silu_times_up_on_the_split_views():
    gen = torch.Generator().manual_seed(0)
    y0 = torch.randn(3, 5, 2 * 24, generator=gen) * 3  # columns g_0, u_0, g_1, u_1, ..
    da = torch.randn(3, 5, 24, generator=gen)
    y1, y2 = y0.clone().requires_grad_(), y0.clone().requires_grad_()
    a1 = swiglu_interleaved(y1)
    a1.backward(da)
    g, u = y2.view(3, 5, 24, 2).unbind(-1)
    a2 = F.silu(g) * u
    a2.backward(da)
    assert a1.shape == (3, 5, 24) and a1.is_contiguous()
    assert (a1 - a2).abs().max().item() < 1e-5 * a2.abs().max().item()
    assert (y1.grad - y2.grad).abs().max().item() < 1e-5 * y2.grad.abs().max().item()
    assert y1.grad[..., 0::2].abs().sum() > 0 and y1.grad[..., 1::2].abs().sum() > 0


def test_cross_entropy_equals_torch_and_leaves_the_logits_alone():
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        z = (torch.randn(2, 7, 50, generator=gen) * 4).to(dtype).requires_grad_()
        y = torch.randint(0, 50, (2, 7), generator=gen)
        y[0, 2], y[1, 5] = -100, -1  # ignored
        w = torch.randn(2, 7, generator=gen)  # an upstream gradient that is not a plain mean
        before = z.detach().clone()
        loss = vocab_parallel_cross_entropy(z, y, TPContext(), 0)
        (loss * w).sum().backward()
        assert torch.equal(z.detach(), before)
        zr = z.detach().float().requires_grad_()
        ref = F.cross_entropy(zr.view(-1, 50), y.clamp(min=0).view(-1), reduction="none").view(2, 7)
        ref = ref.masked_fill(y < 0, 0.0)
        (ref * w).sum().backward()
        assert loss.dtype == torch.float32 and z.grad.dtype == dtype
        assert (loss - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert (z.grad.float() - zr.grad).abs().max().item() <= tol * zr.grad.abs().max().item()
        assert loss[0, 2] == 0 and loss[1, 5] == 0
        assert z.grad[0, 2].abs().max() == 0 and z.grad[1, 5].abs().max() == 0
