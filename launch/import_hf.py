"""Import a Hugging Face model directory as a megaseek checkpoint:

    python launch/import_hf.py hf_dir=hf/my-model out=ckpt/my-model

Reads LlamaForCausalLM and DeepseekV3ForCausalLM directories (config.json + model.safetensors or a sharded
safetensors index; tokenizer.json copied when present) and writes one checkpoint directory (weights only, step 0)
that `launch/evaluate.py checkpoint=DIR`, `launch/export_hf.py checkpoint=DIR` and `train.init_from=DIR` read.
A missing or foreign directory, or a model megaseek cannot represent, exits with code 2 and one message; nothing is
written to `out`. `overwrite=true` replaces a non-empty `out`.
"""
import sys


def main(argv: list[str]) -> int:
    from megaseek.ckpt.hf import CheckpointError, import_hf, parse_cli
    try:
        args = parse_cli(argv, ("hf_dir", "out"), ("overwrite",))
        out = import_hf(args["hf_dir"], args["out"], overwrite=args.get("overwrite", "false").lower() == "true")
    except (CheckpointError, ValueError) as e:
        print(f"import_hf: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"import_hf: wrote {out} (evaluate with launch/evaluate.py checkpoint={out}; "
          f"start a run from it with train.init_from={out})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
