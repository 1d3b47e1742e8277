"""PowerSGD against the plain all-reduce, in the same run: two gloo ranks train the same decoder on the same
token windows (global batch split between the ranks), the data-parallel gradient reduced by a plain mean,
by PowerSGD rank r with error feedback, and without it. Prints the loss (mean of the last 20 steps) of each
relative to the plain run and the bytes per step relative to the plain all-reduce (collective counter).

    python bench/powersgd.py --data-root DIR [--steps 300] [--rank 4] [--warmup 10] [--hidden 64 ...]
                             [--optimizer adamw|sgd] [--lr LR]

DIR is a prepared data root (`python launch/prepare_data.py data.root=DIR`); its shards fix the vocab.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(rank, world, args, variant):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from megaseek.data.shards import TokenStream
    from megaseek.distributed.powersgd import PowerSGD
    from megaseek.distributed.spawn import init_gloo
    from megaseek.model.config import ModelConfig
    from megaseek.model.decoder import Decoder
    from megaseek.tensor_parallel.mappings import count_comm
    init_gloo(rank, world)
    torch.set_num_threads(1)
    paths = sorted(glob.glob(os.path.join(args.data_root, "tokenized", "*", "*", "part-*.bin")))
    stream = TokenStream(paths)
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                      num_kv_heads=2, intermediate_size=2 * args.hidden, max_seq_len=args.seq)
    model = Decoder(cfg, seed=0)
    if args.optimizer == "sgd":  # the paper's setting: momentum SGD on the (compressed) mean gradient
        opt = torch.optim.SGD(model.parameters(), lr=args.lr or 0.3, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr or 3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    warm = 10 ** 9 if variant == "plain" else args.warmup
    red = PowerSGD(rank=args.rank, warmup_steps=warm, error_feedback=(variant != "powersgd_no_ef"))
    n_windows = (len(stream) - 1) // (args.seq + 1)
    perm = np.random.default_rng(1234).permutation(n_windows)
    per_rank = args.batch // world
    losses, nbytes, t0 = [], [], time.perf_counter()
    for step in range(args.steps):
        ids = perm[(step * args.batch + rank * per_rank + np.arange(per_rank)) % n_windows]
        w = np.stack([stream[int(i) * (args.seq + 1):(int(i) + 1) * (args.seq + 1)] for i in ids]).astype(np.int64)
        x, y = torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:])          # (b/w, s) each
        logits = model(x)                                                       # (b/w, s, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1)[:, :cfg.vocab_size], y.reshape(-1))
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        with count_comm() as c:
            red.reduce(grads)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = loss.detach().clone()
        torch.distributed.all_reduce(t)
        losses.append(float(t) / world)
        nbytes.append(c.total_bytes)
    return {"losses": losses, "bytes": nbytes, "time_s": time.perf_counter() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=float, default=None, help="default 3e-3 (adamw), 0.3 (sgd)")
    args = p.parse_args(argv)
    shards = sorted(glob.glob(os.path.join(args.data_root, "tokenized", "*", "*", "part-*.json")))
    if not shards:
        raise SystemExit(f"--data-root {args.data_root}: no tokenized shards (run launch/prepare_data.py first)")
    args.vocab = int(json.load(open(shards[0]))["vocab_size"])
    from megaseek.distributed.spawn import run_world
    res = {v: run_world(2, _train, args, v, timeout=3600)[0] for v in ("plain", "powersgd", "powersgd_no_ef")}
    tail = {v: sum(r["losses"][-20:]) / len(r["losses"][-20:]) for v, r in res.items()}
    plain_bytes = res["plain"]["bytes"][-1]
    for v, r in res.items():
        print(json.dumps({"variant": v, "optimizer": args.optimizer, "rank": args.rank, "steps": args.steps, "first_loss": r["losses"][0],
                          "loss_last20": tail[v], "loss_vs_plain": tail[v] / tail["plain"],
                          "bytes_per_step": r["bytes"][-1], "bytes_vs_plain": r["bytes"][-1] / plain_bytes,
                          "time_s": round(r["time_s"], 1)}))


if __name__ == "__main__":
    main()
