"""Readers for what the monitoring sinks write, built on the real libraries (tests and tools use them):
a Prometheus scrape parsed by prometheus_client.parser, TensorBoard events read by TensorBoard's
EventAccumulator, and wandb's offline `.wandb` file (a LevelDB-style log of wandb's protobuf Records)."""
from __future__ import annotations

import json
import struct
import time
import urllib.request
from pathlib import Path


def scrape(url: str, timeout: float = 2.0) -> dict:
    """{metric sample name: {rank label: value}} from a real HTTP GET of a /metrics endpoint."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[s.labels.get("rank")] = s.value
    return out


def tensorboard_scalars(log_dir: Path) -> dict:
    """{tag: [(step, value), ...]} read back by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def wandb_records(path: Path):
    """The protobuf Records of an offline run file (wandb's LevelDB-style log: 7-byte ':W&B' header,
    32 KiB blocks, each chunk = crc32 (4) + length (2, LE) + type (1: full, 2: first, 3: middle, 4: last)).

    As in LevelDB's own log reader, a chunk cut off by the end of the file is a record still being written
    (wandb-core flushes the file from its own process, after `run.finish()` has returned): reading stops
    before it instead of failing on half a protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    if len(data) < 7:
        return
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + n > len(data):  # the tail is not on disk yet
            return
        body = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind == 0:
            continue
        buf += body
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _wandb_file_records(path: Path, wait_s: float) -> list:
    """The records of one run file once its `exit` record is on disk (polled, at most `wait_s` seconds;
    after that, what is there)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            recs = list(wandb_records(path))
        except Exception:  # a chunk header written before its body under load: read again
            recs = None
        if recs and recs[-1].WhichOneof("record_type") == "exit":
            return recs
        if time.monotonic() > deadline:
            return recs if recs is not None else list(wandb_records(path))
        time.sleep(0.1)


def wandb_run(run_dir: Path, wait_s: float = 30.0) -> list[dict]:
    """Every offline run under run_dir/wandb, in start order: {id, name, tags, config, history}.
    Waits (bounded by `wait_s`) for each run file to be complete, i.e. to end with wandb's `exit` record."""
    runs = []
    for d in sorted(Path(run_dir, "wandb").glob("offline-run-*")):
        (f,) = d.glob("run-*.wandb")
        info = {"dir": d, "history": [], "config": {}}
        for rec in _wandb_file_records(f, wait_s):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info.update(id=rec.run.run_id, name=rec.run.display_name, tags=list(rec.run.tags),
                            project=rec.run.project)
                info["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "history":
                info["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                        for i in rec.history.item})
        runs.append(info)
    return runs
