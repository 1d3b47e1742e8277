"""Bytes moved by tensor-parallel collectives in one training step (forward + backward), against the
theoretical volume of Megatron-style tensor parallelism for the same sizes, with and without sequence
parallelism. Target ratio: 1.00 (no byte moved that the theory does not need).

Volumes are per-rank ring bus bytes: an all-reduce of N bytes moves 2 (p-1)/p N, an all-gather or a
reduce-scatter whose full tensor is N bytes moves (p-1)/p N. With A = b s h x 4 bytes (fp32), L layers:

  without SP: 4 all-reduces of A per layer (attention and MLP outputs forward; their inputs' dX backward)
              + 1 (embedding, forward) + 1 (LM-head input dX, backward)
              + the vocab-parallel cross-entropy: all-reduce of the max (b s) and of (target logit, sum exp) (2 b s)
  with SP:    8 all-gathers / reduce-scatters of A per layer (each all-reduce becomes RS + AG)
              + 2 for the embedding (RS forward, AG backward) + 2 for the LM-head input (AG forward, RS backward)
              + the same cross-entropy terms + all-reduce of the sequence-parallel norm weight grads (2L + 1) x h x 4

    python bench/tp_comm.py [--tp 2] [--batch 4] [--seq 64]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megaseek.distributed.spawn import init_gloo, run_world  # noqa: E402
from megaseek.model.config import ModelConfig  # noqa: E402

CFG = dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=512,
           max_seq_len=256)


def _measure(rank, world, sp, b, s):
    from megaseek.distributed.groups import ParallelGroups
    from megaseek.tensor_parallel.mappings import count_comm
    from megaseek.distributed.topology import Topology
    from megaseek.tensor_parallel.layers import TPContext
    from megaseek.model.decoder import Decoder
    init_gloo(rank, world)
    g = ParallelGroups.build(Topology(tp=world))
    cfg = ModelConfig(**CFG)
    m = Decoder(cfg, TPContext.from_axis(g.tp, sp), seed=1)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    with count_comm() as c:
        m.loss(m(ids), ids).backward()
    return dict(c.ops)


def bus_bytes(ops: dict, p: int) -> float:
    f = {"all_reduce": 2 * (p - 1) / p, "all_gather": (p - 1) / p, "reduce_scatter": (p - 1) / p}
    return sum(f[k] * v[1] for k, v in ops.items())


def theory(p: int, b: int, s: int, sp: bool) -> float:
    cfg = ModelConfig(**CFG)
    L, h = cfg.num_layers, cfg.hidden_size
    A = b * s * h * 4
    ar, ag = 2 * (p - 1) / p, (p - 1) / p
    ce = ar * (b * s * 4 + 2 * b * s * 4)
    if not sp:
        return ar * A * (4 * L + 2) + ce
    return ag * A * (8 * L + 4) + ce + ar * (2 * L + 1) * h * 4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    a = ap.parse_args()
    print(f"model {CFG}, tp={a.tp}, batch {a.batch} x seq {a.seq}, fp32; per-rank bus bytes of one forward+backward")
    for sp in (False, True):
        ops = run_world(a.tp, _measure, sp, a.batch, a.seq)[0]
        got, want = bus_bytes(ops, a.tp), theory(a.tp, a.batch, a.seq, sp)
        calls = ", ".join(f"{k} x{v[0]}" for k, v in sorted(ops.items()))
        print(f"sequence_parallel={str(sp):5}: measured {got / 1e6:8.3f} MB   theory {want / 1e6:8.3f} MB   "
              f"ratio {got / want:.4f}   ({calls})")


if __name__ == "__main__":
    main()
