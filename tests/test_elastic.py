"""Elastic training over two namespace nodes: torchrun --nnodes=1:2 (c10d rendezvous, one rank per node).
Node B is killed with kill -9 (agent and worker) mid-run; node A continues alone from the newest checkpoint at
dp=1 with the same global batch (twice the accumulation); node B is started again, rejoins, and the run ends at
dp=2. Every step's loss equals an uninterrupted one-process run."""
import json
import re
import subprocess
import time

import pytest

from megaseek.distributed.cluster import NetnsCluster
from megaseek.distributed.cluster.launchers import node_env, torchrun_cmd
from megaseek.distributed.cluster.netns import namespaces
from megaseek.distributed.elastic import checkpoint_layout, layout_change
from tests.helpers import REPO
from tests.netns_support import BASE, REF_STEPS, losses_by_step, metrics, need_netns, reference_losses

SAVE_EVERY = 2
STALL_STEP, STALL_S = 8, 20  # node A, alone, stalls while saving step 8: the window in which node B rejoins


def test_layout_change_record():
    dp2 = {"tp": 1, "pp": 1, "dp": 2, "world_size": 2}
    dp1 = {"tp": 1, "pp": 1, "dp": 1, "world_size": 1, "micro_batch": 4, "global_batch": 16, "grad_accum": 4}
    assert layout_change(None, dp1, 0) is None  # a fresh start
    assert layout_change(dp2, dict(dp2, grad_accum=2), 6) is None  # same layout
    rec = layout_change(dp2, dp1, 4)
    assert rec == {"step": 4, "event": "layout_change", "reason": "shrink",
                   "layout": {"world_size": 1, "dp": 1, "tp": 1, "pp": 1, "ep": 1},
                   "previous_layout": {"world_size": 2, "dp": 2, "tp": 1, "pp": 1, "ep": 1},
                   "message": "[elastic] shrink at step 4: world_size=2->1 dp=2->1, grad_accum 2->4 (same global batch)"}
    assert layout_change(dp1, dp2, 9)["reason"] == "grow"
    assert layout_change({"tp": 2, "pp": 1, "dp": 2}, {"tp": 1, "pp": 2, "dp": 2}, 3)["reason"] == "reshape"
    ep = layout_change(dict(dp2, ep=2), dp2, 5)  # manifests name ep only when > 1
    assert ep["reason"] == "reshape" and ep["message"] == "[elastic] reshape at step 5: ep=2->1"
    assert layout_change(dp2, dict(dp2, ep=1), 5) is None
    with pytest.raises(ValueError, match="changes the global batch 16 -> 32"):
        layout_change(dict(dp2, global_batch=16), dict(dp1, global_batch=32), 4)
    with pytest.raises(ValueError, match="lacks dp"):
        layout_change({"tp": 1, "pp": 1}, dp1, 4)


def _wait(cond, timeout_s, what, procs=()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"{what}: launcher exited {dead[0].returncode} first")
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def _resumed(text):
    return [int(m) for m in re.findall(r"\[ckpt\] resumed from global_step(\d+)", text)]


