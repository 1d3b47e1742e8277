"""The cleaning stage's units of work: what every engine maps over, so their output cannot differ.

A source's raw files are cut, in manifest order, into units of about `data.unit_bytes` (small files are
grouped; a file is never split: a large corpus ships as many shard files). Per unit, two tasks:
  clean_unit  records -> decode, normalize, rules, filters, content hash, MinHash signature ->
              `_work/u-NNNNN.parquet` (one row per record, kept or not, in record order)
  write_unit  that file minus the documents the dedup removed -> `part-NNNNN-MMM.parquet` parts of about
              `part_bytes` of text each, and the unit's share of the report (`_work/w-NNNNN.json`)
Both write under a temporary name and rename, so a unit's file exists only when whole: a resumed stage
skips the units already done. Document ordinal = unit << 32 | row (the stream order the dedup keeps).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megaseek.data import clean as C
from megaseek.data.dedup import UNIT_SHIFT, Signer, content_hash, hash_halves
from megaseek.data.readers import get_field, is_binary, iter_records
from megaseek.data.report import SourceReport

OUT_SCHEMA = pa.schema([("text", pa.string()), ("origin", pa.string()), ("hash", pa.binary(16))])
WORK_SCHEMA = pa.schema([("row", pa.int32()), ("origin", pa.string()), ("nbytes", pa.int64()), ("bad", pa.int64()),
                         ("reason", pa.string()), ("text", pa.string()), ("h1", pa.int64()), ("h2", pa.int64()),
                         ("sig", pa.binary())])


@dataclass(frozen=True)
class Unit:
    index: int
    files: tuple            # ((path, origin), ...)
    nbytes: int


def plan_units(raw_dir: Path, raw_manifest: dict, source: str, unit_bytes: int) -> list:
    """The source's raw files in manifest order, grouped into units of about `unit_bytes`."""
    units, files, size = [], [], 0
    for o in raw_manifest["outputs"]:
        if o["source"] != source:
            continue
        files.append((str(raw_dir / o["path"]), o.get("origin", o["path"])))
        size += int(o["bytes"])
        if size >= unit_bytes:
            units.append(Unit(len(units), tuple(files), size))
            files, size = [], 0
    if files:
        units.append(Unit(len(units), tuple(files), size))
    return units


def work_file(work: Path, unit: int) -> Path:
    return work / f"u-{unit:05d}.parquet"


def _text_of(kind: str, payload, field: str, cfg: C.CleanConfig):
    """(text or None, drop reason, undecodable bytes removed)."""
    if kind == "skip":
        return None, str(payload), 0
    if kind == "str":
        return (payload, None, 0) if isinstance(payload, str) else (None, "null_text" if payload is None
                                                                     else "field_not_text", 0)
    if kind == "text":
        if not payload.strip():
            return None, "empty_file", 0
        if is_binary(payload):
            return None, "binary_file", 0
        return C.decode(payload, cfg)
    text, reason, bad = C.decode(payload, cfg)  # json
    if text is None:
        return None, reason, bad
    try:
        obj = json.loads(text)
    except ValueError:
        return None, "malformed_json", 0
    if not isinstance(obj, dict):
        return None, "not_an_object", 0
    try:
        value = get_field(obj, field)
    except KeyError:
        return None, "missing_field", 0
    if not isinstance(value, str):
        return None, "null_text" if value is None else "field_not_text", 0
    return value, None, bad


def clean_records(records, cleaner: C.Cleaner, signer: Optional[Signer], field: str) -> dict:
    """Records -> the columns of WORK_SCHEMA (one row per record)."""
    cols: dict = {k: [] for k in WORK_SCHEMA.names}
    digests = []
    for row, (kind, origin, payload) in enumerate(records):
        words = None
        nbytes = (len(payload) if isinstance(payload, bytes) else
                  len(payload.encode()) if kind == "str" and isinstance(payload, str) else 0)
        text, reason, bad = _text_of(kind, payload, field, cleaner.cfg)
        if text is not None:
            text, reason = cleaner.normalize(text)
            if reason is None:
                reason, words = cleaner.check(text)
        sig = None
        if reason is None:
            if signer is not None:
                sig = signer.signature(words if words is not None else C.Words.of(text)).tobytes()
            digests.append(content_hash(text))
        else:
            text = None
            digests.append(bytes(16))
        for k, v in zip(WORK_SCHEMA.names, (row, origin, nbytes, bad, reason, text, 0, 0, sig)):
            cols[k].append(v)
    cols["h1"], cols["h2"] = hash_halves(digests)
    return cols


