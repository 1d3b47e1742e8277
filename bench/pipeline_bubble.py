"""Pipeline bubble: the measured idle fraction of each stage of our 1F1B schedule (on the DeepSpeed engine)
against the theory (p - 1) / (m + p - 1), for p stages and m micro-batches.

Idle fraction of a stage = 1 - (time in its forward and backward compute) / (wall time of the schedule),
the median over several optimizer steps. Layers are uniform across stages and the vocabulary is small,
so stages are balanced, as the theory assumes. One thread per stage: on a 2-core machine p = 4 is
oversubscribed (two stages share a core), which inflates compute times and is reported as such.

    python bench/pipeline_bubble.py [--pp 2 4] [--micro 2 4 8 16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaseek.distributed.spawn import run_world  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage(rank, world, m, steps, hidden, seq, mb):
    import torch
    from hydra import compose, initialize_config_dir

    from megaseek.config.schema import validate
    from megaseek.distributed.env import init_distributed
    from megaseek.distributed.groups import ParallelGroups
    from megaseek.distributed.topology import Topology
    from megaseek.engine.build import build_engine
    from megaseek.model.config import ModelConfig
    from megaseek.model.decoder import Decoder
    from megaseek.pipeline.p2p import StageComm
    from megaseek.pipeline.partition import uniform
    from megaseek.pipeline.schedule import run_1f1b

    layers = 2 * world
    over = [f"parallel.pp={world}", "zero.stage=0", f"train.micro_batch_size={mb}", f"train.global_batch_size={mb * m}",
            f"train.seq_len={seq}", "model.vocab_size=512", f"model.hidden_size={hidden}", f"model.num_layers={layers}",
            "model.num_heads=8", "model.num_kv_heads=8", f"model.intermediate_size={3 * hidden}",
            f"model.max_seq_len={seq}"]
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=over)
    lay = validate(cfg, world, has_cuda=False)
    init_distributed()
    g = ParallelGroups.build(Topology(tp=1, pp=world, dp=1))
    s = g.pp.rank
    lo, hi = uniform(layers, world)[s]
    mcfg = ModelConfig.from_dict(dict(cfg.model))
    model = Decoder(mcfg, seed=1, first_layer=lo, last_layer=hi, pre=s == 0, post=s == world - 1)
    engine, *_ = build_engine(model, cfg, lay, g)
    engine.enable_backward_allreduce = False
    comm = StageComm(g.pp.ranks, s, (mb, seq, hidden), torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 512, (mb, seq), generator=gen), torch.randint(0, 512, (mb, seq), generator=gen))
               for _ in range(m)]
    first, last = s == 0, s == world - 1

    def forward_step(i, x):
        y = engine(batches[i][0] if first else x)
        return model.loss(y, batches[i][1]) if last else y
    idle = []
    for i in range(steps + 1):
        t = run_1f1b(engine, comm, m, forward_step, engine.allreduce_gradients)
        if i:  # the first step warms up
            idle.append(1.0 - t.busy_s / t.total_s)
    return statistics.median(idle)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--micro", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mb", type=int, default=4, help="micro-batch size")
    a = ap.parse_args()
    cores = os.cpu_count()
    print(f"{cores} cores; one thread per stage; hidden {a.hidden}, seq {a.seq}, micro-batch {a.mb}, 2 layers per "
          f"stage; idle fraction per stage (median of {a.steps} steps)")
    print(f"{'p':>2} {'m':>3}  {'theory':>7}  {'mean':>7}  {'ratio':>6}  per stage")
    for p in a.pp:
        for m in a.micro:
            idle = run_world(p, _stage, m, a.steps, a.hidden, a.seq, a.mb)
            th = (p - 1) / (m + p - 1)
            mean = sum(idle) / len(idle)
            note = "  (oversubscribed)" if p > cores else ""
            print(f"{p:>2} {m:>3}  {th:7.3f}  {mean:7.3f}  {mean / th:6.2f}  "
                  + " ".join(f"{x:.3f}" for x in idle) + note, flush=True)


if __name__ == "__main__":
    main()
