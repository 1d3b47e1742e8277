"""GRPO / RLOO pieces (megaseek/tasks/grpo.py): group-normalised and leave-one-out advantages equal a plain
reference loop (1e-6); an all-equal group gives advantage 0 and no NaN; the clipped objective at ratio 1 has
the policy gradient -sum A grad log pi (1e-6), clipped tokens give no gradient, and k3 is 0 at pi = ref."""
import math

import pytest
import torch

from megaseek.tasks.grpo import GRPOObjective, group_advantages


def _loop_reference(rewards, mode, eps=1e-6):
    out = []
    for row in rewards.tolist():
        g, mean = len(row), sum(row) / len(row)
        if mode == "loo":
            out.append([r - (sum(row) - r) / (g - 1) for r in row])
        else:
            std = math.sqrt(sum((r - mean) ** 2 for r in row) / g)
            out.append([(r - mean) / (std + eps) for r in row])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["group_norm", "loo"])
def test_advantages_equal_a_reference_and_equal_groups_give_zero(mode):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(6, 4, generator=g)
    rewards[1] = 0.7  # all equal
    rewards[2] = 0.0  # all zero
    rewards[3] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, mode)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[1], torch.zeros(4)) and torch.equal(adv[2], torch.zeros(4))
    assert (adv.double() - _loop_reference(rewards, mode)).abs().max() < 1e-6
    assert adv.sum(dim=1).abs().max() < 1e-6  # both are centred within the group
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(rewards[:, :1], mode)


def _tiny():
    from megaseek.model.config import ModelConfig
    from megaseek.model.decoder import Decoder
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=16, init_std=0.05)
    return Decoder(cfg, seed=1)


def _batch(m):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (4, 12), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], 1)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:, 5:11] = True  # the response
    with torch.no_grad():
        logp = -m.token_losses(m(ids), labels.clamp(min=0))
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])[:, None].expand(4, 12).clone()
    return {"input_ids": ids, "labels": labels, "loss_mask": mask, "old_logps": logp, "ref_logps": logp,
            "advantages": adv}


def _grads(m, fn):
    m.zero_grad()
    fn().backward()
    return [p.grad.clone() for p in m.parameters()]


def test_clipped_objective_is_the_policy_gradient_at_ratio_one():
    m = _tiny()
    b = _batch(m)
    obj = GRPOObjective(clip=0.2, kl_coef=0.1)
    parts = obj(m, m(b["input_ids"]), b)
    assert float(parts.metrics["kl"]) == 0.0 and float(parts.metrics["clip_fraction"]) == 0.0
    valid = b["loss_mask"]
    assert abs(float(parts.loss_sum) + float((b["advantages"] * valid).sum())) < 1e-5  # ratio 1, k3 0: -sum A

    def reference():
        logp = -m.token_losses(m(b["input_ids"]), b["labels"].clamp(min=0))
        return -(b["advantages"] * logp * valid).sum()
    ours = _grads(m, lambda: obj(m, m(b["input_ids"]), b).loss_sum)
    ref = _grads(m, reference)
    assert max(float((a - c).abs().max()) for a, c in zip(ours, ref)) < 1e-6
    # clipped: old log-probs far below (ratio >> 1 + clip) with A > 0 -> no gradient from those samples
    far = dict(b, old_logps=b["old_logps"] - 1.0, advantages=b["advantages"].clamp(min=0))
    parts = obj(m, m(b["input_ids"]), far)
    assert float(parts.metrics["clip_fraction"]) == float(valid.sum())  # ratio e > 1.2 on every response token
    g = _grads(m, lambda: GRPOObjective(0.2, 0.0)(m, m(b["input_ids"]), far).loss_sum)
    assert max(float(x.abs().max()) for x in g) == 0.0
