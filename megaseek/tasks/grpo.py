"""GRPO / RLOO pieces: group advantages and the clipped policy-gradient objective on sampled responses.

Rewards of G responses sampled for one prompt form a group (a row of `rewards`, (n, G)):

    group_norm (GRPO):   A_i = (r_i - mean(r)) / (std(r) + eps)          std over the group (population)
    loo (RLOO):          A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j = G / (G - 1) * (r_i - mean(r))

A group whose rewards are all equal gives A = 0 exactly (r_i - mean = 0 in both, and 0 / (0 + eps) = 0):
no signal, and no NaN.

The objective (per response token t of sample i, ratio rho = exp(log pi - log pi_old)):

    loss_t = -min(rho A_i, clip(rho, 1 - c, 1 + c) A_i) + kl_coef * k3_t,
    k3_t = exp(log ref - log pi) - (log ref - log pi) - 1       (>= 0, the unbiased low-variance KL estimate)

summed over response tokens; count = response tokens, so the step divides by the global token count. Batches
hold the sampled rows (`input_ids`, `labels`, `loss_mask` on the response, `position_ids`, `document_ids`) and,
per token, `old_logps`, `ref_logps` and `advantages` (b, s). Log-probs are taken at the sampling temperature T
(log softmax(z / T)), as the rollout's old / reference log-probs are (megaseek/tasks/rollout.py).

The loop (`run`, launch/grpo.py) runs inside the ordinary trainer: the training loader `GRPOLoader` makes a
rollout every `steps_per_rollout` optimizer steps (grpo.prompts prompts x grpo.group_size samples, sampled by
the policy being trained, every rank its contiguous share of the prompts, gathered over data parallelism),
computes the rewards (reward.fn) and group advantages, then serves grpo.epochs shuffled passes of
train.global_batch_size rows. Each rollout is written to run_dir/rollouts/ so a run resumed mid-rollout
trains on the same rows.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megaseek.model.generate import SamplingConfig, generate
from megaseek.tasks.objective import LossParts, valid_tokens
from megaseek.tasks.rollout import (ROW_KEYS, PromptLine, Rollout, gather_rollout, load_reward_fn, read_prompt_lines,
                                    rollout, score, stop_ids)

MODES = ("group_norm", "loo")


def group_advantages(rewards: torch.Tensor, mode: str = "group_norm", eps: float = 1e-6) -> torch.Tensor:
    """(n, G) advantages of (n, G) rewards (see the module docstring), in float64 then cast back."""
    if mode not in MODES:
        raise ValueError(f"advantage mode {mode!r}: choose one of {list(MODES)}")
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (groups, G >= 2), got {tuple(rewards.shape)}: a group needs 2 samples")
    r = rewards.double()
    centred = r - r.mean(dim=1, keepdim=True)  # (n, G)
    if mode == "loo":
        g = r.shape[1]
        out = centred * (g / (g - 1))
    else:
        out = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return out.to(rewards.dtype)


class GRPOObjective:
    name = "grpo"

    def __init__(self, clip: float = 0.2, kl_coef: float = 0.0, temperature: float = 1.0):
        if not 0.0 < clip < 1.0:
            raise ValueError(f"clip={clip} must be in (0, 1)")
        if kl_coef < 0:
            raise ValueError(f"kl_coef={kl_coef} must be >= 0")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.clip, self.kl_coef, self.temperature = float(clip), float(kl_coef), float(temperature)

    def count(self, batch: dict) -> torch.Tensor:
        return valid_tokens(batch).sum()

    def __call__(self, model, logits: torch.Tensor, batch: dict) -> LossParts:
        valid = valid_tokens(batch).to(logits.device)  # (b, s)
        labels = batch["labels"].to(logits.device).masked_fill(~valid, 0)
        z = logits if self.temperature == 1.0 else logits.float() / self.temperature  # (b, s, V/tp)
        logp = -model.token_losses(z, labels)  # (b, s) fp32
        old = batch["old_logps"].to(logp)  # (b, s)
        adv = batch["advantages"].to(logp)  # (b, s): the sample's advantage on each of its tokens
        ratio = torch.exp((logp - old).masked_fill(~valid, 0.0))  # (b, s)
        surr = torch.minimum(ratio * adv, ratio.clamp(1.0 - self.clip, 1.0 + self.clip) * adv)  # (b, s)
        loss = -surr
        metrics = {"clip_fraction": (((ratio - 1.0).abs() > self.clip) & valid).float().sum().detach()}
        if "ref_logps" in batch:
            d = (batch["ref_logps"].to(logp) - logp).masked_fill(~valid, 0.0)  # log ref - log pi
            k3 = torch.exp(d) - d - 1.0  # (b, s) >= 0
            if self.kl_coef > 0:
                loss = loss + self.kl_coef * k3
            metrics["kl"] = (k3 * valid).sum().detach()
        return LossParts(loss_sum=(loss * valid).sum(), count=valid.sum(), metrics=metrics)


# --- the loop: configuration, the rollout loader, the held-out hook, the stage ------------------------------
def check_grpo(g, global_batch: int, dp: int, tp: int = 1, world: int = 1) -> dict:
    """The grpo section checked against the batch layout (one ConfigError naming the key and the fix);
    returns {prompts, rows, steps_per_rollout}."""
    from megaseek.config.schema import ConfigError
    G = int(g.group_size)
    if G < 2:
        raise ConfigError(f"grpo.group_size={G}: a group needs >= 2 samples of a prompt (advantages compare them)")
    if g.advantage not in MODES:
        raise ConfigError(f"grpo.advantage={g.advantage!r}: choose one of {list(MODES)}")
    if not 0.0 < float(g.clip) < 1.0:
        raise ConfigError(f"grpo.clip={g.clip} must be in (0, 1)")
    if float(g.kl_coef) < 0:
        raise ConfigError(f"grpo.kl_coef={g.kl_coef} must be >= 0")
    if not float(g.temperature) > 0:
        raise ConfigError(f"grpo.temperature={g.temperature}: sampling needs temperature > 0 (0 is greedy: every "
                          f"sample of a group would be equal)")
    if int(g.max_new_tokens) < 1 or int(g.epochs) < 1:
        raise ConfigError(f"grpo.max_new_tokens={g.max_new_tokens} and grpo.epochs={g.epochs} must be >= 1")
    prompts = int(g.prompts) or max(1, global_batch // G)
    rows = prompts * G
    if rows % global_batch:
        raise ConfigError(f"grpo.prompts={prompts} x grpo.group_size={G} = {rows} rollout rows: not a multiple of "
                          f"train.global_batch_size={global_batch}; set grpo.prompts to a multiple of "
                          f"{global_batch // math.gcd(global_batch, G)}")
    if prompts % dp:
        raise ConfigError(f"grpo.prompts={prompts}: not a multiple of the data-parallel degree {dp} (every rank "
                          f"samples the same number of prompts)")
    return {"prompts": prompts, "rows": rows, "steps_per_rollout": int(g.epochs) * rows // global_batch}


class GRPOLoader:
    """The training loader of the GRPO stage (the trainer's `batches` / `state_dict` / `load_state_dict`).

    Optimizer step n belongs to rollout k = n // S (S = steps_per_rollout), minibatch j = n % S. Rollout k
    takes prompts [k P, (k + 1) P) of an epoch order seeded by (seed, epoch) (P = grpo.prompts); prompt q gets
    samples q G .. q G + G - 1 (global sample indices, sampling seeded by (seed, k, index)); data-parallel rank
    r samples prompts [r P / D, (r + 1) P / D). Minibatch j: epoch e = j // (S / E) of a row order seeded by
    (seed, k, e); this rank takes its contiguous share of the minibatch, in micro-batches."""

    def __init__(self, lines: list, plan, seed: int, g, shape: dict, seq_len: int, tok, reward_fn, reward_spec,
                 run_dir, log=print):
        from megaseek.data.chat import ChatIds
        self.lines, self.plan, self.seed, self.g, self.shape = lines, plan, int(seed), g, shape
        self.seq_len, self.tok, self.reward_fn, self.reward_spec = seq_len, tok, reward_fn, reward_spec
        self.dir = Path(run_dir) / "rollouts"
        self.log, self.consumed, self.buffer, self.stats = log, 0, None, {}
        self.pad = ChatIds.of(tok).pad
        self.stop = tuple(stop_ids(tok))
        self.runner = self.ref = None

    def attach(self, runner, ref) -> None:
        """The policy (the runner's engine module) and the frozen reference, once the job has built them."""
        self.runner, self.ref = runner, ref

    # --- position ---
    @property
    def next_batch(self) -> int:
        return self.consumed // self.plan.global_batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed, "seed": self.seed, "prompts": len(self.lines),
                "next_batch": self.next_batch}

    def load_state_dict(self, sd: dict) -> None:
        from megaseek.data.chat import ChatDataError
        if int(sd.get("seed", self.seed)) != self.seed or int(sd.get("prompts", len(self.lines))) != len(self.lines):
            raise ChatDataError(f"cannot resume the GRPO loader: saved seed {sd.get('seed')} / {sd.get('prompts')} "
                                f"prompts, this run seed {self.seed} / {len(self.lines)}; resume with the same data")
        self.consumed, self.buffer = int(sd["consumed_samples"]), None

    # --- rollouts ---
    def _prompt(self, k: int) -> PromptLine:
        epoch, i = divmod(k, len(self.lines))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lines))
        return self.lines[int(order[i])]

    def _file(self, k: int) -> Path:
        return self.dir / f"rollout-{k:06d}.safetensors"

    def make_rollout(self, k: int) -> Rollout:
        """Rollout k on every rank (collective over the world): samples, rewards, advantages, gathered."""
        p, g, G = self.plan, self.g, int(self.g.group_size)
        P = self.shape["prompts"]
        share = P // p.dp
        first = k * P + p.dp_rank * share
        lines = [self._prompt(q) for q in range(first, first + share)]
        prompts = [ln.ids for ln in lines for _ in range(G)]
        ids = [(p.dp_rank * share + q) * G + j for q in range(share) for j in range(G)]
        cfg = SamplingConfig(max_new_tokens=int(g.max_new_tokens), temperature=float(g.temperature),
                             top_k=int(g.top_k), top_p=float(g.top_p), seed=self.seed, stop_tokens=self.stop)
        world = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
        r = rollout(self.runner.module, prompts, ids, cfg, step=k, seq_len=self.seq_len, pad_id=self.pad,
                    ref=self.ref, sync_group=world, chunk=self.plan.micro_batch)
        texts = [self.tok.decode(r.completion(i)) for i in range(len(r))]
        r.samples["rewards"] = score(self.reward_fn, self.reward_spec, texts, [ln.fields for ln in lines
                                                                               for _ in range(G)])
        r = gather_rollout(r, self.runner.groups.dp.group if p.dp > 1 else None)
        adv = group_advantages(r.samples["rewards"].view(-1, G), g.advantage).reshape(-1)  # (n,)
        r.samples["advantages"] = adv
        r.batch["advantages"] = adv.float()[:, None].expand(-1, self.seq_len).contiguous()  # (n, s)
        self.save(k, r)
        return r

    def save(self, k: int, r: Rollout) -> None:
        from safetensors.torch import save_file
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        t = {f"batch.{n}": v.contiguous() for n, v in r.batch.items()}
        t.update({f"samples.{n}": v.contiguous() for n, v in r.samples.items()})
        tmp = self._file(k).with_suffix(".tmp")
        save_file({n: (v.to(torch.uint8) if v.dtype == torch.bool else v) for n, v in t.items()}, str(tmp),
                  metadata={"bool": ",".join(n for n, v in t.items() if v.dtype == torch.bool)})
        tmp.replace(self._file(k))
        for old in sorted(self.dir.glob("rollout-*.safetensors"))[:-3]:  # the newest three (resume, rollback)
            old.unlink()

    def load(self, k: int) -> Rollout:
        from safetensors import safe_open
        path = self._file(k)
        if not path.is_file():
            from megaseek.data.chat import ChatDataError
            raise ChatDataError(f"resuming mid-rollout needs {path} (written when rollout {k} was sampled)")
        with safe_open(str(path), "pt") as f:
            bools = set(filter(None, (f.metadata() or {}).get("bool", "").split(",")))
            t = {n: (f.get_tensor(n).bool() if n in bools else f.get_tensor(n)) for n in f.keys()}
        return Rollout({n[6:]: v for n, v in t.items() if n.startswith("batch.")},
                       {n[8:]: v for n, v in t.items() if n.startswith("samples.")})

    def _stats(self, r: Rollout) -> dict:
        s = r.samples
        mask = r.batch["loss_mask"]
        k1 = ((r.batch["old_logps"] - r.batch["ref_logps"]) * mask).sum() / mask.sum().clamp(min=1)
        rew = s["rewards"].view(-1, int(self.g.group_size))
        return {"reward_mean": float(s["rewards"].mean()), "reward_std": float(s["rewards"].std(unbiased=False)),
                "response_length": float(s["lengths"].float().mean()), "eos_rate": float(s["eos"].float().mean()),
                "kl_ref": float(k1), "groups_all_equal": float((rew == rew[:, :1]).all(1).float().mean())}

    def batches(self) -> list[dict]:
        if self.runner is None:
            raise RuntimeError("GRPOLoader.batches before attach(runner, ref)")
        p, S = self.plan, self.shape["steps_per_rollout"]
        n = self.next_batch
        k, j = divmod(n, S)
        if self.buffer is None or self.buffer[0] != k:
            r = self.make_rollout(k) if j == 0 else self.load(k)  # mid-rollout (resumed): the saved rows
            self.buffer = (k, r)
            self.stats = self._stats(r)
        r = self.buffer[1]
        per_epoch = S // int(self.g.epochs)
        e, m = divmod(j, per_epoch)
        order = torch.from_numpy(np.random.default_rng([self.seed, k, e]).permutation(len(r)))
        mb = order[m * p.global_batch:(m + 1) * p.global_batch]
        mine = mb[p.dp_rank * p.per_rank:(p.dp_rank + 1) * p.per_rank]
        self.consumed += p.global_batch
        keys = ROW_KEYS + ("old_logps", "ref_logps", "advantages")
        return [{key: r.batch[key][mine[a:a + p.micro_batch]] for key in keys}
                for a in range(0, p.per_rank, p.micro_batch)]


