"""PowerSGD on a 2-process gloo world: exact on a rank-r mean gradient, warm-up = plain mean, bytes per step
against a plain all-reduce of the tiny model's gradients equal to the theoretical ratio, error feedback
recovers what a rank-r compression drops."""
import pytest
import torch

from megaseek.distributed.powersgd import PowerSGD, check_powersgd, compressed_shape, theoretical_ratio
from tests.helpers import init_gloo, run_world


def _rank_r_and_warmup(rank, world):
    import torch.distributed as dist
    g = torch.Generator().manual_seed(0)
    u = torch.randn(48, 3, generator=g)                       # shared left factor: the mean has rank 3
    vs = [torch.randn(40, 3, generator=g) for _ in range(world)]
    bias = [torch.randn(48, generator=g) for _ in range(world)]
    out = {}
    red = PowerSGD(rank=4, warmup_steps=1, error_feedback=True)
    for step in range(3):
        grads = [(u @ vs[rank].t()) * (step + 1), bias[rank].clone() * (step + 1)]
        red.reduce(grads)
        want = [(u @ sum(vs).t()) * (step + 1) / world, sum(bias) * (step + 1) / world]
        out[step] = [float((a - b).abs().max()) for a, b in zip(grads, want)]
        # the error memory: this rank's gradient minus the mean's approximation; summed over ranks it is what the
        # compression dropped (zero when exact)
        e = red.error[0].clone() if 0 in red.error else torch.zeros(48, 40)
        dist.all_reduce(e)
        out[f"err{step}"] = float(e.abs().max())
    return out


def _all(rank, world):
    """Every scenario in one 2-process world (start-up is the expensive part)."""
    init_gloo(rank, world)
    return {"rank_r": _rank_r_and_warmup(rank, world), "bytes": _tiny_bytes(rank, world, 4),
            "ef_on": _error_feedback(rank, world, True), "ef_off": _error_feedback(rank, world, False),
            "state": _state_round_trip(rank, world)}


@pytest.fixture(scope="module")
def world2():
    return run_world(2, _all, timeout=300)


def test_exact_on_rank_r_mean_and_warmup_is_plain_mean(world2):
    for out in [w["rank_r"] for w in world2]:
        for step in range(3):  # step 0: warm-up (plain mean); 1, 2: compressed, exact because the mean has rank 3
            assert max(out[step]) < 1e-4, (step, out[step])
        assert out["err0"] == 0.0 and out["err2"] < 1e-4  # none in warm-up; none dropped after


def _tiny_bytes(rank, world, rank_r):
    from megaseek.model.config import ModelConfig
    from megaseek.model.decoder import Decoder
    from megaseek.tensor_parallel.mappings import count_comm
    from tests.helpers import compose
    mc = compose([]).model
    cfg = ModelConfig(**{k: v for k, v in dict(mc).items() if k in ModelConfig.__dataclass_fields__})
    shapes = [tuple(p.shape) for p in Decoder(cfg, seed=0).parameters()]
    torch.manual_seed(rank)
    grads = [torch.randn(s) for s in shapes]
    red = PowerSGD(rank=rank_r, warmup_steps=1)
    per_step = []
    for _ in range(3):
        with count_comm() as c:
            red.reduce([g.clone() for g in grads])
        per_step.append({k: v[1] for k, v in c.ops.items()})
    return shapes, per_step


def test_bytes_per_step_tiny_model_rank4(world2):
    shapes, per_step = world2[0]["bytes"]
    plain = sum(per_step[0].values())                    # the warm-up step: every gradient all-reduced whole
    assert plain == 4 * sum(torch.Size(s).numel() for s in shapes) and set(per_step[0]) == {"powersgd_dense"}
    compressed = sum(per_step[1].values())
    assert sum(per_step[2].values()) == compressed
    theory = theoretical_ratio(shapes, 4)
    # by hand: every matrix (n, m) moves (n + m) * 4 numbers, every vector all of its n
    by_hand = sum((s[0] + s[1]) * 4 if len(s) == 2 else s[0] for s in shapes) / sum(torch.Size(s).numel()
                                                                                    for s in shapes)
    assert theory == pytest.approx(by_hand, rel=1e-12)
    measured = compressed / plain
    print(f"PowerSGD rank 4 on the tiny model: {compressed:,} vs {plain:,} bytes per step, ratio {measured:.4f} "
          f"(theory {theory:.4f}, {1 / measured:.1f}x less)")
    assert measured == pytest.approx(theory, rel=0.05) and measured < 0.1


def _error_feedback(rank, world, ef):
    g = torch.Generator().manual_seed(1)
    truth = [torch.randn(32, 24, generator=g) for _ in range(world)]  # full rank, fixed over the steps
    mean = sum(truth) / world
    red = PowerSGD(rank=2, warmup_steps=0, error_feedback=ef)
    total = torch.zeros_like(mean)
    steps = 60
    for _ in range(steps):
        grad = [truth[rank].clone()]
        red.reduce(grad)
        total += grad[0]
    return float((total / steps - mean).norm() / mean.norm())


