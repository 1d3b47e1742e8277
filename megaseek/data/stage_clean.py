"""Stage 2, cleaned/<name>/<source>/part-NNNNN-MMM.parquet: cleaned, filtered, deduplicated documents.

Per source, on the engine `data.engine` names (megaseek.data.engine: local or dask), three phases:
  clean   map over units (megaseek.data.units): decode, normalize, rules, filters, content hash and MinHash
          signature of every record -> `_work/u-NNNNN.parquet`
  dedup   exact and near duplicates over the whole source (megaseek.data.dedup's definitions: the smallest
          ordinal of every duplicate group / connected component survives) -> `_work/drop/`
  write   map over units: the kept documents -> parts (columns text, origin, hash) and each unit's report
Every phase's outputs are whole files, so a resumed stage redoes only what is missing; a source is finished
as a unit (`<source>/_DONE.json`, then `_work/` is removed). Deduplication is within a source. `report.json`
has the per-step funnel, duplicates, top reasons and the bad inputs with file and line.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from megaseek.config.schema import ConfigError
from megaseek.data.dedup import DedupParams
from megaseek.data.engine import open_engine
from megaseek.data.report import SourceReport, format_report
from megaseek.data.spec import DataSpec
from megaseek.data.tiers import (PIPELINE_VERSION, PartialTier, atomic_write_text, content_digest, fingerprint,
                                 is_current, output_entry, read_manifest)
from megaseek.data.units import clean_unit, plan_units, work_file, write_unit


def clean_fingerprint(spec: DataSpec, raw_digest: str) -> str:
    return fingerprint({"stage": "cleaned", "version": PIPELINE_VERSION, "raw": raw_digest,
                        "part_bytes": spec.part_bytes, "unit_bytes": spec.unit_bytes,
                        "sources": [[s.name, s.text_field, vars(s.clean)] for s in spec.sources]})


def _clean_source(src, raw_dir: Path, raw_manifest: dict, out: Path, spec: DataSpec, engine, log) -> dict:
    work = out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    units = plan_units(raw_dir, raw_manifest, src.name, spec.unit_bytes)
    params = DedupParams(src.clean)
    t0 = time.perf_counter()
    todo = [(u, src.name, src.text_field, src.clean, str(work)) for u in units
            if not work_file(work, u.index).is_file()]
    engine.map(clean_unit, todo)
    t1 = time.perf_counter()
    drop_dir, drop_done = work / "drop", work / "drop.done"
    if not drop_done.is_file():
        shutil.rmtree(drop_dir, ignore_errors=True)
        drop_dir.mkdir()
        if params.exact or params.near:
            engine.dedup([(u.index, str(work_file(work, u.index))) for u in units], params, drop_dir)
        drop_done.write_text("done")
    t2 = time.perf_counter()
    todo = [(u.index, src.name, str(work), str(drop_dir), str(out), spec.part_bytes) for u in units
            if not (work / f"w-{u.index:05d}.json").is_file()]
    engine.map(write_unit, todo)
    report = SourceReport(src.name)
    parts = []
    for u in units:
        r = json.loads((work / f"w-{u.index:05d}.json").read_text())
        report.absorb(r["report"])
        parts += r["parts"]
    log(f"[data] cleaned {src.name} on {engine.name}: {len(units)} units; clean {t1 - t0:.1f}s, "
        f"dedup {t2 - t1:.1f}s, write {time.perf_counter() - t2:.1f}s")
    rep = report.to_dict()
    rep["dedup"] = params.as_dict()
    if report.docs_out == 0:
        top = ", ".join(f"{r} {n}" for r, n in rep["top_reasons"][:5]) or "no records"
        raise ConfigError(f"data.sources.{src.name}: no document is left after cleaning ({report.docs_in} in; "
                          f"removed: {top}); check the source or loosen the data.clean thresholds")
    return {"report": rep, "parts": parts}


def _add_outputs(outputs: list, tier_dir: Path, out: Path, source: str, parts: list) -> None:
    for part in parts:
        rows = pq.ParquetFile(out / part).metadata.num_rows
        outputs.append(output_entry(tier_dir, out / part, source=source, docs=rows))


def build_cleaned(spec: DataSpec, raw_dir: Path, force: bool = False, log=print) -> Path:
    raw_manifest = read_manifest(raw_dir)
    final = spec.tier_dir("cleaned")
    fp = clean_fingerprint(spec, raw_manifest["digest"])
    if is_current(final, fp) and not force:
        return final
    work = PartialTier(final, fp, fresh=force)
    t0 = time.perf_counter()
    workers = spec.workers_resolved
    reports, outputs = [], []
    with contextlib.ExitStack() as stack:
        engine = None
        for src in spec.sources:
            out = work.dir / src.name
            done = out / "_DONE.json"
            if work.resumed and done.is_file():
                result = json.loads(done.read_text())
                log(f"[data] cleaned: resumed, source {src.name} was finished")
            else:
                if not work.resumed:
                    shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True, exist_ok=True)
                if engine is None:
                    engine = stack.enter_context(open_engine(spec))
                result = _clean_source(src, raw_dir, raw_manifest, out, spec, engine, log)
                atomic_write_text(done, json.dumps(result))
                shutil.rmtree(out / "_work", ignore_errors=True)
            reports.append(result["report"])
            _add_outputs(outputs, work.dir, out, src.name, result["parts"])
    secs = time.perf_counter() - t0
    bytes_in = sum(r["bytes_in"] for r in reports)
    rep = {"seconds": secs, "mb_per_s": bytes_in / 1e6 / max(secs, 1e-9), "workers": workers, "engine": spec.engine,
           "sources": reports}
    atomic_write_text(work.dir / "report.json", json.dumps(rep, indent=1))
    log(f"[data] cleaned: {bytes_in / 1e6:.1f} MB in {secs:.1f}s ({rep['mb_per_s']:.1f} MB/s, {workers} workers, "
        f"{spec.engine}) "
        f"-> {final}\n" + format_report(rep))
    return work.finish({"tier": "cleaned", "name": spec.name,
                        "inputs": {"raw": str(raw_dir), "raw_digest": raw_manifest["digest"]},
                        "outputs": outputs, "digest": content_digest(outputs),
                        "extras": [output_entry(work.dir, work.dir / "report.json")],
                        "counts": {r["source"]: {"docs_in": r["docs_in"], "docs_out": r["docs_out"]} for r in reports},
                        "bytes": {r["source"]: {"in": r["bytes_in"], "out": r["bytes_out"]} for r in reports},
                        "config": {s.name: {"text_field": s.text_field, "clean": vars(s.clean)} for s in spec.sources}})
