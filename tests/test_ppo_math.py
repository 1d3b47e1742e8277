"""PPO numeric oracles (megaseek/tasks/ppo.py): k1 / k3, the adaptive-KL rule, shaped rewards, GAE, returns,
the clipped policy and value losses equal plain Python loops on a mixed-length batch (left pads, prompts,
responses of different lengths, right pads, an empty response) within 1e-6; whitening over 2 data-parallel
ranks holding different numbers of tokens equals one process (per-rank whitening does not); the policy and
value objectives (loss, every gradient, entropy) at tp = 2 equal tp = 1."""
import math

import pytest
import torch

from megaseek.tasks import ppo as P

GAMMA, LAM = 0.97, 0.9


def _batch(seed=0):
    """(b, s) mask of response positions with mixed lengths and offsets, and random per-token tensors."""
    g = torch.Generator().manual_seed(seed)
    spans = [(2, 9), (0, 3), (5, 12), (4, 4), (1, 12), (7, 8)]  # [start, end) of each row's response; (4, 4): none
    s = 12
    mask = torch.zeros(len(spans), s, dtype=torch.bool)
    for i, (a, e) in enumerate(spans):
        mask[i, a:e] = True
    t = {k: torch.randn(len(spans), s, generator=g, dtype=torch.float64) for k in
         ("logp", "ref", "old", "values", "old_values", "rewards", "adv")}
    t["logp"], t["ref"], t["old"] = -t["logp"].abs(), -t["ref"].abs(), -t["old"].abs()
    scores = torch.randn(len(spans), generator=g, dtype=torch.float64)
    return mask, t, scores


def _rows(mask):
    return [[j for j in range(mask.shape[1]) if mask[i, j]] for i in range(mask.shape[0])]


