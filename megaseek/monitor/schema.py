"""The metric catalogue: one row per record key, with its group, unit and Prometheus name.

Record keys (the JSONL file's keys) keep the units the trainer uses (seconds, GB, ratios); Prometheus
names follow its conventions (base units: bytes, seconds, FLOP/s; counters end in `_total`), so each row
carries the factor from one to the other. TensorBoard and wandb tags are `<group>/<key>`.
Keys not listed here still flow to every sink (group `other`, Prometheus name from the key).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

PROM_PREFIX = "megaseek_"
# Downstream scores `eval/<task>/<metric>` (any task, any metric lm-eval reports): one catalogue row, one
# Prometheus family with the task and metric as labels (megaseek_eval_score{task=..., metric=...}).
TASK_KEY = "eval/<task>/<metric>"
_TASK_RE = re.compile(r"^eval/([^/]+)/([^/]+)$")
# Per-MoE-layer statistics `moe/L<layer>/<stat>` (megaseek/model/moe/balance.py): one family, labelled by layer
# and stat (megaseek_moe_layer{layer="1", stat="max_load"}).
MOE_KEY = "moe/L<layer>/<stat>"
_MOE_RE = re.compile(r"^moe/L(\d+)/(max_load|dropped|aux_loss)$")
NOT_SCALARS = frozenset({"step", "time"})  # the x axis and the wall-clock stamp: not plotted as metrics


@dataclass(frozen=True)
class Metric:
    key: str            # record key (JSONL)
    group: str          # train | val | eval | perf | time | sys | gpu | other
    help: str
    prom: str           # Prometheus name without the prefix (a counter's without `_total`)
    kind: str = "gauge"  # gauge | counter
    scale: float = 1.0   # Prometheus value = record value x scale


_ROWS = [
    # training
    Metric("step", "train", "optimizer steps done", "step"),
    Metric("loss", "train", "mean token loss over the global batch, averaged over the log interval", "loss"),
    Metric("lr", "train", "learning rate", "learning_rate"),
    Metric("grad_norm", "train", "global gradient L2 norm (before clipping)", "grad_norm"),
    Metric("loss_scale", "train", "fp16 dynamic loss scale", "loss_scale"),
    Metric("skipped_steps", "train", "optimizer steps skipped on fp16 overflow", "skipped_steps", "counter"),
    Metric("samples", "train", "samples (sequences) seen", "samples", "counter"),
    Metric("tokens_seen", "train", "tokens seen", "tokens", "counter"),
    # model quality
    Metric("val_loss", "val", "mean token loss on the held-out split", "validation_loss"),
    Metric("val_ppl", "val", "perplexity on the held-out split", "validation_perplexity"),
    # downstream tasks and inference latency at eval steps (megaseek/eval, train.eval_tasks)
    Metric(TASK_KEY, "eval", "downstream task metric as lm-eval reports it (labels: task, metric)", "eval_score"),
    Metric("eval/seconds", "eval", "wall time of the evaluation at an eval step (not in tokens/s)", "eval_seconds"),
    Metric("eval/latency_ttft_ms_p50", "eval", "time to first token at batch 1, median (KV-cached generator)",
           "eval_time_to_first_token_p50_seconds", scale=1e-3),
    Metric("eval/latency_ttft_ms_p95", "eval", "time to first token at batch 1, 95th percentile",
           "eval_time_to_first_token_p95_seconds", scale=1e-3),
    Metric("eval/latency_decode_ms_p50", "eval", "per-token decode time at batch 1 with the KV cache, median",
           "eval_decode_token_p50_seconds", scale=1e-3),
    Metric("eval/latency_decode_ms_p95", "eval", "per-token decode time at batch 1 with the KV cache, 95th percentile",
           "eval_decode_token_p95_seconds", scale=1e-3),
    Metric("eval/latency_prompt_tokens", "eval", "prompt length of the latency measurement", "eval_latency_prompt_tokens"),
    Metric("eval/latency_new_tokens", "eval", "tokens decoded in the latency measurement", "eval_latency_new_tokens"),
    # mixture of experts (mlp=moe): per layer at every log step, over the global batch
    Metric(MOE_KEY, "moe", "per MoE layer (labels: layer, stat): max_load = max/mean expert load (1 = balanced), "
           "dropped = fraction of assignments over capacity, aux_loss = mean balance loss", "moe_layer"),
    Metric("moe/max_load", "moe", "max over MoE layers of the max/mean expert load (1 = balanced)", "moe_max_load"),
    # throughput and utilization
    Metric("tokens_per_s", "perf", "global training throughput (tokens/s)", "tokens_per_second"),
    Metric("tokens_per_s_per_rank", "perf", "throughput per rank (tokens/s)", "tokens_per_second_per_rank"),
    Metric("mfu", "perf", "model FLOPs utilization (ratio of peak)", "mfu_ratio"),
    Metric("hfu", "perf", "hardware FLOPs utilization, recomputation included (ratio of peak)", "hfu_ratio"),
    Metric("model_tflops", "perf", "achieved model FLOP/s, whole job", "model_flops_per_second", scale=1e12),
    Metric("hardware_tflops", "perf", "achieved hardware FLOP/s, whole job", "hardware_flops_per_second",
           scale=1e12),
    Metric("peak_tflops", "perf", "peak FLOP/s of the whole job that MFU is measured against",
           "peak_flops_per_second", scale=1e12),
    Metric("step_time_s", "perf", "wall time per optimizer step", "step_time_seconds"),
    # where a step's time goes (per-step means over the log interval)
    Metric("time_data_s", "time", "data-loader wait per step", "data_wait_seconds"),
    Metric("time_forward_s", "time", "forward time per step", "forward_seconds"),
    Metric("time_backward_s", "time", "backward time per step", "backward_seconds"),
    Metric("time_step_s", "time", "optimizer step time per step", "optimizer_step_seconds"),
    Metric("time_comm_s", "time", "time inside torch.distributed collectives per step", "communication_seconds"),
    Metric("comm_bytes", "time", "tensor bytes this rank handed to torch.distributed collectives per step",
           "communication_bytes"),
    Metric("time_monitor_s", "time", "time in the metrics hub on the training thread per step", "monitor_seconds"),
    # this process and its host
    Metric("cpu_percent", "sys", "CPU of this rank's process (100 = one core)", "process_cpu_percent"),
    Metric("rss_gb", "sys", "resident memory of this rank's process", "process_resident_memory_bytes",
           scale=1e9),
    Metric("num_threads", "sys", "threads of this rank's process", "process_threads"),
    Metric("host_cpu_percent", "sys", "CPU of the whole host (100 = all cores)", "host_cpu_percent"),
    Metric("host_mem_percent", "sys", "memory used on the host", "host_memory_used_percent"),
    Metric("host_mem_available_gb", "sys", "memory available on the host", "host_memory_available_bytes",
           scale=1e9),
    # the rank's GPU
    Metric("gpu_util_percent", "gpu", "GPU utilization (NVML)", "gpu_utilization_percent"),
    Metric("gpu_mem_allocated_gb", "gpu", "memory held by tensors (torch)", "gpu_memory_allocated_bytes",
           scale=1e9),
    Metric("gpu_mem_max_allocated_gb", "gpu", "peak memory held by tensors (torch)",
           "gpu_memory_max_allocated_bytes", scale=1e9),
    Metric("gpu_mem_reserved_gb", "gpu", "memory reserved by the caching allocator (torch)",
           "gpu_memory_reserved_bytes", scale=1e9),
    Metric("gpu_mem_used_gb", "gpu", "device memory in use, all processes", "gpu_memory_used_bytes", scale=1e9),
    Metric("gpu_mem_total_gb", "gpu", "device memory", "gpu_memory_total_bytes", scale=1e9),
    Metric("gpu_power_w", "gpu", "board power draw (NVML)", "gpu_power_watts"),
    Metric("gpu_temp_c", "gpu", "GPU temperature (NVML)", "gpu_temperature_celsius"),
]
CATALOG: dict[str, Metric] = {m.key: m for m in _ROWS}

# What the trainer hands over at each log step; the hub adds the system, GPU and communication rows.
TRAINER_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_rank", "samples", "mfu",
                "hfu", "model_tflops", "step_time_s", "skipped_steps", "time_data_s", "time_forward_s",
                "time_backward_s", "time_step_s")
SYSTEM_KEYS = ("cpu_percent", "rss_gb", "num_threads", "host_cpu_percent", "host_mem_percent",
               "host_mem_available_gb")


def task_metric(key: str) -> tuple[str, str] | None:
    """(task, metric) of a downstream score key `eval/<task>/<metric>`, else None."""
    m = _TASK_RE.match(key)
    return (m.group(1), m.group(2)) if m else None


def labelled(key: str) -> tuple[Metric, list, list] | None:
    """(catalogue row, label names, label values) of a key that belongs to a labelled family (downstream
    scores, per-MoE-layer statistics), else None."""
    if (tm := task_metric(key)) is not None:
        return CATALOG[TASK_KEY], ["task", "metric"], list(tm)
    if (mm := _MOE_RE.match(key)) is not None:
        return CATALOG[MOE_KEY], ["layer", "stat"], [mm.group(1), mm.group(2)]
    return None


def metric(key: str) -> Metric:
    lab = labelled(key)
    m = CATALOG.get(key) or (lab[0] if lab else None)
    if m is None:
        m = Metric(key, "other", f"record key {key}", re.sub(r"[^a-zA-Z0-9_]", "_", key))
    return m


def tag(key: str) -> str:
    """TensorBoard / wandb tag: the group, a slash, the key (keys that start with their group, `eval/...`, as
    they are)."""
    group = metric(key).group
    return key if key.startswith(group + "/") else f"{group}/{key}"


def numeric(v) -> float | None:
    """The value as a float when it is a number (bools count as 0/1), else None. NaN stays NaN."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    try:  # numpy / torch scalars
        return float(v) if hasattr(v, "__float__") and not hasattr(v, "__len__") else None
    except (TypeError, ValueError):
        return None


def finite(v) -> bool:
    x = numeric(v)
    return x is not None and math.isfinite(x)