class GRPOHeldOut:
    """The held-out hook (a Metrics extra): every `every` steps and at the end, greedy completions of the
    data.valid prompts (split over data-parallel ranks, equal shares, lockstep generation) scored by
    reward.fn: val_reward (= accuracy for a 0/1 reward), val_eos_rate, val_response_length; and the last
    rollout's statistics (reward_mean, reward_std, response_length, eos_rate, kl_ref, groups_all_equal) at
    every logged step."""

    def __init__(self, loader: GRPOLoader, lines: Optional[list], every: int, steps: int, max_lines: int):
        self.loader, self.every, self.steps = loader, int(every), int(steps)
        p = loader.plan
        lines = list(lines or [])[:max_lines or None]
        per = len(lines) // p.dp
        self.lines = lines[p.dp_rank * per:(p.dp_rank + 1) * per]

    def due(self, step: int) -> bool:
        return bool(self.every) and bool(self.lines) and (step % self.every == 0 or step == self.steps)

    @torch.no_grad()
    def evaluate(self) -> dict:
        ld = self.loader
        cfg = SamplingConfig(max_new_tokens=int(ld.g.max_new_tokens), temperature=0.0, stop_tokens=ld.stop)
        world = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
        outs = generate(ld.runner.module, [ln.ids for ln in self.lines], cfg, sync_group=world, pad_id=ld.pad)
        texts = [ld.tok.decode(o[:-1] if o and o[-1] in ld.stop else o) for o in outs]
        rew = score(ld.reward_fn, ld.reward_spec, texts, [ln.fields for ln in self.lines])
        t = torch.tensor([float(rew.sum()), float(sum(bool(o) and o[-1] in ld.stop for o in outs)),
                          float(sum(len(o) for o in outs)), float(len(outs))], dtype=torch.float64)
        if ld.plan.dp > 1:
            dist.all_reduce(t, group=ld.runner.groups.dp.group)
        n = max(float(t[3]), 1.0)
        return {"val_reward": float(t[0]) / n, "val_eos_rate": float(t[1]) / n, "val_response_length": float(t[2]) / n}

    def __call__(self, t) -> dict:
        out = dict(self.loader.stats)
        if self.due(t.step):
            out.update(self.evaluate())
        return out


