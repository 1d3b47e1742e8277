"""Memory-mapped token shards.

A shard `X.bin` is a flat array of token ids (uint16 when the vocabulary fits, else uint32), documents
one after the other, each ending in EOS. Beside it: `X.docs.npy` (int64 end offset of every document)
and the index `X.json` (counts, dtype, sha256 of both files), written last: its presence with matching
sizes marks the shard whole. Every file is written under a temporary name and renamed into place, so
an interrupted write never leaves a shard that looks complete.

`TokenStream` reads several shards as one array (what the loader windows over).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _index_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _docs_path(path: Path) -> Path:
    return path.with_suffix(".docs.npy")


class ShardWriter:
    """Append documents (already ending in EOS) to one shard; `close()` makes it visible."""

    def __init__(self, path: Path, vocab_size: int, meta: Optional[dict] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype, self.vocab_size, self.meta = token_dtype(vocab_size), vocab_size, dict(meta or {})
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.ends: list = []
        self.n = 0

    def add(self, tokens: np.ndarray, lengths: Optional[np.ndarray] = None) -> None:
        """tokens: the concatenated documents; lengths: tokens per document (None: one document)."""
        a = np.ascontiguousarray(tokens, dtype=self.dtype)
        if a.size and int(a.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(a.max())} >= vocab size {self.vocab_size}")
        b = a.tobytes()
        self.f.write(b)
        self.sha.update(b)
        lens = np.asarray([a.size] if lengths is None else lengths, dtype=np.int64)
        self.ends.append(self.n + np.cumsum(lens))
        self.n += a.size

    def close(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        ends = np.concatenate(self.ends) if self.ends else np.zeros(0, dtype=np.int64)
        docs_tmp = _docs_path(self.path).with_name(_docs_path(self.path).name + ".tmp")
        with open(docs_tmp, "wb") as f:
            np.save(f, ends)
        os.replace(self.tmp, self.path)
        os.replace(docs_tmp, _docs_path(self.path))
        index = dict(self.meta, num_tokens=int(self.n), num_docs=int(len(ends)), dtype=np.dtype(self.dtype).name,
                     vocab_size=self.vocab_size, bytes=self.path.stat().st_size, sha256=self.sha.hexdigest(),
                     docs_bytes=_docs_path(self.path).stat().st_size)
        idx_tmp = _index_path(self.path).with_name(_index_path(self.path).name + ".tmp")
        idx_tmp.write_text(json.dumps(index, indent=1))
        os.replace(idx_tmp, _index_path(self.path))
        return index

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(path: Path, chunks: Iterable[np.ndarray], vocab_size: int, meta: dict) -> dict:
    """Stream documents (one array each, EOS included) into shard `path`; returns its index."""
    w = ShardWriter(path, vocab_size, meta)
    try:
        for c in chunks:
            w.add(np.asarray(c))
    except BaseException:
        w.abort()
        raise
    return w.close()


def shard_meta(path: Path) -> dict:
    return json.loads(_index_path(Path(path)).read_text())


def shard_is_complete(path: Path) -> bool:
    path = Path(path)
    idx = _index_path(path)
    if not (path.is_file() and idx.is_file() and _docs_path(path).is_file()):
        return False
    try:
        meta = json.loads(idx.read_text())
    except ValueError:
        return False
    return (path.stat().st_size == meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
            and _docs_path(path).stat().st_size == meta["docs_bytes"])


def open_shard(path: Path) -> np.ndarray:
    path = Path(path)
    if not shard_is_complete(path):
        raise FileNotFoundError(f"token shard {path} is missing or incomplete (no matching index {_index_path(path)})")
    meta = shard_meta(path)
    if meta["num_tokens"] == 0:
        return np.zeros(0, dtype=np.dtype(meta["dtype"]))
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["num_tokens"],))


def doc_ends(path: Path) -> np.ndarray:
    """End offset (exclusive) of every document of a shard."""
    return np.load(_docs_path(Path(path)))


class TokenStream:
    """Several shards read as one flat token array: `len()` and slicing `[a:b]` (returns a numpy array)."""

    def __init__(self, paths: list):
        self.parts = [open_shard(p) for p in paths]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, s: slice) -> np.ndarray:
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("TokenStream supports contiguous slices only")
        a, b, _ = s.indices(len(self))
        if b <= a:
            return np.zeros(0, dtype=np.int64)
        i = int(np.searchsorted(self.starts, a, side="right")) - 1
        out = []
        while a < b:
            lo = a - self.starts[i]
            hi = min(b, self.starts[i + 1]) - self.starts[i]
            out.append(np.asarray(self.parts[i][lo:hi]))
            a = self.starts[i] + hi
            i += 1
        return out[0] if len(out) == 1 else np.concatenate(out)
