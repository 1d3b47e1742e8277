"""PPO for RLHF: the per-token math (KL penalty, shaped rewards, GAE, whitening) and the two objectives.

Every per-token tensor is (b, s) in the batch convention of megaseek/tasks/objective.py: position t holds the
log-prob of the token at t + 1 (`labels[t]`), and `mask[t]` (the loss mask) is True where that token is a
response token. A rollout row is [left pad | prompt | response | right pad]; responses have mixed lengths, so
every function takes the mask and never assumes contiguity: "the next step" of a valid position is the next
valid position of the same row, and the last valid position is the episode's terminal step.

KL to the frozen reference, per response token (d = log pi - log ref, both at the sampling temperature):

    k1_t = d_t                                  (unbiased, can be negative per token)
    k3_t = exp(-d_t) + d_t - 1                  (>= 0, unbiased for KL(pi || ref) under samples of pi)

KL coefficient beta: fixed, or adaptive (Ziegler et al. 2019, the rule of lm-human-preferences / TRL):

    err = clip(KL / target - 1, -0.2, 0.2);     beta <- beta * (1 + err * n_steps / horizon)

with KL the batch's mean summed-per-sequence KL and n_steps the samples of the batch.

Rewards per token: r_t = -beta * kl_t on every response token, plus the sequence's score (reward model or
verifiable reward, minus `missing_eos_penalty` where the response has no EOS) on its last response token.

GAE (gamma, lambda) backwards over each row's valid positions, V = 0 after the terminal step:

    delta_t = r_t + gamma * V_{t'} - V_t,   A_t = delta_t + gamma * lam * A_{t'}   (t' = next valid position)
    returns_t = A_t + V_t

Whitening over the WHOLE global batch: mean and (unbiased) variance of the advantages on valid positions are
sums all-reduced over the data-parallel group, so every rank divides by the same numbers as one process would:

    mu = sum_r sum_t A / N,   var = sum_r sum_t (A - mu)^2 / (N - 1),   A' = (A - mu) / sqrt(var + 1e-8)

Objectives (sums over valid tokens; the step divides by the global valid-token count):

    policy:  rho = exp(log pi - log pi_old),  loss_t = max(-A_t rho, -A_t clip(rho, 1 - c, 1 + c))
             metrics: approx_kl_t = (rho - 1) - log rho (k3 of pi_old || pi), clip_fraction [|rho - 1| > c],
             entropy_t of pi(. | s_t) at the temperature
    value:   V^clip = V_old + clip(V - V_old, -c_v, c_v),  loss_t = 0.5 * max((V - R)^2, (V^clip - R)^2)

The critic is a separate Decoder whose value head is the `<|reward|>` output row read at every position
(megaseek/tasks/reward.py `reward_logits`: one row of the vocab-parallel head, all-reduced over the tensor
group, so it works at any tensor degree), initialised from the reward model (reward.model=DIR) or from the
policy's init checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megaseek.tasks.objective import LossParts, valid_tokens

KL_ESTIMATORS = ("k1", "k3")


# --- KL penalty and its coefficient ---
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """(b, s) per-token KL estimate from log pi and log ref (b, s) (see the module docstring)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"ppo.kl_estimator={estimator!r}: choose one of {list(KL_ESTIMATORS)}")
    d = logp - ref_logp  # (b, s)
    if estimator == "k1":
        return d
    return torch.exp(-d) + d - 1.0  # (b, s) >= 0


@dataclass
class KLController:
    """beta, fixed (target <= 0) or adaptive: err = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + err * n / horizon."""
    value: float
    target: float = 0.0
    horizon: float = 10000.0

    @property
    def adaptive(self) -> bool:
        return self.target > 0

    def update(self, kl: float, n_steps: int) -> float:
        if self.adaptive:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n_steps / self.horizon
        return self.value


# --- rewards ---
def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """(b,) position of each row's last valid token (-1 for a row with none) from a (b, s) mask."""
    s = mask.shape[-1]
    pos = torch.arange(s, device=mask.device).expand_as(mask)  # (b, s)
    return torch.where(mask.bool(), pos, -1).amax(-1)


