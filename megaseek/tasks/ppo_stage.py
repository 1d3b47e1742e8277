"""The PPO stage (launch/ppo.py): rollouts, scores, values, GAE and whitening inside the ordinary trainer.

    python launch/ppo.py train.init_from=DIR data.train=FILE [data.valid=FILE]
        (reward.fn=module:function | reward.model=DIR) [ppo.kl_coef=0.05 ppo.kl_estimator=k1 ...]

Pieces (every rank runs all of them, in lockstep over the world so ZeRO-3's gathers match):
  policy     the job's DeepSpeed engine (train.init_from), trained by the clipped ratio loss (PPOPolicyObjective)
  reference  a frozen tp-sharded copy of the init checkpoint (megaseek/tasks/rollout.py `reference_model`)
  critic     a second Decoder of the same architecture with its own DeepSpeed engine (same ZeRO stage, tensor
             layout and optimizer settings), value head = its `<|reward|>` output row read at every position
             (megaseek/tasks/ppo.py `token_values`); initialised from reward.model when given (the InstructGPT
             choice: the reward model's row already scores whole responses), else from train.init_from;
             trained on the same minibatches by the clipped value loss; checkpointed to run_dir/critic
  scorer     reward.fn(completion text, line fields) -> float, or the frozen reward model reward.model scoring
             prompt + response at its last token (megaseek/tasks/reward.py)

Schedule: optimizer step n belongs to rollout k = n // S, S = ppo.epochs * ppo.minibatches. Rollout k samples
R = ppo.minibatches * train.global_batch_size prompts (one response each) [k R, (k + 1) R) of an epoch order
seeded by (seed, epoch); data-parallel rank r samples its contiguous share [r R / D, (r + 1) R / D), with
global sample indices, so tokens do not depend on the layout. Per rank, on its own rows: scores (minus
ppo.missing_eos_penalty without EOS), per-token KL (ppo.kl_estimator), shaped rewards with the current beta,
critic values, GAE; the advantages are whitened with statistics all-reduced over the data-parallel group;
then the rows are gathered over data parallelism (rank order = global order) and epoch e serves minibatches
of a row order seeded by (seed, k, e). beta is updated after each rollout (ppo.kl_target > 0: adaptive).
Each rollout is written to run_dir/rollouts/ (the newest ppo.keep_rollouts kept; 0: all) so a run resumed
mid-rollout trains on the same rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megaseek.tasks import ppo as P
from megaseek.tasks.reward import REWARD_TOKEN

TRAIN_KEYS = ("old_logps", "advantages", "old_values", "returns")


def check_shape(p, global_batch: int, dp: int) -> dict:
    """{rows, steps_per_rollout} of the ppo section against the batch layout."""
    rows = int(p.minibatches) * int(global_batch)
    return {"rows": rows, "steps_per_rollout": int(p.epochs) * int(p.minibatches), "share": rows // dp}


@torch.no_grad()
def critic_values(critic, batch: dict, value_id: int, chunk: int, sync_group=None) -> torch.Tensor:
    """(n, s) V(s_t) of the rows (0 off the loss mask); forwards chunked, the chunk count equal over
    `sync_group` (a rank with fewer rows runs unused forwards: ZeRO-3 lockstep)."""
    from megaseek.tasks.objective import valid_tokens
    from megaseek.tasks.rollout import ROW_KEYS, _drop_aux, _lockstep_count
    device = critic.rope_cos.device
    n = int(batch["input_ids"].shape[0])
    chunks = _lockstep_count((n + chunk - 1) // chunk, sync_group)
    out, was = [], critic.training
    critic.eval()
    try:
        with critic.ctx.no_sequence_parallel():
            for c in range(chunks):
                lo, hi = c * chunk, min(n, (c + 1) * chunk)
                b = {k: batch[k][lo:hi].to(device) for k in ROW_KEYS} if lo < n else \
                    {k: batch[k][:1].to(device) for k in ROW_KEYS}
                z = critic(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
                v = P.token_values(critic, z, value_id)  # (b, s)
                if lo < n:
                    out.append((v * valid_tokens(b)).float().cpu())
    finally:
        critic.train(was)
        _drop_aux(critic)
    return torch.cat(out) if out else torch.zeros((0, batch["input_ids"].shape[1]))


class Scorer:
    """Sequence scores of a rollout: reward.fn on the completion text, or the frozen reward model's
    `<|reward|>` row at the last token of prompt + response (stop token included, as in its training pairs)."""

    def __init__(self, tok, fn=None, spec: Optional[str] = None, model=None, reward_id: Optional[int] = None,
                 pad_id: int = 0):
        self.tok, self.fn, self.spec, self.model, self.reward_id, self.pad = tok, fn, spec, model, reward_id, pad_id

    @torch.no_grad()
    def __call__(self, r, fields: list) -> torch.Tensor:
        from megaseek.tasks.rollout import score
        if self.fn is not None:
            texts = [self.tok.decode(r.completion(i)) for i in range(len(r))]
            return score(self.fn, self.spec, texts, fields)
        from megaseek.tasks.reward import score_sequences
        seqs = [r.batch["input_ids"][i, :int(r.samples["prompt_lengths"][i]) + int(r.samples["lengths"][i])].tolist()
                for i in range(len(r))]
        if not seqs:
            return torch.zeros(0, dtype=torch.float64)
        return score_sequences(self.model, seqs, self.reward_id, self.pad).double().cpu()


class PPOLoader:
    """The training loader of the PPO stage (the trainer's `batches` / `state_dict` / `load_state_dict`);
    see the module docstring for the schedule."""

    def __init__(self, lines: list, plan, seed: int, p, shape: dict, seq_len: int, tok, scorer: Scorer,
                 run_dir, log=print):
        from megaseek.data.chat import ChatIds
        from megaseek.tasks.rollout import stop_ids
        self.lines, self.plan, self.seed, self.p, self.shape = lines, plan, int(seed), p, shape
        self.seq_len, self.tok, self.scorer, self.log = seq_len, tok, scorer, log
        self.dir = Path(run_dir) / "rollouts"
        self.consumed, self.buffer, self.stats = 0, None, {}
        self.pad = ChatIds.of(tok).pad
        self.stop = tuple(stop_ids(tok))
        self.kl = P.KLController(float(p.kl_coef), float(p.kl_target or 0.0), float(p.kl_horizon))
        self.policy = self.critic = self.ref = self.groups = None
        self.value_id = tok.token_to_id(REWARD_TOKEN)

    def attach(self, policy_runner, critic_runner, ref) -> None:
        self.policy, self.critic, self.ref = policy_runner.module, critic_runner.module, ref
        self.groups = policy_runner.groups

    # --- position ---
    @property
    def next_batch(self) -> int:
        return self.consumed // self.plan.global_batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed, "seed": self.seed, "prompts": len(self.lines),
                "next_batch": self.next_batch, "kl_coef": self.kl.value}

    def load_state_dict(self, sd: dict) -> None:
        from megaseek.data.chat import ChatDataError
        if int(sd.get("seed", self.seed)) != self.seed or int(sd.get("prompts", len(self.lines))) != len(self.lines):
            raise ChatDataError(f"cannot resume the PPO loader: saved seed {sd.get('seed')} / {sd.get('prompts')} "
                                f"prompts, this run seed {self.seed} / {len(self.lines)}; resume with the same data")
        self.consumed, self.buffer = int(sd["consumed_samples"]), None
        self.kl.value = float(sd.get("kl_coef", self.kl.value))

    # --- rollouts ---
    def _prompt(self, q: int):
        epoch, i = divmod(q, len(self.lines))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lines))
        return self.lines[int(order[i])]

    def make_rollout(self, k: int):
        """Rollout k (collective over the world): samples, scores, values, GAE, whitening, gathered rows."""
        from megaseek.model.generate import SamplingConfig
        from megaseek.tasks.rollout import gather_rollout, rollout
        p, pl = self.p, self.plan
        share = self.shape["share"]
        first = k * self.shape["rows"] + pl.dp_rank * share
        lines = [self._prompt(q) for q in range(first, first + share)]
        ids = [pl.dp_rank * share + q for q in range(share)]
        cfg = SamplingConfig(max_new_tokens=int(p.max_new_tokens), temperature=float(p.temperature),
                             seed=self.seed, stop_tokens=self.stop)
        world = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
        dp = self.groups.dp.group if pl.dp > 1 else None
        r = rollout(self.policy, [ln.ids for ln in lines], ids, cfg, step=k, seq_len=self.seq_len, pad_id=self.pad,
                    ref=self.ref, sync_group=world, chunk=pl.micro_batch)
        b, s = r.batch, r.samples
        mask = b["loss_mask"]
        s["scores"] = self.scorer(r, [ln.fields for ln in lines])  # (n,) float64
        s["rewards"] = P.penalise_missing_eos(s["scores"], s["eos"], float(p.missing_eos_penalty))
        kl = torch.where(mask, P.kl_penalty(b["old_logps"], b["ref_logps"], str(p.kl_estimator)), 0.0)  # (n, s)
        s["kl"] = P.sequence_kl(kl, mask).double()
        s["kl_k1"] = P.sequence_kl(b["old_logps"] - b["ref_logps"], mask).double()
        s["kl_coef"] = torch.full((len(r),), self.kl.value, dtype=torch.float64)
        rewards = P.shaped_rewards(s["rewards"].float(), kl, mask, self.kl.value)  # (n, s)
        values = critic_values(self.critic, b, self.value_id, pl.micro_batch, world)  # (n, s)
        adv, ret = P.gae(rewards, values, mask, float(p.gamma), float(p.lam))
        b["advantages"] = P.whiten(adv, mask, group=dp)  # statistics of the whole global batch
        b["old_values"], b["returns"] = values, ret
        r = gather_rollout(r, dp)
        self.kl.update(float(r.samples["kl"].mean()), len(r))  # beta for the next rollout
        self.save(k, r)
        return r

    def _file(self, k: int) -> Path:
        return self.dir / f"rollout-{k:06d}.pt"

    def save(self, k: int, r) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._file(k).with_suffix(".tmp")
        torch.save({"batch": r.batch, "samples": r.samples}, tmp)
        tmp.replace(self._file(k))
        keep = int(self.p.keep_rollouts)
        for old in (sorted(self.dir.glob("rollout-*.pt"))[:-keep] if keep > 0 else []):
            old.unlink()

    def load(self, k: int):
        from megaseek.data.chat import ChatDataError
        from megaseek.tasks.rollout import Rollout
        path = self._file(k)
        if not path.is_file():
            raise ChatDataError(f"resuming mid-rollout needs {path} (written when rollout {k} was sampled)")
        d = torch.load(path, weights_only=True)
        return Rollout(d["batch"], d["samples"])

    def _stats(self, r) -> dict:
        s, n = r.samples, max(len(r), 1)
        return {"reward": float(s["rewards"].mean()), "score": float(s["scores"].mean()),
                "kl": float(s["kl"].mean()), "kl_k1": float(s["kl_k1"].mean()), "kl_coef": float(s["kl_coef"][0]),
                "response_length": float(s["lengths"].float().sum()) / n, "eos_rate": float(s["eos"].float().mean()),
                "advantage_abs": float(r.batch["advantages"].abs().sum() / r.batch["loss_mask"].sum().clamp(min=1))}

    def batches(self) -> list[dict]:
        from megaseek.tasks.rollout import ROW_KEYS
        if self.policy is None:
            raise RuntimeError("PPOLoader.batches before attach(policy, critic, reference)")
        pl, S = self.plan, self.shape["steps_per_rollout"]
        k, j = divmod(self.next_batch, S)
        if self.buffer is None or self.buffer[0] != k:
            r = self.make_rollout(k) if j == 0 else self.load(k)
            self.buffer = (k, r)
            self.stats = self._stats(r)
        r = self.buffer[1]
        e, m = divmod(j, int(self.p.minibatches))
        order = torch.from_numpy(np.random.default_rng([self.seed, k, e]).permutation(len(r)))
        mb = order[m * pl.global_batch:(m + 1) * pl.global_batch]
        mine = mb[pl.dp_rank * pl.per_rank:(pl.dp_rank + 1) * pl.per_rank]
        self.consumed += pl.global_batch
        return [{key: r.batch[key][mine[a:a + pl.micro_batch]] for key in ROW_KEYS + TRAIN_KEYS}
                for a in range(0, pl.per_rank, pl.micro_batch)]


class PPORunner:
    """The trainer's runner: one policy step and one critic step on the same minibatch; the record is the
    policy's (loss = the policy loss) plus value_loss, value_grad_norm and the critic's metrics."""

    def __init__(self, policy, critic):
        self.policy, self.critic = policy, critic

    def __getattr__(self, name):
        return getattr(self.__dict__["policy"], name)

    def train_step(self, batches: list, loss_hook=None) -> dict:
        out = self.policy.train_step(batches, loss_hook=loss_hook)
        c = self.critic.train_step(batches)
        out.update({k: v for k, v in c.items() if k.startswith("value/")})
        out["value_loss"], out["value_grad_norm"] = c["loss"], c["grad_norm"]
        return out


class PPOLog:
    """A Metrics extra: the last rollout's statistics at every logged step (reward, score, kl, kl_coef,
    response_length, eos_rate), and every `every` steps greedy held-out rewards of data.valid (val_reward)."""

    def __init__(self, loader: PPOLoader, lines: Optional[list], every: int, steps: int):
        self.loader, self.every, self.steps = loader, int(every), int(steps)
        pl = loader.plan
        lines = list(lines or [])
        per = len(lines) // pl.dp
        self.lines = lines[pl.dp_rank * per:(pl.dp_rank + 1) * per]

    @torch.no_grad()
    def evaluate(self) -> dict:
        from megaseek.model.generate import SamplingConfig, generate
        from megaseek.tasks.rollout import Rollout, response_rows
        ld = self.loader
        cfg = SamplingConfig(max_new_tokens=int(ld.p.max_new_tokens), temperature=0.0, stop_tokens=ld.stop)
        world = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
        prompts = [ln.ids for ln in self.lines]
        outs = generate(ld.policy, prompts, cfg, sync_group=world, pad_id=ld.pad)
        r = Rollout(response_rows(prompts, outs, ld.seq_len, ld.pad),
                    {"prompt_lengths": torch.tensor([len(x) for x in prompts]),
                     "lengths": torch.tensor([len(o) for o in outs]),
                     "eos": torch.tensor([bool(o) and o[-1] in ld.stop for o in outs], dtype=torch.bool)})
        sc = ld.scorer(r, [ln.fields for ln in self.lines])
        t = torch.tensor([float(sc.sum()), float(r.samples["eos"].sum()), float(len(outs))], dtype=torch.float64)
        if ld.plan.dp > 1:
            dist.all_reduce(t, group=ld.groups.dp.group)
        n = max(float(t[2]), 1.0)
        return {"val_reward": float(t[0]) / n, "val_eos_rate": float(t[1]) / n}

    def __call__(self, t) -> dict:
        out = dict(self.loader.stats)
        if self.every and self.lines and (t.step % self.every == 0 or t.step == self.steps):
            out.update(self.evaluate())
        return out


class CriticCheckpoints:
    """A callback: the critic's weights, Adam moments and lr schedule in run_dir/critic at the policy's
    checkpoint steps; on start, a resumed run (the policy restored at step n) restores the critic's step n."""

    def __init__(self, manager, engine, scheduler, save_every: int, log=print):
        self.m, self.engine, self.scheduler, self.every, self.log = manager, engine, scheduler, int(save_every), log

    def _save(self, step: int) -> None:
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        self.m.save(step, {"step": step, "scheduler": sched, "adam_step": self.m.optimizer_step_count()})

    def on_fit_start(self, t) -> None:
        if t.step == 0:
            return
        from megaseek.ckpt import checkpoint as C
        from megaseek.train.state import per_group_lists
        path = C.checkpoint_dir(self.m.run_dir) / C.tag_for(t.step)
        if not path.is_dir():
            raise RuntimeError(f"resume at step {t.step}: the critic has no checkpoint {path}")
        st = self.m.load(path)
        sched = self.scheduler.state_dict()
        sched.update(per_group_lists(st["scheduler"], len(self.scheduler.optimizer.param_groups)))
        self.scheduler.load_state_dict(sched)
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.engine.global_steps = int(st["step"])
        self.log(f"[ppo] critic restored from {path}")

    def on_step_end(self, t, out: dict) -> None:
        if not out.get("rolled_back") and not t.stopping and (t.step % self.every == 0 or t.step == t.steps):
            self._save(t.step)

    def on_stop(self, t, reason: str) -> None:
        self._save(t.step)

    def on_rollback(self, t, step: int) -> None: ...
    def on_train_end(self, t) -> None: ...
    def on_fit_end(self, t) -> None: ...


