"""One training step (and one evaluation pass) of any objective on the DeepSpeed engine, at any layout.

One path for every layout: the 1F1B schedule (megaseek/pipeline/schedule.py) with one stage is the plain
accumulation loop. Per global batch:

  1. N = sum of `objective.count` over this rank's micro-batches, all-reduced over the data-parallel group
     (only stages that hold labels need it): the global number of valid units.
  2. Each micro-batch's loss sum is back-propagated as loss_sum * (A * D) / N (A accumulation steps, D
     data-parallel ranks): DeepSpeed divides by A in backward and averages over D in its reduction, so the
     gradient is that of sum(loss_sum) / N over the whole global batch. With every token valid,
     N / (A D) = micro_batch * seq_len and this is the per-micro-batch mean, bit for bit.
  3. Before the optimizer step: the tied embedding's gradient summed over first + last stage (pp > 1), the
     data-parallel reduction where we own it (pp > 1: DeepSpeed's backward all-reduce is off, since stages
     reduce after their last backward), and at ZeRO-0 the global gradient norm, from which a non-finite step
     is skipped on every rank alike. With PowerSGD (`parallel.powersgd.rank` > 0, ZeRO-0) DeepSpeed's
     backward all-reduce is off at every pp and the reducer averages the gradients over the data-parallel
     group here, so the norm, clipping and the step see the compressed mean.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.distributed as dist

from megaseek.distributed.groups import ParallelGroups
from megaseek.pipeline.p2p import StageComm
from megaseek.pipeline.schedule import forward_only, run_1f1b
from megaseek.tasks.objective import add_model_losses
from megaseek.tensor_parallel.layers import counts_in_norm


def global_grad_norm(model: torch.nn.Module, groups: ParallelGroups) -> float:
    """L2 norm of the full model's gradient, summed over the model-parallel group (tensor x pipeline) with
    DeepSpeed's ownership rule (`counts_in_norm`). Grads are already data-parallel averaged."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None and counts_in_norm(p, groups.mp.rank):
            sq += p.grad.detach().double().pow(2).sum().cpu()
    if groups.mp.size > 1:
        dist.all_reduce(sq, group=groups.mp.group)
    return float(sq.sqrt())


def skip_if_not_finite(engine, grad_norm: float) -> None:
    """ZeRO stage 0: DeepSpeed has no overflow check in fp32, so our optimizer skips the coming step itself
    (the norm is global, so every rank decides alike; DeepSpeed then counts it in engine.skipped_steps)."""
    from megaseek.ckpt.state import base_optimizer
    if not math.isfinite(grad_norm):
        opt = base_optimizer(engine)
        if hasattr(opt, "skip_next"):
            opt.skip_next = True


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


