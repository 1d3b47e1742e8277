"""Training-step throughput: our model against Hugging Face transformers' LlamaForCausalLM with the same
sizes, on this machine, in this run; plus MFU against this machine's measured fp32 matmul peak.

Both sides run the same step in one process: forward, token cross-entropy, backward, AdamW step
(torch.optim.AdamW, foreach), fp32, with the same threads. Steps alternate between the two models
(ABAB...) so that machine noise hits both alike; the median step time of each is reported.

    python bench/throughput.py [--model tiny] [--batch 8] [--seq 256] [--steps 12]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from megaseek.model.config import ModelConfig  # noqa: E402
from megaseek.model.decoder import Decoder  # noqa: E402
from megaseek.model.flops import flops_per_token, measure_matmul_peak, param_counts  # noqa: E402


def hf_llama(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_seq_len,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                     attention_bias=False, mlp_bias=False)
    hc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(hc)


def make_steps(cfg: ModelConfig, ids: torch.Tensor, labels: torch.Tensor):
    ours = Decoder(cfg, seed=0)
    hf = hf_llama(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4, foreach=True)
    opt_h = torch.optim.AdamW(hf.parameters(), lr=1e-4, foreach=True)

    def step_ours():
        loss = ours(ids, labels)
        loss.backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)

    def step_hf():
        logits = hf(input_ids=ids).logits
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        opt_h.step()
        opt_h.zero_grad(set_to_none=True)

    return step_ours, step_hf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "conf", "model", f"{a.model}.yaml")) as f:
        cfg = ModelConfig.from_dict(yaml.safe_load(f))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g)
    step_o, step_h = make_steps(cfg, ids, labels)
    for _ in range(2):  # warm-up both
        step_o()
        step_h()
    to, th = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        step_o()
        to.append(time.perf_counter() - t)
        t = time.perf_counter()
        step_h()
        th.append(time.perf_counter() - t)
    peak = measure_matmul_peak(seconds=1.0)
    tokens = a.batch * a.seq
    fpt = flops_per_token(cfg, a.seq)["model"]
    tps_o, tps_h = tokens / statistics.median(to), tokens / statistics.median(th)
    print(f"model {cfg.name}: {param_counts(cfg)['total'] / 1e6:.2f}M params, batch {a.batch} x seq {a.seq}, "
          f"{a.threads} threads, fp32, {a.steps} steps each (median)")
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"megaseek     : {tps_o:9.0f} tokens/s   MFU {fpt * tps_o / peak:6.1%}")
    print(f"HF Llama     : {tps_h:9.0f} tokens/s   MFU {fpt * tps_h / peak:6.1%}")
    print(f"ratio megaseek / HF = {tps_o / tps_h:.3f}")


if __name__ == "__main__":
    main()
