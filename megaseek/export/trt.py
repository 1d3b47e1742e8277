"""TensorRT engine from an ONNX file, with one optimization profile covering the dynamic axes.

For every graph input, each dimension is either fixed or symbolic; symbolic `batch` and `seq` get
(min, opt, max) = (1, opt_batch, max_batch) and (1, opt_seq, max_seq). TensorRT 10 takes precision flags
(FP16/BF16 on the builder config); TensorRT >= 11 has strongly typed networks only (precision comes from the
ONNX file: export with autocast or Q/DQ nodes), so no flag is set there. Where TensorRT or CUDA is absent,
`build_engine` reports SKIP and builds nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from megaseek.export.onnx import graph_inputs


def profiles(onnx_path: str | Path, max_batch: int = 8, opt_batch: int = 1, max_seq: Optional[int] = None,
             opt_seq: Optional[int] = None) -> dict:
    """input name -> {"min", "opt", "max"} shapes (lists of ints) for the graph's inputs."""
    ins = graph_inputs(onnx_path)
    if not ins:
        raise ValueError(f"{onnx_path}: the graph has no inputs")
    max_seq = int(max_seq or 256)
    opt_seq = int(opt_seq or max(1, max_seq // 2))
    if not (1 <= opt_batch <= max_batch and 1 <= opt_seq <= max_seq):
        raise ValueError(f"profile needs 1 <= opt <= max: batch ({opt_batch}, {max_batch}), seq ({opt_seq}, {max_seq})")
    ranges = {"batch": (1, opt_batch, max_batch), "seq": (1, opt_seq, max_seq)}
    out = {}
    for name, dims in ins.items():
        lo, opt, hi = [], [], []
        for k, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                r = (d, d, d)
            else:  # symbolic: by name, else batch first and sequence after
                r = ranges.get(str(d), ranges["batch"] if k == 0 else ranges["seq"])
            lo.append(r[0]); opt.append(r[1]); hi.append(r[2])
        out[name] = {"min": lo, "opt": opt, "max": hi}
    return out


def why_unavailable() -> Optional[str]:
    """None when TensorRT and a CUDA device are usable, else the reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (python package `tensorrt`)"
    try:
        import torch
        if not torch.cuda.is_available():
            return "no CUDA device"
    except ImportError:
        return "torch is not installed"
    return None


def build_engine(onnx_path: str | Path, out: str | Path, prof: dict, precision: str = "fp16") -> Path:
    """Parse the ONNX file and serialize an engine to `out` (TensorRT 10 flags, TensorRT 11 strongly typed)."""
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse the ONNX file: {errs}")
    config = builder.create_builder_config()
    p = builder.create_optimization_profile()
    for name, r in prof.items():
        p.set_shape(name, r["min"], r["opt"], r["max"])
    config.add_optimization_profile(p)
    flag = {"fp16": "FP16", "bf16": "BF16"}.get(precision)
    if flag and hasattr(trt.BuilderFlag, flag):  # TensorRT 10; gone in 11 (strongly typed)
        config.set_flag(getattr(trt.BuilderFlag, flag))
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed")
    out = Path(out)
    out.write_bytes(bytes(engine))
    return out