def run(cfg) -> dict:
    """`python launch/grpo.py train.init_from=DIR data.train=FILE [data.valid=FILE] reward.fn=module:function`
    (every rank calls this)."""
    from megaseek.config.schema import validate
    from megaseek.distributed.env import world_size_from_env
    from megaseek.model.config import ModelConfig
    from megaseek.tasks.posttrain import StageData, prepare_stage, write_tokenizer
    from megaseek.train.job import build_job
    g = cfg.grpo
    spec = cfg.reward.get("fn")
    reward_fn = load_reward_fn(spec)
    stage = prepare_stage(cfg, "grpo", pp_ok=False)
    world = world_size_from_env()
    lay = validate(stage.cfg, world)
    shape = check_grpo(g, lay.global_batch, lay.dp)
    obj = GRPOObjective(float(g.clip), float(g.kl_coef), float(g.temperature))
    mcfg = ModelConfig.from_dict(dict(stage.cfg.model))
    holder: dict = {}

    def data_fn(plan, seq_len, seed, run_dir, log0):
        lines = read_prompt_lines(stage.train, stage.tok, seq_len, int(g.max_new_tokens), log0,
                                  key="grpo.max_new_tokens")
        valid = read_prompt_lines(stage.valid, stage.tok, seq_len, int(g.max_new_tokens), log0,
                                  key="grpo.max_new_tokens") if stage.valid else None
        holder["loader"] = GRPOLoader(lines, plan, seed, g, shape, seq_len, stage.tok, reward_fn, spec, run_dir,
                                      log0)
        holder["valid"] = valid
        log0(f"[grpo] {len(lines)} prompts; per rollout {shape['prompts']} prompts x {g.group_size} samples = "
             f"{shape['rows']} rows, {shape['steps_per_rollout']} optimizer steps ({g.epochs} epoch(s))")
        return StageData(train=holder["loader"], valid=valid, tokenizer_path=write_tokenizer(stage.tok, run_dir),
                         dataset_dir=stage.train.parent)

    def evaluation_fn(runner, plan, every, steps):
        from megaseek.tasks.rollout import reference_model
        ref = reference_model(mcfg, runner.groups, stage.ckpt).to(runner.device)
        holder["loader"].attach(runner, ref)
        return GRPOHeldOut(holder["loader"], holder["valid"], every, steps,
                           max_lines=int(stage.cfg.train.eval_batches) * plan.global_batch)

    job = build_job(stage.cfg, obj, data_fn=data_fn, evaluation_fn=evaluation_fn)
    return job.run_job()
