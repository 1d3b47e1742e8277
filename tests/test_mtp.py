"""Multi-token prediction (megaseek/model/mtp.py): the depth-1 loss equals a hand-written reference that runs
each document on its own with the labels shifted by two (t_{i+2} predicted at i from h_i and t_{i+1}); it
reaches the shared embedding and W_1; parameter and FLOP counts include the MTP module; through the training
job, tp=2 and pp=2 (the MTP module on the last stage, the embedding copy's gradient summed with the first
stage's) equal one process (loss with the MTP term, the mtp_loss metric, grad norms)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaseek.model.config import ModelConfig
from megaseek.model.decoder import Decoder
from megaseek.model.mtp import take_mtp_loss
from tests.helpers import run_world
from tests.test_equivalence import _train

S = 12


def _cfg(**kw):
    return ModelConfig(**{**dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=64, max_seq_len=32, init_std=0.1, mtp_depth=1), **kw})


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, S), generator=g)
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * S])
    pos = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).expand(2, S).clone()
    pos[1] = torch.arange(S)
    labels = torch.full_like(ids, -100)
    same = docs[:, 1:] == docs[:, :-1]
    labels[:, :-1] = torch.where(same, ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    labels[1, 3] = -100  # a masked label inside a document (e.g. an SFT prompt token)
    return {"input_ids": ids, "labels": labels, "document_ids": docs, "position_ids": pos}


def _reference(model, b):
    """Per document, plain loops: positions i with i + 2 in the document and label i + 1 real."""
    mod = model.mtp[0]
    ids, labels = b["input_ids"], b["labels"]
    h0 = model.run_layers(model.embed_tokens(ids), b["position_ids"], b["document_ids"])
    total = torch.zeros(())
    for r in range(ids.shape[0]):
        for d in b["document_ids"][r].unique():
            idx = (b["document_ids"][r] == d).nonzero().flatten().tolist()
            a, e = idx[0], idx[-1] + 1
            n = e - a - 2  # predictions t_{i+2} inside the document
            if n <= 0:
                continue
            seg = slice(a, a + n)
            x = F.linear(torch.cat([mod.enorm(model.embed_tokens(ids[r:r + 1, a + 1:a + 1 + n])), mod.hnorm(h0[r:r + 1, seg])],
                                   -1), mod.eh_proj)
            from megaseek.model.layers import rope_at
            cos, sin = rope_at(model.rope_cos, model.rope_sin, n, b["position_ids"][r:r + 1, seg])
            hk = mod.block(x, cos, sin, None)  # one document alone: the plain causal mask
            z = F.linear(mod.norm(hk), model.head_weight())[0, :, :97]
            for j in range(n):
                i = a + j
                if labels[r, i + 1] >= 0:  # the target t_{i+2} is learned (label i, masked or not, is fed)
                    total = total + F.cross_entropy(z[j:j + 1], ids[r, i + 2:i + 3])
    return total


@pytest.mark.parametrize("tied", [False, True])
def test_depth1_loss_equals_reference_with_labels_shifted_by_two(tied):
    torch.manual_seed(0)
    model = Decoder(_cfg(tie_embeddings=tied)).train()
    b = _batch()
    model(b["input_ids"], b["position_ids"], b["document_ids"])
    weighted, total = take_mtp_loss(model, b)
    ref = _reference(model, b)
    ref = float(ref.detach())
    assert abs(float(total) - ref) < 1e-5 * ref, (float(total), ref)
    assert torch.allclose(weighted, 0.3 * total.detach().expand_as(weighted), rtol=1e-6)
    assert take_mtp_loss(model, b) is None  # taken once per forward
    weighted.backward()
    assert float(model.mtp[0].eh_proj.grad.abs().sum()) > 0 and float(model.embed.weight.grad.abs().sum()) > 0
    model.eval()
    with torch.no_grad():
        model(b["input_ids"], b["position_ids"], b["document_ids"])
    assert take_mtp_loss(model, b) is None  # evaluation runs no MTP


def test_last_stage_without_token_ids_reads_them_from_the_labels():
    """A pipeline's last stage gets labels only: on pretraining windows (every label the next token) the depth-1
    loss from the labels equals the one from input_ids exactly."""
    torch.manual_seed(0)
    model = Decoder(_cfg()).train()
    ids = torch.randint(0, 97, (2, S + 1), generator=torch.Generator().manual_seed(1))
    b = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    losses = []
    for batch in (b, {"labels": b["labels"]}):
        model(b["input_ids"])
        losses.append(take_mtp_loss(model, batch)[1])
    assert float(losses[0]) > 1.0 and torch.equal(losses[0], losses[1])


def test_loss_mask_masks_the_mtp_targets_and_refusals():
    """An SFT row learns its assistant tokens only: the MTP targets follow `loss_mask` (a masked target moves no
    number); objectives other than next-token ones, sequence parallelism and a too-short sequence are refused."""
    from megaseek.model.mtp import check_mtp, mtp_targets
    b = _batch()
    mask = torch.ones_like(b["labels"], dtype=torch.bool)
    mask[0, :4] = False  # e.g. the prompt of an SFT example
    _, tgt = mtp_targets(b["input_ids"], b["labels"], b["document_ids"], 1, mask)
    _, plain = mtp_targets(b["input_ids"], b["labels"], b["document_ids"], 1)
    assert (tgt[0, :3] == -100).all() and torch.equal(tgt[1], plain[1]) and torch.equal(tgt[0, 3:], plain[0, 3:])
    torch.manual_seed(0)
    model = Decoder(_cfg()).train()
    totals = []
    for batch in (dict(b, loss_mask=mask), dict(b, loss_mask=mask, labels=b["labels"].clone().index_put_(
            (torch.tensor([0]), torch.tensor([1])), torch.tensor([5])))):  # change a masked target: same loss
        model(b["input_ids"], b["position_ids"], b["document_ids"])
        totals.append(take_mtp_loss(model, batch)[1])
    assert torch.equal(totals[0], totals[1])
    cfg = _cfg()
    assert check_mtp(cfg, 12, False, "pretrain") is None and check_mtp(cfg, 12, False, "sft") is None
    assert "not dpo" in check_mtp(cfg, 12, False, "dpo")
    assert "sequence_parallel" in check_mtp(cfg, 12, True, "pretrain")
    assert "train.seq_len >= mtp_depth + 2" in check_mtp(cfg, 2, False, "pretrain")
    assert check_mtp(ModelConfig(**{**cfg.to_dict(), "mtp_depth": 0}), 2, True,
                     "dpo") is None


def test_depth2_with_documents_follows_the_loss_mask():
    """Depth 2 with document ids and a loss mask (an SFT batch): every depth reads the batch's loss mask, not the
    previous depth's attention mask; a changed label at a masked position moves no number at any depth."""
    from megaseek.model.mtp import mtp_token_losses, mtp_targets
    torch.manual_seed(0)
    model = Decoder(_cfg(mtp_depth=2)).train()
    b = _batch()
    mask = torch.ones_like(b["labels"], dtype=torch.bool)
    mask[0, :6] = False
    batch = dict(b, loss_mask=mask)
    model(b["input_ids"], b["position_ids"], b["document_ids"])
    losses = mtp_token_losses(model, model._mtp_hidden, batch)
    assert [t.shape for t in losses] == [(2, S - 1), (2, S - 2)]
    for k, t in enumerate(losses, start=1):
        _, tgt = mtp_targets(b["input_ids"], b["labels"], b["document_ids"], k, mask)
        assert torch.equal(t != 0, tgt >= 0), k  # a loss exactly where the masked target is real
        assert (t[0, :6 - k] == 0).all() and (t[0, 6 - k:] != 0).any(), k
    changed = b["labels"].clone()
    changed[0, 2] = (changed[0, 2] + 1) % 97  # a masked position
    model(b["input_ids"], b["position_ids"], b["document_ids"])
    again = mtp_token_losses(model, model._mtp_hidden, dict(batch, labels=changed))
    assert all(torch.equal(x, y) for x, y in zip(losses, again))


