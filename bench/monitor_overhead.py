"""Monitoring overhead: step time with every sink on vs. monitoring off, measured in the same run.

    .venv/bin/python bench/monitor_overhead.py [--model tiny|small] [--steps 60] [--log-interval 10] [--rounds 2]

One process trains the same model from scratch several times, alternating the two settings
(off, on, off, on, ...) so that drift in the machine's speed hits both alike:
  off: metrics.jsonl only (the trainer always writes it): no progress bar, system stats, per-rank files,
       communication timing, TensorBoard, wandb or Prometheus;
  on:  all of them: progress bar, system stats, per-rank files, communication timing, TensorBoard,
       wandb (offline, files in the run directory) and a Prometheus endpoint scraped every 0.5 s.
Step time = wall time between two consecutive log records / steps between them (JSONL `time` stamps:
everything the loop does, hub.log included); the median over the steady state (the first --warmup-frac
of the records are left out), then the median over rounds.
Also prints: the hub's share of a step on the training thread, from its own `time_monitor_s` (robust
to a loaded machine: both figures come from the same steps); the CPU that the background sink thread and
wandb's service process used, relative to the run's own CPU; the hub's cost per call, timed directly.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)  # offline: a benchmark never talks to the network

MODELS = {  # small: the test model (steps of tens of ms: the harshest ratio); tiny: the CPU default
    "small": ["model.vocab_size=1001", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
              "model.num_kv_heads=2", "model.intermediate_size=128", "model.max_seq_len=64",
              "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=8",
              "data.max_bytes=1500000", "data.tokenizer_sample_bytes=1000000"],
    "tiny": ["model=tiny", "train.seq_len=128", "train.global_batch_size=16", "train.micro_batch_size=16",
             "data.max_bytes=3000000", "data.tokenizer_sample_bytes=2000000"],
}
OFF = ["logging=minimal", "logging.system_stats=false", "logging.rank_files=false", "logging.comm_timing=false"]


def on_overrides(port: int) -> list[str]:
    return ["logging=full", f"logging.prometheus.port={port}", "logging.wandb.mode=offline",
            "logging.progress=true"]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CpuWatch:
    """CPU seconds of the hub's background thread and of child processes (wandb-core) over one run."""

    def __init__(self):
        import psutil
        self.me = psutil.Process()
        self.kids0 = self._kids()
        self.thread_cpu: dict = {}
        self.kids = dict(self.kids0)
        self.cpu0 = time.process_time()

    def _kids(self) -> dict:
        out = {}
        for c in self.me.children(recursive=True):
            try:
                t = c.cpu_times()
                out[c.pid] = t.user + t.system
            except Exception:
                pass
        return out

    def sample(self) -> None:
        ids = {t.native_id for t in threading.enumerate() if t.name == "megaseek-monitor"}
        for th in self.me.threads():
            if th.id in ids:
                self.thread_cpu[th.id] = th.user_time + th.system_time
        self.kids.update(self._kids())

    def result(self) -> dict:
        kids = sum(v - self.kids0.get(pid, 0.0) for pid, v in self.kids.items())
        return {"thread": sum(self.thread_cpu.values()), "children": kids, "process": time.process_time() - self.cpu0}


def scraper(port: int, stop: threading.Event, watch: CpuWatch) -> None:
    while not stop.wait(0.5):
        watch.sample()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read()
        except OSError:
            pass


def steady(run_dir: Path, warmup_frac: float) -> tuple[float, float]:
    """(median wall time per step, median share of the hub on the training thread) over the steady state."""
    from megaseek.monitor.metrics import read_metrics
    recs = read_metrics(run_dir / "metrics.jsonl")
    k = min(len(recs) - 2, max(1, int(len(recs) * warmup_frac)))
    per = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(recs[k:], recs[k + 1:])]
    share = [r["time_monitor_s"] / r["step_time_s"] for r in recs[k + 1:] if "time_monitor_s" in r]
    return statistics.median(per), (statistics.median(share) if share else 0.0)


def train_once(base: list[str], extra: list[str], run_dir: Path) -> None:
    from tests.helpers import compose
    from megaseek.train.job import pretrain
    pretrain(compose(base + extra + [f"run_dir={run_dir}"]))


