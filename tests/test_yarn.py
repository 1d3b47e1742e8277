"""YaRN context extension (megaseek/model/rope.py) equals transformers: the inverse frequencies and attention
factor of `_compute_yarn_parameters`, and the logits of DeepseekV3ForCausalLM (MLA: YaRN tables and the softmax
mscale^2) and LlamaForCausalLM (GQA) exported from our checkpoints, on sequences longer than the original
context; importing those directories gives our YaRN keys back; unsupported scalings are refused by name."""
from __future__ import annotations

import json

import pytest
import torch

from tests.test_hf_deepseek import IDS, MLA, TOL, _checkpoint, _max

YARN = dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=16, rope_beta_fast=8.0,
            rope_beta_slow=1.0, rope_mscale=0.8, rope_mscale_all_dim=0.5)


@pytest.mark.parametrize("mscale, all_dim", [(0.8, 0.5), (1.0, 1.0), (1.0, 0.0)])
def test_inverse_frequencies_and_factors_equal_transformers(mscale, all_dim):
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    from megaseek.model.adapter import DeepseekV3Adapter
    from megaseek.model.config import ModelConfig
    from megaseek.model.rope import attention_factor, softmax_mscale, yarn_inv_freq, yarn_mscale
    cfg = ModelConfig(**{**MLA, **YARN, "rope_mscale": mscale, "rope_mscale_all_dim": all_dim, "rope_theta": 500.0})
    hf_cfg = DeepseekV3Config(**DeepseekV3Adapter(cfg).hf_config(0, 1))
    inv, factor = _compute_yarn_parameters(hf_cfg)
    ours = yarn_inv_freq(cfg.rope_dim, cfg.rope_theta, 4.0, 16, 8.0, 1.0)
    assert ours.shape == inv.shape == (cfg.rope_dim // 2,)
    assert _max(ours.float(), inv) < 1e-6 * float(inv.abs().max())
    plain = 1.0 / (500.0 ** (torch.arange(0, cfg.rope_dim, 2, dtype=torch.float64) / cfg.rope_dim))
    assert ours[0] == plain[0] and abs(float(ours[-1] - plain[-1] / 4)) < 1e-12  # kept / interpolated ends
    assert attention_factor(cfg) == pytest.approx(factor, rel=1e-12)
    assert softmax_mscale(cfg) == pytest.approx(yarn_mscale(4.0, all_dim) ** 2 if all_dim else 1.0, rel=1e-12)


def _yarn_ckpt(tmp_path, data_root, **kw):
    return _checkpoint(tmp_path / "ckpt", data_root, **{**YARN, **kw})


def test_mla_yarn_export_equals_deepseek_v3_and_imports_back(tmp_path, data_root):
    """40 positions > the original 16: ours = HF within TOL / 10; without the softmax mscale^2, or with plain
    RoPE, HF's logits move by > 10 x TOL (the guards); import_hf returns the same YaRN keys."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from megaseek.ckpt.hf import export_hf
    from megaseek.model.adapter import DeepseekV3Adapter
    m = _yarn_ckpt(tmp_path, data_root)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    conf = json.loads((out / "config.json").read_text())
    assert conf["rope_parameters"]["rope_type"] == "yarn" and conf["rope_parameters"]["factor"] == 4.0
    hf, info = DeepseekV3ForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    hf.eval()
    with torch.no_grad():
        ours = m(IDS)[..., :1001]
        theirs = hf(IDS).logits
        assert _max(ours, theirs) < TOL / 10
        for name, change in {"no softmax mscale": {"mscale_all_dim": 0.0},
                             "plain rope": None}.items():
            rp = dict(conf["rope_parameters"], **change) if change else {"rope_type": "default",
                                                                         "rope_theta": conf["rope_theta"]}
            wrong = DeepseekV3ForCausalLM(DeepseekV3Config(**dict(conf, rope_parameters=rp))).eval()
            wrong.load_state_dict(hf.state_dict())
            assert _max(wrong(IDS).logits, ours) > 10 * TOL, name
    back = DeepseekV3Adapter.config_from_hf(conf)
    assert {k: back[k] for k in YARN} == YARN


def test_gqa_yarn_export_equals_llama(tmp_path, data_root):
    from transformers import LlamaForCausalLM

    from megaseek.ckpt.hf import export_hf
    from megaseek.model.adapter import DenseAdapter
    m = _yarn_ckpt(tmp_path, data_root, attention="gqa", num_kv_heads=2, rope_mscale_all_dim=0.0)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    conf = json.loads((out / "config.json").read_text())
    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = m(IDS)[..., :1001]
        assert _max(ours, hf(IDS).logits) < TOL / 10
        plain = _checkpoint(tmp_path / "plain", data_root, attention="gqa", num_kv_heads=2)
        assert _max(plain(IDS)[..., :1001], ours) > 10 * TOL  # the same weights without YaRN
    back = DenseAdapter.config_from_hf(conf)
    assert back["rope_scaling"] == "yarn" and back["rope_factor"] == 4.0 and back["rope_mscale"] == 0.8


def test_scalings_we_do_not_model_are_refused_by_name():
    from megaseek.model.config import ModelConfig
    from megaseek.model.rope import from_hf
    for rp in ({"rope_type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
               {"rope_type": "llama3", "factor": 8.0}):
        with pytest.raises(ValueError, match="rope scaling '(linear|dynamic|llama3)' is not supported"):
            from_hf({"rope_parameters": rp})
    old = from_hf({"max_position_embeddings": 64, "rope_scaling": {"type": "yarn", "factor": None,
                                                                   "original_max_position_embeddings": 16}})
    assert old["rope_factor"] == 4.0 and old["rope_original_max_seq_len"] == 16
    with pytest.raises(ValueError, match="model.rope_scaling='ntk'"):
        ModelConfig(rope_scaling="ntk").validate()
    with pytest.raises(ValueError, match="model.rope_factor=0.5 must be >= 1"):
        ModelConfig(rope_scaling="yarn", rope_factor=0.5).validate()
