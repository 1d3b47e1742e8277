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

from tests.helpers import REPO, run_world

TOL = 1e-4  # the tolerance; logit parity is asserted at TOL / 10 (see below)
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
    if cfg.mlp == "moe":  # a random non-zero correction bias: it steers the choice of experts
        g = torch.Generator().manual_seed(5)
        for blk in m.layers:
            if hasattr(blk.mlp, "gate"):
                blk.mlp.gate.e_score_correction_bias.copy_(torch.rand(cfg.n_routed_experts, generator=g) * 0.2 - 0.1)
    ad = adapter_for(cfg)
    w = {ad.canonical(n): t.detach() for n, t in m.state_dict().items()}  # parameters and the bias buffers
    write_checkpoint(tmp, cfg, w, _tokenizer(data_root), {"step": 0})
    return m


def _hf(path: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _max(a, b) -> float:
    return float((a - b).abs().max())


def test_export_deepseek_v3_logits_and_counts(tmp_path, data_root, q_lora_rank=None):
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
    assert _max(ours, theirs) < TOL / 10  # observed ~2e-6; the latent norms with rms_norm_eps instead of 1e-6: 8e-5
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


MOE = dict(num_layers=3, mlp="moe", first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
           num_experts_per_tok=2, moe_intermediate_size=32, n_group=4, topk_group=2, group_score="top2_sum",
           scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=24)


def _routing_hooks(hf):
    got = {}
    for i, layer in enumerate(hf.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda mod, a, out, i=i: got.__setitem__(i, out[2].detach()))
    return got


@pytest.fixture(scope="module")
def moe(tmp_path_factory, data_root):
    """The issue's parity model as a checkpoint and its DeepseekV3 export."""
    from megaseek.ckpt.hf import export_hf
    base = tmp_path_factory.mktemp("hf_moe")
    m = _checkpoint(base / "ckpt", data_root, **MOE)
    return m, base / "ckpt", export_hf(base / "ckpt", base / "hf")


def test_export_mla_moe_parity_experts_and_guards(tmp_path, moe):
    """The issue's parity config: MLA + MoE, first_k_dense_replace=1, n_group=4, topk_group=2, top-2, a random
    non-zero correction bias, init std 0.1: logits within 1e-4, the same experts for every token, parameter count
    equal; wrong RoPE rows, a zeroed bias and the other group score each move the logits by > 10x the tolerance."""
    import dataclasses

    from safetensors.torch import save_file
    from transformers import DeepseekV3ForCausalLM

    from megaseek.ckpt.hf import load_weights
    from megaseek.model.adapter import adapter_for
    from megaseek.model.decoder import Decoder
    from megaseek.model.flops import param_counts
    m, ckpt, out = moe
    conf = json.loads((out / "config.json").read_text())
    assert conf["first_k_dense_replace"] == 1 and conf["n_group"] == 4 and conf["n_routed_experts"] == 8
    hf, info = DeepseekV3ForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    hf.eval()
    bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, m.layers[1].mlp.gate.e_score_correction_bias)
    got = _routing_hooks(hf)
    with torch.no_grad():
        ours = m(IDS)[..., :1001]
        theirs = hf(IDS).logits
    assert _max(ours, theirs) < TOL / 10  # observed ~2e-6; the latent norms with rms_norm_eps instead of 1e-6: 8e-5
    for i in (1, 2):  # the MoE layers: the same set of experts for every token
        a, b = m.layers[i].mlp.last_routing.sort(-1).values, got[i].sort(-1).values
        assert torch.equal(a, b), i
    assert sum(p.numel() for p in hf.parameters()) == param_counts(m.cfg)["total"] == sum(
        p.numel() for p in m.parameters())
    # guards (each against our logits): rotate-half rows under the interleaved flag; HF with a zeroed bias;
    # our model with the group score of DeepSeek-V2 (max) instead of V3's top-2 sum
    rot_half = adapter_for(m.cfg).to_hf_state(load_weights(ckpt), rope_interleave=False)
    (tmp_path / "hf_rows").mkdir()
    save_file({k: v.contiguous() for k, v in rot_half.items()}, str(tmp_path / "hf_rows" / "model.safetensors"))
    (tmp_path / "hf_rows" / "config.json").write_text(json.dumps(conf))  # HF fuses the per-expert keys on load
    wrong = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "hf_rows"), dtype=torch.float32).eval()
    zero_bias = DeepseekV3ForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    for layer in zero_bias.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    other = Decoder(dataclasses.replace(m.cfg, group_score="max"), seed=0).eval()
    other.load_state_dict(m.state_dict())
    with torch.no_grad():
        moved = {"rope rows": _max(wrong(IDS).logits, ours), "zero bias": _max(zero_bias(IDS).logits, ours),
                 "group score max": _max(other(IDS)[..., :1001], ours)}
    assert all(v > 10 * TOL for v in moved.values()), moved


