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
            gate, up, down = layer.experts.expert_weights(e)
            hf.experts.gate_up_proj[e].copy_(torch.cat([gate, up]))
            hf.experts.down_proj[e].copy_(down)
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
            gate, up, down = layer.experts.expert_weights(e)
            hf.experts.gate_up_proj[e].copy_(torch.cat([gate, up]))
            hf.experts.down_proj[e].copy_(down)
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


# --- balancing ---------------------------------------------------------------------------------------------

def test_seq_aux_loss_closed_form():
    """Hand-built routing, E = 2, k = 1, one sequence of 2 tokens: s = [.6, .2], [.3, .3] -> s' = [.75, .25],
    [.5, .5]; P = [.625, .375]; both tokens pick expert 0 -> f = 2/(1*2) * [2, 0] = [2, 0]; L = a * 2 * .625.
    A second sequence with perfectly balanced routing and uniform scores gives L = a."""
    from megaseek.model.moe.balance import batch_aux_loss, seq_aux_loss
    a = 0.1
    scores = torch.tensor([[[0.6, 0.2], [0.3, 0.3]], [[0.4, 0.4], [0.7, 0.7]]])  # (b=2, s=2, E=2)
    idx = torch.tensor([[[0], [0]], [[0], [1]]])  # (2, 2, k=1)
    per_seq = seq_aux_loss(scores, idx, a)
    assert torch.allclose(per_seq, torch.tensor([a * 2 * 0.625, a]), atol=1e-7), per_seq
    # the batch loss over all 4 tokens: P = mean of s' = [(.75+.5+.5+.5)/4, ...] = [.5625, .4375];
    # f = 2/(1*4) * [3, 1] = [1.5, .5] -> L = a (1.5*.5625 + .5*.4375)
    flat = batch_aux_loss(scores.reshape(4, 2), idx.reshape(4, 1), a)
    assert abs(flat.item() - a * (1.5 * 0.5625 + 0.5 * 0.4375)) < 1e-7


def _aux_sum_and_grad(layer, x, splits):
    layer.zero_grad(set_to_none=True)
    total = 0.0
    for part in torch.split(x, splits):
        layer(part)
        aux = layer.take_aux_loss()
        aux.backward()
        total += float(aux.detach())
    return total, layer.gate.weight.grad.clone()


def test_seq_aux_loss_does_not_change_with_micro_batching():
    """The token-weighted sequence-wise loss summed over micro-batches of 4 | 2+2 | 1+1+1+1 sequences: the
    same value and the same router gradient (the batch loss, by contrast, does change)."""
    layer = MoELayer(moe_cfg(balance="seq_aux", aux_loss_coef=0.01), TPContext(), seed=3, out_std=0.1)
    layer.train()
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(1))
    ref, gref = _aux_sum_and_grad(layer, x, [4])
    for splits in ([2, 2], [1, 1, 1, 1]):
        v, g = _aux_sum_and_grad(layer, x, splits)
        assert abs(v - ref) < 1e-6 * abs(ref) and (g - gref).abs().max().item() < 1e-7
    batch = MoELayer(moe_cfg(balance="aux", aux_loss_coef=0.01), TPContext(), seed=3, out_std=0.1)
    assert abs(_aux_sum_and_grad(batch, x, [4])[0] - _aux_sum_and_grad(batch, x, [1, 1, 1, 1])[0]) > 1e-6


def test_bias_update_and_load_metrics():
    """One global batch of two micro-batches: the loads are the bincount of the chosen experts; the bias moves
    by exactly rate * sign(mean - load); max/mean load and the drop fraction are reported; statistics restart.
    Eval-mode forwards record nothing."""
    from megaseek.model.moe.balance import end_of_global_batch
    cfg = moe_cfg(n_group=1, topk_group=1, bias_update_rate=0.01)
    layer = MoELayer(cfg, TPContext(), seed=11, out_std=0.1, layer=3)
    random_bias(layer, seed=2)
    b0 = layer.gate.e_score_correction_bias.clone()
    g = torch.Generator().manual_seed(5)
    loads = torch.zeros(8)
    for _ in range(2):
        layer(torch.randn(2, 16, 64, generator=g))
        loads += torch.bincount(layer.last_routing.reshape(-1), minlength=8).float()
    layer.eval()
    layer(torch.randn(2, 16, 64, generator=g))  # not counted
    out = end_of_global_batch(layer)
    expected = b0 + 0.01 * torch.sign(loads.mean() - loads)
    assert torch.equal(layer.gate.e_score_correction_bias, expected)
    assert not torch.equal(expected, b0)
    assert abs(out["moe/L3/max_load"] - float(loads.max() / loads.mean())) < 1e-12
    assert out["moe/L3/dropped"] == 0.0 and out["moe/max_load"] == out["moe/L3/max_load"]
    assert float(layer.expert_stats.load.sum()) == 0.0  # restarted


