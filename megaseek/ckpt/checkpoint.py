"""Checkpoint layout of a run: run_dir/checkpoints/<tag>/ written by the DeepSpeed engine, plus our
client state (step, consumed samples, loader position, resolved config). One module owns the layout."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def latest_tag(run_dir: Path) -> Optional[str]:
    f = checkpoint_dir(run_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (checkpoint_dir(run_dir) / tag).is_dir() else None


def save(engine, run_dir: Path, step: int, client_state: dict[str, Any]) -> Path:
    """Collective: every rank calls it."""
    tag = tag_for(step)
    engine.save_checkpoint(str(checkpoint_dir(run_dir)), tag=tag, client_state=dict(client_state, step=step))
    return checkpoint_dir(run_dir) / tag


def resume(engine, run_dir: Path) -> Optional[dict]:
    """Load the latest checkpoint of the run if there is one; returns its client state (or None)."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint {checkpoint_dir(run_dir) / tag} could not be loaded")
    return client
