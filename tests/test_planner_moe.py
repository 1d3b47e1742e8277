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


def test_partition_by_parameters_and_by_active_cost():
    """`parameters` weighs each layer by its own count (dense first layers differ from MoE ones); `cost` by its
    active training FLOPs, so many-expert layers that compute little do not push layers off their stage."""
    from megaseek.pipeline.partition import layer_weights, partition
    # layers 0-1 dense (i 512), layers 2-5 MoE: 32 experts of i 32, top-1, no shared expert
    m = ModelConfig.from_dict(dict(MOE, num_layers=6, first_k_dense_replace=2, intermediate_size=512,
                                   n_routed_experts=32, num_experts_per_tok=1, n_shared_experts=0,
                                   max_seq_len=64, vocab_size=100))
    h = 64
    attn = 2 * h * h + 2 * h * 32        # q, o (4 heads x 16) + k, v (2 kv heads x 16)
    dense, moe = attn + 3 * h * 512, attn + 32 * h + 32 * 3 * h * 32
    w, first, last = layer_weights(m, "parameters")
    assert w == [dense + 2 * h] * 2 + [moe + 2 * h] * 4 and (first, last) == (100 * h, 100 * h + h)
    score = 3 * 4 * 64 * 4 * 16          # 3 x QK^T and AV FLOPs per token at s = max_seq_len
    c, cfirst, clast = layer_weights(m, "cost")
    active_moe = attn + 32 * h + 3 * h * 32
    assert c == [6 * dense + score] * 2 + [6 * active_moe + score] * 4 and (cfirst, clast) == (0, 6 * 100 * h)
    # by parameters the expert layers are heavy (210,944 + 128 vs 110,592 + 128): the dense pair and one MoE layer
    # (438,912 with the embedding) against three MoE layers and the head (639,680); (0, 4) would give 649,984
    assert partition(m, 2, "parameters") == [(0, 3), (3, 6)]
    # by cost the dense layers are heavy (712,704 FLOPs per token vs 172,032): they go alone (1,425,408 vs 726,528)
    assert partition(m, 2, "cost") == [(0, 2), (2, 6)]
    # MTP counts on the last stage: its block (an MoE block: layer 6 >= first_k_dense_replace), W_k and the
    # embedding copy (parameters); the block's active FLOPs, W_k and one more head (cost)
    mtp = ModelConfig.from_dict(dict(MOE, num_layers=6, first_k_dense_replace=2, intermediate_size=512,
                                     n_routed_experts=32, num_experts_per_tok=1, n_shared_experts=0,
                                     max_seq_len=64, vocab_size=100, mtp_depth=1))
    assert layer_weights(mtp, "parameters")[2] == last + moe + 2 * h + 2 * h * h + 3 * h + 100 * h
    assert layer_weights(mtp, "cost")[2] == clast + 6 * (active_moe + 2 * h * h) + score + 6 * 100 * h
    tied = ModelConfig.from_dict(dict(mtp.to_dict(), tie_embeddings=True))  # MTP reads the head's tied copy
    assert layer_weights(tied, "parameters")[2] == last + moe + 2 * h + 2 * h * h + 3 * h
    with pytest.raises(ValueError, match="parallel.partition='flops'"):
        partition(m, 2, "flops")


@pytest.mark.parametrize("pp", [1, 2])
def test_planner_counts_mtp_like_the_built_last_stage(pp):
    """The last stage's parameters with model.mtp_depth=2 (MoE MTP blocks) equal the real Decoder's stage (at pp=2
    it keeps an embedding copy for the MTP inputs), experts included, and each depth's kept activations are in
    the estimate."""
    from megaseek.model.decoder import Decoder
    from megaseek.planner.memory import activation_bytes, layer_activation_bytes
    m = ModelConfig.from_dict(dict(MOE, num_layers=3, mtp_depth=2))
    stages = stage_params(m, 1, pp)
    lo, hi = partition_of(m, pp)[-1]
    model = Decoder(m, seed=0, first_layer=lo, last_layer=hi, pre=pp == 1, post=True)
    assert stages[-1].params == sum(p.numel() for p in model.parameters())
    assert stages[-1].experts == sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) > 0
    assert stages[-1].mtp_moe == 2
    st = Setup(model=m, pp=pp, micro_batch=2, global_batch=2, seq_len=16)
    base = activation_bytes(st.with_(model=ModelConfig.from_dict(dict(MOE, num_layers=3))), stages[-1])
    got = activation_bytes(st, stages[-1])
    T, a = 32, 4
    # an MoE model's MTP block is MoE (layer 3 >= first_k_dense_replace = 1)
    per_depth = layer_activation_bytes(m, 2, 16, 1, False, a, moe=True)["none"] + 4 * a * T * 64 + (4 * 1000 + 14) * T
    assert got["layers_total"] - base["layers_total"] == 2 * per_depth


def partition_of(m, pp):
    from megaseek.planner.memory import stage_ranges
    return stage_ranges(m, pp)


def test_search_tries_expert_degrees():
    """The layout search goes over ep for MoE models (ZeRO 1-2 when ep > 1). One MoE layer, one GPU per node
    (tp = pp = 1, dp = 8): with memory for the experts only when they are sharded, every layout that fits has
    ep > 1; with room to spare every ep is there."""
    from megaseek.planner.plan import candidates, search
    m = ModelConfig.from_dict(dict(MOE, num_layers=1, first_k_dense_replace=0, n_routed_experts=64,
                                   moe_intermediate_size=256, hidden_size=256, num_heads=8, num_kv_heads=4))
    base = Setup(model=m, global_batch=16, seq_len=64)
    assert {c.ep for c in candidates(base, 8, 1)} == {1, 2, 4, 8}
    assert all(c.zero_stage in (1, 2) for c in candidates(base, 8, 1) if c.ep > 1)
    assert {c.ep for c in candidates(base.with_(model=ModelConfig.from_dict(dict(MOE, mlp="swiglu"))), 8, 1)} == {1}
    big = Hardware(name="gpu", gpus_per_node=1, memory_gb=1000)
    one = make_plan(base.with_(dp=8, ep=1, zero_stage=2), big).memory.peak
    eight = make_plan(base.with_(dp=8, ep=8, zero_stage=2), big).memory.peak
    assert eight < one - 30e6, (eight, one)  # 64 experts x 3 x 256 x 256 fp32 weights, gradients, moments
    tight = Hardware(name="gpu", gpus_per_node=1, memory_gb=(one + eight) / 2 / 1e9)
    plans = search(base, tight, 8, top=1000)
    assert {p.setup.ep for p in plans} == {2, 4, 8}  # (ZeRO-3 at ep=1 does not fit either: its gather buffers)
    assert {p.setup.ep for p in search(base, big, 8, top=1000)} == {1, 2, 4, 8}


def test_bad_partition_method_refused_before_any_work():
    from megaseek.config.schema import ConfigError, validate
    from tests.helpers import compose
    with pytest.raises(ConfigError, match="parallel.partition='flops': choose one of parameters, cost, uniform"):
        validate(compose(["parallel.partition=flops", "parallel.pp=2"]), 2, has_cuda=False)
    assert validate(compose(["parallel.partition=cost", "parallel.pp=2"]), 2, has_cuda=False).pp == 2