def test_aux_free_bias_balances_a_skewed_router():
    """The mechanism alone (router weights fixed, every token leaning the same way, 4096 tokens a batch, 16
    experts, top-2): at rate 1e-2 max/mean load falls from > 4 to <= 1.3 over steps 50-100 (a window, as the
    issue measures); at rate 0 it stays > 4 throughout."""
    from megaseek.model.moe.balance import end_of_global_batch
    layers = [MoELayer(moe_cfg(n_routed_experts=16, n_group=1, topk_group=1, n_shared_experts=0,
                               bias_update_rate=r), TPContext(), seed=21, out_std=0.1) for r in (1e-2, 0.0)]
    g = torch.Generator().manual_seed(8)
    shift = torch.randn(64, generator=g)
    hist = ([], [])
    for step in range(100):
        x = torch.randn(4096, 64, generator=g) + shift
        for layer, h in zip(layers, hist):
            with torch.no_grad():
                r = layer.gate(x)  # routing only: the experts do not matter here
            layer.expert_stats.add(torch.bincount(r.idx.reshape(-1), minlength=16), 0)
            h.append(end_of_global_batch(layer)["moe/max_load"])
    assert hist[0][0] > 4 and hist[1][0] > 4, (hist[0][0], hist[1][0])
    assert max(hist[0][50:]) <= 1.3, hist[0][50:]
    assert min(hist[1]) > 4, min(hist[1])


def reference_with_capacity(layer: MoELayer, x: torch.Tensor, cap: int) -> tuple[torch.Tensor, int]:
    """A per-token loop: assignments in token order (token, then slot), each expert takes its first `cap`."""
    flat = x.reshape(-1, x.shape[-1])
    r = layer.gate(flat)
    taken = [0] * layer.cfg.n_routed_experts
    y = torch.zeros_like(flat)
    dropped = 0
    for t in range(flat.shape[0]):
        for j in range(r.idx.shape[1]):
            e = int(r.idx[t, j])
            if taken[e] >= cap:
                dropped += 1
                continue
            taken[e] += 1
            y[t] += r.weights[t, j] * layer.experts.expert_partial(e, flat[t:t + 1])[0]
    y = y + layer.shared_experts.partial(flat)
    return y.view_as(x), dropped


def test_capacity_factor_drops_and_counts():
    """capacity_factor 0.5: each expert keeps its first ceil(0.5 * T k / E) assignments of the micro-batch in
    token order; the output equals a per-token reference loop and the drops are counted."""
    from megaseek.model.moe.balance import end_of_global_batch
    layer = MoELayer(moe_cfg(capacity_factor=0.5), TPContext(), seed=13, out_std=0.1)
    random_bias(layer, seed=6, scale=0.3)
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2))
    cap = layer.capacity(32)
    assert cap == 4  # ceil(0.5 * 32 * 2 / 8)
    y = layer(x)
    ref, dropped = reference_with_capacity(layer, x, cap)
    assert dropped > 0
    assert (y - ref).abs().max().item() < TOL
    out = end_of_global_batch(layer)
    assert abs(out["moe/L0/dropped"] - dropped / 64) < 1e-12


# --- the model -----------------------------------------------------------------------------------------------

