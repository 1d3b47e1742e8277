"""The projections' GEMM (`megaseek/tensor_parallel/gemm.py`, `train.gemm`) and the loss's reused scratch buffer
(`megaseek/tensor_parallel/scratch.py`).

oneDNN against torch's F.linear: forward, data, weight and bias gradients within fp32 rounding of a float64
reference, for 2-D / 3-D / non-contiguous inputs; eager = torch.compile; `aten` is F.linear exactly; the
dispatch really runs oneDNN (the op is seen by the profiler) and a bad `train.gemm` is refused at validation.
The scratch buffer is handed out again only when free: two pending loss forwards (both saved for their
backward) get two buffers and exact gradients; the variant that ignores the use count hands the first one's
saved softmax to the second forward (autograd's version counter refuses the backward).
"""
import pytest
import torch
import torch.nn.functional as F

from megaseek.tensor_parallel import gemm, scratch
from megaseek.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megaseek.tensor_parallel.layers import TPContext

pytestmark = pytest.mark.skipif(not gemm.onednn_available(), reason="this torch has no oneDNN")


def _rel(a, b):
    return (a.double() - b.double()).abs().max().item() / b.double().abs().max().item()


@pytest.mark.parametrize("shape,transposed,bias", [((37, 24), False, False), ((3, 11, 24), False, True),
                                                  ((24, 37), True, False)])
def test_onednn_linear_matches_float64(shape, transposed, bias):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(*shape, generator=gen)
    x0 = x0.t() if transposed else x0  # (37, 24) non-contiguous
    w0 = torch.randn(40, 24, generator=gen)
    b0 = torch.randn(40, generator=gen) if bias else None
    dy = torch.randn(*x0.shape[:-1], 40, generator=gen)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    b = b0.clone().requires_grad_() if bias else None
    y = gemm.linear(x, w, b)
    y.backward(dy)
    xr, wr = x0.double().requires_grad_(), w0.double().requires_grad_()
    br = b0.double().requires_grad_() if bias else None
    yr = F.linear(xr, wr, br)
    yr.backward(dy.double())
    assert y.shape == yr.shape and y.dtype == torch.float32
    assert _rel(y, yr) < 1e-6
    assert _rel(x.grad, xr.grad) < 1e-6 and _rel(w.grad, wr.grad) < 1e-6
    if bias:
        assert _rel(b.grad, br.grad) < 1e-6


def test_aten_backend_is_f_linear_exactly_and_auto_runs_onednn():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 32, generator=gen), torch.randn(48, 32, generator=gen)
    try:
        gemm.set_backend("aten")
        assert torch.equal(gemm.linear(x, w), F.linear(x, w))
        with torch.profiler.profile() as prof:
            gemm.linear(x, w)
        assert not any("onednn" in e.key for e in prof.key_averages())
    finally:
        gemm.set_backend("auto")
    with torch.profiler.profile() as prof:
        gemm.linear(x, w)
    assert any(e.key == "megaseek::onednn_mm_nt" for e in prof.key_averages())
    # not a plain fp32 CPU tensor: torch's own path
    assert gemm.linear(x.double(), w.double()).dtype == torch.float64
    assert gemm.linear(x[:0], w).shape == (0, 48)


def test_compiled_linear_equals_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    x0, w0 = torch.randn(4, 9, 32, generator=gen), torch.randn(48, 32, generator=gen)
    outs = []
    compiled = torch.compile(lambda x, w: F.silu(gemm.linear(x, w)), fullgraph=True)  # no graph break
    for f in (lambda x, w: F.silu(gemm.linear(x, w)), compiled):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.profiler.profile() as prof:
            y = f(x, w)
            y.square().sum().backward()
        assert any("onednn" in e.key or "mkldnn" in e.key for e in prof.key_averages())  # still oneDNN compiled
        outs.append((y.detach(), x.grad, w.grad))
    for a, b in zip(*outs):
        assert _rel(a, b) < 1e-6
    torch._dynamo.reset()


def test_output_takes_in_place_ops_and_unneeded_grads_are_not_computed():
    gen = torch.Generator().manual_seed(4)
    x0, w0 = torch.randn(2, 5, 16, generator=gen), torch.randn(8, 16, generator=gen)
    x = x0.clone().requires_grad_()
    y = gemm.linear(x, w0)  # weight without grad: only dx
    y.add_(1.0).sum().backward()  # in-place on the output is legal, as with F.linear
    xr = x0.clone().requires_grad_()
    F.linear(xr, w0).add_(1.0).sum().backward()
    assert _rel(x.grad, xr.grad) < 1e-6


def test_bad_gemm_value_is_refused_at_validation():
    from megaseek.config.schema import ConfigError
    with pytest.raises(ValueError, match=r"train.gemm='mkl': choose one of auto, onednn, aten"):
        gemm.check_backend("mkl")
    from megaseek.config.schema import validate
    from tests.helpers import compose
    cfg = compose(["train.gemm=mkl"])
    with pytest.raises(ConfigError, match="train.gemm"):
        validate(cfg, world_size=1, has_cuda=False)


def test_scratch_is_reused_only_when_free():
    scratch.clear()
    shape = (2, 64, 4096)  # 2 MiB fp32: above scratch.MIN_BYTES
    a = scratch.scratch(shape, torch.float32, "cpu")
    held = scratch.scratch(shape, torch.float32, "cpu")
    assert held.data_ptr() != a.data_ptr()  # `a` is still alive: not handed out twice
    ptr = a.data_ptr()
    del a, held
    assert scratch.scratch(shape, torch.float32, "cpu").data_ptr() == ptr  # free again: reused
    assert scratch.scratch((3, 4), torch.float32, "cpu").data_ptr() != ptr  # small: plain torch.empty
    scratch.clear()


def _two_pending_losses():
    """Two loss forwards before either backward (two micro-batches in flight): each gradient must be its own."""
    gen = torch.Generator().manual_seed(3)
    zs = [torch.randn(2, 64, 4096, generator=gen) * 3 for _ in range(2)]
    ys = [torch.randint(0, 4096, (2, 64), generator=gen) for _ in range(2)]
    pend = []
    for z0, y in zip(zs, ys):
        z = z0.clone().requires_grad_()
        pend.append((z, vocab_parallel_cross_entropy(z, y, TPContext(), 0)))
    worst = 0.0
    for (z, loss), z0, y in zip(pend, zs, ys):
        loss.sum().backward()
        zr = z0.clone().requires_grad_()
        F.cross_entropy(zr.view(-1, 4096), y.view(-1), reduction="sum").backward()
        worst = max(worst, _rel(z.grad, zr.grad))
    return worst


def test_pending_loss_buffers_are_not_shared(monkeypatch):
    scratch.clear()
    assert _two_pending_losses() < 1e-5
    scratch.clear()
    monkeypatch.setattr(scratch, "_use_count", lambda t: 0)  # the broken pool: never sees a holder
    monkeypatch.setattr(scratch, "_pool", scratch.OrderedDict())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _two_pending_losses()  # the second forward overwrote the first one's saved softmax (autograd sees it)
    scratch.clear()
