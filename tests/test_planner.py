"""The planner: every cluster preset composes and plans; memory, communication and time against hand
computation and published figures; the refusal before any rank starts; the NCCL export."""
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from megaseek.config.schema import ConfigError
from megaseek.model.config import ModelConfig
from megaseek.model.flops import param_counts
from megaseek.planner import Hardware, Setup, make_plan
from megaseek.planner.comm import estimate_comm
from megaseek.planner.memory import (activation_bytes, layer_activation_bytes, model_states, padded_vocab,
                                     stage_params)
from megaseek.planner.preflight import export_nccl, preflight
from tests.helpers import REPO, compose

PRESETS = sorted(p.stem for p in (REPO / "conf" / "cluster").glob("*.yaml"))
GPU_PRESETS = [p for p in PRESETS if p != "local_cpu"]


def test_the_issue_presets_exist():
    assert {"local_cpu", "8xA100", "64xA100", "512xA100", "2048xV100", "8xH100"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_and_its_default_layout_plans_and_fits(name):
    cfg = compose([f"+cluster={name}"])
    hw = Hardware.from_config(cfg)
    assert cfg.cluster.name == name and hw.name == name
    world = hw.world_size
    assert world == cfg.cluster.nodes * max(1, cfg.cluster.gpus_per_node)
    plan = make_plan(Setup.from_config(cfg, world), hw, world)
    assert plan.ok, plan.problems                       # divides the world and fits the GPU
    mem = plan.memory
    assert mem.parameters > 0 and mem.gradients > 0 and mem.optimizer > 0 and mem.activations > 0
    parts = mem.parameters + mem.gradients + mem.optimizer + mem.activations + mem.buffers + mem.runtime
    assert parts == pytest.approx(mem.peak)
    if hw.is_gpu:
        assert mem.peak <= hw.memory_gb * 1e9
        t = plan.timing
        assert t is not None and 0.05 < t.mfu < 0.75 and t.tokens_per_s > 0 and 0 <= t.bubble < 0.5
        assert cfg.precision.name == ("fp16" if "V100" in hw.gpu else "bf16")  # V100 has no bf16
        assert {"NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_ALGO", "NCCL_DEBUG"} <= set(hw.nccl)


def test_zero_model_states_equal_the_zero_paper_figure_1():
    """Rajbhandari et al. 2019, Fig. 1: 7.5B parameters, Adam (K = 12), mixed precision, Nd = 64:
    baseline 120 GB, P_os 31.4 GB, P_os+g 16.6 GB, P_os+g+p 1.9 GB per device."""
    published = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in published.items():
        s = model_states(7.5e9, 64, 2, stage)
        assert (s["parameters"] + s["gradients"] + s["optimizer"]) / 1e9 == pytest.approx(gb, abs=0.05)
    off = model_states(7.5e9, 64, 2, 3, offload_optimizer=True, offload_param=True)
    # offloaded: fp32 master + moments (12) + fp32 gradient partition (4) + 16-bit parameter partition (2)
    assert off["parameters"] == off["optimizer"] == off["gradients"] == 0
    assert off["host"] == pytest.approx(18 * 7.5e9 / 64)


def _megatron_175b(extra=()):
    """Megatron-LM's GPT-3 175B run (Narayanan et al. 2021, Table 1): tp 8, pp 8, 1024 A100, batch 1536,
    seq 2048, full activation recomputation."""
    cfg = compose(["+cluster=512xA100", "model=gpt3_175b", "parallel.tp=8", "parallel.pp=8",
                   "parallel.sequence_parallel=false", "train.global_batch_size=1536", "train.micro_batch_size=1",
                   "train.seq_len=2048", "train.activation_checkpointing=full", *extra])
    hw = replace(Hardware.from_config(cfg), nodes=128)
    return make_plan(Setup.from_config(cfg, 1024), hw, 1024)


def test_gpt3_175b_against_published_figures():
    plan = _megatron_175b()
    m = plan.setup.model
    # parameters: Megatron's 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h)) = 174.6B ("175B"), less the 25M
    # learned position embeddings this RoPE model does not have
    l, h, V, s = 96, 12288, 51200, 2048
    megatron = 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))
    assert param_counts(m)["total"] == pytest.approx(megatron - s * h, rel=1e-4)
    # activations with full recomputation: 2 s b h bytes per layer (Korthikanti et al. 2022, sec. 4), and the
    # first of 8 stages holds 8 micro-batches of its 12 layers: 2 s b h L = 4.83 GB
    act = plan.memory.detail["activation"]
    assert (act["layers"], act["in_flight"]) == (12, 8)
    assert act["layers_total"] == 2 * s * 1 * h * l
    # throughput: published 153 TFLOP/s per GPU (49% of peak), with recomputation counted
    t = plan.timing
    tflops = t.hfu * 312
    assert tflops == pytest.approx(153, rel=0.1), tflops
    # Megatron's per-iteration FLOPs 96 B s l h^2 (1 + s/6h + V/16lh) at 153 TFLOP/s: 28.8 s per step
    F = 96 * 1536 * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    assert t.step_s == pytest.approx(F / (1024 * 153e12), rel=0.1)
    assert plan.memory.fits and plan.memory.peak < 40e9
    assert t.bubble == pytest.approx(7 / (96 + 7))  # 1F1B: (p - 1) / (m + p - 1), m = 1536 / 16


