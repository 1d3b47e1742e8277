"""Layout-free training state: every parameter as its FULL tensor under its canonical (tp = 1) name, with
its fp32 master copy and Adam moments, whatever the (dp, tp, pp, ZeRO stage) that produced it.

Gathering (collective over each parameter's groups, every rank calls it in the same order):
  ZeRO / bf16 shards  -> DeepSpeed's `safe_get_full_*` (all-gather over the data-parallel group)
  tensor shards       -> all-gather over the tensor group along `partition_dim`, vocab padding stripped
  pipeline stages     -> each stage writes its own layers; the last stage's tied-embedding copy is skipped
  expert shards (ep)  -> all-gather over the expert-parallel group: every routed expert under its global index
Scattering is the reverse: slice the full tensor for this rank's shard (pad the vocabulary), then
`safe_set_full_*`; an expert-parallel rank reads only its own experts (names carry the global expert
index). Loading therefore works at any layout: that is how a run changes layout on resume.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megaseek.tensor_parallel.layers import fuse_full, fused_part_names, fused_split

KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def canonical_names(model) -> set:
    """The canonical names of this stage's parameters (a fused projection counts as its unfused parts)."""
    return {n for name, p in model.named_parameters() for n in fused_part_names(canonical_name(model, name), p)}


def canonical_name(model, name: str) -> str:
    """The parameter's name at tp = 1, pp = 1, as the model's state adapter defines it."""
    from megaseek.model.adapter import adapter_for
    return adapter_for(model.cfg).canonical(name, getattr(model, "first_layer", 0))


def base_optimizer(engine):
    """The torch / DeepSpeed Adam under DeepSpeed's wrappers (ZeRO, bf16)."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    if hasattr(opt, "optimizer") and isinstance(getattr(opt, "optimizer"), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _flat_partitions(engine) -> list:
    """The fp32 tensors DeepSpeed's wrapped optimizer keys its state by (ZeRO-3, ZeRO-1/2, bf16)."""
    zo = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(zo, attr):
            return list(getattr(zo, attr))
    return []


def ensure_adam_state(opt: torch.optim.Optimizer, extra=()) -> None:
    """Create zero Adam moments (lazily created on the first step) so that they can be overwritten."""
    params = [p for group in opt.param_groups for p in group["params"]] + list(extra)
    for p in params:
        if True:
            st = opt.state[p]
            if "exp_avg" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32) if not _is_ds_cpu_adam(opt) else 0
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def relink_hp_optimizer_state(engine) -> None:
    """Point every parameter's DeepSpeed fragment mapping at the Adam state of its flat partition.

    DeepSpeed's ZeRO-1/2 and bf16 optimizers link this lazily after stepping the FIRST param group, so the
    fragments of later groups (our no-decay group) stay empty; link all groups now (idempotent)."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state
    zo = engine.optimizer
    pairs = None
    if hasattr(zo, "single_partition_of_fp32_groups") and hasattr(zo, "bit16_groups"):
        pairs = zip(zo.bit16_groups, zo.single_partition_of_fp32_groups)
    elif hasattr(zo, "fp32_groups_flat_partition") and hasattr(zo, "bf16_groups"):
        pairs = zip(zo.bf16_groups, zo.fp32_groups_flat_partition)
    if pairs is None:
        return
    state = base_optimizer(engine).state
    for lp_params, flat in pairs:
        if flat in state and "exp_avg" in state[flat]:
            lazy_init_hp_params_optimizer_state(lp_params, flat, state)


def _is_ds_cpu_adam(opt) -> bool:
    return type(opt).__name__ == "DeepSpeedCPUAdam"


def adam_step(opt) -> int:
    for st in opt.state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def set_adam_step(opt, step: int) -> None:
    for st in opt.state.values():
        if "step" in st:
            st["step"] = step if isinstance(st["step"], int) else torch.tensor(float(step), dtype=torch.float32)


def _local_full(engine, p: torch.nn.Parameter, key: str) -> torch.Tensor:
    """This tensor rank's shard of `key`, complete over ZeRO / data parallel (collective for ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        t = safe_get_full_fp32_param(p) if key == "fp32" else safe_get_full_optimizer_state(p, key)
        return t.detach().float().cpu()
    if key == "fp32":
        return p.detach().float().cpu()
    st = base_optimizer(engine).state.get(p, {})
    return st[key].detach().float().cpu() if key in st else torch.zeros_like(p, dtype=torch.float32, device="cpu")


