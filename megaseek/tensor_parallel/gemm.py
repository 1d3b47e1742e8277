"""The GEMM behind every projection: `linear(x, w)` = x w^T, on oneDNN where it is the faster CPU library.

On CPU, fp32 `F.linear` / `torch.mm` call MKL's sgemm. On this project's machines (AMD EPYC, AVX-512) MKL
takes a slower code path than oneDNN (bundled with torch as mkldnn), which picks its kernels by ISA: for
the decoder's shapes oneDNN's forward GEMM is 1.3-1.6x faster and the data-gradient GEMM 1.1-1.5x
(measured in one process, `bench/throughput.py` shows the step). So `linear` runs

    forward      y  = x w^T    (m, k) x (n, k)^T -> (m, n)   oneDNN matmul
    data grad    dx = dy w     (m, n) x (n, k)   -> (m, k)   oneDNN matmul with w^T as its weight (a view)
    weight grad  dw = dy^T x   (n, m) x (m, k)   -> (n, k)   torch.mm (MKL: oneDNN would need dy^T copied)

and the bias gradient db = sum_m dy. The sharding math is the caller's (a column-parallel layer passes its
(out/p, in) shard, a row-parallel one its (out, in/p) shard): `linear` is exactly x w^T on whatever it gets.

`train.gemm` selects: `auto` (oneDNN for fp32 CPU tensors when torch has it, else `F.linear`), `onednn`
(the same, an error where oneDNN is missing), `aten` (always `F.linear`, torch's default library). The two
libraries round differently (fp32 sums in another order, ~1e-7 relative): a run keeps one choice.
The oneDNN call is a torch custom op with a shape function, so `torch.compile` keeps it as one opaque
kernel (inductor's own mkldnn linear lowering wants frozen weights).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

BACKENDS = ("auto", "onednn", "aten")
_state = {"backend": "auto"}


def check_backend(name: str) -> None:
    """Refuse a `train.gemm` value this process cannot run (config validation calls it)."""
    if name not in BACKENDS:
        raise ValueError(f"train.gemm={name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "onednn" and not onednn_available():
        raise ValueError("train.gemm=onednn: this torch build has no oneDNN (torch.backends.mkldnn); "
                         "use train.gemm=auto or train.gemm=aten")


def set_backend(name: str) -> None:
    """`train.gemm`: one of BACKENDS, for this process."""
    check_backend(name)
    _state["backend"] = name


_ONEDNN = bool(torch.backends.mkldnn.is_available())  # read once: torch.compile may not trace the query


def onednn_available() -> bool:
    return _ONEDNN


@torch.library.custom_op("megaseek::onednn_mm_nt", mutates_args=())
def onednn_mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a b^T with oneDNN: a (m, k), b (n, k) (any strides) -> (m, n) contiguous."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


@onednn_mm_nt.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[0])


class _OneDNNLinear(torch.autograd.Function):
    """y = x w^T (+ b) on oneDNN for 2-D x (m, k); backward as the module docstring states. `linear` reshapes
    around it, so the output is not a view made inside the Function (in-place ops on it stay legal)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        y = onednn_mm_nt(x2, w)  # (m, n)
        if bias is not None:
            y = y.add_(bias)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x2 if need_dw else None, w if need_dx else None)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x2, w = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = onednn_mm_nt(dy, w.t())  # dy w: (m, n) x (n, k)
        if ctx.needs_input_grad[1]:
            dw = torch.mm(dy.t(), x2)  # dy^T x: (n, k)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)  # (n,)
        return dx, dw, db


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    if _state["backend"] == "aten" or torch.compiler.is_exporting():  # export: a graph of standard ops (ONNX)
        return False
    return (type(x) in _PLAIN and type(w) in _PLAIN  # not a tensor subclass (quantized / fp8 / DTensor weights)
            and x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32 and w.dim() == 2 and x.dim() >= 2 and x.numel() > 0
            and onednn_available()
            and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., k) w (n, k)^T (+ bias (n,)) -> (..., n), on the library `train.gemm` selects."""
    if _use_onednn(x, w):
        y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), w, bias)  # (m, n)
        return y.view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, bias)
