"""The Dask engine: map phases as Dask tasks, dedup as Dask DataFrame shuffles and joins on disk.

Dedup of one source, every step a DataFrame whose partitions live in Parquet under `_work/dask/` (so no
process holds a whole source; the number of partitions P grows with the number of units):
  docs      one partition per unit: (ord, h1, h2, s0..s{num_perm-1}) of the documents that passed cleaning
  exact     shuffle on h1; per partition sort (h1, h2, ord): a row repeating the previous hash is a duplicate
  bands     exact survivors -> (bucket key, ord), `bands` rows each; shuffle on key, so a bucket is whole
            in one partition; per partition the pairs of bucket members (dedup.bucket_pairs); distinct pairs
  verify    pairs joined with the survivors' signatures on u and on v; edges: estimated Jaccard >= threshold
  clusters  min-label propagation over the edges, one shuffle a round: label(n) <- min(label(n), labels of
            n's neighbours), until no label changes; a node whose label is not itself is a near duplicate
            (its component's smallest ordinal survives)
  drops     removed ordinals written per unit (drop_dir/unit=N/*.parquet), what write_unit reads
"""
from __future__ import annotations

import functools
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from megaseek.data.dedup import DedupParams, band_keys, bucket_pairs, exact_duplicates, sigs_of, similar
from megaseek.data.engine import read_docs, write_drops

UNITS_PER_PARTITION = 8     # shuffle partitions: one per this many units (at least one per worker)


def _docs_meta(with_sigs: bool):
    import pandas as pd
    cols = {"ord": np.zeros(0, np.int64), "h1": np.zeros(0, np.int64), "h2": np.zeros(0, np.int64)}
    if with_sigs:
        cols["sig"] = pd.Series([], dtype=object)
    return pd.DataFrame(cols)


def _docs_frame(item: tuple, with_sigs: bool):
    import pandas as pd
    unit, path = item
    ords, h1, h2, sigs = read_docs(Path(path), unit, with_sigs)
    cols = {"ord": ords, "h1": h1, "h2": h2}
    if with_sigs:
        cols["sig"] = pd.Series([r.tobytes() for r in sigs] if len(ords) else [], dtype=object)
    return pd.DataFrame(cols)


def _meta(**cols):
    import pandas as pd
    return pd.DataFrame({k: (pd.Series([], dtype=object) if t is object else np.zeros(0, t)) for k, t in cols.items()})


I64 = np.int64
PAIRS = {"u": I64, "v": I64}


def _mark_exact(df, exact: bool):
    df = df.copy()
    dup = exact_duplicates(df["ord"].to_numpy(), df["h1"].to_numpy(), df["h2"].to_numpy()) if exact else []
    df["dup"] = df["ord"].isin(dup)
    return df


def _bands_part(df, bands: int, rows: int):
    import pandas as pd
    sigs = sigs_of(df["sig"])
    if len(df) == 0:
        return pd.DataFrame({"key": np.zeros(0, np.int64), "ord": np.zeros(0, np.int64)})
    keys = band_keys(sigs, bands, rows)                                    # (n, bands)
    return pd.DataFrame({"key": keys.reshape(-1), "ord": np.repeat(df["ord"].to_numpy(), bands)})


def _pairs_part(df, w: int):
    import pandas as pd
    u, v = bucket_pairs(df["key"].to_numpy(), df["ord"].to_numpy(), w)
    return pd.DataFrame({"u": u, "v": v}).drop_duplicates()


def _verify_part(df, threshold: float):
    if len(df) == 0:
        return df[["u", "v"]]
    return df.loc[similar(sigs_of(df["su"]), sigs_of(df["sv"]), threshold), ["u", "v"]]


