"""Unit tests of pieces reached only end to end before issue 11: the lr schedule, the state adapter's names,
the typed config's refusal of unknown keys (in the library and at the launch script), and CheckpointManager's
save / load round trip on a real (tiny, ZeRO-0 fp32) DeepSpeed engine in a 1-process world."""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaseek.config.schema import ConfigError
from megaseek.config.sections import RunConfig, check_overrides, known_keys
from megaseek.engine.build import build_scheduler, lr_lambda
from megaseek.model.adapter import DenseAdapter, adapter_for
from megaseek.model.config import ModelConfig
from tests.helpers import REPO, SMALL_MODEL, compose, run_world

# --- lr schedule -------------------------------------------------------------------------------------------

def test_lr_lambda_exact_values():
    """warmup 4, cosine to 0.1 at step 12, constant after: (s + 1) / 4, then 0.1 + 0.9 * (1 + cos(pi t)) / 2."""
    got = [lr_lambda(s, 4, 12, 0.1) for s in range(16)]
    assert got[:4] == [0.25, 0.5, 0.75, 1.0]
    assert got[4] == 1.0                                   # t = 0: the peak
    assert got[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)), abs=0, rel=1e-15)
    assert got[8] == pytest.approx(0.55, rel=1e-15)        # t = 1/2: halfway between peak and min
    assert got[12] == pytest.approx(0.1, rel=1e-15)        # min at decay_steps
    assert got[13:] == [got[12]] * 3                       # constant after
    assert all(a > b for a, b in itertools.pairwise(got[4:13]))  # strictly decreasing through the decay
    assert [lr_lambda(s, 0, 4, 0.0) for s in range(5)] == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4),
                                                                         0.5, 0.5 - 0.5 * math.cos(math.pi / 4), 0.0])
    assert lr_lambda(7, 10, 5, 0.2) == 0.8 and lr_lambda(12, 10, 5, 0.2) == 1.0  # decay <= warmup: flat after


