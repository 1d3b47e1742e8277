"""Post-training quantization on a small model trained here (plain torch loop, ~1000 steps on the embedded
corpus): the quantizer bites (<= 2^b values per group, integer storage, perplexity moves), int8 weight-only
costs <= 0.1%, int4 g128 <= 1%, int3 RTN >= 0.3%; GPTQ beats RTN on every layer's output error (ratio <= 0.5)
and at 3 bits halves RTN's perplexity cost; the quantized directory loads like a checkpoint, and launch/evaluate.py
and launch/generate.py read it;
torchao QAT prepared and converted logits agree."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, SMALL_DATA, SMALL_MODEL, compose

SEQ = 64
TRAIN = dict(hidden=128, inter=256, steps=800, batch=16, lr=6e-3)
QAT_STEPS = 150
# The train split in a seeded order: the first N_EVAL windows are the held-out evaluation set, the next N_CALIB
# the calibration set, the rest trains the model. (The data's own valid split, ~5.5k tokens of the corpus' last
# files, is too small and too unlike the rest to rank quantizers.)
SPLIT_SEED, N_EVAL, N_CALIB = 9, 512, 64


def model_overrides(data_root) -> list[str]:
    return SMALL_MODEL + SMALL_DATA + [f"data.root={data_root}", f"model.hidden_size={TRAIN['hidden']}",
                                       f"model.intermediate_size={TRAIN['inter']}"]


def train_loop(model, windows: torch.Tensor, steps: int, lr: float, batch: int, seed: int = 0, after_step=None,
               warmup: int = 20) -> None:
    """AdamW, linear warmup then cosine to 0, clip 1.0; after_step(model) runs after every optimizer step."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        w = windows[torch.randint(0, windows.shape[0], (batch,), generator=g)]
        loss = model.loss(model(w[:, :-1]), w[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(model)
    model.eval()


def trained_checkpoint(data_root, base: Path) -> Path:
    """A checkpoint of the small model trained TRAIN['steps'] steps; trained once per session (shared with
    test_sparsity.py and test_onnx.py)."""
    from omegaconf import OmegaConf
    from megaseek.data.spec import DataSpec
    from megaseek.model.config import ModelConfig
    from megaseek.model.decoder import Decoder
    from megaseek.quant.calib import dataset_windows
    from megaseek.quant.store import write_checkpoint
    out = base / "ckpt"
    if (out / "manifest.json").is_file():
        return out
    cfg = compose(model_overrides(data_root))
    mc = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    data = OmegaConf.to_container(cfg.data, resolve=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster, and far faster on a shared machine
    try:
        model = Decoder(mc, seed=0)
        windows = dataset_windows(data, mc.vocab_size, SEQ, "train", seed=SPLIT_SEED)
        train_loop(model, windows[N_EVAL + N_CALIB:], TRAIN["steps"], TRAIN["lr"], TRAIN["batch"])
    finally:
        torch.set_num_threads(threads)
    tok = DataSpec.from_config(data, vocab_size=mc.vocab_size).tier_dir("tokenized") / "tokenizer.json"
    base.mkdir(parents=True, exist_ok=True)
    return write_checkpoint(out, model, tokenizer=tok, step=TRAIN["steps"],
                            state={"step": TRAIN["steps"], "config": OmegaConf.to_container(cfg, resolve=True)})


@pytest.fixture(scope="module")
def ckpt(data_root, tmp_path_factory):
    return trained_checkpoint(data_root, tmp_path_factory.getbasetemp() / "quant_model")


@pytest.fixture(scope="module")
def setup(ckpt):
    from megaseek.ckpt.hf import load_model
    from megaseek.quant.calib import mean_loss, run_windows
    model, _ = load_model(ckpt)
    w = run_windows(ckpt, SEQ, "train", N_EVAL + N_CALIB, seed=SPLIT_SEED)
    evalw, calib = w[:N_EVAL], w[N_EVAL:]
    return model, calib, evalw, mean_loss(model, evalw)


def _delta(model, evalw, base_loss) -> float:
    from megaseek.quant.calib import mean_loss
    return math.exp(mean_loss(model, evalw) - base_loss) - 1  # relative perplexity change


def _ptq(setup, method, bits, gs):
    from megaseek.quant.ptq import quantize_model
    model, calib, evalw, base = setup
    m = copy.deepcopy(model)
    res = quantize_model(m, method, bits, gs, calib=calib)
    return m, res, _delta(m, evalw, base)


def test_groupwise_rtn_and_packing():
    from megaseek.quant.groupwise import distinct_per_group, pack, rtn, unpack
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4, 8):
        q = rtn(w, bits, 16)  # groups of 16, 16, 8 columns
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2 ** bits - 1
        assert q.scales.shape == (6, 3) and q.zeros.dtype == torch.uint8
        assert distinct_per_group(q.dequantize(), q.g_idx, 16) <= 2 ** bits
        assert torch.equal(unpack(pack(q.codes, bits), bits, 40), q.codes)
        step = q.scales[:, q.g_idx.long()]
        assert bool(((q.dequantize() - w).abs() <= step / 2 + 1e-6).all())  # round to nearest within range
    assert pack(rtn(w, 4, 16).codes, 4).shape == (6, 20)  # two codes per byte


def test_gptq_core_beats_rtn_on_correlated_inputs():
    from megaseek.quant.gptq import gptq, output_error
    from megaseek.quant.groupwise import rtn
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated features
    H, w = x.T @ x, torch.randn(16, 32, generator=g)
    e_rtn = output_error(w, rtn(w, 3, 16).dequantize(), H)
    for act_order in (False, True):
        q = gptq(w, H, 3, 16, act_order=act_order)
        e = output_error(w, q.dequantize(), H)
        assert e < 0.7 * e_rtn, (act_order, e, e_rtn)
        assert torch.allclose(((x @ w.T) - x @ q.dequantize().T).pow(2).sum() / (x @ w.T).pow(2).sum(),
                              torch.tensor(e, dtype=torch.float32), rtol=1e-3)


def test_rtn_thresholds(setup):
    from megaseek.quant.groupwise import distinct_per_group
    from megaseek.quant.modules import target_linears
    d4 = _ptq(setup, "rtn", 4, 128)[2]
    m3, res3, d3 = _ptq(setup, "rtn", 3, 128)
    print(f"[rtn] ppl delta int4 g128 {100 * d4:.3f}%, int3 g128 {100 * d3:.3f}%")
    assert 0 < d4 <= 0.01
    assert d3 >= 0.003
    for name, mod in target_linears(m3).items():
        assert distinct_per_group(mod.weight.detach(), res3.weights[name].g_idx, 128) <= 8, name


def test_gptq_beats_rtn(setup):
    _, res, d_gptq = _ptq(setup, "gptq", 3, 128)
    d_rtn = _ptq(setup, "rtn", 3, 128)[2]
    ratios = {l["name"]: l["error"] / l["rtn_error"] for l in res.layers}
    print(f"[gptq] 3-bit g128 ppl delta gptq {100 * d_gptq:.3f}% vs rtn {100 * d_rtn:.3f}%; "
          f"per-layer error gptq/rtn max {max(ratios.values()):.3f}")
    assert len(ratios) == 2 * 7 and max(ratios.values()) <= 0.5, ratios
    assert d_gptq <= 0.5 * d_rtn


def test_int8_torchao(setup):
    from megaseek.quant.torchao_cpu import quantize_int8
    model, _, evalw, base = setup
    for mode, tol in (("int8_weight_only", 0.001), ("int8_dynamic", 0.01)):
        m = quantize_int8(copy.deepcopy(model), mode)
        d = _delta(m, evalw, base)
        print(f"[torchao] {mode}: ppl delta {100 * d:.4f}%")
        assert d != 0 and abs(d) <= tol, (mode, d)


def test_qat_prepare_convert_agree(setup):
    from megaseek.quant.torchao_cpu import qat_convert, qat_prepare
    model, calib, _, _ = setup
    m = qat_prepare(copy.deepcopy(model), weight_bits=4, group_size=32)
    ids = calib[:2, :-1]
    with torch.no_grad():
        zp = m(ids)
        qat_convert(m, weight_bits=4, group_size=32)
        zc = m(ids)
        zf = model(ids)
    print(f"[qat] prepared vs converted {float((zp - zc).abs().max()):.2e}, "
          f"vs float {float((zp - zf).abs().max()):.2e}")
    assert float((zp - zc).abs().max()) <= 1e-5
    assert float((zp - zf).abs().max()) > 1e-3  # the fake quantization really acted


def test_quantize_cli_and_load(ckpt, setup, tmp_path):
    from megaseek.ckpt.hf import load_model
    from megaseek.quant import load_quantized, read_quantized
    out = tmp_path / "q4"
    p = subprocess.run([sys.executable, str(REPO / "launch" / "quantize.py"), f"checkpoint={ckpt}", "method=gptq",
                        "bits=4", "group_size=128", f"out={out}", "calib_windows=32"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"[cli] gptq int4 g128: ppl {rep['ppl_before']:.3f} -> {rep['ppl_after']:.3f}")
    assert rep["ppl_after"] != rep["ppl_before"] and abs(rep["ppl_delta"]) <= 0.01
    codes, meta = read_quantized(out)
    assert len(codes) == 14 and meta["bits"]["layers.0.attn.q_proj"] == 4
    from safetensors import safe_open
    with safe_open(str(out / "quant.safetensors"), framework="pt") as f:
        assert f.get_tensor("layers.0.mlp.down_proj.qweight").dtype == torch.uint8
        assert tuple(f.get_tensor("layers.0.mlp.down_proj.qweight").shape) == (128, 128)  # (out, in/2): packed
    mq, _ = load_quantized(out)
    mf, _ = load_model(out)  # the fp32 copy a plain consumer reads
    ids = setup[1][:2, :-1]
    with torch.no_grad():
        assert torch.equal(mq(ids), mf(ids))
    bad = subprocess.run([sys.executable, str(REPO / "launch" / "quantize.py"), f"checkpoint={ckpt}", "bits=9",
                          f"out={tmp_path / 'bad'}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "bits=9" in bad.stderr
    _consumers_read_quantized(ckpt, out, mq, tmp_path)


def _cli(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{name}_cli", str(REPO / "launch" / f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _consumers_read_quantized(ckpt: Path, qdir: Path, mq, tmp_path: Path) -> None:
    """launch/evaluate.py and launch/generate.py take the quantized directory as a checkpoint: its perplexity on a
    text (os.py) moves (but < 2%) against the source checkpoint's, and its greedy completions are those of the
    model rebuilt from the integers."""
    import contextlib
    import io
    import os
    from megaseek.data.tokenizer import load_tokenizer
    from megaseek.model.generate import SamplingConfig, generate
    text = tmp_path / "os_py.txt"
    text.write_text(Path(os.__file__).read_text(encoding="utf-8")[:20000], encoding="utf-8")
    ev, ppl = _cli("evaluate"), {}
    for name, d in (("float", ckpt), ("int4", qdir)):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert ev.main([f"checkpoint={d}", f"text_file={text}", "seq_len=64"]) == 0
        ppl[name] = json.loads(buf.getvalue().strip().splitlines()[-1])["perplexity"]
    print(f"[cli] evaluate.py ppl of os.py: float {ppl['float']:.3f}, gptq int4 dir {ppl['int4']:.3f}")
    assert ppl["int4"] != ppl["float"] and abs(ppl["int4"] / ppl["float"] - 1) < 0.02
    prompts = ["def main(", "import sys", "class A:"]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in prompts))
    got = tmp_path / "gen.jsonl"
    with contextlib.redirect_stdout(io.StringIO()):
        assert _cli("generate").main([f"checkpoint={qdir}", f"prompts={src}", f"out={got}",
                                      "max_new_tokens=12"]) == 0
    tok = load_tokenizer(qdir / "tokenizer.json")
    ref = generate(mq, [tok.encode(t).ids for t in prompts], SamplingConfig(max_new_tokens=12))
    rows = [json.loads(x) for x in got.read_text().splitlines()]
    stops = set(_cli("generate").stop_ids(tok))
    assert [r["completion"] for r in rows] == [tok.decode(t[:-1] if t and t[-1] in stops else t) for t in ref]


def test_qat_recovers_2bit_gap(ckpt, setup):
    """From the trained model: a float control and a QAT run (int2 weights g32, int8 activations) fine-tuned the
    same steps on the same batches; QAT's converted model closes >= 50% of the gap that PTQ (the same torchao
    quantizer applied to the control) opens."""
    from megaseek.quant.torchao_cpu import qat_convert, qat_prepare
    model, calib, evalw, _ = setup
    from megaseek.quant.calib import mean_loss, run_windows
    kw = dict(weight_bits=2, group_size=32, activation_bits=8)
    data = run_windows(ckpt, SEQ, "train", None, seed=SPLIT_SEED)[N_EVAL + N_CALIB:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        control = copy.deepcopy(model)
        train_loop(control, data, steps=QAT_STEPS, lr=2e-3, batch=8, seed=3, warmup=5)
        qat = qat_prepare(copy.deepcopy(model), **kw)
        train_loop(qat, data, steps=QAT_STEPS, lr=2e-3, batch=8, seed=3, warmup=5)
    finally:
        torch.set_num_threads(threads)
    qat_convert(qat, **kw)
    ptq = qat_convert(qat_prepare(copy.deepcopy(control), **kw), **kw)
    f, p, q = (math.exp(mean_loss(m, evalw)) for m in (control, ptq, qat))
    recovered = 1 - (q - f) / (p - f)
    print(f"[qat] 2-bit g32: float control ppl {f:.2f}, PTQ {p:.2f}, QAT {q:.2f}: {100 * recovered:.1f}% of the gap "
          f"recovered ({QAT_STEPS} steps)")
    # 2-bit PTQ really hurts (a gap to recover): +4.8% (ppl 84.0 -> 88.0) from the model trained with the default
    # train.gemm (oneDNN), +6.9% (65.5 -> 70.0) from the same recipe on MKL: at lr 6e-3 this small model's
    # trajectory amplifies the libraries' last-bit rounding (gradients at equal weights agree to 1e-6)
    assert p > f * 1.03
    assert recovered >= 0.5



def test_moe_quantization_is_refused_before_any_work(tmp_path, data_root):
    """MoE models (grouped routed experts, partial-sum down projections) are refused with one message naming
    model.mlp before calibration; nothing is written."""
    from megaseek.quant.api import quantize_checkpoint
    from tests.test_hf_deepseek import _checkpoint
    _checkpoint(tmp_path / "moe", data_root, mlp="moe", first_k_dense_replace=1, n_routed_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=32)
    with pytest.raises(ValueError, match="model.mlp=moe: quantization of MoE models is not supported"):
        quantize_checkpoint(tmp_path / "moe", tmp_path / "moe_q", method="rtn", bits=8, group_size=32, seq_len=32,
                            calib_file=str(tmp_path / "missing.txt"), eval_file=str(tmp_path / "missing.txt"))
    assert not (tmp_path / "moe_q").exists()
