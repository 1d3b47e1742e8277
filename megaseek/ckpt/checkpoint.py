"""Checkpoint layout of a run (this module owns it) and its life cycle: atomic save, manifest, verification,
selection of the newest valid checkpoint, keep-last-K.

    run_dir/checkpoints/
      latest                       the tag of the newest WHOLE checkpoint (replaced atomically, last)
      global_step<N>/
        manifest.json              written last: every file with its size and sha256, the layout, the model
        state.json                 step, consumed samples, loader position, scheduler, Adam step, config
        weights-stage<s>.safetensors   full fp32 parameters of pipeline stage s, canonical names
        optim-stage<s>.safetensors     full Adam moments (exp_avg.<name>, exp_avg_sq.<name>)
        rng-rank<r>.safetensors    RNG states of every rank
        powersgd-rank<r>.safetensors   PowerSGD reducer state of every rank (parallel.powersgd.rank > 0)
        tokenizer.json             the run's tokenizer (export and evaluation need no run directory)
        ds/                        optional DeepSpeed-native copy (zero_to_fp32.py, DeepSpeed tools)

Everything is written into `.tmp-global_step<N>` and renamed into place after the manifest, so a crash
mid-save never leaves a directory that looks whole; `latest` moves only afterwards. Loading reads only
safetensors and JSON (no pickle).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

FORMAT = "megaseek-ckpt-1"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int:
    return int(tag.replace("global_step", ""))


def tmp_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f".tmp-{tag_for(step)}"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; on success it replaces `out` (renamed into place), on a
    failure it is removed and `out` is left untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finalize(run_dir: Path, step: int, manifest_extra: dict, keep: int) -> Path:
    """Rank 0, after every rank has written into the tmp dir: manifest, rename, `latest`, prune."""
    src = tmp_dir(run_dir, step)
    files = {}
    for f in sorted(src.rglob("*")):
        if f.is_file():
            rel = str(f.relative_to(src))
            files[rel] = {"bytes": f.stat().st_size, "sha256": sha256(f)}
    write_json_atomic(src / "manifest.json", dict(manifest_extra, format=FORMAT, step=step, files=files))
    _fsync_dir(src)
    dst = checkpoint_dir(run_dir) / tag_for(step)
    if dst.exists():  # a re-save of the same step (after a rollback): replace it
        shutil.rmtree(dst)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    write_json_atomic_text(checkpoint_dir(run_dir) / "latest", tag_for(step))
    prune(run_dir, keep)
    return dst


def write_json_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify(ckpt: Path, full: bool = True) -> Optional[str]:
    """None when whole and intact, else the reason (missing manifest, missing/short file, bad checksum)."""
    m = ckpt / "manifest.json"
    if not m.is_file():
        return "no manifest.json (partial write?)"
    try:
        man = json.loads(m.read_text())
    except (json.JSONDecodeError, OSError) as e:
        return f"unreadable manifest.json ({e})"
    if man.get("format") != FORMAT:
        return f"unknown format {man.get('format')!r}"
    for rel, meta in man["files"].items():
        f = ckpt / rel
        if not f.is_file():
            return f"missing file {rel}"
        if f.stat().st_size != meta["bytes"]:
            return f"{rel}: {f.stat().st_size} bytes, manifest says {meta['bytes']}"
        if full and sha256(f) != meta["sha256"]:
            return f"{rel}: sha256 mismatch (corrupted)"
    return None


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, newest first (tmp dirs excluded)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    tags = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("global_step")]
    return sorted(tags, key=lambda p: step_of(p.name), reverse=True)


def newest_valid(run_dir: Path, warn: Callable[[str], None] = print) -> Optional[Path]:
    for c in candidates(run_dir):
        why = verify(c)
        if why is None:
            return c
        warn(f"[ckpt] WARNING: skipping checkpoint {c}: {why}")
    return None


def latest_tag(run_dir: Path) -> Optional[str]:
    f = checkpoint_dir(run_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (checkpoint_dir(run_dir) / tag).is_dir() else None


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 or less: keep all); remove stale tmp dirs."""
    d = checkpoint_dir(run_dir)
    for t in d.glob(".tmp-*"):
        shutil.rmtree(t, ignore_errors=True)
    if keep > 0:
        for old in candidates(run_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)


def read_manifest(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "manifest.json").read_text())


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "state.json").read_text())
