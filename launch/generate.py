"""Generate completions from a checkpoint (tp = 1, one process), through megaseek.model.generate.

    python launch/generate.py checkpoint=DIR prompts=FILE out=FILE [max_new_tokens=64] [temperature=0]
                              [top_k=0] [top_p=1.0] [seed=0] [batch_size=16] [backend=torch|onnxruntime]
                              [onnx=FILE]

`checkpoint` is a checkpoint directory or a run directory (its newest valid checkpoint). `prompts` is JSON
Lines: each line holds `prompt` (a string, tokenized as is) or `messages` (a chat, rendered with the chat
template of megaseek/data/chat.py plus the assistant marker; a trailing assistant turn, as in SFT data, is the
reference answer and is left out of the prompt). `out` receives the same lines with
`completion` (the decoded new tokens, the stop token excluded) and `finish_reason` ("stop" | "length") added.
temperature 0 is greedy; sampling is seeded per line (seed, line index), so a line's completion does not
depend on batch_size. Generation stops at the end-of-turn token (chat) or EOS. Bad input exits with code 2
and one message naming the file and line.

backend=onnxruntime decodes with the KV-cache ONNX graph (megaseek/export/ort_generate.py): `onnx` names a graph
written by `launch/export_onnx.py kv_cache=true`; without it the checkpoint is exported to a temporary graph first
(and validated against PyTorch). Rows are batched with rows of the same prompt length; completions equal the
torch backend's. A quantized directory (launch/quantize.py) is a checkpoint like any other: its weights are the
dequantized integers.
"""
import json
import os
import sys


REQUIRED = ("checkpoint", "prompts", "out")
OPTIONAL = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "batch_size", "backend", "onnx")
BACKENDS = ("torch", "onnxruntime")


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
        if msgs[-1]["role"] == "assistant":  # an SFT line: its last assistant turn is the reference, not the prompt
            msgs = msgs[:-1]
        if not msgs:
            raise ValueError(f"{where}: only an assistant turn: nothing to prompt with")
        return encode_chat(tok, msgs, add_generation_prompt=True)[0]
    ids = tok.encode(obj["prompt"]).ids
    if not ids:
        raise ValueError(f"{where}: empty prompt")
    return ids


def stop_ids(tok) -> list:
    from megaseek.data.chat import END_TOKEN, EOS_TOKEN
    return [i for i in (tok.token_to_id(END_TOKEN), tok.token_to_id(EOS_TOKEN)) if i is not None]


def onnx_completions(model, onnx, prompts: list, cfg, batch_size: int, max_seq_len: int) -> list:
    """New tokens of every prompt from the KV-cache graph `onnx` (exported from `model` to a temporary file and
    validated against it when None) in ONNX Runtime."""
    import tempfile
    from megaseek.export.onnx import ort_session
    from megaseek.export.onnx_kv import export_kv_onnx, validate_kv
    from megaseek.export.ort_generate import ort_generate
    with tempfile.TemporaryDirectory() as tmp:
        path = onnx or export_kv_onnx(model, os.path.join(tmp, "kv.onnx"))
        sess = ort_session(path)
        if onnx is None:
            rep = validate_kv(sess, model)
            if not rep["tokens_equal"] or rep["max_abs_diff"] > 1e-4:
                raise ValueError(f"the exported KV-cache graph disagrees with PyTorch ({rep})")
        return ort_generate(sess, prompts, cfg, row_ids=list(range(len(prompts))), batch_size=batch_size,
                            max_seq_len=max_seq_len, where=str(path))


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
        backend = a.get("backend", "torch")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
        if a.get("onnx") and backend != "onnxruntime":
            raise ValueError(f"onnx={a['onnx']} needs backend=onnxruntime")
        if a.get("onnx") and not os.path.isfile(a["onnx"]):
            raise ValueError(f"onnx={a['onnx']}: no such file (write one with launch/export_onnx.py kv_cache=true)")
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
    if backend == "onnxruntime":
        try:
            completions = onnx_completions(model, a.get("onnx"), prompts, cfg, bs, mcfg.max_seq_len)
        except ValueError as e:
            print(f"generate: {e}", file=sys.stderr)
            return 2
    else:
        completions = []
        for k in range(0, len(prompts), bs):
            completions += generate(model, prompts[k:k + bs], cfg, row_ids=list(range(k, k + len(prompts[k:k + bs]))),
                                    pad_id=pad)
    with open(a["out"], "w", encoding="utf-8") as f:
        for (_, obj), toks in zip(lines, completions):
            stopped = bool(toks) and toks[-1] in stops
            body = toks[:-1] if stopped else toks
            f.write(json.dumps(dict(obj, completion=tok.decode(body), finish_reason="stop" if stopped
                                    else "length")) + "\n")
    print(json.dumps({"checkpoint": str(ckpt), "prompts": len(prompts), "out": os.path.abspath(a["out"]),
                      "backend": backend}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
