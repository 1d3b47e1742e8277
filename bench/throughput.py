"""Training-step throughput: our model against Hugging Face transformers' LlamaForCausalLM with the same
sizes, on this machine, in this run; MFU against this machine's measured fp32 matmul peak.

Both sides run the same step in one process: forward, token cross-entropy, backward, AdamW step (torch's
fused AdamW on both sides), fp32, the same threads. Our projections run on the GEMM library `train.gemm`
selects (`--gemm`, default auto: oneDNN on CPU, megaseek/tensor_parallel/gemm.py); HF's `nn.Linear` on
torch's default (MKL on CPU). `--gemm aten` puts ours on MKL too, to show what the library is worth.
For each model size and mode the two models alternate step by step (AB BA AB ..) so that machine noise
hits both alike; the median step time of each is reported,
with the median per-pair ratio of process CPU time (robust to descheduling on a loaded machine) and the load
average.
Modes: `eager`, and `compiled` = regional torch.compile of the decoder blocks on both sides (ours as
`train.compile=true` does it, HF's LlamaDecoderLayer modules likewise).

    python bench/throughput.py [--models tiny,small] [--modes eager,compiled] [--batch 8] [--seq 256]
                               [--small-batch 2] [--steps 6] [--gemm auto|onednn|aten] [--profile]

`--profile`: torch.profiler over a few eager steps of ours, printing where the step's time goes (matmul,
attention, norms, optimizer, communication, other; self CPU time of the ops) next to each class's share of
the step's FLOPs (megaseek/model/flops.py), so the next gap is visible.
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
from megaseek.model.decoder import Decoder, compile_blocks  # noqa: E402
from megaseek.model.flops import flops_per_token, measure_matmul_peak, param_counts  # noqa: E402
from megaseek.tensor_parallel.gemm import set_backend as set_gemm_backend  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_cfg(name: str) -> ModelConfig:
    with open(os.path.join(ROOT, "conf", "model", f"{name}.yaml")) as f:
        d = {k: v for k, v in yaml.safe_load(f).items() if k != "defaults"}
    return ModelConfig.from_dict(dict(d, pad_vocab_multiple=1))  # the same parameter count as HF's


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


def make_steps(cfg: ModelConfig, ids: torch.Tensor, labels: torch.Tensor, compiled: bool):
    ours = Decoder(cfg, seed=0)
    hf = hf_llama(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    if compiled:
        compile_blocks(ours)
        for layer in hf.model.layers:
            layer.compile()
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_h = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)

    def step_ours():
        loss = ours.token_losses(ours(ids), labels).mean()
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


def abab(step_o, step_h, steps: int, warmup: int = 2) -> tuple[float, float, float]:
    """Median step time of each, the two alternating; the order flips every step (AB BA AB ..) so that neither
    always runs first (after the other's allocations, on a warm or cold cache). Also the median over the
    pairs of the process-CPU-time ratio hf/ours: on a loaded machine time spent descheduled inflates wall
    time at random, CPU time much less (at 1 thread it is the step's own compute; with more, OpenMP's
    spin-waits count too)."""
    for _ in range(warmup):  # warm-up (and compilation) of both
        step_o()
        step_h()
    wall = {step_o: [], step_h: []}
    cpu = {step_o: [], step_h: []}
    for i in range(steps):
        for f in ((step_o, step_h) if i % 2 == 0 else (step_h, step_o)):
            t, c = time.perf_counter(), time.process_time()
            f()
            wall[f].append(time.perf_counter() - t)
            cpu[f].append(time.process_time() - c)
    cpu_ratio = statistics.median(h / o for o, h in zip(cpu[step_o], cpu[step_h]))
    return statistics.median(wall[step_o]), statistics.median(wall[step_h]), cpu_ratio


CLASSES = (("communication", ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "c10d", "gloo", "nccl")),
           ("optimizer", ("adam", "_foreach", "optimizer")),
           ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "_sdpa", "softmax")),
           ("norms", ("rms_norm", "rsqrt", "pow", "mean")),
           ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn", "onednn")))


def classify(op: str) -> str:
    low = op.lower()
    for name, keys in CLASSES:
        if any(k in low for k in keys):
            return name
    return "other"


def profile(cfg: ModelConfig, ids, labels, steps: int = 3) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    step_o, _ = make_steps(cfg, ids, labels, compiled=False)
    step_o()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step_o()
    by = {}
    for ev in prof.key_averages():
        by[classify(ev.key)] = by.get(classify(ev.key), 0.0) + ev.self_cpu_time_total
    total = sum(by.values()) or 1.0
    tokens, s = ids.numel(), ids.shape[1]
    n = param_counts(cfg)["active_matmul"]
    f_all = flops_per_token(cfg, s)["model"]
    fl = {"matmul": 6 * n / f_all, "attention": (f_all - 6 * n) / f_all}
    print(f"profile of {steps} eager steps of megaseek {cfg.name} ({tokens} tokens/step): "
          f"self CPU time by op class vs share of the step's model FLOPs")
    for name in ("matmul", "attention", "norms", "optimizer", "communication", "other"):
        print(f"  {name:13s} time {by.get(name, 0.0) / total:6.1%}   FLOPs {fl.get(name, 0.0):6.1%}")
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    print("  top ops: " + ", ".join(f"{e.key} {e.self_cpu_time_total / total:.1%}" for e in top))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--small-batch", type=int, default=2, help="batch of models other than tiny")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--gemm", default="auto", help="train.gemm of our model (HF keeps torch's default)")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    set_gemm_backend(a.gemm)
    peak = measure_matmul_peak(seconds=1.0)
    print(f"measured fp32 matmul peak (the faster of MKL and oneDNN): {peak / 1e9:.1f} GFLOP/s, train.gemm="
          f"{a.gemm}, {a.threads} threads, fp32, median of "
          f"{a.steps} ABAB steps after 2 warm-up steps; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    rows = []
    for name in a.models.split(","):
        cfg = load_cfg(name)
        batch = a.batch if name == "tiny" else a.small_batch
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (batch, a.seq), generator=g)
        labels = torch.randint(0, cfg.vocab_size, (batch, a.seq), generator=g)
        fpt = flops_per_token(cfg, a.seq)["model"]
        if a.profile:
            profile(cfg, ids, labels)
        for mode in a.modes.split(","):
            so, sh = make_steps(cfg, ids, labels, compiled=mode == "compiled")
            to, th, cpu_ratio = abab(so, sh, a.steps)
            tok = batch * a.seq
            r = dict(model=name, params=param_counts(cfg)["total"], mode=mode, batch=batch, ours=tok / to, hf=tok / th,
                     mfu_o=fpt * tok / to / peak, mfu_h=fpt * tok / th / peak)
            rows.append(r)
            print(f"{name:5s} {r['params'] / 1e6:7.2f}M b{batch}x{a.seq} {mode:8s}: megaseek {r['ours']:8.0f} tok/s "
                  f"(MFU {r['mfu_o']:5.1%})  HF {r['hf']:8.0f} tok/s (MFU {r['mfu_h']:5.1%})  "
                  f"ratio {r['ours'] / r['hf']:.3f}  (CPU-time ratio {cpu_ratio:.3f}, load {os.getloadavg()[0]:.1f})",
                  flush=True)
    print("| model | mode | megaseek tokens/s | HF Llama tokens/s | ratio | MFU megaseek | MFU HF |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} ({r['params'] / 1e6:.1f}M, b{r['batch']}x{a.seq}) | {r['mode']} | {r['ours']:.0f} | "
              f"{r['hf']:.0f} | {r['ours'] / r['hf']:.3f} | {r['mfu_o']:.1%} | {r['mfu_h']:.1%} |")


if __name__ == "__main__":
    main()
