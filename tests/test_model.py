"""Single-process model properties: shapes, causality, RoPE, GQA, init, FLOPs."""
import math

import torch
import torch.nn.functional as F

from megaseek.model.config import ModelConfig
from megaseek.model.decoder import Decoder
from megaseek.model.flops import flops_per_token, param_counts
from megaseek.model.layers import apply_rope, rope_tables

CFG = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
           max_seq_len=32)


def model(**kw):
    """The unfused layers (q_proj, k_proj, ... are read by name below; fused = unfused: tests/test_fused.py)."""
    torch.manual_seed(0)
    return Decoder(ModelConfig(**{**CFG, "fused": False, **kw}), seed=7)


def test_shapes_and_loss_at_init():
    m = model()
    ids = torch.randint(0, 97, (3, 16))
    z = m(ids)
    assert z.shape == (3, 16, 97)
    loss = m.loss(m(ids), ids)
    assert loss.ndim == 0
    assert abs(loss.item() - math.log(97)) < 0.3  # small init: close to uniform


def test_causality():
    m = model()
    ids = torch.randint(0, 97, (2, 20))
    z1 = m(ids)
    ids2 = ids.clone()
    ids2[:, 12] = (ids2[:, 12] + 1) % 97
    z2 = m(ids2)
    assert torch.allclose(z1[:, :12], z2[:, :12], atol=0, rtol=0)  # before t: bitwise unchanged
    assert not torch.allclose(z1[:, 12:], z2[:, 12:])


def test_rope_relative_position():
    cos, sin = rope_tables(64, 16, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def rot(x, pos):
        return apply_rope(x.view(1, 1, 1, 16), cos[pos:pos + 1], sin[pos:pos + 1]).view(16)

    d1 = rot(q, 10) @ rot(k, 7)
    d2 = rot(q, 40) @ rot(k, 37)
    d3 = rot(q, 10) @ rot(k, 2)
    assert torch.allclose(d1, d2, atol=1e-5)  # depends only on the distance
    assert not torch.allclose(d1, d3, atol=1e-3)
    assert torch.allclose(rot(q, 0), q)  # position 0 is the identity


def test_gqa_with_all_kv_heads_equals_plain_multi_head_attention():
    m = model(num_kv_heads=4)
    attn = m.layers[0].attn
    x = torch.randn(2, 10, 32)
    cos, sin = m.rope_cos, m.rope_sin
    out = attn(x, cos[:10], sin[:10])
    # reference multi-head attention written out by hand
    q = F.linear(x, attn.q_proj.weight).view(2, 10, 4, 8).transpose(1, 2)
    k = F.linear(x, attn.k_proj.weight).view(2, 10, 4, 8).transpose(1, 2)
    v = F.linear(x, attn.v_proj.weight).view(2, 10, 4, 8).transpose(1, 2)
    q, k = apply_rope(q, cos[:10], sin[:10]), apply_rope(k, cos[:10], sin[:10])
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    s = s.masked_fill(torch.triu(torch.ones(10, 10, dtype=torch.bool), 1), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 32)
    ref = F.linear(o, attn.o_proj.weight)
    assert torch.allclose(out, ref, atol=1e-5)


def test_gqa_shares_kv_heads_between_query_groups():
    m = model(num_kv_heads=2)
    attn = m.layers[0].attn
    assert attn.k_proj.weight.shape == (16, 32)  # 2 kv heads x 8
    # GQA equals MHA whose kv weights repeat each kv head for its query group
    mha = model(num_kv_heads=4)
    a2 = mha.layers[0].attn
    with torch.no_grad():
        a2.q_proj.weight.copy_(attn.q_proj.weight)
        a2.o_proj.weight.copy_(attn.o_proj.weight)
        a2.k_proj.weight.copy_(attn.k_proj.weight.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32))
        a2.v_proj.weight.copy_(attn.v_proj.weight.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32))
    x = torch.randn(2, 10, 32)
    assert torch.allclose(attn(x, m.rope_cos[:10], m.rope_sin[:10]), a2(x, m.rope_cos[:10], m.rope_sin[:10]), atol=1e-5)


def test_same_seed_same_weights_scaled_init_and_tied_head():
    a, b = model(), model()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    o = a.layers[0].attn.o_proj.weight.std().item()
    qs = a.layers[0].attn.q_proj.weight.std().item()
    assert abs(qs - 0.02) < 0.003 and abs(o - 0.02 / math.sqrt(4)) < 0.002  # out-proj std / sqrt(2L)
    t = model(tie_embeddings=True)
    assert t.lm_head is None and t.head_weight() is t.embed.weight
    assert sum(p.numel() for p in t.parameters()) == param_counts(ModelConfig(**{**CFG, "tie_embeddings": True}))["total"]


def test_param_and_flop_counts():
    cfg = ModelConfig(**CFG)
    m = model()
    assert sum(p.numel() for p in m.parameters()) == param_counts(cfg)["total"]
    n = param_counts(cfg)["matmul"]
    f = flops_per_token(cfg, 16)
    assert f["model"] == 6 * n + 12 * 2 * 16 * 32
    assert flops_per_token(cfg, 16, "full")["hardware"] > f["model"]
    # the large reference layout: vocab 65536, hidden 8192, 64 layers, intermediate 24576
    big = ModelConfig(vocab_size=65536, hidden_size=8192, num_layers=64, num_heads=32, num_kv_heads=32,
                      intermediate_size=24576, max_seq_len=2048)
    total = param_counts(big)["total"]
    assert total == 65536 * 8192 * 2 + 64 * (4 * 8192 ** 2 + 3 * 8192 * 24576 + 2 * 8192) + 8192