def hub_call_costs(tmp: Path, n: int = 200) -> dict:
    """Seconds per hub.log (every sink) and per hub.progress, called directly."""
    from omegaconf import OmegaConf
    from tests.helpers import compose
    from megaseek.monitor.hub import MetricsHub
    cfg = compose(on_overrides(free_port()))
    hub = MetricsHub(cfg.logging, tmp / "hubcost", 0, 1, n, 0, OmegaConf.to_container(cfg, resolve=True))
    rec = {"step": 0, "loss": 3.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e4, "tokens_per_s_per_rank": 1e4,
           "samples": 0, "mfu": 0.1, "hfu": 0.1, "model_tflops": 0.01, "step_time_s": 0.1, "skipped_steps": 0,
           "time_data_s": 1e-4, "time_forward_s": 0.03, "time_backward_s": 0.05, "time_step_s": 0.02}
    time.sleep(3.0)  # let the background thread start wandb and TensorBoard first
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        hub.log({**rec, "step": i, "samples": 16 * i})
    t_log = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for i in range(n):
        hub.progress(i, None)
    t_prog = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    hub.close()
    return {"log": t_log, "progress": t_prog, "close": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup-frac", type=float, default=0.25)
    ap.add_argument("--data-root", default=str(REPO / "data"))
    args = ap.parse_args()

    base = MODELS[args.model] + [f"data.root={args.data_root}", f"train.steps={args.steps}",
                                 f"train.log_interval={args.log_interval}", "train.save_interval=1000000",
                                 "train.sample_tokens=0", "zero.stage=0"]
    times: dict[str, list[float]] = {"off": [], "on": []}
    shares, cpu = [], []
    with tempfile.TemporaryDirectory(prefix="monbench-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("WANDB_CONFIG_DIR", str(tmp / "wandb-config"))
        train_once(base, OFF + ["train.steps=3"], tmp / "warm")  # data preparation, imports, caches
        for rnd in range(args.rounds):
            for mode in ("off", "on"):
                run_dir = tmp / f"{mode}{rnd}"
                stop, watch = threading.Event(), CpuWatch()
                extra = OFF
                if mode == "on":
                    port = free_port()
                    extra = on_overrides(port)
                    threading.Thread(target=scraper, args=(port, stop, watch), daemon=True).start()
                train_once(base, extra, run_dir)
                stop.set()
                t, share = steady(run_dir, args.warmup_frac)
                times[mode].append(t)
                if mode == "on":
                    shares.append(share)
                    cpu.append(watch.result())
                print(f"[bench] round {rnd} {mode:>3}: {1000 * t:.2f} ms/step"
                      + (f", hub on the training thread {100 * share:.3f}% of a step" if mode == "on" else ""), flush=True)
        costs = hub_call_costs(tmp)

    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    per_step = costs["log"] / args.log_interval + costs["progress"]
    print(f"\nmodel={args.model} steps={args.steps} log_interval={args.log_interval} rounds={args.rounds}")
    print(f"step time, monitoring off: {1000 * off:.2f} ms   (runs: {', '.join(f'{1000 * t:.2f}' for t in times['off'])})")
    print(f"step time, monitoring on:  {1000 * on:.2f} ms   (runs: {', '.join(f'{1000 * t:.2f}' for t in times['on'])})")
    print(f"ratio on/off: {on / off:.4f}  ({100 * (on / off - 1):+.2f}%; budget +3%)")
    print(f"in the 'on' runs, the hub on the training thread (time_monitor_s / step_time_s, median): "
          f"{100 * statistics.median(shares):.3f}% of a step")
    bg = sum(c["thread"] + c["children"] for c in cpu) / sum(c["process"] for c in cpu)
    print(f"CPU of the monitor thread + wandb-core (start-up included) / this process's CPU: {100 * bg:.2f}%")
    print(f"hub cost, called directly: log {1000 * costs['log']:.3f} ms/call (all sinks), "
          f"progress {1000 * costs['progress']:.3f} ms/call, close {costs['close']:.2f} s")
    print(f"  -> {1000 * per_step:.3f} ms per step at log_interval={args.log_interval} = "
          f"{100 * per_step / off:.2f}% of the off step time")


if __name__ == "__main__":
    main()
