"""Monitoring without a training run: the hub and its real sinks (JSONL, per-rank files, a Prometheus
endpoint scraped over HTTP, TensorBoard read back by TensorBoard, a wandb offline run read back from its
file), the communication timer in a 2-process gloo world, system metrics, the peak-FLOPs table and the
Grafana / Prometheus files. The end-to-end run is in test_monitor_train.py."""
import copy
import json
import math
import re
import time
from pathlib import Path

import pytest
import yaml

from megaseek.monitor.hub import MetricsHub
from megaseek.monitor.readers import scrape, tensorboard_scalars, wandb_run
from megaseek.monitor.schema import CATALOG, PROM_PREFIX
from tests.helpers import REPO, compose, free_port, run_world


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb never goes to the network and keeps its files under tmp_path."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var, sub in (("WANDB_CONFIG_DIR", "wb_config"), ("WANDB_CACHE_DIR", "wb_cache"),
                     ("WANDB_DATA_DIR", "wb_data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    return tmp_path


def _record(step: int) -> dict:
    return {"step": step, "loss": 5.0 - 0.1 * step, "lr": 1e-3 * step, "grad_norm": 1.0 + step,
            "tokens_per_s": 1000.0 + step, "tokens_per_s_per_rank": 1000.0 + step, "samples": 8 * step,
            "mfu": 0.01 * step, "hfu": 0.015 * step, "model_tflops": 0.5 * step, "step_time_s": 0.25,
            "skipped_steps": 0, "time_data_s": 0.01, "time_forward_s": 0.05, "time_backward_s": 0.1,
            "time_step_s": 0.05, "loss_scale": 2.0 ** 16}


def _config(port: int, extra=()):
    cfg = compose([f"logging.prometheus.port={port}", "logging.progress=false", "train.seq_len=32"] + list(extra))
    from omegaconf import OmegaConf
    return cfg, OmegaConf.to_container(cfg, resolve=True)


def test_hub_fans_out_to_every_sink_and_resume_continues_the_wandb_run(tmp_path, wandb_env):
    port = free_port()
    cfg, rc = _config(port, ["logging.wandb.mode=auto", "logging.wandb.tags=[unit]"])
    run_dir = tmp_path / "run"
    hub = MetricsHub(cfg.logging, run_dir, 0, 1, 10, 0, rc)
    written = []
    for step in (1, 2, 3):
        rec = _record(step)
        if step == 2:
            rec.update(val_loss=4.5, val_ppl=math.exp(4.5), grad_norm=float("inf"))  # an fp16 overflow
        written.append(hub.log(rec))
        hub.progress(step, rec)
    hub.progress(4, None)
    got = scrape(f"http://127.0.0.1:{port}/metrics")  # a real HTTP scrape while the hub is open
    assert got["megaseek_loss"] == {"0": pytest.approx(5.0 - 0.3)}
    assert got["megaseek_tokens_per_second"]["0"] == pytest.approx(1003.0)
    assert got["megaseek_samples_total"]["0"] == 24
    assert got["megaseek_tokens_total"]["0"] == 24 * 32  # samples x train.seq_len
    assert got["megaseek_model_flops_per_second"]["0"] == pytest.approx(1.5e12)
    assert got["megaseek_validation_loss"]["0"] == pytest.approx(4.5)  # kept after the eval step
    assert got["megaseek_step"]["0"] == 4  # progress() updates the step between log steps
    assert got["megaseek_process_resident_memory_bytes"]["0"] > 50e6
    assert got["megaseek_run_info"]["0"] == 1
    assert got["megaseek_loss_scale"]["0"] == 65536.0
    assert time.time() - got["megaseek_last_log_timestamp_seconds"]["0"] < 60
    hub.close()
    with pytest.raises(OSError):  # closed: the port is released
        scrape(f"http://127.0.0.1:{port}/metrics", timeout=0.5)

    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    assert lines[1]["grad_norm"] == "inf"  # JSON has no inf: kept visible as a string
    lines[1]["grad_norm"] = float("inf")
    assert lines == [json.loads(json.dumps(w)) for w in written]
    assert lines[2]["peak_tflops"] == pytest.approx(1.5 / 0.03)  # model_tflops / mfu
    assert lines[2]["hardware_tflops"] == pytest.approx(1.5 * 1.5)
    assert lines[0]["rss_gb"] > 0.05 and 0 < lines[0]["host_mem_percent"] <= 100
    ranks = [json.loads(l) for l in (run_dir / "system" / "rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ranks] == [1, 2, 3] and all(r["rank"] == 0 and r["rss_gb"] > 0 for r in ranks)

    tb = tensorboard_scalars(run_dir / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3]
    assert [v for _, v in tb["train/loss"]] == pytest.approx([4.9, 4.8, 4.7], rel=1e-6)
    assert tb["val/val_loss"] == [(2, pytest.approx(4.5))]
    assert [v for _, v in tb["train/grad_norm"]] == [2.0, float("inf"), 4.0]
    assert tb["train/loss_scale"][0][1] == 65536.0
    assert "sys/rss_gb" in tb and "time/time_comm_s" in tb and "perf/mfu" in tb

    (first,) = wandb_run(run_dir)
    assert first["name"] == "run" and first["project"] == "megaseek"
    assert "unit" in first["tags"] and "model:tiny" in first["tags"]
    assert first["config"]["train"]["seq_len"] == 32 and first["config"]["world_size"] == 1
    hist = [h for h in first["history"] if "train/loss" in h]
    assert [h["_step"] for h in hist] == [1, 2, 3]
    assert [h["train/loss"] for h in hist] == pytest.approx([4.9, 4.8, 4.7])

    # started again in the same run directory (a resume from step 3): the same wandb run, TB continues
    hub = MetricsHub(cfg.logging, run_dir, 0, 1, 10, 3, rc)
    hub.log(_record(4))
    hub.close()
    runs = wandb_run(run_dir)
    assert len(runs) == 2 and runs[1]["id"] == runs[0]["id"]
    assert [h["_step"] for h in runs[1]["history"] if "train/loss" in h] == [4]
    assert [s for s, _ in tensorboard_scalars(run_dir / "tensorboard")["train/loss"]] == [1, 2, 3, 4]


def test_wandb_mode_follows_the_api_key(monkeypatch):
    from megaseek.monitor.wandb_sink import resolve_mode
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("offline") == "offline" and resolve_mode("disabled") == "disabled"
    with pytest.raises(ValueError):
        resolve_mode("sometimes")


def test_sinks_switch_off_and_a_taken_port_does_not_stop_training(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg, rc = _config(port, ["logging=minimal", f"logging.prometheus.port={port}"])
        with pytest.warns(UserWarning, match="no Prometheus endpoint"):
            hub = MetricsHub(cfg.logging, tmp_path, 0, 1, 10, 0, rc)
        hub.log(_record(1))
        hub.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "system"]


def _comm(rank, world, sleep_s):
    import torch
    import torch.distributed as dist

    from megaseek.monitor.comm import CommTimer
    from tests.helpers import init_gloo
    init_gloo(rank, world)
    dist.barrier()  # both ranks here: the wait below is the sleep, not start-up skew
    original = dist.all_reduce
    timer = CommTimer().install()
    assert dist.all_reduce is not original and dist.all_reduce.__wrapped__ is original
    t = torch.ones(1 << 16)
    if rank == 1:
        time.sleep(sleep_s)  # rank 0 waits inside the collective all that time
    dist.all_reduce(t)
    objs = [None] * world
    dist.all_gather_object(objs, rank)  # nested collectives count once
    secs, calls = timer.take()
    timer.uninstall()
    assert dist.all_reduce is original
    dist.all_reduce(t)  # no longer counted
    return secs, calls, float(t[0]), objs


def test_comm_timer_measures_time_blocked_in_collectives():
    (s0, c0, v0, o0), (s1, c1, _, _) = run_world(2, _comm, 0.6, timeout=120)
    assert 0.4 <= s0 < 5, s0        # rank 0 sat in all_reduce while rank 1 slept (0.6 s, less scheduling skew)
    assert s1 < s0 - 0.3, (s0, s1)  # rank 1 arrived last: its collectives were quick
    assert c0 == c1 == 2            # all_reduce + all_gather_object (its inner collectives not counted twice)
    assert v0 == 4.0 and o0 == [0, 1]


def test_system_stats_see_cpu_and_memory():
    import numpy as np

    from megaseek.monitor.system import SystemStats
    st = SystemStats()
    base = st.sample()
    w0, c0 = time.perf_counter(), time.process_time()
    while time.process_time() - c0 < 0.3:
        sum(range(1000))
    block = np.ones(200_000_000 // 8)  # 200 MB, touched
    after = st.sample()
    busy = 100 * (time.process_time() - c0) / (time.perf_counter() - w0)  # what this process really got
    assert after["cpu_percent"] == pytest.approx(busy, rel=0.3), (after, busy)
    assert after["rss_gb"] - base["rss_gb"] > 0.15
    assert 0 < after["host_mem_percent"] <= 100 and after["host_mem_available_gb"] > 0
    assert after["num_threads"] >= 1
    del block


def test_peak_flops_table():
    from megaseek.model.flops import gpu_peak_tflops
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert gpu_peak_tflops("NVIDIA H200", "fp8") == 1978.9
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert gpu_peak_tflops("Tesla T4", "fp16") is None


def dashboard_metric_names() -> set:
    dash = json.loads((REPO / "monitoring" / "grafana" / "megaseek-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    return {n for e in exprs for n in re.findall(r"\b(megaseek_[a-z_]+)\b", e)}


def exported_names() -> set:
    names = {PROM_PREFIX + "step", PROM_PREFIX + "last_log_timestamp_seconds", PROM_PREFIX + "run_info"}
    for m in CATALOG.values():
        names.add(PROM_PREFIX + m.prom + ("_total" if m.kind == "counter" else ""))
    return names


def test_dashboard_queries_name_exported_metrics_and_scrape_config_matches():
    used = dashboard_metric_names()
    assert used <= exported_names(), used - exported_names()
    prom = yaml.safe_load((REPO / "monitoring" / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    port = compose(["logging=full"]).logging.prometheus.port
    assert f"localhost:{port}" in job["static_configs"][0]["targets"]
    assert compose([]).logging.prometheus.host == "127.0.0.1"  # loopback unless configured otherwise


def test_wandb_name_group_and_tags_come_from_hydra():
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from megaseek.monitor.wandb_sink import hydra_identity
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hcompose("config", overrides=["optimizer.lr=1e-4", "zero.stage=1"], return_hydra_config=True)
    sweep = copy.deepcopy(cfg)
    with open_dict(sweep):  # a job of a `-m` sweep
        sweep.hydra.mode, sweep.hydra.job.num = RunMode.MULTIRUN, 3
    hc = HydraConfig.instance()
    try:
        hc.set_config(cfg)  # a single run: named after its directory
        assert hydra_identity("/runs/r7", cfg.logging.wandb) == {
            "name": "r7", "group": None, "overrides": ["optimizer.lr=1e-4", "zero.stage=1"]}
        hc.set_config(sweep)  # a sweep job: named by its overrides, grouped by the sweep directory
        got = hydra_identity("/multirun/x/3", sweep.logging.wandb)
        assert got["name"] == "optimizer.lr=1e-4,zero.stage=1"
        assert got["group"] == Path(str(sweep.hydra.sweep.dir)).name
        assert hydra_identity("/multirun/x/3", {"name": "mine", "group": "g"})["name"] == "mine"
    finally:
        hc.cfg = None
    assert not HydraConfig.initialized()


def test_a_rollback_keeps_every_sink_consistent(tmp_path, wandb_env):
    """The trainer may roll back a few steps after non-finite steps: steps 2-3 are logged again."""
    from megaseek.monitor.metrics import read_metrics
    cfg, rc = _config(0, ["logging.wandb.mode=offline"])
    hub = MetricsHub(cfg.logging, tmp_path, 0, 1, 10, 0, rc)
    for step, loss in ((1, 5.0), (2, 5.0), (3, 5.0), (2, 11.0), (3, 12.0), (4, 5.0)):
        hub.log({**_record(step), "loss": loss})
        hub.progress(step, None)
    with pytest.warns(UserWarning, match="rollback"):
        hub.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 2, 3, 4]
    last = read_metrics(tmp_path / "metrics.jsonl", dedupe=True)  # what the plot draws: the latest values
    assert [(r["step"], r["loss"]) for r in last] == [(1, 5.0), (2, 11.0), (3, 12.0), (4, 5.0)]
    tb = tensorboard_scalars(tmp_path / "tensorboard")["train/loss"]  # TensorBoard drops the rolled-back events
    assert tb == [(1, 5.0), (2, 11.0), (3, 12.0), (4, 5.0)]
    (run,) = wandb_run(tmp_path)  # wandb keeps its first values and goes on from the next new step
    assert [(h["_step"], h["train/loss"]) for h in run["history"] if "train/loss" in h] == [
        (1, 5.0), (2, 5.0), (3, 5.0), (4, 5.0)]

    # wandb-core flushes the file from its own process after finish(): a file cut mid-record (what a reader
    # can see under load) reads as the records before the cut, never as a protobuf error
    from megaseek.monitor.readers import wandb_records
    data = next(run["dir"].glob("run-*.wandb")).read_bytes()
    full = [r.WhichOneof("record_type") for r in wandb_records(next(run["dir"].glob("run-*.wandb")))]
    assert full[-1] == "exit"
    for cut in (len(data) - 3, len(data) // 2):
        (tmp_path / "cut.wandb").write_bytes(data[:cut])
        got = [r.WhichOneof("record_type") for r in wandb_records(tmp_path / "cut.wandb")]
        assert 0 < len(got) < len(full) and got == full[:len(got)]


def test_moe_layer_statistics_are_one_labelled_prometheus_family():
    """`moe/L<layer>/<stat>` keys (ExpertBalance) export as megaseek_moe_layer{layer, stat}, beside the eval-score
    family, so the dashboard aggregates by layer; TensorBoard/wandb tags keep the key."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from megaseek.monitor.prometheus_sink import _LatestCollector
    from megaseek.monitor.schema import tag
    c = _LatestCollector(0, {"run": "r"})
    c.latest = {"step": 3, "moe/L1/max_load": 1.5, "moe/L2/max_load": 2.25, "moe/L1/dropped": 0.125,
                "moe/L2/aux_loss": 0.01, "moe/max_load": 2.25, "eval/t/acc": 0.3}
    reg = CollectorRegistry(auto_describe=False)
    reg.register(c)
    got = {(s.name, s.labels.get("layer"), s.labels.get("stat"), s.labels.get("task")): s.value
           for fam in text_string_to_metric_families(generate_latest(reg).decode()) for s in fam.samples}
    assert got[("megaseek_moe_layer", "1", "max_load", None)] == 1.5
    assert got[("megaseek_moe_layer", "2", "max_load", None)] == 2.25
    assert got[("megaseek_moe_layer", "1", "dropped", None)] == 0.125
    assert got[("megaseek_moe_layer", "2", "aux_loss", None)] == 0.01
    assert got[("megaseek_moe_max_load", None, None, None)] == 2.25
    assert got[("megaseek_eval_score", None, None, "t")] == 0.3
    assert not any(n.startswith("megaseek_moe_L") for n, *_ in got)  # no family per layer
    assert tag("moe/L1/max_load") == "moe/L1/max_load" and {"megaseek_moe_layer", "megaseek_moe_max_load"} <= \
        dashboard_metric_names()
