"""The embedded default corpus: the running Python's standard library sources, present on every machine.

Documents are cleaned lightly (line endings, trailing whitespace, control characters) and exactly
deduplicated by content hash. The full cleaning pipeline (filters, near-dup) lives in the data pipeline.
"""
from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from pathlib import Path
from typing import Iterator

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every .py file of the standard library (not site-packages), in a stable order."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return out


def clean_code(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n") + "\n"


def iter_default_corpus(max_bytes: int, min_chars: int = 64) -> Iterator[str]:
    """Cleaned, exactly-deduplicated stdlib documents until `max_bytes` of UTF-8 text."""
    seen: set[bytes] = set()
    total = 0
    for path in stdlib_files():
        try:
            raw = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib test files are deliberately not UTF-8
        doc = clean_code(raw)
        if len(doc) < min_chars:
            continue
        h = hashlib.blake2b(doc.encode("utf-8"), digest_size=16).digest()
        if h in seen:
            continue
        seen.add(h)
        yield doc
        total += len(doc.encode("utf-8"))
        if total >= max_bytes:
            return
