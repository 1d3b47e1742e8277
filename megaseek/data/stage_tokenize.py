"""Stage 3, tokenized/<name>/: tokenizer.json, one token shard per cleaned part, and index.json.

The tokenizer is trained (byte-level BPE, `data.tokenizer.vocab_size`, special tokens from config) on
up to `tokenizer_sample_bytes` of the cleaned tier, split between sources by weight, or copied from
`data.tokenizer.path` (a trained tokenizer depends on the weights, so changing them retokenizes). Documents are encoded in batches by `tokenizers` (its own threads use every
core; the next batch is encoded while this one is written) with EOS after each one. A resumed stage keeps the tokenizer and every finished shard.
"""
from __future__ import annotations

import itertools
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from megaseek.config.schema import ConfigError
from megaseek.data.shards import ShardWriter, shard_is_complete, shard_meta
from megaseek.data.spec import DataSpec
from megaseek.data.tiers import (PIPELINE_VERSION, PartialTier, atomic_write_text, content_digest, fingerprint,
                                 is_current, output_entry, read_manifest, sha256_file)
from megaseek.data.tokenizer import eos_id, load_tokenizer, train_bpe

BATCH_BYTES = 8 << 20


def tokenizer_identity(spec: DataSpec) -> dict:
    t = spec.tokenizer
    if t.path is not None:
        return {"file_sha256": sha256_file(t.path)}
    return {"vocab_size": t.vocab_size, "special_tokens": list(t.special_tokens),
            "sample_bytes": spec.tokenizer_sample_bytes, "weights": spec.weights()}


def tokenize_fingerprint(spec: DataSpec, cleaned_digest: str) -> str:
    return fingerprint({"stage": "tokenized", "version": PIPELINE_VERSION, "cleaned": cleaned_digest,
                        "tokenizer": tokenizer_identity(spec)})


def check_tokenizer_file(spec: DataSpec) -> None:
    """Before any work: an existing tokenizer file loads, has the EOS token and fits the vocabulary."""
    t = spec.tokenizer
    if t.path is None:
        return
    if not t.path.is_file():
        raise ConfigError(f"data.tokenizer.path={t.path} does not exist; give a tokenizer.json or null to train one")
    try:
        tok = load_tokenizer(t.path)
    except Exception as e:
        raise ConfigError(f"data.tokenizer.path={t.path} is not a tokenizers file: {e}") from None
    if tok.token_to_id(t.eos) is None:
        raise ConfigError(f"data.tokenizer.path={t.path} has no {t.eos!r} token; set data.tokenizer.special_tokens "
                          f"so that the first one is its end-of-document token")
    if tok.get_vocab_size() > t.vocab_size:
        raise ConfigError(f"data.tokenizer.path={t.path} has {tok.get_vocab_size()} tokens > "
                          f"data.tokenizer.vocab_size={t.vocab_size} (model.vocab_size); raise the vocab size")


def iter_texts(parts: list, batch_bytes: int = BATCH_BYTES) -> Iterator[list]:
    """Lists of document texts of about `batch_bytes` from Parquet parts, in order."""
    buf, size = [], 0
    for part in parts:
        for rb in pq.ParquetFile(part).iter_batches(columns=["text"], batch_size=1024):
            for t in rb.column(0).to_pylist():
                buf.append(t)
                size += len(t)
                if size >= batch_bytes:
                    yield buf
                    buf, size = [], 0
    if buf:
        yield buf


def _sample(spec: DataSpec, parts_by_source: dict) -> Iterator[str]:
    total_w = sum(spec.weights().values())
    for src in spec.sources:
        budget = spec.tokenizer_sample_bytes * src.weight / total_w
        for batch in iter_texts(parts_by_source[src.name], 1 << 20):
            for t in batch:
                yield t
                budget -= len(t)
                if budget <= 0:
                    break
            if budget <= 0:
                break


