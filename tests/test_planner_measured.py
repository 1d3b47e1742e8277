"""The memory model against measurement on CPU.

Activations: the bytes autograd saves for backward in a real forward of megaseek's Decoder (every tensor
passed to saved_tensors_hooks, counted once per storage) equal the planner's per-layer formula, at tensor
degree 1 and 2 (with and without sequence parallelism), fp32 and bf16, for the three checkpointing modes.

Whole runs: the peak resident set (VmHWM) of real `pretrain()` runs of the tiny and the ~100M `small`
model at several layouts and ZeRO stages, one fresh process per rank and measurement, up to the end of the
last optimizer step, agrees with the planner's peak within 15%. (The final checkpoint save comes after; on
a GPU it stages through host memory, so it is not part of the device-memory estimate. Its own peak is
printed as whole_run_peak_MiB.) The planner's `runtime` term is measured, not assumed: the peak RSS of the same
run with a negligible model (0.2M parameters) — torch, DeepSpeed, gloo, the data loader and the monitor.
glibc's malloc is told to return freed blocks above 64 KiB to the system (MALLOC_MMAP_THRESHOLD_), so RSS
follows live tensors as a GPU's allocated memory does, rather than glibc's cached free lists.
"""
import json
import resource

import pytest

from tests.helpers import SMALL_DATA, SMALL_MODEL, compose, run_world

MiB = 2 ** 20


# --- activations: saved tensors of a real forward ---

