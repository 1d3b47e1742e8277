"""Engines that run the cleaning stage's two map phases and its dedup: `data.engine=local|dask`.

Both run the same tasks (megaseek.data.units) over the same units, and the same dedup definitions
(megaseek.data.dedup), so they write the same tier. They differ in where the work runs and what holds
the dedup state:
  local  maps with the ordered process pool of this machine (`data.workers`); the dedup of a source is one
         in-memory pass (its hashes and signatures in this process: memory grows with the documents)
  dask   maps as Dask tasks; the dedup is Dask DataFrame shuffles (content hash, band buckets, pair
         verification joins) and an iterative connected-components job, partitioned by unit, so no process
         holds a whole source. Without `data.dask.address` / `data.dask.scheduler_file` a LocalCluster of
         `data.workers` processes is started inside the job (nothing to start by hand) and closed after.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megaseek.data.dedup import DedupParams, dedup_in_memory, sigs_of
from megaseek.data.parallel import pool_context



def write_drops(drop_dir: Path, ords: np.ndarray, reasons: list, tag: str) -> None:
    """Removed documents -> drop_dir/unit=N/<tag>.parquet (what write_unit reads)."""
    if len(ords) == 0:
        return
    units = ords >> 32
    reasons = np.asarray(reasons, dtype=object)
    for u in np.unique(units):
        sel = units == u
        d = Path(drop_dir) / f"unit={int(u)}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"ord": ords[sel], "reason": list(reasons[sel])}), d / f"{tag}.parquet")


def read_docs(path: Path, unit: int, with_sigs: bool) -> tuple:
    """(ords, h1, h2, sigs or None) of the documents of one unit's work file that passed cleaning."""
    cols = ["row", "reason", "h1", "h2"] + (["sig"] if with_sigs else [])
    t = pq.read_table(path, columns=cols)
    keep = np.array([r is None for r in t.column("reason").to_pylist()], dtype=bool)
    ords = (np.int64(unit) << np.int64(32)) + t.column("row").to_numpy().astype(np.int64)
    sigs = sigs_of(t.column("sig").filter(pa.array(keep)).to_pylist()) if with_sigs else None
    return ords[keep], t.column("h1").to_numpy()[keep], t.column("h2").to_numpy()[keep], sigs


class LocalEngine:
    """This machine: tasks inline (workers <= 1) or on one process pool kept for the whole stage."""
    name = "local"

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def map(self, fn: Callable, tasks: list) -> list:
        if self.workers <= 1 or len(tasks) <= 1:
            return [fn(t) for t in tasks]
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=pool_context())
        return list(self.pool.map(fn, tasks))

    def dedup(self, work_files: list, params: DedupParams, drop_dir: Path) -> dict:
        parts = [read_docs(f, u, params.near) for u, f in work_files]
        if not parts:
            return {"exact": 0, "near": 0}
        ords, h1, h2 = (np.concatenate([p[i] for p in parts]) for i in range(3))
        sigs = None
        if params.near:
            nonempty = [p[3] for p in parts if len(p[0])]
            sigs = np.concatenate(nonempty) if nonempty else np.zeros((0, params.num_perm), np.uint32)
        removed = dedup_in_memory(ords, h1, h2, sigs, params)
        o = np.fromiter(removed.keys(), dtype=np.int64, count=len(removed))
        write_drops(drop_dir, o, list(removed.values()), "local")
        vals = list(removed.values())
        return {"exact": vals.count("exact_duplicate"), "near": vals.count("near_duplicate")}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


@contextlib.contextmanager
def open_engine(spec) -> Iterator:
    """The engine `spec.engine` names, started for the duration of the stage."""
    if spec.engine == "local":
        eng = LocalEngine(spec.workers_resolved)
    else:
        from megaseek.data.engine_dask import DaskEngine
        eng = DaskEngine(spec.workers_resolved, spec.dask_address, spec.dask_scheduler_file)
    try:
        yield eng
    finally:
        eng.close()
