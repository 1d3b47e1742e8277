"""Layout-free training state: every parameter as its FULL tensor under its canonical (tp = 1) name, with
its fp32 master copy and Adam moments, whatever the (dp, tp, pp, ZeRO stage) that produced it.

Gathering (collective over each parameter's groups, every rank calls it in the same order):
  ZeRO / bf16 shards  -> DeepSpeed's `safe_get_full_*` (all-gather over the data-parallel group)
  tensor shards       -> all-gather over the tensor group along `partition_dim`, vocab padding stripped
  pipeline stages     -> each stage writes its own layers; the last stage's tied-embedding copy is skipped
  expert shards (ep)  -> all-gather over the expert-parallel group: every routed expert under its global index
                         (grouped expert tensors (E/ep, ...) are written per expert: `experts.{e}.*_proj.weight`)
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
    """The canonical names of this stage's parameters (a fused projection counts as its unfused parts, grouped
    routed experts as their local experts' per-expert parts)."""
    return {n for name, p in model.named_parameters() for n in _part_names(canonical_name(model, name), p)}


def _part_names(cname: str, p) -> list[str]:
    if getattr(p, "expert_parts", None) is not None:
        return _local_part_names(cname, p)
    return fused_part_names(cname, p)


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


def _grouped_expert_state(engine, p, cname: str, groups) -> Iterator[tuple[str, dict]]:
    """A grouped expert parameter (megaseek/model/moe/experts.py: (E_l, rows/tp, cols) for this rank's E_l
    experts) -> (canonical per-expert name, full tensors) of its parts for every expert of the layer: one
    all-gather over tp (each part's shards concatenated along its tensor dim), then one over ep (rank r holds
    global experts [r E_l, (r+1) E_l), so the ranks' tensors concatenate in expert order); at ep = 1 the
    rank's own experts (all of them)."""
    from megaseek.model.moe.experts import expert_part_names, gather_tp_parts
    tp, ep = groups.tp, getattr(groups, "ep", None)
    parts = {}  # key -> [part (E, rows, cols)]
    for key in KEYS:  # ZeRO gathers over the expert-data-parallel group (_local_full)
        t = _local_full(engine, p, key).contiguous()  # (E_l, rows/tp, cols) | (E_l, h, i/tp)
        shards = [t]
        if tp.size > 1:
            shards = [torch.empty_like(t) for _ in range(tp.size)]
            dist.all_gather(shards, t, group=tp.group)
        full = [x.contiguous() for x in gather_tp_parts(shards, p.expert_parts)]  # [(E_l, rows, cols)]
        if ep is not None and ep.size > 1:
            every = [[torch.empty_like(x) for _ in range(ep.size)] for x in full]
            for x, out in zip(full, every):
                dist.all_gather(out, x, group=ep.group)
            full = [torch.cat(out) for out in every]  # (E, rows, cols)
        parts[key] = full
    first = 0 if ep is not None and ep.size > 1 else p.expert_first
    n = parts[KEYS[0]][0].shape[0]
    for j, names in enumerate(expert_part_names(cname, p.expert_parts, range(first, first + n))):
        for k, name in enumerate(names):
            yield name, {key: parts[key][k][j].contiguous() for key in KEYS}


def _local_part_names(cname: str, p) -> list[str]:
    """The per-expert canonical names a grouped expert parameter holds here (its local experts)."""
    from megaseek.model.moe.experts import expert_part_names
    n_local = _local_shape(p)[0]
    return [n for row in expert_part_names(cname, p.expert_parts, range(p.expert_first, p.expert_first + n_local)) for n in row]


def iter_full_state(engine, model, groups, skip=()) -> Iterator[tuple[str, dict]]:
    """Yield (canonical name, {fp32, exp_avg, exp_avg_sq: full tensor}) for this stage's parameters.
    Collective: every rank of the stage calls it; all ranks get the tensors (writers pick who saves).
    At ep > 1 every rank gets every routed expert (its own and, gathered over the expert-parallel group, the
    others'): the same tensors and names as at ep = 1."""
    skip_ids = {id(p) for p in skip}
    relink_hp_optimizer_state(engine)
    for name, p in model.named_parameters():
        if id(p) in skip_ids:
            continue
        if getattr(p, "expert_parts", None) is not None:  # grouped routed experts: per-expert names and tensors
            yield from _grouped_expert_state(engine, p, canonical_name(model, name), groups)
            continue
        full = {}
        for key in KEYS:  # ZeRO gathers over dp (experts: over the expert-data-parallel group), then tp
            t = _gather_tp(_local_full(engine, p, key), p, groups.tp)
            rows = getattr(p, "vocab_rows", None)
            if rows is not None:
                t = t[:rows]  # strip vocabulary padding
            full[key] = t.contiguous()
        cname = canonical_name(model, name)
        if getattr(p, "fused_parts", None) is not None:  # fused q,k,v / gate,up: the unfused full parts
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
        names = _part_names(cname, p)  # [cname], a fused projection's unfused parts, or local experts' parts
        if any(n not in tensors for n in names):
            missing.extend(n for n in names if n not in tensors)
            continue
        if getattr(p, "expert_parts", None) is not None:
            _load_grouped_experts(engine, p, names, groups, tensors, load_optimizer)
            continue
        entry = tensors[cname] if len(names) == 1 else {  # fused: the grouped full tensor, sliced below
            k: fuse_full([tensors[n][k] for n in names], p.fused_groups) for k in tensors[names[0]]}
        for key in KEYS if load_optimizer else ("fp32",):
            _set_local_full(engine, p, key, shard_for(entry[key], p, groups.tp, _local_shape(p)))
    return missing


def _load_grouped_experts(engine, p, names: list[str], groups, tensors: dict, load_optimizer: bool) -> None:
    """Per-expert full tensors (names: local experts in order, parts inner) -> this rank's grouped shard."""
    from megaseek.model.moe.experts import shard_tp_parts
    n_parts = len(p.expert_parts)
    for key in KEYS if load_optimizer else ("fp32",):
        full = [torch.stack([tensors[n][key] for n in names[k::n_parts]]) for k in range(n_parts)]  # (E_l, r, c)
        _set_local_full(engine, p, key, shard_tp_parts(full, p.expert_parts, groups.tp.size, groups.tp.rank).contiguous())