def test_error_feedback_recovers_what_compression_drops(world2):
    on, off = world2[0]["ef_on"], world2[0]["ef_off"]
    print(f"PowerSGD rank 2 of a full-rank 32x24 gradient, mean update after 60 steps: relative error "
          f"{on:.4f} with error feedback, {off:.4f} without")
    assert off > 0.3          # rank 2 of a rank-24 matrix drops most of it, every step
    assert on < 0.2 * off     # the error memory feeds it back: the average update converges to the mean


def test_shapes_and_refusals():
    assert compressed_shape(torch.empty(64, 32), 4) == (64, 32)
    assert compressed_shape(torch.empty(8, 4, 4), 2) == (8, 16)
    assert compressed_shape(torch.empty(64), 4) is None          # vectors: whole
    assert compressed_shape(torch.empty(6, 6), 4) is None        # (6 + 6) * 4 >= 36: would not shrink
    assert compressed_shape(torch.empty(16, 16), 4) is None      # 128 numbers instead of 256: not 2x fewer
    assert compressed_shape(torch.empty(16, 16), 4, min_compression_rate=1) == (16, 16)
    assert compressed_shape(torch.empty(17, 16), 4) == (17, 16)  # 132 * 2 < 272
    assert theoretical_ratio([(16, 16), (17, 16)], 4) == pytest.approx((256 + 132) / (256 + 272))
    check_powersgd(4, 10, 0)
    check_powersgd(0, 10, 3)  # off: anything goes
    with pytest.raises(ValueError, match="parallel.powersgd.rank=4 needs zero.stage=0 .* zero.stage=1"):
        check_powersgd(4, 10, 1)
    with pytest.raises(ValueError, match="parallel.powersgd.warmup_steps=-1 must be >= 0"):
        check_powersgd(4, -1, 0)
    with pytest.raises(ValueError, match="parallel.powersgd.rank=4 with parallel.ep=2"):
        check_powersgd(4, 10, 0, ep=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        PowerSGD(rank=0)


def _state_round_trip(rank, world):
    """A reducer restored from another's `rank_state` (through a safetensors file, as the checkpoint does)
    continues bit for bit; at another layout, or without a file, it starts again (warm-up, notice)."""
    import tempfile
    from pathlib import Path
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(2)
    seq = [[torch.randn(32, 24, generator=g), torch.randn(24, generator=g)] for _ in range(6 * world)]
    grads = lambda step: [t.clone() for t in seq[step * world + rank]]  # noqa: E731  (this rank's, per step)
    layout = {"dp": world, "tp": 1, "pp": 1, "world_size": world}
    a = PowerSGD(rank=2, warmup_steps=1, log=lambda m: None)
    for step in range(3):
        a.reduce(grads(step))
    tensors, meta = a.rank_state()
    path = Path(tempfile.mkdtemp()) / f"powersgd-rank{rank}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    b, c, d = (PowerSGD(rank=2, warmup_steps=1, log=lambda m: None) for _ in range(3))
    b.load_rank_state(path, layout, layout)
    c.load_rank_state(path, dict(layout, dp=2 * world, world_size=2 * world), layout)
    d.load_rank_state(None, layout, layout)
    out = {"keys": sorted(tensors), "b_step": b.step, "c_step": c.step, "d_notice": d.notice["reason"],
           "c_notice": c.notice["reason"], "b_notice": b.notice, "diff": [], "diff_fresh": []}
    for step in range(3, 6):
        ga, gb, gc = grads(step), grads(step), grads(step)
        a.reduce(ga)
        b.reduce(gb)
        c.reduce(gc)
        out["diff"].append(max(float((x - y).abs().max()) for x, y in zip(ga, gb)))
        out["diff_fresh"].append(float((ga[0] - gc[0]).abs().max()))
    out["record"] = c.metrics_record(type("T", (), {"step": 4})())
    out["record_again"] = c.metrics_record(type("T", (), {"step": 5})())
    return out


def test_reducer_state_round_trip(world2):
    for out in [w["state"] for w in world2]:
        assert out["keys"] == ["error.0", "q.0", "step"] and out["b_step"] == 3 and out["b_notice"] is None
        assert max(out["diff"]) == 0.0, out["diff"]           # restored: the same updates, bit for bit
        assert out["c_step"] == 0 and "dp=4 tp=1 pp=1, this run is dp=2" in out["c_notice"]
        assert "holds no PowerSGD state" in out["d_notice"]
        # the restarted reducer does a warm-up step (the exact mean) where the restored one compresses
        assert min(out["diff_fresh"][:2]) > 1e-3, out["diff_fresh"]
        assert out["record"]["powersgd_restart"]["step"] == 4 and out["record_again"] == {}