def test_build_scheduler_drives_the_optimizer_lr():
    """min_lr / lr is the floor; decay_steps null falls back to train.steps."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    sched = build_scheduler(opt, {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "decay_steps": None}, steps=6)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [1e-3 * lr_lambda(s, 2, 6, 0.1) for s in range(8)]
    assert lrs == pytest.approx(want, rel=1e-12, abs=0)
    assert lrs[0] == pytest.approx(5e-4) and lrs[6] == pytest.approx(1e-4) and lrs[7] == pytest.approx(1e-4)


# --- the state adapter (canonical names <-> Hugging Face names) -------------------------------------------

def _cfg(**kw):
    base = {"vocab_size": 101, "hidden_size": 32, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
            "intermediate_size": 48, "max_seq_len": 16}
    base.update(kw)
    return ModelConfig(**base)


def test_canonical_names_with_a_first_layer_offset():
    a = DenseAdapter
    assert a.canonical("layers.0.attn.q_proj.weight", 3) == "layers.3.attn.q_proj.weight"
    assert a.canonical("layers.12.mlp.down_proj.weight", 2) == "layers.14.mlp.down_proj.weight"
    assert a.canonical("layers.1.mlp_norm.weight", 0) == "layers.1.mlp_norm.weight"
    for top in ("embed.weight", "norm.weight", "lm_head.weight"):
        assert a.canonical(top, 5) == top


@pytest.mark.parametrize("tied", [False, True])
def test_hf_round_trip_for_every_expected_name(tied):
    ad = adapter_for(_cfg(tie_embeddings=tied))
    shapes = ad.expected_shapes()
    assert len(shapes) == 2 + (0 if tied else 1) + 3 * 9
    assert ("lm_head.weight" in shapes) is not tied
    hf = {n: ad.to_hf(n) for n in shapes}
    assert len(set(hf.values())) == len(hf)  # one HF name per tensor
    for n, h in hf.items():
        assert ad.from_hf(h) == n, (n, h)
    assert hf["layers.2.attn.k_proj.weight"] == "model.layers.2.self_attn.k_proj.weight"
    assert hf["layers.0.mlp_norm.weight"] == "model.layers.0.post_attention_layernorm.weight"
    assert hf["embed.weight"] == "model.embed_tokens.weight"
    assert ad.from_hf("model.layers.0.self_attn.rotary_emb.inv_freq") is None and ad.from_hf("foo") is None
    assert shapes["layers.1.attn.k_proj.weight"] == (2 * 8, 32) and shapes["layers.0.mlp.down_proj.weight"] == (32, 48)
    with pytest.raises(KeyError):
        ad.to_hf("layers.0.attn.bogus.weight")


def test_every_decoder_parameter_maps_at_its_stage():
    """Every parameter of a whole Decoder and of two pipeline stages has a canonical name in expected_shapes,
    with that shape (tp = 1, no vocabulary padding), and the stages together cover every name once."""
    from megaseek.model.decoder import Decoder
    cfg = _cfg()
    ad = adapter_for(cfg)
    shapes = ad.expected_shapes()
    whole = {ad.canonical(n, 0): tuple(p.shape) for n, p in Decoder(cfg).state_dict().items()}
    assert whole == shapes  # state_dict: fused q,k,v / gate,up appear under their unfused names
    s0 = Decoder(cfg, first_layer=0, last_layer=1, pre=True, post=False)
    s1 = Decoder(cfg, first_layer=1, last_layer=3, pre=False, post=True)
    names = []
    for st in (s0, s1):
        for n, p in st.state_dict().items():
            c = ad.canonical(n, st.first_layer)
            assert shapes[c] == tuple(p.shape), (n, c)
            names.append(c)
    assert sorted(names) == sorted(shapes)
    assert "layers.2.attn.o_proj.weight" in names and "layers.1.attn_norm.weight" in names


def test_no_adapter_for_an_unknown_spec():
    with pytest.raises(ValueError, match="model.mlp=bogus"):
        adapter_for(_cfg(mlp="bogus"))


# --- typed config: unknown keys named, with the closest valid key -----------------------------------------

def _plain():
    from omegaconf import OmegaConf
    return OmegaConf.to_container(compose([]), resolve=True)


@pytest.mark.parametrize("group,bad,close", [("train", "stpes", "steps"), ("model", "hiden_size", "hidden_size"),
                                             ("zero", "stgae", "stage"), ("optimizer", "warmup_step", "warmup_steps")])
def test_unknown_key_refused_with_the_closest(group, bad, close):
    d = _plain()
    RunConfig.from_config(d)  # the default composes cleanly
    d[group][bad] = 3
    with pytest.raises(ConfigError) as e:
        RunConfig.from_config(d)
    assert f"unknown key {group}.{bad} (did you mean {group}.{close}?)" in str(e.value)


def test_typed_sections_hold_the_values_and_nested_sections():
    d = _plain()
    d["train"]["steps"] = 7
    d["train"]["sampling"]["top_k"] = 5
    run = RunConfig.from_config(d)
    assert run.train.steps == 7 and run.train.sampling.top_k == 5 and run.model.vocab_size == d["model"]["vocab_size"]
    d["train"]["sampling"]["tmperature"] = 1.0
    with pytest.raises(ConfigError, match=r"unknown key train\.sampling\.tmperature \(did you mean "
                                          r"train\.sampling\.temperature\?\)"):
        RunConfig.from_config(d)


def test_check_overrides_names_the_closest_key():
    keys = known_keys(compose([]))
    assert "train.steps" in keys and "zero.stage" in keys
    with pytest.raises(ConfigError, match=r"^unknown key train\.stpes \(did you mean train\.steps\?\)$"):
        check_overrides(["train.stpes=3"], keys)
    with pytest.raises(ConfigError, match=r"unknown key zero\.stgae .*zero\.stage.*; unknown key model\.hiden_size "
                                          r"\(did you mean model\.hidden_size\?\)"):
        check_overrides(["zero.stgae=1", "train.steps=3", "model.hiden_size=8"], keys)
    # left alone: valid keys, additions, deletions, group selections, hydra's own keys
    check_overrides(["train.steps=3", "+train.new_key=1", "~train.steps", "model=small", "hydra.run.dir=x"], keys)


def test_launch_refuses_an_unknown_key_before_building_anything(tmp_path):
    """`launch/pretrain.py train.stpes=3` exits 2 with the suggestion on stderr, before DeepSpeed, the model or
    the job is imported (and before Hydra makes an output directory). Measured: ~2 s CPU."""
    probe = ("import runpy, sys\n"
             f"sys.argv = [{str(REPO / 'launch' / 'pretrain.py')!r}, 'train.stpes=3']\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    heavy = ('deepspeed', 'megaseek.model.decoder', 'megaseek.train.job')\n"
             "    mods = [m for m in heavy if m in sys.modules]\n"
             "    print('EXIT', e.code, mods)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=env, check=False)
    assert "EXIT 2 []" in r.stdout, (r.stdout, r.stderr)
    assert "config error: unknown key train.stpes (did you mean train.steps?)" in r.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/, runs/ or logs
    # the script itself, as a user runs it
    r = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "train.stpes=3"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=env, check=False)
    assert r.returncode == 2 and "did you mean train.steps?" in r.stderr, r.stderr


def test_launch_check_passes_group_paths_and_refuses_a_top_level_typo(capsys):
    """Group selections (`model=small`, `hydra/launcher=submitit_slurm`) and hydra.* pass to Hydra untouched;
    a misspelt top-level key (`seeed=3`) exits 2 naming `seed`."""
    from megaseek.config.launch import refuse_unknown_overrides
    refuse_unknown_overrides(["-m", "model=small", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2",
                              "++hydra.job.env_set.RANK=0", "train.steps=3", "seed=1"])
    with pytest.raises(SystemExit) as e:
        refuse_unknown_overrides(["hydra/launcher=submitit_slurm", "seeed=3"])
    assert e.value.code == 2
    assert "unknown key seeed (did you mean seed?)" in capsys.readouterr().err


# --- CheckpointManager: save / load round trip on a real DeepSpeed engine ----------------------------------

CK_CFG = SMALL_MODEL + ["model.num_layers=2", "zero.stage=0", "precision=fp32", "train.micro_batch_size=2",
                        "train.global_batch_size=2", "train.seq_len=16", "train.steps=4",
                        "optimizer.warmup_steps=0"]


def _engine(cfg, seed):
    from megaseek.config.schema import validate
    from megaseek.distributed.groups import ParallelGroups
    from megaseek.distributed.topology import Topology
    from megaseek.engine.build import build_engine
    from megaseek.engine.stage import build_stage
    layout = validate(cfg, 1, has_cuda=False)
    groups = ParallelGroups.build(Topology(tp=1, pp=1, dp=1))
    stage = build_stage(ModelConfig.from_dict(dict(cfg.model)), groups, seed=seed, sequence_parallel=False,
                        checkpointing="none", partition_method="parameters")
    engine, _, _, _ = build_engine(stage.model, cfg, layout, groups)
    return engine, stage, groups, layout


def _snapshot(engine) -> dict:
    from megaseek.ckpt.state import base_optimizer
    opt = base_optimizer(engine)
    out = {}
    for n, p in engine.module.named_parameters():
        st = opt.state[p]
        out[n] = (p.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone())
    return out


def _ckpt_worker(rank, world, run_dir):
    from megaseek.ckpt import checkpoint as Cf
    from megaseek.ckpt.manager import CheckpointManager
    from megaseek.ckpt.state import adam_step, base_optimizer, canonical_names
    from megaseek.distributed.env import init_distributed
    from megaseek.engine.step import StepRunner
    from megaseek.tasks.pretrain import NextTokenObjective
    init_distributed(timeout_s=120)
    cfg = compose(CK_CFG)
    engine, stage, groups, _ = _engine(cfg, seed=1)
    runner = StepRunner(engine, stage, groups, NextTokenObjective(), micro_batch=2, seq_len=16, zero_stage=0,
                        device="cpu")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # three real steps: weights and Adam moments away from their initial values
        ids = torch.randint(0, 1001, (2, 17), generator=g)
        runner.train_step([{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}])
    mcfg = ModelConfig.from_dict(dict(cfg.model))
    man = CheckpointManager(Path(run_dir), engine, groups, mcfg, None, rng_tracker=stage.rng, log=lambda *a: None)
    before = _snapshot(engine)
    path = man.save(3, {"step": 3, "adam_step": man.optimizer_step_count(), "note": "round trip"})
    files = sorted(p.name for p in path.iterdir())
    latest = (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
    manifest = Cf.read_manifest(path)

    fresh, fstage, _, _ = _engine(cfg, seed=99)  # other weights, empty Adam state
    fman = CheckpointManager(Path(run_dir), fresh, groups, mcfg, None, rng_tracker=fstage.rng, log=lambda *a: None)
    differs_before = any(not torch.equal(p, before[n][0]) for n, p in fresh.module.named_parameters())
    state = fman.load(fman.newest())
    after = _snapshot(fresh)
    equal = {n: all(torch.equal(a, b) for a, b in zip(before[n], after[n])) for n in before}
    moments_nonzero = all(float(before[n][1].abs().sum()) > 0 and float(before[n][2].abs().sum()) > 0 for n in before)

    # a checkpoint that lacks a tensor this model holds: the error names it
    missing = "layers.1.attn.q_proj.weight"
    (path / "manifest.json").write_text(json.dumps({**manifest, "tensors": {
        k: v for k, v in manifest["tensors"].items() if k != missing}}))
    try:
        fman.load(path)
        err = None
    except ValueError as e:
        err = str(e)
    return {"files": files, "latest": latest, "manifest_tensors": sorted(manifest["tensors"]),
            "names": sorted(canonical_names(engine.module)), "differs_before": differs_before, "equal": equal, "state": state,
            "adam_step": adam_step(base_optimizer(fresh)), "moments_nonzero": moments_nonzero, "err": err,
            "path": str(path)}


def test_checkpoint_manager_round_trip_bitwise(tmp_path):
    """1-process world, real DeepSpeed engine (ZeRO-0, fp32), 3 steps, save; a fresh engine (other seed) loads:
    weights and both Adam moments bitwise equal, the Adam step restored; `latest` and the manifest written;
    a missing tensor is named in the error."""
    r = run_world(1, _ckpt_worker, str(tmp_path), timeout=300)[0]
    assert r["latest"] == "global_step3" and r["path"].endswith("global_step3")
    assert {"manifest.json", "state.json", "weights-stage0.safetensors", "optim-stage0.safetensors",
            "rng-rank0.safetensors"} <= set(r["files"]), r["files"]
    assert r["manifest_tensors"] == r["names"] and len(r["names"]) == 2 + 1 + 2 * 9
    assert r["differs_before"] and r["moments_nonzero"]  # the round trip has something to prove
    assert all(r["equal"].values()), [n for n, ok in r["equal"].items() if not ok]
    assert r["state"]["note"] == "round trip" and r["state"]["adam_step"] == 3 and r["adam_step"] == 3
    assert r["err"] is not None and "has no tensor layers.1.attn.q_proj.weight" in r["err"], r["err"]
