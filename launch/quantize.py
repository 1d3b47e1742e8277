"""Post-training weight quantization of a checkpoint (tp = 1, CPU):

    python launch/quantize.py checkpoint=DIR method=rtn|gptq bits=4 group_size=128 out=DIR
        [calib_windows=64] [seq_len=...] [calib_file=FILE] [eval_file=FILE] [act_order=true] [damp=0.01] [seed=0]
        [overwrite=false]
    python launch/quantize.py checkpoint=DIR method=int8_weight_only|int8_dynamic      (torchao; measures only)

Calibration uses train windows of the run's prepared data (or calib_file); the perplexity before and after is
measured on the run's held-out split (or eval_file). `out` is a megaseek checkpoint (fp32 dequantized weights,
readable by launch/evaluate.py) plus quant.safetensors with the integer codes, scales and zero points; load it
with megaseek.quant.load_quantized. Prints one JSON line (the report without the per-layer list, which is in
out/quant.json). Bad input exits with code 2 and one message.
"""
import json
import sys


OPTIONAL = ("method", "bits", "group_size", "out", "calib_windows", "seq_len", "calib_file", "eval_file",
            "act_order", "damp", "seed", "overwrite")


def _bool(k: str, v: str) -> bool:
    if v.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"{k}={v!r}: use true or false")
    return v.lower() in ("true", "1")


def main(argv: list[str]) -> int:
    from megaseek.ckpt.hf import CheckpointError, parse_cli
    try:
        a = parse_cli(argv, ("checkpoint",), OPTIONAL)
        kw = dict(method=a.get("method", "gptq"), bits=int(a.get("bits", 4)), group_size=int(a.get("group_size", 128)),
                  calib_windows=int(a.get("calib_windows", 64)),
                  seq_len=int(a["seq_len"]) if a.get("seq_len") else None,
                  calib_file=a.get("calib_file"), eval_file=a.get("eval_file"),
                  act_order=_bool("act_order", a.get("act_order", "true")), damp=float(a.get("damp", 0.01)),
                  seed=int(a.get("seed", 0)), overwrite=_bool("overwrite", a.get("overwrite", "false")))
        from megaseek.quant.api import quantize_checkpoint
        rep = quantize_checkpoint(a["checkpoint"], a.get("out"), log=lambda s: print(s, file=sys.stderr), **kw)
    except (CheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"quantize: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({k: v for k, v in rep.items() if k != "layers"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