def penalise_missing_eos(scores: torch.Tensor, eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """(b,) scores minus `penalty` where the response ended without EOS (eos (b,) bool)."""
    return scores - penalty * (~eos.bool()).to(scores.dtype)


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """(b, s) r_t = -beta * kl_t on valid positions, + scores (b,) on each row's last valid position."""
    m = mask.bool()
    r = torch.where(m, -beta * kl, torch.zeros_like(kl))  # (b, s)
    last = last_valid_index(m)  # (b,)
    has = last >= 0
    rows = torch.arange(r.shape[0], device=r.device)[has]
    r[rows, last[has]] += scores[has].to(r.dtype)
    return r


# --- GAE and whitening ---
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns), each (b, s), 0 off the mask; vectorised over rows, backwards over positions
    (masked positions carry the next valid step's value and advantage through unchanged)."""
    m = mask.bool()
    b, s = rewards.shape
    adv = torch.zeros_like(rewards)
    next_v = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)  # V_{t'}: 0 after the terminal step
    next_a = torch.zeros_like(next_v)  # A_{t'}
    for t in range(s - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_v - values[:, t]  # (b,)
        a = delta + gamma * lam * next_a
        mt = m[:, t]
        adv[:, t] = torch.where(mt, a, torch.zeros_like(a))
        next_v = torch.where(mt, values[:, t], next_v)
        next_a = torch.where(mt, a, next_a)
    returns = torch.where(m, adv + values, torch.zeros_like(adv))
    return adv, returns


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor, group=None) -> tuple[float, float, int]:
    """(mean, unbiased variance, N) of x over mask, summed over every rank of `group` (float64, two passes)."""
    m = mask.bool()
    xd = x.double()
    t = torch.stack([torch.where(m, xd, torch.zeros_like(xd)).sum(), m.sum().double()])
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    n = int(t[1])
    mean = t[0] / max(n, 1)
    sq = torch.where(m, (xd - mean) ** 2, torch.zeros_like(xd)).sum().reshape(1)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    var = sq[0] / max(n - 1, 1)
    return float(mean), float(var), n


def whiten(x: torch.Tensor, mask: torch.Tensor, group=None, eps: float = 1e-8) -> torch.Tensor:
    """(b, s) (x - mu) / sqrt(var + eps) with mu, var over the valid positions of the whole `group` (the
    data-parallel group: every rank's rows), 0 off the mask."""
    mean, var, _ = masked_mean_var(x, mask, group)
    out = (x.double() - mean) / (var + eps) ** 0.5
    return torch.where(mask.bool(), out, torch.zeros_like(out)).to(x.dtype)


# --- per-token losses ---
def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                        clip: float):
    """(loss (b, s), ratio (b, s)): max(-A rho, -A clip(rho, 1 - c, 1 + c)), 0 off the mask."""
    m = mask.bool()
    log_ratio = torch.where(m, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)  # (b, s)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip, 1.0 + clip))
    return torch.where(m, loss, torch.zeros_like(loss)), ratio


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float):
    """(loss (b, s), clipped (b, s) bool): 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2);
    clipped = the clip is active (|V - V_old| > c) and the clipped term is the larger one (it sets the loss)."""
    m = mask.bool()
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    a, c = (values - returns) ** 2, (v_clip - returns) ** 2
    loss = 0.5 * torch.maximum(a, c)
    return torch.where(m, loss, torch.zeros_like(loss)), ((values - old_values).abs() > clip) & (c > a) & m


def approx_kl(ratio: torch.Tensor) -> torch.Tensor:
    """(b, s) (rho - 1) - log rho: the k3 estimate of KL(pi_old || pi) (>= 0, Schulman)."""
    return (ratio - 1.0) - torch.log(ratio)


@torch.no_grad()
def entropy(model, logits: torch.Tensor) -> torch.Tensor:
    """(b, s) entropy of softmax(logits) from vocab-sharded logits (b, s, V_pad/p), exact at any tensor degree:
    H = log Z - sum_v p_v z_v with max, Z and sum p z all-reduced over the tensor group."""
    z = logits.float()
    group = model.ctx.group if model.ctx.size > 1 else None
    mx = z.amax(-1, keepdim=True)  # (b, s, 1)
    if group is not None:
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(z - mx)  # (b, s, V/p)
    zc = torch.where(e > 0, z - mx, torch.zeros_like(z))  # padded entries (dtype min / -inf) carry no mass
    parts = torch.stack([e.sum(-1), (e * zc).sum(-1)])  # (2, b, s)
    if group is not None:
        dist.all_reduce(parts, group=group)
    Z, ez = parts[0], parts[1]
    return torch.log(Z) - ez / Z


def token_logps(model, logits: torch.Tensor, batch: dict, temperature: float = 1.0):
    """((b, s) log pi(label_t | s_t) at `temperature`, (b, s) valid mask) from vocab-sharded logits."""
    valid = valid_tokens(batch).to(logits.device)
    labels = batch["labels"].to(logits.device).masked_fill(~valid, 0)
    z = logits / temperature if temperature != 1.0 else logits
    return -model.token_losses(z, labels), valid


