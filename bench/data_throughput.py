"""Data pipeline throughput on the embedded default corpus, stage by stage, in MB/s.

    .venv/bin/python bench/data_throughput.py [--max-bytes N] [--workers N] [--repeats N] [--json out.json]

Stages: raw (copy + sha256), cleaned (decode, normalize, filters, exact + MinHash/LSH dedup, Parquet),
tokenizer training, tokenization (Parquet -> tokens -> shards, as the stage runs it), loader.
The peer: tokenization is compared in the same run with calling Hugging Face `tokenizers` directly
(`Tokenizer.encode_batch_fast` on the same texts, already in memory, nothing written; the faster of one
call on the whole list and calls on the stage's batches). Each is timed `--repeats` times, alternating,
and the best of each is kept (the cores may be shared with other work).
Targets: tokenization >= 0.8 x direct `tokenizers`; cleaning + dedup of the default corpus < 120 s.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaseek.data.loader import BatchPlan  # noqa: E402
from megaseek.data.prepare import default_data_config  # noqa: E402
from megaseek.data.spec import DataSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = default_data_config()
    ap.add_argument("--max-bytes", type=int, default=defaults["max_bytes"],
                    help="bytes of the embedded corpus (default: conf/data/default.yaml; 0: all of it)")
    ap.add_argument("--workers", type=int, default=0, help="cleaning processes (0: one per core)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()

    from megaseek.data.api import open_dataset
    from megaseek.data.pipeline import preflight
    from megaseek.data.stage_clean import build_cleaned
    from megaseek.data.stage_raw import build_raw
    from megaseek.data.stage_tokenize import _tokenizer, iter_texts, write_part_shard
    from megaseek.data.tiers import read_manifest
    from megaseek.data.tokenizer import eos_id

    root = Path(tempfile.mkdtemp(prefix="megaseek-bench-"))
    quiet = lambda m: None  # noqa: E731
    try:
        d = default_data_config(root=str(root), max_bytes=args.max_bytes or 10**12, workers=args.workers)
        d["tokenizer"]["vocab_size"] = args.vocab
        spec = DataSpec.from_config(d)
        res = {"cores": os.cpu_count(), "workers": spec.workers_resolved}

        t = time.perf_counter()
        files = preflight(spec)
        raw = build_raw(spec, files, log=quiet)
        res["raw"] = _rate(read_manifest(raw)["bytes"], time.perf_counter() - t)

        t = time.perf_counter()
        cleaned = build_cleaned(spec, raw, log=quiet)
        secs = time.perf_counter() - t
        cm = read_manifest(cleaned)
        res["cleaned"] = dict(_rate(res["raw"]["bytes"], secs), docs_in=sum(v["docs_in"] for v in cm["counts"].values()),
                              docs_out=sum(v["docs_out"] for v in cm["counts"].values()),
                              duplicates=json.loads((cleaned / "report.json").read_text())["sources"][0]["duplicates"])

        parts = [cleaned / o["path"] for o in cm["outputs"]]
        work = root / "tok"
        work.mkdir()
        t = time.perf_counter()
        tok = _tokenizer(spec, work, {spec.sources[0].name: parts}, quiet)
        res["tokenizer_training"] = _rate(spec.tokenizer_sample_bytes, time.perf_counter() - t)
        eos = eos_id(tok)

        batches = list(iter_texts(parts))              # the peer's input: the same texts, in memory
        texts = [t for batch in batches for t in batch]
        text_bytes = sum(len(t.encode("utf-8")) for t in texts)
        variants = {
            "direct_all": lambda r: tok.encode_batch_fast(texts, add_special_tokens=False),  # one call, whole list
            "direct_batched": lambda r: [tok.encode_batch_fast(b, add_special_tokens=False) for b in batches],
            "ours": lambda r: [write_part_shard(tok, p, work / f"r{r}" / f"{i}.bin", args.vocab, eos, {})
                               for i, p in enumerate(parts)],                # Parquet -> tokens -> shard files
        }
        wall, cpu = {k: [] for k in variants}, {k: [] for k in variants}
        for r in range(args.repeats):
            for k, fn in variants.items():
                t, c = time.perf_counter(), time.process_time()
                fn(r)
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)    # all threads of this process
        best = {k: min(v) for k, v in wall.items()}
        peer = min(best["direct_all"], best["direct_batched"])
        res["tokenize_direct_tokenizers"] = _rate(text_bytes, peer)
        res["tokenize"] = _rate(text_bytes, best["ours"])
        res["tokenize_ratio_vs_direct"] = round(peer / best["ours"], 3)
        cpu_peer = min(min(cpu["direct_all"]), min(cpu["direct_batched"]))
        res["tokenize_cpu_time_ratio_vs_direct"] = round(cpu_peer / min(cpu["ours"]), 3)
        res["tokenize_runs_s"] = {k: [round(x, 2) for x in v] for k, v in wall.items()}

        # the loader: samples/s of micro-batches, from the shards just built (as the trainer reads them)
        from megaseek.data.stage_tokenize import build_tokenized
        build_tokenized(spec, cleaned, log=quiet)
        loader, _, _ = open_dataset(spec, 128, BatchPlan(64, 8, 1, 0), 1234, quiet)
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < 2.0:
            loader.micro_batches()
            n += 64
        res["loader_samples_per_s"] = round(n / (time.perf_counter() - t))
        res["clean_dedup_seconds"] = res["cleaned"]["seconds"]
        res["targets_met"] = {"tokenize_ratio>=0.8": res["tokenize_ratio_vs_direct"] >= 0.8,
                              "clean_dedup<120s": res["cleaned"]["seconds"] < 120}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _print(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


def _rate(nbytes: int, secs: float) -> dict:
    return {"bytes": int(nbytes), "seconds": round(secs, 3), "mb_per_s": round(nbytes / 1e6 / max(secs, 1e-9), 2)}


def _print(res: dict) -> None:
    print(f"data pipeline throughput ({res['cores']} cores, {res['workers']} cleaning workers)")
    for k in ("raw", "cleaned", "tokenizer_training", "tokenize", "tokenize_direct_tokenizers"):
        r = res[k]
        print(f"  {k:28s} {r['mb_per_s']:8.2f} MB/s  ({r['bytes'] / 1e6:.1f} MB in {r['seconds']:.2f}s)")
    c = res["cleaned"]
    print(f"  cleaned: {c['docs_in']} -> {c['docs_out']} docs, duplicates {c['duplicates']}")
    print(f"  tokenization vs direct tokenizers: {res['tokenize_ratio_vs_direct']:.3f} (target >= 0.8; best wall "
          f"time of each), {res['tokenize_cpu_time_ratio_vs_direct']:.3f} in CPU time; runs (s): {res['tokenize_runs_s']}")
    print(f"  clean + dedup of the corpus: {res['clean_dedup_seconds']:.1f}s (target < 120 s)")
    print(f"  loader: {res['loader_samples_per_s']:,} samples/s (seq 128)")
    print(json.dumps(res["targets_met"]))


if __name__ == "__main__":
    main()
