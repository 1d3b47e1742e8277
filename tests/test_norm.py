"""Gradient-norm ownership at tp=2 and tp=4 with one kv head (kv projections and norms replicated across tensor
ranks): the global norm computed by the step (megaseek/engine/step.py, DeepSpeed's rule) equals the one-process
norm; counting replicated parameters on every tensor rank moves it measurably."""
import torch

from megaseek.model.config import ModelConfig
from megaseek.model.decoder import Decoder
from tests.helpers import init_gloo, run_world

CFG = dict(vocab_size=1001, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1, intermediate_size=96,
           max_seq_len=32, init_std=0.1)


def _norms(rank, world):
    from megaseek.distributed.groups import ParallelGroups
    from megaseek.distributed.topology import Topology
    from megaseek.engine.step import global_grad_norm
    from megaseek.tensor_parallel.layers import TPContext, mark_norm_ownership
    init_gloo(rank, world)
    ids = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(2))
    out = {}
    for tp in (2, 4):
        g = ParallelGroups.build(Topology(tp=tp, dp=world // tp))
        m = Decoder(ModelConfig(**CFG), TPContext.from_axis(g.tp), seed=3)
        m.loss(m(ids), labels).backward()
        mark_norm_ownership(m, g.tp.rank)
        right = global_grad_norm(m, g)
        mark_norm_ownership(m, 0)  # the broken variant: every tensor rank owns the replicated parameters
        out[tp] = (right, global_grad_norm(m, g))
    return out


def test_grad_norm_counts_replicated_parameters_once_at_tp2_and_tp4():
    ref = Decoder(ModelConfig(**CFG), seed=3)
    ids = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(2))
    ref.loss(ref(ids), labels).backward()
    want = float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in ref.parameters())))
    for r in run_world(4, _norms, timeout=300):
        for tp, (got, broken) in r.items():
            assert abs(got - want) / want < 1e-5, (tp, got, want)
            assert abs(broken - want) / want > 1e-3, (tp, broken, want)  # teeth