def test_deepseek_v3_preset_counts_what_transformers_counts():
    """conf/model/deepseek_v3.yaml counted from the config (never built): 671,026,404,352 total parameters, the
    figure transformers gives for its default DeepseekV3Config on the meta device (MTP module not counted)."""
    from omegaconf import OmegaConf
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from megaseek.model.config import ModelConfig
    from megaseek.model.flops import param_counts
    from tests.helpers import compose
    cfg = ModelConfig.from_dict(OmegaConf.to_container(compose(["model=deepseek_v3"]).model, resolve=True))
    cfg.validate()
    with torch.device("meta"):
        hf = DeepseekV3ForCausalLM(DeepseekV3Config())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert param_counts(cfg)["total"] == n_hf == 671_026_404_352
    # active per token (what MFU counts): every weight but the routed experts a token does not use, counted on
    # HF's own modules: (1 - k / E) of each MoE layer's routed-expert weights drop out.
    k, e = hf.config.num_experts_per_tok, hf.config.n_routed_experts
    routed = sum(p.numel() for n, p in hf.named_parameters() if ".mlp.experts." in n)
    active_hf = n_hf - routed * (e - k) // e
    counts = param_counts(cfg)
    assert counts["active"] == active_hf == 37_552_282_624  # DeepSeek-V3 reports "37B activated"
    from megaseek.model.flops import flops_per_token
    from megaseek.model.spec import attention_cls
    f = flops_per_token(cfg, 4096)["model"]
    attn = 3 * cfg.num_layers * attention_cls(cfg).score_flops(cfg, 4096)
    assert f - attn == 6 * counts["active_matmul"] and counts["active_matmul"] < 0.06 * counts["matmul"]
    for k in ("hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "n_routed_experts",
              "moe_intermediate_size", "first_k_dense_replace", "n_group", "topk_group", "num_experts_per_tok"):
        ours = {"num_attention_heads": cfg.num_heads}.get(k, getattr(cfg, k, None))
        assert ours == getattr(hf.config, k), k


def test_import_deepseek_v3_and_llama_then_evaluate(tmp_path, data_root, moe, capsys):
    """HF dir -> import -> evaluate_text: transformers' own loss within 1e-4 (the MLA + MoE export, through
    launch/import_hf.py; a Llama saved by transformers itself); export -> import is bitwise (bias included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaseek.ckpt.hf import evaluate_text, import_hf, load_weights, text_ids
    _, ckpt, hf_moe = moe
    text = (REPO / "megaseek" / "model" / "mla.py").read_text()[:1500]
    lc = LlamaConfig(vocab_size=1001, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(lc).save_pretrained(str(tmp_path / "hf_llama"))
    (tmp_path / "hf_llama" / "tokenizer.json").write_bytes(_tokenizer(data_root).read_bytes())
    r = subprocess.run([sys.executable, str(REPO / "launch" / "import_hf.py"), f"hf_dir={hf_moe}",
                        f"out={tmp_path / 'imported_moe'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import_hf(tmp_path / "hf_llama", tmp_path / "imported_llama")
    for src, dst in ((hf_moe, tmp_path / "imported_moe"), (tmp_path / "hf_llama", tmp_path / "imported_llama")):
        res = evaluate_text(dst, text, seq_len=64)
        want = _hf_windowed_loss(_hf(src), text_ids(dst, text), 64)
        assert res["tokens"] > 64 and abs(res["loss"] - want) < TOL, (src, res, want)
    a, b = load_weights(ckpt), load_weights(tmp_path / "imported_moe")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any("e_score_correction_bias" in k and a[k].abs().max() > 0 for k in a)
    # bad input: one message naming the path, nothing written (the script's main, in this process)
    import importlib.util
    spec = importlib.util.spec_from_file_location("import_hf_script", REPO / "launch" / "import_hf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for args, msg in (([f"hf_dir={tmp_path / 'nope'}", f"out={tmp_path / 'x'}"], "nope: no such directory"),
                      ([f"hf_dir={tmp_path}", f"out={tmp_path / 'x'}"], "no config.json"),
                      ([f"hf_dir={hf_moe}"], "missing out=...")):
        assert script.main(args) == 2
        assert msg in capsys.readouterr().err, msg
    assert not (tmp_path / "x").exists()


def _model_overrides(ckpt) -> list:
    """model.<key>=<value> for every key of the checkpoint's model (a run that init_from accepts)."""
    from megaseek.ckpt.hf import model_config
    out = []
    for k, v in model_config(ckpt).to_dict().items():
        if k == "name":
            continue
        out.append(f"model.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}")
    return out


