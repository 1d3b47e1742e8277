"""Loss and perplexity of a text file under a checkpoint (tp = 1, CPU or whatever torch runs on):

    python launch/evaluate.py checkpoint=RUN_DIR/checkpoints/global_step1000 text_file=held_out.txt [seq_len=256]

Prints one JSON line {"checkpoint", "text_file", "tokens", "loss", "perplexity"}: the text is tokenized with the
checkpoint's tokenizer.json after one EOS (as every document follows an EOS in training); each of its `tokens`
tokens is predicted once, in independent windows of seq_len (default model.max_seq_len); loss is the mean
token cross-entropy (nats), perplexity = exp(loss). Bad input exits with code 2 and one message.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
    from megaseek.ckpt.hf import CheckpointError, evaluate_text, parse_cli
    try:
        args = parse_cli(argv, ("checkpoint", "text_file"), ("seq_len",))
        path = args["text_file"]
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such text file")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text:
            raise ValueError(f"{path}: empty text file")
        seq_len = int(args["seq_len"]) if args.get("seq_len") else None
        res = evaluate_text(args["checkpoint"], text, seq_len)
    except (CheckpointError, ValueError, UnicodeDecodeError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr, flush=True)
        return 2
    res = {"checkpoint": res["checkpoint"], "text_file": os.path.abspath(path), "tokens": res["tokens"],
           "loss": res["loss"], "perplexity": res["perplexity"]}
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