def test_eh_proj_takes_the_embedding_half_first():
    """DeepSeek's released eh_proj (read by Megatron-Core, vLLM, SGLang as eh_proj(cat[enorm(emb), hnorm(h)])):
    W_k's first h columns multiply the normed embedding."""
    torch.manual_seed(0)
    mod = Decoder(_cfg()).mtp[0]
    with torch.no_grad():
        mod.eh_proj[:, 32:].zero_()  # only the first half left
        e, h = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
        base = mod.project(h, e)
        assert float(base.abs().max()) > 0
        assert torch.equal(mod.project(h * 2 + 1, e), base)  # the hidden state reaches only the zeroed half
        assert not torch.equal(mod.project(h, e * 2 + 1), base)


def test_counts_include_the_mtp_module_and_bad_depth_is_refused():
    from megaseek.model.flops import param_counts
    cfg = _cfg()
    model = Decoder(cfg)
    assert param_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())
    no_mtp = ModelConfig(**{**cfg.to_dict(), "mtp_depth": 0})
    assert param_counts(cfg)["total"] - param_counts(no_mtp)["total"] == sum(p.numel() for p in model.mtp.parameters())
    with pytest.raises(ValueError, match="model.mtp_depth"):
        ModelConfig(**{**cfg.to_dict(), "mtp_depth": 31}).validate()


