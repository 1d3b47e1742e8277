"""Structured views of the Hydra config and `validate()`: every inconsistency is refused with one clear
message naming the fields, before any process group, model or data is built."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from megaseek.model.config import ModelConfig

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
OFFLOAD = ("none", "cpu")


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the field(s) and what would fix it."""


@dataclass(frozen=True)
class Layout:
    """The resolved parallel layout and batch arithmetic of one run.

    global_batch = micro_batch * grad_accum * dp
    """

    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch: int
    global_batch: int
    grad_accum: int
    seq_len: int
    sequence_parallel: bool
    ep: int = 1  # expert-parallel degree (carved out of dp)


def _get(cfg: Mapping, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


def resolve_layout(cfg: Mapping, world_size: int) -> Layout:
    tp, pp = int(_get(cfg, "parallel.tp", 1)), int(_get(cfg, "parallel.pp", 1))
    if tp < 1 or pp < 1:
        raise ConfigError(f"parallel.tp={tp} and parallel.pp={pp} must both be >= 1")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {tp} * {pp} = {tp * pp}; "
            f"launch a multiple of {tp * pp} ranks or change parallel.tp / parallel.pp")
    dp = world_size // (tp * pp)
    mb, gb = int(_get(cfg, "train.micro_batch_size")), int(_get(cfg, "train.global_batch_size"))
    if mb < 1 or gb < 1:
        raise ConfigError(f"train.micro_batch_size={mb} and train.global_batch_size={gb} must be >= 1")
    if gb % (mb * dp):
        raise ConfigError(
            f"train.global_batch_size={gb} must equal train.micro_batch_size ({mb}) x gradient accumulation x "
            f"data-parallel size ({dp} = world {world_size} / (tp {tp} * pp {pp})); {gb} is not a multiple of "
            f"{mb * dp}. Use a global batch that is a multiple of {mb * dp}, or change micro_batch_size")
    seq = int(_get(cfg, "train.seq_len"))
    ep = int(_get(cfg, "parallel.ep", 1))
    if ep < 1 or dp % ep:
        raise ConfigError(f"parallel.ep={ep} must be >= 1 and divide the data-parallel size {dp} (= world {world_size} "
                          f"/ (tp {tp} * pp {pp})): experts are sharded over data-parallel ranks")
    return Layout(world_size=world_size, tp=tp, pp=pp, dp=dp, micro_batch=mb, global_batch=gb,
                  grad_accum=gb // (mb * dp), seq_len=seq,
                  sequence_parallel=bool(_get(cfg, "parallel.sequence_parallel", False)) and tp > 1, ep=ep)


