"""Hugging Face export of checkpoints trained at tp=2 and pp=2 (tied and untied heads) and DeepSpeed's
zero_to_fp32 on a ZeRO-3 run: transformers' LlamaForCausalLM gives the logits of our tp=1 Decoder loaded from
the checkpoint, which are the logits of the model still in memory at its training layout (fp32, 1e-4)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, compose, run_world
from tests.test_equivalence import COMMON

TOL = 1e-4
IDS = torch.randint(0, 1001, (2, 48), generator=torch.Generator().manual_seed(7))
RUNS = {  # name -> overrides; 3 steps each, all in one 2-process world
    "tp2": ["parallel.tp=2", "zero.stage=1", "train.save_interval=2"],  # checkpoints at steps 2 and 3
    "tp2_tied_kv1": ["parallel.tp=2", "zero.stage=1", "model.tie_embeddings=true", "model.num_kv_heads=1"],
    "pp2_tied": ["parallel.pp=2", "zero.stage=0", "model.tie_embeddings=true"],
    "pp2": ["parallel.pp=2", "zero.stage=0"],
    "z3": ["zero.stage=3", "train.micro_batch_size=4", "train.ckpt_native=true"],  # dp=2, ZeRO-3
}


@torch.no_grad()
def _layout_logits(trainer, ids):
    """Logits of the trained model at its own layout (tensor shards gathered; pipeline stages chained by p2p).
    Only the rank holding full logits returns them."""
    import torch.distributed as dist
    from megaseek.tensor_parallel.layers import gather_full
    m, g, V = trainer.engine.module, trainer.groups, trainer.mcfg.vocab_size
    m.eval()
    if g.pp.size == 1:
        z = gather_full(m(ids), m.ctx, dim=-1)[..., :V]  # (b, s, V)
        return z.numpy() if g.global_rank == 0 else None
    if g.pp.rank == 0:
        dist.send(m.run_layers(m.embed_tokens(ids)).contiguous(), dst=g.pp.ranks[1])
        return None
    x = torch.empty(ids.shape[0], ids.shape[1], trainer.mcfg.hidden_size)
    dist.recv(x, src=g.pp.ranks[0])
    return m.logits(m.run_layers(x))[..., :V].numpy()


def _train_runs(rank, world, runs, data_root, ids):
    """pretrain(), keeping the built job to evaluate `ids` with the model at its layout after the last step."""
    from megaseek.train.job import build_job
    out = {}
    for run_dir, overrides in runs:
        cfg = compose(COMMON + [f"data.root={data_root}", f"run_dir={run_dir}", "train.steps=3"] + overrides)
        job = build_job(cfg)
        job.run_job()
        out[run_dir] = _layout_logits(job, ids)
    return out


def trained_runs(data_root, base: Path) -> dict:
    """name -> (run dir, layout logits); trained once per session (shared with test_evaluate.py)."""
    base.mkdir(parents=True, exist_ok=True)
    dirs = {k: str(base / k) for k in RUNS}
    if not (base / "done").is_file():
        res = run_world(2, _train_runs, [(dirs[k], RUNS[k]) for k in RUNS], str(data_root), IDS)
        for k, d in dirs.items():
            np.save(base / f"{k}.npy", next(r[d] for r in res if r[d] is not None))
        (base / "done").write_text("ok")
    return {k: (Path(d), torch.from_numpy(np.load(base / f"{k}.npy"))) for k, d in dirs.items()}


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    return trained_runs(data_root, tmp_path_factory.getbasetemp() / "export_runs")


def _maxdiff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2", "tp2_tied_kv1", "pp2_tied", "pp2", "z3"])
def test_hf_logits_equal_ours_and_the_training_layout(runs, name, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from megaseek.ckpt import hf
    from megaseek.model.decoder import Decoder
    run, layout_z = runs[name]
    ckpt = run / "checkpoints" / "global_step3"
    out = hf.export_hf(ckpt, tmp_path / "hf")
    ours, cfg = hf.load_model(ckpt)
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        z_ours, z_hf = ours(IDS)[..., :cfg.vocab_size], ref(IDS).logits
        z_init = Decoder(cfg, seed=1234)(IDS)[..., :cfg.vocab_size]  # the run's initial model
    print(f"[{name}] max |HF - ours| = {_maxdiff(z_hf, z_ours):.3g}, max |ours - layout| = "
          f"{_maxdiff(z_ours, layout_z):.3g}, trained moved logits by {_maxdiff(z_ours, z_init):.3g}")
    assert z_hf.shape == (2, 48, 1001)
    assert _maxdiff(z_hf, z_ours) < TOL
    assert _maxdiff(z_ours, layout_z) < TOL
    assert _maxdiff(z_ours, z_init) > 100 * TOL  # the checkpoint holds the trained weights, not the init
    # the HF directory: names, config, tied head
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    want = {hf.hf_name(n) for n in hf.expected_shapes(cfg)}
    assert names == want and ("lm_head.weight" in names) == (not cfg.tie_embeddings)
    c = json.loads((out / "config.json").read_text())
    assert (c["num_hidden_layers"], c["num_key_value_heads"], c["vocab_size"], c["tie_word_embeddings"]) == \
        (2, cfg.num_kv_heads, 1001, cfg.tie_embeddings)
    if cfg.tie_embeddings:
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_exported_tokenizer_loads_in_transformers(runs, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from megaseek.ckpt import hf
    run, _ = runs["tp2"]
    out = hf.export_hf(run, tmp_path / "hf")
    text = "def add(a, b):\n    return a + b  # sum\n"
    want = Tokenizer.from_file(str(run / "checkpoints" / "global_step3" / "tokenizer.json")).encode(text).ids
    for tok in (AutoTokenizer.from_pretrained(out), PreTrainedTokenizerFast.from_pretrained(out)):
        assert tok.encode(text) == want and len(want) > 5
        assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|pad|>")
        assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
        assert tok.decode(want) == text


@pytest.mark.slow
def test_zero_to_fp32_weights_equal_our_safetensors(runs):
    """DeepSpeed's own consolidation of the ZeRO-3 native copy gives exactly our full tensors."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from megaseek.ckpt import hf
    from megaseek.model.decoder import Decoder
    run, layout_z = runs["z3"]
    ckpt = run / "checkpoints" / "global_step3"
    from megaseek.model.adapter import adapter_for
    ds = {n: t.detach() for n, t in get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "ds"), tag="native").items()}
    ds = adapter_for(hf.model_config(ckpt)).unfused_state(ds)  # fused q,k,v / gate,up -> the canonical parts
    ours = hf.load_weights(ckpt)
    assert set(ds) == set(ours) and len(ours) == 21
    diffs = {n: float((ds[n].float() - ours[n]).abs().max()) for n in ours}
    print(f"[z3] zero_to_fp32 vs safetensors: max abs diff {max(diffs.values())} over {len(diffs)} tensors")
    assert all(torch.equal(ds[n].float(), ours[n]) for n in ours), diffs
    cfg = hf.model_config(ckpt)
    model = Decoder(cfg, seed=0).eval()
    assert model.padded_vocab == cfg.vocab_size  # tp=1: no vocabulary padding to handle
    model.load_state_dict({n: t.float() for n, t in ds.items()}, strict=True)
    with torch.no_grad():
        assert _maxdiff(model(IDS)[..., :cfg.vocab_size], layout_z) < TOL


