"""Multi-head latent attention: counts from the class equal the built modules; the absorbed form equals the naive
one; the cache holds exactly kv_lora_rank + qk_rope_head_dim values per token per layer and cached greedy decoding
equals uncached; tensor parallelism (2 ranks, with and without q-LoRA, with sequence parallelism) equals one
process within 1e-5 in logits, loss, every weight and gradient, and in cached greedy decoding."""
import pytest
import torch

from tests.helpers import init_gloo, run_world

TOL = 1e-5
MLA = dict(vocab_size=1001, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=96,
           max_seq_len=32, attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
           init_std=0.1)


def _cfg(**kw):
    from megaseek.model.config import ModelConfig
    return ModelConfig(**{**MLA, **kw})


def _set_absorb(model, on: bool):
    for blk in model.layers:
        blk.attn.absorb = on


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_counts_from_class_equal_built_model(q_lora_rank):
    from megaseek.model.decoder import Decoder
    from megaseek.model.flops import flops_per_token, param_counts
    from megaseek.model.mla import MLAttention
    cfg = _cfg(q_lora_rank=q_lora_rank)
    m = Decoder(cfg, seed=1)
    assert param_counts(cfg)["total"] == sum(p.numel() for p in m.parameters())
    attn = m.layers[0].attn
    matmul = sum(p.numel() for n, p in attn.named_parameters() if "layernorm" not in n)
    assert MLAttention.num_params(cfg) == matmul
    assert MLAttention.norm_params(cfg) == sum(p.numel() for n, p in attn.named_parameters() if "layernorm" in n)
    names = sorted(n for n, _ in attn.named_parameters())
    want = (["q_proj.weight"] if q_lora_rank is None else ["q_a_layernorm.weight", "q_a_proj.weight", "q_b_proj.weight"])
    assert names == sorted(want + ["kv_a_layernorm.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight",
                                   "o_proj.weight"])
    # QK^T over d_n + d_r, AV over d_v: 2 s n (d_n + d_r + d_v) forward per token per layer
    s, f = 32, flops_per_token(cfg, 32)["model"]
    assert f == 6 * param_counts(cfg)["matmul"] + 3 * cfg.num_layers * 2 * s * 4 * (16 + 8 + 24)


def test_softmax_scale_is_deepseeks():
    """scale = 1/sqrt(d_n + d_r): a model whose attention uses 1/sqrt(d_n) (the nope width only) differs."""
    from megaseek.model.decoder import Decoder
    from megaseek.model.mla import softmax_scale
    cfg = _cfg()
    assert softmax_scale(cfg) == pytest.approx((16 + 8) ** -0.5, rel=1e-15)
    m = Decoder(cfg, seed=2).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = m(ids)
        for blk in m.layers:
            blk.attn.scale = 16 ** -0.5
        assert (m(ids) - z).abs().max().item() > 1e-3


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_absorbed_equals_naive(q_lora_rank):
    """fp64: absorbed = naive within 1e-6 (observed ~1e-15); fp32 within 1e-5 in logits of magnitude ~3."""
    from megaseek.model.decoder import Decoder
    ids = torch.randint(0, 1001, (2, 20), generator=torch.Generator().manual_seed(4))
    doc = torch.tensor([[0] * 8 + [1] * 12, [-1] * 5 + [0] * 15])  # packed documents and left padding
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):
        m = Decoder(_cfg(q_lora_rank=q_lora_rank), seed=5).to(dtype).eval()
        with torch.no_grad():
            for kw in ({}, {"document_ids": doc}):
                naive = m(ids, **kw)
                _set_absorb(m, True)
                absorbed = m(ids, **kw)
                _set_absorb(m, False)
                assert naive.abs().max() > 1.0
                assert (naive - absorbed).abs().max().item() < tol, (dtype, kw)


