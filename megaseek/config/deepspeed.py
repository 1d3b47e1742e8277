"""The ONLY place DeepSpeed JSON keys live: the Hydra config -> DeepSpeed config dict."""
from __future__ import annotations

from typing import Any

from megaseek.config.schema import Layout


def deepspeed_config(cfg, layout: Layout) -> dict:
    """`cfg`: the composed config (or a dict of it); read through the typed sections, whose defaults apply."""
    from megaseek.config.sections import RunConfig
    run = RunConfig.from_config(cfg)
    zero, prec = run.zero, run.precision
    stage = zero.stage
    zc: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zc["reduce_bucket_size"] = int(zero.reduce_bucket_size)
        zc["overlap_comm"] = bool(zero.overlap_comm)
    if stage >= 2:
        zc["contiguous_gradients"] = bool(zero.contiguous_gradients)
    if zero.offload_optimizer == "cpu":
        zc["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if zero.offload_param == "cpu":
        zc["offload_param"] = {"device": "cpu", "pin_memory": False}
    if stage == 3:
        # keep gathering predictable on small models; large ones override via zero.* keys if needed
        zc["stage3_param_persistence_threshold"] = int(zero.stage3_param_persistence_threshold)
        zc["stage3_prefetch_bucket_size"] = int(zero.stage3_prefetch_bucket_size)
        zc["stage3_max_live_parameters"] = int(zero.stage3_max_live_parameters)
        zc["stage3_gather_16bit_weights_on_model_save"] = False

    ds: dict[str, Any] = {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": float(run.train.grad_clip),
        "zero_optimization": zc,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if prec.name == "bf16":
        ds["bf16"] = {"enabled": True}
    elif prec.name == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic: x2 after a clean window, x0.5 on overflow (DeepSpeed's factors)
            "initial_scale_power": int(prec.initial_scale_power),
            "loss_scale_window": int(prec.loss_scale_window),
            "hysteresis": int(prec.hysteresis),
            "min_loss_scale": float(prec.min_loss_scale),
        }
    return ds
