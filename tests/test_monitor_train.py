"""A real 2-rank training run (gloo, dp=2, ZeRO-1, full activation recomputation) with every sink on,
scraped over HTTP while it trains, then started again in the same run directory (a resume).

Checks: every metric of the issue in metrics.jsonl with sane, mutually consistent values; each rank's
system file; the Prometheus endpoints of both ranks (rank label) during training; TensorBoard's reader
and the wandb offline file give back the JSONL's numbers; the resume continues the same wandb run; the
plot command writes a PNG; the Grafana dashboard's queries name metrics the endpoint serves."""
import http.client
import json
import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megaseek.monitor.readers import scrape, tensorboard_scalars, wandb_run
from megaseek.monitor.schema import SYSTEM_KEYS, TRAINER_KEYS
from tests.helpers import REPO, SMALL_DATA, SMALL_MODEL, compose, run_world
from tests.test_monitor import dashboard_metric_names

STEPS, MORE, LOG, EVAL, GLOBAL, SEQ = 60, 20, 2, 20, 8, 32
COMMON = SMALL_MODEL + SMALL_DATA + [
    f"train.seq_len={SEQ}", f"train.global_batch_size={GLOBAL}", "train.micro_batch_size=2",
    f"train.log_interval={LOG}", f"train.eval_interval={EVAL}", "train.eval_batches=2", "train.sample_tokens=0",
    "train.activation_checkpointing=full", "train.save_interval=100000", "zero.stage=1",
    "optimizer.warmup_steps=5", "optimizer.lr=3e-3", "logging.progress=false", "logging.wandb.mode=auto",
    "logging.tensorboard.enabled=true", "logging.tensorboard.flush_secs=1"]


def _train(rank, world, run_dir, data_root, port):
    from megaseek.train.job import pretrain
    base = COMMON + [f"data.root={data_root}", f"run_dir={run_dir}", f"logging.prometheus.port={port}"]
    first = pretrain(compose(base + [f"train.steps={STEPS}"]))
    second = pretrain(compose(base + [f"train.steps={STEPS + MORE}"]))  # same run_dir: resumes
    return first["steps_this_run"], second["steps_this_run"]


def _two_free_ports() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitor")
    mp = pytest.MonkeyPatch()
    mp.delenv("WANDB_API_KEY", raising=False)  # mode auto -> offline, never the network
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        mp.setenv(var, str(tmp / var.lower()))
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_DISABLE_GIT", "true")
    run_dir, port = tmp / "run", _two_free_ports()
    box: dict = {}

    def train():
        try:
            box["result"] = run_world(2, _train, str(run_dir), str(data_root), port, timeout=400)
        except BaseException as e:  # surfaced below
            box["error"] = e

    th = threading.Thread(target=train, daemon=True)
    th.start()
    scrapes, deadline = {}, time.time() + 420
    while th.is_alive() and time.time() < deadline:
        for r in (0, 1):  # rank r serves port + local_rank
            if r in scrapes:
                continue
            try:
                got = scrape(f"http://127.0.0.1:{port + r}/metrics", timeout=1.0)
            except (OSError, http.client.HTTPException):  # not up yet, or (before it binds) a gloo socket
                continue  # that took the ephemeral port and answers with garbage: try again
            if "megaseek_loss" in got and "megaseek_tokens_per_second" in got:
                scrapes[r] = (got, box.get("result"))  # result None: training still running
        time.sleep(0.05)
    th.join(timeout=max(1.0, deadline - time.time()))
    mp.undo()
    if "error" in box:
        raise box["error"]
    assert "result" in box, "training did not finish"
    return {"dir": run_dir, "result": box["result"], "scrapes": scrapes}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_jsonl_holds_every_metric_with_sane_values(run):
    from megaseek.model.config import ModelConfig
    from megaseek.model.flops import flops_per_token
    assert run["result"] == [(STEPS, MORE)] * 2  # steps this run, per rank: first run, resume
    recs = _jsonl(run["dir"] / "metrics.jsonl")
    steps = [r["step"] for r in recs]
    assert steps == list(range(LOG, STEPS + MORE + 1, LOG))  # the resume appends, continuing the steps
    required = set(TRAINER_KEYS) | set(SYSTEM_KEYS) | {"time_comm_s", "time_monitor_s", "tokens_seen",
                                                       "peak_tflops", "hardware_tflops", "time"}
    cfg = compose(COMMON)
    mcfg = ModelConfig.from_dict({k: v for k, v in dict(cfg.model).items()})
    fl = flops_per_token(mcfg, SEQ, "full")
    assert fl["hardware"] > fl["model"]
    for r in recs:
        assert required <= set(r), required - set(r)
        assert "loss_scale" not in r  # fp32: no loss scaling
        assert 0 < r["loss"] < math.log(1001) + 1 and r["lr"] > 0
        assert 0 < r["grad_norm"] < 100 and r["skipped_steps"] == 0
        assert r["samples"] == r["step"] * GLOBAL and r["tokens_seen"] == r["samples"] * SEQ
        assert r["tokens_per_s"] == pytest.approx(GLOBAL * SEQ / r["step_time_s"], rel=0.02)
        assert r["tokens_per_s_per_rank"] == pytest.approx(r["tokens_per_s"] / 2)
        assert 0 < r["mfu"] < 1 and r["hfu"] / r["mfu"] == pytest.approx(fl["hardware"] / fl["model"])
        assert r["model_tflops"] == pytest.approx(fl["model"] * r["tokens_per_s"] / 1e12)
        assert r["peak_tflops"] == pytest.approx(r["model_tflops"] / r["mfu"])
        assert 0 < r["peak_tflops"] < 100  # this machine's measured matmul peak, both ranks
        phases = r["time_data_s"] + r["time_forward_s"] + r["time_backward_s"] + r["time_step_s"]
        assert min(r["time_forward_s"], r["time_backward_s"], r["time_step_s"]) > 0 and r["time_data_s"] >= 0
        assert phases <= r["step_time_s"] * 1.02
        assert r["time_comm_s"] > 0 and r["time_monitor_s"] >= 0  # dp=2: gradients are all-reduced every step
        assert 0 < r["rss_gb"] < 24 and r["num_threads"] >= 1 and r["cpu_percent"] >= 0
        assert 0 < r["host_mem_percent"] <= 100 and r["host_mem_available_gb"] > 0
        assert 0 <= r["host_cpu_percent"] <= 100
    assert sum(r["cpu_percent"] for r in recs) > 0
    mean = lambda k: sum(r[k] for r in recs) / len(recs)  # noqa: E731
    assert mean("time_comm_s") < 1.5 * mean("step_time_s")  # waits for the other rank included
    assert mean("time_monitor_s") < 0.25 * mean("step_time_s")  # the hub's own cost on the training thread
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == list(range(EVAL, STEPS + MORE + 1, EVAL))
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(1001)  # it learns
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3


