"""Reading sources: which files a source holds, their records, and a pre-flight probe.

Formats, by file name: `.txt` `.md` `.py` (one document per file), `.jsonl` `.jsonl.gz` `.jsonl.zst`
(one JSON object per line, text in `text_field`; a dotted name reaches into nested objects) and
`.parquet` (text in the `text_field` column). Records carry their origin (`file:line`) so that every
skipped one is reported where it came from. `probe()` runs before any work and turns a missing path,
a missing field or a source with nothing in it into one ConfigError.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterator, NamedTuple

from megaseek.config.schema import ConfigError
from megaseek.data.spec import DATA_EXTS, SourceSpec

_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules"}
PROBE_LINES = 100


class Record(NamedTuple):
    kind: str        # text (bytes of a whole file), json (bytes of one line), str (a Parquet value), skip
    origin: str      # relpath, relpath:line or relpath:row
    payload: object  # bytes | str | the skip reason


def file_format(name: str) -> str:
    for ext in DATA_EXTS:
        if name.endswith(ext):
            return "parquet" if ext == ".parquet" else "jsonl"
    return "text"


def list_files(src: SourceSpec) -> list[tuple[Path, str]]:
    """(path, path relative to the source) of every input file, sorted, up to `max_bytes` in all."""
    p = src.path
    if not p.exists():
        raise ConfigError(f"data.sources.{src.name}.path={p} does not exist; fix the path or remove the source")
    if p.is_file():
        if not any(p.name.endswith(e) for e in src.extensions):
            raise ConfigError(f"data.sources.{src.name}.path={p}: unsupported file type; use a directory or a "
                              f"file ending in one of {list(src.extensions)}")
        return [(p, p.name)]
    out, total = [], 0
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith(".") or not any(f.endswith(e) for e in src.extensions):
                continue
            full = Path(dirpath) / f
            if not full.is_file():
                continue
            out.append((full, full.relative_to(p).as_posix()))
            total += full.stat().st_size
            if src.max_bytes and total >= src.max_bytes:
                return out
    return out


def _open_lines(path: Path):
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard
        fh = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh, closefd=True))
    return open(path, "rb")


def iter_records(path: Path, rel: str, text_field: str, max_file_bytes: int) -> Iterator[Record]:
    """Every record of one file, in order; unreadable parts come out as `skip` records."""
    fmt = file_format(path.name)
    if fmt == "text":
        size = path.stat().st_size
        if size > max_file_bytes:
            yield Record("skip", rel, "file_too_large")
            return
        yield Record("text", rel, path.read_bytes())
    elif fmt == "jsonl":
        lineno = 0
        try:
            with _open_lines(path) as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield Record("json", f"{rel}:{lineno}", line)
        except (OSError, EOFError, ValueError) as e:  # truncated or corrupt compressed stream
            yield Record("skip", f"{rel}:{lineno + 1}", f"corrupt_file ({type(e).__name__})")
        if lineno == 0:
            yield Record("skip", rel, "empty_file")
    else:
        yield from _parquet_records(path, rel, text_field)


def _parquet_records(path: Path, rel: str, column: str) -> Iterator[Record]:
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # not a Parquet file at all
        yield Record("skip", rel, f"corrupt_file ({type(e).__name__})")
        return
    if column not in pf.schema_arrow.names:
        yield Record("skip", rel, "missing_field")
        return
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=4096):
        for v in batch.column(0).to_pylist():
            yield Record("str", f"{rel}:row{row}", v)
            row += 1
    if row == 0:
        yield Record("skip", rel, "empty_file")


def get_field(obj: dict, field: str):
    """obj[field], or obj[a][b] for field 'a.b'; KeyError when absent."""
    if field in obj:
        return obj[field]
    node = obj
    for part in field.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(field)
        node = node[part]
    return node


def probe(src: SourceSpec) -> int:
    """Check a source before any work: the path exists, it holds files, every JSON Lines / Parquet file
    has the text field, and at least one document can be read. Returns the number of files."""
    where = f"data.sources.{src.name}"
    files = list_files(src)
    if not files:
        raise ConfigError(f"{where}.path={src.path}: no files ending in {list(src.extensions)}; "
                          f"point it at the data or set {where}.extensions")
    found = False
    for path, rel in files:
        fmt = file_format(path.name)
        if fmt == "text":
            found = found or _text_readable(path)
        elif fmt == "jsonl":
            found = _probe_jsonl(path, src) or found
        else:
            found = _probe_parquet(path, src) or found
    if not found:
        raise ConfigError(f"{where}: nothing to read in {len(files)} file(s) under {src.path} (all empty, binary "
                          f"or malformed); check the path and the format")
    return len(files)


def _text_readable(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8192)
    return bool(head.strip()) and b"\x00" not in head


def _probe_jsonl(path: Path, src: SourceSpec) -> bool:
    parsed, keys = 0, set()
    try:
        with _open_lines(path) as f:
            for i, line in enumerate(f):
                if i >= PROBE_LINES:
                    break
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(obj, dict):
                    continue
                parsed += 1
                try:
                    if isinstance(get_field(obj, src.text_field), str):
                        return True
                except KeyError:
                    keys.update(obj)
    except (OSError, EOFError, ValueError):
        return False
    if parsed and keys:
        raise ConfigError(
            f"data.sources.{src.name}.text_field={src.text_field!r}: none of the first {parsed} records of {path} "
            f"has it; fields there: {sorted(keys)}. Set data.sources.{src.name}.text_field to the text field")
    return False


def _probe_parquet(path: Path, src: SourceSpec) -> bool:
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception:
        return False
    names = pf.schema_arrow.names
    if src.text_field not in names:
        raise ConfigError(f"data.sources.{src.name}.text_field={src.text_field!r}: {path} has no such column; "
                          f"columns: {names}. Set data.sources.{src.name}.text_field to the text column")
    return pf.metadata.num_rows > 0


def is_binary(payload: bytes) -> bool:
    return b"\x00" in payload[:8192]
