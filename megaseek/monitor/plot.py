"""Curves of a run from its JSONL files, to one PNG: loss (train and validation), throughput, MFU / HFU,
where a step's time goes, learning rate and gradient norm, and each rank's memory and CPU; when the records hold
downstream scores (`eval/<task>/<metric>`, megaseek/eval) a last row draws them and the batch-1 latency against
tokens seen."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from megaseek.monitor.metrics import read_metrics


def _series(recs: list[dict], key: str, scale: float = 1.0) -> tuple[list, list]:
    xs, ys = [], []
    for r in recs:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in r:
            xs.append(r["step"])
            ys.append(v * scale)
    return xs, ys


def _line(ax, recs, key, label=None, scale=1.0, **kw) -> bool:
    xs, ys = _series(recs, key, scale)
    if xs:
        ax.plot(xs, ys, label=label or key, **kw)
    return bool(xs)


SCORE_METRICS = ("acc", "acc_norm", "acc_mutual_info", "exact_match")
LATENCY = (("eval/latency_ttft_ms_p50", "time to first token p50"), ("eval/latency_ttft_ms_p95", "time to first token p95"),
           ("eval/latency_decode_ms_p50", "decode per token p50"), ("eval/latency_decode_ms_p95", "decode per token p95"))


def score_keys(recs: list[dict]) -> list[str]:
    """The `eval/<task>/<metric>` keys of downstream scores in the records, sorted."""
    return sorted({k for r in recs for k in r if k.startswith("eval/") and k.count("/") == 2
                   and k.rsplit("/", 1)[1] in SCORE_METRICS and not k.startswith("eval/latency/")})


def plot_scores(a_score, a_lat, recs: list[dict]) -> None:
    """Downstream scores (left) and latency in ms (right) against tokens seen (`tokens_seen`, else step)."""
    x = "tokens_seen" if any("tokens_seen" in r for r in recs) else "step"
    for key in score_keys(recs):
        pts = [(r[x], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and x in r]
        if pts:
            a_score.plot(*zip(*pts), marker="o", label=key[len("eval/"):])
    a_score.axhline(0.25, color="grey", linestyle=":", linewidth=1, label="chance of 4 choices")
    a_score.set_title("downstream scores")
    a_score.set_ylabel("score")
    for key, label in LATENCY:
        pts = [(r[x], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and x in r]
        if pts:
            a_lat.plot(*zip(*pts), marker="o", label=label)
    a_lat.set_title("inference latency, batch 1")
    a_lat.set_ylabel("ms")
    for ax in (a_score, a_lat):
        ax.set_xlabel(x.replace("_", " "))


def rank_records(run_dir: Path) -> dict[int, list[dict]]:
    out = {}
    for f in sorted(Path(run_dir, "system").glob("rank*.jsonl")):
        try:
            out[int(f.stem[4:])] = read_metrics(f, dedupe=True)
        except ValueError:
            continue
    return dict(sorted(out.items()))


def plot_run(run_dir: Path, out: Optional[Path] = None, dpi: int = 110) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    recs = read_metrics(run_dir / "metrics.jsonl", dedupe=True)
    if not recs:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no records")
    out = Path(out) if out else run_dir / "metrics.png"
    scores = bool(score_keys(recs))
    fig, axes = plt.subplots(3 + scores, 2, figsize=(13, 11 + 3.7 * scores), constrained_layout=True)
    (a_loss, a_tps), (a_mfu, a_time), (a_lr, a_sys) = axes[:3]
    fig.suptitle(f"{run_dir.name}: {len(recs)} log steps, last step {recs[-1].get('step')}")

    _line(a_loss, recs, "loss", "train loss")
    if _line(a_loss, recs, "val_loss", "validation loss", marker="o"):
        xs, ys = _series(recs, "val_ppl")
        if ys:
            a_loss.set_title(f"loss (last validation perplexity {ys[-1]:.1f})")
    a_loss.set_title(a_loss.get_title() or "loss")

    _line(a_tps, recs, "tokens_per_s", "global")
    a_tps.set_ylabel("tokens/s")
    tw = a_tps.twinx()
    _line(tw, recs, "tokens_per_s_per_rank", "per rank", color="tab:orange", linestyle="--")
    tw.set_ylabel("tokens/s per rank")
    a_tps.set_title("throughput")
    tw.legend(loc="lower right")

    _line(a_mfu, recs, "mfu", "MFU", scale=100)
    _line(a_mfu, recs, "hfu", "HFU (with recomputation)", scale=100, linestyle="--")
    peak = _series(recs, "peak_tflops")[1]
    a_mfu.set_title("FLOPs utilization" + (f" (peak {peak[-1]:.3g} TFLOP/s)" if peak else ""))
    a_mfu.set_ylabel("% of peak")

    for key, label in (("step_time_s", "whole step"), ("time_data_s", "data wait"), ("time_forward_s", "forward"),
                       ("time_backward_s", "backward"), ("time_step_s", "optimizer step"),
                       ("time_comm_s", "communication (inside the others)")):
        _line(a_time, recs, key, label, scale=1000)
    a_time.set_title("time per step")
    a_time.set_ylabel("ms")

    _line(a_lr, recs, "lr", "learning rate")
    a_lr.set_ylabel("learning rate")
    tw = a_lr.twinx()
    _line(tw, recs, "grad_norm", "grad norm", color="tab:red", alpha=0.7)
    tw.set_ylabel("gradient norm")
    a_lr.set_title("learning rate and gradient norm")
    tw.legend(loc="upper right")

    ranks = rank_records(run_dir) or {0: recs}
    for r, rr in ranks.items():
        _line(a_sys, rr, "rss_gb", f"rank {r} RSS")
        _line(a_sys, rr, "gpu_mem_allocated_gb", f"rank {r} GPU alloc", linestyle="--")
    a_sys.set_ylabel("GB")
    tw = a_sys.twinx()
    for r, rr in ranks.items():
        _line(tw, rr, "cpu_percent", f"rank {r} CPU %", linestyle=":")
    tw.set_ylabel("CPU % (100 = one core)")
    tw.legend(loc="lower right", fontsize="small")
    a_sys.set_title("memory and CPU per rank")

    for ax in axes[:3].flat:
        ax.set_xlabel("step")
    if scores:
        plot_scores(*axes[3], recs)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