def _ref_gae(rewards, values, mask, gamma, lam):
    adv = [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    ret = [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    for i, idx in enumerate(_rows(mask)):
        r = [float(rewards[i, j]) for j in idx]
        v = [float(values[i, j]) for j in idx]
        a_next = 0.0
        for k in reversed(range(len(idx))):
            v_next = v[k + 1] if k + 1 < len(idx) else 0.0
            a_next = r[k] + gamma * v_next - v[k] + gamma * lam * a_next
            adv[i][idx[k]] = a_next
            ret[i][idx[k]] = a_next + v[k]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def _ref_shaped(scores, kl, mask, beta):
    out = [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    for i, idx in enumerate(_rows(mask)):
        for j in idx:
            out[i][j] = -beta * float(kl[i, j])
        if idx:
            out[i][idx[-1]] += float(scores[i])
    return torch.tensor(out, dtype=torch.float64)


def _maxdiff(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max())


def test_kl_estimators_and_shaped_rewards_equal_loops():
    mask, t, scores = _batch()
    k1 = P.kl_penalty(t["logp"], t["ref"], "k1")
    k3 = P.kl_penalty(t["logp"], t["ref"], "k3")
    r1 = [[float(a) - float(b) for a, b in zip(x, y)] for x, y in zip(t["logp"], t["ref"])]
    r3 = [[math.exp(float(b) - float(a)) - (float(b) - float(a)) - 1.0 for a, b in zip(x, y)]
          for x, y in zip(t["logp"], t["ref"])]
    assert _maxdiff(k1, r1) < 1e-6 and _maxdiff(k3, r3) < 1e-6
    assert float(k3.min()) >= 0.0 and float(k1.min()) < 0.0
    assert float(P.kl_penalty(t["logp"], t["logp"], "k3").abs().max()) == 0.0
    with pytest.raises(ValueError, match="kl_estimator"):
        P.kl_penalty(t["logp"], t["ref"], "k2")
    # shaped rewards: -beta kl on the response, + score on the last response token (none on an empty row)
    eos = torch.tensor([True, False, True, True, False, True])
    sc = P.penalise_missing_eos(scores, eos, 1.5)
    assert _maxdiff(sc, [float(s) - (0.0 if e else 1.5) for s, e in zip(scores, eos)]) < 1e-12
    r = P.shaped_rewards(sc, k1, mask, beta=0.3)
    assert _maxdiff(r, _ref_shaped(sc, k1, mask, 0.3)) < 1e-6
    assert float(r[3].abs().max()) == 0.0


def test_adaptive_kl_rule_equals_loop():
    ctl = P.KLController(0.2, target=6.0, horizon=1000.0)
    beta, got, want = 0.2, [], []
    for kl, n in [(3.0, 64), (6.6, 64), (30.0, 128), (0.0, 32), (6.0, 64), (5.0, 16)]:
        got.append(ctl.update(kl, n))
        err = kl / 6.0 - 1.0
        err = 0.2 if err > 0.2 else (-0.2 if err < -0.2 else err)  # clipped to +-0.2
        beta = beta * (1.0 + err * n / 1000.0)
        want.append(beta)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-12
    assert got[1] > got[0] and got[3] < got[2]  # above target: up; below: down
    fixed = P.KLController(0.2)
    assert fixed.update(100.0, 64) == 0.2 and not fixed.adaptive


def test_gae_returns_and_clipped_losses_equal_loops():
    mask, t, _ = _batch()
    adv, ret = P.gae(t["rewards"], t["values"], mask, GAMMA, LAM)
    ra, rr = _ref_gae(t["rewards"], t["values"], mask, GAMMA, LAM)
    print(f"[ppo math] gae {_maxdiff(adv, ra):.2e} returns {_maxdiff(ret, rr):.2e}")
    assert _maxdiff(adv, ra) < 1e-6 and _maxdiff(ret, rr) < 1e-6
    assert float(adv[~mask].abs().max()) == 0.0
    # gamma = lam = 1 and V = 0: the advantage is the reward-to-go
    a1, _ = P.gae(t["rewards"], torch.zeros_like(t["values"]), mask, 1.0, 1.0)
    togo = torch.where(mask, t["rewards"], 0).flip(-1).cumsum(-1).flip(-1)
    assert _maxdiff(torch.where(mask, a1, 0), torch.where(mask, togo, 0)) < 1e-9
    # the float32 path (what the launch feeds) agrees too
    a32, _ = P.gae(t["rewards"].float(), t["values"].float(), mask, GAMMA, LAM)
    assert _maxdiff(a32, ra) < 1e-5

    c, cv = 0.2, 0.3
    loss, ratio = P.clipped_policy_loss(t["logp"], t["old"], t["adv"], mask, c)
    lv, clipped = P.clipped_value_loss(t["values"], t["old_values"], rr, mask, cv)
    rl, rv, rc = [], [], []
    for i in range(mask.shape[0]):
        rl.append([]), rv.append([]), rc.append([])
        for j in range(mask.shape[1]):
            if not mask[i, j]:
                rl[-1].append(0.0), rv[-1].append(0.0), rc[-1].append(False)
                continue
            rho = math.exp(float(t["logp"][i, j]) - float(t["old"][i, j]))
            a = float(t["adv"][i, j])
            rl[-1].append(-min(rho * a, min(max(rho, 1 - c), 1 + c) * a))
            v, vo, R = float(t["values"][i, j]), float(t["old_values"][i, j]), float(rr[i, j])
            vc = vo + min(max(v - vo, -cv), cv)
            rv[-1].append(0.5 * max((v - R) ** 2, (vc - R) ** 2))
            rc[-1].append(abs(v - vo) > cv and (vc - R) ** 2 > (v - R) ** 2)
    print(f"[ppo math] policy {_maxdiff(loss, rl):.2e} value {_maxdiff(lv, rv):.2e}")
    assert _maxdiff(loss, rl) < 1e-6 and _maxdiff(lv, rv) < 1e-6
    assert torch.equal(clipped, torch.tensor(rc)) and 0 < int(clipped.sum()) < int(mask.sum())
    assert float(P.approx_kl(ratio)[mask].min()) >= 0.0


def _whiten_case(rank, world, mask, x):
    """Rank r whitens its rows (rank 0: rows 0-1, rank 1: rows 2-5: different token counts) over the dp group."""
    import torch.distributed as dist

    from tests.helpers import init_gloo
    init_gloo(rank, world)
    rows = slice(0, 2) if rank == 0 else slice(2, None)
    glob = P.whiten(x[rows], mask[rows], group=dist.group.WORLD)
    local = P.whiten(x[rows], mask[rows], group=None)  # per rank: the wrong statistics
    mean, var, n = P.masked_mean_var(x[rows], mask[rows], group=dist.group.WORLD)
    return {"rows": (rows.start, rows.stop), "global": glob, "local": local, "n": n, "mean": mean, "var": var}


def _case(rank, world, mask, x):
    """Both 2-rank checks in one launch: whitening over the dp group, then the objectives at tp = 2."""
    return {"whiten": _whiten_case(rank, world, mask, x), "tp": _tp_case(rank, world)}


def _tp_case(rank, world):
    """The policy and value objectives (loss, gradients, entropy) at tp = 2 vs tp = 1 on one rollout batch."""
    import torch.distributed as dist

    from megaseek.distributed.groups import ParallelGroups
    from megaseek.distributed.topology import Topology
    from megaseek.model.config import ModelConfig
    from megaseek.model.decoder import Decoder
    from megaseek.tensor_parallel.layers import TPContext, gather_full
    from tests.helpers import init_gloo
    init_gloo(rank, world)
    groups = ParallelGroups.build(Topology(tp=world))
    cfg = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=16, init_std=0.05,
                      fused=False)  # 61: padded vocabulary at tp = 2; unfused: shards concatenate to tp = 1
    g = torch.Generator().manual_seed(4)
    mask, t, _ = _batch(1)
    ids = torch.randint(0, 61, mask.shape, generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1)
    b = {"input_ids": ids, "labels": labels, "loss_mask": mask, "old_logps": (t["old"] - 3.5).float(),
         "advantages": t["adv"].float(), "old_values": t["old_values"].float() * 0.1,
         "returns": t["rewards"].float() * 0.1}
    out = {}
    for name, obj in {"policy": P.PPOPolicyObjective(clip=0.2, temperature=0.7),
                      "value-row-rank1": P.PPOValueObjective(60, clip=0.05),
                      "value-row-rank0": P.PPOValueObjective(5, clip=0.05)}.items():
        res = []
        for ctx in (TPContext(), TPContext.from_axis(groups.tp)):
            m = Decoder(cfg, ctx, seed=3)
            z = m(ids)
            parts = obj(m, z, b)
            (parts.loss_sum / parts.count).backward()
            grads = {}
            for n, p in m.named_parameters():
                dim = getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None
                gr = gather_full(p.grad, ctx, dim)
                grads[n] = gr[:cfg.vocab_size] if gr.shape[0] == m.padded_vocab else gr  # vocabulary padding stripped
            res.append((float(parts.loss_sum / parts.count), grads, {k: float(v) for k, v in parts.metrics.items()}))
        (l1, g1, m1), (l2, g2, m2) = res
        out[name] = {"loss": abs(l1 - l2), "grad": max(float((g1[n] - g2[n]).abs().max()) for n in g1),
                     "grad_scale": max(float(g1[n].abs().max()) for n in g1),
                     "metrics": max(abs(m1[k] - m2[k]) / max(1.0, abs(m1[k])) for k in m1), "m1": m1}
    dist.barrier()
    return out


def test_whitening_over_two_ranks_equals_one_process_and_objectives_at_tp2():
    from tests.helpers import run_world
    mask, t, _ = _batch(2)
    x = t["adv"] * 3.0 + 1.0
    one = P.whiten(x, mask)
    mean, var, n = P.masked_mean_var(x, mask)
    vals = [float(x[i, j]) for i, idx in enumerate(_rows(mask)) for j in idx]  # the loop oracle
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
    assert abs(mean - mu) < 1e-9 and abs(var - sd ** 2) < 1e-9 and n == len(vals)
    assert abs(float(one[mask].mean())) < 1e-9 and abs(float(one[mask].std()) - 1.0) < 1e-6
    both = run_world(2, _case, mask, x)
    res = [r["whiten"] for r in both]
    glob = torch.cat([r["global"] for r in res])
    local = torch.cat([r["local"] for r in res])
    print(f"[ppo whiten] 2 ranks vs 1 process {_maxdiff(glob, one):.2e}; per-rank whitening {_maxdiff(local, one):.3f}")
    assert _maxdiff(glob, one) < 1e-6 and all(r["n"] == n for r in res)
    assert _maxdiff(local, one) > 0.1  # teeth: per-rank statistics differ from the global batch's

    res = [r["tp"] for r in both]
    print(f"[ppo tp2] {res[0]}")
    for r in res:
        for name, d in r.items():
            assert d["loss"] < 1e-5 and d["grad"] < 1e-5 and d["grad_scale"] > 1e-4, (name, d)
            assert d["metrics"] < 1e-5, (name, d)
    m1 = res[0]["policy"]["m1"]
    assert m1["clip_fraction"] > 0 and m1["entropy"] > 0
