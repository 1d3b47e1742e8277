"""Expert parallelism (issue 12 part B): in one 2-rank gloo world, DeepSpeed engines at ZeRO-1/2 with the
experts sharded over ep=2 data-parallel ranks (all-to-all dispatch) equal ep=1 (experts replicated) over 5
steps of 2 accumulated micro-batches: losses, gradient norms, final parameters (expert params gathered from
their owners), global expert loads and the aux-loss-free bias vectors, within 1e-5. Stress: a bias that sends
every token to rank 0's experts (rank 1's get none, zero-size all-to-all splits) under a 60 s gloo timeout: no
hang, equal to ep=1. Layout refusals.

In one 4-rank launch (MLA + MoE on both layers): ep=4, (ep=2, tp=2), (ep=2, pp=2: one MoE layer per stage) and
(ep=2, tp=2) with the sequence-wise balance loss, each equal to one process over 5 steps within 1e-5: losses,
gradient norms, every final parameter (full tensors gathered over tp, ZeRO and ep), expert loads and biases."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import compose, run_world

TOL = 1e-5
STEPS = 5
MOE = ["model.vocab_size=1001", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
       "model.num_kv_heads=2", "model.intermediate_size=96", "model.max_seq_len=32", "model.mlp=moe",
       "model.n_routed_experts=8", "model.num_experts_per_tok=2", "model.moe_intermediate_size=32",
       "model.n_group=4", "model.topk_group=2", "model.init_std=0.1", "precision=fp32",
       "train.micro_batch_size=2", "train.global_batch_size=8", "train.seq_len=16", "train.steps=5",
       "optimizer.warmup_steps=0", "optimizer.lr=0.001",
       "optimizer.eps=1e-6"]  # Adam eps: gradient entries that are rounding noise (~1e-10) stay noise-sized
# name -> (ep, zero stage, extra overrides, stressed)
CASES = {"ep1": (1, 1, ["model.bias_update_rate=0.01"], False),
         "ep2": (2, 1, ["model.bias_update_rate=0.01"], False),
         "ep2_zero2": (2, 2, ["model.bias_update_rate=0.01"], False),
         "stress_ep1": (1, 1, ["model.bias_update_rate=0.0"], True),
         "stress_ep2": (2, 1, ["model.bias_update_rate=0.0"], True)}


def _batches(step: int, dp_rank: int) -> list[dict]:
    """Global batch `step` (8 sequences, the same at every layout): this data-parallel rank's 2 micro-batches."""
    ids = torch.randint(0, 1001, (8, 17), generator=torch.Generator().manual_seed(100 + step))
    mine = ids[4 * dp_rank:4 * dp_rank + 4]
    return [{"input_ids": mine[i:i + 2, :-1], "labels": mine[i:i + 2, 1:]} for i in (0, 2)]


def _run_case(rank: int, ep: int, zero: int, extra: list, stressed: bool) -> dict:
    from megaseek.config.schema import validate
    from megaseek.distributed.groups import ParallelGroups
    from megaseek.distributed.topology import Topology
    from megaseek.engine.build import build_engine
    from megaseek.engine.stage import build_stage
    from megaseek.engine.step import StepRunner
    from megaseek.model.config import ModelConfig
    from megaseek.model.moe.balance import end_of_global_batch, moe_layers
    from megaseek.tasks.pretrain import NextTokenObjective
    cfg = compose(MOE + extra + [f"parallel.ep={ep}", f"zero.stage={zero}"])
    layout = validate(cfg, 2, has_cuda=False)
    groups = ParallelGroups.build(Topology(tp=1, pp=1, dp=2, ep=ep))
    stage = build_stage(ModelConfig.from_dict(dict(cfg.model)), groups, seed=7, sequence_parallel=False,
                        checkpointing="none", partition_method="parameters")
    layers = moe_layers(stage.model)
    if stressed:  # rank 0 holds experts 0-3 at ep=2: every token goes there (top-2 of groups 0, 1)
        for m in layers:
            with torch.no_grad():
                m.gate.e_score_correction_bias[:4] = 1.0  # > any sigmoid score: experts 0-3 always win
    engine, _, _, _ = build_engine(stage.model, cfg, layout, groups)
    runner = StepRunner(engine, stage, groups, NextTokenObjective(), micro_batch=2, seq_len=16, zero_stage=zero,
                        device="cpu")
    rec = {"loss": [], "grad_norm": [], "loads": [], "bias": [], "max_load": []}
    for step in range(STEPS):
        out = runner.train_step(_batches(step, groups.dp.rank))
        bal = end_of_global_batch(engine.module, groups.dp.group)
        rec["loss"].append(out["loss"])
        rec["grad_norm"].append(out["grad_norm"])
        rec["max_load"].append(bal["moe/max_load"])
        rec["loads"].append(torch.stack([m.last_load for m in layers]))
        rec["bias"].append(torch.stack([m.gate.e_score_correction_bias.clone() for m in layers]))
    rec["params"] = {n: t.detach().clone() for n, t in engine.module.state_dict().items()}  # per-expert names
    rec["experts_here"] = sorted({int(n.split(".")[4]) for n in rec["params"] if ".mlp.experts." in n})
    rec["expert_groups"] = [g.get("name") for g in engine.optimizer.optimizer.param_groups if g.get("moe")] \
        if hasattr(engine.optimizer, "optimizer") else []
    return rec