def critic_init_from_policy(ckpt: Path, mcfg, tok, value_id: int, run_dir: Path) -> Path:
    """run_dir/critic_init: the policy's init weights (vocabulary grown) with the value row `<|reward|>` of the
    output projection set to 0, so the critic starts at V = 0 everywhere (rank 0 writes, the others wait)."""
    from megaseek.ckpt.init_from import init_weights
    from megaseek.tasks.sft import write_checkpoint
    out = Path(run_dir) / "critic_init"
    if not dist.is_initialized() or dist.get_rank() == 0:
        w = init_weights(ckpt, mcfg)
        head = "embed.weight" if mcfg.tie_embeddings else "lm_head.weight"
        w[head] = w[head].clone()
        w[head][value_id] = 0.0
        write_checkpoint(out, 0, mcfg, w, tok)
    if dist.is_initialized():
        dist.barrier()
    return out


def build_critic(stage, job_cfg, runner, init_dir, value_objective):
    """(critic StepRunner, RunConfig, its lr scheduler): a Decoder stage + DeepSpeed engine at the run's layout,
    weights from `init_dir` (vocabulary grown like train.init_from)."""
    from megaseek.ckpt.init_from import load_init_weights
    from megaseek.ckpt.manager import CheckpointManager
    from megaseek.config.schema import validate
    from megaseek.config.sections import RunConfig
    from megaseek.distributed.env import log0, world_size_from_env
    from megaseek.engine.build import build_engine
    from megaseek.engine.stage import build_stage
    from megaseek.engine.step import StepRunner
    layout = validate(job_cfg, world_size_from_env())
    run = RunConfig.from_config(job_cfg)
    cstage = build_stage(run.model, runner.groups, seed=run.seed + 1, sequence_parallel=layout.sequence_parallel,
                         checkpointing=run.train.activation_checkpointing, partition_method=run.parallel.partition)
    engine, _, scheduler, _ = build_engine(cstage.model, job_cfg, layout, runner.groups)
    load_init_weights(init_dir, engine, runner.groups, run.model, log=log0)
    crunner = StepRunner(engine, cstage, runner.groups, value_objective, micro_batch=layout.micro_batch,
                         seq_len=layout.seq_len, zero_stage=run.zero.stage, device=runner.device)
    return crunner, run, scheduler


