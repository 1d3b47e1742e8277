"""Aux-loss-free balancing on the default corpus (issue 12, "What must be shown"): one small MoE decoder (16 routed
experts, top-2, one shared expert; a dense first layer and one MoE layer, first_k_dense_replace=1 as DeepSeek and
moe_tiny have it; the default init std 0.02) trained through the real job for 200 steps twice, with model.bias_update_rate=1e-2 (balance=aux_free) and with balance=none. The max/mean expert
load over the 50-step window 151-200 (each expert's assignments summed over the window, the global loads the
ExpertBalance callback computes and leaves in `last_load`) is <= 1.3 with the bias, while the unbalanced run
stays >= 5: without the bias the router collapses on its own (a few experts take most tokens; 128 tokens per
step, the same corpus and seed for both runs). The per-step `moe/L{L}/max_load` of metrics.jsonl is checked against the recorded
loads (the callback's own figure)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import SMALL_DATA, compose, run_world

STEPS, WINDOW = 200, 50
MOE = ["model.vocab_size=1001", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
       "model.num_kv_heads=2", "model.intermediate_size=64", "model.max_seq_len=32", "model.mlp=moe",
       "model.first_k_dense_replace=1", "model.n_routed_experts=16", "model.num_experts_per_tok=2",
       "model.moe_intermediate_size=16", "model.n_shared_experts=1", "precision=fp32",
       "zero.stage=0", "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=4",
       f"train.steps={STEPS}", "train.log_interval=1", "train.sample_tokens=0", "train.eval_interval=0",
       "logging.progress=false", "optimizer.warmup_steps=10", "optimizer.lr=3e-3", "train.save_interval=100000",
       "logging.wandb.mode=disabled", "logging.tensorboard.enabled=false"] + SMALL_DATA
RUNS = {"aux_free": ["model.balance=aux_free", "model.bias_update_rate=1e-2"], "none": ["model.balance=none"]}


def _train(rank, world, runs, data_root):
    import torch

    from megaseek.model.moe.balance import moe_layers
    from megaseek.train.callbacks import Callback, ExpertBalance
    from megaseek.train.job import build_job

    class RecordLoads(Callback):
        """After ExpertBalance: each MoE layer's global expert loads of this step (observation only)."""

        def __init__(self, model):
            self.layers, self.loads = moe_layers(model), []

        def on_step_end(self, t, out: dict) -> None:
            self.loads.append(torch.stack([m.last_load.double() for m in self.layers]))  # (layers, E)

    out = {}
    for name, (run_dir, overrides) in runs.items():
        job = build_job(compose(MOE + overrides + [f"data.root={data_root}", f"run_dir={run_dir}"]))
        cbs = job.trainer.callbacks
        at = next(i for i, c in enumerate(cbs) if isinstance(c, ExpertBalance))
        rec = RecordLoads(job.engine.module)
        cbs.insert(at + 1, rec)
        job.run_job()
        records = [json.loads(l) for l in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
        out[name] = (torch.stack(rec.loads).tolist(), records)  # (steps, layers, E); no tensors through the queue
    return out


@pytest.mark.slow
def test_aux_free_bias_balances_the_default_corpus(data_root, tmp_path):
    runs = {n: (str(tmp_path / n), ov) for n, ov in RUNS.items()}
    import torch
    res = run_world(1, _train, runs, str(data_root), timeout=1500)[0]
    window = {}
    for name, (loads, records) in res.items():
        loads = torch.tensor(loads, dtype=torch.float64)
        assert loads.shape == (STEPS, 1, 16)  # one MoE layer (layer 1)
        assert (loads.sum(-1) == 4 * 32 * 2).all()  # every token of the step routed to 2 experts, none dropped
        steps = {r["step"]: r for r in records}
        for s in (1, 100, STEPS):  # the metric is the callback's own max/mean of the same loads
            per_step = loads[s - 1].max(-1).values / loads[s - 1].mean(-1)
            assert steps[s]["moe/L1/max_load"] == pytest.approx(float(per_step[0]), rel=1e-6)
        w = loads[STEPS - WINDOW:].sum(0)  # (layers, E): assignments over steps 151-200
        window[name] = (w.max(-1).values / w.mean(-1)).tolist()
    print("max/mean load over steps 151-200 (MoE layer 1):", window)
    assert max(window["aux_free"]) <= 1.3, window
    assert min(window["none"]) >= 5.0, window
