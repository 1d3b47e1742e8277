"""One-GPU readiness: a ~1B dense decoder trained in bf16 (autocast, fp32 master weights), fused attention
(scaled_dot_product_attention: flash / memory-efficient kernels on CUDA), fused AdamW. Prints tokens/s and
MFU against the chip's datasheet peak (megaseek/model/flops.py PEAK_TFLOPS) and against a bf16 matmul
measured on the same device in the same run, plus the allocator's peak and fragmentation.

    MFU = tokens/s * F_token / peak,   F_token = 6 N_matmul + 12 L s h   (megaseek/model/flops.py)

On CUDA the caching allocator uses expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)
unless the environment says otherwise; fragmentation = reserved - allocated at the step peak.

    python bench/gpu_mfu.py                 # ~1.1B on cuda:0, 2048 tokens x batch 8
    python bench/gpu_mfu.py --dry-run       # a tiny model on CPU, 3 steps: the same code path, for CI
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch initialises CUDA
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megaseek.model.config import ModelConfig  # noqa: E402
from megaseek.model.decoder import Decoder  # noqa: E402
from megaseek.model.flops import flops_per_token, gpu_peak_tflops, measure_matmul_peak, param_counts  # noqa: E402

# ~1.1B parameters: Llama-style, 2048 wide, 18 layers, 16 heads (GQA 8 kv heads), SwiGLU 5632, vocab 32000
ONE_B = dict(name="1b", vocab_size=32000, hidden_size=2048, num_layers=18, num_heads=16, num_kv_heads=8,
             intermediate_size=5632, max_seq_len=2048, tie_embeddings=False)
TINY = dict(name="tiny-dry-run", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=128, max_seq_len=64, tie_embeddings=False)


def train_step_fn(model, opt, ids, labels, dtype):
    """forward (autocast), token cross-entropy in fp32, backward, fused AdamW step."""
    vocab = int(model.cfg.vocab_size)

    def step():
        with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(ids)                                          # (b, s, V_pad)
            loss = F.cross_entropy(logits.float().flatten(0, 1)[:, :vocab], labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(args) -> dict:
    dev = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda:0")
    if dev.type == "cpu" and not args.dry_run:
        raise SystemExit("bench/gpu_mfu.py needs a CUDA GPU (use --dry-run on CPU)")
    cfg = ModelConfig(**(TINY if args.dry_run else ONE_B))
    seq = min(args.seq or cfg.max_seq_len, cfg.max_seq_len)
    batch = args.batch or (2 if args.dry_run else 8)
    steps, warmup = (3, 1) if args.dry_run else (args.steps, args.warmup)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = Decoder(cfg, seed=0).to(dev)  # fp32 master weights; the matmuls run in bf16 under autocast
    build_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(dev)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # (b, s) each
    step = train_step_fn(model, opt, inputs, labels, dtype)
    losses, times = [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(warmup + steps):
        sync(dev)
        t = time.perf_counter()
        loss = step()
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    step_s = statistics.median(times)
    tokens_per_s = batch * seq / step_s
    fl = flops_per_token(cfg, seq)["model"]
    achieved = tokens_per_s * fl
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    sheet = gpu_peak_tflops(name, args.precision) if dev.type == "cuda" else None
    matmul_dtype = dtype if dev.type == "cuda" else torch.float32
    measured = measure_matmul_peak(matmul_dtype, n=4096 if dev.type == "cuda" else 256, seconds=0.5)
    out = {"device": name, "model": cfg.name, "params": param_counts(cfg)["total"], "precision": args.precision,
           "batch": batch, "seq_len": seq, "steps": steps, "build_s": round(build_s, 2),
           "step_time_s": step_s, "tokens_per_s": tokens_per_s, "model_tflops_per_s": achieved / 1e12,
           "flops_per_token": fl, "peak_tflops_datasheet": sheet,
           "mfu_datasheet": achieved / (sheet * 1e12) if sheet else None,
           "matmul_tflops_measured": measured / 1e12, "mfu_vs_measured_matmul": achieved / measured,
           "loss_first": losses[0], "loss_last": losses[-1], "fused_adamw": True,
           "attention": "scaled_dot_product_attention"}
    if dev.type == "cuda":
        st = torch.cuda.memory_stats(dev)
        out.update(alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                   peak_allocated_gb=st["allocated_bytes.all.peak"] / 1e9,
                   peak_reserved_gb=st["reserved_bytes.all.peak"] / 1e9,
                   fragmentation_gb=(torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)) / 1e9)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="a tiny model on CPU, 3 steps (CI)")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--seq", type=int, default=0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = p.parse_args(argv)
    out = run(args)
    print(json.dumps(out))
    mfu = out["mfu_datasheet"]
    print(f"[gpu_mfu] {out['device']}: {out['params'] / 1e9:.2f}B params, {out['tokens_per_s']:,.0f} tokens/s, "
          f"{out['model_tflops_per_s']:.1f} TFLOP/s, MFU {mfu * 100:.1f}% of the datasheet {out['precision']} peak"
          if mfu is not None else
          f"[gpu_mfu] {out['device']}: {out['tokens_per_s']:,.0f} tokens/s, {out['mfu_vs_measured_matmul'] * 100:.1f}% "
          f"of a measured matmul ({out['matmul_tflops_measured'] * 1e3:.1f} GFLOP/s); no datasheet peak", flush=True)
    return out


if __name__ == "__main__":
    main()
