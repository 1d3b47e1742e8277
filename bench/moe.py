"""MoE training step: our MLA + DeepSeekMoE decoder against transformers' DeepseekV3ForCausalLM with the same
sizes and weights, in this run; and at ep=2 (2 gloo ranks) the bytes of the dispatch/combine all-to-all per step
against the theoretical volume.

Part 1 (one process): both models built from one config (`conf/model/moe_tiny.yaml` by default, vocabulary
unpadded so the parameter counts are equal), HF's weights loaded from ours (DeepseekV3Adapter.to_hf_state, the
same routing: the first losses are checked equal), each step = forward, token cross-entropy, backward, AdamW
(fused) step, fp32. The two alternate step by step (ABAB...) so machine noise hits both alike; the median step
time of each gives tokens/s and the ratio ours / HF (target >= 1.0).

The MoE block alone (the first MoE layer of both models, same weights): forward + backward of a (batch, seq, h)
input, ABAB, median: the routed experts' share of the step (ours: grouped weights, one autograd Function over
the rows grouped by expert, megaseek/model/moe/experts.py; transformers: its experts implementation).

Part 2 (2 ranks, parallel.ep=2): the same model built by build_stage with E/2 routed experts per rank; one
forward + backward per step, the collectives counted by megaseek/monitor/comm.py (CommTimer.take_bytes: the
bytes of every tensor handed to a collective, input and output buffers). Per MoE layer and step the model runs
4 row all-to-alls (dispatch and combine forward, their gradients backward) and 1 count exchange (E int64 in,
E out). With T tokens per rank, top-k, hidden h, 4 bytes and the rows this rank sends n_send = T k and receives
n_recv (from the routed counts):
    counter bytes  = layers * (4 (n_send + n_recv) h 4 + 2 E 8)                 (exact, checked)
    moved bytes    = rows that leave their rank (expert on the other rank) * h * 4 per all-to-all
    theory uniform = T k h 4 * 2 (dispatch + combine) * (ep-1)/ep per layer forward, x2 with backward.

    nice -n 10 python bench/moe.py [--model moe_tiny] [--batch 8] [--seq 128] [--steps 8] [--ep-steps 3] [--threads 1]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_cfg(name: str):
    from megaseek.model.config import ModelConfig
    with open(os.path.join(ROOT, "conf", "model", f"{name}.yaml")) as f:
        d = {k: v for k, v in yaml.safe_load(f).items() if k != "defaults"}
    return ModelConfig.from_dict(dict(d, pad_vocab_multiple=1))


def make_models(cfg):
    """Ours (Decoder) and HF's DeepseekV3ForCausalLM holding the same weights."""
    from transformers import DeepseekV3ForCausalLM

    from megaseek.model.adapter import adapter_for
    from megaseek.model.decoder import Decoder
    ours = Decoder(cfg, seed=0)
    ad = adapter_for(cfg)
    import json
    import tempfile

    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as d:  # from_pretrained converts the per-expert keys to its layout
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(ad.hf_config(None, None), f)
        save_file({k: v.contiguous() for k, v in ad.to_hf_state(ours.state_dict()).items()},
                  os.path.join(d, "model.safetensors"))
        hf, info = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True,
                                                         attn_implementation="sdpa")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.train()
    n_o, n_h = (sum(p.numel() for p in m.parameters()) for m in (ours, hf))
    assert n_o == n_h, (n_o, n_h)
    return ours, hf, n_o


