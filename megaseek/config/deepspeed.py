"""The ONLY place DeepSpeed JSON keys live: the Hydra config -> DeepSpeed config dict."""
from __future__ import annotations

from typing import Any, Mapping

from megaseek.config.schema import Layout


def deepspeed_config(cfg: Mapping[str, Any], layout: Layout) -> dict:
    zero, prec, train = cfg["zero"], cfg["precision"], cfg["train"]
    stage = int(zero["stage"])
    zc: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zc["reduce_bucket_size"] = int(zero.get("reduce_bucket_size", 5e7))
        zc["overlap_comm"] = bool(zero.get("overlap_comm", False))
    if stage >= 2:
        zc["contiguous_gradients"] = bool(zero.get("contiguous_gradients", True))
    if zero.get("offload_optimizer", "none") == "cpu":
        zc["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if zero.get("offload_param", "none") == "cpu":
        zc["offload_param"] = {"device": "cpu", "pin_memory": False}
    if stage == 3:
        # keep gathering predictable on small models; large ones override via zero.* keys if needed
        zc["stage3_param_persistence_threshold"] = int(zero.get("stage3_param_persistence_threshold", 0))
        zc["stage3_prefetch_bucket_size"] = int(zero.get("stage3_prefetch_bucket_size", 5e7))
        zc["stage3_gather_16bit_weights_on_model_save"] = False

    ds: dict[str, Any] = {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": float(train.get("grad_clip", 1.0)),
        "zero_optimization": zc,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    name = prec["name"]
    if name == "bf16":
        ds["bf16"] = {"enabled": True}
    elif name == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic: x2 after a clean window, x0.5 on overflow (DeepSpeed's factors)
            "initial_scale_power": int(prec.get("initial_scale_power", 16)),
            "loss_scale_window": int(prec.get("loss_scale_window", 2000)),
            "hysteresis": int(prec.get("hysteresis", 2)),
            "min_loss_scale": float(prec.get("min_loss_scale", 1)),
        }
    return ds
