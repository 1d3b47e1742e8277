"""Near-duplicate detection: precision and recall of dedup settings on the built-in synthetic benchmark.

    .venv/bin/python bench/data_neardup.py [--pairs 200] [--distinct 400] [--grid] [--json out.json]

Synthetic near copies with k = 1..5 substituted words at 50, 75, 150 and 300 words, plus distinct 75-word
documents sharing a 30-word boilerplate header (megaseek/data/neardup_bench.py), all deduplicated in one run.
Prints recall per (length, k), precision and the kept fraction of the boilerplate documents for the defaults
of conf/data/default.yaml and, with --grid, for the other settings measured to choose them (the previous
defaults first: word 5-grams, threshold 0.8). Also the boilerplate documents with longer shared headers
(45 and 60 of 75 words), where distinct documents start to look like copies.
"""
from __future__ import annotations

import argparse
import json
import time

from megaseek.data.clean import CleanConfig
from megaseek.data.dedup import DedupParams
from megaseek.data.neardup_bench import evaluate
from megaseek.data.prepare import default_data_config

GRID = [  # (shingle_ngram, near_threshold, lsh_bands, lsh_rows)
    (5, 0.8, None, None), (3, 0.8, None, None), (5, 0.6, None, None), (2, 0.6, None, None),
    (3, 0.5, None, None), (3, 0.6, 16, 8), (3, 0.6, 32, 4), (3, 0.6, 20, 6), (3, 0.6, None, None),
    (4, 0.6, None, None), (3, 0.7, None, None),
]


def defaults() -> CleanConfig:
    c = default_data_config()["clean"]
    return CleanConfig(**c).checked()


def row(cfg: CleanConfig, args) -> dict:
    t0 = time.perf_counter()
    r = evaluate(cfg, pairs=args.pairs, distinct=args.distinct)
    p = DedupParams(cfg)
    r["settings"] = {"shingle_ngram": cfg.shingle_ngram, "near_threshold": cfg.near_threshold,
                     "bands": p.bands, "rows": p.rows, "num_perm": p.num_perm}
    r["boilerplate_kept"] = {f"{h}w header": evaluate(cfg, lengths=(), pairs=0, distinct=args.distinct,
                                                      header_words=h)["distinct_kept"] for h in (45, 60)}
    r["seconds"] = time.perf_counter() - t0
    return r


def show(r: dict) -> None:
    s = r["settings"]
    print(f"n={s['shingle_ngram']} t={s['near_threshold']} bands={s['bands']} rows={s['rows']}: "
          f"precision {r['precision']:.3f}, boilerplate kept {r['distinct_kept']:.3f} (30w header), "
          + ", ".join(f"{k} {v:.3f}" for k, v in r["boilerplate_kept"].items()))
    for L, d in r["recall"].items():
        print(f"    recall {L:>4}: " + "  ".join(f"{k} {v:.2f}" for k, v in d.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--distinct", type=int, default=400)
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    out = []
    print("defaults (conf/data/default.yaml):")
    out.append(row(defaults(), args))
    show(out[-1])
    if args.grid:
        print("grid:")
        for n, t, b, r in GRID:
            cfg = CleanConfig(shingle_ngram=n, near_threshold=t, lsh_bands=b, lsh_rows=r).checked()
            out.append(row(cfg, args))
            show(out[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
