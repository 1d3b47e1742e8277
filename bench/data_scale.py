"""Cleaning-stage throughput (documents/s) of the engines against today's pipeline, same run, same input.

    .venv/bin/python bench/data_scale.py [--max-bytes 16000000] [--workers 1,2] [--baseline COMMIT] [--json f]

The peer is the single-machine pipeline as it was before the engines (commit `--baseline`, checked out
with `git archive` into a temporary directory): a process pool and a streaming in-memory dedup. Each run is
a fresh interpreter cleaning the embedded corpus (the first `--max-bytes` of the standard library) from an
already built raw tier; the time is build_cleaned's. Prints documents/s, the ratio to the peer at the same
worker count, and how many documents each kept (the peer with its own defaults: word 5-grams, threshold
0.8, first-seen survives; ours with conf/data/default.yaml; with --same-settings ours also runs with 5-grams
at 0.8, which isolates the dedup semantics: connected components vs first-seen).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "9ca394fa56c618ff466dd54be968ce88aa4a1ed9"     # the last commit with the single-machine cleaning stage

_RUN = r"""
import json, sys, time
sys.path.insert(0, {tree!r})
def main():
    from megaseek.data.prepare import default_data_config
    from megaseek.data.spec import DataSpec
    from megaseek.data.pipeline import preflight
    from megaseek.data.stage_raw import build_raw
    from megaseek.data.stage_clean import build_cleaned
    import pyarrow.parquet as pq
    d = default_data_config(root={root!r}, max_bytes={max_bytes}, workers={workers})
    d.update({extra!r})
    d["clean"].update({clean!r})
    d["tokenizer"]["vocab_size"] = 400
    spec = DataSpec.from_config(d)
    raw = build_raw(spec, preflight(spec), log=lambda m: None)
    t0 = time.perf_counter()
    out = build_cleaned(spec, raw, log=lambda m: None)
    secs = time.perf_counter() - t0
    rep = json.loads((out / "report.json").read_text())["sources"][0]
    kept = sorted(h.hex() for p in sorted(out.rglob("part-*.parquet"))
                  for h in pq.read_table(p, columns=["hash"]).column("hash").to_pylist())
    print(json.dumps({{"seconds": secs, "docs_in": rep["docs_in"], "docs_out": rep["docs_out"],
                      "duplicates": rep["duplicates"], "kept": kept}}))
if __name__ == "__main__":
    main()
"""


def run(tree: Path, root: Path, max_bytes: int, workers: int, extra: dict, clean: dict) -> dict:
    code = _RUN.format(tree=str(tree), root=str(root), max_bytes=max_bytes, workers=workers, extra=extra,
                       clean=clean)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tree, env=env,
                         timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["docs_per_s"] = r["docs_in"] / r["seconds"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-bytes", type=int, default=16_000_000)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--same-settings", action="store_true")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    workers = [int(w) for w in a.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "baseline"
        old.mkdir()
        archive = subprocess.run(["git", "archive", a.baseline, "megaseek", "conf"], cwd=REPO, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        rows = []
        for w in workers:
            peer = run(old, tmp / f"peer{w}", a.max_bytes, w, {}, {})
            rows.append({"pipeline": f"today ({a.baseline[:7]})", "workers": w, **peer})
            cases = [("local", {}), ("dask", {})]
            if a.same_settings:
                cases.append(("local", {"shingle_ngram": 5, "near_threshold": 0.8}))
            for engine, clean in cases:
                r = run(REPO, tmp / f"{engine}{w}{len(clean)}", a.max_bytes, w, {"engine": engine}, clean)
                name = f"engine={engine}" + (" (5-grams, 0.8)" if clean else "")
                rows.append({"pipeline": name, "workers": w, **r,
                             "ratio_vs_today": r["docs_per_s"] / peer["docs_per_s"],
                             "kept_also_by_today": len(set(r["kept"]) & set(peer["kept"]))})
    print(f"cleaning stage, {a.max_bytes / 1e6:.0f} MB of the embedded corpus, {os.cpu_count()} cores")
    print(f"{'pipeline':<28} {'workers':>7} {'docs':>6} {'s':>7} {'docs/s':>8} {'ratio':>6} {'kept':>6} "
          f"{'kept by both':>12}")
    for r in rows:
        print(f"{r['pipeline']:<28} {r['workers']:>7} {r['docs_in']:>6} {r['seconds']:>7.1f} {r['docs_per_s']:>8.1f} "
              f"{r.get('ratio_vs_today', 1.0):>6.2f} {r['docs_out']:>6} "
              f"{r.get('kept_also_by_today', r['docs_out']):>12}")
    if a.json:
        Path(a.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "kept"} for r in rows], indent=1))


if __name__ == "__main__":
    main()
