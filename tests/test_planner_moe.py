"""The planner knows MoE (issue 12): parameters per rank with the routed experts sharded over parallel.ep,
ZeRO partitioning the experts over the expert-data-parallel group (dp / ep), the expert all-to-all volume
per layout, and the ep layout refusals; numbers by hand for one small config, counts against the real model."""
from __future__ import annotations

import pytest

from megaseek.model.config import ModelConfig
from megaseek.planner import Hardware, Setup, make_plan
from megaseek.planner.memory import stage_params

# h 64, GQA 4 heads / 2 kv of 16, dense layer 0 (i 128), MoE layer 1: 8 routed experts (i_moe 32), top-2, 1 shared
MOE = dict(vocab_size=1000, pad_vocab_multiple=1, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
           intermediate_size=128, max_seq_len=64, mlp="moe", first_k_dense_replace=1, n_routed_experts=8,
           num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, n_group=1, topk_group=1)


def test_moe_memory_and_all_to_all_by_hand():
    m = ModelConfig.from_dict(MOE)
    # attention 2*64*64 (q, o) + 2*64*32 (k, v) = 12288; norms 2*64
    # layer 0: 12288 + 3*64*128 + 128 = 36992
    # layer 1 at ep=2: 12288 + router 8*64 + shared 3*64*32 + 4 experts * 3*64*32 (24576) + 128 = 43648
    # embedding 64000 + head 64000 + final norm 64
    st = Setup(model=m, dp=4, ep=2, zero_stage=1, micro_batch=2, global_batch=16, seq_len=16)  # accumulation 2
    (sp,) = stage_params(m, 1, 1, "parameters", ep=2)
    assert (sp.params, sp.experts, sp.moe_layers) == (208704, 24576, 1)
    plan = make_plan(st, Hardware(name="gpu", gpus_per_node=8, memory_gb=1000))
    assert not plan.problems, plan.problems
    mem = plan.memory
    assert mem.params_on_rank == 208704
    assert mem.parameters == 4 * 208704 and mem.gradients == 4 * 208704
    # ZeRO-1: 12 bytes per element of the partition: (208704 - 24576) / 4 dense + 24576 / (4/2) experts
    assert mem.optimizer == 12 * 184128 / 4 + 12 * 24576 / 2 == 699840
    c = plan.comm
    # 4 all-to-alls (dispatch, combine, both backward) x 1 MoE layer x (2*16 tokens x top-2) rows x 64 x 4 B
    # x 2 micro-batches
    assert c.ep_bytes == 4 * 1 * 64 * 64 * 4 * 2 == 131072
    # ZeRO-1 dp volume 2 Psi: dense over dp=4, experts over dp/ep=2
    assert c.dp_bytes == 2 * 4 * 184128 + 2 * 4 * 24576
    full = make_plan(st.with_(checkpointing="full"), Hardware(name="gpu", gpus_per_node=8, memory_gb=1000)).comm
    assert full.ep_bytes == 6 * 64 * 64 * 4 * 2  # the recomputed forward dispatches and combines again
    # ep=1: every expert on the rank (8 * 6144), no all-to-all, ZeRO over dp=4 for all of it
    one = make_plan(st.with_(ep=1), Hardware(name="gpu", gpus_per_node=8, memory_gb=1000))
    assert one.memory.params_on_rank == 208704 + 24576 and one.comm.ep_bytes == 0
    assert one.memory.optimizer == 12 * (208704 + 24576) / 4
    from megaseek.planner.report import describe
    assert "expert all-to-all 131.07kB (ep=2)" in describe(plan)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_planner_counts_equal_the_built_model(attention):
    """At ep=1, tp=1 the planner's parameters per rank equal the real Decoder's (MoE, GQA and MLA)."""
    from megaseek.model.decoder import Decoder
    kw = dict(MOE, attention=attention, num_kv_heads=4 if attention == "mla" else 2)
    if attention == "mla":
        kw.update(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, q_lora_rank=24)
    m = ModelConfig.from_dict(kw)
    model = Decoder(m, seed=0)
    (sp,) = stage_params(m, 1, 1)
    assert sp.params == sum(p.numel() for p in model.parameters())
    assert sp.experts == sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)


def test_ep_layout_refusals():
    hw = Hardware(name="gpu", gpus_per_node=8, memory_gb=1000)
    m = ModelConfig.from_dict(MOE)
    probs = make_plan(Setup(model=m, dp=6, ep=3, zero_stage=0, global_batch=12), hw).problems
    assert any("n_routed_experts=8" in p for p in probs)
    assert any("zero.stage 1 or 2" in p for p in probs)
    assert any("does not divide the data-parallel size" in p for p in make_plan(
        Setup(model=m, dp=6, ep=4, zero_stage=1, global_batch=12), hw).problems)
    dense = ModelConfig.from_dict(dict(MOE, mlp="swiglu"))
    assert any("needs an MoE model" in p for p in make_plan(
        Setup(model=dense, dp=2, ep=2, zero_stage=1, global_batch=2), hw).problems)
