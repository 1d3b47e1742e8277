"""Which distributed engine runs the data stages: start-up, a map of small tasks and a key group-by, same run.

    python bench/data_engines.py [--workers 2] [--rows 2000000] [--tasks 64]

For every engine that imports here (Dask distributed, Ray, PySpark; the others are reported missing), with
`--workers` local worker processes started by the engine itself (no service started by hand):
  start_s    time to bring up the local cluster / session
  map_s      `--tasks` tasks, each hashing 256 KiB (the shape of the cleaning stage: many independent units)
  groupby_s  `--rows` (uint64 band key, int64 document ordinal) rows shuffled by key and reduced to the
             number of keys with more than one member (the shape of the LSH candidate stage)
  peak_rss   the largest resident set of the driver and its worker processes (MB)
The keys are drawn so that the answer is known: every engine must return the same count.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import numpy as np
import psutil


def _task(i: int) -> str:
    data = np.random.default_rng(i).bytes(256 << 10)
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _keys(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, rows // 2, size=rows, dtype=np.int64).astype(np.uint64)
    return keys, np.arange(rows, dtype=np.int64)


def _expected(rows: int) -> int:
    keys, _ = _keys(rows)
    _, counts = np.unique(keys, return_counts=True)
    return int((counts > 1).sum())


def _tree_rss(pid: int) -> float:
    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        return 0.0
    out = 0.0
    for q in procs:
        try:
            out = max(out, q.memory_info().rss / 1e6)
        except psutil.Error:
            pass
    return out


def bench_dask(workers: int, rows: int, tasks: int) -> dict:
    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client, LocalCluster
    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    t1 = time.perf_counter()
    res = client.gather(client.map(_task, range(tasks)))
    t2 = time.perf_counter()
    keys, ords = _keys(rows)
    parts = 2 * workers
    chunks = [pd.DataFrame({"key": k, "ord": o}) for k, o in zip(np.array_split(keys, parts),
                                                                  np.array_split(ords, parts))]
    df = dd.from_pandas(pd.concat(chunks), npartitions=parts)
    shuffled = df.shuffle("key", npartitions=parts)
    n = int(shuffled.map_partitions(lambda p: pd.Series([int((p.groupby("key").size() > 1).sum())])).sum()
            .compute())
    t3 = time.perf_counter()
    rss = _tree_rss(os.getpid())
    client.close()
    cluster.close()
    return {"start_s": t1 - t0, "map_s": t2 - t1, "groupby_s": t3 - t2, "peak_rss_mb": rss, "answer": n,
            "map_ok": len(res) == tasks}


def bench_ray(workers: int, rows: int, tasks: int) -> dict:
    import ray
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR")
    t1 = time.perf_counter()
    f = ray.remote(_task)
    res = ray.get([f.remote(i) for i in range(tasks)])
    t2 = time.perf_counter()
    import ray.data
    keys, ords = _keys(rows)
    ds = ray.data.from_numpy(np.stack([keys.astype(np.int64), ords], axis=1)).map_batches(
        lambda b: {"key": b["data"][:, 0], "ord": b["data"][:, 1]}, batch_format="numpy")
    counts = ds.groupby("key").count()
    n = counts.filter(lambda r: r["count()"] > 1).count()
    t3 = time.perf_counter()
    rss = _tree_rss(os.getpid())
    ray.shutdown()
    return {"start_s": t1 - t0, "map_s": t2 - t1, "groupby_s": t3 - t2, "peak_rss_mb": rss, "answer": int(n),
            "map_ok": len(res) == tasks}


def bench_spark(workers: int, rows: int, tasks: int) -> dict:
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    t0 = time.perf_counter()
    spark = (SparkSession.builder.master(f"local[{workers}]").config("spark.ui.enabled", "false")
             .config("spark.sql.shuffle.partitions", str(2 * workers)).getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    t1 = time.perf_counter()
    res = spark.sparkContext.parallelize(range(tasks), tasks).map(_task).collect()
    t2 = time.perf_counter()
    import pandas as pd
    keys, ords = _keys(rows)
    df = spark.createDataFrame(pd.DataFrame({"key": keys.astype(np.int64), "ord": ords}))
    n = df.groupBy("key").count().filter(F.col("count") > 1).count()
    t3 = time.perf_counter()
    rss = _tree_rss(os.getpid())
    spark.stop()
    return {"start_s": t1 - t0, "map_s": t2 - t1, "groupby_s": t3 - t2, "peak_rss_mb": rss, "answer": int(n),
            "map_ok": len(res) == tasks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--engines", default="dask,ray,spark")
    a = ap.parse_args()
    expected = _expected(a.rows)
    t0 = time.perf_counter()
    [_task(i) for i in range(a.tasks)]
    inline = time.perf_counter() - t0
    print(json.dumps({"engine": "inline (one process)", "map_s": round(inline, 3), "expected_answer": expected}))
    for name in a.engines.split(","):
        fn = {"dask": bench_dask, "ray": bench_ray, "spark": bench_spark}[name]
        try:
            r = fn(a.workers, a.rows, a.tasks)
        except ImportError as e:
            print(json.dumps({"engine": name, "missing": str(e)}))
            continue
        r = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
        print(json.dumps({"engine": name, "workers": a.workers, **r, "correct": r["answer"] == expected}),
              flush=True)


if __name__ == "__main__":
    main()
