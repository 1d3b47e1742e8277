"""The 1F1B schedule (megaseek/pipeline/schedule.py) and StageComm (megaseek/pipeline/p2p.py) on their own.

A simulated 2-stage run: two gloo processes, each stage a small torch module behind a minimal engine that
does what run_1f1b expects of DeepSpeed's (backward divides by the micro-batch count unless
scale_wrt_gas=False; step() only counts). With 4 micro-batches the accumulated gradients of both stages equal
those of the same two modules run sequentially in one process, and the event order is 1F1B:

    stage s of p, m micro-batches: w = min(p - s - 1, m) forwards, then (F, B) alternating, then w backwards.

Teeth: an engine that forgets the 1/m scale, or applies it also to the activation-gradient backward
(scale_wrt_gas=False), moves the gradients far past the tolerance.
"""
from __future__ import annotations

import torch

from megaseek.pipeline.p2p import StageComm
from megaseek.pipeline.schedule import forward_only, run_1f1b
from tests.helpers import run_world

M, B, D_IN, D_HID = 4, 3, 5, 8  # micro-batches, micro-batch rows, input and hidden width
TOL = 1e-6


class CountingEngine:
    """What run_1f1b needs of DeepSpeed's engine: forward = module call; backward(loss, scale_wrt_gas=True)
    back-propagates loss / gas (DeepSpeed's accumulation scale) or the loss as is; step() counts calls.
    `mode` breaks the scale on purpose: "none" never divides, "always" divides also for scale_wrt_gas=False."""

    def __init__(self, module: torch.nn.Module, gas: int, mode: str = "ok"):
        self.module, self.gas, self.mode = module, gas, mode
        self.log: list = []

    def __call__(self, *a):
        return self.module(*a)

    def backward(self, loss, scale_wrt_gas=True):
        divide = {"ok": scale_wrt_gas, "none": False, "always": True}[self.mode]
        (loss / self.gas if divide else loss).backward()
        self.log.append("backward")

    def step(self):
        self.log.append("step")


def _modules():
    """Stage 0: Linear + tanh; stage 1: Linear + tanh + Linear (the same weights in every process)."""
    torch.manual_seed(0)
    s0 = torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID), torch.nn.Tanh())
    s1 = torch.nn.Sequential(torch.nn.Linear(D_HID, D_HID), torch.nn.Tanh(), torch.nn.Linear(D_HID, 1))
    return s0, s1


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(B, D_IN, generator=g), torch.randn(B, 1, generator=g)) for _ in range(M)]


def _loss(out, target):
    return ((out - target) ** 2).mean()