def test_activation_bytes_by_hand():
    """h 1024, i 2816, 16 heads of 64, 4 kv heads; b 2, s 512 (T = 1024); bf16 (a = 2); tensor degree 2."""
    m = ModelConfig(name="t", vocab_size=32000, hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4,
                    intermediate_size=2816, max_seq_len=512, fused=False)
    T, h, i = 1024, 1024, 2816
    got = layer_activation_bytes(m, 2, 512, 2, False, 2)
    # model.fused: v is a view of the qkv output, which stays saved whole: + (8 q + 2 kv heads) x 64 per token
    fused = layer_activation_bytes(replace(m, fused=True), 2, 512, 2, False, 2)
    assert fused["attn"] - got["attn"] == 2 * T * (512 + 128)
    norm = (4 + 2 * 2) * T * h + 4 * T                       # fp32 input copy + x/rms + scaled output, rms
    attn = 2 * T * (2 * 512 + 2 * 128) + 4 * 2 * 8 * 512       # q, out (8 heads x 64), k, v (2 kv heads), lse
    mlp = 4 * 2 * T * i // 2
    assert got["none"] == 2 * norm + attn + mlp == 2 * 8_392_704 + 2_654_208 + 11_534_336 == 30_973_952
    assert got["full"] == 2 * T * h
    assert got["selective"] == 2 * T * h + norm + mlp
    sp = layer_activation_bytes(m, 2, 512, 2, True, 2)
    assert sp["norm"] == (4 + 2) * T * h // 2 + 4 * T // 2 + 2 * T * h  # sharded norm + all-gathered output
    assert sp["full"] == 2 * T * h // 2
    # the model: 8 layers, no pipeline -> one micro-batch in flight, plus the loss workspace (4 + a) T V/t
    st = Setup(model=m, tp=2, micro_batch=2, global_batch=2, seq_len=512, precision="bf16")
    act = activation_bytes(st, stage_params(m, 2, 1)[0])
    assert padded_vocab(m, 2) == 32000
    assert act["total"] == 8 * got["none"] + norm + 6 * T * 32000 // 2
    # model.fused (eager): the gate/up output (2 i), its gate half's contiguous copy, silu and the product: 5 i
    assert layer_activation_bytes(replace(m, fused=True), 2, 512, 2, False, 2)["mlp"] == 5 * 2 * T * i // 2
    # 1F1B: stage 0 of 4 holds min(4, m) micro-batches, the last stage one
    st4 = st.with_(pp=4, global_batch=16)
    first, last = stage_params(m, 2, 4)[0], stage_params(m, 2, 4)[-1]
    assert activation_bytes(st4, first)["in_flight"] == 4 and activation_bytes(st4, last)["in_flight"] == 1


def test_memory_by_hand_zero_stages_and_buckets():
    m = ModelConfig(name="t", vocab_size=1024, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4,
                    intermediate_size=512, max_seq_len=64)
    N = param_counts(m)["total"]
    assert stage_params(m, 1, 1)[0].params == N
    hw = Hardware(name="gpu", gpus_per_node=8, memory_gb=1000)
    base = Setup(model=m, dp=4, micro_batch=1, global_batch=4, seq_len=64, precision="bf16")
    z1 = make_plan(base.with_(zero_stage=1), hw).memory
    assert (z1.parameters, z1.gradients, z1.optimizer) == (2 * N, 2 * N, 12 * N / 4)
    z3 = make_plan(base.with_(zero_stage=3), hw).memory
    assert (z3.parameters, z3.gradients, z3.optimizer) == (2 * N / 4, 2 * N / 4, 12 * N / 4)
    # on a GPU the reduce bucket is allocated whole (5e7 values x 2 bytes); on CPU only its written pages count
    assert z1.detail["backward_buffers"] == 2 * 5e7
    cpu = make_plan(base.with_(zero_stage=1), Hardware()).memory
    assert cpu.detail["backward_buffers"] == 2 * N
    # stage 0, fp32: the peak is the flattened all-reduce copy (4 N) or AdamW's foreach temporary (4 N)
    z0 = make_plan(base.with_(zero_stage=0, precision="fp32", dp=1, global_batch=1), Hardware()).memory
    assert z0.peak == pytest.approx(16 * N + 4 * N)


