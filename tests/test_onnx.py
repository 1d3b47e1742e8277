"""ONNX export of the trained small model: ONNX Runtime logits equal PyTorch's within 1e-4 at three shapes
including (1, 1) and one longer than the export example; the graph's inputs are symbolic; the ORT int8 file is
<= 0.55x the fp32 one; the TensorRT script skips cleanly here and its dry run's profiles name the ONNX inputs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.test_quant import trained_checkpoint


@pytest.fixture(scope="module")
def exported(data_root, tmp_path_factory):
    ckpt = trained_checkpoint(data_root, tmp_path_factory.getbasetemp() / "quant_model")
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    p = subprocess.run([sys.executable, str(REPO / "launch" / "export_onnx.py"), f"checkpoint={ckpt}", f"out={out}",
                        "quantized=int8"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr
    return ckpt, out, json.loads(p.stdout.strip().splitlines()[-1])


def test_onnx_matches_pytorch(exported):
    from megaseek.ckpt.hf import load_model
    from megaseek.export.onnx import check_shapes, graph_inputs, ort_session
    ckpt, out, rep = exported
    assert rep["max_abs_diff"] <= 1e-4
    assert graph_inputs(out) == {"input_ids": ["batch", "seq"]}  # symbolic, not the example's (2, 16)
    model, cfg = load_model(ckpt)
    shapes = [(1, 1), (3, 7), (2, cfg.max_seq_len)]  # the last is longer than the export example (16)
    diff = check_shapes(model, ort_session(out), shapes, seed=3)
    print(f"[onnx] max abs logit diff vs PyTorch over {shapes}: {diff:.2e}")
    assert diff <= 1e-4


def test_onnx_int8_size(exported):
    import os
    _, out, rep = exported
    q = rep["int8"]["path"]
    ratio = os.path.getsize(q) / os.path.getsize(out)
    print(f"[onnx] int8 / fp32 file size {ratio:.3f}, int8 logit diff {rep['int8']['max_abs_diff']:.3f}")
    assert ratio <= 0.55


def test_build_trt_skips_and_dry_run(exported):
    from megaseek.export.onnx import graph_inputs
    _, out, _ = exported
    p = subprocess.run([sys.executable, str(REPO / "launch" / "build_trt.py"), f"onnx={out}"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    if "SKIP" not in p.stdout:
        pytest.skip("TensorRT and CUDA are present: the engine was built")
    assert p.stdout.strip().splitlines()[-1].startswith("SKIP: ")
    d = subprocess.run([sys.executable, str(REPO / "launch" / "build_trt.py"), f"onnx={out}", "dry_run=true",
                        "max_batch=8", "max_seq=64"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert d.returncode == 0, d.stderr
    prof = json.loads(d.stdout.strip().splitlines()[-1])["profiles"]
    assert set(prof) == set(graph_inputs(out)) == {"input_ids"}
    assert prof["input_ids"] == {"min": [1, 1], "opt": [1, 32], "max": [8, 64]}
    bad = subprocess.run([sys.executable, str(REPO / "launch" / "build_trt.py"), "onnx=/nonexistent.onnx"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "/nonexistent.onnx" in bad.stderr


@pytest.mark.slow
def test_kv_cache_graph_decodes_like_pytorch(exported, tmp_path):
    """The KV-cache step graph: greedy tokens equal PyTorch's (whole prefix recomputed each step), its logits
    within 1e-4 of the recomputed ones at every step, past axis symbolic (prefill at past = 0)."""
    from megaseek.ckpt.hf import load_model
    from megaseek.export.onnx import graph_inputs, ort_session
    from megaseek.export.onnx_kv import validate_kv
    ckpt, _, _ = exported
    out = tmp_path / "kv.onnx"
    p = subprocess.run([sys.executable, str(REPO / "launch" / "export_onnx.py"), f"checkpoint={ckpt}", f"out={out}",
                        "kv_cache=true"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    ins = graph_inputs(out)
    assert ins["input_ids"] == ["batch", "seq"] and ins["past_keys"][1] == "batch" and ins["past_keys"][3] == "past"
    model, _ = load_model(ckpt)
    again = validate_kv(ort_session(out), model, batch=3, prompt_len=5, new=12, seed=4)
    print(f"[onnx kv] tokens equal {rep['tokens_equal']} / {again['tokens_equal']}, max abs logit diff "
          f"{rep['max_abs_diff']:.2e} / {again['max_abs_diff']:.2e}")
    assert rep["tokens_equal"] and again["tokens_equal"]
    assert max(rep["max_abs_diff"], again["max_abs_diff"]) <= 1e-4


def _cli(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{name}_cli", str(REPO / "launch" / f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generate_onnxruntime_backend(exported, tmp_path, capsys):
    """launch/generate.py backend=onnxruntime (KV-cache graph exported on the fly, or given as onnx=FILE) writes the
    same completions as backend=torch, greedy and seeded sampling; the tokens of ort_generate equal
    megaseek.model.generate's for prompts of equal and unequal lengths; a logits-only graph is refused by name."""
    import torch
    from megaseek.ckpt.hf import load_model
    from megaseek.export.onnx import ort_session
    from megaseek.export.onnx_kv import export_kv_onnx
    from megaseek.export.ort_generate import ort_generate
    from megaseek.model.generate import SamplingConfig, generate
    ckpt, logits_graph, _ = exported
    cli = _cli("generate")
    texts = ["def main(", "import os", "class Foo(object):", "    return self.", "for i in range(", "x = 1"]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))

    def run(name, *args):
        o = tmp_path / f"{name}.jsonl"
        rc = cli.main([f"checkpoint={ckpt}", f"prompts={src}", f"out={o}", "max_new_tokens=16", "batch_size=2",
                       *args])
        return rc, [json.loads(x) for x in o.read_text().splitlines()] if rc == 0 else None

    model, cfg = load_model(ckpt)
    kv = export_kv_onnx(model, tmp_path / "kv.onnx")
    sampled = ["temperature=0.8", "top_k=20", "top_p=0.9", "seed=5"]
    greedy = {"torch": run("g_torch"), "onnxruntime": run("g_ort", "backend=onnxruntime")}  # graph exported here
    sample = {"torch": run("s_torch", *sampled), "onnxruntime": run("s_ort", "backend=onnxruntime", f"onnx={kv}",
                                                                      *sampled)}
    assert greedy["torch"][0] == greedy["onnxruntime"][0] == sample["torch"][0] == sample["onnxruntime"][0] == 0
    assert [r["id"] for r in greedy["onnxruntime"][1]] == list(range(len(texts)))
    assert greedy["onnxruntime"][1] == greedy["torch"][1]
    assert sample["onnxruntime"][1] == sample["torch"][1] != greedy["torch"][1]
    print(f"[generate onnxruntime] greedy and sampled completions equal torch's, e.g. {greedy['torch'][1][0]}")
    # token level: prompts of equal and unequal lengths (grouped by length in the ORT backend)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 5, 1, 9, 5)]
    sc = SamplingConfig(max_new_tokens=20)
    got = ort_generate(ort_session(kv), prompts, sc, batch_size=2)
    assert got == generate(model, prompts, sc) and all(len(t) == 20 for t in got)
    capsys.readouterr()
    assert run("bad", "backend=onnxruntime", f"onnx={logits_graph}")[0] == 2
    err = capsys.readouterr().err
    assert str(logits_graph) in err and "kv_cache=true" in err, err