def _saved_bytes(rank, world, precision, mode, sp, b, s):
    import torch

    from megaseek.distributed.groups import ParallelGroups
    from megaseek.distributed.topology import Topology
    from megaseek.tensor_parallel.layers import TPContext
    from megaseek.model.config import ModelConfig
    from megaseek.model.decoder import Decoder
    from tests.helpers import init_gloo
    m = ModelConfig(name="t", vocab_size=1000, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                    intermediate_size=352, max_seq_len=128)
    ctx = TPContext()
    if world > 1:
        init_gloo(rank, world)
        ctx = TPContext.from_axis(ParallelGroups.build(Topology(tp=world, pp=1, dp=1)).tp, sp)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = Decoder(m, ctx, seed=1, checkpointing=mode).to(dtype)
    ids = torch.randint(0, m.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(model(ids), ids)
    return sum(seen.values()), m


def _planned_saved(m, precision, mode, tp, sp, b, s):
    from megaseek.planner.memory import activation_bytes, stage_params
    from megaseek.planner.setup import Setup
    st = Setup(model=m, tp=tp, micro_batch=b, global_batch=b, seq_len=s, precision=precision,
               checkpointing=mode, sequence_parallel=sp)
    return activation_bytes(st, stage_params(m, tp, 1)[0])["saved_after_forward"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_activation_model_equals_saved_tensors(precision, mode):
    got, m = _saved_bytes(0, 1, precision, mode, False, 2, 64)
    want = _planned_saved(m, precision, mode, 1, False, 2, 64)
    assert abs(want - got) / got < 0.01, (want, got)


def _saved_tp(rank, world, cases):
    return [_saved_bytes(rank, world, *c)[0] for c in cases]


def test_activation_model_equals_saved_tensors_tensor_parallel():
    cases = [("fp32", "none", False, 2, 64), ("fp32", "none", True, 2, 64), ("bf16", "selective", True, 2, 64)]
    got = run_world(2, _saved_tp, cases)
    _, m = _saved_bytes(0, 1, "fp32", "none", False, 1, 8)
    for i, (prec, mode, sp, b, s) in enumerate(cases):
        want = _planned_saved(m, prec, mode, 2, sp, b, s)
        for r in range(2):
            assert abs(want - got[r][i]) / got[r][i] < 0.01, (cases[i], r, want, got[r][i])


# --- whole runs: peak RSS ---

COMMON = SMALL_DATA + ["data.tokenizer.vocab_size=1001", "train.steps=2", "train.sample_tokens=0", "logging.wandb.mode=disabled",
                       "logging.progress=false", "train.save_interval=100000", "train.log_interval=1"]
RUNS = {  # name: (world, overrides)
    "base-w1": (1, SMALL_MODEL + ["zero.stage=1", "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4"]),
    "base-w2": (2, SMALL_MODEL + ["zero.stage=1", "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4"]),
    "tiny z0, mb 8 x seq 256": (1, ["model=tiny", "zero.stage=0", "train.seq_len=256", "train.micro_batch_size=8",
                                    "train.global_batch_size=8"]),
    "small dp2 z1": (2, ["model=small", "zero.stage=1", "train.seq_len=32", "train.micro_batch_size=2",
                         "train.global_batch_size=4"]),
    "small dp2 z3": (2, ["model=small", "zero.stage=3", "train.seq_len=32", "train.micro_batch_size=2",
                         "train.global_batch_size=4"]),
    "small tp2 sp z1": (2, ["model=small", "zero.stage=1", "parallel.tp=2", "parallel.sequence_parallel=true",
                            "train.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=4"]),
}


def _vm_hwm() -> int:
    """The process's peak resident set so far (bytes)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss(rank, world, overrides):
    """Peak RSS up to the end of the last optimizer step (the training step the planner models), and of
    the whole run (which also holds the final checkpoint save)."""
    import deepspeed.runtime.engine as E

    from megaseek.train.job import pretrain
    after_step = []
    step = E.DeepSpeedEngine.step

    def recorded(self, *a, **kw):
        out = step(self, *a, **kw)
        after_step.append(_vm_hwm())
        return out
    E.DeepSpeedEngine.step = recorded
    pretrain(compose(overrides))
    return {"train": max(after_step), "run": _vm_hwm()}


def _estimate(overrides, world, runtime, what="peak"):
    from megaseek.planner import Hardware, Setup, estimate_memory
    cfg = compose(overrides)
    mem = estimate_memory(Setup.from_config(cfg, world), Hardware.from_config(cfg), runtime_bytes=runtime)
    if what == "save":  # the final checkpoint: resident weights and optimizer states + the gathered full state
        return runtime + mem.parameters + mem.optimizer + mem.checkpoint_host
    return mem.peak


@pytest.mark.slow
def test_peak_rss_of_real_runs_agrees_with_the_estimate(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned ranks
    measured = {}
    for name, (world, ov) in RUNS.items():
        overrides = COMMON + ov + [f"data.root={data_root}", f"run_dir={tmp_path / ''.join(c if c.isalnum() else '_' for c in name)}"]
        measured[name] = (world, overrides, run_world(world, _peak_rss, overrides))
    # runtime per rank = the negligible model's peak RSS less its own (estimated, ~3 MB) model memory
    runtime = {}
    for w in (1, 2):
        _, ov, rss = measured[f"base-w{w}"]
        runtime[w] = [r["train"] - _estimate(ov, w, 0.0) for r in rss]
    rows, worst = [], 0.0
    for name, (world, ov, rss) in measured.items():
        if name.startswith("base"):
            continue
        for rank, r in enumerate(rss):
            got = r["train"]
            est = _estimate(ov, world, runtime[world][rank])
            err = (est - got) / got
            worst = max(worst, abs(err))
            rows.append({"run": name, "rank": rank, "measured_MiB": round(got / MiB), "estimate_MiB": round(est / MiB),
                         "runtime_MiB": round(runtime[world][rank] / MiB), "error_pct": round(100 * err, 1),
                         "model_part_error_pct": round(100 * (est - got) / (got - runtime[world][rank]), 1),
                         "whole_run_peak_MiB": round(r["run"] / MiB),
                         "checkpoint_save_estimate_MiB": round(_estimate(ov, world, runtime[world][rank], "save") / MiB)})
    print("\n" + "\n".join(json.dumps(r) for r in rows))
    assert all(300 * MiB < r < 1500 * MiB for w in runtime for r in runtime[w]), runtime
    assert worst < 0.15, rows
