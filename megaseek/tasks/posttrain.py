"""What every post-training stage (SFT, reward model, DPO) shares: its command contract, the model it runs
(the init checkpoint's, vocabulary grown for the chat / stage tokens), the tokenizer it writes, and the
held-out hook.

    python launch/<stage>.py train.init_from=DIR data.train=FILE [data.valid=FILE] [overrides]

`prepare_stage` checks the contract before any process group or engine exists (one ConfigError naming the
key and the fix), reads the init checkpoint's tokenizer, adds the chat tokens (megaseek/data/chat.py) and the
stage's own special tokens, and replaces `cfg.model` by the checkpoint's model with vocab_size = the grown
tokenizer's size; the job then loads the weights (megaseek/ckpt/init_from.py: new rows = mean of old rows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class StageData:
    """The DataBundle-like object build_job's `data_fn` returns (train loader, held-out rows, tokenizer)."""
    train: Any
    valid: Optional[list]
    tokenizer_path: Path
    dataset_dir: Path


@dataclass
class Stage:
    cfg: Any          # the run config, cfg.model set to the init checkpoint's (grown) model
    tok: Any          # tokenizers.Tokenizer with the chat (+ stage) tokens
    ckpt: Path        # the init checkpoint directory
    train: Path       # data.train
    valid: Optional[Path]


def prepare_stage(cfg, stage: str, extra_tokens: Sequence[str] = (), pp_ok: bool = True) -> Stage:
    """Check `train.init_from` / `data.train` / `data.valid`, grow the tokenizer, set cfg.model (see module)."""
    from omegaconf import OmegaConf, open_dict
    from tokenizers import AddedToken, Tokenizer

    from megaseek.ckpt.init_from import InitFromError, init_model_config, resolve_init
    from megaseek.config.schema import ConfigError
    from megaseek.data.chat import add_chat_tokens
    init = cfg.train.get("init_from")
    if not init:
        raise ConfigError(f"{stage} needs train.init_from=DIR (a run or checkpoint directory to start from), e.g. "
                          f"python launch/{stage}.py train.init_from=runs/pretrain data.train=FILE")
    paths = {}
    for key in ("train", "valid"):
        v = cfg.data.get(key)
        if v in (None, "", "null"):
            if key == "train":
                raise ConfigError(f"{stage} needs data.train=FILE (JSON Lines; README, Post-training)")
            paths[key] = None
            continue
        p = Path(str(v)).expanduser().resolve()
        if not p.is_file():
            raise ConfigError(f"data.{key}={v}: no such file")
        paths[key] = p
    if not pp_ok and int(cfg.parallel.get("pp", 1)) > 1:
        raise ConfigError(f"{stage} runs with parallel.pp=1 (its objective reads whole sequences on one stage); "
                          f"use tensor / data parallelism")
    try:
        ckpt = resolve_init(init)
    except InitFromError as e:
        raise ConfigError(str(e)) from None
    if not (ckpt / "tokenizer.json").is_file():
        raise ConfigError(f"train.init_from={init}: {ckpt} has no tokenizer.json")
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    add_chat_tokens(tok)
    extra = [t for t in extra_tokens if tok.token_to_id(t) is None]
    if extra:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    try:
        mcfg = init_model_config(ckpt, tok.get_vocab_size())
    except InitFromError as e:
        raise ConfigError(str(e)) from None
    with open_dict(cfg):
        cfg.model = OmegaConf.create(mcfg.to_dict())
    return Stage(cfg=cfg, tok=tok, ckpt=ckpt, train=paths["train"], valid=paths["valid"])


def write_tokenizer(tok, run_dir: Path) -> Path:
    """run_dir/tokenizer.json (rank 0 writes; every checkpoint of the stage copies it)."""
    path = Path(run_dir) / "tokenizer.json"
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = path.with_name(path.name + ".tmp")
        tok.save(str(tmp))
        tmp.replace(path)
    if dist.is_initialized():
        dist.barrier()
    return path


