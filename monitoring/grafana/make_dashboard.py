"""Regenerates megaseek-dashboard.json (Grafana, Prometheus data source): `python monitoring/grafana/make_dashboard.py`.
Metric names are the Prometheus names of megaseek/monitor/schema.py; tests/test_monitor.py checks each one."""
import json
SEL = '{job=~"$job", rank=~"$rank"}'
JOB = '{job=~"$job"}'
panels, pid = [], [0]
y = [0]
def row(title):
    pid[0] += 1
    panels.append({"type": "row", "title": title, "id": pid[0], "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y[0]}, "panels": []})
    y[0] += 1
pos = {"x": 0}
def ts(title, targets, unit="short", w=8, h=8, desc="", kind="timeseries", extra=None):
    pid[0] += 1
    if pos["x"] + w > 24:
        pos["x"] = 0; y[0] += h
    p = {"type": kind, "title": title, "id": pid[0], "description": desc,
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "gridPos": {"h": h, "w": w, "x": pos["x"], "y": y[0]},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                     "tooltip": {"mode": "multi", "sort": "none"}},
         "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": l,
                      "datasource": {"type": "prometheus", "uid": "${datasource}"}} for i, (e, l) in enumerate(targets)]}
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    if extra: p.update(extra)
    panels.append(p)
    pos["x"] += w
    if pos["x"] >= 24:
        pos["x"] = 0; y[0] += h
def newrow(title):
    if pos["x"]:
        pos["x"] = 0; y[0] += 8
    row(title)

row("Progress")
ts("Step", [(f"max(megaseek_step{JOB})", "step")], w=4, h=5, kind="stat")
ts("Samples seen", [(f"max(megaseek_samples_total{JOB})", "samples")], w=4, h=5, kind="stat")
ts("Tokens seen", [(f"max(megaseek_tokens_total{JOB})", "tokens")], w=4, h=5, kind="stat")
ts("Skipped steps (fp16 overflow)", [(f"max(megaseek_skipped_steps_total{JOB})", "skipped")], w=4, h=5, kind="stat")
ts("Seconds since last log step", [(f"time() - max(megaseek_last_log_timestamp_seconds{JOB})", "age")], unit="s", w=4, h=5, kind="stat",
   desc="Grows without bound when the job hangs or died.")
ts("Peak FLOP/s (MFU reference)", [(f"max(megaseek_peak_flops_per_second{JOB})", "peak")], unit="flops", w=4, h=5, kind="stat")
newrow("Training")
ts("Loss", [(f"avg(megaseek_loss{JOB})", "train"), (f"avg(megaseek_validation_loss{JOB})", "validation")])
ts("Validation perplexity", [(f"avg(megaseek_validation_perplexity{JOB})", "perplexity")])
ts("Learning rate", [(f"avg(megaseek_learning_rate{JOB})", "lr")])
ts("Gradient norm", [(f"avg(megaseek_grad_norm{JOB})", "grad norm")])
ts("fp16 loss scale", [(f"avg(megaseek_loss_scale{JOB})", "loss scale")], desc="fp16 runs only")
ts("Skipped steps", [(f"max(megaseek_skipped_steps_total{JOB})", "skipped"), (f"increase(megaseek_skipped_steps_total{SEL}[5m])", "rank {{rank}} last 5m")])
newrow("Downstream evaluation (train.eval_tasks)")
ts("Task scores", [(f'avg by (task, metric) (megaseek_eval_score{{job=~"$job", metric=~"acc.*|exact_match"}})', "{{task}} {{metric}}")], unit="percentunit",
   desc="lm-eval scores on the live model at eval steps (step 0: the untrained baseline; 0.25 = chance on 4 choices).")
ts("Inference latency, batch 1 (KV cache)", [(f"avg(megaseek_eval_time_to_first_token_p50_seconds{JOB})", "TTFT p50"), (f"avg(megaseek_eval_time_to_first_token_p95_seconds{JOB})", "TTFT p95"), (f"avg(megaseek_eval_decode_token_p50_seconds{JOB})", "decode/token p50"), (f"avg(megaseek_eval_decode_token_p95_seconds{JOB})", "decode/token p95")], unit="s")
ts("Evaluation time", [(f"max(megaseek_eval_seconds{JOB})", "eval seconds")], unit="s", desc="Wall time of the evaluation at an eval step; not counted in tokens/s.")
newrow("Mixture of experts (model.mlp=moe)")
ts("Expert load max/mean per layer", [(f'avg by (layer) (megaseek_moe_layer{{job=~"$job", stat="max_load"}})', "layer {{layer}}"), (f"max(megaseek_moe_max_load{JOB})", "max over layers")],
   desc="1 = every expert gets the same share of the global batch's assignments; the aux-loss-free bias pulls it toward 1.")
ts("Dropped assignments", [(f'avg by (layer) (megaseek_moe_layer{{job=~"$job", stat="dropped"}})', "layer {{layer}}")], unit="percentunit",
   desc="Fraction of token-to-expert assignments over the capacity (model.capacity_factor); 0 when dropless.")