def test_every_rank_writes_its_system_metrics(run):
    main = {r["step"] for r in _jsonl(run["dir"] / "metrics.jsonl")}
    for rank in (0, 1):
        recs = _jsonl(run["dir"] / "system" / f"rank{rank}.jsonl")
        assert {r["step"] for r in recs} == main and all(r["rank"] == rank for r in recs)
        assert all(0.05 < r["rss_gb"] < 24 and r["time_comm_s"] > 0 and r["time_forward_s"] > 0 for r in recs)


def test_prometheus_endpoint_scraped_during_training(run):
    assert set(run["scrapes"]) == {0, 1}
    for rank, (got, finished) in run["scrapes"].items():
        assert finished is None  # scraped while training was still running
        assert set(got["megaseek_loss"]) == {str(rank)}
        assert 0 < got["megaseek_loss"][str(rank)] < math.log(1001) + 1
        assert got["megaseek_tokens_per_second"][str(rank)] > 0
        assert got["megaseek_step"][str(rank)] >= LOG
        assert got["megaseek_samples_total"][str(rank)] >= LOG * GLOBAL
        assert got["megaseek_process_resident_memory_bytes"][str(rank)] > 50e6
    served = set(run["scrapes"][0][0])
    # every metric the dashboard queries is served, except those of GPUs, fp16, evaluation steps (downstream
    # evaluation: tests/test_downstream.py scrapes those) and MoE models (tests/test_monitor.py: their family)
    missing = {n for n in dashboard_metric_names() - served
               if not n.startswith(("megaseek_gpu_", "megaseek_loss_scale", "megaseek_validation_", "megaseek_eval_",
                                    "megaseek_moe_"))}
    assert not missing, missing


def test_tensorboard_reader_gives_back_the_jsonl(run):
    recs = _jsonl(run["dir"] / "metrics.jsonl")
    tb = tensorboard_scalars(run["dir"] / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == [r["step"] for r in recs]
    assert [v for _, v in tb["train/loss"]] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
    assert [s for s, _ in tb["val/val_loss"]] == [r["step"] for r in recs if "val_loss" in r]
    for t in ("perf/tokens_per_s", "perf/mfu", "perf/hfu", "time/time_comm_s", "time/time_data_s",
              "sys/rss_gb", "sys/cpu_percent", "train/grad_norm", "train/lr"):
        assert len(tb[t]) == len(recs), t


def test_wandb_offline_run_is_written_and_resumed(run):
    recs = _jsonl(run["dir"] / "metrics.jsonl")
    runs = wandb_run(run["dir"])
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]  # the resume continued the same run
    assert all(r["dir"].name.startswith("offline-run-") for r in runs)
    assert runs[0]["name"] == "run" and "zero:1" in runs[0]["tags"]
    assert runs[0]["config"]["train"]["activation_checkpointing"] == "full"
    assert runs[0]["config"]["world_size"] == 2
    hist = [h for r in runs for h in r["history"] if "train/loss" in h]
    assert [h["_step"] for h in hist] == [r["step"] for r in recs]
    assert [h["train/loss"] for h in hist] == pytest.approx([r["loss"] for r in recs])
    assert all(h["perf/tokens_per_s"] > 0 and "sys/rss_gb" in h for h in hist)


def test_plot_command_writes_a_png(run, tmp_path):
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "plot.py"), f"run_dir={run['dir']}", f"out={out}"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    import matplotlib.image
    img = matplotlib.image.imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and img.shape[0] > 500 and img.shape[1] > 500
    assert img[..., :3].std() > 0.05  # curves, not a blank canvas