def _grads(module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def sequential_reference() -> tuple[dict, dict]:
    """The two stages run back to back in one process: the plain accumulation loop sum_i grad(loss_i) / m."""
    s0, s1 = _modules()
    for x, y in _data():
        (_loss(s1(s0(x)), y) / M).backward()
    return _grads(s0), _grads(s1)


def expected_events(p: int, s: int, m: int) -> list:
    """The 1F1B order of stage s: w warm-up forwards, then one forward / one backward, then w backwards."""
    w = min(p - s - 1, m)
    ev = [("F", i) for i in range(w)]
    for k in range(m - w):
        ev += [("F", w + k), ("B", k)]
    return ev + [("B", k) for k in range(m - w, m)]


def _run_stage(engine, comm, stage: int, stages: int, data, record: bool = True):
    last = stage == stages - 1

    def forward_step(i, x):
        inp = data[i][0] if stage == 0 else x
        out = engine(inp)
        return _loss(out, data[i][1]) if last else out

    engine.log.clear()
    times = run_1f1b(engine, comm, M, forward_step, before_last_step=lambda: engine.log.append("before_last_step"),
                     record_events=record)
    return [(k, i) for k, i, *_ in times.events], list(engine.log)


def _worker(rank, world):
    import datetime

    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    out = {}

    # --- StageComm: paired sends / receives, right shape and values ---
    comm = StageComm([0, 1], rank, (2, 3), torch.float32, "cpu")
    act = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 100
    grad = -torch.arange(6, dtype=torch.float32).reshape(2, 3)
    if rank == 0:
        assert comm.prev is None and comm.next == 1
        comm.send_forward(act)
        out["recv_backward"] = comm.recv_backward()
        comm.send_backward(torch.ones(1))  # first stage: no previous peer, nothing is sent (no hang)
        assert comm.recv_forward() is None
    else:
        assert comm.prev == 0 and comm.next is None
        out["recv_forward"] = comm.recv_forward()
        comm.send_backward(grad)
        comm.send_forward(torch.ones(1))  # last stage: no next peer
        assert comm.recv_backward() is None
    # both neighbours send at the same moment (1F1B steady state), tensors far beyond any eager buffer
    big = StageComm([0, 1], rank, (256, 1024), torch.float32, "cpu")
    mine = torch.full((256, 1024), float(rank + 1))
    got = big.send_forward_recv_backward(mine) if rank == 0 else big.send_backward_recv_forward(mine)
    out["exchanged"] = float(got.mean()), tuple(got.shape)

    # --- the schedule, then the teeth (wrong scales) ---
    data = _data()
    for mode in ("ok", "none", "always"):
        s0, s1 = _modules()
        module = s0 if rank == 0 else s1
        engine = CountingEngine(module, M, mode)
        comm = StageComm([0, 1], rank, (B, D_HID), torch.float32, "cpu")
        events, log = _run_stage(engine, comm, rank, world, data)
        out[mode] = {"grads": _grads(module), "events": events, "log": log}

    # --- forward_only: evaluation through the stages, no gradients ---
    s0, s1 = _modules()
    seen = []

    def fstep(i, x):
        y = s0(data[i][0]) if rank == 0 else _loss(s1(x), data[i][1])
        if rank == 1:
            seen.append(float(y))
        return y
    forward_only(StageComm([0, 1], rank, (B, D_HID), torch.float32, "cpu"), M, fstep)
    out["eval"] = seen
    dist.barrier()
    return _plain(out)


def _plain(obj):
    """Tensors -> numpy arrays, so results leave the process by value (a torch tensor in the result queue
    is shared through a file descriptor that dies with the child: a race with its exit)."""
    if torch.is_tensor(obj):
        return obj.detach().numpy().copy()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _tensors(obj):
    import numpy as np
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_tensors(v) for v in obj]
    return obj


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_1f1b_two_stages_equals_sequential_and_stagecomm_pairs():
    """2 gloo processes (one spawn for all checks, ~5 s)."""
    r0, r1 = _tensors(run_world(2, _worker, timeout=120))
    # StageComm
    assert torch.equal(r1["recv_forward"], torch.arange(6, dtype=torch.float32).reshape(2, 3) + 100)
    assert torch.equal(r0["recv_backward"], -torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert r0["exchanged"] == (2.0, (256, 1024)) and r1["exchanged"] == (1.0, (256, 1024))

    ref0, ref1 = sequential_reference()
    g0, g1 = r0["ok"]["grads"], r1["ok"]["grads"]
    assert _max_diff(g0, ref0) < TOL and _max_diff(g1, ref1) < TOL, (_max_diff(g0, ref0), _max_diff(g1, ref1))
    assert min(float(v.abs().max()) for v in list(ref0.values()) + list(ref1.values())) > 1e-3  # not trivially 0

    # the 1F1B order, exactly: stage 0 of 2 warms up one forward; the last stage alternates from the start
    assert r0["ok"]["events"] == expected_events(2, 0, M) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1),
                                                              ("F", 3), ("B", 2), ("B", 3)]
    assert r1["ok"]["events"] == expected_events(2, 1, M)
    for r, s in ((r0, 0), (r1, 1)):
        ev = r["ok"]["events"]
        for k, i in ev:  # a backward only after its forward; at most p - s activations alive
            if k == "B":
                assert ev.index(("F", i)) < ev.index(("B", i))
        alive = [sum(1 for kk, ii in ev[:n + 1] if kk == "F") - sum(1 for kk, ii in ev[:n + 1] if kk == "B")
                 for n in range(len(ev))]
        assert max(alive) == 2 - s
        log = r["ok"]["log"]
        assert log.count("step") == M and log.count("backward") == M
        assert log[-2:] == ["before_last_step", "step"] and log.index("before_last_step") == len(log) - 2
        # every step but the boundary one follows its backward
        assert log[:-2] == ["backward", "step"] * (M - 1) + ["backward"]

    # teeth: the 1/m scale forgotten (both stages off by m), or also applied to y * dy (stage 0 off by m)
    assert _max_diff(r0["none"]["grads"], ref0) > 1e-3 and _max_diff(r1["none"]["grads"], ref1) > 1e-3
    assert _max_diff(r1["always"]["grads"], ref1) < TOL and _max_diff(r0["always"]["grads"], ref0) > 1e-3
    for k in ref0:
        assert torch.allclose(r0["always"]["grads"][k] * M, ref0[k], atol=TOL)

    # forward_only: the last stage sees the sequential losses
    s0, s1 = _modules()
    with torch.no_grad():
        want = [float(_loss(s1(s0(x)), y)) for x, y in _data()]
    assert max(abs(a - b) for a, b in zip(r1["eval"], want)) < TOL


def test_one_stage_is_the_plain_accumulation_loop():
    """pp = 1: no peers, no warm-up; forward and backward alternate and the gradients are bitwise those of
    `for i: (loss_i / m).backward()` (in process: StageComm with one stage touches no process group)."""
    s0, s1 = _modules()
    model = torch.nn.Sequential(s0, s1)
    engine = CountingEngine(model, M)
    comm = StageComm([0], 0, (B, D_HID), torch.float32, "cpu")
    assert comm.prev is None and comm.next is None
    events, log = _run_stage(engine, comm, 0, 1, _data())
    assert events == expected_events(1, 0, M) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2),
                                                  ("F", 3), ("B", 3)]
    assert log == ["backward", "step"] * (M - 1) + ["backward", "before_last_step", "step"]
    ref0, ref1 = sequential_reference()
    got = _grads(model)
    for n, g in {**{f"0.{k}": v for k, v in ref0.items()}, **{f"1.{k}": v for k, v in ref1.items()}}.items():
        assert torch.equal(got[n], g), n
    # teeth: without DeepSpeed's 1/m the gradients are m times too large
    s0, s1 = _modules()
    model = torch.nn.Sequential(s0, s1)
    _run_stage(CountingEngine(model, M, "none"), comm, 0, 1, _data())
    assert torch.allclose(_grads(model)["0.0.weight"], ref0["0.weight"] * M, atol=TOL)
    assert not torch.allclose(_grads(model)["0.0.weight"], ref0["0.weight"], atol=1e-3)


def test_expected_events_formula():
    """The reference order itself: 4 stages, 3 micro-batches (warm-up capped at m)."""
    assert expected_events(4, 0, 3) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1), ("B", 2)]
    assert expected_events(4, 2, 3) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]
