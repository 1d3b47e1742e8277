"""TensorRT engine from an ONNX file (launch/export_onnx.py), one optimization profile over the dynamic axes:

    python launch/build_trt.py onnx=FILE [out=FILE.engine] [max_batch=8] [opt_batch=1] [max_seq=256] [opt_seq=...]
                               [precision=fp16|bf16|fp32] [dry_run=true]   (also --dry-run)

Where TensorRT or CUDA is absent it prints one line `SKIP: <reason>` and exits 0. The dry run prints the
profiles it would use as one JSON line {"onnx", "profiles": {input: {min, opt, max}}} and builds nothing.
Bad input exits with code 2 and one message.
"""
import json
import os
import sys


OPTIONAL = ("out", "max_batch", "opt_batch", "max_seq", "opt_seq", "precision", "dry_run")


def main(argv: list[str]) -> int:
    from megaseek.ckpt.hf import parse_cli
    argv = ["dry_run=true" if x == "--dry-run" else x for x in argv]
    try:
        a = parse_cli(argv, ("onnx",), OPTIONAL)
        if not os.path.isfile(a["onnx"]):
            raise ValueError(f"onnx={a['onnx']}: no such file")
        if a.get("precision", "fp16") not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"precision={a['precision']!r}: choose fp16, bf16 or fp32")
        from megaseek.export.trt import profiles
        prof = profiles(a["onnx"], max_batch=int(a.get("max_batch", 8)), opt_batch=int(a.get("opt_batch", 1)),
                        max_seq=int(a["max_seq"]) if a.get("max_seq") else None,
                        opt_seq=int(a["opt_seq"]) if a.get("opt_seq") else None)
    except Exception as e:  # unreadable ONNX files raise assorted errors: one message either way
        print(f"build_trt: error: {e}", file=sys.stderr, flush=True)
        return 2
    if a.get("dry_run", "false").lower() in ("true", "1"):
        print(json.dumps({"onnx": os.path.abspath(a["onnx"]), "profiles": prof}), flush=True)
        return 0
    from megaseek.export.trt import build_engine, why_unavailable
    why = why_unavailable()
    if why is not None:
        print(f"SKIP: {why}; no engine built (profiles: {json.dumps(prof)})", flush=True)
        return 0
    out = a.get("out") or (a["onnx"][:-5] if a["onnx"].endswith(".onnx") else a["onnx"]) + ".engine"
    path = build_engine(a["onnx"], out, prof, a.get("precision", "fp16"))
    print(json.dumps({"engine": str(path), "bytes": os.path.getsize(path), "profiles": prof}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