def encode_batch(tok, texts: list, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of all documents, each followed by EOS; tokens per document)."""
    return _flatten(tok.encode_batch_fast(texts, add_special_tokens=False), eos)


def _flatten(encodings: list, eos: int) -> tuple[np.ndarray, np.ndarray]:
    ids = [e.ids for e in encodings]
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
    return np.insert(flat, np.cumsum(lens), eos), lens + 1


def write_part_shard(tok, part: Path, shard: Path, vocab_size: int, eos: int, meta: dict) -> dict:
    """Tokenize one Parquet part into one shard. `tokenizers` encodes batch i+1 (its threads, without the
    GIL) while this thread flattens and writes batch i."""
    w = ShardWriter(shard, vocab_size, meta)
    pool = ThreadPoolExecutor(1)
    try:
        pending = None
        for texts in iter_texts([part]):
            nxt = pool.submit(tok.encode_batch_fast, texts, add_special_tokens=False)
            if pending is not None:
                w.add(*_flatten(pending.result(), eos))
            pending = nxt
        if pending is not None:
            w.add(*_flatten(pending.result(), eos))
    except BaseException:
        w.abort()
        raise
    finally:
        pool.shutdown(wait=True)
    return w.close()


def _tokenizer(spec: DataSpec, work: Path, parts_by_source: dict, log):
    path = work / "tokenizer.json"
    if not path.is_file():
        t0 = time.perf_counter()
        if spec.tokenizer.path is not None:
            shutil.copyfile(spec.tokenizer.path, str(path) + ".tmp")
        else:
            tok = train_bpe(_sample(spec, parts_by_source), spec.tokenizer.vocab_size, spec.tokenizer.special_tokens)
            tok.save(str(path) + ".tmp")
            log(f"[data] trained a byte-level BPE tokenizer (vocab {tok.get_vocab_size()}) in "
                f"{time.perf_counter() - t0:.1f}s")
        Path(str(path) + ".tmp").replace(path)
    return load_tokenizer(path)


def build_tokenized(spec: DataSpec, cleaned_dir: Path, force: bool = False, log=print) -> Path:
    cm = read_manifest(cleaned_dir)
    final = spec.tier_dir("tokenized")
    fp = tokenize_fingerprint(spec, cm["digest"])
    if is_current(final, fp) and not force:
        return final
    work = PartialTier(final, fp, fresh=force)
    parts = {s.name: [cleaned_dir / o["path"] for o in cm["outputs"] if o.get("source") == s.name]
             for s in spec.sources}
    tok = _tokenizer(spec, work.dir, parts, log)
    eos = eos_id(tok, spec.tokenizer.eos)
    vocab = spec.tokenizer.vocab_size
    t0, kept, nbytes = time.perf_counter(), 0, 0
    index = {"eos_id": eos, "vocab_size": vocab, "tokenizer": "tokenizer.json", "sources": {}}
    outputs = [output_entry(work.dir, work.dir / "tokenizer.json")]
    for src in spec.sources:
        shards = []
        for part in parts[src.name]:
            shard = work.dir / src.name / (part.stem + ".bin")
            if work.resumed and shard_is_complete(shard):
                kept += 1
            else:
                nbytes += part.stat().st_size
                write_part_shard(tok, part, shard, vocab, eos, {"source": src.name, "part": part.name})
            meta = shard_meta(shard)
            shards.append({"path": shard.relative_to(work.dir).as_posix(), "num_tokens": meta["num_tokens"],
                           "num_docs": meta["num_docs"]})
            outputs += [output_entry(work.dir, shard, sha256=meta["sha256"], tokens=meta["num_tokens"]),
                        output_entry(work.dir, shard.with_suffix(".docs.npy")),
                        output_entry(work.dir, shard.with_suffix(".json"))]
        index["sources"][src.name] = {"shards": shards,
                                      "num_tokens": sum(s["num_tokens"] for s in shards),
                                      "num_docs": sum(s["num_docs"] for s in shards)}
    atomic_write_text(work.dir / "index.json", json.dumps(index, indent=1))
    outputs.append(output_entry(work.dir, work.dir / "index.json"))
    secs = time.perf_counter() - t0
    total = sum(v["num_tokens"] for v in index["sources"].values())
    log(f"[data] tokenized: {total:,} tokens in {secs:.1f}s" + (f", resumed with {kept} shards kept" if kept else "")
        + f" -> {final}")
    return work.finish({"tier": "tokenized", "name": spec.name,
                        "inputs": {"cleaned": str(cleaned_dir), "cleaned_digest": cm["digest"]},
                        "outputs": outputs, "digest": content_digest(outputs),
                        "counts": {k: {"tokens": v["num_tokens"], "docs": v["num_docs"]}
                                   for k, v in index["sources"].items()},
                        "bytes": sum(o["bytes"] for o in outputs),
                        "config": {"tokenizer": tokenizer_identity(spec)}})