# --- objectives ---
class PPOPolicyObjective:
    """The clipped-ratio policy loss on rollout rows; the batch holds `old_logps` and (whitened) `advantages`
    (b, s). Metrics (sums over valid tokens): approx_kl, clip_fraction, entropy, ratio."""
    name = "ppo"

    def __init__(self, clip: float = 0.2, temperature: float = 1.0):
        if not 0.0 < clip < 1.0:
            raise ValueError(f"ppo.clip={clip} must be in (0, 1)")
        if not temperature > 0:
            raise ValueError(f"ppo.temperature={temperature} must be > 0 (log-probs are taken at it)")
        self.clip, self.temperature = float(clip), float(temperature)

    def count(self, batch: dict) -> torch.Tensor:
        return valid_tokens(batch).sum()

    def __call__(self, model, logits: torch.Tensor, batch: dict) -> LossParts:
        logp, valid = token_logps(model, logits, batch, self.temperature)  # (b, s)
        old = batch["old_logps"].to(logp)
        adv = batch["advantages"].to(logp)
        loss, ratio = clipped_policy_loss(logp, old, adv, valid, self.clip)
        with torch.no_grad():
            r = ratio.detach()
            metrics = {"approx_kl": (approx_kl(r) * valid).sum(),
                       "clip_fraction": (((r - 1.0).abs() > self.clip) & valid).float().sum(),
                       "entropy": (entropy(model, logits.detach() / self.temperature) * valid).sum(),
                       "ratio": (r * valid).sum()}
        return LossParts(loss_sum=loss.sum(), count=valid.sum(), metrics=metrics)


def token_values(model, logits: torch.Tensor, value_id: int) -> torch.Tensor:
    """(b, s) V(s_t): the critic's `<|reward|>` row at every position, on every tensor rank."""
    from megaseek.tasks.reward import reward_logits
    return reward_logits(model, logits, value_id)


class PPOValueObjective:
    """The clipped value loss of the critic; the batch holds `old_values` and `returns` (b, s).
    Metrics: value_clip_fraction, value_error (sum of (V - R)^2 / 2 unclipped)."""
    name = "value"

    def __init__(self, value_id: int, clip: float = 0.2):
        if not clip > 0:
            raise ValueError(f"ppo.value_clip={clip} must be > 0")
        self.value_id, self.clip = int(value_id), float(clip)

    def count(self, batch: dict) -> torch.Tensor:
        return valid_tokens(batch).sum()

    def __call__(self, model, logits: torch.Tensor, batch: dict) -> LossParts:
        valid = valid_tokens(batch).to(logits.device)
        v = token_values(model, logits, self.value_id)  # (b, s)
        old, ret = batch["old_values"].to(v), batch["returns"].to(v)
        loss, clipped = clipped_value_loss(v, old, ret, valid, self.clip)
        with torch.no_grad():
            metrics = {"value_clip_fraction": clipped.float().sum(),
                       "value_error": (0.5 * (v.detach() - ret) ** 2 * valid).sum()}
        return LossParts(loss_sum=loss.sum(), count=valid.sum(), metrics=metrics)


def sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(b,) per-sequence KL: the per-token estimates summed over the response."""
    return torch.where(mask.bool(), kl, torch.zeros_like(kl)).sum(-1)


def check_ppo(p, log=None) -> None:
    """Refuse bad ppo.* values, naming the key (before any process group or engine exists)."""
    from megaseek.config.schema import ConfigError
    def bad(key, why):
        raise ConfigError(f"ppo.{key}={p.get(key)!r}: {why}")
    if str(p.kl_estimator) not in KL_ESTIMATORS:
        bad("kl_estimator", f"choose one of {list(KL_ESTIMATORS)}")
    if float(p.kl_coef) < 0:
        bad("kl_coef", "must be >= 0")
    if float(p.get("kl_target") or 0) < 0:
        bad("kl_target", "must be >= 0 (0 = fixed coefficient)")
    if float(p.kl_target or 0) > 0 and not float(p.kl_horizon) > 0:
        bad("kl_horizon", "must be > 0 with an adaptive coefficient")
    for k in ("gamma", "lam"):
        if not 0.0 <= float(p[k]) <= 1.0:
            bad(k, "must be in [0, 1]")
    if not 0.0 < float(p.clip) < 1.0:
        bad("clip", "must be in (0, 1)")
    if not float(p.value_clip) > 0:
        bad("value_clip", "must be > 0")
    if not float(p.temperature) > 0:
        bad("temperature", "must be > 0 (rollouts sample at it and log-probs are recomputed at it)")
    for k in ("epochs", "minibatches", "max_new_tokens"):
        if int(p[k]) < 1:
            bad(k, "must be >= 1")
    if float(p.missing_eos_penalty) < 0:
        bad("missing_eos_penalty", "must be >= 0")
    if int(p.keep_rollouts) < 0:
        bad("keep_rollouts", "must be >= 0 (0: keep every rollout; a resume needs the newest)")