def test_comm_and_time_by_hand():
    m = ModelConfig(name="t", vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                    intermediate_size=512, max_seq_len=128)
    hw = Hardware(name="x", nodes=2, gpus_per_node=4, memory_gb=80, peak_tflops={"bf16": 100.0},
                  intra_node_busbw=100.0, inter_node_busbw=10.0, compute_efficiency=0.5)
    st = Setup(model=m, tp=2, pp=2, dp=2, micro_batch=4, global_batch=32, seq_len=128, precision="bf16",
               zero_stage=1)
    c = estimate_comm(st, hw)
    act = 2 * 4 * 128 * 256
    assert st.grad_accum == 4
    assert c.tp_bytes == 4 * (2 * 4 * act + 2 * act)         # 2 layers/stage x 4 all-reduces + embed/head
    n = max(s.params for s in stage_params(m, 2, 2))
    assert c.dp_bytes == 2 * 2 * n                              # reduce-scatter + all-gather of 2-byte values
    assert c.pp_bytes == 2 * 4 * act                            # activation + gradient per micro-batch
    assert c.tp_time == pytest.approx(2 * (1 / 2) * c.tp_bytes / 100e9)  # ring, NVLink
    assert c.dp_time == pytest.approx(c.dp_bytes / 2 / 100e9)          # dp group: ranks 0 and 2, one node
    assert hw.busbw(2, 4) == 10e9                           # p2p between nodes: one rail
    t = make_plan(st, hw).timing
    assert t.bubble == pytest.approx(1 / 5)                     # (pp - 1) / (m + pp - 1)
    from megaseek.model.flops import flops_per_token
    t_mb = flops_per_token(m, 128)["hardware"] * 4 * 128 / 4 / (100e12 * 0.5)
    assert t.compute_s == pytest.approx(5 * t_mb)


def test_busbw_rails():
    hw = Hardware(nodes=4, gpus_per_node=8, intra_node_busbw=230, inter_node_busbw=23)
    assert hw.busbw(8, 1) == 230e9                # tensor group inside a node
    assert hw.busbw(4, 8) == 23e9                 # data-parallel group with tp 8: one rail per node
    assert hw.busbw(16, 2) == 4 * 23e9            # tp 2: four members per node, four rails
    assert hw.busbw(32, 1) == 8 * 23e9            # all eight rails (below NVLink)
    assert Hardware(nodes=2, gpus_per_node=8, intra_node_busbw=100, inter_node_busbw=23).busbw(16, 1) == 100e9


def test_search_finds_fitting_layouts_and_refuses_what_does_not_fit():
    cfg = compose(["+cluster=8xA100", "model=7b", "parallel.tp=1", "zero.stage=0", "train.seq_len=4096",
                   "train.micro_batch_size=1", "train.global_batch_size=64"])
    hw = Hardware.from_config(cfg)
    plan = make_plan(Setup.from_config(cfg, 8), hw, 8)
    assert not plan.ok and "exceeds" in plan.problems[0]       # 16 bytes x 7B parameters > 80 GB
    assert plan.memory.parameters + plan.memory.gradients + plan.memory.optimizer == 16 * 7_013_142_528
    from megaseek.planner.plan import search
    best = search(Setup.from_config(cfg, 8), hw, 8, top=3)
    assert best and all(p.ok and p.memory.peak <= 80e9 for p in best)
    assert best[0].timing.tokens_per_s >= best[-1].timing.tokens_per_s


def test_preflight_refuses_with_the_numbers_and_never_refuses_tiny_on_cpu(monkeypatch):
    for k in ("NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_ALGO", "NCCL_DEBUG"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NCCL_DEBUG", "INFO")           # set by the user: kept
    logs = []
    preflight(compose([]), 1, logs.append)
    preflight(compose(["+cluster=local_cpu"]), 2, logs.append)
    assert any("estimated peak memory" in l for l in logs)
    cfg = compose(["+cluster=512xA100", "parallel.tp=1", "parallel.pp=1", "zero.stage=0",
                   "train.global_batch_size=1024"])
    with pytest.raises(ConfigError, match=r"needs an estimated \d+\.\d GB per GPU.*more than the A100-80GB's 80.0 GB"):
        preflight(cfg, 512, logs.append)
    assert os.environ["NCCL_ALGO"] == "Tree" and os.environ["NCCL_IB_DISABLE"] == "0"
    assert os.environ["NCCL_SOCKET_IFNAME"] == "^lo,docker0" and os.environ["NCCL_DEBUG"] == "INFO"
    env = {}
    assert export_nccl(compose(["+cluster=8xA100"]), env) == env and env["NCCL_IB_DISABLE"] == "1"


def _plan_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "launch" / "plan.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_plan_cli_prints_the_breakdown_and_refuses_with_exit_2():
    r = _plan_cli("+cluster=512xA100", "--top", "3")
    assert r.returncode == 0, r.stderr
    for word in ("parameters", "gradients", "optimizer", "activations", "buffers", "fits", "pipeline bubble",
                 "communication per step", "tokens/s", "MFU", "best layouts"):
        assert word in r.stdout, word
    r = _plan_cli("+cluster=8xA100", "model=large", "parallel.tp=1", "--no-search")
    assert r.returncode == 2 and "DOES NOT FIT" in r.stdout and "REFUSED" in r.stdout
    r = _plan_cli("+cluster=64xA100", "parallel.tp=3", "--no-search", "--check")
    assert r.returncode == 2 and "not divisible by" in r.stdout
    r = _plan_cli("+cluster=2048xV100", "--env")
    assert r.returncode == 0 and "export NCCL_ALGO=Tree" in r.stdout and "export NCCL_IB_DISABLE=0" in r.stdout
