"""Checkpoints you can trust: exact resume, resume at another layout, kill -9 mid-save, corruption detected,
non-finite steps skipped on every rank (and rolled back), SIGTERM saves and exits cleanly."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaseek.ckpt import checkpoint as C
from tests.helpers import REPO, run_world
from tests.test_equivalence import COMMON, _losses, _train
from tests.test_launch import BASE

CK = ["train.save_interval=4", "optimizer.decay_steps=8"]


def _train_summary(rank, world, runs, data_root):
    """Like _train, but every rank returns its own summary (skipped steps as each rank saw them). A run's
    faults (megaseek/testing/faults.py) travel as an optional third element of its tuple."""
    from megaseek.train.job import pretrain
    from tests.helpers import compose
    out = {}
    for run_dir, overrides, *faults in runs:
        os.environ["MEGASEEK_FAULTS"] = json.dumps(faults[0]) if faults else ""
        cfg = compose(COMMON + [f"data.root={data_root}", f"run_dir={run_dir}"] + overrides)
        out[run_dir] = pretrain(cfg)
    os.environ.pop("MEGASEEK_FAULTS", None)
    return out


def _metrics(d):
    return [json.loads(l) for l in (Path(d) / "metrics.jsonl").read_text().splitlines()]


def test_stop_and_resume_equals_uninterrupted_bitwise(data_root, tmp_path):
    """fp32 on CPU: steps 5..8 after a resume at step 4 are bitwise those of a run that never stopped
    (ZeRO-1 and ZeRO-3 at dp=2)."""
    runs = []
    for z in (1, 3):
        full, part = str(tmp_path / f"full{z}"), str(tmp_path / f"part{z}")
        runs += [(full, CK + [f"zero.stage={z}", "train.steps=8"]), (part, CK + [f"zero.stage={z}", "train.steps=4"]),
                 (part, CK + [f"zero.stage={z}", "train.steps=8"])]
    res = run_world(2, _train, runs, str(data_root))[0]
    for z in (1, 3):
        full = _losses(res[str(tmp_path / f"full{z}")])
        part = _losses(_metrics(tmp_path / f"part{z}"))
        assert len(part) == 8 and part[:4] == full[:4]
        assert part[4:] == full[4:], (z, part[4:], full[4:])  # bitwise
        assert not any("layout_change" in r for r in _metrics(tmp_path / f"part{z}"))  # same layout: no record
        assert json.loads((tmp_path / f"part{z}" / "checkpoints" / "global_step8" / "state.json").read_text())[
            "consumed_samples"] == 64


@pytest.mark.slow
def test_resume_at_another_layout_continues_the_losses(data_root, tmp_path):
    """Written at (tp=2, dp=2, ZeRO-3) and at (tp=2, pp=2, ZeRO-1), resumed at (tp=1, pp=1, dp=1, ZeRO-1):
    steps 5..8 continue as an uninterrupted single-process run within 1e-4."""
    ref, moved, piped = str(tmp_path / "ref"), str(tmp_path / "moved"), str(tmp_path / "piped")
    run_world(4, _train, [(moved, CK + ["train.steps=4", "parallel.tp=2", "zero.stage=3"]),
                          (piped, CK + ["train.steps=4", "parallel.tp=2", "parallel.pp=2"])], str(data_root))
    res = run_world(1, _train, [(ref, CK + ["train.steps=8", "zero.stage=0"]),
                                (moved, CK + ["train.steps=8", "zero.stage=1"]),
                                (piped, CK + ["train.steps=8", "zero.stage=1"])], str(data_root))[0]
    want = _losses(res[ref])
    one = {"world_size": 1, "dp": 1, "tp": 1, "pp": 1, "ep": 1}
    for d, before in ((moved, {"world_size": 4, "dp": 2, "tp": 2, "pp": 1, "ep": 1}),
                      (piped, {"world_size": 4, "dp": 1, "tp": 2, "pp": 2, "ep": 1})):
        recs = _metrics(d)
        got = _losses(recs)
        assert len(got) == 8
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (d, got, want)
        # the resume at another layout is recorded in the first record after it (and only there)
        changes = [(r["step"], r["layout_change"]) for r in recs if "layout_change" in r]
        assert len(changes) == 1 and changes[0][0] == 5, changes
        rec = changes[0][1]
        assert (rec["event"], rec["reason"], rec["step"]) == ("layout_change", "shrink", 4)
        assert rec["previous_layout"] == before and rec["layout"] == one
        assert "grad_accum" in rec["message"] and rec["message"].startswith("[elastic] shrink at step 4: world_size=4->1")
    man = C.read_manifest(Path(moved) / "checkpoints" / "global_step8")
    assert man["layout"] == {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}


def test_nan_step_is_skipped_on_every_rank_then_rolled_back_or_stopped(data_root, tmp_path):
    one, roll = str(tmp_path / "one"), str(tmp_path / "roll")
    runs = [(one, ["train.steps=6", "zero.stage=1"], {"nan_step": 3, "nan_rank": 1}),
            (roll, ["train.steps=8", "train.save_interval=2", "train.max_bad_steps=2", "zero.stage=0"],
             {"nan_step": [5, 6], "nan_rank": 0})]
    res = run_world(2, _train_summary, runs, str(data_root))
    for rank_res in res:  # both ranks skipped the same step (ZeRO-1), and both rolled back (stage 0)
        assert rank_res[one]["skipped_steps"] == 1
        assert rank_res[roll]["skipped_steps"] == 2 and rank_res[roll]["rollbacks"] == 1
    recs = _metrics(one)
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 1, 1]
    assert recs[2]["grad_norm"] in ("inf", "nan") or not (recs[2]["grad_norm"] < 1e9)
    assert all(isinstance(r["loss"], float) for i, r in enumerate(recs) if i != 2)  # finite after the skip
    assert recs[-1]["loss"] < recs[0]["loss"]
    rolled = _metrics(roll)
    assert [r["step"] for r in rolled][-1] == 8 and isinstance(rolled[-1]["loss"], float)
    # stop instead of rolling back: one clear error
    with pytest.raises(RuntimeError, match="consecutive steps with non-finite loss"):
        run_world(1, _train_summary, [(str(tmp_path / "stop"), ["train.steps=6", "train.max_bad_steps=2",
                                                                 "train.on_bad_steps=stop"], {"nan_step": [2, 3]})],
                  str(data_root))


def _start(run_dir, data_root, extra, faults=None):
    cmd = [sys.executable, "launch/pretrain.py"] + BASE + [f"data.root={data_root}", f"run_dir={run_dir}"] + extra
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MEGASEEK_FAULTS", None)
    if faults:
        env["MEGASEEK_FAULTS"] = json.dumps(faults)  # test-only hook (megaseek/testing/faults.py)
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for(pred, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_kill_9_during_checkpoint_write_then_auto_resume(data_root, tmp_path):
    run = tmp_path / "run"
    p = _start(run, data_root, ["train.steps=8", "train.save_interval=2"], {"save_sleep_step": 4})
    tmp4 = run / "checkpoints" / ".tmp-global_step4"
    assert _wait_for(lambda: tmp4.is_dir() and any(tmp4.glob("weights-*.safetensors")))
    p.kill()  # SIGKILL while step 4's checkpoint is half written
    p.wait(timeout=60)
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step2"
    assert not (run / "checkpoints" / "global_step4").exists()
    # corrupt the newest whole checkpoint too: resume must skip it with a warning naming it
    q = _start(run, data_root, ["train.steps=3", "train.save_interval=100"])
    out = q.communicate(timeout=300)[0]
    assert q.returncode == 0, out[-3000:]
    assert "resumed from global_step2 at step 2" in out
    w = run / "checkpoints" / "global_step3" / "weights-stage0.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    assert "sha256 mismatch" in C.verify(w.parent)
    q = _start(run, data_root, ["train.steps=8", "train.save_interval=100"])
    out = q.communicate(timeout=300)[0]
    assert q.returncode == 0, out[-3000:]
    assert "skipping checkpoint" in out and "global_step3" in out and "resumed from global_step2" in out
    assert C.verify(run / "checkpoints" / "global_step8") is None


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(data_root, tmp_path):
    run = tmp_path / "run"
    p = _start(run, data_root, ["train.steps=100000", "train.save_interval=100000"])
    assert _wait_for(lambda: (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out[-3000:]
    assert "SIGTERM: saved global_step" in out
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert C.verify(run / "checkpoints" / tag) is None and C.step_of(tag) >= 2