def bench_step(cfg, batch: int, seq: int, steps: int) -> dict:
    ours, hf, n = make_models(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_h = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)

    def step_ours():
        loss = ours.token_losses(ours(x), y).mean()
        loss.backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)
        return float(loss.detach())

    def step_hf():
        logits = hf(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        opt_h.step()
        opt_h.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = step_ours(), step_hf()  # warm-up; same weights and routing -> the same loss
    assert abs(first[0] - first[1]) < 1e-3 * max(1.0, abs(first[0])), first
    t_o, t_h = [], []
    for _ in range(steps):
        for fn, acc in ((step_ours, t_o), (step_hf, t_h)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    tok = batch * seq
    so, sh = statistics.median(t_o), statistics.median(t_h)
    return {"params": n, "first_loss": first, "ours_tok_s": tok / so, "hf_tok_s": tok / sh, "ratio": sh / so,
            "ours_ms": 1e3 * so, "hf_ms": 1e3 * sh, "block": bench_block(cfg, ours, hf, batch, seq, steps)}


def bench_block(cfg, ours, hf, batch: int, seq: int, steps: int) -> dict:
    """The first MoE layer of each model alone: forward + backward on the same input, ABAB, median ms."""
    L = cfg.first_k_dense_replace
    mo, mh = ours.layers[L].mlp, hf.model.layers[L].mlp
    x = torch.randn(batch, seq, cfg.hidden_size, generator=torch.Generator().manual_seed(1))

    def run(m):
        xx = x.clone().requires_grad_()
        y = m(xx)
        y.backward(torch.ones_like(y))
        m.zero_grad(set_to_none=True)
        return y.detach()

    ya, yb = run(mo), run(mh)
    assert (ya - yb).abs().max().item() < 1e-4, "the MoE blocks differ"
    t = {"ours": [], "hf": []}
    for _ in range(2 * steps):
        for k, m in (("ours", mo), ("hf", mh)):
            t0 = time.perf_counter()
            run(m)
            t[k].append(time.perf_counter() - t0)
    so, sh = statistics.median(t["ours"]), statistics.median(t["hf"])
    return {"ours_ms": 1e3 * so, "hf_ms": 1e3 * sh, "ratio": sh / so}


def _ep_rank(rank: int, world: int, name: str, batch: int, seq: int, steps: int) -> dict:
    import torch.distributed as dist

    from megaseek.distributed.env import init_distributed
    from megaseek.distributed.groups import ParallelGroups
    from megaseek.distributed.topology import Topology
    from megaseek.engine.stage import build_stage
    from megaseek.model.moe.balance import moe_layers
    from megaseek.monitor.comm import CommTimer
    init_distributed(timeout_s=120)
    cfg = load_cfg(name)
    groups = ParallelGroups.build(Topology(tp=1, pp=1, dp=world, ep=world))
    stage = build_stage(cfg, groups, seed=7, sequence_parallel=False, checkpointing="none",
                        partition_method="parameters")
    model, layers = stage.model, moe_layers(stage.model)
    E, k, h, ep = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, world
    n_local = E // ep
    timer = CommTimer().install()
    rows = []
    for s in range(steps):
        g = torch.Generator().manual_seed(1000 * s + rank)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
        for m in layers:
            m.expert_stats.reset()
        timer.take_bytes()
        model.token_losses(model(ids[:, :-1]), ids[:, 1:]).mean().backward()
        counted = timer.take_bytes()
        model.zero_grad(set_to_none=True)
        local = torch.stack([m.expert_stats.vector()[:E] for m in layers])  # (layers, E) my assignments
        every = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(every, local)
        every = torch.stack(every)  # (ep, layers, E): rows source rank -> expert
        per_rank = every.view(ep, len(layers), ep, n_local).sum(-1)  # (src, layers, dst)
        n_send = float(per_rank[rank].sum())
        n_recv = float(per_rank[:, :, rank].sum())
        predicted = 4 * (n_send + n_recv) * h * 4 + len(layers) * 2 * E * 8
        off = float(sum(per_rank[r, :, d].sum() for r in range(ep) for d in range(ep) if r != d))
        T = batch * seq
        rows.append({"counted": counted, "predicted": predicted,
                     "moved_step": 4 * off * h * 4,  # world total: 2 all-to-alls forward + 2 backward per layer
                     "theory_step": world * len(layers) * T * k * h * 4 * 2 * (ep - 1) / ep * 2,
                     "moved_fwd": 2 * off * h * 4,
                     "theory_fwd": world * len(layers) * T * k * h * 4 * 2 * (ep - 1) / ep})
    timer.uninstall()
    return {"rows": rows, "layers": len(layers)}


def bench_ep(name: str, batch: int, seq: int, steps: int) -> dict:
    from megaseek.distributed.spawn import run_world
    res = run_world(2, _ep_rank, name, batch, seq, steps, timeout=900)
    out = {}
    for rank, r in enumerate(res):
        rows = r["rows"]
        out[rank] = {key: statistics.mean(x[key] for x in rows) for key in rows[0]}
        out[rank]["counter_exact"] = all(x["counted"] == x["predicted"] for x in rows)
    out["layers"] = res[0]["layers"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="moe_tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ep-steps", type=int, default=3, help="steps of the ep=2 all-to-all part (0: skip it)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of both sides (1: on a shared machine two OpenMP threads wait on each other)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_cfg(a.model)
    r = bench_step(cfg, a.batch, a.seq, a.steps)
    print(f"[moe step] {a.model} ({r['params']:,} params) batch {a.batch} x seq {a.seq}, {torch.get_num_threads()} "
          f"threads, first loss ours {r['first_loss'][0]:.5f} HF {r['first_loss'][1]:.5f}")
    print(f"  ours {r['ours_tok_s']:.0f} tok/s ({r['ours_ms']:.0f} ms)  HF DeepseekV3ForCausalLM "
          f"{r['hf_tok_s']:.0f} tok/s ({r['hf_ms']:.0f} ms)  ratio ours/HF {r['ratio']:.2f} (target >= 1.0)")
    b = r["block"]
    print(f"  MoE block alone (forward + backward): ours {b['ours_ms']:.1f} ms  HF DeepseekV3MoE {b['hf_ms']:.1f} ms  "
          f"ratio ours/HF {b['ratio']:.2f}")
    if a.ep_steps <= 0:
        return
    e = bench_ep(a.model, a.batch, a.seq, a.ep_steps)
    print(f"[ep=2 all-to-all] {e['layers']} MoE layers, {a.batch * a.seq} tokens per rank per step, top-"
          f"{cfg.num_experts_per_tok}, hidden {cfg.hidden_size}, fp32")
    for rank in (0, 1):
        x = e[rank]
        print(f"  rank {rank}: counter {x['counted'] / 1e6:.3f} MB/step = predicted from routed counts "
              f"{x['predicted'] / 1e6:.3f} MB (exact: {x['counter_exact']})")
    x = e[0]
    print(f"  moved across ranks (world, per step): forward {x['moved_fwd'] / 1e6:.3f} MB vs uniform theory "
          f"{x['theory_fwd'] / 1e6:.3f} MB ({x['moved_fwd'] / x['theory_fwd']:.3f}); forward+backward "
          f"{x['moved_step'] / 1e6:.3f} MB vs {x['theory_step'] / 1e6:.3f} MB ({x['moved_step'] / x['theory_step']:.3f})")


if __name__ == "__main__":
    main()