class HeldOut:
    """The held-out hook of a stage (a Metrics extra): every `every` steps and at the end, the objective over
    held-out rows, split across data-parallel ranks in whole micro-batches (every rank the same number, so
    ZeRO-3's gathers stay in lockstep):

        val_loss = sum loss_sum / sum count,   val_<m> = sum metric_m / sum count   (over every dp rank)

    The tensor ranks of a group see the same rows; with pipeline stages (SFT only) the schedule's evaluation
    pass gives val_loss."""

    def __init__(self, runner, rows: Optional[list], plan, every: int, steps: int, max_rows: int = 0):
        from megaseek.data.chat import stack
        self.runner, self.every, self.steps = runner, int(every), int(steps)
        n = len(rows or [])
        if max_rows:
            n = min(n, max_rows)
        per_rank = (n // plan.dp) // plan.micro_batch * plan.micro_batch
        mine = range(plan.dp_rank * per_rank, (plan.dp_rank + 1) * per_rank)
        self.batches = [stack([rows[i] for i in mine[k:k + plan.micro_batch]])
                        for k in range(0, per_rank, plan.micro_batch)]
        self.dp = runner.groups.dp

    def due(self, step: int) -> bool:
        return bool(self.every) and bool(self.batches) and (step % self.every == 0 or step == self.steps)

    @torch.no_grad()
    def evaluate(self) -> dict:
        r = self.runner
        if r.stage.stages > 1:  # SFT through pipeline stages: the schedule's evaluation pass (the loss only)
            return {"val_loss": r.evaluate(self.batches)}
        sums: dict = {"__loss": 0.0, "__count": 0.0}
        was = r.engine.training
        r.engine.eval()
        for b in self.batches:
            b = {k: v.to(r.device) for k, v in b.items()}
            out = r.engine(b["input_ids"], position_ids=b.get("position_ids"), document_ids=b.get("document_ids"))
            parts = r.objective(r.module, out, b)
            sums["__loss"] += float(parts.loss_sum)
            sums["__count"] += float(parts.count)
            for k, v in parts.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        r.engine.train(was)
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        if self.dp.size > 1:
            dist.all_reduce(t, group=self.dp.group)
        tot = dict(zip(keys, t.tolist()))
        n = max(tot.pop("__count"), 1.0)
        out = {"val_loss": tot.pop("__loss") / n}
        out.update({f"val_{k}": v / n for k, v in tot.items()})
        return out

    def __call__(self, t) -> dict:
        if not self.due(t.step):
            return {}
        out = self.evaluate()
        if "val_ppl" not in out and self.runner.objective.name == "sft":
            out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
        return out


def row_loader(rows: list, plan, seed: int):
    """SFTLoader over `rows` that also passes the rows' extra tensors (reference log-probs, margins) to the
    stage that computes the loss, and names its position (`next_batch`) as the pretraining loader does."""
    from megaseek.data.chat import SFTLoader, stack

    class RowLoader(SFTLoader):
        def state_dict(self) -> dict:
            return dict(super().state_dict(), next_batch=self.next_batch)  # the trainer reads the data position

        def batches(self) -> list[dict]:
            out = super().batches()
            extra = sorted(set(self.rows[0]) - {"input_ids", "labels", "loss_mask", "position_ids", "document_ids"})
            if not extra or not self.plan.reads_labels:
                return out
            p, start = self.plan, self.consumed - self.plan.global_batch
            for m, b in enumerate(out):
                first = start + p.dp_rank * p.per_rank + m * p.micro_batch
                rows = [self._row(k) for k in range(first, first + p.micro_batch)]
                b.update(stack([{k: r[k] for k in extra} for r in rows]))
            return out

    return RowLoader(rows, plan, seed)


def run_stage(stage: Stage, objective, make_rows, log=print) -> dict:
    """Compose and run the stage's job: `make_rows(path, seq_len, log, run_dir=, split=) -> list of row dicts`
    for train and valid, loaded through SFTLoader (layout-free order: seed, epoch) and evaluated by HeldOut."""
    from megaseek.train.job import build_job
    holder = {}

    def data_fn(plan, seq_len, seed, run_dir, log0):
        rows = make_rows(stage.train, seq_len, log0, run_dir=run_dir, split="train")
        holder["valid"] = (make_rows(stage.valid, seq_len, log0, run_dir=run_dir, split="valid")
                           if stage.valid else None)
        return StageData(train=row_loader(rows, plan, seed), valid=holder["valid"],
                         tokenizer_path=write_tokenizer(stage.tok, run_dir), dataset_dir=stage.train.parent)

    def evaluation_fn(runner, plan, every, steps):
        return HeldOut(runner, holder["valid"], plan, every, steps,
                       max_rows=int(stage.cfg.train.eval_batches) * plan.global_batch)

    job = build_job(stage.cfg, objective, data_fn=data_fn, evaluation_fn=evaluation_fn)
    return job.run_job()
