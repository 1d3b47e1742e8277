"""DeepSeekMoE at ep = 1 (issue 12 part B): the layer equals transformers' DeepseekV3MoE / DeepseekV2Moe, with
sensitivity guards; balancing (aux-loss-free bias, sequence-wise and classic losses) against closed forms;
capacity drops; the model with dense first layers; config refusals."""
from __future__ import annotations

import pytest
import torch

from megaseek.model.config import ModelConfig
from megaseek.model.moe.layer import MoELayer
from megaseek.tensor_parallel.layers import TPContext

TOL = 1e-5


def moe_cfg(**kw) -> ModelConfig:
    base = dict(hidden_size=64, num_heads=4, num_kv_heads=4, mlp="moe", n_routed_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                init_std=0.1)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def random_bias(layer: MoELayer, seed: int = 0, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.gate.e_score_correction_bias.copy_(torch.randn(layer.cfg.n_routed_experts, generator=g) * scale)


def hf_v3(layer: MoELayer):
    """transformers' DeepseekV3MoE with the same sizes and our weights (per expert -> its fused gate_up)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    c = layer.cfg
    hc = DeepseekV3Config(hidden_size=c.hidden_size, intermediate_size=128, moe_intermediate_size=c.moe_intermediate_size,
                          n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok,
                          n_shared_experts=c.n_shared_experts, n_group=c.n_group, topk_group=c.topk_group,
                          routed_scaling_factor=c.routed_scaling_factor, norm_topk_prob=c.norm_topk_prob,
                          num_attention_heads=4, num_key_value_heads=4)
    hf = DeepseekV3MoE(hc)
    with torch.no_grad():
        hf.gate.weight.copy_(layer.gate.weight)
        hf.gate.e_score_correction_bias.copy_(layer.gate.e_score_correction_bias)
        for e in range(c.n_routed_experts):
            ex = layer.experts[str(e)]
            hf.experts.gate_up_proj[e].copy_(torch.cat([ex.gate_proj.weight, ex.up_proj.weight]))
            hf.experts.down_proj[e].copy_(ex.down_proj.weight)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, n).weight.copy_(getattr(layer.shared_experts, n).weight)
    return hf


def chosen(idx: torch.Tensor) -> torch.Tensor:
    return idx.reshape(-1, idx.shape[-1]).sort(-1).values


def test_moe_layer_equals_hf_deepseek_v3_and_guards():
    """Sigmoid scores, 4 groups / top-2 groups (group score = sum of the top-2 biased scores), top-2 of 8,
    norm_topk_prob, scaling 2.5, a random non-zero correction bias, init std 0.1: outputs within 1e-5 (fp32)
    and the same experts for every token. Guards: a zeroed bias and the V2 group score each move the output
    by > 10x the tolerance and change some choices."""
    torch.manual_seed(0)
    layer = MoELayer(moe_cfg(), TPContext(), seed=77, out_std=0.1)
    random_bias(layer)
    hf = hf_v3(layer)
    x = torch.randn(3, 16, 64)
    y, y_hf = layer(x), hf(x)
    assert (y - y_hf).abs().max().item() < TOL
    _, _, idx_hf = hf.gate(x)
    assert torch.equal(chosen(layer.last_routing), chosen(idx_hf))
    ours_idx = layer.last_routing.clone()

    bias = layer.gate.e_score_correction_bias.clone()
    with torch.no_grad():
        layer.gate.e_score_correction_bias.zero_()
    assert (layer(x) - y_hf).abs().max().item() > 10 * TOL
    assert not torch.equal(chosen(layer.last_routing), chosen(ours_idx))
    with torch.no_grad():
        layer.gate.e_score_correction_bias.copy_(bias)
    layer.cfg.group_score = "max"
    assert (layer(x) - y_hf).abs().max().item() > 10 * TOL
    assert not torch.equal(chosen(layer.last_routing), chosen(ours_idx))


def test_moe_layer_softmax_equals_hf_deepseek_v2():
    """Softmax scores with V2's group-limited greedy (group score = max), no renormalisation: = DeepseekV2Moe."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    cfg = moe_cfg(scoring_func="softmax", group_score="max", norm_topk_prob=False, routed_scaling_factor=1.5,
                  n_shared_experts=2)
    layer = MoELayer(cfg, TPContext(), seed=5, out_std=0.1)
    hc = DeepseekV2Config(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
                          num_experts_per_tok=2, n_shared_experts=2, n_group=4, topk_group=2,
                          topk_method="group_limited_greedy", routed_scaling_factor=1.5, num_attention_heads=4,
                          num_key_value_heads=4)
    hf = DeepseekV2Moe(hc)
    with torch.no_grad():
        hf.gate.weight.copy_(layer.gate.weight)
        for e in range(8):
            ex = layer.experts[str(e)]
            hf.experts.gate_up_proj[e].copy_(torch.cat([ex.gate_proj.weight, ex.up_proj.weight]))
            hf.experts.down_proj[e].copy_(ex.down_proj.weight)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, n).weight.copy_(getattr(layer.shared_experts, n).weight)
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    assert (layer(x) - hf(x)).abs().max().item() < TOL
    _, _, idx_hf = hf.gate(x)
    assert torch.equal(chosen(layer.last_routing), chosen(idx_hf))


def test_router_runs_in_fp32_under_bf16():
    """A bf16 layer routes in fp32: the bias stays fp32 after .to(bf16), and the choices equal those of the fp32
    router on the same (bf16-rounded) weights and inputs."""
    layer = MoELayer(moe_cfg(), TPContext(), seed=9, out_std=0.1)
    random_bias(layer, seed=4)
    x = torch.randn(2, 16, 64).bfloat16()
    ref = MoELayer(moe_cfg(), TPContext(), seed=9, out_std=0.1)
    random_bias(ref, seed=4)
    layer = layer.to(torch.bfloat16)
    assert layer.gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        ref.gate.weight.copy_(layer.gate.weight.float())
    r16 = layer.gate(x.reshape(-1, 64))
    r32 = ref.gate(x.float().reshape(-1, 64))
    assert r16.scores.dtype == torch.float32 and r16.weights.dtype == torch.float32
    assert torch.equal(chosen(r16.idx), chosen(r32.idx))
    assert (r16.weights.sort(-1).values - r32.weights.sort(-1).values).abs().max().item() < 1e-6
    assert layer(x).dtype == torch.bfloat16
