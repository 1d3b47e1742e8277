"""Downstream evaluation: held-out stdlib tasks scored through lm-eval by our model class, per example equal to
`lm_eval --model hf` on our HF export; the next-line score moves off chance with training; batch-1 latency.

One small model is trained once for the module (300 steps, one process) and shared by the tests."""
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, SMALL_DATA, SMALL_MODEL, compose, run_world

STEPS = 300
TASKS = ["stdlib_next_line", "stdlib_docstring_match", "stdlib_return_line", "stdlib_held_out_ppl"]
MC_KEYS = ("acc", "acc_norm", "acc_mutual_info")
TRAIN = SMALL_MODEL + SMALL_DATA + [
    f"train.steps={STEPS}", "train.seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=16",
    "train.log_interval=50", "train.sample_tokens=0", f"train.save_interval={STEPS}", "optimizer.warmup_steps=20",
    "optimizer.lr=3e-3", "zero.stage=0", "logging.progress=false", "logging.wandb.mode=disabled",
    "logging.tensorboard.enabled=false"]


def _train(rank, world, run_dir, data_root):
    try:
        from megaseek.train.job import pretrain
    except ImportError:
        from megaseek.train.job import pretrain
    pretrain(compose(TRAIN + [f"data.root={data_root}", f"run_dir={run_dir}"]))


@pytest.fixture(scope="module")
def ckpt(data_root, tmp_path_factory):
    """The checkpoint after STEPS steps of the small model on the test corpus (trained once per session)."""
    run = tmp_path_factory.getbasetemp() / "downstream_run"
    if not (run / "done").is_file():
        shutil.rmtree(run, ignore_errors=True)
        run_world(1, _train, str(run), str(data_root))
        (run / "done").write_text("ok")
    from megaseek.ckpt.hf import resolve_checkpoint
    c = resolve_checkpoint(run)
    assert c.name == f"global_step{STEPS}"
    return c


def _live(ckpt):
    """(logits_fn, tokenizer, cfg) of a Decoder in memory, as a training callback would hold it."""
    from megaseek.ckpt.hf import load_model
    from megaseek.data.tokenizer import load_tokenizer
    model, cfg = load_model(ckpt)

    @torch.no_grad()
    def logits_fn(ids):
        return model(ids)[..., :cfg.vocab_size]  # (b, s, V)

    return logits_fn, load_tokenizer(ckpt / "tokenizer.json"), cfg