def _save_part(df, path: str, count=None) -> int:
    """One partition -> one Parquet file (bytes columns as binary: Dask's own writer cannot infer them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    fields = [pa.field(c, pa.binary() if df[c].dtype == object else pa.from_numpy_dtype(df[c].dtype))
              for c in df.columns]
    pq.write_table(pa.Table.from_pandas(df, schema=pa.schema(fields), preserve_index=False), path)
    return int(df[count].sum()) if count else len(df)


def _group_min(df, key: str, value: str):
    return df.groupby(key, as_index=False)[value].min()


def _write_drop_part(df, drop_dir: str, tag: str) -> int:
    write_drops(Path(drop_dir), df["ord"].to_numpy(), df["reason"].tolist(), tag)
    return len(df)


class DaskEngine:
    name = "dask"

    def __init__(self, workers: int, address=None, scheduler_file=None):
        import dask
        from distributed import Client, LocalCluster
        dask.config.set({"dataframe.convert-string": False, "dataframe.shuffle.method": "tasks"})
        self.workers, self.cluster = max(1, workers), None
        if address or scheduler_file:
            self.client = Client(address=address, scheduler_file=scheduler_file)
        else:
            self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None, silence_logs=logging.ERROR)
            self.client = Client(self.cluster)

    def map(self, fn, tasks: list) -> list:
        if not tasks:
            return []
        return self.client.gather(self.client.map(fn, tasks, pure=False))

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    # -- dedup ---------------------------------------------------------------------------------------
    def dedup(self, work_files: list, params: DedupParams, drop_dir: Path) -> dict:
        import dask.dataframe as dd
        scratch = Path(drop_dir).parent / "dask"
        shutil.rmtree(scratch, ignore_errors=True)
        P = max(self.workers, -(-len(work_files) // UNITS_PER_PARTITION))

        self.timings = []

        def save(df, name, count=None):
            """Materialize `df` as Parquet files (one per partition) and read it back; with `count`, also the
            sum of that column (computed in the same pass)."""
            import dask
            t0 = time.perf_counter()
            path = scratch / name
            path.mkdir(parents=True)
            sums = dask.compute(*[dask.delayed(_save_part)(p, str(path / f"part-{i:05d}.parquet"), count)
                                  for i, p in enumerate(df.to_delayed())])
            self.timings.append((name, time.perf_counter() - t0))
            out = dd.read_parquet(str(path))
            return (out, int(sum(sums))) if count else out

        docs = dd.from_map(functools.partial(_docs_frame, with_sigs=params.near), work_files,
                           meta=_docs_meta(params.near), enforce_metadata=False)
        marked = save(docs.shuffle("h1", npartitions=P).map_partitions(
            _mark_exact, params.exact, meta=_meta(**{c: (object if c == "sig" else I64) for c in docs.columns},
                                                  dup=bool)), "marked")
        exact = marked[marked["dup"]][["ord"]].assign(reason="exact_duplicate")
        n_exact = self._write_drops(exact, drop_dir, "exact")
        n_near = 0
        if params.near:
            surv = marked[~marked["dup"]][["ord", "sig"]]
            bands = surv.map_partitions(_bands_part, params.bands, params.rows, meta=_meta(key=I64, ord=I64))
            pairs = bands.shuffle("key", npartitions=P).map_partitions(_pairs_part, params.max_pairs_per_member,
                                                                      meta=_meta(**PAIRS))
            pairs = save(pairs.shuffle(["u", "v"], npartitions=P).map_partitions(lambda d: d.drop_duplicates(),
                                                                                  meta=_meta(**PAIRS)),
                         "pairs")
            su = surv.rename(columns={"ord": "u", "sig": "su"})
            sv = surv.rename(columns={"ord": "v", "sig": "sv"})
            joined = pairs.merge(su, on="u", how="inner", npartitions=P).merge(sv, on="v", how="inner",
                                                                                npartitions=P)
            edges = save(joined.map_partitions(_verify_part, params.threshold, meta=_meta(**PAIRS)), "edges")
            if len(edges):
                near = self._components(edges, P, save)
                n_near = self._write_drops(near.assign(reason="near_duplicate"), drop_dir, "near")
        shutil.rmtree(scratch, ignore_errors=True)
        return {"exact": n_exact, "near": n_near}

    def _write_drops(self, df, drop_dir: Path, tag: str) -> int:
        import dask
        parts = df.to_delayed()
        counts = dask.compute(*[dask.delayed(_write_drop_part)(p, str(drop_dir), f"{tag}-{i:05d}")
                                for i, p in enumerate(parts)])
        return int(sum(counts))

    def _components(self, edges, P: int, save):
        """Ordinals whose component (over `edges`) has a smaller ordinal: DataFrame (ord,).

        State: one row per directed edge (node, nbr, label of node), label(n) = n at the start. A round is
        one shuffle: the state rows and one message (nbr, label) per row, shuffled on the node; each node takes
        the smallest label among its own and its messages. Rounds repeat until no label changes (as many as
        the longest shortest path from a component's smallest ordinal, +1)."""
        import dask.dataframe as dd
        both = dd.concat([edges.rename(columns={"u": "node", "v": "nbr"}),
                          edges.rename(columns={"v": "node", "u": "nbr"})])
        state = both.assign(label=both["node"], kind=np.int8(0))
        for it in range(1, 1_000_000):
            msgs = state.map_partitions(_messages, meta=_meta(node=I64, nbr=I64, label=I64, kind=np.int8))
            nxt = dd.concat([state[["node", "nbr", "label", "kind"]], msgs]).shuffle("node", npartitions=P)
            state, changed = save(nxt.map_partitions(_propagate, meta=_meta(node=I64, nbr=I64, label=I64,
                                                                            kind=np.int8, changed=bool)),
                                  f"labels{it}", count="changed")
            if changed == 0:
                break
        nodes = state.map_partitions(lambda d: d.drop_duplicates("node")[["node", "label"]],
                                     meta=_meta(node=I64, label=I64))
        return nodes[nodes["label"] != nodes["node"]][["node"]].rename(columns={"node": "ord"})


def _messages(df):
    return df.assign(node=df["nbr"], nbr=np.int64(-1), kind=np.int8(1))[["node", "nbr", "label", "kind"]]


def _propagate(df):
    """Rows of whole nodes (state kind 0, messages kind 1) -> the state rows with each node's smallest label."""
    import pandas as pd
    best = df.groupby("node")["label"].min()
    st = df[df["kind"] == 0]
    new = best.reindex(st["node"]).to_numpy()
    return pd.DataFrame({"node": st["node"].to_numpy(), "nbr": st["nbr"].to_numpy(), "label": new,
                         "kind": np.zeros(len(st), np.int8), "changed": new != st["label"].to_numpy()})
