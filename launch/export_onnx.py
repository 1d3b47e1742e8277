"""ONNX export of a checkpoint (tp = 1), validated by ONNX Runtime on export:

    python launch/export_onnx.py checkpoint=DIR out=FILE [quantized=int8] [kv_cache=true] [batch=2] [seq=16]
                                 [opset=18]

input_ids (batch, seq) int64 -> logits (batch, seq, vocab) float32, both axes symbolic (seq up to
model.max_seq_len). A quantized checkpoint directory (launch/quantize.py) exports its dequantized weights.
quantized=int8 also writes FILE with suffix .int8.onnx (ONNX Runtime dynamic int8). Prints one JSON line
{path, max_abs_diff, shapes, inputs[, int8]}. kv_cache=true writes the KV-cache step graph instead
(megaseek/export/onnx_kv.py), validated by greedy decoding against PyTorch: {path, kv_cache, tokens_equal,
max_abs_diff, inputs}. Bad input exits with code 2 and one message.
"""
import json
import os
import sys


def main(argv: list[str]) -> int:
    from megaseek.ckpt.hf import CheckpointError, load_model, parse_cli
    try:
        a = parse_cli(argv, ("checkpoint", "out"), ("quantized", "kv_cache", "batch", "seq", "opset"))
        if a.get("quantized") not in (None, "", "int8"):
            raise ValueError(f"quantized={a['quantized']!r}: only int8 (ONNX Runtime dynamic) is supported")
        model, cfg = load_model(a["checkpoint"])
    except (CheckpointError, ValueError) as e:
        print(f"export_onnx: error: {e}", file=sys.stderr, flush=True)
        return 2
    from megaseek.export.onnx import check_shapes, export_onnx, graph_inputs, ort_session, quantize_int8
    if a.get("kv_cache", "false").lower() in ("true", "1"):
        from megaseek.export.onnx_kv import export_kv_onnx, validate_kv
        path = export_kv_onnx(model, a["out"], opset=int(a.get("opset", 18)))
        rep = dict(path=str(path), kv_cache=True, **validate_kv(ort_session(path), model),
                   inputs=graph_inputs(path))
        if not rep["tokens_equal"] or rep["max_abs_diff"] > 1e-4:
            print(f"export_onnx: error: {path}: the KV-cache graph disagrees with PyTorch ({rep})", file=sys.stderr)
            return 1
        print(json.dumps(rep), flush=True)
        return 0
    try:
        rep = export_onnx(model, a["out"], example=(int(a.get("batch", 2)), int(a.get("seq", 16))),
                          opset=int(a.get("opset", 18)))
    except ValueError as e:
        print(f"export_onnx: error: {e}", file=sys.stderr, flush=True)
        return 2
    if a.get("quantized") == "int8":
        base = a["out"][:-5] if a["out"].endswith(".onnx") else a["out"]
        q = quantize_int8(a["out"], base + ".int8.onnx")
        rep["int8"] = {"path": str(q), "bytes": os.path.getsize(q), "fp32_bytes": os.path.getsize(a["out"]),
                       "max_abs_diff": check_shapes(model, ort_session(q), [(2, 16)])}
    print(json.dumps(rep), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