def _evaluate_cli(*args, timeout=600):
    p = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), *map(str, args)],
                       capture_output=True, text=True, cwd=REPO, timeout=timeout)
    return p.returncode, [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")], p.stderr


def _by_doc(samples):
    return {s["doc_id"]: s for s in samples}


# --- the task files ---
def test_tasks_are_held_out_from_training_and_well_formed():
    from megaseek.eval.build import DEFAULT_MAX_BYTES, TASKS_DIR, held_out_files
    from megaseek.data.corpus import stdlib_root
    from megaseek.data.readers import list_files
    from megaseek.data.spec import SourceSpec
    trained = {r for _, r in list_files(SourceSpec(name="s", path=stdlib_root(), embedded=True,
                                                   max_bytes=DEFAULT_MAX_BYTES))}
    held = {r for _, r in held_out_files()}
    man = json.loads((TASKS_DIR / "manifest.json").read_text())
    assert not trained & held and len(held) > 800
    for name, n in man["counts"].items():
        docs = [json.loads(l) for l in (TASKS_DIR / f"{name}.jsonl").read_text().splitlines()]
        assert len(docs) == n >= 60
        srcs = {d["source"].rsplit(":", 1)[0] for d in docs}
        assert not srcs & trained, f"{name}: examples from files the default run trains on"
        if sys.version.split()[0] == man["python"]:
            assert srcs <= held
        if "choices" in docs[0]:
            labels = [d["label"] for d in docs]
            assert all(len(d["choices"]) == 4 == len(set(d["choices"])) for d in docs)
            assert all(0.15 < labels.count(k) / n < 0.35 for k in range(4))  # the answer's position is uniform
            tol = 2 if name == "next_line" else 3  # distractors of the true choice's length: no length cue
            assert all(abs(len(c) - len(d["choices"][d["label"]])) <= tol for d in docs for c in d["choices"])


@pytest.mark.slow
def test_build_script_rebuilds_the_committed_tasks_byte_for_byte(tmp_path):
    from megaseek.eval.build import TASKS_DIR
    man = json.loads((TASKS_DIR / "manifest.json").read_text())
    if sys.version.split()[0] != man["python"]:
        pytest.skip(f"tasks built from Python {man['python']}'s stdlib, this is {sys.version.split()[0]}")
    p = subprocess.run([sys.executable, str(REPO / "launch" / "build_tasks.py"), f"out={tmp_path}"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["counts"] == man["counts"]
    for f in sorted(TASKS_DIR.iterdir()):
        if f.is_file():
            assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name


# --- three ways, one score per example ---
@pytest.mark.slow
def test_three_ways_give_the_same_result_on_every_example(ckpt, tmp_path):
    """launch/evaluate.py, the in-memory (in-training) path and lm-eval's own HF model on our HF export, with the
    same task files: every example's acc / acc_norm / acc_mutual_info / exact_match and generated text equal;
    rolling log-likelihoods within 1e-4 relative."""
    import lm_eval
    from megaseek.ckpt.hf import export_hf
    from megaseek.eval.downstream import evaluate, flat_metrics, task_manager
    from megaseek.eval.lm import MegaseekLM
    t0 = time.perf_counter()
    rc, rows, err = _evaluate_cli(f"checkpoint={ckpt}", f"tasks=[{','.join(TASKS)}]", f"samples_dir={tmp_path / 's'}")
    assert rc == 0, err
    t_cli = time.perf_counter() - t0
    cli = {t: _by_doc([json.loads(l) for l in (tmp_path / "s" / f"{t}.jsonl").read_text().splitlines()])
           for t in TASKS}
    logits_fn, tok, cfg = _live(ckpt)
    live_res = evaluate(MegaseekLM(logits_fn=logits_fn, tokenizer=tok, max_length=cfg.max_seq_len), TASKS,
                        log_samples=True)
    live = {t: _by_doc(live_res["samples"][t]) for t in TASKS}
    t0 = time.perf_counter()
    hf = export_hf(ckpt, tmp_path / "hf")
    ref = {}
    for tasks, bs in ((TASKS[:2] + TASKS[3:], 16), (TASKS[2:3], 1)):  # generation at batch 1: no left padding
        r = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32", tasks=tasks,
                                    batch_size=bs, device="cpu", task_manager=task_manager(tasks),
                                    bootstrap_iters=0, log_samples=True)
        ref.update({t: _by_doc(r["samples"][t]) for t in tasks})
    t_hf = time.perf_counter() - t0
    by_task = {r["task"]: r for r in rows}
    for task in TASKS:
        a, b, c = cli[task], live[task], ref[task]
        assert set(a) == set(b) == set(c) and len(a) >= 60
        keys = [k for k in MC_KEYS + ("exact_match",) if k in a[0]]
        for i in a:
            for k in keys:
                assert a[i][k] == b[i][k] == c[i][k], (task, i, k, a[i][k], b[i][k], c[i][k])
            if task == "stdlib_return_line":
                assert a[i]["filtered_resps"] == b[i]["filtered_resps"] == c[i]["filtered_resps"], (i,)
            if task == "stdlib_held_out_ppl":
                (la, wa), (lb, wb), (lc, wc) = a[i]["word_perplexity"], b[i]["word_perplexity"], c[i]["word_perplexity"]
                assert wa == wb == wc and abs(la - lc) < 1e-4 * abs(lc) and abs(la - lb) < 1e-6 * abs(lb)
        for k in keys:  # the printed score is the mean over the examples
            assert by_task[task][k] == pytest.approx(sum(float(s[k]) for s in a.values()) / len(a), abs=1e-12)
        assert by_task[task]["samples"] == len(a)
    print(f"[three ways] {json.dumps(by_task)}; evaluate.py {t_cli:.1f}s, lm_eval hf {t_hf:.1f}s; "
          f"live {json.dumps(flat_metrics(live_res))}")
    assert 0.0 < by_task["stdlib_held_out_ppl"]["bits_per_byte"] < 8


# --- the score moves ---
@pytest.mark.slow
def test_next_line_accuracy_rises_from_chance_with_training(ckpt):
    from megaseek.eval.downstream import run_tasks
    from megaseek.model.decoder import Decoder
    logits_fn, tok, cfg = _live(ckpt)
    init = Decoder(cfg, seed=1234).eval()  # the run's step-0 model (seed 1234)

    @torch.no_grad()
    def init_fn(ids):
        return init(ids)[..., :cfg.vocab_size]

    tasks = ["stdlib_next_line"]
    s0 = run_tasks(init_fn, tok, tasks, max_length=cfg.max_seq_len)
    s1 = run_tasks(logits_fn, tok, tasks, max_length=cfg.max_seq_len)
    print(f"[next line] step 0: {s0}\n[next line] step {STEPS}: {s1}")
    k = "eval/stdlib_next_line/acc_mutual_info"
    n = s0["eval/stdlib_next_line/samples"]
    sd = math.sqrt(0.25 * 0.75 / n)  # binomial noise of chance, 0.031 at n = 200
    assert abs(s0[k] - 0.25) < 3 * sd and abs(s0["eval/stdlib_next_line/acc"] - 0.25) < 3 * sd
    assert s1[k] > 0.25 + 4 * sd  # clearly above chance after STEPS steps


# --- the callback-ready runner, latency, the command line ---
def test_run_tasks_returns_flat_metrics(ckpt):
    from megaseek.eval.downstream import run_tasks
    logits_fn, tok, cfg = _live(ckpt)
    m = run_tasks(logits_fn, tok, ["stdlib_next_line", "stdlib_return_line"], limit=6, max_length=cfg.max_seq_len)
    assert set(m) == {"eval/stdlib_next_line/acc", "eval/stdlib_next_line/acc_norm",
                      "eval/stdlib_next_line/acc_mutual_info", "eval/stdlib_next_line/samples",
                      "eval/stdlib_return_line/exact_match", "eval/stdlib_return_line/samples", "eval/time_s"}
    assert m["eval/stdlib_next_line/samples"] == 6 == m["eval/stdlib_return_line/samples"]
    assert all(0.0 <= m[k] <= 1.0 for k in m if "acc" in k or "exact" in k)
    assert all(round(m[k] * 6) == pytest.approx(m[k] * 6, abs=1e-9) for k in m if "acc" in k)  # k of 6 right
    assert m["eval/time_s"] > 0


def test_latency_measures_first_token_and_decode_steps(ckpt):
    from megaseek.eval.latency import Recompute, measure_latency
    from megaseek.eval.lm import MegaseekLM
    logits_fn, tok, cfg = _live(ckpt)
    prompt = tok.encode("def main(argv):\n    ").ids
    m = measure_latency(prompt, new_tokens=12, logits_fn=logits_fn)
    assert set(m) == {"eval/latency/ttft_s", "eval/latency/decode_p50_s", "eval/latency/decode_p95_s",
                      "eval/latency/decode_tokens_per_s", "eval/latency/prompt_tokens", "eval/latency/new_tokens"}
    assert m["eval/latency/prompt_tokens"] == len(prompt) and m["eval/latency/new_tokens"] == 12
    assert 0 < m["eval/latency/decode_p50_s"] <= m["eval/latency/decode_p95_s"] and m["eval/latency/ttft_s"] > 0
    delay = 0.02  # a model that takes at least 20 ms per call: every figure is at least that

    def slow(ids):
        time.sleep(delay)
        return logits_fn(ids)

    s = measure_latency(prompt, new_tokens=5, logits_fn=slow, warmup=0)
    assert s["eval/latency/ttft_s"] >= delay and s["eval/latency/decode_p50_s"] >= delay
    assert s["eval/latency/decode_tokens_per_s"] <= 1 / delay
    # the timed decode is the greedy decode that generate_until uses
    gen, state = Recompute(logits_fn), None
    z, state = gen.prefill(torch.tensor([prompt]))
    toks = [int(z.argmax())]
    for _ in range(7):
        z, state = gen.step(state, torch.tensor([[toks[-1]]]))
        toks.append(int(z.argmax()))
    lm = MegaseekLM(logits_fn=logits_fn, tokenizer=tok, max_length=cfg.max_seq_len)
    assert lm.greedy([prompt], 8, []) == [toks]
    with pytest.raises(ValueError, match="exactly one of logits_fn or generator"):
        measure_latency(prompt, 4)


def test_evaluate_cli_tasks_path_and_bad_input(ckpt, tmp_path, capsys):
    """tasks_path adds a directory of task YAMLs; bad input exits 2 with one message naming the field."""
    import importlib.util
    from megaseek.eval.build import TASKS_DIR
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "launch" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    mine = tmp_path / "mytasks"
    mine.mkdir()
    shutil.copy(TASKS_DIR / "local.py", mine / "local.py")
    docs = (TASKS_DIR / "next_line.jsonl").read_text().splitlines()[:5]
    (mine / "five.jsonl").write_text("\n".join(docs) + "\n")
    (mine / "five.yaml").write_text((TASKS_DIR / "next_line.yaml").read_text()
                                    .replace("task: stdlib_next_line", "task: my_five_lines")
                                    .replace("next_line.jsonl", "five.jsonl"))
    assert cli.main([f"checkpoint={ckpt}", "tasks=[my_five_lines]", f"tasks_path={mine}"]) == 0
    out = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert len(out) == 1 and out[0]["task"] == "my_five_lines" and out[0]["samples"] == 5
    assert out[0]["checkpoint"] == str(ckpt) and round(out[0]["acc"] * 5) == pytest.approx(out[0]["acc"] * 5)
    for argv, msg in ((["tasks=[stdlib_no_such_task]"], "stdlib_no_such_task"),
                      ([f"tasks_path={tmp_path / 'nope'}", "tasks=[stdlib_next_line]"], "tasks_path="),
                      (["tasks=[stdlib_next_line]", "text_file=x.txt"], "exactly one of"),
                      (["tasks=[stdlib_next_line]", "limit=-3"], "limit="),
                      (["tasks=[]"], "no task name")):
        assert cli.main([f"checkpoint={ckpt}"] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


# --- a tensor-parallel live model, both ranks in lockstep ---
def _tp_scores(rank, world, ckpt, tasks, limit):
    """The trained weights sharded over a tp=2 Decoder; every rank runs the evaluation with gathered logits."""
    import torch.distributed as dist
    from megaseek.ckpt.hf import load_weights, model_config
    from megaseek.data.tokenizer import load_tokenizer
    from megaseek.eval.downstream import evaluate
    from megaseek.eval.lm import MegaseekLM
    from megaseek.model.decoder import Decoder
    from megaseek.tensor_parallel.layers import TPContext
    from megaseek.tensor_parallel.mappings import gather_from_region
    from tests.helpers import init_gloo
    init_gloo(rank, world)
    ckpt = Path(ckpt)
    cfg, full = model_config(ckpt), load_weights(ckpt)
    ctx = TPContext(group=dist.new_group(list(range(world))), size=world, rank=rank)
    model = Decoder(cfg, ctx, seed=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = full[name]
            if getattr(p, "tensor_model_parallel", False):
                d = p.partition_dim
                if w.shape[d] != p.shape[d] * world:  # padded vocabulary rows are zero
                    pad = list(w.shape)
                    pad[d] = p.shape[d] * world - w.shape[d]
                    w = torch.cat([w, w.new_zeros(pad)], dim=d)
                w = w.chunk(world, dim=d)[rank]
            p.copy_(w)

    @torch.no_grad()
    def logits_fn(ids):
        return gather_from_region(model(ids), ctx.group)[..., :cfg.vocab_size]  # (b, s, V_pad/p) -> (b, s, V)

    lm = MegaseekLM(logits_fn=logits_fn, tokenizer=load_tokenizer(ckpt / "tokenizer.json"), max_length=cfg.max_seq_len)
    res = evaluate(lm, tasks, limit=limit, log_samples=True)
    return _decisions(res, tasks)


def _decisions(res, tasks):
    """Per example: (doc_id, acc, exact_match, generated text); log-likelihood floats are left out (they differ
    across layouts in the last bits; the decisions made from them must not)."""
    return {t: [(s["doc_id"], s.get("acc"), s.get("exact_match"),
                 s["filtered_resps"] if s.get("exact_match") is not None else None) for s in res["samples"][t]]
            for t in tasks}


@pytest.mark.slow
def test_tensor_parallel_live_model_scores_equal_one_process(ckpt):
    from megaseek.eval.downstream import evaluate
    from megaseek.eval.lm import MegaseekLM
    tasks, limit = ["stdlib_next_line", "stdlib_return_line"], 40
    tp = run_world(2, _tp_scores, str(ckpt), tasks, limit)
    logits_fn, tok, cfg = _live(ckpt)
    res = evaluate(MegaseekLM(logits_fn=logits_fn, tokenizer=tok, max_length=cfg.max_seq_len), tasks, limit=limit,
                   log_samples=True)
    one = _decisions(res, tasks)
    assert tp[0] == tp[1] == one
    assert len(one["stdlib_next_line"]) == limit and len({r[3][0] for r in one["stdlib_return_line"]}) > 5


def test_plot_draws_scores_against_tokens_seen(tmp_path):
    from megaseek.monitor.plot import plot_run, score_keys
    recs = [{"step": s, "tokens_seen": s * 1024, "loss": 5.0 - s / 100, "lr": 1e-3} for s in range(0, 201, 10)]
    for r in recs[::5]:
        r.update({"eval/stdlib_next_line/acc_mutual_info": 0.25 + r["step"] / 1000, "eval/stdlib_next_line/samples": 200,
                  "eval/time_s": 3.0, "eval/latency/ttft_s": 0.01, "eval/latency/decode_p50_s": 0.004,
                  "eval/latency/decode_p95_s": 0.006})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert score_keys(recs) == ["eval/stdlib_next_line/acc_mutual_info"]
    import matplotlib.image
    with_scores = matplotlib.image.imread(plot_run(tmp_path, tmp_path / "a.png", dpi=40))
    for r in recs:
        for k in [k for k in r if k.startswith("eval/")]:
            del r[k]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    without = matplotlib.image.imread(plot_run(tmp_path, tmp_path / "b.png", dpi=40))
    assert with_scores.shape[0] > without.shape[0] * 1.2 and with_scores.shape[1] == without.shape[1]