class StepRunner:
    """Runs steps of one objective for this rank's stage; knows nothing of the loop around it."""

    def __init__(self, engine, stage, groups: ParallelGroups, objective, *, micro_batch: int, seq_len: int,
                 zero_stage: int, device, powersgd=None):
        self.engine, self.stage, self.groups, self.objective = engine, stage, groups, objective
        self.powersgd = powersgd  # a PowerSGD over groups.dp (megaseek/distributed/powersgd.py), or None
        self.zero_stage, self.device = zero_stage, torch.device(device)
        self.module = engine.module
        sp = stage.ctx.sequence_parallel
        s_local = seq_len // stage.ctx.size if sp else seq_len
        dtype = next(engine.module.parameters()).dtype
        self.comm = StageComm(groups.pp.ranks, stage.index, (micro_batch, s_local, self.module.cfg.hidden_size),
                              dtype, self.device)
        if stage.stages > 1 or powersgd is not None:
            self.engine.enable_backward_allreduce = False  # we reduce after the last backward (see 3.)

    # --- pieces ---
    def _global_count(self, batches: list) -> float:
        n = torch.zeros((), dtype=torch.float64)
        for b in batches:
            n += float(self.objective.count(b))
        if self.groups.dp.size > 1:
            dist.all_reduce(n, group=self.groups.dp.group)
        return float(n)

    def _forward(self, batch: dict, x: Optional[torch.Tensor]) -> torch.Tensor:
        inp = batch["input_ids"] if self.stage.first else x
        return self.engine(inp, position_ids=batch.get("position_ids"), document_ids=batch.get("document_ids"))

    def _before_optimizer_step(self) -> None:
        st = self.stage
        if st.stages > 1:
            if st.tied_weight is not None and st.tied_weight.grad is not None:
                dist.all_reduce(st.tied_weight.grad, group=self.groups.embed.group)
        if self.powersgd is not None:
            from megaseek.distributed.powersgd import dp_gradients
            self.powersgd.reduce(dp_gradients(self.module))  # the (compressed) mean over groups.dp
        elif st.stages > 1:
            self.engine.allreduce_gradients()
        if self.zero_stage == 0:
            self._grad_norm = global_grad_norm(self.module, self.groups)
            skip_if_not_finite(self.engine, self._grad_norm)

    def _broadcast_from_last(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.stage.stages > 1:
            dist.broadcast(t, src=self.groups.pp.ranks[-1], group=self.groups.pp.group)
        return t.tolist()

    # --- the step ---
    def train_step(self, batches: list[dict], loss_hook=None) -> dict:
        """One optimizer step over this rank's micro-batches of the next global batch. Returns the global mean
        loss (every stage knows it), the global grad norm, timings and the objective's metrics.
        `loss_hook(loss) -> loss` sees each scaled micro-batch loss before backward (tests inject faults)."""
        t0 = time.perf_counter()
        m = len(batches)
        batches = [_to(b, self.device) for b in batches]
        last = self.stage.last
        n_global = self._global_count(batches) if last else 0.0
        denom = max(n_global, 1.0) / (m * self.groups.dp.size)  # = micro_batch * seq_len when all valid
        local_loss, metric_sums = 0.0, {}
        t_data = time.perf_counter() - t0

        def forward_step(i: int, x):
            nonlocal local_loss
            out = self._forward(batches[i], x)
            if not last:
                return out
            parts = self.objective(self.module, out, batches[i])
            parts = add_model_losses(self.module, parts, batches[i])  # + MoE balance, multi-token prediction
            loss = parts.loss_sum / denom  # see 2.: the micro-batch mean when every token is valid
            if loss_hook is not None:
                loss = loss_hook(loss)
            local_loss += float(loss.detach()) / m
            for k, v in parts.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v) / denom / m  # -> sum / N after the dp mean
            return loss

        self._grad_norm = None
        times = run_1f1b(self.engine, self.comm, m, forward_step, self._before_optimizer_step)
        names = sorted(metric_sums)
        if self.stage.stages > 1:  # only the last stage knows the metrics' names (model terms such as MTP's)
            box = [names]
            dist.broadcast_object_list(box, src=self.groups.pp.ranks[-1], group=self.groups.pp.group)
            names = box[0]
        vals = [local_loss] + [metric_sums.get(k, 0.0) for k in names]
        if self.groups.dp.size > 1:  # sum over data-parallel ranks of sum_m loss_sum * D / N -> the mean x D
            t = torch.tensor(vals, dtype=torch.float64)
            if last:
                dist.all_reduce(t, group=self.groups.dp.group)
            vals = (t / self.groups.dp.size).tolist()
        vals = self._broadcast_from_last(vals)
        gn = self._grad_norm if self._grad_norm is not None else self.engine.get_global_grad_norm()
        out = {"loss": vals[0], "grad_norm": float(gn) if gn is not None else float("nan"),
               "time_data_s": t_data, "time_forward_s": times.forward_s, "time_backward_s": times.backward_s,
               "time_step_s": times.step_s}
        if self.stage.stages > 1:
            out["pipeline_busy_fraction"] = times.busy_s / max(times.total_s, 1e-12)
        out.update({f"{self.objective.name}/{k}": v for k, v in zip(names, vals[1:])})
        return out

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> float:
        """The objective's mean loss over these micro-batches (and those of every data-parallel rank)."""
        batches = [_to(b, self.device) for b in batches]
        sums = torch.zeros(2, dtype=torch.float64)

        def forward_step(i: int, x):
            out = self._forward(batches[i], x)
            if not self.stage.last:
                return out
            parts = self.objective(self.module, out, batches[i])
            sums[0] += float(parts.loss_sum)
            sums[1] += float(parts.count)
            return None

        was = self.engine.training
        self.engine.eval()
        forward_only(self.comm, len(batches), forward_step)
        self.engine.train(was)
        if self.groups.dp.size > 1 and self.stage.last:
            dist.all_reduce(sums, group=self.groups.dp.group)
        loss = float(sums[0] / sums[1].clamp(min=1.0))
        return self._broadcast_from_last([loss])[0]