def _set_local_full(engine, p: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        dev_val = value.to(p.device if not hasattr(p, "ds_id") else value.device)
        if key == "fp32":
            safe_set_full_fp32_param(p, dev_val)
            if not hasattr(p, "ds_id"):  # ZeRO-1/2, bf16: the module's (low-precision) copy too
                with torch.no_grad():
                    p.copy_(value.to(p.device, p.dtype))
            else:  # ZeRO-3: the module's partition too (gather, set on every rank alike, re-partition)
                import deepspeed
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                    p.copy_(value.to(p.device, p.dtype))
        else:
            safe_set_full_optimizer_state(p, dev_val, key)
        return
    if key == "fp32":
        with torch.no_grad():
            p.copy_(value.to(p.device, p.dtype))
        return
    st = base_optimizer(engine).state[p]
    st[key].copy_(value.to(st[key].device, st[key].dtype))


def _gather_tp(t: torch.Tensor, p, tp) -> torch.Tensor:
    dim = getattr(p, "partition_dim", None)
    if tp.size == 1 or dim is None:
        return t
    parts = [torch.empty_like(t) for _ in range(tp.size)]
    dist.all_gather(parts, t.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


def _gather_experts(full: dict, name: str, p, model, ep) -> Iterator[tuple[str, dict]]:
    """Expert parameter at ep > 1 -> (canonical name, full tensors) of its counterpart on EVERY rank of the
    expert-parallel group: slot j of rank r is global expert r E/ep + j, and the ranks' named_parameters walk
    their slots in the same order, so one all-gather per tensor over the ep group pairs them up."""
    from megaseek.model.moe.experts import owned_expert_names
    names = owned_expert_names(name, p.expert_index, model.cfg.n_routed_experts, ep.size, ep.rank)
    parts = {key: [torch.empty_like(t) for _ in range(ep.size)] for key, t in full.items()}
    for key, t in full.items():
        dist.all_gather(parts[key], t, group=ep.group)
    for r, n in enumerate(names):
        yield n, {key: parts[key][r] for key in full}


def iter_full_state(engine, model, groups, skip=()) -> Iterator[tuple[str, dict]]:
    """Yield (canonical name, {fp32, exp_avg, exp_avg_sq: full tensor}) for this stage's parameters.
    Collective: every rank of the stage calls it; all ranks get the tensors (writers pick who saves).
    At ep > 1 every rank gets every routed expert (its own and, gathered over the expert-parallel group, the
    others'): the same tensors and names as at ep = 1."""
    skip_ids = {id(p) for p in skip}
    ep = getattr(groups, "ep", None)
    relink_hp_optimizer_state(engine)
    for name, p in model.named_parameters():
        if id(p) in skip_ids:
            continue
        full = {}
        for key in KEYS:  # ZeRO gathers over dp (experts: over the expert-data-parallel group), then tp
            t = _gather_tp(_local_full(engine, p, key), p, groups.tp)
            rows = getattr(p, "vocab_rows", None)
            if rows is not None:
                t = t[:rows]  # strip vocabulary padding
            full[key] = t.contiguous()
        cname = canonical_name(model, name)
        if ep is not None and ep.size > 1 and hasattr(p, "expert_index"):
            yield from _gather_experts(full, cname, p, model, ep)
        elif getattr(p, "fused_parts", None) is not None:  # fused q,k,v / gate,up: the unfused full parts
            parts = {key: fused_split(t, p) for key, t in full.items()}
            for j, n in enumerate(fused_part_names(cname, p)):
                yield n, {key: v[j].contiguous() for key, v in parts.items()}
        else:
            yield cname, full


def shard_for(full: torch.Tensor, p, tp, local_shape) -> torch.Tensor:
    """This rank's slice of a full tensor (padding the vocabulary with zeros where needed)."""
    dim = getattr(p, "partition_dim", None)
    if tp.size == 1 or dim is None:
        if tuple(full.shape) != tuple(local_shape) and len(local_shape) == full.ndim:  # padded vocab at tp=1
            return _pad(full, local_shape[0])
        return full
    n = local_shape[dim] * tp.size
    if full.shape[dim] < n:  # vocabulary padding
        full = _pad(full, n) if dim == 0 else full
    return full.narrow(dim, tp.rank * local_shape[dim], local_shape[dim]).contiguous()


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t
    out = torch.zeros((rows,) + tuple(t.shape[1:]), dtype=t.dtype)
    out[: t.shape[0]] = t
    return out


def _local_shape(p) -> tuple:
    if hasattr(p, "ds_shape"):  # ZeRO-3 keeps the real shape aside
        return tuple(p.ds_shape)
    return tuple(p.shape)


def load_full_state(engine, model, groups, tensors: dict[str, dict], load_optimizer: bool = True) -> list[str]:
    """Set every local parameter (and its Adam moments) from full tensors; returns names not found."""
    ensure_adam_state(base_optimizer(engine), _flat_partitions(engine))
    relink_hp_optimizer_state(engine)
    missing = []
    for name, p in model.named_parameters():
        cname = canonical_name(model, name)
        names = fused_part_names(cname, p)  # [cname], or a fused projection's unfused parts
        if any(n not in tensors for n in names):
            missing.extend(n for n in names if n not in tensors)
            continue
        entry = tensors[cname] if len(names) == 1 else {  # fused: the grouped full tensor, sliced below
            k: fuse_full([tensors[n][k] for n in names], p.fused_groups) for k in tensors[names[0]]}
        for key in KEYS if load_optimizer else ("fp32",):
            _set_local_full(engine, p, key, shard_for(entry[key], p, groups.tp, _local_shape(p)))
    return missing