def test_latent_cache_size_and_cached_decoding():
    from megaseek.model.decoder import Decoder
    from megaseek.model.generate import SamplingConfig, generate
    cfg = _cfg(q_lora_rank=24)
    m = Decoder(cfg, seed=6).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 14), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(3, 20)
        parts = [m(ids[:, :9], cache=cache), m(ids[:, 9:10], cache=cache), m(ids[:, 10:], cache=cache)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # 40, whatever the head count (naive K+V: 4 * (24 + 24))
    assert cache.values_per_token() == per_token
    for i in range(cfg.num_layers):
        held = cache.k[i].numel() + cache.v[i].numel()
        assert held == 3 * 20 * per_token, (i, held)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    cached = generate(m, prompts, SamplingConfig(max_new_tokens=10))
    assert cached == generate(m, prompts, SamplingConfig(max_new_tokens=10, use_cache=False))
    assert len(set(map(tuple, cached))) > 1


def test_mla_config_errors_name_the_field():
    from megaseek.model.decoder import Decoder
    with pytest.raises(ValueError, match="model.num_kv_heads=2 must equal model.num_heads=4"):
        Decoder(_cfg(num_kv_heads=2))
    with pytest.raises(ValueError, match="model.qk_rope_head_dim=7 must be even"):
        Decoder(_cfg(qk_rope_head_dim=7))
    with pytest.raises(ValueError, match="model.q_lora_rank=0"):
        Decoder(_cfg(q_lora_rank=0))
    with pytest.raises(ValueError, match="model.num_heads=4 is not divisible by parallel.tp=3"):
        _cfg().validate(3)


# --- tensor parallelism: one 2-rank world ---
def _tp_case(ctx, case):
    from megaseek.model.decoder import Decoder
    from megaseek.model.generate import SamplingConfig, generate
    from megaseek.tensor_parallel.layers import TPContext, gather_full
    from megaseek.tensor_parallel.mappings import gather_from_region
    cfg = _cfg(**case["model"])
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    ref = Decoder(cfg, seed=11)
    ref_z = ref(ids)
    ref_loss = ref.loss(ref_z, labels)
    ref_loss.backward()
    tctx = TPContext(group=ctx.group, size=ctx.size, rank=ctx.rank, sequence_parallel=case.get("sp", False))
    m = Decoder(cfg, tctx, seed=11)
    z = m(ids)
    loss = m.loss(z, labels)
    loss.backward()
    full_z = gather_from_region(z.detach(), tctx.group)[..., :cfg.vocab_size]
    d = {"logits": (full_z - ref_z.detach()).abs().max().item(), "loss": abs(loss.item() - ref_loss.item())}
    refp = dict(ref.named_parameters())
    for name, p in m.named_parameters():
        r = refp[name]
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        w, g = gather_full(p, tctx, dim), gather_full(p.grad, tctx, dim)
        if dim == 0:
            w, g = w[:r.shape[0]], g[:r.shape[0]]
        d[f"w:{name}"] = (w - r.detach()).abs().max().item()
        d[f"g:{name}"] = (g - r.grad).abs().max().item()
    d["grad_scale"] = max(r.grad.abs().max().item() for r in refp.values())
    d["n"], d["n_ref"] = len(dict(m.named_parameters())), len(refp)
    if not case.get("sp"):
        prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
        d["gen_equal"] = float(generate(m, prompts, SamplingConfig(max_new_tokens=8))
                               != generate(ref, prompts, SamplingConfig(max_new_tokens=8)))
    return d


def _tp_world(rank, world, cases):
    from megaseek.distributed.groups import ParallelGroups
    from megaseek.distributed.topology import Topology
    from megaseek.tensor_parallel.layers import TPContext
    init_gloo(rank, world)
    groups = ParallelGroups.build(Topology(tp=world))
    ctx = TPContext.from_axis(groups.tp)
    return [_tp_case(ctx, c) for c in cases]


TP_CASES = [{"model": {}}, {"model": {"q_lora_rank": 24}}, {"model": {"q_lora_rank": 24}, "sp": True},
            {"model": {"tie_embeddings": True}, "sp": True}]


def test_mla_tensor_parallel_equals_one_process():
    for rank_res in run_world(2, _tp_world, TP_CASES):
        for case, d in zip(TP_CASES, rank_res):
            assert d["n"] == d["n_ref"], case
            assert d["grad_scale"] > 1e-3, case  # gradients are not trivially zero
            bad = {k: v for k, v in d.items() if k not in ("n", "n_ref", "grad_scale") and v > TOL}
            assert not bad, (case, bad)
