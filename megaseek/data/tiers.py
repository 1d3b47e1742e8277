"""Tier directories and their manifests: what makes a stage skippable, resumable and checkable.

A stage builds `<root>/<tier>/<name>.partial/` (holding a FINGERPRINT file) and, when every output is
written, writes `manifest.json` there and renames the directory to `<root>/<tier>/<name>/`. So:
  - a tier directory with a manifest is whole; a stage whose manifest fingerprint equals the requested
    one (settings + the previous tier's content digest) is skipped;
  - an interrupted stage leaves only `.partial`: the next run with the same fingerprint resumes it
    (finished files are kept, each one written under a temporary name and renamed), with another
    fingerprint it starts over;
  - `verify_tier()` re-hashes every output against the manifest.
One process at a time builds a tier (an exclusive file lock under `<root>/.locks/`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

PIPELINE_VERSION = 2      # bump when a stage's output for the same inputs and settings changes
MANIFEST = "manifest.json"


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict:
    import datasketch
    import numpy
    import pyarrow
    import tokenizers
    import zstandard
    return {"python": platform.python_version(), "numpy": numpy.__version__, "pyarrow": pyarrow.__version__,
            "tokenizers": tokenizers.__version__, "datasketch": datasketch.__version__,
            "zstandard": zstandard.__version__, "megaseek_data_pipeline": PIPELINE_VERSION}


def read_manifest(tier_dir: Path) -> Optional[dict]:
    p = Path(tier_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        return None


def is_current(tier_dir: Path, fp: str) -> bool:
    m = read_manifest(tier_dir)
    return m is not None and m.get("fingerprint") == fp


def content_digest(outputs: list) -> str:
    """One hash for a tier's content: its outputs' relative paths and sha256, in order."""
    return fingerprint([[o["path"], o["sha256"]] for o in outputs])


def output_entry(tier_dir: Path, path: Path, **extra) -> dict:
    path = Path(path)
    return dict(path=path.relative_to(tier_dir).as_posix(), bytes=path.stat().st_size,
                sha256=extra.pop("sha256", None) or sha256_file(path), **extra)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(root: Path, tier: str, name: str) -> Iterator[None]:
    d = Path(root) / ".locks"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{tier}-{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class PartialTier:
    """The work directory of one stage run; `finish()` writes the manifest and promotes it."""

    def __init__(self, final: Path, fp: str, fresh: bool = False):
        self.final, self.fp = Path(final), fp
        self.dir = self.final.with_name(self.final.name + ".partial")
        stamp = self.dir / "FINGERPRINT"
        self.resumed = False
        for old in self.final.parent.glob(self.final.name + ".old*"):  # left by a crash inside finish()
            shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            if not fresh and stamp.is_file() and stamp.read_text().strip() == fp:
                self.resumed = True
                if read_manifest(self.dir) is not None and read_manifest(self.dir).get("fingerprint") == fp:
                    return  # finished but not promoted: finish() only renames
            else:
                shutil.rmtree(self.dir)
        if not self.resumed:
            self.dir.mkdir(parents=True)
            atomic_write_text(stamp, fp)

    @property
    def done(self) -> bool:
        return is_current(self.dir, self.fp)

    def finish(self, manifest: dict) -> Path:
        if not self.done:
            manifest = dict(manifest, fingerprint=self.fp, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            tools=tool_versions())
            atomic_write_text(self.dir / MANIFEST, json.dumps(manifest, indent=1, default=str))
        old = None
        if self.final.exists():
            old = self.final.with_name(self.final.name + f".old{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.dir, self.final)
        (self.final / "FINGERPRINT").unlink(missing_ok=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final


def verify_tier(tier_dir: Path) -> list[str]:
    """Problems found when re-hashing a tier's outputs against its manifest ([] when all match)."""
    tier_dir = Path(tier_dir)
    m = read_manifest(tier_dir)
    if m is None:
        return [f"{tier_dir}: no readable {MANIFEST}"]
    problems = []
    for o in m.get("outputs", []) + m.get("extras", []):
        p = tier_dir / o["path"]
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != o["bytes"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, manifest says {o['bytes']}")
        elif sha256_file(p) != o["sha256"]:
            problems.append(f"{p}: sha256 differs from the manifest")
    if content_digest(m.get("outputs", [])) != m.get("digest"):
        problems.append(f"{tier_dir}: the manifest's digest does not match its outputs")
    return problems
