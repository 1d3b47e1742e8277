"""Grouped routed experts (megaseek/model/moe/experts.py): the grouped tensors hold exactly the per-expert
Column/RowParallel weights of every (ep, tp) slice; the grouped forward/backward equals expert-by-expert
SwiGLU (empty experts included: zero weight gradients); state_dict() speaks per-expert names and loads them
back; the tensor-parallel gather/scatter of the parts are inverse and layout-free. One process, no world."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from megaseek.model.moe.experts import PARTS, LocalExperts, expert_seed, gather_tp_parts, grouped_swiglu, \
    shard_tp_parts
from megaseek.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, TPContext
from tests.test_moe import moe_cfg

SEED, OUT_STD = 41, 0.05


def experts(ep=1, ep_rank=0, tp=1, tp_rank=0, seed=SEED) -> LocalExperts:
    return LocalExperts(moe_cfg(), TPContext(size=tp, rank=tp_rank), seed, OUT_STD, ep, ep_rank)


@pytest.mark.parametrize("ep,ep_rank,tp,tp_rank", [(1, 0, 1, 0), (2, 1, 1, 0), (2, 0, 2, 1), (4, 3, 2, 0)])
def test_grouped_weights_are_the_per_expert_layers(ep, ep_rank, tp, tp_rank):
    cfg, ctx = moe_cfg(), TPContext(size=tp, rank=tp_rank)
    m = experts(ep, ep_rank, tp, tp_rank)
    n_local = cfg.n_routed_experts // ep
    assert (m.first, m.n_local) == (ep_rank * n_local, n_local)
    assert m.gate_up_proj.shape == (n_local, 2 * 32 // tp, 64) and m.down_proj.shape == (n_local, 64, 32 // tp)
    for e in range(m.first, m.first + n_local):
        s = expert_seed(SEED, e)  # the seeds the per-expert Expert modules used
        gate = ColumnParallelLinear(64, 32, ctx, std=cfg.init_std, seed=s).weight
        up = ColumnParallelLinear(64, 32, ctx, std=cfg.init_std, seed=s + 1).weight
        down = RowParallelLinear(32, 64, ctx, std=OUT_STD, seed=s + 2).weight
        for got, want in zip(m.expert_weights(e), (gate, up, down)):
            assert torch.equal(got, want), e
    with pytest.raises(KeyError):
        m.expert_weights(m.first + n_local)


def test_tp_parts_gather_and_shard_are_inverse_and_layout_free():
    full = experts()  # tp = 1
    for attr, spec in PARTS.items():
        p = getattr(full, attr)
        assert p.expert_parts == spec and p.expert_first == 0  # what megaseek/ckpt/state.py reads
        shards = [getattr(experts(tp=2, tp_rank=r), attr).detach() for r in range(2)]
        parts = gather_tp_parts(shards, spec)  # the tp = 1 parts, from the two shards
        assert all(torch.equal(a, b) for a, b in zip(parts, gather_tp_parts([p.detach()], spec)))
        for r in range(2):
            assert torch.equal(shard_tp_parts(parts, spec, 2, r), shards[r])
        assert torch.equal(shard_tp_parts(parts, spec, 1, 0), p.detach())


def _reference(m: LocalExperts, x: torch.Tensor, counts: list) -> torch.Tensor:
    """Expert by expert through autograd on views of the grouped weights."""
    outs, s = [], 0
    for j, n in enumerate(counts):
        outs.append(m.expert_partial(m.first + j, x[s:s + n]))
        s += n
    return torch.cat(outs)


@pytest.mark.parametrize("counts", [[5, 0, 3, 7, 0, 1, 2, 4], [0, 0, 0, 9, 0, 0, 0, 0], [0] * 8])
def test_grouped_forward_backward_equals_expert_by_expert(counts):
    m, ref = experts(), experts()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), 64, generator=g)
    dy = torch.randn(sum(counts), 64, generator=g)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = m(xa, counts), _reference(ref, xb, counts)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    for a, b in ((y, y_ref), (xa.grad, xb.grad), (m.gate_up_proj.grad, ref.gate_up_proj.grad),
                 (m.down_proj.grad, ref.down_proj.grad)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-6)
    for j, n in enumerate(counts):  # every expert has a gradient; an empty one exactly zero
        assert (m.gate_up_proj.grad[j].abs().sum().item() == 0) == (n == 0)
        assert (m.down_proj.grad[j].abs().sum().item() == 0) == (n == 0)
    with pytest.raises(ValueError, match="counts"):
        grouped_swiglu(x, m.gate_up_proj, m.down_proj, counts[:-1])


def test_grouped_swiglu_bf16_close_to_fp32():
    m = experts()
    counts = [3, 1, 0, 4, 2, 2, 0, 5]
    x = torch.randn(sum(counts), 64, generator=torch.Generator().manual_seed(2))
    y32 = m(x, counts)
    y16 = grouped_swiglu(x.bfloat16(), m.gate_up_proj.bfloat16(), m.down_proj.bfloat16(), counts)
    assert y16.dtype == torch.bfloat16 and (y16.float() - y32).abs().max().item() < 2e-2 * y32.abs().max().item()


def test_state_dict_is_per_expert_and_loads_back():
    m = experts(ep=2, ep_rank=1, tp=2, tp_rank=1)
    sd = m.state_dict()
    assert sorted(sd) == sorted(f"{e}.{k}_proj.weight" for e in range(4, 8) for k in ("gate", "up", "down"))
    for e in range(4, 8):
        for k, w in zip(("gate", "up", "down"), m.expert_weights(e)):
            assert torch.equal(sd[f"{e}.{k}_proj.weight"], w)
    other = experts(ep=2, ep_rank=1, tp=2, tp_rank=1, seed=SEED + 1)  # other weights, the same layout
    assert not torch.equal(other.gate_up_proj, m.gate_up_proj)
    other.load_state_dict({k: v.clone() for k, v in sd.items()})  # per-expert names (the old module layout)
    assert torch.equal(other.gate_up_proj, m.gate_up_proj) and torch.equal(other.down_proj, m.down_proj)
    with pytest.raises(RuntimeError, match="Missing"):  # an expert missing: no silent partial load
        other.load_state_dict({k: v for k, v in sd.items() if not k.startswith("5.")})
    copied = copy.deepcopy(m)  # deepcopy drops parameter attributes (quantization copies models): still per expert
    assert copied.state_dict().keys() == sd.keys()
