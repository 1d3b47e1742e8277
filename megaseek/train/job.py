"""The pretraining job: validate -> processes -> data -> stage model -> DeepSpeed engine -> step runner ->
callbacks -> loop -> summary. Composition only; the loop (trainer.py) and the step (engine/step.py) know no
job. Post-training jobs compose the same pieces with another objective and data."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from megaseek.config.schema import ConfigError, validate
from megaseek.distributed.env import DistEnv, init_distributed, log0, select_accelerator, world_size_from_env
from megaseek.distributed.groups import ParallelGroups
from megaseek.distributed.topology import Topology
from megaseek.model.flops import flops_per_token, gpu_peak_tflops, measure_matmul_peak, param_counts


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


def sample_text(model, stage, groups, tokenizer_path, run, device) -> Optional[str]:
    """The end-of-run sample through the one generator (any tp / pp; every data-parallel rank in lockstep)."""
    n = run.train.sample_tokens
    if n <= 0:
        return None
    from megaseek.data.tokenizer import load_tokenizer
    from megaseek.model.generate import PipelinePeers, SamplingConfig, generate
    tok = load_tokenizer(tokenizer_path)
    prompt = tok.encode(run.train.sample_prompt).ids
    s = run.train.sampling
    room = max(0, model.cfg.max_seq_len - len(prompt))
    cfg = SamplingConfig(max_new_tokens=min(n, room), temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                         repetition_penalty=s.repetition_penalty, seed=run.seed)
    pipe = PipelinePeers(groups.pp.ranks, groups.pp.rank, groups.pp.group) if stage.stages > 1 else None
    world = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    new = generate(model, [prompt], cfg, pipeline=pipe, sync_group=world)[0]
    return tok.decode(prompt + new)


def powersgd_reducer(section, groups: ParallelGroups, seed: int):
    """`parallel.powersgd`: the data-parallel gradient reducer (validated at ZeRO-0), or None when rank=0."""
    if int(section.rank) <= 0:
        return None
    from megaseek.distributed.powersgd import PowerSGD
    log0(f"[powersgd] rank {section.rank}, {section.warmup_steps} warm-up steps, error feedback "
         f"{'on' if section.error_feedback else 'off'}, over {groups.dp.size} data-parallel ranks")
    return PowerSGD(groups.dp.group, rank=int(section.rank), warmup_steps=int(section.warmup_steps),
                    error_feedback=bool(section.error_feedback), seed=seed, log=log0)


@dataclass
class Job:
    """A built run: everything `run()` needs, kept for tools and tests (the model at its layout, the groups)."""
    trainer: object
    engine: object
    stage: object
    groups: ParallelGroups
    layout: object
    run: object
    run_dir: Path
    peak: tuple
    env: DistEnv

    @property
    def mcfg(self):
        return self.run.model

    def run_job(self) -> dict:
        summary = self.trainer.fit()
        lay = self.layout
        summary.update({"tokens": summary["steps"] * lay.global_batch * lay.seq_len, "run_dir": str(self.run_dir),
                        "params": param_counts(self.run.model)["total"], "peak_flops": self.peak[0],
                        "peak_source": self.peak[1]})
        if self.env.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            log0(f"[megaseek] done: {summary['steps']} steps ({summary['steps_this_run']} this run), "
                 f"{summary['tokens']:,} tokens, {summary['wall_time_s']:.1f}s, final loss {summary['final_loss']}, "
                 f"checkpoint {summary['checkpoint']}")
        return summary


def pretrain(cfg: DictConfig, objective=None, data_fn=None, evaluation_fn=None) -> dict:
    """Run one training job (every rank calls this). Returns the summary (also in run_dir/summary.json)."""
    return build_job(cfg, objective, data_fn, evaluation_fn).run_job()


def build_job(cfg: DictConfig, objective=None, data_fn=None, evaluation_fn=None) -> Job:
    """Validate and compose one job (every rank calls this); `objective` defaults to next-token prediction.

    A post-training stage feeds its own batches: `data_fn(plan, seq_len, seed, run_dir, log)` returns a
    DataBundle-like object (train loader with batches/state_dict/load_state_dict, valid, tokenizer_path);
    `evaluation_fn(runner, plan, every, steps)` returns its held-out hook (`t -> dict` of metrics), else the
    pretraining validation loss. `train.init_from` loads weights only (megaseek/ckpt/init_from.py) unless
    the run directory already holds a checkpoint to resume."""
    from megaseek.ckpt.manager import CheckpointManager
    from megaseek.config.sections import RunConfig
    from megaseek.data.api import build_data
    from megaseek.data.loader import BatchPlan
    from megaseek.engine.build import build_engine
    from megaseek.engine.stage import build_stage
    from megaseek.engine.step import StepRunner
    from megaseek.monitor.hub import MetricsHub
    from megaseek.tasks.pretrain import NextTokenObjective
    from megaseek.tensor_parallel.gemm import set_backend as set_gemm_backend
    from megaseek.testing import faults
    from megaseek.train import callbacks as C
    from megaseek.train.state import RunState
    from megaseek.train.trainer import Trainer

    world = world_size_from_env()
    layout = validate(cfg, world, has_cuda=select_accelerator())  # refuse bad config before any work
    run = RunConfig.from_config(cfg)
    from megaseek.train.compress import QATConvert, Sparsity, check_compress, prepare_qat, qat_spec
    check_compress(run.train, run.model, layout, run.zero.stage)  # train.qat / train.sparsity, before any work
    if run.model.fused and (qat_spec(run.train) is not None or run.train.sparsity != "none"):
        import dataclasses  # fake quantization and 2:4 masks act per projection (q, k, v, gate, up): unfused
        run.model = dataclasses.replace(run.model, fused=False)
    from megaseek.model.mtp import check_mtp
    if (why := check_mtp(run.model, layout.seq_len, layout.sequence_parallel,
                         getattr(objective, "name", "pretrain"))) is not None:
        raise ConfigError(why)  # multi-token prediction where it cannot run, before any work
    from megaseek.train.eval_tasks import DownstreamEval, check_eval_tasks
    check_eval_tasks(run.train)  # unknown task names fail before any model is built
    from megaseek.planner.preflight import preflight
    preflight(cfg, world, log0)  # export the cluster preset's NCCL settings; refuse a layout that does not fit
    denv = init_distributed()
    groups = ParallelGroups.build(Topology(tp=layout.tp, pp=layout.pp, dp=layout.dp, ep=layout.ep))
    run_dir = resolve_run_dir(cfg.get("run_dir"))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if denv.rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log0(f"[megaseek] run_dir={run_dir} world={layout.world_size} (dp={layout.dp} tp={layout.tp} pp={layout.pp}) "
             f"global_batch={layout.global_batch} = micro {layout.micro_batch} x accum {layout.grad_accum} x dp "
             f"{layout.dp}, backend={denv.backend}, zero={run.zero.stage}, precision={run.precision.name}")

    plan = BatchPlan(layout.global_batch, layout.micro_batch, layout.dp, groups.dp.rank,
                     pp=layout.pp, pp_rank=groups.pp.rank)  # only the first / last stage read data
    if data_fn is not None:
        data = data_fn(plan, layout.seq_len, run.seed, run_dir, log0)
    else:
        data = build_data(cfg, denv.local_rank, plan, layout.seq_len, run.seed, log=log0)
    stage = build_stage(run.model, groups, seed=run.seed, sequence_parallel=layout.sequence_parallel,
                        checkpointing=run.train.activation_checkpointing, partition_method=run.parallel.partition)
    prepare_qat(stage.model, qat_spec(run.train))  # fake-quantized linears, before the engine takes the parameters
    set_gemm_backend(run.train.gemm)  # the projections' GEMM library, for this process (before any forward)
    if run.train.compile:  # regional torch.compile of the blocks; names and parameters unchanged
        from megaseek.model.decoder import compile_blocks
        compile_blocks(stage.model)
    engine, _, scheduler, _ = build_engine(stage.model, cfg, layout, groups)
    if layout.pp > 1:
        from megaseek.pipeline.partition import partition
        log0(f"[pipeline] {layout.pp} stages, layers per stage "
             f"{[b - a for a, b in partition(run.model, layout.pp, run.parallel.partition)]}, "
             f"{layout.grad_accum} micro-batches, 1F1B")
    reducer = powersgd_reducer(run.parallel.powersgd, groups, run.seed)
    runner = StepRunner(engine, stage, groups, objective or NextTokenObjective(), micro_batch=layout.micro_batch,
                        seq_len=layout.seq_len, zero_stage=run.zero.stage, device=denv.device, powersgd=reducer)
    manager = CheckpointManager(run_dir, engine, groups, run.model, data.tokenizer_path,
                                skip_params=[stage.tied_copy] if stage.tied_copy is not None else [],
                                rng_tracker=stage.rng, keep=run.train.ckpt_keep, native=run.train.ckpt_native,
                                log=log0, rank_state={"powersgd": reducer} if reducer is not None else None)
    if run.train.init_from and manager.newest() is None:  # a run directory with a checkpoint resumes instead
        from megaseek.ckpt.init_from import load_init_weights
        load_init_weights(run.train.init_from, engine, groups, run.model, log=log0)
    state = RunState(manager, engine, scheduler, data.train, layout.global_batch, resolved)
    flops = flops_per_token(run.model, layout.seq_len, run.train.activation_checkpointing)
    peak = measured_peak_flops(denv, run.precision.name)
    counts = param_counts(run.model)
    active = "" if counts["active"] == counts["total"] else f" ({counts['active'] / 1e6:.2f}M active per token)"
    log0(f"[megaseek] model {run.model.name}: {counts['total'] / 1e6:.2f}M parameters{active}, "
         f"{flops['model'] / 1e6:.1f} MFLOP/token, peak {peak[0] / 1e9:.1f} GFLOP/s ({peak[1]})")

    if evaluation_fn is not None:
        evaluation = evaluation_fn(runner, plan, run.train.eval_interval, run.train.steps)
    else:
        evaluation = C.Evaluation(runner, data.valid, run.train.eval_interval, run.train.steps, layout.global_batch,
                                  layout.micro_batch, layout.dp, groups.dp.rank, layout.seq_len,
                                  run.train.eval_batches)
    downstream = None
    if run.train.eval_tasks:
        from megaseek.model.generate import PipelinePeers
        pipe = PipelinePeers(groups.pp.ranks, groups.pp.rank, groups.pp.group) if stage.stages > 1 else None
        downstream = DownstreamEval(engine.module, pipe, data.tokenizer_path, run.train, run_dir, denv.rank, log0)
    resume = C.Resume(state, log0, layout={"dp": layout.dp, "tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
                                           "world_size": layout.world_size, "micro_batch": layout.micro_batch,
                                           "global_batch": layout.global_batch, "grad_accum": layout.grad_accum})
    fp16 = run.precision.name == "fp16"
    metrics = C.Metrics(
        lambda start: MetricsHub(cfg.logging, run_dir, denv.rank, layout.world_size, run.train.steps, start, resolved),
        run.train.log_interval, layout.global_batch * layout.seq_len, layout.global_batch, layout.world_size,
        flops, peak, lr_fn=lambda: scheduler.get_last_lr()[0],
        loss_scale_fn=lambda: getattr(engine.optimizer, "cur_scale", None) if fp16 else None,
        extra=(resume, evaluation) + ((downstream,) if downstream else ())
        + ((reducer.metrics_record,) if reducer else ()))  # a PowerSGD warm-up restart at resume
    if downstream:
        downstream.metrics = metrics
    callbacks = [resume,
                 C.Stability(state, run.train.max_bad_steps, run.train.on_bad_steps, run.train.max_rollbacks, log0),
                 metrics] + ([downstream] if downstream else []) + [
                 C.Preemption(), C.Checkpointing(state, run_dir, run.train.save_interval, log0),
                 C.Sampling(lambda: sample_text(engine.module, stage, groups, data.tokenizer_path, run, denv.device),
                            log0)]
    if run.train.sparsity == "2:4":  # masks from the weights Resume / init_from set, before anything saves
        callbacks.insert(1, Sparsity(engine, log0))
    if qat_spec(run.train) is not None:
        callbacks.append(QATConvert(engine.module, run.model, qat_spec(run.train), run_dir, data.tokenizer_path,
                                    denv.rank, log0))
    if run.model.mlp == "moe":  # expert loads, the bias update and MoE metrics, before Metrics reads the record
        callbacks.insert(callbacks.index(metrics), C.ExpertBalance(engine.module, groups.dp.group,
                                                                         groups.pp.group))
    trainer = Trainer(runner, data.train, state, run.train.steps, callbacks, log=log0)
    faults.install(trainer, manager, denv.rank, log0)
    return Job(trainer=trainer, engine=engine, stage=stage, groups=groups, layout=layout, run=run, run_dir=run_dir,
               peak=peak, env=denv)
