"""A Prometheus endpoint (`/metrics`) per rank, serving the latest record with the rank as a label.

`update()` only swaps a dict reference (the training thread does no formatting); the metric families
are built when Prometheus scrapes, in the server's own thread. Every record key is exported: the names
and units come from megaseek.monitor.schema (`megaseek_loss`, `megaseek_tokens_per_second`,
`megaseek_samples_total`, ...); downstream scores `eval/<task>/<metric>` are one family,
`megaseek_eval_score{task, metric}`. Keys seen once keep their last value (validation loss between evals).
Also exported: `megaseek_step` (updated every step), `megaseek_last_log_timestamp_seconds`,
`megaseek_run_info{run, model, precision, world_size}` and the standard `process_*` collector.
"""
from __future__ import annotations

import time
import warnings
from typing import Iterable, Optional

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from megaseek.monitor.schema import NOT_SCALARS, PROM_PREFIX, labelled, metric, numeric


class _LatestCollector(Collector):
    def __init__(self, rank: int, info: dict):
        self.rank = str(rank)
        self.info = {k: str(v) for k, v in info.items()}
        self.latest: dict = {}
        self.step: Optional[int] = None
        self.stamp: Optional[float] = None

    def collect(self) -> Iterable:
        latest, labels = self.latest, ["rank"]  # one reference read: consistent without a lock
        info = InfoMetricFamily(PROM_PREFIX + "run", "the run this endpoint belongs to", labels=labels)
        info.add_metric([self.rank], self.info)
        yield info
        step = self.step if self.step is not None else latest.get("step")
        if step is not None:
            g = GaugeMetricFamily(PROM_PREFIX + "step", "optimizer steps done", labels=labels)
            g.add_metric([self.rank], float(step))
            yield g
        if self.stamp is not None:
            g = GaugeMetricFamily(PROM_PREFIX + "last_log_timestamp_seconds", "unix time of the last log step",
                                  labels=labels)
            g.add_metric([self.rank], self.stamp)
            yield g
        families = {}  # labelled families (downstream scores by task/metric, MoE statistics by layer/stat)
        for key, value in latest.items():
            x = numeric(value)
            if x is None or key in NOT_SCALARS:
                continue
            m = metric(key)
            lab = labelled(key)
            if lab is not None:
                _, names, values = lab
                if m.prom not in families:
                    families[m.prom] = GaugeMetricFamily(PROM_PREFIX + m.prom, m.help, labels=labels + names)
                families[m.prom].add_metric([self.rank, *values], x * m.scale)
                continue
            cls = CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily
            fam = cls(PROM_PREFIX + m.prom, m.help, labels=labels)
            fam.add_metric([self.rank], x * m.scale)
            yield fam
        yield from families.values()


class PrometheusSink:
    def __init__(self, host: str, port: int, rank: int, info: dict):
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = _LatestCollector(rank, info)
        self.registry.register(self.collector)
        try:
            ProcessCollector(registry=self.registry)
        except Exception:  # not Linux: no /proc
            pass
        self.host, self.port = host, int(port)
        self.server, self.thread = start_http_server(self.port, addr=host, registry=self.registry)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def update(self, record: dict) -> None:
        self.collector.latest = {**self.collector.latest, **record}
        self.collector.stamp = time.time()

    def set_step(self, step: int) -> None:
        self.collector.step = int(step)

    def close(self) -> None:
        try:
            self.server.shutdown()
            self.server.server_close()
        except Exception as e:  # pragma: no cover - shutting down anyway
            warnings.warn(f"[monitor] prometheus shutdown: {e}")
