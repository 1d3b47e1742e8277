"""Export a checkpoint to a Hugging Face directory (LlamaForCausalLM for gqa models, DeepseekV3ForCausalLM for mla):

    python launch/export_hf.py checkpoint=RUN_DIR/checkpoints/global_step1000 out=hf/my-model
    python launch/export_hf.py checkpoint=RUN_DIR out=hf/my-model     # the run's newest valid checkpoint

Writes config.json, model.safetensors (fp32), tokenizer.json + tokenizer_config.json. A missing, corrupt or
foreign checkpoint exits with code 2 and one message naming the path; nothing is written to `out`.
`overwrite=true` replaces a non-empty `out`.
"""
import sys



def main(argv: list[str]) -> int:
    from megaseek.ckpt.hf import CheckpointError, export_hf, parse_cli
    try:
        args = parse_cli(argv, ("checkpoint", "out"), ("overwrite",))
        out = export_hf(args["checkpoint"], args["out"], overwrite=args.get("overwrite", "false").lower() == "true")
    except (CheckpointError, ValueError) as e:
        print(f"export_hf: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"export_hf: wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