def test_decoder_with_dense_first_layer_and_balance_loss():
    """first_k_dense_replace=1: layer 0 keeps the dense SwiGLU, layer 1 is MoE; expert names are per global
    expert; the objective seam adds the layer's sequence-wise loss (equal to recomputing it from the routing)
    and reports it; parameter counts follow the spec."""
    from megaseek.model.decoder import Decoder
    from megaseek.model.layers import SwiGLU
    from megaseek.model.moe.balance import seq_aux_loss
    from megaseek.tasks.objective import add_model_losses
    from megaseek.tasks.pretrain import NextTokenObjective
    cfg = moe_cfg(vocab_size=101, num_layers=2, intermediate_size=96, max_seq_len=32, first_k_dense_replace=1,
                  balance="seq_aux", aux_loss_coef=0.01)
    model = Decoder(cfg, seed=4)
    assert isinstance(model.layers[0].mlp, SwiGLU) and isinstance(model.layers[1].mlp, MoELayer)
    names = set(model.state_dict())  # canonical names (a fused dense gate,up is saved as its parts)
    assert {"layers.1.mlp.gate.weight", "layers.1.mlp.experts.7.down_proj.weight",
            "layers.1.mlp.shared_experts.up_proj.weight", "layers.0.mlp.gate_proj.weight"} <= names
    assert "layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1)}
    logits = model(ids)
    moe = model.layers[1].mlp
    parts = NextTokenObjective()(model, logits, batch)
    with torch.no_grad():  # the layer's routing, recomputed from its input
        h = model.embed(ids)
        h = model.layers[0](h, *[t[:16] for t in (model.rope_cos, model.rope_sin)])
        h = h + model.layers[1]._attn(h, model.rope_cos[:16], model.rope_sin[:16])
        r = moe.gate(model.layers[1].mlp_norm(h).reshape(32, 64))
    expected = (seq_aux_loss(r.scores.view(2, 16, 8), r.idx.view(2, 16, 2), 0.01) * 16).sum()
    full = add_model_losses(model, parts)
    assert abs(float(full.loss_sum - parts.loss_sum) - float(expected)) < 2e-5  # fp32 sum of ~160
    assert abs(float(full.metrics["moe_aux_loss"]) - float(expected)) < 1e-6
    full.loss_sum.backward()
    assert model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    assert add_model_losses(model, parts) is parts  # taken once


def test_moe_config_refusals():
    for kw, needle in ((dict(n_routed_experts=6, n_group=4), "n_routed_experts=6 is not divisible by model.n_group"),
                       (dict(topk_group=5), "topk_group=5 exceeds model.n_group"),
                       (dict(scoring_func="tanh"), "scoring_func='tanh'"),
                       (dict(balance="loss"), "balance='loss'"),
                       (dict(num_experts_per_tok=9), "num_experts_per_tok=9 exceeds"),
                       (dict(capacity_factor=0.0), "capacity_factor=0.0"),
                       (dict(first_k_dense_replace=3, num_layers=2), "first_k_dense_replace=3")):
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("[", r"\[")):
            moe_cfg(**kw)


def _stage_metrics(rank, world):
    """Rank r plays pipeline stage r, holding MoE layer r; one routed micro-batch each."""
    import torch.distributed as dist

    from megaseek.distributed.spawn import init_gloo
    from megaseek.train.callbacks import ExpertBalance
    init_gloo(rank, world)
    layer = MoELayer(moe_cfg(n_group=1, topk_group=1), TPContext(), seed=11 + rank, out_std=0.1, layer=rank)
    random_bias(layer, seed=rank)
    layer(torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(rank)))
    out = {}
    ExpertBalance(torch.nn.ModuleList([layer]), None, dist.group.WORLD).on_step_end(None, out)
    return out, float(layer.last_load.max() / layer.last_load.mean())


def test_expert_metrics_cover_every_pipeline_stage():
    """With pp > 1 each stage holds its own MoE layers; ExpertBalance gathers the per-layer metrics over the
    pipeline group, so rank 0 (which writes the sinks) reports every layer and moe/max_load over the model."""
    from megaseek.distributed.spawn import run_world
    (out0, own0), (out1, own1) = run_world(2, _stage_metrics, timeout=120)
    assert out0 == out1
    assert out0["moe/L0/max_load"] == pytest.approx(own0, rel=1e-12)
    assert out0["moe/L1/max_load"] == pytest.approx(own1, rel=1e-12)
    assert own0 != own1 and out0["moe/max_load"] == max(own0, own1)