def _world(rank, world):
    from megaseek.distributed.env import init_distributed
    init_distributed(timeout_s=60)  # a rank missing a collective makes the other raise within 60 s
    return _plain({name: _run_case(rank, *spec) for name, spec in CASES.items()})


def _plain(x):
    """Tensors -> numpy (tensors passed through the result queue would share memory with a dead process)."""
    if torch.is_tensor(x):
        return x.numpy().copy()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _tensors(x):
    import numpy as np
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, dict):
        return {k: _tensors(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_tensors(v) for v in x]
    return x


@pytest.fixture(scope="module")
def results():
    return _tensors(run_world(2, _world, timeout=900))


def _merged(results, case) -> dict:
    """Parameters of the whole model: every rank's, checking the replicated ones agree across ranks."""
    out = {}
    for r in results:
        for n, p in r[case]["params"].items():
            if n in out:
                assert torch.equal(out[n], p), (case, n)
            out[n] = p
    return out


def _compare(results, a: str, b: str) -> dict:
    ra, rb = results[0][a], results[0][b]
    diffs = {"loss": max(abs(x - y) for x, y in zip(ra["loss"], rb["loss"])),
             "grad_norm": max(abs(x - y) for x, y in zip(ra["grad_norm"], rb["grad_norm"])),
             "loads": max(float((x - y).abs().max()) for x, y in zip(ra["loads"], rb["loads"])),
             "bias": max(float((x - y).abs().max()) for r in results
                         for x, y in zip(r[a]["bias"], r[b]["bias"]))}
    pa, pb = _merged(results, a), _merged(results, b)
    assert pa.keys() == pb.keys()
    worst = max(pa, key=lambda n: float((pa[n] - pb[n]).abs().max()))
    diffs["params"] = float((pa[worst] - pb[worst]).abs().max())
    return diffs, worst


def test_ep2_equals_ep1_at_zero1_and_zero2(results):
    r0, r1 = results[0], results[1]
    assert r0["ep2"]["experts_here"] == [0, 1, 2, 3] and r1["ep2"]["experts_here"] == [4, 5, 6, 7]
    assert r0["ep1"]["experts_here"] == list(range(8))
    assert r0["ep2"]["expert_groups"] == ["ep_size_2"]  # the experts' own param group (all 2-D: decayed)
    for case in ("ep2", "ep2_zero2"):
        d, worst = _compare(results, "ep1", case)
        assert all(v < TOL for v in d.values()), (case, d, worst)
    ep1 = r0["ep1"]
    assert ep1["loss"][-1] < ep1["loss"][0]  # it trains
    assert float((ep1["bias"][-1]).abs().sum()) > 0  # the biases moved (and equally at ep=2, above)
    assert any(float((x - y).abs().max()) > 0 for x, y in zip(ep1["loads"], ep1["loads"][1:]))


def test_all_tokens_to_one_ranks_experts(results):
    st = results[0]["stress_ep2"]
    for loads in st["loads"]:
        assert float(loads[:, 4:].sum()) == 0.0 and float(loads[:, :4].sum()) == 2 * 8 * 16 * 2  # 2 layers
    d, worst = _compare(results, "stress_ep1", "stress_ep2")
    assert all(v < TOL for v in d.values()), (d, worst)
    assert min(st["max_load"]) >= 2.0  # half the experts idle: max/mean load at least 2


def test_topology_expert_groups():
    """ep carved out of dp: (pp=1, dp=4, tp=2, ep=2) -> ep groups of consecutive dp ranks at the same tp rank,
    edp groups holding the same experts; every rank in exactly one of each."""
    from megaseek.distributed.topology import Topology
    t = Topology(tp=2, pp=1, dp=4, ep=2)
    assert t.ep_groups() == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert t.edp_groups() == [[0, 4], [2, 6], [1, 5], [3, 7]]
    for groups in (t.ep_groups(), t.edp_groups()):
        assert sorted(r for g in groups for r in g) == list(range(8))
    with pytest.raises(ValueError, match="parallel.ep=3 must divide"):
        Topology(dp=4, ep=3)


def test_expert_parallel_layout_refusals():
    from megaseek.config.schema import ConfigError, validate
    for over, world, needle in ((["parallel.ep=3"], 2, "parallel.ep=3 must be >= 1 and divide"),
                                (["parallel.ep=2", "model.mlp=swiglu"], 2, "needs an MoE model"),
                                (["parallel.ep=2", "zero.stage=3"], 2, "zero.stage=3"),
                                (["parallel.ep=2", "zero.stage=0"], 2, "zero.stage=0"),
                                (["parallel.pp=2", "model.balance=seq_aux"], 2, "model.balance=seq_aux with")):
        with pytest.raises(ConfigError, match=needle):
            validate(compose(MOE + over), world, has_cuda=False)


# --- the remaining layouts, in one 4-rank launch, against one process ---------------------------------------
# MoE on both layers (first_k_dense_replace=0), so (ep=2, pp=2) has an MoE layer on each stage.
MLA = ["model.attention=mla", "model.num_kv_heads=4", "model.q_lora_rank=24", "model.kv_lora_rank=16",
       "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=16"]  # (canonical names: MLA+MoE)
# name -> (tp, pp, ep, balance); dp = 4 / (tp pp). The sequence-wise balance loss under tp (ep2_tp2_seq) checks
# its gradient is counted once (megaseek/model/moe/layer.py: partial sums inside the tensor-parallel region).
LAYOUTS = {"ep4": (1, 1, 4, "aux_free"), "ep2_tp2": (2, 1, 2, "aux_free"), "ep2_pp2": (1, 2, 2, "aux_free"),
           "ep2_tp2_seq": (2, 1, 2, "seq_aux")}
REFS = {"aux_free": (1, 1, 1, "aux_free"), "seq_aux": (1, 1, 1, "seq_aux")}


def _layout_batches(step: int, dp: int, dp_rank: int) -> list[dict]:
    """Global batch `step` (8 sequences, layout-free): this data-parallel rank's micro-batches of 2."""
    ids = torch.randint(0, 1001, (8, 17), generator=torch.Generator().manual_seed(100 + step))
    per = 8 // dp
    mine = ids[per * dp_rank:per * (dp_rank + 1)]
    return [{"input_ids": mine[i:i + 2, :-1], "labels": mine[i:i + 2, 1:]} for i in range(0, per, 2)]


def _run_layout(world: int, tp: int, pp: int, ep: int, balance: str) -> dict:
    """5 ZeRO-1 steps at (tp, pp, ep) in a world of `world` ranks; the full canonical parameters of this rank's
    stage (gathered over tp, ZeRO and ep: megaseek/ckpt/state.py), loads and biases by global layer."""
    from megaseek.ckpt.state import iter_full_state
    from megaseek.config.schema import validate
    from megaseek.distributed.groups import ParallelGroups
    from megaseek.distributed.topology import Topology
    from megaseek.engine.build import build_engine
    from megaseek.engine.stage import build_stage
    from megaseek.engine.step import StepRunner
    from megaseek.model.config import ModelConfig
    from megaseek.model.moe.balance import end_of_global_batch, moe_layers
    from megaseek.tasks.pretrain import NextTokenObjective
    cfg = compose(MOE + MLA + ["model.bias_update_rate=0.01", f"model.balance={balance}", "model.aux_loss_coef=0.1",
                               f"parallel.tp={tp}", f"parallel.pp={pp}",
                         f"parallel.ep={ep}", "zero.stage=1"])
    layout = validate(cfg, world, has_cuda=False)
    groups = ParallelGroups.build(Topology(tp=tp, pp=pp, dp=layout.dp, ep=ep))
    stage = build_stage(ModelConfig.from_dict(dict(cfg.model)), groups, seed=7, sequence_parallel=False,
                        checkpointing="none", partition_method="parameters")
    layers = moe_layers(stage.model)
    engine, _, _, _ = build_engine(stage.model, cfg, layout, groups)
    runner = StepRunner(engine, stage, groups, NextTokenObjective(), micro_batch=2, seq_len=16, zero_stage=1,
                        device="cpu")
    rec = {"loss": [], "grad_norm": [], "loads": {}, "bias": {}}
    for step in range(STEPS):
        out = runner.train_step(_layout_batches(step, layout.dp, groups.dp.rank))
        end_of_global_batch(engine.module, groups.dp.group)
        rec["loss"].append(out["loss"])
        rec["grad_norm"].append(out["grad_norm"])
        for m in layers:
            rec["loads"].setdefault(m.layer, []).append(m.last_load.clone())
            rec["bias"].setdefault(m.layer, []).append(m.gate.e_score_correction_bias.clone())
    rec["params"] = {n: full["fp32"] for n, full in iter_full_state(engine, engine.module, groups,
                                                                     [stage.tied_copy] if stage.tied_copy is not None
                                                                     else [])}
    rec["moe_layers_here"] = sorted(m.layer for m in layers)
    return rec


def _layout_world(rank, world, cases):
    from megaseek.distributed.env import init_distributed
    init_distributed(timeout_s=120)
    return _plain({name: _run_layout(world, *spec) for name, spec in cases.items()})


@pytest.fixture(scope="module")
def layouts():
    refs = _tensors(run_world(1, _layout_world, REFS, timeout=600))[0]
    return refs, _tensors(run_world(4, _layout_world, LAYOUTS, timeout=900))


def _layout_diffs(ref: dict, ranks: list, case: str) -> dict:
    """Max abs difference to the one-process run: losses, grad norms, every parameter (each held by some
    rank; copies on several ranks must agree bitwise), and each MoE layer's loads and bias vectors."""
    got = {}
    for r in ranks:
        for n, p in r[case]["params"].items():
            if n in got:
                assert torch.equal(got[n], p), (case, n)
            got[n] = p
    assert got.keys() == ref["params"].keys(), (case, sorted(set(got) ^ set(ref["params"]))[:5])
    d = {"loss": max(abs(a - b) for a, b in zip(ranks[0][case]["loss"], ref["loss"])),
         "grad_norm": max(abs(a - b) for a, b in zip(ranks[0][case]["grad_norm"], ref["grad_norm"])),
         "params": max(float((got[n] - ref["params"][n]).abs().max()) for n in got)}
    for key in ("loads", "bias"):
        d[key] = 0.0
        seen = set()
        for r in ranks:
            for layer, series in r[case][key].items():
                seen.add(layer)
                d[key] = max([d[key]] + [float((x - y).abs().max()) for x, y in zip(series, ref[key][layer])])
        assert seen == set(ref[key]), (case, key, seen)
    return d


@pytest.mark.slow
def test_ep4_ep2tp2_ep2pp2_equal_one_process(layouts):
    refs, ranks = layouts
    ref = refs["aux_free"]
    assert ref["loss"][-1] < ref["loss"][0] and float(ref["bias"][1][-1].abs().sum()) > 0
    assert ranks[0]["ep2_pp2"]["moe_layers_here"] == [0] and ranks[3]["ep2_pp2"]["moe_layers_here"] == [1]
    for case, spec in LAYOUTS.items():
        d = _layout_diffs(refs[spec[3]], ranks, case)
        assert all(v < TOL for v in d.values()), (case, d)
