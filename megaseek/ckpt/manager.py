"""Collective save / load of a run's layout-free checkpoint (see checkpoint.py for the layout).

Who writes what: rank (dp 0, tp 0) of every pipeline stage writes that stage's full tensors; every rank
writes its RNG states; global rank 0 writes state.json, the tokenizer and, last, the manifest.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from megaseek.ckpt import checkpoint as C
from megaseek.ckpt.state import adam_step, base_optimizer, iter_full_state, load_full_state, set_adam_step


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _bcast_str(s: Optional[str]) -> Optional[str]:
    obj = [s]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(obj, src=0)
    return obj[0]


def persistent_buffers(module) -> dict:
    """Canonical name -> fp32 copy of each persistent buffer: model state that is not a parameter (the MoE
    e_score_correction_bias), the same on every tensor / data-parallel rank of a stage, so the stage's writer
    saves it like a full parameter (no optimizer moments)."""
    from megaseek.ckpt.state import canonical_name
    out = {}
    for prefix, mod in module.named_modules():
        for bn, b in mod._buffers.items():
            if b is not None and bn not in mod._non_persistent_buffers_set:
                out[canonical_name(module, f"{prefix}.{bn}" if prefix else bn)] = b.detach().float().clone()
    return out


class CheckpointManager:
    def __init__(self, run_dir: Path, engine, groups, model_cfg, tokenizer_path: Optional[Path],
                 skip_params=(), rng_tracker=None, keep: int = 3, native: bool = False, log=print,
                 on_files_written: Optional[Callable[[int, Path], None]] = None, rank_state: Optional[dict] = None):
        self.run_dir, self.engine, self.groups = Path(run_dir), engine, groups
        # name -> rank-local state beside the checkpoint (the PowerSGD reducer): `rank_state() -> (tensors, meta)`
        # is written to <name>-rank<r>.safetensors; `load_rank_state(file or None, saved layout, layout)` reads it
        self.rank_state = dict(rank_state or {})
        self.model_cfg, self.tokenizer_path = model_cfg, tokenizer_path
        self.skip, self.rng, self.keep, self.native, self.log = tuple(skip_params), rng_tracker, keep, native, log
        self.rank = groups.global_rank
        # called as (step, tmp dir) once this rank's files are written, before the checkpoint is finalized
        # (tests stall here to kill a run mid-save)
        self.on_files_written = on_files_written

    # --- save ---
    def save(self, step: int, state: dict) -> Path:
        """Collective. `state` (JSON-able) is written by rank 0 as state.json."""
        tmp = C.tmp_dir(self.run_dir, step)
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        g = self.groups
        writer = g.dp.rank == 0 and g.tp.rank == 0
        weights, optim, index = {}, {}, {}
        for name, full in iter_full_state(self.engine, self.engine.module, g, self.skip):
            if not writer:  # the gathers are collective; only the stage's writer keeps the tensors
                continue
            weights[name] = full["fp32"]
            optim[f"exp_avg.{name}"] = full["exp_avg"]
            optim[f"exp_avg_sq.{name}"] = full["exp_avg_sq"]
        if writer:
            weights.update(persistent_buffers(self.engine.module))
            s = g.pp.rank
            save_file(weights, str(tmp / f"weights-stage{s}.safetensors"), metadata={"format": C.FORMAT})
            save_file(optim, str(tmp / f"optim-stage{s}.safetensors"), metadata={"format": C.FORMAT})
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        if self.rng is not None:
            rng.update({f"tracker_{k}": v for k, v in self.rng.state_dict().items() if v is not None})
        save_file(rng, str(tmp / f"rng-rank{self.rank}.safetensors"))
        for key, obj in self.rank_state.items():
            tensors, meta = obj.rank_state()
            save_file(tensors, str(tmp / f"{key}-rank{self.rank}.safetensors"), metadata=meta)
        if self.on_files_written is not None:
            self.on_files_written(step, tmp)
        if self.native:  # DeepSpeed's own format beside ours (zero_to_fp32.py, DeepSpeed tools)
            self.engine.save_checkpoint(str(tmp / "ds"), tag="native", client_state={"step": step})
        # which stage file holds which tensor: gathered to rank 0
        names = [sorted(weights)] if g.dp.rank == 0 and g.tp.rank == 0 else [[]]
        allnames = [None] * dist.get_world_size() if dist.is_initialized() else [names[0]]
        if dist.is_initialized():
            dist.all_gather_object(allnames, (g.pp.rank, names[0]))
        else:
            allnames = [(0, names[0])]
        if self.rank == 0:
            for stage, ns in allnames:
                for n in ns:
                    index[n] = f"weights-stage{stage}.safetensors"
            (tmp / "state.json").write_text(__import__("json").dumps(state, indent=1))
            if self.tokenizer_path and Path(self.tokenizer_path).is_file():
                shutil.copy(self.tokenizer_path, tmp / "tokenizer.json")
        _barrier()
        path = C.checkpoint_dir(self.run_dir) / C.tag_for(step)
        if self.rank == 0:
            t = g.topo
            path = C.finalize(self.run_dir, step, {
                "layout": {"tp": t.tp, "pp": t.pp, "dp": t.dp, "world_size": t.world_size,
                           **({"ep": t.ep} if t.ep > 1 else {})},
                "model": self.model_cfg.to_dict(), "tensors": index}, self.keep)
        _barrier()
        return path

    # --- load ---
    def newest(self) -> Optional[Path]:
        """The newest whole checkpoint (verified on rank 0, agreed by all), or None."""
        found = C.newest_valid(self.run_dir, warn=self.log) if self.rank == 0 else None
        p = _bcast_str(str(found) if found else None)
        return Path(p) if p else None

    def load(self, path: Path, load_optimizer: bool = True) -> dict:
        """Collective. Loads weights (+ Adam moments, step, RNG when the world is unchanged) at this
        run's layout, whatever the layout that wrote them. Returns state.json."""
        path = Path(path)
        man = C.read_manifest(path)
        from megaseek.model.config import ModelConfig
        if ModelConfig.from_dict(dict(man["model"], fused=self.model_cfg.fused)) != self.model_cfg:  # fused: a layout
            diff = {k: (man["model"].get(k), v) for k, v in self.model_cfg.to_dict().items()
                    if k != "fused" and man["model"].get(k) != v}
            raise ValueError(f"checkpoint {path} holds another model: (checkpoint, config) differ in {diff}")
        wanted = {}
        from megaseek.ckpt.state import canonical_names
        local = canonical_names(self.engine.module)
        by_file: dict[str, list[str]] = {}
        for n in local:
            if n not in man["tensors"]:
                raise ValueError(f"checkpoint {path} has no tensor {n}")
            by_file.setdefault(man["tensors"][n], []).append(n)
        for fname, ns in by_file.items():
            with safe_open(str(path / fname), framework="pt") as fw, \
                    safe_open(str(path / fname.replace("weights-", "optim-")), framework="pt") as fo:
                for n in ns:
                    wanted[n] = {"fp32": fw.get_tensor(n), "exp_avg": fo.get_tensor(f"exp_avg.{n}"),
                                 "exp_avg_sq": fo.get_tensor(f"exp_avg_sq.{n}")}
        load_full_state(self.engine, self.engine.module, self.groups, wanted, load_optimizer)
        self._load_buffers(path, man)
        state = C.read_state(path)
        if load_optimizer:
            set_adam_step(base_optimizer(self.engine), int(state.get("adam_step", 0)))
        rng_file = path / f"rng-rank{self.rank}.safetensors"
        if man["layout"]["world_size"] == self.groups.topo.world_size and rng_file.is_file():
            with safe_open(str(rng_file), framework="pt") as f:
                keys = set(f.keys())
                torch.set_rng_state(f.get_tensor("cpu"))
                if "cuda" in keys and torch.cuda.is_available():
                    torch.cuda.set_rng_state(f.get_tensor("cuda"))
                if self.rng is not None and "tracker_cpu" in keys:
                    self.rng.load_state_dict({"cpu": f.get_tensor("tracker_cpu"),
                                              "cuda": f.get_tensor("tracker_cuda") if "tracker_cuda" in keys else None})
        t = self.groups.topo
        for key, obj in self.rank_state.items():
            f = path / f"{key}-rank{self.rank}.safetensors"
            obj.load_rank_state(f if f.is_file() else None, man["layout"],
                                {"dp": t.dp, "tp": t.tp, "pp": t.pp, "world_size": t.world_size})
        _barrier()
        return state

    def _load_buffers(self, path: Path, man: dict) -> None:
        """Persistent buffers from the stage files (a checkpoint written before buffers were saved keeps them)."""
        from megaseek.ckpt.state import canonical_name
        module = self.engine.module
        with torch.no_grad():
            for prefix, mod in module.named_modules():
                for bn, b in mod._buffers.items():
                    c = canonical_name(module, f"{prefix}.{bn}" if prefix else bn)
                    if b is None or bn in mod._non_persistent_buffers_set or c not in man["tensors"]:
                        continue
                    with safe_open(str(path / man["tensors"][c]), framework="pt") as f:
                        b.copy_(f.get_tensor(c).to(b.dtype))

    def optimizer_step_count(self) -> int:
        return adam_step(base_optimizer(self.engine))
