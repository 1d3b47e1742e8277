"""Typed config sections: each Hydra group a dataclass holding every default in one place.

The dataclasses are registered in Hydra's ConfigStore as `<group>/schema`; conf/<group>/default.yaml
extends its schema (and presets override values), so a key exists only where its dataclass declares it.
`RunConfig.from_config(cfg)` turns a composed config into the typed sections; an unknown key is refused with
one message naming it and the closest valid key (Hydra's own error for `group.key=` overrides of missing keys
is preceded by the same check in the launch scripts: `check_overrides`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from megaseek.config.schema import ConfigError
from megaseek.model.config import ModelConfig, unknown_key_message


@dataclass
class SamplingSection:
    """The end-of-run sample: readable and repetition-free by default."""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.3


@dataclass
class TrainConfig:
    steps: int = 150
    micro_batch_size: int = 4
    global_batch_size: int = 16
    seq_len: int = 128
    save_interval: int = 1000        # the final step always saves
    log_interval: int = 10
    grad_clip: float = 1.0
    activation_checkpointing: str = "none"   # none | full | selective (attention only)
    eval_interval: int = 0           # 0: no periodic validation
    eval_batches: int = 4
    eval_tasks: list = field(default_factory=list)  # lm-eval tasks scored every eval_interval steps (megaseek/eval)
    eval_tasks_path: Optional[str] = None  # a directory of more task YAMLs (as lm_eval --include_path)
    eval_limit: Optional[int] = None  # examples per task (null: all)
    eval_batch_size: int = 32        # lm-eval requests per forward
    eval_latency_tokens: int = 16    # batch-1 TTFT / decode latency at eval steps: tokens decoded (0: off)
    eval_log_samples: bool = False   # per-example results to run_dir/eval/step<N>/<task>.jsonl (rank 0)
    sample_tokens: int = 48          # sample printed at the end (0: none)
    sample_prompt: str = "def "
    sampling: SamplingSection = field(default_factory=SamplingSection)
    ckpt_keep: int = 3               # keep the newest K checkpoints (0: all)
    ckpt_native: bool = False        # also write DeepSpeed's own format (zero_to_fp32.py, DeepSpeed tools)
    max_bad_steps: int = 3           # consecutive steps with non-finite loss/gradients before...
    on_bad_steps: str = "rollback"   # ...rolling back to the newest checkpoint (rollback) or stopping (stop)
    max_rollbacks: int = 2
    init_from: Optional[str] = None  # a run or checkpoint directory: its weights only (step 0, fresh optimizer)
    qat: str = "none"                # none | int<b>w | int8a_int<b>w: fake-quantized training (train/compress.py)
    qat_group_size: int = 32         # input columns per weight quantization group (QAT)
    sparsity: str = "none"           # none | 2:4: magnitude 2:4 masks, kept after every optimizer step
    compile: bool = False            # regional torch.compile of the decoder blocks (megaseek/model/decoder.py)
    gemm: str = "auto"               # auto | onednn | aten: the projections' GEMM library (tensor_parallel/gemm.py)


@dataclass
class PowerSGDSection:
    """PowerSGD compression of the data-parallel gradient reduction (megaseek/distributed/powersgd.py), at
    zero.stage=0 only. Each matrix gradient (n, m) moves (n + m) * rank numbers instead of n * m."""
    rank: int = 0                    # 0: off (DeepSpeed's plain all-reduce)
    warmup_steps: int = 10           # the first optimizer steps all-reduce everything (state checkpointed)
    error_feedback: bool = True      # carry what the compression dropped into the next step


@dataclass
class ParallelConfig:
    """Tensor and pipeline degree; data-parallel degree = world size / (tp * pp)."""
    tp: int = 1
    pp: int = 1
    ep: int = 1                      # expert parallel: routed experts sharded over ep data-parallel ranks (MoE)
    sequence_parallel: bool = False
    partition: str = "parameters"    # pipeline stages balanced by `parameters` (memory), `cost` (active FLOPs) or `uniform` layer counts
    powersgd: PowerSGDSection = field(default_factory=PowerSGDSection)


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO stage 0-3; offload targets `cpu` or `none` (param offload needs stage 3)."""
    stage: int = 1
    offload_optimizer: str = "none"
    offload_param: str = "none"
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 0       # ZeRO-3: parameters below this many elements stay whole
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    weight_decay: float = 0.01       # not applied to norms and biases
    warmup_steps: int = 20           # linear warmup, then cosine decay to min_lr at decay_steps
    decay_steps: Optional[int] = None  # null: train.steps


