"""Generate completions from a checkpoint (tp = 1, one process), through megaseek.model.generate.

    python launch/generate.py checkpoint=DIR prompts=FILE out=FILE [max_new_tokens=64] [temperature=0]
                              [top_k=0] [top_p=1.0] [seed=0] [batch_size=16]

`checkpoint` is a checkpoint directory or a run directory (its newest valid checkpoint). `prompts` is JSON
Lines: each line holds `prompt` (a string, tokenized as is) or `messages` (a chat, rendered with the chat
template of megaseek/data/chat.py plus the assistant marker). `out` receives the same lines with
`completion` (the decoded new tokens, the stop token excluded) and `finish_reason` ("stop" | "length") added.
temperature 0 is greedy; sampling is seeded per line (seed, line index), so a line's completion does not
depend on batch_size. Generation stops at the end-of-turn token (chat) or EOS. Bad input exits with code 2
and one message naming the file and line.
"""
import json
import os
import sys


REQUIRED = ("checkpoint", "prompts", "out")
OPTIONAL = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "batch_size")


def read_prompts(path: str) -> list:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such prompts file")
    lines = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(obj, dict) or not (isinstance(obj.get("prompt"), str) or "messages" in obj):
                raise ValueError(f'{path}:{n}: expected an object with "prompt": str or "messages": [...]')
            lines.append((f"{path}:{n}", obj))
    if not lines:
        raise ValueError(f"{path}: no prompts")
    return lines


def encode_prompt(tok, obj: dict, where: str) -> list:
    from megaseek.data.chat import check_messages, encode_chat
    if "messages" in obj:
        try:
            msgs = check_messages(obj)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return encode_chat(tok, msgs, add_generation_prompt=True)[0]
    ids = tok.encode(obj["prompt"]).ids
    if not ids:
        raise ValueError(f"{where}: empty prompt")
    return ids


def stop_ids(tok) -> list:
    from megaseek.data.chat import END_TOKEN, EOS_TOKEN
    return [i for i in (tok.token_to_id(END_TOKEN), tok.token_to_id(EOS_TOKEN)) if i is not None]


def main(argv: list) -> int:
    from megaseek.ckpt.hf import CheckpointError, model_at, parse_cli, resolve_checkpoint
    from megaseek.data.chat import PAD_TOKEN
    from megaseek.data.tokenizer import load_tokenizer
    from megaseek.model.generate import SamplingConfig, generate
    try:
        a = parse_cli(argv, REQUIRED, OPTIONAL)
        cfg = SamplingConfig(max_new_tokens=int(a.get("max_new_tokens", 64)),
                             temperature=float(a.get("temperature", 0.0)), top_k=int(a.get("top_k", 0)),
                             top_p=float(a.get("top_p", 1.0)), seed=int(a.get("seed", 0)))
        cfg.validate()
        bs = int(a.get("batch_size", 16))
        if bs < 1:
            raise ValueError(f"batch_size={bs} must be >= 1")
        ckpt = resolve_checkpoint(a["checkpoint"])
        lines = read_prompts(a["prompts"])
        tok = load_tokenizer(ckpt / "tokenizer.json")
        model, mcfg = model_at(ckpt)
        cfg.stop_tokens = tuple(stop_ids(tok))
        pad = tok.token_to_id(PAD_TOKEN) or 0
        prompts = [encode_prompt(tok, obj, where) for where, obj in lines]
        for (where, _), p in zip(lines, prompts):
            if len(p) + cfg.max_new_tokens > mcfg.max_seq_len:
                raise ValueError(f"{where}: prompt ({len(p)} tokens) + max_new_tokens ({cfg.max_new_tokens}) "
                                 f"exceeds the model's max_seq_len ({mcfg.max_seq_len})")
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"generate: {e}", file=sys.stderr)
        return 2
    stops = set(cfg.stop_tokens)
    with open(a["out"], "w", encoding="utf-8") as f:
        for k in range(0, len(prompts), bs):
            new = generate(model, prompts[k:k + bs], cfg, row_ids=list(range(k, k + len(prompts[k:k + bs]))),
                           pad_id=pad)
            for (_, obj), toks in zip(lines[k:k + bs], new):
                stopped = bool(toks) and toks[-1] in stops
                body = toks[:-1] if stopped else toks
                f.write(json.dumps(dict(obj, completion=tok.decode(body), finish_reason="stop" if stopped
                                        else "length")) + "\n")
    print(json.dumps({"checkpoint": str(ckpt), "prompts": len(prompts), "out": os.path.abspath(a["out"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