def run(cfg) -> dict:
    """`python launch/ppo.py train.init_from=DIR data.train=FILE ...` (every rank calls this)."""
    from megaseek.config.schema import ConfigError, validate
    from megaseek.distributed.env import log0, world_size_from_env
    from megaseek.model.config import ModelConfig
    from megaseek.tasks.posttrain import StageData, prepare_stage, write_tokenizer
    from megaseek.tasks.rollout import load_reward_fn, read_prompt_lines, reference_model
    from megaseek.train.job import build_job
    p = cfg.ppo
    P.check_ppo(p)
    spec, rm_dir = cfg.reward.get("fn"), cfg.reward.get("model")
    if bool(spec) == bool(rm_dir):
        raise ConfigError("ppo needs exactly one reward: reward.fn=module:function (a verifiable reward) or "
                          "reward.model=DIR (a reward-model run / checkpoint from launch/reward.py)")
    reward_fn = load_reward_fn(spec) if spec else None
    rm_ckpt = None
    if rm_dir:
        from megaseek.ckpt.init_from import InitFromError, resolve_init
        try:
            rm_ckpt = resolve_init(rm_dir)
        except InitFromError as e:
            raise ConfigError(f"reward.model={rm_dir}: {e}") from None
    stage = prepare_stage(cfg, "ppo", extra_tokens=(REWARD_TOKEN,), pp_ok=False)
    lay = validate(stage.cfg, world_size_from_env())
    shape = check_shape(p, lay.global_batch, lay.dp)
    mcfg = ModelConfig.from_dict(dict(stage.cfg.model))
    if rm_ckpt is not None:
        from megaseek.ckpt.checkpoint import read_manifest
        rm_model = ModelConfig.from_dict(dict(read_manifest(rm_ckpt)["model"], fused=mcfg.fused))
        if rm_model != mcfg:
            raise ConfigError(f"reward.model={rm_dir}: its model ({rm_model.vocab_size} tokens, hidden "
                              f"{rm_model.hidden_size}, {rm_model.num_layers} layers) differs from the policy's "
                              f"({mcfg.vocab_size}, {mcfg.hidden_size}, {mcfg.num_layers}); the critic starts "
                              f"from it, so train the reward model from the same init (launch/reward.py "
                              f"train.init_from=<the policy's init>)")
    holder: dict = {}

    def data_fn(plan, seq_len, seed, run_dir, log):
        key = "ppo.max_new_tokens"
        lines = read_prompt_lines(stage.train, stage.tok, seq_len, int(p.max_new_tokens), log, key=key)
        holder["valid"] = read_prompt_lines(stage.valid, stage.tok, seq_len, int(p.max_new_tokens), log, key=key) \
            if stage.valid else None
        from megaseek.data.chat import ChatIds
        scorer = Scorer(stage.tok, reward_fn, spec, reward_id=stage.tok.token_to_id(REWARD_TOKEN),
                        pad_id=ChatIds.of(stage.tok).pad)
        holder["loader"] = PPOLoader(lines, plan, seed, p, shape, seq_len, stage.tok, scorer, run_dir, log)
        log(f"[ppo] {len(lines)} prompts; per rollout {shape['rows']} samples, {shape['steps_per_rollout']} "
            f"optimizer steps ({p.epochs} epoch(s) x {p.minibatches} minibatch(es)); critic from "
            f"{rm_ckpt or stage.ckpt}; reward {'reward.fn=' + str(spec) if spec else 'reward.model=' + str(rm_ckpt)}")
        return StageData(train=holder["loader"], valid=holder["valid"],
                         tokenizer_path=write_tokenizer(stage.tok, run_dir), dataset_dir=stage.train.parent)

    def evaluation_fn(runner, plan, every, steps):
        ld = holder["loader"]
        ref = reference_model(mcfg, runner.groups, stage.ckpt).to(runner.device)
        if rm_ckpt is not None:
            ld.scorer.model = reference_model(mcfg, runner.groups, rm_ckpt).to(runner.device)
        vobj = P.PPOValueObjective(ld.value_id, float(p.value_clip))
        init = rm_ckpt or critic_init_from_policy(stage.ckpt, mcfg, stage.tok, ld.value_id, ld.dir.parent)
        crunner, run, sched = build_critic(stage, stage.cfg, runner, init, vobj)
        holder["critic"], holder["run"], holder["sched"] = crunner, run, sched
        ld.attach(runner, crunner, ref)
        return PPOLog(ld, holder["valid"], every, steps)

    obj = P.PPOPolicyObjective(float(p.clip), float(p.temperature))
    job = build_job(stage.cfg, obj, data_fn=data_fn, evaluation_fn=evaluation_fn)
    from megaseek.ckpt.manager import CheckpointManager
    crunner = holder["critic"]
    manager = CheckpointManager(job.run_dir / "critic", crunner.engine, job.groups, holder["run"].model,
                                job.run_dir / "tokenizer.json", keep=int(holder["run"].train.ckpt_keep), log=log0)
    job.trainer.runner = PPORunner(job.trainer.runner, crunner)
    job.trainer.callbacks.insert(1, CriticCheckpoints(manager, crunner.engine, holder["sched"],
                                                      holder["run"].train.save_interval, log0))
    return job.run_job()