def clean_unit(task: tuple) -> dict:
    """Map task: (unit, source, text_field, CleanConfig, work dir) -> writes u-NNNNN.parquet."""
    unit, source, field, cfg, work = task
    cleaner = C.Cleaner(cfg)
    signer = Signer(cfg.num_perm, cfg.shingle_ngram) if cfg.near_dedup else None
    records = (r for path, origin in unit.files
               for r in iter_records(Path(path), origin, field, cfg.max_file_bytes))
    cols = clean_records(records, cleaner, signer, field)
    out = work_file(Path(work), unit.index)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    pq.write_table(pa.table(cols, schema=WORK_SCHEMA), tmp, compression="zstd")
    os.replace(tmp, out)
    return {"unit": unit.index, "records": len(cols["row"]), "passed": sum(r is None for r in cols["reason"])}


def read_drops(drop_dir: Optional[Path], unit: int) -> dict:
    """{row: reason} removed by the dedup from one unit (files drop_dir/unit=N/*.parquet)."""
    d = Path(drop_dir) / f"unit={unit}" if drop_dir is not None else None
    if d is None or not d.is_dir():
        return {}
    out = {}
    mask = (1 << UNIT_SHIFT) - 1
    for f in sorted(d.glob("*.parquet")):
        t = pq.read_table(f, columns=["ord", "reason"])
        for o, r in zip(t.column("ord").to_pylist(), t.column("reason").to_pylist()):
            out[int(o) & mask] = r
    return out


class PartWriter:
    """Kept documents -> `<prefix>-MMM.parquet` parts of about `part_bytes` of text each (temp name, then rename)."""

    def __init__(self, out_dir: Path, prefix: str, part_bytes: int, row_group_bytes: int = 8 << 20):
        self.dir, self.prefix, self.part_bytes, self.rg_bytes = Path(out_dir), prefix, part_bytes, row_group_bytes
        self.parts: list = []
        self.writer = None
        self.rows: dict = {"text": [], "origin": [], "hash": []}
        self.buffered = self.in_part = 0

    def add(self, text: str, origin: str, digest: bytes) -> None:
        self.rows["text"].append(text)
        self.rows["origin"].append(origin)
        self.rows["hash"].append(digest)
        self.buffered += len(text)
        self.in_part += len(text)
        if self.buffered >= self.rg_bytes or self.in_part >= self.part_bytes:
            self._flush()
        if self.in_part >= self.part_bytes:
            self._close_part()

    def _flush(self) -> None:
        if not self.rows["text"]:
            return
        if self.writer is None:
            path = self.dir / f"{self.prefix}-{len(self.parts):03d}.parquet"
            self.writer = pq.ParquetWriter(str(path) + ".tmp", OUT_SCHEMA, compression="zstd")
            self.parts.append(path)
        self.writer.write_table(pa.table(self.rows, schema=OUT_SCHEMA))
        self.rows = {"text": [], "origin": [], "hash": []}
        self.buffered = 0

    def _close_part(self) -> None:
        if self.writer is not None:
            self.writer.close()
            Path(str(self.parts[-1]) + ".tmp").replace(self.parts[-1])
            self.writer = None
        self.in_part = 0

    def close(self) -> list:
        self._flush()
        self._close_part()
        return self.parts


def write_unit(task: tuple) -> dict:
    """Map task: (unit index, source, work dir, drop dir, out dir, part_bytes) -> the unit's parts and report."""
    unit, source, work, drop_dir, out_dir, part_bytes = task
    out_dir, prefix = Path(out_dir), f"part-{unit:05d}"
    for stale in out_dir.glob(prefix + "-*"):          # an interrupted attempt at this unit
        stale.unlink()
    drops = read_drops(drop_dir, unit)
    t = pq.read_table(work_file(Path(work), unit), columns=["row", "origin", "nbytes", "bad", "reason", "text",
                                                             "h1", "h2"])
    rep = SourceReport(source)
    writer = PartWriter(out_dir, prefix, part_bytes)
    h = np.stack([t.column("h1").to_numpy(), t.column("h2").to_numpy()], axis=1)
    for i, (row, origin, nbytes, bad, reason, text) in enumerate(zip(
            *(t.column(c).to_pylist() for c in ("row", "origin", "nbytes", "bad", "reason", "text")))):
        rep.record_in(nbytes)
        if bad and reason is None:
            rep.repair(origin, bad)
        if reason is None:
            reason = drops.get(row)
        if reason is not None:
            rep.drop(reason, origin, nbytes)
            continue
        writer.add(text, origin, h[i].tobytes())
        rep.keep(len(text.encode("utf-8")))
    parts = [p.name for p in writer.close()]
    result = {"unit": unit, "parts": parts, "report": rep.state()}
    done = Path(work) / f"w-{unit:05d}.json"
    tmp = done.with_name(done.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, done)
    return result
