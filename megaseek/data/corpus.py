"""The embedded default corpus: the running Python's standard library sources, present on every machine.

`data.sources` empty (or a source with path "@stdlib") reads it through the same pipeline as any
directory source: the .py files under `stdlib_root()`, without site-packages, in a stable order.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])
