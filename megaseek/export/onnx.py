"""ONNX export of a tp = 1 model: input_ids (batch, seq) int64 -> logits (batch, seq, V) float32.

torch.onnx's dynamo exporter traces the model with torch.export; `batch` and `seq` are symbolic dimensions
(seq in [1, max_seq_len]). Every export is validated at once by ONNX Runtime on the example and on two other
shapes (max abs logit difference vs PyTorch). `quantize_int8` writes the ONNX Runtime dynamic-int8 variant
(weights of MatMul/Gather int8 per tensor, activations quantized at run time).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

INPUT, OUTPUT = "input_ids", "logits"


class LogitsOnly(nn.Module):
    """model(ids)[..., :V]: the plain logits function of a decoder, the graph that is exported."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.vocab = model, int(model.cfg.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[..., :self.vocab]  # (b, s, V)


def ort_session(path: str | Path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_shapes(model: nn.Module, sess, shapes: Sequence[tuple], seed: int = 0) -> float:
    """Max abs logit difference between ONNX Runtime and PyTorch over random ids of each (b, s) shape."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for b, s in shapes:
            ids = torch.randint(0, model.cfg.vocab_size, (b, s), generator=g)
            ref = model(ids)[..., :model.cfg.vocab_size].numpy()
            got = sess.run([OUTPUT], {INPUT: ids.numpy()})[0]
            if got.shape != ref.shape:
                raise RuntimeError(f"ONNX logits of shape {got.shape} for input {(b, s)}, PyTorch {ref.shape}")
            worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def export_onnx(model: nn.Module, out: str | Path, example: tuple = (2, 16), opset: int = 18,
                tol: float = 1e-4) -> dict:
    """Export, then validate with ONNX Runtime. Returns {path, max_abs_diff, shapes, inputs}; raises when the
    ORT logits differ from PyTorch's by more than `tol` at any checked shape."""
    model = model.eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    S = int(model.cfg.max_seq_len)
    b0, s0 = example
    if not 1 <= s0 <= S:
        raise ValueError(f"example sequence {s0} must be in [1, model.max_seq_len={S}]")
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=S)
    ids = torch.randint(0, model.cfg.vocab_size, (b0, s0))
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(model), (ids,), str(out), dynamo=True, opset_version=opset,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}}, external_data=False,
                          verbose=False)
    shapes = [tuple(example), (1, 1), (max(1, b0 // 2) + 1, min(S, 2 * s0 + 3))]
    diff = check_shapes(model, ort_session(out), shapes)
    if diff > tol:
        raise RuntimeError(f"{out}: ONNX Runtime logits differ from PyTorch by {diff:.3e} > {tol:g}")
    return {"path": str(out), "max_abs_diff": diff, "shapes": shapes, "inputs": graph_inputs(out)}


def graph_inputs(path: str | Path) -> dict:
    """name -> list of dims (int, or the symbolic name) of the ONNX graph's inputs."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_param if d.dim_param else int(d.dim_value) for d in i.type.tensor_type.shape.dim]
            for i in m.graph.input}


def quantize_int8(src: str | Path, out: str | Path) -> Path:
    """ONNX Runtime dynamic quantization: int8 weights (MatMul, Gather), uint8/int8 activations at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    return Path(out)