def _continue_world(rank, world, ckpt, run_dir, data_root):
    from megaseek.ckpt.hf import load_model
    from megaseek.data.api import build_data
    from megaseek.data.loader import BatchPlan
    from megaseek.train.job import pretrain
    from tests.helpers import compose
    from tests.test_equivalence import COMMON
    cfg = compose(COMMON + _model_overrides(ckpt) + [f"data.root={data_root}", f"run_dir={run_dir}", "train.steps=3",
                                                     "train.micro_batch_size=4", "zero.stage=0",
                                                     f"train.init_from={ckpt}"])
    pretrain(cfg)
    losses = [json.loads(x)["loss"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    # the loss of the imported weights on the run's first global batch, computed outside the engine
    model, _ = load_model(ckpt)
    batches = build_data(cfg, 0, BatchPlan(8, 4, 1, 0), 32, int(cfg.seed), log=lambda *a: None).train.batches()
    with torch.no_grad():
        tot = sum(float((model.token_losses(model(b["input_ids"]), b["labels"].clamp(min=0))
                         * b["loss_mask"]).sum()) for b in batches)
        n = sum(float(b["loss_mask"].sum()) for b in batches)
    # the trained run's checkpoint (correction bias included) exports, and transformers gives its logits
    from megaseek.ckpt.hf import export_hf, load_weights
    trained, _ = load_model(run_dir)
    hf = _hf(export_hf(run_dir, Path(run_dir) / "hf"))
    with torch.no_grad():
        diff = _max(trained(IDS[:, :32])[..., :1001], hf(IDS[:, :32]).logits)
    bias = max(float(t.abs().max()) for k, t in load_weights(trained_ckpt(run_dir)).items()
               if k.endswith("e_score_correction_bias"))
    return losses, tot / n, diff, bias


def trained_ckpt(run_dir):
    from megaseek.ckpt.hf import resolve_checkpoint
    return resolve_checkpoint(run_dir)


@pytest.mark.slow
def test_training_continues_from_imported_checkpoint(tmp_path, data_root, moe):
    """train.init_from=<the imported DeepseekV3 directory>: step 1's loss is the imported model's loss on that
    batch (1e-4: the weights and the correction bias arrived), the loss falls over the next steps, and the run's
    checkpoint (bias saved with it) exports to DeepseekV3 with our logits (1e-4)."""
    from megaseek.ckpt.hf import import_hf
    dst = import_hf(moe[2], tmp_path / "imported")
    losses, want, hf_diff, bias = run_world(1, _continue_world, str(dst), str(tmp_path / "run"), str(data_root))[0]
    assert len(losses) == 3 and abs(losses[0] - want) < TOL, (losses, want)
    assert losses[-1] < losses[0], losses
    assert hf_diff < TOL and bias > 0, (hf_diff, bias)  # the saved bias is the imported (non-zero) one, or moved


def test_deepseek_v2_lite_preset_counts_what_transformers_counts():
    """conf/model/deepseek_v2_lite.yaml: 15,706,484,224 parameters = transformers' DeepseekV2ForCausalLM with the
    preset's shapes on the meta device (the released V2-Lite's 15.7B)."""
    from omegaconf import OmegaConf
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from megaseek.model.config import ModelConfig
    from megaseek.model.flops import param_counts
    from tests.helpers import compose
    c = ModelConfig.from_dict(OmegaConf.to_container(compose(["model=deepseek_v2_lite"]).model, resolve=True))
    c.validate()
    hc = DeepseekV2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                          moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_layers,
                          num_attention_heads=c.num_heads, num_key_value_heads=c.num_heads,
                          n_shared_experts=c.n_shared_experts, n_routed_experts=c.n_routed_experts,
                          num_experts_per_tok=c.num_experts_per_tok, first_k_dense_replace=c.first_k_dense_replace,
                          kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
                          qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, n_group=c.n_group,
                          topk_group=c.topk_group, tie_word_embeddings=c.tie_embeddings)
    with torch.device("meta"):
        hf = DeepseekV2ForCausalLM(hc)
    assert param_counts(c)["total"] == sum(p.numel() for p in hf.parameters()) == 15_706_484_224


def test_gqa_moe_checkpoint_loads_and_export_is_refused(tmp_path, data_root):
    """gqa attention + MoE MLPs: a checkpoint holds the dense attention names and DeepSeek's MoE names, the tools
    load it (logits equal the model's), and the HF export is refused by name before anything is written."""
    from megaseek.ckpt.hf import export_hf, load_model
    m = _checkpoint(tmp_path / "ckpt", data_root, **{**MOE, "attention": "gqa", "num_kv_heads": 2})
    assert m.cfg.mlp == "moe" and m.cfg.attention == "gqa" and m.cfg.first_k_dense_replace == 1
    model, cfg = load_model(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(model(IDS), m(IDS))
    with pytest.raises(ValueError, match="model.attention=gqa with model.mlp=moe"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_mtp_weights_export_and_import_both_ways(tmp_path, data_root, capsys):
    """An MLA + MoE model with model.mtp_depth=1 (an MoE MTP block, as DeepSeek-V3's): export -> import is bitwise
    with the MTP depth (mtp.0.*, experts included, read back from model.layers.{num_layers}) and the same MTP loss;
    the directory transformers saves from it (DeepseekV3ForCausalLM holds no MTP layer) imports without MTP, said
    once and kept in the state; an MTP layer whose MLP kind differs from the model's (experts in a dense model's
    MTP layer) is left out the same way."""
    import json as _json

    from safetensors.torch import load_file, save_file

    from megaseek.ckpt.hf import export_hf, import_hf, load_weights, model_at, model_config
    from megaseek.model.mtp import mtp_token_losses
    kw = dict(mlp="moe", first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
              moe_intermediate_size=32, mtp_depth=1)
    m = _checkpoint(tmp_path / "ckpt", data_root, **kw)
    assert hasattr(m.mtp[0].block.mlp, "gate")  # the MTP block of an MoE model is MoE
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    raw = load_file(str(out / "model.safetensors"))
    assert "model.layers.2.eh_proj.weight" in raw and "model.layers.2.mlp.experts.7.down_proj.weight" in raw
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in raw
    import_hf(out, tmp_path / "back")
    a, b = load_weights(tmp_path / "ckpt"), load_weights(tmp_path / "back")
    assert any(k.startswith("mtp.0.block.mlp.experts.") for k in a)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert model_config(tmp_path / "back").mtp_depth == 1
    back, _ = model_at(tmp_path / "back")
    batch = {"input_ids": IDS[:, :-1], "labels": IDS[:, 1:]}
    losses = []
    for model in (m, back):  # the training forward keeps the hidden states MTP reads
        model.train()
        model(batch["input_ids"])
        losses.append(mtp_token_losses(model, model._mtp_hidden, batch)[0].sum().detach())
    assert torch.equal(losses[0], losses[1]) and losses[0] > 0
    # transformers' own save of the export: no MTP layer in the weights, num_nextn_predict_layers=1 in config.json
    _hf(out).save_pretrained(str(tmp_path / "hf_saved"))
    assert _json.loads((tmp_path / "hf_saved" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    capsys.readouterr()
    import_hf(tmp_path / "hf_saved", tmp_path / "no_mtp")
    assert "imported without multi-token prediction" in capsys.readouterr().out
    assert model_config(tmp_path / "no_mtp").mtp_depth == 0
    assert "does not save them" in _json.loads((tmp_path / "no_mtp" / "state.json").read_text())["mtp_dropped"]
    c = load_weights(tmp_path / "no_mtp")
    assert not any(k.startswith("mtp.") for k in c) and all(torch.equal(a[k], c[k]) for k in c)
    # a dense model whose MTP layer holds experts: left out with its reason
    d = _checkpoint(tmp_path / "dense", data_root, mtp_depth=1)
    assert not hasattr(d.mtp[0].block.mlp, "gate")
    dout = export_hf(tmp_path / "dense", tmp_path / "hf_dense")
    mixed = dict(load_file(str(dout / "model.safetensors")),
                 **{f"model.layers.2.mlp.experts.{e}.gate_proj.weight": torch.zeros(32, 64) for e in range(8)})
    (tmp_path / "hf_mixed").mkdir()
    save_file(mixed, str(tmp_path / "hf_mixed" / "model.safetensors"))
    (tmp_path / "hf_mixed" / "config.json").write_text((dout / "config.json").read_text())
    import_hf(tmp_path / "hf_mixed", tmp_path / "mixed")
    assert "MTP layers' MLPs are MoE but this model builds dense ones" in capsys.readouterr().out
    assert model_config(tmp_path / "mixed").mtp_depth == 0