@dataclass
class PrecisionConfig:
    name: str = "fp32"               # fp32 | bf16 | fp16 | fp8 (GPU only, see distributed/fp8.py)
    # fp16 dynamic loss scaling: initial 2^16, x2 after `loss_scale_window` clean steps, x0.5 on overflow
    initial_scale_power: int = 16
    loss_scale_window: int = 2000
    hysteresis: int = 2
    min_loss_scale: int = 1


@dataclass
class RewardConfig:
    """launch/reward.py: Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - m), m = margin + the pair's
    optional "margin" field. `fn`: a verifiable reward module:function for GRPO / PPO."""
    margin: float = 0.0
    fn: Optional[str] = None         # fn(completion_text, line_fields) -> float
    model: Optional[str] = None      # launch/ppo.py: a reward-model run / checkpoint directory


@dataclass
class DPOConfig:
    """launch/dpo.py: see megaseek/tasks/dpo.py for the losses."""
    beta: float = 0.1
    loss: str = "sigmoid"            # sigmoid | ipo
    label_smoothing: float = 0.0     # sigmoid only: the assumed probability that a pair's labels are flipped


@dataclass
class GRPOConfig:
    """launch/grpo.py: see megaseek/tasks/grpo.py (group advantages, the clipped objective, the loop)."""
    group_size: int = 4
    advantage: str = "group_norm"    # group_norm | loo
    clip: float = 0.2
    kl_coef: float = 0.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 16
    prompts: int = 0                 # prompts per rollout; 0: global_batch_size / group_size
    epochs: int = 1


@dataclass
class PPOConfig:
    """launch/ppo.py: see megaseek/tasks/ppo.py (the math) and megaseek/tasks/ppo_stage.py (the loop)."""
    kl_coef: float = 0.05
    kl_estimator: str = "k1"         # k1 | k3
    kl_target: float = 0.0           # > 0: adaptive coefficient
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    epochs: int = 2
    minibatches: int = 1
    missing_eos_penalty: float = 0.0
    temperature: float = 1.0
    max_new_tokens: int = 16
    keep_rollouts: int = 2           # newest rollouts kept in run_dir/rollouts (a resume needs its own); 0: all


SCHEMAS = {"train": TrainConfig, "parallel": ParallelConfig, "zero": ZeroConfig, "optimizer": OptimizerConfig,
           "precision": PrecisionConfig, "model": ModelConfig, "reward": RewardConfig, "dpo": DPOConfig,
           "grpo": GRPOConfig, "ppo": PPOConfig}


def register() -> None:
    """Make `<group>/schema` known to Hydra (idempotent; call before composing)."""
    from hydra.core.config_store import ConfigStore
    cs = ConfigStore.instance()
    for group, cls in SCHEMAS.items():
        cs.store(group=group, name="schema", node=cls)


def _typed(cls, section: str, d: Mapping[str, Any]):
    known = [f.name for f in fields(cls)]
    unknown = [k for k in d if k not in known]
    if unknown:
        raise ConfigError(unknown_key_message(section, unknown, known))
    kw = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None) \
                and isinstance(v, Mapping):
            v = _typed(type(f.default_factory()), f"{section}.{f.name}", v)
        kw[f.name] = v
    return cls(**kw)


@dataclass
class RunConfig:
    model: ModelConfig
    train: TrainConfig
    parallel: ParallelConfig
    zero: ZeroConfig
    optimizer: OptimizerConfig
    precision: PrecisionConfig
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    seed: int = 1234
    run_dir: Optional[str] = None

    @classmethod
    def from_config(cls, cfg) -> "RunConfig":
        from omegaconf import OmegaConf
        d = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
        out = {g: _typed(c, g, d.get(g) or {}) for g, c in SCHEMAS.items()}
        return cls(**out, seed=int(d.get("seed", 1234)), run_dir=d.get("run_dir"))


def known_keys(cfg) -> set:
    """Every dotted key of a composed config (for `check_overrides`)."""
    from omegaconf import OmegaConf
    out = set()

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                out.add(prefix + str(k))
                walk(v, prefix + str(k) + ".")
    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def check_overrides(overrides: list[str], keys: set) -> None:
    """Refuse `a.b=v` overrides (not `+a.b=`, `~a.b`, group selections or hydra.*) of keys that do not exist,
    naming the closest valid key."""
    import difflib
    bad = []
    for o in overrides:
        if o.startswith(("+", "~", "-")) or "=" not in o:
            continue
        k = o.split("=", 1)[0]
        if k.startswith("hydra.") or k in keys:  # group selections (`model=small`) are keys too
            continue
        close = difflib.get_close_matches(k, sorted(keys), n=1, cutoff=0.6)
        bad.append(f"unknown key {k}" + (f" (did you mean {close[0]}?)" if close else ""))
    if bad:
        raise ConfigError("; ".join(bad))