@pytest.mark.slow
def test_run_dir_resolves_to_newest_valid_checkpoint(runs, tmp_path):
    from megaseek.ckpt import hf
    run = tmp_path / "run"
    shutil.copytree(runs["tp2"][0] / "checkpoints", run / "checkpoints")
    assert hf.resolve_checkpoint(run).name == "global_step3"
    assert hf.resolve_checkpoint(run / "checkpoints").name == "global_step3"
    w = run / "checkpoints" / "global_step3" / "weights-stage0.safetensors"
    b = bytearray(w.read_bytes())
    b[-1] ^= 0xFF  # one flipped bit in a weight: the sha256 no longer matches
    w.write_bytes(bytes(b))
    assert hf.resolve_checkpoint(run).name == "global_step2"
    step2 = hf.load_weights(run / "checkpoints" / "global_step2")
    step3 = hf.load_weights(runs["tp2"][0] / "checkpoints" / "global_step3")
    assert max(float((step2[n] - step3[n]).abs().max()) for n in step3) > 0  # really the older weights


def _cli(script, *args):
    return subprocess.run([sys.executable, str(REPO / "launch" / script), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


@pytest.mark.slow
def test_export_cli_writes_the_same_files(runs, tmp_path):
    from safetensors.torch import load_file
    from megaseek.ckpt import hf
    run, _ = runs["pp2_tied"]
    p = _cli("export_hf.py", f"checkpoint={run}", f"out={tmp_path / 'cli'}")
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in (tmp_path / "cli").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]
    got = load_file(str(tmp_path / "cli" / "model.safetensors"))
    want = hf.load_weights(run / "checkpoints" / "global_step3")
    assert set(got) == {hf.hf_name(n) for n in want}
    assert all(torch.equal(got[hf.hf_name(n)], t) for n, t in want.items())
    again = _cli("export_hf.py", f"checkpoint={run}", f"out={tmp_path / 'cli'}")  # out not empty: refused
    assert again.returncode == 2 and str(tmp_path / "cli") in again.stderr


def _bad_checkpoints(run: Path, tmp: Path) -> dict:
    """name -> a path that must be refused: missing, corrupt (a flipped byte), foreign format, no manifest,
    a run directory without checkpoints."""
    src = run / "checkpoints" / "global_step3"
    corrupt = tmp / "corrupt"
    shutil.copytree(src, corrupt)
    f = corrupt / "weights-stage0.safetensors"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01
    f.write_bytes(bytes(b))
    foreign = tmp / "foreign"
    shutil.copytree(src, foreign)
    man = json.loads((foreign / "manifest.json").read_text())
    (foreign / "manifest.json").write_text(json.dumps(dict(man, format="other-ckpt-9")))
    (tmp / "empty_run").mkdir()
    return {"missing": tmp / "does-not-exist", "corrupt": corrupt, "foreign": foreign,
            "deepspeed_dir": src / "ds", "empty_run": tmp / "empty_run"}


@pytest.mark.slow
def test_bad_input_is_refused_with_exit_code_2(runs, tmp_path):
    run, _ = runs["z3"]  # has a DeepSpeed-native ds/ folder: a directory in a foreign format
    text = tmp_path / "t.txt"
    text.write_text("x = 1\n")
    for why, path in _bad_checkpoints(run, tmp_path).items():
        out = tmp_path / f"out-{why}"
        for script, args in (("export_hf.py", [f"out={out}"]), ("evaluate.py", [f"text_file={text}"])):
            p = _cli(script, f"checkpoint={path}", *args)
            assert p.returncode == 2, (why, script, p.stdout, p.stderr)
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1 and str(path) in lines[0] and "error" in lines[0], (why, script, p.stderr)
            assert p.stdout == "" and not out.exists()
    for args in ([f"checkpoint={run}"], [f"checkpoint={run}", f"out={tmp_path / 'o'}", "bogus=1"]):
        p = _cli("export_hf.py", *args)
        assert p.returncode == 2 and not (tmp_path / "o").exists(), p.stderr
    p = _cli("evaluate.py", f"checkpoint={run}", f"text_file={tmp_path / 'none.txt'}")
    assert p.returncode == 2 and str(tmp_path / "none.txt") in p.stderr
    (tmp_path / "empty.txt").write_text("")
    p = _cli("evaluate.py", f"checkpoint={run}", f"text_file={tmp_path / 'empty.txt'}")
    assert p.returncode == 2 and str(tmp_path / "empty.txt") in p.stderr
    p = _cli("evaluate.py", f"checkpoint={run}", f"text_file={text}", "seq_len=65")  # > model.max_seq_len
    assert p.returncode == 2 and "max_seq_len=64" in p.stderr