def validate(cfg: Mapping, world_size: int, has_cuda: Optional[bool] = None) -> Layout:
    """Check the whole run config against the world size and the hardware. Returns the Layout."""
    if has_cuda is None:
        import torch
        has_cuda = torch.cuda.is_available()
    from megaseek.config.sections import RunConfig
    RunConfig.from_config(cfg)  # unknown keys (e.g. `+train.stpes=3`) refused, naming the closest valid one
    layout = resolve_layout(cfg, world_size)

    try:
        from megaseek.model.spec import check
        mcfg = ModelConfig.from_dict(dict(_get(cfg, "model")))
        check(mcfg)
        mcfg.validate(layout.tp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if layout.seq_len < 1 or layout.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"train.seq_len={layout.seq_len} must be in [1, model.max_seq_len={mcfg.max_seq_len}]")
    if layout.sequence_parallel and layout.seq_len % layout.tp:
        raise ConfigError(f"parallel.sequence_parallel=true needs train.seq_len ({layout.seq_len}) divisible by "
                          f"parallel.tp ({layout.tp})")
    if layout.pp > mcfg.num_layers:
        raise ConfigError(f"parallel.pp={layout.pp} stages for model.num_layers={mcfg.num_layers}: "
                          f"every stage needs at least one layer")
    from megaseek.pipeline.partition import METHODS
    method = str(_get(cfg, "parallel.partition", "parameters"))
    if method not in METHODS:
        raise ConfigError(f"parallel.partition={method!r}: choose one of {', '.join(METHODS)}")

    _check_moe_layout(cfg, mcfg, layout)

    prec = str(_get(cfg, "precision.name", "fp32"))
    if prec not in PRECISIONS:
        raise ConfigError(f"precision={prec!r}: choose one of {PRECISIONS}")
    if prec == "fp16" and not has_cuda:
        raise ConfigError("precision=fp16 needs a GPU: DeepSpeed's CPU accelerator has no fp16 "
                          "(\"Type fp16 is not supported on your device\"). Use precision=bf16 or precision=fp32 on CPU")
    if prec == "fp8":  # fp8 tensor cores (Hopper / Blackwell) and torchao or Transformer Engine, else one message
        from megaseek.distributed.fp8 import check_fp8_run
        check_fp8_run(has_cuda)

    stage = int(_get(cfg, "zero.stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero.stage={stage}: choose 0, 1, 2 or 3")
    off_opt, off_par = str(_get(cfg, "zero.offload_optimizer", "none")), str(_get(cfg, "zero.offload_param", "none"))
    for k, v in (("zero.offload_optimizer", off_opt), ("zero.offload_param", off_par)):
        if v not in OFFLOAD:
            raise ConfigError(f"{k}={v!r}: choose one of {OFFLOAD}")
    if off_opt != "none" and stage == 0:
        raise ConfigError("zero.offload_optimizer=cpu needs zero.stage >= 1")
    if off_par != "none" and stage != 3:
        raise ConfigError(f"zero.offload_param=cpu needs zero.stage=3 (got zero.stage={stage})")
    from megaseek.distributed.powersgd import check_powersgd
    check_powersgd(_get(cfg, "parallel.powersgd.rank", 0), _get(cfg, "parallel.powersgd.warmup_steps", 0), stage,
                   layout.ep)
    if layout.pp > 1 and stage >= 2:
        raise ConfigError(
            f"parallel.pp={layout.pp} with zero.stage={stage}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 "
            f"only. Use zero.stage=1 (optimizer states partitioned) with pipelines, or parallel.pp=1 for ZeRO-2/3")

    from megaseek.tensor_parallel.gemm import check_backend
    try:
        check_backend(str(_get(cfg, "train.gemm", "auto")))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ac = str(_get(cfg, "train.activation_checkpointing", "none"))
    if ac not in ("none", "full", "selective"):
        raise ConfigError(f"train.activation_checkpointing={ac!r}: choose none, full or selective")
    steps = int(_get(cfg, "train.steps"))
    if steps < 1:
        raise ConfigError(f"train.steps={steps} must be >= 1")
    for k in ("train.log_interval", "train.save_interval"):
        if int(_get(cfg, k, 1)) < 1:
            raise ConfigError(f"{k}={_get(cfg, k)} must be >= 1")
    lr = float(_get(cfg, "optimizer.lr"))
    if not lr > 0:
        raise ConfigError(f"optimizer.lr={lr} must be > 0")
    return layout


def _check_moe_layout(cfg: Mapping, mcfg: ModelConfig, layout: Layout) -> None:
    """Expert-parallel layouts this stack supports; the rest refused with one message each."""
    if mcfg.mlp == "moe" and layout.pp > 1 and mcfg.balance in ("seq_aux", "aux"):
        raise ConfigError(f"model.balance={mcfg.balance} with parallel.pp={layout.pp}: the balance loss of MoE "
                          f"layers on earlier pipeline stages is not carried to the loss yet; use model.balance="
                          f"aux_free (or none) with pipelines, or parallel.pp=1")
    if layout.ep == 1:
        return
    if mcfg.mlp != "moe":
        raise ConfigError(f"parallel.ep={layout.ep} needs an MoE model (model.mlp=moe), got model.mlp={mcfg.mlp}")
    if mcfg.n_routed_experts % layout.ep:
        raise ConfigError(f"parallel.ep={layout.ep} must divide model.n_routed_experts={mcfg.n_routed_experts}")
    stage = int(_get(cfg, "zero.stage", 0))
    if stage not in (1, 2):
        raise ConfigError(f"parallel.ep={layout.ep} with zero.stage={stage}: expert parameters are supported at "
                          f"zero.stage=1 or 2 (DeepSpeed's ZeRO-3 does not partition hand-written experts, and at "
                          f"stage 0 the step's gradient norm does not sum experts over the expert group); use "
                          f"zero.stage=1 or 2")
    if str(_get(cfg, "zero.offload_optimizer", "none")) != "none":
        raise ConfigError(f"parallel.ep={layout.ep} with zero.offload_optimizer: not supported; use "
                          f"zero.offload_optimizer=none with expert parallelism")
    if bool(_get(cfg, "train.ckpt_native", False)):
        raise ConfigError(f"parallel.ep={layout.ep} with train.ckpt_native=true: DeepSpeed's native MoE checkpoint "
                          f"needs its own MoE classes; use train.ckpt_native=false")

