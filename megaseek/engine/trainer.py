"""The pretraining job: validate -> processes -> data -> model -> DeepSpeed engine -> loop -> summary.

The loop delegates: batches come from the loader, steps from the engine, records go to the sinks,
checkpoints to megaseek.ckpt.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import signal

from megaseek.ckpt import checkpoint as ckpt
from megaseek.ckpt.manager import CheckpointManager
from megaseek.config.schema import ConfigError, Layout, validate
from megaseek.distributed.env import DistEnv, init_distributed, log0, select_accelerator, world_size_from_env
from megaseek.distributed.groups import ParallelGroups
from megaseek.distributed.topology import Topology
from megaseek.tensor_parallel.layers import RNGTracker, TPContext, counts_in_norm, mark_norm_ownership
from megaseek.model.config import ModelConfig
from megaseek.model.decoder import Decoder, greedy_generate
from megaseek.model.flops import flops_per_token, gpu_peak_tflops, measure_matmul_peak, param_counts
from megaseek.monitor.hub import MetricsHub
from megaseek.pipeline.p2p import StageComm
from megaseek.pipeline.partition import partition
from megaseek.pipeline.schedule import forward_only, run_1f1b


def resolve_run_dir(run_dir: Optional[str]) -> Path:
    """The run directory, identical on every rank: rank 0 decides, the others receive it."""
    if run_dir in (None, "", "null"):
        try:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode
            hc = HydraConfig.get()
            chosen = hc.runtime.output_dir if hc.mode == RunMode.MULTIRUN else None
        except Exception:
            chosen = None
        chosen = chosen or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
        obj = [chosen]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(obj, src=0)
        run_dir = obj[0]
    p = Path(run_dir).resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p


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


def _fault_sleep(cfg) -> Optional[tuple]:
    f = cfg.train.get("fault") or {}
    return (int(f["save_sleep_step"]), float(f.get("save_sleep_s", 600))) if f.get("save_sleep_step") else None


def skip_if_not_finite(engine, grad_norm: float) -> None:
    """ZeRO stage 0: DeepSpeed has no overflow check in fp32, so our optimizer skips the coming step itself
    (the norm is global, so every rank decides alike; DeepSpeed then counts it in engine.skipped_steps)."""
    from megaseek.ckpt.state import base_optimizer
    if not math.isfinite(grad_norm):
        opt = base_optimizer(engine)
        if hasattr(opt, "skip_next"):
            opt.skip_next = True


def measured_peak_flops(env: DistEnv, dtype: str) -> tuple[float, str]:
    """Total peak FLOP/s of the world: datasheet per GPU, or a matmul measured by every CPU rank at once."""
    if env.device.startswith("cuda"):
        tf = gpu_peak_tflops(torch.cuda.get_device_name(), dtype)
        if tf:
            return tf * 1e12 * env.world_size, f"datasheet {torch.cuda.get_device_name()} {dtype}"
    mine = torch.tensor([measure_matmul_peak(seconds=0.3)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(mine)
    return float(mine.item()), "measured fp32 matmul"


class Trainer:
    def __init__(self, cfg: DictConfig, layout: Layout, denv: DistEnv, groups: ParallelGroups, run_dir: Path):
        self.cfg, self.layout, self.env, self.groups, self.run_dir = cfg, layout, denv, groups, run_dir
        self.rank0 = denv.rank == 0
        self.zero_stage = int(cfg.zero.stage)
        self.device = torch.device(denv.device)

    # --- build ---
    def build(self):
        from megaseek.data.api import build_data
        from megaseek.data.loader import BatchPlan
        from megaseek.engine.build import build_engine
        cfg, lay = self.cfg, self.layout
        plan = BatchPlan(lay.global_batch, lay.micro_batch, lay.dp, self.groups.dp.rank,
                         pp=lay.pp, pp_rank=self.groups.pp.rank)  # only the first / last stage read data
        self.data = build_data(cfg, self.env.local_rank, plan, lay.seq_len, int(cfg.seed), log=log0)
        self.loader = self.data.train

        self.mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
        self.ctx = TPContext.from_axis(self.groups.tp, lay.sequence_parallel)
        torch.manual_seed(int(cfg.seed))
        self.rng = RNGTracker(int(cfg.seed), self.ctx.rank)
        self.stage, self.stages = self.groups.pp.rank, lay.pp
        self.first, self.last = self.stage == 0, self.stage == lay.pp - 1
        lo, hi = partition(self.mcfg, lay.pp, str(cfg.parallel.get("partition", "parameters")))[self.stage]
        model = Decoder(self.mcfg, self.ctx, seed=int(cfg.seed), rng=self.rng,
                        checkpointing=str(cfg.train.activation_checkpointing),
                        first_layer=lo, last_layer=hi, pre=self.first, post=self.last)
        self.tied_copy = model.embed.weight if (lay.pp > 1 and self.last and self.mcfg.tie_embeddings) else None
        tied_first = model.embed.weight if (lay.pp > 1 and self.first and self.mcfg.tie_embeddings) else None
        self.tied_weight = self.tied_copy if self.tied_copy is not None else tied_first
        mark_norm_ownership(model, self.ctx.rank, [self.tied_copy] if self.tied_copy is not None else [])
        self.engine, self.optimizer, self.scheduler, self.ds_config = build_engine(model, cfg, lay, self.groups)
        if lay.pp > 1:
            # we reduce gradients ourselves at the last micro-batch: tied embedding first, then data parallel
            self.engine.enable_backward_allreduce = False
            s_local = lay.seq_len // lay.tp if lay.sequence_parallel else lay.seq_len
            dtype = next(self.engine.module.parameters()).dtype
            self.comm = StageComm(self.groups.pp.ranks, self.stage, (lay.micro_batch, s_local, self.mcfg.hidden_size),
                                  dtype, self.device)
            log0(f"[pipeline] {lay.pp} stages, layers per stage "
                 f"{[b - a for a, b in partition(self.mcfg, lay.pp, str(cfg.parallel.get('partition', 'parameters')))]}, "
                 f"{lay.grad_accum} micro-batches, 1F1B")
        self.ckpt = CheckpointManager(self.run_dir, self.engine, self.groups, self.mcfg, self.mcfg.vocab_size,
                                      self.data.tokenizer_path, skip_params=[self.tied_copy] if self.tied_copy is not None else [],
                                      rng_tracker=self.rng, keep=int(cfg.train.get("ckpt_keep", 3)),
                                      native=bool(cfg.train.get("ckpt_native", False)), log=log0,
                                      fault_sleep=_fault_sleep(cfg))
        self.flops = flops_per_token(self.mcfg, lay.seq_len, str(cfg.train.activation_checkpointing))
        self.peak, self.peak_src = measured_peak_flops(self.env, str(cfg.precision.name))
        return self

    # --- state ---
    def client_state(self, step: int) -> dict:
        """Everything besides tensors that a run needs to continue exactly (JSON)."""
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        scale = getattr(self.engine.optimizer, "cur_scale", None)
        return {"step": step, "consumed_samples": step * self.layout.global_batch,
                "loader": self.loader.state_dict(), "scheduler": sched,
                "adam_step": self.ckpt.optimizer_step_count(),
                "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
                "loss_scale": float(scale) if scale is not None else None,
                "config": OmegaConf.to_container(self.cfg, resolve=True)}

    def save(self, step: int) -> Path:
        return self.ckpt.save(step, self.client_state(step))

    def restore(self, path: Path) -> int:
        """Load a checkpoint (any layout) and the loader / scheduler / counters; returns its step."""
        st = self.ckpt.load(path)
        self.loader.load_state_dict(st["loader"])
        sched = self.scheduler.state_dict()
        sched.update(st["scheduler"])
        self.scheduler.load_state_dict(sched)
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # load_state_dict does not touch the optimizer: the next step must use this lr
        self.engine.global_steps = int(st["step"])
        self.engine.skipped_steps = int(st.get("skipped_steps", 0))
        if st.get("loss_scale") is not None and hasattr(self.engine.optimizer, "cur_scale"):
            self.engine.optimizer.cur_scale = st["loss_scale"]
        return int(st["step"])

    def maybe_resume(self) -> int:
        path = self.ckpt.newest()
        if path is None:
            return 0
        step = self.restore(path)
        log0(f"[ckpt] resumed from {path.name} at step {step}")
        return step

    def _dp_mean(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        if self.groups.dp.size > 1:
            dist.all_reduce(t, group=self.groups.dp.group)
        return float(t.item()) / self.groups.dp.size

    # --- one step ---
    def _pipeline_grad_reduction(self) -> None:
        """Between the last backward and the optimizer step: sum the tied embedding's gradient over the first
        and last stage, then the data-parallel reduction DeepSpeed would have done in backward."""
        if self.tied_weight is not None and self.tied_weight.grad is not None:
            dist.all_reduce(self.tied_weight.grad, group=self.groups.embed.group)
        self.engine.allreduce_gradients()
        if self.zero_stage == 0:
            self._gn = global_grad_norm(self.engine.module, self.groups)
            skip_if_not_finite(self.engine, self._gn)

    def _pipeline_step(self) -> dict:
        lay = self.layout
        t0 = time.perf_counter()
        micro = self.loader.micro_batches()  # (ids, None) on the first stage, (None, labels) on the last
        t_data = time.perf_counter() - t0
        self._gn = None
        losses, times = run_1f1b(self.engine, self.comm, micro, lay.grad_accum, self._pipeline_grad_reduction)
        loss = torch.tensor([sum(losses) / len(losses) if losses else 0.0], dtype=torch.float64)
        dist.broadcast(loss, src=self.groups.pp.ranks[-1], group=self.groups.pp.group)  # every stage knows it
        gn = self._gn if self._gn is not None else self.engine.get_global_grad_norm()
        return {"loss": float(loss.item()), "grad_norm": float(gn) if gn is not None else float("nan"),
                "time_data_s": t_data, "time_forward_s": times.forward_s, "time_backward_s": times.backward_s,
                "time_step_s": times.step_s, "pipeline_busy_fraction": times.busy_s / max(times.total_s, 1e-12)}

    def train_step(self) -> dict:
        """One optimizer step over this rank's micro-batches of the next global batch.
        Returns this rank's mean micro-batch loss, the global grad norm (None: ask the engine) and timings.
        Timers are host-side (no device sync): on GPUs forward/backward times include queued kernels."""
        lay = self.layout
        if lay.pp > 1:
            return self._pipeline_step()
        t0 = time.perf_counter()
        micro = self.loader.micro_batches()
        t_data = time.perf_counter() - t0
        local, gn, t_fwd, t_bwd, t_opt = 0.0, None, 0.0, 0.0, 0.0
        for ids, labels in micro:
            t1 = time.perf_counter()
            loss = self.engine(ids.to(self.device), labels.to(self.device))  # mean token loss of the micro-batch
            loss = self._inject_fault(loss)
            t2 = time.perf_counter()
            self.engine.backward(loss)
            t3 = time.perf_counter()
            if self.engine.is_gradient_accumulation_boundary() and self.zero_stage == 0:
                gn = global_grad_norm(self.engine.module, self.groups)  # DeepSpeed keeps none at stage 0
                skip_if_not_finite(self.engine, gn)
            self.engine.step()
            t4 = time.perf_counter()
            t_fwd, t_bwd, t_opt = t_fwd + t2 - t1, t_bwd + t3 - t2, t_opt + t4 - t3
            local += float(loss.detach()) / lay.grad_accum
        if gn is None:
            gn = self.engine.get_global_grad_norm()
        return {"loss": local, "grad_norm": float(gn) if gn is not None else float("nan"),
                "time_data_s": t_data, "time_forward_s": t_fwd, "time_backward_s": t_bwd, "time_step_s": t_opt}

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        """Mean token loss over a fixed held-out set (the first eval_batches x global_batch validation
        windows, split across data-parallel ranks) and its perplexity."""
        if self.data.valid is None:
            return None
        lay = self.layout
        n = min(len(self.data.valid), int(self.cfg.train.get("eval_batches", 4)) * lay.global_batch)
        per_rank = n // lay.dp
        if per_rank < 1:
            return None
        mine = range(self.groups.dp.rank * per_rank, (self.groups.dp.rank + 1) * per_rank)
        self.engine.eval()
        batches = [self.data.valid.batch(list(mine[k:k + lay.micro_batch])) for k in range(0, per_rank, lay.micro_batch)]
        if lay.pp > 1:
            losses = forward_only(self.engine, self.comm, batches, len(batches)) if all(
                b[0].shape[0] == lay.micro_batch for b in batches) else []
            t = torch.tensor([sum(losses) / max(1, len(losses))], dtype=torch.float64)
            dist.broadcast(t, src=self.groups.pp.ranks[-1], group=self.groups.pp.group)
            mean_local = float(t.item())
        else:
            total = 0.0
            for ids, labels in batches:
                total += float(self.engine(ids.to(self.device), labels.to(self.device))) * ids.shape[0]
            mean_local = total / per_rank
        self.engine.train()
        val = self._dp_mean(mean_local)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    # --- loop ---
    # --- faults: preemption signals, non-finite steps ---
    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (Slurm preemption): finish the current step, save, exit cleanly."""
        self._signal = None

        def handler(signum, frame):
            self._signal = signal.Signals(signum).name
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (tests running the trainer in a thread)
                pass

    def _any_rank_signalled(self) -> bool:
        t = torch.tensor([1.0 if self._signal else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(t.item() > 0)

    def _inject_fault(self, loss: torch.Tensor) -> torch.Tensor:
        """train.fault.nan_step / nan_rank: make one rank's loss NaN on given global batches (tests of the skip
        path)."""
        f = self.cfg.train.get("fault") or {}
        steps = f.get("nan_step", -1)
        steps = list(steps) if OmegaConf.is_list(steps) or isinstance(steps, (list, tuple)) else [steps]
        # keyed on the global batch (1-based), not the step: after a rollback the data moves on, as a bad batch would
        if self._batch + 1 in [int(x) for x in steps] and int(f.get("nan_rank", 0)) == self.env.rank:
            return loss * float("nan")
        return loss

    def _on_bad_step(self, step: int, streak: int) -> Optional[int]:
        """After `train.max_bad_steps` consecutive skipped steps: roll back to the newest checkpoint (the data
        position moves on, past the batches that failed) or stop with a clear message. Returns the step to
        continue from, or None to go on."""
        limit = int(self.cfg.train.get("max_bad_steps", 3))
        if streak < limit:
            return None
        action = str(self.cfg.train.get("on_bad_steps", "rollback"))
        path = self.ckpt.newest() if action == "rollback" else None
        if path is None or self._rollbacks >= int(self.cfg.train.get("max_rollbacks", 2)):
            raise RuntimeError(f"training stopped at step {step}: {streak} consecutive steps with non-finite loss or "
                               f"gradients (train.max_bad_steps={limit}, train.on_bad_steps={action}, "
                               f"{self._rollbacks} rollbacks so far). Lower optimizer.lr or check the data.")
        position, skipped = self.loader.state_dict(), int(getattr(self.engine, "skipped_steps", 0))
        back = self.restore(path)
        self.loader.load_state_dict(position)
        self.engine.skipped_steps = skipped  # a run statistic: the rollback does not undo it
        self._rollbacks += 1
        log0(f"[train] {streak} consecutive non-finite steps: rolled back to {path.name} (step {back}); "
             f"the data position stays at {position.get('consumed_samples', position.get('next_batch'))}")
        return back

    # --- loop ---
    def fit(self) -> dict:
        cfg, lay = self.cfg, self.layout
        steps, log_every = int(cfg.train.steps), int(cfg.train.log_interval)
        save_every = int(cfg.train.save_interval)
        eval_every = int(cfg.train.get("eval_interval", 0) or 0)
        start = self.maybe_resume()
        self._install_signal_handlers()
        self._rollbacks, streak = 0, 0
        hub = MetricsHub(cfg.logging, self.run_dir, self.env.rank, lay.world_size, steps, start,
                         OmegaConf.to_container(cfg, resolve=True))
        tokens_per_step = lay.global_batch * lay.seq_len
        t_start = t_log = time.perf_counter()
        acc: dict[str, float] = {}
        n_in_interval, last, ckpt_path, stopped_by = 0, None, None, None
        try:
            step = start
            while step < steps:
                self._step, self._batch = step, int(self.loader.state_dict()["next_batch"])
                skipped_before = int(getattr(self.engine, "skipped_steps", 0))
                out = self.train_step()
                skipped = int(getattr(self.engine, "skipped_steps", 0)) > skipped_before
                streak = streak + 1 if skipped else 0
                if skipped:
                    log0(f"[train] step {step + 1} skipped on every rank: non-finite loss or gradients "
                         f"(grad_norm={out['grad_norm']}), {streak} in a row")
                    back = self._on_bad_step(step + 1, streak)
                    if back is not None:
                        step, streak, acc, n_in_interval, t_log = back, 0, {}, 0, time.perf_counter()
                        continue
                for k, v in out.items():
                    if k != "grad_norm":
                        acc[k] = acc.get(k, 0.0) + v
                n_in_interval += 1
                done = step = step + 1
                rec = None
                if done % log_every == 0 or done == steps:
                    dt = time.perf_counter() - t_log
                    tps = tokens_per_step * n_in_interval / dt
                    rec = {"step": done, "loss": self._dp_mean(acc.pop("loss") / n_in_interval),
                           "lr": float(self.scheduler.get_last_lr()[0]), "grad_norm": out["grad_norm"],
                           "tokens_per_s": tps, "tokens_per_s_per_rank": tps / lay.world_size,
                           "samples": done * lay.global_batch, "mfu": self.flops["model"] * tps / self.peak,
                           "hfu": self.flops["hardware"] * tps / self.peak,
                           "model_tflops": self.flops["model"] * tps / 1e12, "step_time_s": dt / n_in_interval,
                           "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
                           "peak_tflops": self.peak / 1e12, "peak_source": self.peak_src}
                    rec.update({k: v / n_in_interval for k, v in acc.items()})
                    scale = getattr(self.engine.optimizer, "cur_scale", None)
                    if str(cfg.precision.name) == "fp16" and scale is not None:
                        rec["loss_scale"] = float(scale)
                    if eval_every and (done % eval_every == 0 or done == steps):
                        rec.update(self.evaluate() or {})
                    last = hub.log(rec)
                    acc, n_in_interval, t_log = {}, 0, time.perf_counter()
                hub.progress(done, rec)
                if self._any_rank_signalled():
                    stopped_by = self._signal or "a signal on another rank"
                    ckpt_path = self.save(done)
                    log0(f"[ckpt] {stopped_by}: saved {ckpt_path.name} at step {done}; exiting cleanly")
                    break
                if done % save_every == 0 or done == steps:
                    ckpt_path = self.save(done)
        finally:
            hub.close()  # frees the metrics port and ends the wandb run, also on a crash
        wall = time.perf_counter() - t_start
        if ckpt_path is None and ckpt.latest_tag(self.run_dir):
            ckpt_path = ckpt.checkpoint_dir(self.run_dir) / ckpt.latest_tag(self.run_dir)
        return {"steps": step, "steps_this_run": step - start, "tokens": step * tokens_per_step,
                "wall_time_s": wall, "final_loss": last["loss"] if last else None, "stopped_by": stopped_by,
                "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)), "rollbacks": self._rollbacks,
                "checkpoint": str(ckpt_path) if ckpt_path else None, "run_dir": str(self.run_dir),
                "params": param_counts(self.mcfg)["total"], "peak_flops": self.peak, "peak_source": self.peak_src}

    def sample(self) -> Optional[str]:
        n = int(self.cfg.train.get("sample_tokens", 0))
        if n <= 0:
            return None
        if self.layout.pp > 1:
            log0("[megaseek] greedy sample skipped: generation through pipeline stages is not implemented")
            return None
        from megaseek.data.tokenizer import load_tokenizer
        tok = load_tokenizer(self.data.tokenizer_path)
        prompt = str(self.cfg.train.get("sample_prompt", "def "))
        ids = torch.tensor([tok.encode(prompt).ids], device=self.device)
        out = greedy_generate(self.engine.module, ids, n)
        return tok.decode(out[0].tolist())


def pretrain(cfg: DictConfig) -> dict:
    """Run one pretraining job (every rank calls this). Returns the summary (also in run_dir/summary.json)."""
    world = world_size_from_env()
    layout = validate(cfg, world, has_cuda=select_accelerator())  # refuse bad config before any work
    from megaseek.planner.preflight import preflight
    preflight(cfg, world, log0)  # export the cluster preset's NCCL settings; refuse a layout that does not fit
    denv = init_distributed()
    groups = ParallelGroups.build(Topology(tp=layout.tp, pp=layout.pp, dp=layout.dp))
    run_dir = resolve_run_dir(cfg.get("run_dir"))
    if denv.rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log0(f"[megaseek] run_dir={run_dir} world={layout.world_size} (dp={layout.dp} tp={layout.tp} pp={layout.pp}) "
             f"global_batch={layout.global_batch} = micro {layout.micro_batch} x accum {layout.grad_accum} x dp "
             f"{layout.dp}, backend={denv.backend}, zero={cfg.zero.stage}, precision={cfg.precision.name}")
    trainer = Trainer(cfg, layout, denv, groups, run_dir).build()
    log0(f"[megaseek] model {trainer.mcfg.name}: {param_counts(trainer.mcfg)['total'] / 1e6:.2f}M parameters, "
         f"{trainer.flops['model'] / 1e6:.1f} MFLOP/token, peak {trainer.peak / 1e9:.1f} GFLOP/s ({trainer.peak_src})")
    summary = trainer.fit()
    text = trainer.sample()
    if denv.rank == 0:
        summary["sample"] = text
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        log0(f"[megaseek] done: {summary['steps']} steps ({summary['steps_this_run']} this run), "
             f"{summary['tokens']:,} tokens, {summary['wall_time_s']:.1f}s, final loss {summary['final_loss']}, "
             f"checkpoint {summary['checkpoint']}")
        if text is not None:
            log0("[megaseek] greedy sample:\n" + text)
    return summary
