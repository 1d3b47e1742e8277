"""Stage 2, cleaned/<name>/<source>/part-NNNNN.parquet: cleaned, filtered, deduplicated documents.

Records stream from the raw tier in batches to worker processes (decode, normalize, rules, filters,
content hash and MinHash signature: `clean_batch`); the main process deduplicates in input order and
appends the kept documents to Parquet parts (columns text, origin, hash). Memory is bounded by the
batches in flight plus the dedup index (fixed size per kept document).

Each source is finished as a unit (`<source>/_DONE.json`); a resumed stage keeps finished sources.
Deduplication is within a source. `report.json` has the per-step funnel, duplicates, top reasons and
the bad inputs with file and line.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from megaseek.config.schema import ConfigError
from megaseek.data import clean as C
from megaseek.data.dedup import Deduper, Signer, content_hash
from megaseek.data.parallel import batched, ordered_map
from megaseek.data.readers import get_field, is_binary, iter_records
from megaseek.data.report import SourceReport, format_report
from megaseek.data.spec import DataSpec
from megaseek.data.tiers import (PIPELINE_VERSION, PartialTier, atomic_write_text, content_digest, fingerprint,
                                 is_current, output_entry, read_manifest)

SCHEMA = pa.schema([("text", pa.string()), ("origin", pa.string()), ("hash", pa.binary(16))])
_STATE: dict = {}


def init_worker(configs: dict) -> None:
    """configs: source -> (CleanConfig, text_field). Builds the compiled cleaners once per process."""
    _STATE.clear()
    for name, (cfg, field) in configs.items():
        signer = Signer(cfg.num_perm, cfg.shingle_ngram) if cfg.near_dedup else None
        _STATE[name] = (C.Cleaner(cfg), signer, field)


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


def clean_batch(task: tuple) -> list:
    """Worker: one batch of records -> [(origin, nbytes_in, bad_bytes, reason | None, text, hash, signature)]."""
    source, records = task
    cleaner, signer, field = _STATE[source]
    out = []
    for kind, origin, payload in records:
        words = None
        nbytes = (len(payload) if isinstance(payload, bytes) else
                  len(payload.encode()) if kind == "str" and isinstance(payload, str) else 0)
        text, reason, bad = _text_of(kind, payload, field, cleaner.cfg)
        if text is not None:
            text, reason = cleaner.normalize(text)
            if reason is None:
                reason, words = cleaner.check(text)
        if reason is not None:
            out.append((origin, nbytes, bad, reason, None, None, None))
            continue
        sig = signer.signature(words if words is not None else C.Words.of(text)) if signer else None
        out.append((origin, nbytes, bad, None, text, content_hash(text), sig))
    return out


class PartWriter:
    """Kept documents -> part-NNNNN.parquet files of about `part_bytes` of text each (temp name, then rename)."""

    def __init__(self, out_dir: Path, part_bytes: int, row_group_bytes: int = 8 << 20):
        self.dir, self.part_bytes, self.rg_bytes = out_dir, part_bytes, row_group_bytes
        self.parts: list = []
        self.writer = None
        self.rows: dict = {"text": [], "origin": [], "hash": []}
        self.buffered = self.in_part = 0

    def add(self, text: str, origin: str, digest: bytes) -> None:
        self.rows["text"].append(text)
        self.rows["origin"].append(origin)
        self.rows["hash"].append(digest)
        n = len(text)
        self.buffered += n
        self.in_part += n
        if self.buffered >= self.rg_bytes or self.in_part >= self.part_bytes:
            self._flush()
        if self.in_part >= self.part_bytes:
            self._close_part()

    def _flush(self) -> None:
        if not self.rows["text"]:
            return
        if self.writer is None:
            path = self.dir / f"part-{len(self.parts):05d}.parquet"
            self.writer = pq.ParquetWriter(str(path) + ".tmp", SCHEMA, compression="zstd")
            self.parts.append(path)
        self.writer.write_table(pa.table(self.rows, schema=SCHEMA))
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


def clean_fingerprint(spec: DataSpec, raw_digest: str) -> str:
    return fingerprint({"stage": "cleaned", "version": PIPELINE_VERSION, "raw": raw_digest,
                        "part_bytes": spec.part_bytes,
                        "sources": [[s.name, s.text_field, vars(s.clean)] for s in spec.sources]})


def _source_records(raw_dir: Path, raw_manifest: dict, src, max_file_bytes: int):
    for o in raw_manifest["outputs"]:
        if o["source"] == src.name:
            yield from iter_records(raw_dir / o["path"], o.get("origin", o["path"]), src.text_field, max_file_bytes)


def _clean_source(src, raw_dir: Path, raw_manifest: dict, out: Path, spec: DataSpec, tasks_map) -> dict:
    c = src.clean
    report = SourceReport(src.name)
    dedup = Deduper(c.exact_dedup, c.near_dedup, c.near_threshold, c.num_perm)
    writer = PartWriter(out, spec.part_bytes)
    records = _source_records(raw_dir, raw_manifest, src, c.max_file_bytes)
    tasks = ((src.name, b) for b in batched(records, max_items=512, max_bytes=1 << 20))
    for results in tasks_map(tasks):
        for origin, nbytes, bad, reason, text, digest, sig in results:
            report.record_in(nbytes)
            if bad and reason is None:
                report.repair(origin, bad)
            if reason is None:
                reason = dedup.check(digest, sig)
            if reason is not None:
                report.drop(reason, origin, nbytes)
                continue
            writer.add(text, origin, digest)
            report.keep(len(text.encode("utf-8")))
    parts = writer.close()
    rep = report.to_dict()
    if report.docs_out == 0:
        top = ", ".join(f"{r} {n}" for r, n in rep["top_reasons"][:5]) or "no records"
        raise ConfigError(f"data.sources.{src.name}: no document is left after cleaning ({report.docs_in} in; "
                          f"removed: {top}); check the source or loosen the data.clean thresholds")
    return {"report": rep, "parts": [p.name for p in parts]}


def build_cleaned(spec: DataSpec, raw_dir: Path, force: bool = False, log=print) -> Path:
    raw_manifest = read_manifest(raw_dir)
    final = spec.tier_dir("cleaned")
    fp = clean_fingerprint(spec, raw_manifest["digest"])
    if is_current(final, fp) and not force:
        return final
    work = PartialTier(final, fp, fresh=force)
    t0 = time.perf_counter()
    configs = {s.name: (s.clean, s.text_field) for s in spec.sources}
    workers = spec.workers_resolved

    def tasks_map(tasks):
        return ordered_map(clean_batch, tasks, workers, init_worker, (configs,))

    reports, outputs = [], []
    for src in spec.sources:
        out = work.dir / src.name
        done = out / "_DONE.json"
        if work.resumed and done.is_file():
            result = json.loads(done.read_text())
            log(f"[data] cleaned: resumed, source {src.name} was finished")
        else:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            result = _clean_source(src, raw_dir, raw_manifest, out, spec, tasks_map)
            atomic_write_text(done, json.dumps(result))
        reports.append(result["report"])
        for part in result["parts"]:
            rows = pq.ParquetFile(out / part).metadata.num_rows
            outputs.append(output_entry(work.dir, out / part, source=src.name, docs=rows))
    secs = time.perf_counter() - t0
    bytes_in = sum(r["bytes_in"] for r in reports)
    rep = {"seconds": secs, "mb_per_s": bytes_in / 1e6 / max(secs, 1e-9), "workers": workers, "sources": reports}
    atomic_write_text(work.dir / "report.json", json.dumps(rep, indent=1))
    log(f"[data] cleaned: {bytes_in / 1e6:.1f} MB in {secs:.1f}s ({rep['mb_per_s']:.1f} MB/s, {workers} workers) "
        f"-> {final}\n" + format_report(rep))
    return work.finish({"tier": "cleaned", "name": spec.name,
                        "inputs": {"raw": str(raw_dir), "raw_digest": raw_manifest["digest"]},
                        "outputs": outputs, "digest": content_digest(outputs),
                        "extras": [output_entry(work.dir, work.dir / "report.json")],
                        "counts": {r["source"]: {"docs_in": r["docs_in"], "docs_out": r["docs_out"]} for r in reports},
                        "bytes": {r["source"]: {"in": r["bytes_in"], "out": r["bytes_out"]} for r in reports},
                        "config": {s.name: {"text_field": s.text_field, "clean": vars(s.clean)} for s in spec.sources}})
