"""What the planner plans: a model, a parallel layout and the training knobs that change memory or time.

`Setup.from_config(cfg, world_size)` reads the Hydra config (the same keys `validate()` reads);
`replace(setup, tp=..)` makes the candidate layouts of a search.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from megaseek.model.config import ModelConfig

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    node = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return default if node is None else node


@dataclass(frozen=True)
class Setup:
    model: ModelConfig
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1                        # expert-parallel degree, carved out of dp (parallel.ep)
    micro_batch: int = 1
    global_batch: int = 1
    seq_len: int = 128
    sequence_parallel: bool = False
    zero_stage: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False
    precision: str = "fp32"
    checkpointing: str = "none"        # none | selective | full
    reduce_bucket_size: int = 50_000_000   # elements (DeepSpeed zero_optimization.reduce_bucket_size)
    allreduce_bucket_size: int = 500_000_000  # elements (DeepSpeed's stage-0 gradient all-reduce bucket)
    prefetch_bucket_size: int = 50_000_000    # elements (ZeRO-3 parameter prefetch)
    max_live_parameters: int = 1_000_000_000  # ZeRO-3 keeps up to this many gathered parameters (DeepSpeed default)
    partition: str = "parameters"      # pipeline stage partitioning (megaseek/pipeline/partition.py)
    overlap_comm: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def grad_accum(self) -> int:
        return max(1, self.global_batch // (self.micro_batch * self.dp))

    @property
    def bytes_per_value(self) -> int:
        return BYTES[self.precision]

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    def with_(self, **kw) -> "Setup":
        return replace(self, **kw)

    def describe(self) -> str:
        off = []
        if self.offload_optimizer:
            off.append("opt->cpu")
        if self.offload_param:
            off.append("param->cpu")
        return (f"tp={self.tp} pp={self.pp} dp={self.dp}{f' ep={self.ep}' if self.ep > 1 else ''} zero={self.zero_stage}{'(' + ','.join(off) + ')' if off else ''}"
                f" mb={self.micro_batch} accum={self.grad_accum} sp={'on' if self.sp else 'off'}"
                f" ckpt={self.checkpointing} {self.precision}")

    @classmethod
    def from_config(cls, cfg: Mapping, world_size: int) -> "Setup":
        model = ModelConfig.from_dict(dict(_get(cfg, "model")))
        tp, pp = int(_get(cfg, "parallel.tp", 1)), int(_get(cfg, "parallel.pp", 1))
        dp = max(1, world_size // max(1, tp * pp))
        return cls(model=model, tp=tp, pp=pp, dp=dp, ep=int(_get(cfg, "parallel.ep", 1) or 1),
                   micro_batch=int(_get(cfg, "train.micro_batch_size", 1)),
                   global_batch=int(_get(cfg, "train.global_batch_size", 1)),
                   seq_len=int(_get(cfg, "train.seq_len", model.max_seq_len)),
                   sequence_parallel=bool(_get(cfg, "parallel.sequence_parallel", False)),
                   zero_stage=int(_get(cfg, "zero.stage", 0)),
                   offload_optimizer=str(_get(cfg, "zero.offload_optimizer", "none")) == "cpu",
                   offload_param=str(_get(cfg, "zero.offload_param", "none")) == "cpu",
                   precision=str(_get(cfg, "precision.name", "fp32")),
                   checkpointing=str(_get(cfg, "train.activation_checkpointing", "none")),
                   reduce_bucket_size=int(float(_get(cfg, "zero.reduce_bucket_size", 5e7))),
                   prefetch_bucket_size=int(float(_get(cfg, "zero.stage3_prefetch_bucket_size", 5e7))),
                   max_live_parameters=int(float(_get(cfg, "zero.stage3_max_live_parameters", 1e9))),
                   partition=str(_get(cfg, "parallel.partition", "parameters")),
                   overlap_comm=bool(_get(cfg, "zero.overlap_comm", False)))