MTP = ["model.mtp_depth=1", "model.mtp_loss_weight=0.3", "train.steps=5", "optimizer.decay_steps=5",
       "train.micro_batch_size=2", "model.num_layers=2"]


@pytest.mark.slow
def test_mtp_tp2_and_pp2_equal_one_process(data_root, tmp_path):
    base = run_world(1, _train, [(str(tmp_path / "one"), MTP + ["zero.stage=0"])], str(data_root))[0]
    runs = {"tp2": MTP + ["parallel.tp=2", "zero.stage=0"], "pp2": MTP + ["parallel.pp=2", "zero.stage=0"]}
    res = run_world(2, _train, [(str(tmp_path / k), v) for k, v in runs.items()], str(data_root))[0]
    want = base[str(tmp_path / "one")]
    assert len(want) == 5 and all("pretrain/mtp_loss" in r for r in want)
    assert want[-1]["pretrain/mtp_loss"] < want[0]["pretrain/mtp_loss"] - 0.2  # the depth-1 head learns
    for k in runs:
        got = res[str(tmp_path / k)]
        for a, w in zip(got, want):
            assert abs(a["loss"] - w["loss"]) < 1e-4, (k, a["loss"], w["loss"])
            m_a, m_w = a["pretrain/mtp_loss"], w["pretrain/mtp_loss"]
            assert abs(m_a - m_w) < 1e-4, (k, m_a, m_w)
        assert abs(got[0]["grad_norm"] - want[0]["grad_norm"]) < 1e-5 * want[0]["grad_norm"], k


def test_mtp_checkpoint_exports_to_hf(tmp_path, data_root):
    """DeepseekV3: depth d is written as model.layers.{num_layers + d} (DeepSeek's release layout, with its own
    embed_tokens / shared_head copies), which transformers ignores: the logits still equal ours. Llama has no
    MTP modules: they are left out. Both checkpoints pass the tools' weight check (expected_shapes)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megaseek.ckpt.hf import export_hf
    from tests.test_hf_deepseek import IDS, _checkpoint
    for kind, kw in {"mla": {}, "gqa": {"attention": "gqa", "mlp": "swiglu", "num_kv_heads": 2}}.items():
        m = _checkpoint(tmp_path / kind / "ckpt", data_root, mtp_depth=1, **kw)
        out = export_hf(tmp_path / kind / "ckpt", tmp_path / kind / "hf")
        keys = load_file(str(out / "model.safetensors")).keys()
        L = m.cfg.num_layers
        mtp_keys = {k for k in keys if k.startswith(f"model.layers.{L}.")}
        hf, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], info
        if kind == "mla":
            assert {f"model.layers.{L}.{k}" for k in ("eh_proj.weight", "enorm.weight", "hnorm.weight",
                    "shared_head.norm.weight", "shared_head.head.weight", "embed_tokens.weight",
                    "input_layernorm.weight", "mlp.down_proj.weight")} <= mtp_keys
        else:
            assert not mtp_keys and not any("mtp" in k for k in keys)
        with torch.no_grad():
            assert float((m.eval()(IDS)[..., :1001] - hf.eval()(IDS).logits).abs().max()) < 1e-4, kind


MOE_MTP = MTP + ["model.mlp=moe", "model.n_routed_experts=8", "model.num_experts_per_tok=2",
                 "model.moe_intermediate_size=32", "model.bias_update_rate=0.01", "zero.stage=1"]


@pytest.mark.slow
def test_moe_mtp_block_at_ep2_and_pp2_equals_one_process(data_root, tmp_path):
    """model.mlp=moe: the MTP block is an MoE block (DeepSeek-V3), layer 2 here. Its experts are expert-parallel
    at ep=2 and on the last stage at pp=2; loss, mtp_loss and its load metric (which the aux-loss-free bias update
    of every MoE layer reads) equal one process (1e-4)."""
    base = run_world(1, _train, [(str(tmp_path / "one"), MOE_MTP)], str(data_root))[0][str(tmp_path / "one")]
    runs = {"ep2": MOE_MTP + ["parallel.ep=2"], "pp2": MOE_MTP + ["parallel.pp=2"]}
    res = run_world(2, _train, [(str(tmp_path / k), v) for k, v in runs.items()], str(data_root))[0]
    assert len(base) == 5 and all("moe/L2/max_load" in r and "moe/L1/max_load" in r for r in base)
    assert base[-1]["pretrain/mtp_loss"] < base[0]["pretrain/mtp_loss"]
    for k in runs:
        got = res[str(tmp_path / k)]
        for a, w in zip(got, base):
            for key in ("loss", "pretrain/mtp_loss", "moe/L2/max_load", "moe/L0/max_load"):
                assert abs(a[key] - w[key]) < 1e-4, (k, key, a[key], w[key])
