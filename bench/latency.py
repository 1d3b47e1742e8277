"""Inference latency: time to first token (prefill of the prompt + first token) and per-token decode time
(p50 / p95 over the generated tokens) at batch 1 and 8, greedy, for

    eager       PyTorch, no cache: every new token recomputes the whole prefix
    kv          PyTorch with the model's KV cache (megaseek/model/cache.py): one token per step
    ort         ONNX Runtime on the exported logits graph (no cache: whole prefix per token)
    ort+kv      ONNX Runtime on the KV-cache step graph (megaseek/export/onnx_kv.py): one token per step
    int8+kv     torchao dynamic int8 linears (activations per token, weights per channel) with the KV cache

    python bench/latency.py [checkpoint=DIR] [prompt=32] [new=32] [threads=1]

Without a checkpoint, the `tiny` model shape (conf/model/tiny.yaml defaults) with its seeded init is timed (latency
does not depend on the weights' values). Ratios are against `eager` at the same batch, measured in the same run.
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1e3, q))


@torch.no_grad()
def run_torch(model, prompt: torch.Tensor, new: int, cached: bool):
    """(ttft_s, [per-token decode s]) of greedy decoding."""
    ids = prompt
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + new) if cached else None
    t0 = time.perf_counter()
    z = model(ids, cache=cache) if cached else model(ids)
    nxt = z[:, -1].argmax(-1, keepdim=True)
    ttft = time.perf_counter() - t0
    steps = []
    for _ in range(new - 1):
        t = time.perf_counter()
        if cached:
            z = model(nxt, cache=cache)
        else:
            ids = torch.cat([ids, nxt], 1)
            z = model(ids)
        nxt = z[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - t)
    return ttft, steps


def run_ort(sess, prompt: np.ndarray, new: int):
    ids = prompt
    t0 = time.perf_counter()
    nxt = sess.run(["logits"], {"input_ids": ids})[0][:, -1].argmax(-1)[:, None]
    ttft = time.perf_counter() - t0
    steps = []
    for _ in range(new - 1):
        t = time.perf_counter()
        ids = np.concatenate([ids, nxt], 1)
        nxt = sess.run(["logits"], {"input_ids": ids})[0][:, -1].argmax(-1)[:, None]
        steps.append(time.perf_counter() - t)
    return ttft, steps


def run_ort_kv(sess, model, prompt: np.ndarray, new: int):
    from megaseek.export.onnx_kv import NAMES_OUT, cache_shape
    pk = np.zeros(cache_shape(model, prompt.shape[0], 0), dtype=np.float32)
    pv, ids, steps = pk.copy(), prompt, []
    t0 = time.perf_counter()
    for i in range(new):
        t = time.perf_counter()
        z, pk, pv = sess.run(list(NAMES_OUT), {"input_ids": ids, "past_keys": pk, "past_values": pv})
        ids = z[:, -1].argmax(-1)[:, None].astype(np.int64)
        if i == 0:
            ttft = time.perf_counter() - t0
        else:
            steps.append(time.perf_counter() - t)
    return ttft, steps


def main(argv):
    from megaseek.ckpt.hf import parse_cli
    a = parse_cli(argv, (), ("checkpoint", "prompt", "new", "threads"))
    torch.set_num_threads(int(a.get("threads", 1)))
    P, N = int(a.get("prompt", 32)), int(a.get("new", 32))
    if a.get("checkpoint"):
        from megaseek.ckpt.hf import load_model
        model, cfg = load_model(a["checkpoint"])
    else:
        from megaseek.model.config import ModelConfig
        from megaseek.model.decoder import Decoder
        cfg = ModelConfig()
        model = Decoder(cfg, seed=0).eval()
    from megaseek.export.onnx import export_onnx, ort_session
    from megaseek.quant.torchao_cpu import quantize_int8
    tmp = tempfile.mkdtemp()
    export_onnx(model, os.path.join(tmp, "m.onnx"))
    sess = ort_session(os.path.join(tmp, "m.onnx"))
    from megaseek.export.onnx_kv import export_kv_onnx
    sess_kv = ort_session(export_kv_onnx(model, os.path.join(tmp, "kv.onnx")))
    q = quantize_int8(copy.deepcopy(model), "int8_dynamic")
    print(f"model {cfg.name}: h={cfg.hidden_size} L={cfg.num_layers} V={cfg.vocab_size}; prompt {P}, {N} new tokens, "
          f"{torch.get_num_threads()} thread(s)")
    print("| batch | variant | TTFT ms | decode p50 ms/token | decode p95 ms/token | tokens/s | vs eager |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for b in (1, 8):
        prompt = torch.randint(0, cfg.vocab_size, (b, P), generator=torch.Generator().manual_seed(b))
        variants = {"eager": lambda: run_torch(model, prompt, N, False),
                    "kv": lambda: run_torch(model, prompt, N, True),
                    "ort": lambda: run_ort(sess, prompt.numpy(), N),
                    "ort+kv": lambda: run_ort_kv(sess_kv, model, prompt.numpy(), N),
                    "int8+kv": lambda: run_torch(q, prompt, N, True)}
        res = {}
        for name, fn in variants.items():
            fn()  # warm-up
            res[name] = fn()
        base = None
        for name, (ttft, steps) in res.items():
            tps = b * len(steps) / sum(steps)
            base = base or tps
            print(f"| {b} | {name} | {ttft * 1e3:.2f} | {_pct(steps, 50):.2f} | {_pct(steps, 95):.2f} | "
                  f"{tps:,.0f} | {tps / base:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