@pytest.mark.slow
def test_elastic_shrink_and_regrow(tmp_path, data_root):
    need_netns()
    ref = reference_losses(data_root)
    run = tmp_path / "run"
    script = ["launch/pretrain.py", *BASE, f"data.root={data_root}", f"run_dir={run}", f"train.steps={REF_STEPS}",
              f"train.save_interval={SAVE_EVERY}", "train.ckpt_keep=0"]
    log = {k: tmp_path / f"{k}.log" for k in ("a", "b1", "b2")}
    read = lambda k: log[k].read_text(errors="replace") if log[k].exists() else ""  # noqa: E731
    with NetnsCluster() as c:
        env = node_env(c)
        env["MEGASEEK_FAULTS"] = json.dumps({"save_sleep_step": STALL_STEP, "save_sleep_s": STALL_S})
        cmd = [torchrun_cmd(c, i, 1, script, nnodes="1:2", rdzv_id="elastic", max_restarts=3,
                            rdzv_conf={"last_call_timeout": 5, "join_timeout": 150}) for i in range(2)]
        start = lambda i, k: c.popen(i, cmd[i], env=env, cwd=REPO, stdout=open(log[k], "w"),  # noqa: E731
                                     stderr=subprocess.STDOUT)
        a, b = start(0, "a"), start(1, "b1")
        # phase 1: two nodes, dp=2; node B dies (kill -9 of its agent and worker) after step 3
        _wait(lambda: len(metrics(run)) >= 3, 180, "phase 1 reached step 3", [a, b])
        killed_at = max(r["step"] for r in metrics(run))
        c.kill_node(1)
        t_kill, a_mark = time.monotonic(), len(read("a"))
        assert b.wait(timeout=10) == -9
        # phase 2: node A alone resumes from the newest checkpoint at dp=1, the same global batch
        _wait(lambda: _resumed(read("a")[a_mark:]), 120, "node A resumed alone", [a])
        t_resumed = time.monotonic() - t_kill
        _wait(lambda: "fault injection: stalling" in read("a")[a_mark:], 120, f"node A reached step {STALL_STEP}",
              [a])
        phase2 = read("a")[a_mark:]
        b_mark = len(read("a"))
        # phase 3: node B comes back; A's agent restarts its worker (SIGTERM: it saves and exits), both resume
        b2 = start(1, "b2")
        _wait(lambda: a.poll() is not None and b2.poll() is not None, 240, "the run finished on two nodes")
        assert (a.returncode, b2.returncode) == (0, 0), (read("a")[-4000:], read("b2")[-4000:])
        names = [n.netns for n in c.nodes]
    assert not set(names) & set(namespaces())  # the namespaces are gone

    # the layouts of the three phases and the restarts
    phase3 = read("a")[b_mark:] + read("b2")
    assert "world=2 (dp=2 tp=1 pp=1) global_batch=16 = micro 4 x accum 2 x dp 2" in read("a")[:a_mark] + read("b1")
    assert "world=1 (dp=1 tp=1 pp=1) global_batch=16 = micro 4 x accum 4 x dp 1" in phase2
    assert "world=2 (dp=2 tp=1 pp=1) global_batch=16 = micro 4 x accum 2 x dp 2" in phase3
    shrunk_from, grown_from = _resumed(phase2)[0], _resumed(phase3)[0]
    lost = killed_at - shrunk_from
    print(f"elastic: killed node B after step {killed_at}; A resumed from step {shrunk_from} at dp=1 after "
          f"{t_resumed:.1f} s ({lost} steps redone); B rejoined, both resumed from step {grown_from} at dp=2")
    assert 0 <= lost <= SAVE_EVERY and t_resumed < 120
    assert grown_from >= STALL_STEP  # the regrow lost no step: A saved on SIGTERM
    # what the run records at each restart, from the checkpoint manifests
    ck = run / "checkpoints"
    shrink = layout_change(checkpoint_layout(ck / f"global_step{shrunk_from}"),
                           {"dp": 1, "tp": 1, "pp": 1, "world_size": 1, "micro_batch": 4, "global_batch": 16,
                            "grad_accum": 4}, shrunk_from)
    grow = layout_change(checkpoint_layout(ck / f"global_step{grown_from}"),
                         {"dp": 2, "tp": 1, "pp": 1, "world_size": 2}, grown_from)
    assert shrink["reason"] == "shrink" and shrink["previous_layout"]["dp"] == 2 and shrink["layout"]["dp"] == 1
    assert grow["reason"] == "grow" and grow["previous_layout"]["dp"] == 1 and grow["layout"]["dp"] == 2
    assert checkpoint_layout(ck / f"global_step{REF_STEPS}")["dp"] == 2
    # ...and what the run recorded itself: the first metrics.jsonl record after each restart at another layout
    recorded = [(r["step"], r["layout_change"]) for r in metrics(run) if "layout_change" in r]
    print(f"elastic: metrics.jsonl layout_change records {[(s, c['message']) for s, c in recorded]}")
    assert [(s, c["reason"], c["step"]) for s, c in recorded] == [(shrunk_from + 1, "shrink", shrunk_from),
                                                                  (grown_from + 1, "grow", grown_from)]
    for (_, c), want in zip(recorded, (shrink, grow)):
        assert c["event"] == "layout_change" and c["layout"] == want["layout"]
        assert c["previous_layout"] == want["previous_layout"]
    assert "[elastic] shrink at step" in phase2 and "[elastic] grow at step" in phase3  # and logged
    # every step's loss (the last record of a redone step wins) equals the uninterrupted one-process run
    got = losses_by_step(run)
    assert sorted(got) == list(range(1, REF_STEPS + 1))
    diffs = {s: abs(got[s] - ref[s]) for s in got}
    print(f"elastic: max |dloss| vs one process over {REF_STEPS} steps = {max(diffs.values()):.2e}")
    assert max(diffs.values()) < 1e-4, diffs
