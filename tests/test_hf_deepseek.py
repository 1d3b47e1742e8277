"""Hugging Face DeepseekV3 both ways for MLA models.

Export: a checkpoint of an MLA model (init std 0.1, so attention is far from uniform) -> DeepseekV3ForCausalLM
(transformers loads it with no missing or unexpected key); its logits equal ours within 1e-4 (fp32), its parameter
count equals ours exactly, and the wrong RoPE layout (rows not interleaved, or interleave flag off) moves the logits
by more than 10x the tolerance. Import: launch/import_hf.py turns that HF directory (and a LlamaForCausalLM one)
into our checkpoint; evaluate_text gives the loss transformers computes within 1e-4; export -> import is bitwise.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

TOL = 1e-4
MLA = dict(vocab_size=1001, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=96,
           max_seq_len=64, attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
           init_std=0.1)
IDS = torch.randint(0, 1001, (2, 40), generator=torch.Generator().manual_seed(3))


def _tokenizer(data_root) -> Path:
    return next(Path(data_root).rglob("tokenizer.json"))


def _checkpoint(tmp: Path, data_root, **kw):
    """A megaseek checkpoint of a freshly built model (weights only), and the model."""
    from megaseek.ckpt.hf import write_checkpoint
    from megaseek.model.adapter import adapter_for
    from megaseek.model.config import ModelConfig
    from megaseek.model.decoder import Decoder
    cfg = ModelConfig(**{**MLA, **kw})
    m = Decoder(cfg, seed=21).eval()
    ad = adapter_for(cfg)
    w = {ad.canonical(n): p.detach()[:cfg.vocab_size] if n in ("embed.weight", "lm_head.weight") else p.detach()
         for n, p in m.named_parameters()}
    write_checkpoint(tmp, cfg, w, _tokenizer(data_root), {"step": 0})
    return m


def _hf(path: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _max(a, b) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_export_deepseek_v3_logits_and_counts(tmp_path, data_root, q_lora_rank):
    from safetensors.torch import load_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from megaseek.ckpt.hf import export_hf
    from megaseek.model.flops import param_counts
    m = _checkpoint(tmp_path / "ckpt", data_root, q_lora_rank=q_lora_rank)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["DeepseekV3ForCausalLM"] and conf["first_k_dense_replace"] == 2
    assert conf["num_key_value_heads"] == 4 and conf["rope_interleave"] is True and conf["q_lora_rank"] == q_lora_rank
    hf, info = DeepseekV3ForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched key
    hf.eval()
    with torch.no_grad():
        ours = m(IDS)[..., :1001]
        theirs = hf(IDS).logits
    assert ours.abs().max() > 1.0
    assert _max(ours, theirs) < TOL
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_hf == param_counts(m.cfg)["total"] == sum(p.numel() for p in m.parameters())
    # sensitivity: the rotate-half rows under the interleaved flag, and the interleaved rows with the flag off
    from megaseek.ckpt.hf import load_weights
    from megaseek.model.adapter import adapter_for
    raw = load_file(str(out / "model.safetensors"))
    rot_half = adapter_for(m.cfg).to_hf_state(load_weights(tmp_path / "ckpt"), rope_interleave=False)
    for name, (sd, flag) in {"rows": (rot_half, True), "flag": (raw, False)}.items():
        cfg = DeepseekV3Config(**dict(conf, rope_interleave=flag))
        wrong = DeepseekV3ForCausalLM(cfg).eval()
        wrong.load_state_dict(sd, strict=False)
        with torch.no_grad():
            assert _max(wrong(IDS).logits, ours) > 10 * TOL, name
    # the consistent pair (rotate-half rows, flag off) is equal too: the two layouts are the same model
    right = DeepseekV3ForCausalLM(DeepseekV3Config(**dict(conf, rope_interleave=False))).eval()
    right.load_state_dict(rot_half, strict=False)
    with torch.no_grad():
        assert _max(right(IDS).logits, ours) < TOL


def _hf_windowed_loss(hf, ids: list, L: int) -> float:
    """transformers' mean token loss over the windows evaluate_text scores (inputs ids[a:a+L], targets +1)."""
    import torch.nn.functional as F
    t, n, total = torch.tensor(ids), len(ids) - 1, 0.0
    with torch.no_grad():
        for a in range(0, n, L):
            b = min(a + L, n)
            z = hf(t[a:b].unsqueeze(0)).logits[0]  # (w, V)
            total += float(F.cross_entropy(z, t[a + 1:b + 1], reduction="sum"))
    return total / n


def test_import_deepseek_v3_and_llama_then_evaluate(tmp_path, data_root):
    """HF dir -> launch/import_hf.py -> evaluate_text: HF's own loss within 1e-4; export -> import bitwise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaseek.ckpt.hf import evaluate_text, export_hf, load_weights, text_ids
    text = (REPO / "megaseek" / "model" / "mla.py").read_text()[:1500]
    _checkpoint(tmp_path / "ckpt", data_root, q_lora_rank=24)
    export_hf(tmp_path / "ckpt", tmp_path / "hf_v3")
    # a Llama written by transformers itself (random init), tokenizer alongside
    lc = LlamaConfig(vocab_size=1001, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(lc).save_pretrained(str(tmp_path / "hf_llama"))
    (tmp_path / "hf_llama" / "tokenizer.json").write_bytes(_tokenizer(data_root).read_bytes())
    for name in ("hf_v3", "hf_llama"):
        src, dst = tmp_path / name, tmp_path / f"imported_{name}"
        r = subprocess.run([sys.executable, str(REPO / "launch" / "import_hf.py"), f"hf_dir={src}", f"out={dst}"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        res = evaluate_text(dst, text, seq_len=64)
        want = _hf_windowed_loss(_hf(src), text_ids(dst, text), 64)
        assert res["tokens"] > 64 and abs(res["loss"] - want) < TOL, (name, res, want)
    # round trip: our checkpoint -> HF -> ours, bitwise
    a, b = load_weights(tmp_path / "ckpt"), load_weights(tmp_path / "imported_hf_v3")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # bad input: one message naming the path, nothing written
    r = subprocess.run([sys.executable, str(REPO / "launch" / "import_hf.py"), f"hf_dir={tmp_path / 'nope'}",
                        f"out={tmp_path / 'x'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope: no such directory" in r.stderr and not (tmp_path / "x").exists()
