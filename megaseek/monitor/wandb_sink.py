"""Weights & Biases (rank 0). Files go under `run_dir/wandb/`.

Mode: `logging.wandb.mode` = `auto` (online when WANDB_API_KEY is set, else offline), `offline`,
`online` or `disabled`. An online start that fails (no login, no network) falls back to offline with
a warning: a run never dies for its dashboard. Offline runs are uploaded later with `wandb sync`.

Run identity: the id is kept in `run_dir/wandb/megaseek_run_id`, so a run started again in the same
run_dir (a resume) continues the same wandb run (`resume="allow"`). Name, config and tags come from the
Hydra config: name = `logging.wandb.name`, else the run directory's name (a sweep job: its overrides);
group = `logging.wandb.group`, else the sweep directory of a `-m` sweep; config = the resolved config
(plus the command-line overrides when Hydra is running); tags = `logging.wandb.tags` + model, precision,
ZeRO stage, layout and the command-line overrides.
"""
from __future__ import annotations

import os
import secrets
import warnings
from pathlib import Path
from typing import Any, Optional

from megaseek.monitor.schema import NOT_SCALARS, numeric, tag

ID_FILE = "megaseek_run_id"


def resolve_mode(mode: Optional[str]) -> str:
    mode = str(mode or "auto").lower()
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logging.wandb.mode={mode}: use auto, online, offline or disabled")
    return mode


def _auto_tags(run_config: dict) -> list[str]:
    c = run_config or {}
    tags = []
    model = (c.get("model") or {}).get("name")
    prec = (c.get("precision") or {}).get("name")
    zero = (c.get("zero") or {}).get("stage")
    par = c.get("parallel") or {}
    if model:
        tags.append(f"model:{model}")
    if prec:
        tags.append(f"precision:{prec}")
    if zero is not None:
        tags.append(f"zero:{zero}")
    if par:
        tags.append(f"tp{par.get('tp', 1)}-pp{par.get('pp', 1)}")
    return tags


def hydra_identity(run_dir: Path, cfg: Any) -> dict:
    """Name, group and override tags from Hydra. A single run is named after its run directory; a job of
    a sweep (`-m`) after its overrides (`optimizer.lr=1e-4`), grouped by the sweep directory. Explicit
    `logging.wandb.name` / `.group` win."""
    out = {"name": Path(run_dir).name, "group": None, "overrides": None}
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        if HydraConfig.initialized():
            hc = HydraConfig.get()
            out["overrides"] = list(hc.overrides.task)
            if hc.mode == RunMode.MULTIRUN:
                out["name"] = hc.job.override_dirname or f"{hc.job.name}-{hc.job.num}"
                out["group"] = Path(str(hc.sweep.dir)).name
    except Exception:
        pass
    out["name"] = cfg.get("name") or out["name"]
    out["group"] = cfg.get("group") or out["group"]
    return out


class WandbSink:
    def __init__(self, cfg: Any, run_dir: Path, run_config: Optional[dict], world_size: int = 1):
        import wandb
        self.mode = resolve_mode(cfg.get("mode"))
        wdir = Path(run_dir) / "wandb"
        wdir.mkdir(parents=True, exist_ok=True)
        id_path = wdir / ID_FILE
        self.run_id = id_path.read_text().strip() if id_path.exists() else secrets.token_hex(4)
        id_path.write_text(self.run_id)
        config = dict(run_config or {})
        config["world_size"] = world_size
        ident = hydra_identity(run_dir, cfg)
        if ident["overrides"] is not None:
            config["hydra_overrides"] = ident["overrides"]
        tags = ([str(t) for t in (cfg.get("tags") or [])] + _auto_tags(run_config or {})
                + [o for o in (ident["overrides"] or []) if not o.startswith(("run_dir=", "data.root="))][:20])
        kwargs = dict(project=cfg.get("project") or "megaseek", entity=cfg.get("entity") or None,
                      name=ident["name"], group=ident["group"],
                      tags=[t[:64] for t in tags], config=config, id=self.run_id, resume="allow",
                      dir=str(run_dir), settings=wandb.Settings(
                          console="off", x_disable_stats=not bool(cfg.get("system_stats", False))))
        self.last_step, self.warned = -1, False
        try:
            self.run = wandb.init(mode=self.mode, **kwargs)
        except Exception as e:
            if self.mode != "online":
                raise
            warnings.warn(f"[monitor] wandb online start failed ({e}); logging offline (`wandb sync` later)")
            self.mode = "offline"
            self.run = wandb.init(mode="offline", **kwargs)

    def write(self, record: dict) -> None:
        step = int(record["step"])
        if step <= self.last_step:  # a rollback (trainer fault recovery): wandb cannot rewrite its history
            if not self.warned:
                warnings.warn(f"[monitor] wandb: step {step} after {self.last_step} (a rollback); steps up to "
                              f"{self.last_step} keep their first values in wandb (metrics.jsonl has both)")
                self.warned = True
            return
        self.last_step = step
        data = {tag(k): x for k, x in ((k, numeric(v)) for k, v in record.items()) if x is not None and k not in NOT_SCALARS}
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()