ts("Balance loss", [(f'avg by (layer) (megaseek_moe_layer{{job=~"$job", stat="aux_loss"}})', "layer {{layer}}")],
   desc="Mean sequence-wise / batch balance loss per layer (model.balance=seq_aux | aux).")
newrow("Throughput and utilization")
ts("Tokens/s (global)", [(f"avg(megaseek_tokens_per_second{JOB})", "reported"), (f"sum(rate(megaseek_tokens_total{{job=~\"$job\", rank=\"0\"}}[1m]))", "from the token counter (1m)")])
ts("Tokens/s per rank", [(f"megaseek_tokens_per_second_per_rank{SEL}", "rank {{rank}}")])
ts("MFU and HFU", [(f"avg(megaseek_mfu_ratio{JOB})", "MFU"), (f"avg(megaseek_hfu_ratio{JOB})", "HFU (with recomputation)")], unit="percentunit")
ts("Achieved FLOP/s (job)", [(f"avg(megaseek_model_flops_per_second{JOB})", "model"), (f"avg(megaseek_hardware_flops_per_second{JOB})", "hardware"), (f"avg(megaseek_peak_flops_per_second{JOB})", "peak")], unit="flops")
newrow("Step time per rank")
ts("Step time", [(f"megaseek_step_time_seconds{SEL}", "rank {{rank}}")], unit="s")
ts("Forward / backward / optimizer", [(f"megaseek_forward_seconds{SEL}", "fwd {{rank}}"), (f"megaseek_backward_seconds{SEL}", "bwd {{rank}}"), (f"megaseek_optimizer_step_seconds{SEL}", "step {{rank}}")], unit="s")
ts("Communication and data wait", [(f"megaseek_communication_seconds{SEL}", "comm {{rank}}"), (f"megaseek_data_wait_seconds{SEL}", "data {{rank}}")], unit="s",
   desc="Communication: time inside torch.distributed collectives (overlaps forward/backward/step).")
newrow("System per rank")
ts("Process CPU", [(f"megaseek_process_cpu_percent{SEL}", "rank {{rank}}"), (f"avg(megaseek_host_cpu_percent{JOB})", "host (100 = all cores)")], unit="percent")
ts("Process resident memory", [(f"megaseek_process_resident_memory_bytes{SEL}", "rank {{rank}}")], unit="bytes")
ts("Host memory", [(f"avg by (instance) (megaseek_host_memory_used_percent{JOB})", "{{instance}} used %")], unit="percent")
ts("GPU utilization", [(f"megaseek_gpu_utilization_percent{SEL}", "rank {{rank}}")], unit="percent", desc="NVML (nvidia-ml-py)")
ts("GPU memory", [(f"megaseek_gpu_memory_allocated_bytes{SEL}", "alloc {{rank}}"), (f"megaseek_gpu_memory_reserved_bytes{SEL}", "reserved {{rank}}"), (f"megaseek_gpu_memory_max_allocated_bytes{SEL}", "peak {{rank}}"), (f"megaseek_gpu_memory_used_bytes{SEL}", "device used {{rank}}"), (f"megaseek_gpu_memory_total_bytes{SEL}", "device total {{rank}}")], unit="bytes")
ts("GPU power and temperature", [(f"megaseek_gpu_power_watts{SEL}", "W {{rank}}"), (f"megaseek_gpu_temperature_celsius{SEL}", "°C {{rank}}")])

dash = {

  "annotations": {"list": []},
  "description": "megaseek pretraining: training, throughput, step time and system metrics per rank (monitoring/prometheus.yml scrapes them).",
  "editable": True, "graphTooltip": 1, "id": None, "uid": "megaseek-training", "title": "megaseek training",
  "tags": ["megaseek", "training"], "timezone": "browser", "schemaVersion": 39, "version": 1,
  "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
  "templating": {"list": [
    {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source", "current": {}, "hide": 0, "refresh": 1},
    {"name": "job", "type": "query", "label": "Job", "datasource": {"type": "prometheus", "uid": "${datasource}"},
     "query": {"query": "label_values(megaseek_step, job)", "refId": "job"}, "definition": "label_values(megaseek_step, job)",
     "refresh": 2, "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"}, "hide": 0, "sort": 1},
    {"name": "rank", "type": "query", "label": "Rank", "datasource": {"type": "prometheus", "uid": "${datasource}"},
     "query": {"query": "label_values(megaseek_step{job=~\"$job\"}, rank)", "refId": "rank"}, "definition": "label_values(megaseek_step{job=~\"$job\"}, rank)",
     "refresh": 2, "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"}, "hide": 0, "sort": 3}]},
  "panels": panels,
}
json.dump(dash, open(__import__("os").path.join(__import__("os").path.dirname(__import__("os").path.abspath(__file__)), "megaseek-dashboard.json"), "w"), indent=1, ensure_ascii=False)
print(len(panels))
