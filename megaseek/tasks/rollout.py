"""RL rollouts on the training engine: sample responses with the one KV-cached generator, then build the padded
training rows with the old policy's and the frozen reference's per-token log-probs (GRPO, PPO).

Sampling is keyed on (seed, step, global sample index), never on the layout: sample i of rollout `step` draws
from `row_generator(rollout_seed(seed, step), i)` (megaseek/model/generate.py), so a data-parallel split,
tensor degree or batch composition changes no draw. What a layout can change is the float rounding of the logits
(tensor-parallel reduction order; after training steps, Adam's amplification of gradient rounding where |g| ~ eps):
a token then differs only if its draw lands between the two layouts' CDF boundaries, P <= sum_v |dF_v| per draw
(`choose_tokens`; measured ~1e-5 per draw at tp=2 after 4 PPO steps, tests/test_ppo_layouts.py). Generation stops at a stop token (kept: the row learns to
end) or at `max_new_tokens`; nothing after the stop token is kept.

Row layout of sample i (prompt p of P tokens, response y of R tokens, right-padded to seq_len):

    input_ids     [ p_0 .. p_{P-1} y_0 .. y_{R-1} pad ... ]
    labels[t]     input_ids[t + 1] for t < P + R - 1, else -100
    loss_mask[t]  True for P - 1 <= t <= P + R - 2: the predicted token is a response token
    position_ids  0 .. P + R - 1 on real tokens (0 on padding), document_ids 0 real / -1 padding

The log-probs (b, s) of the sampled tokens are recomputed by a full forward at the SAMPLING temperature,

    logp[t] = log softmax(z_t / T)[labels[t]]       (0 outside loss_mask)

by the policy (`old_logps`) and by the frozen reference (`ref_logps`); top-k / top-p filtering is not applied
to them (as in OpenRLHF / verl). Lockstep: generation runs in lockstep over `sync_group` (ZeRO-3 gathers
parameters inside every forward), and the log-prob forwards are chunked with the chunk count made equal over
`sync_group` (a rank with fewer rows runs empty-result forwards), so a rank whose responses all end at the
first token and one whose responses run to the limit call forward the same number of times.

`gather_rollout` all-gathers every rank's rows over the data-parallel group (rank order = global sample
order when each rank holds a contiguous share), so minibatches and whole-batch statistics (advantages,
whitening) are computed on the global rollout, identically on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

ROW_KEYS = ("input_ids", "labels", "loss_mask", "position_ids", "document_ids")


def rollout_seed(seed: int, step: int) -> int:
    """The generator seed of rollout `step` (row streams are then keyed by the global sample index)."""
    return (int(seed) * 1_000_033 + int(step) + 1) % (2 ** 61)


@dataclass
class Rollout:
    """n sampled responses as training rows. `batch`: (n, s) tensors (ROW_KEYS + old_logps, ref_logps);
    `samples`: (n,) tensors: sample_ids (global index), prompt_lengths, lengths (response tokens, the stop
    token included), eos (ended by a stop token) and any per-sample value a caller adds (rewards, scores)."""
    batch: dict
    samples: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.batch["input_ids"].shape[0])

    def response(self, i: int) -> list[int]:
        """Sample i's response tokens (the stop token included when it ended with one)."""
        p, n = int(self.samples["prompt_lengths"][i]), int(self.samples["lengths"][i])
        return self.batch["input_ids"][i, p:p + n].tolist()

    def completion(self, i: int) -> list[int]:
        """Sample i's response without its stop token (what a reward reads as text)."""
        r = self.response(i)
        return r[:-1] if bool(self.samples["eos"][i]) else r

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout({k: v[idx] for k, v in self.batch.items()}, {k: v[idx] for k, v in self.samples.items()})

    def rows(self, idx: Sequence[int]) -> list[dict]:
        """Row dicts of (s,) tensors (batch keys only), e.g. for megaseek.data.chat.stack."""
        return [{k: v[int(i)] for k, v in self.batch.items()} for i in idx]


def response_rows(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], seq_len: int,
                  pad_id: int) -> dict:
    """(n, seq_len) training rows of prompt + response (see the module docstring)."""
    n = len(prompts)
    ids = torch.full((n, seq_len), int(pad_id), dtype=torch.long)
    labels = torch.full((n, seq_len), -100, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.bool)
    pos = torch.zeros((n, seq_len), dtype=torch.long)
    doc = torch.full((n, seq_len), -1, dtype=torch.long)
    for i, (p, y) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(y)
        if len(seq) > seq_len:
            raise ValueError(f"sample {i}: prompt ({len(p)}) + response ({len(y)}) exceeds seq_len {seq_len}")
        m = len(seq)
        ids[i, :m] = torch.tensor(seq)
        labels[i, :m - 1] = ids[i, 1:m]
        mask[i, len(p) - 1:m - 1] = True  # targets y_0 .. y_{R-1}
        pos[i, :m] = torch.arange(m)
        doc[i, :m] = 0
    return {"input_ids": ids, "labels": labels, "loss_mask": mask, "position_ids": pos, "document_ids": doc}


def _lockstep_count(n: int, group) -> int:
    if group is None or not dist.is_initialized():
        return n
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def _drop_aux(model) -> None:
    from megaseek.model.moe.balance import moe_layers
    for m in moe_layers(model):  # a rollout forward's balance loss must not reach the next training step
        m.take_aux_loss()


@torch.no_grad()
def token_logps(model, batch: dict, temperature: float, chunk: int = 8, sync_group=None) -> torch.Tensor:
    """(n, s) log-probs of `labels` under `model` at `temperature` (0 outside loss_mask & labels >= 0).

    Every tensor rank calls with the same rows; the vocab-parallel cross-entropy gives the full-vocabulary
    log-softmax from the sharded logits (b, s, V/tp). The number of forwards is the maximum over `sync_group`."""
    from megaseek.tasks.objective import valid_tokens
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: log-probs of sampled tokens need temperature > 0")
    device = model.rope_cos.device
    n = int(batch["input_ids"].shape[0])
    chunks = _lockstep_count((n + chunk - 1) // chunk, sync_group)
    out = []
    was = model.training
    model.eval()
    try:
        with model.ctx.no_sequence_parallel():
            for c in range(chunks):
                lo, hi = c * chunk, min(n, (c + 1) * chunk)
                b = {k: batch[k][lo:hi].to(device) for k in ROW_KEYS} if lo < n else \
                    {k: batch[k][:1].to(device) for k in ROW_KEYS}  # a lockstep forward; its result is unused
                z = model(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
                valid = valid_tokens(b)  # (b, s)
                logp = -model.token_losses(z.float() / temperature, b["labels"].masked_fill(~valid, 0))  # (b, s)
                if lo < n:
                    out.append((logp * valid).cpu())
    finally:
        model.train(was)
        _drop_aux(model)
    return torch.cat(out) if out else torch.zeros((0, batch["input_ids"].shape[1]))


@torch.no_grad()
def rollout(policy, prompts: Sequence[Sequence[int]], sample_ids: Sequence[int], sampling, *, step: int,
            seq_len: int, pad_id: int, ref=None, sync_group=None, chunk: int = 8) -> Rollout:
    """Sample one response per prompt (this rank's prompts; `sample_ids` their GLOBAL sample indices) with
    `sampling` (megaseek.model.generate.SamplingConfig: temperature > 0, top_k, top_p, stop_tokens,
    max_new_tokens, seed), seeded by rollout_seed(sampling.seed, step); then the training rows, `old_logps`
    under `policy` and `ref_logps` under `ref` (omitted when ref is None).

    `policy` / `ref`: Decoders at this run's tensor layout (the engine's module, ZeRO-3 partitioned or not);
    every tensor rank calls with the same prompts; every rank of `sync_group` calls (any number of prompts,
    also none)."""
    import dataclasses

    from megaseek.model.generate import generate
    if len(prompts) != len(sample_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(sample_ids)} sample ids")
    too_long = [i for i, p in enumerate(prompts) if len(p) + sampling.max_new_tokens > seq_len]
    if too_long:
        i = too_long[0]
        raise ValueError(f"prompt of sample {sample_ids[i]} ({len(prompts[i])} tokens) + max_new_tokens "
                         f"({sampling.max_new_tokens}) exceeds train.seq_len ({seq_len})")
    cfg = dataclasses.replace(sampling, seed=rollout_seed(sampling.seed, step))
    if prompts:
        responses = generate(policy, prompts, cfg, sync_group=sync_group, row_ids=list(sample_ids), pad_id=pad_id)
    else:  # nothing to sample here: keep the other ranks' lockstep with one-row forwards until they finish
        responses = []
        every = tuple(range(policy.cfg.vocab_size))  # the dummy row ends at its first token
        generate(policy, [[pad_id]], dataclasses.replace(cfg, max_new_tokens=min(cfg.max_new_tokens,
                 policy.cfg.max_seq_len - 1), stop_tokens=every), sync_group=sync_group, pad_id=pad_id)
    _drop_aux(policy)
    stop = set(int(t) for t in sampling.stop_tokens)
    batch = response_rows(prompts, responses, seq_len, pad_id)
    batch["old_logps"] = token_logps(policy, batch, cfg.temperature, chunk, sync_group)
    if ref is not None:
        batch["ref_logps"] = token_logps(ref, batch, cfg.temperature, chunk, sync_group)
    samples = {"sample_ids": torch.tensor(list(sample_ids), dtype=torch.long),
               "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
               "lengths": torch.tensor([len(y) for y in responses], dtype=torch.long),
               "eos": torch.tensor([bool(y) and int(y[-1]) in stop for y in responses], dtype=torch.bool)}
    return Rollout(batch, samples)


def gather_rollout(r: Rollout, group) -> Rollout:
    """Every rank's rows, concatenated in rank order over `group` (the data-parallel group); every rank of
    the group must hold the same number of samples (refused otherwise, before any gather of rows)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return r
    world = dist.get_world_size(group)
    n = torch.tensor([len(r)], dtype=torch.long)
    ns = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(ns, n, group=group)
    if len({int(x) for x in ns}) != 1:
        raise ValueError(f"gather_rollout: ranks hold {[int(x) for x in ns]} samples; every rank needs the same")

    def cat(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        src = t.to(torch.uint8) if t.dtype == torch.bool else t  # gloo has no bool all-gather
        if src is not t:
            parts = [torch.empty_like(src) for _ in range(world)]
        dist.all_gather(parts, src.contiguous(), group=group)
        out = torch.cat(parts)
        return out.bool() if t.dtype == torch.bool else out

    return Rollout({k: cat(v) for k, v in sorted(r.batch.items())}, {k: cat(v) for k, v in sorted(r.samples.items())})


def reference_model(model_cfg, groups, ckpt, seed: int = 0):
    """The frozen reference policy: a Decoder at this run's tensor layout (pp = 1, no DeepSpeed engine, no
    optimizer) holding `ckpt`'s weights (the init checkpoint; vocabulary grown as train.init_from grows it),
    this tensor rank's shard of each; requires_grad off, eval mode."""
    from megaseek.ckpt.init_from import init_weights
    import dataclasses

    from megaseek.ckpt.state import canonical_name, shard_for
    from megaseek.model.decoder import Decoder
    from megaseek.tensor_parallel.layers import TPContext
    if groups.pp.size > 1:
        raise ValueError("reference_model: pipeline stages are not supported (parallel.pp=1)")
    ref = Decoder(dataclasses.replace(model_cfg, fused=False), TPContext.from_axis(groups.tp, False), seed=seed)
    full = init_weights(ckpt, model_cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            c = canonical_name(ref, name)
            if c not in full:
                raise ValueError(f"reference_model: {ckpt} has no tensor {c}")
            p.copy_(shard_for(full[c].to(p.dtype), p, groups.tp, tuple(p.shape)))
            p.requires_grad_(False)
        for name, b in ref.named_buffers():
            c = canonical_name(ref, name)
            if c in full:
                b.copy_(full[c].to(b.dtype))
    return ref.eval()


# --- RL prompt lines and verifiable rewards (shared by GRPO and PPO) ---------------------------------------
@dataclass
class PromptLine:
    ids: list          # the prompt rendered with the chat template + the assistant marker
    fields: dict       # the line's other fields, passed to the reward
    where: str         # file:line


def read_prompt_lines(path, tok, seq_len: int, max_new_tokens: int, log=print, key: str = "max_new_tokens") -> list:
    """PromptLines of an RL prompt file: JSON Lines of {"prompt": str | messages, ...extra}. A string prompt is
    one user turn. Malformed lines are counted and reported once, never fatal; a prompt that leaves no room
    for `max_new_tokens` response tokens in `seq_len` is refused naming file:line and the keys to change."""
    from megaseek.data.chat import ChatDataError, encode_chat, read_jsonl
    from megaseek.tasks.preference import prompt_messages

    def parse(obj, where: str) -> PromptLine:
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), (str, list)):
            raise ValueError('expected {"prompt": str | messages, ...extra fields}')
        ids, _ = encode_chat(tok, prompt_messages(obj["prompt"]), add_generation_prompt=True)
        if len(ids) + max_new_tokens > seq_len:
            raise ChatDataError(f"{where}: prompt ({len(ids)} tokens) + {key} ({max_new_tokens}) exceeds "
                                f"train.seq_len ({seq_len}): no room for the response; raise train.seq_len, "
                                f"lower {key} or shorten the prompt")
        return PromptLine(ids, {k: v for k, v in obj.items() if k != "prompt"}, where)

    return read_jsonl(path, parse, kind="RL prompt", tag="prompts", log=log)[0]


def exact_match(completion: str, fields: dict) -> float:
    """A built-in verifiable reward: 1.0 when the completion (stripped) equals the line's "answer" field."""
    return float(completion.strip() == str(fields.get("answer", "")).strip())


def load_reward_fn(spec: str):
    """`reward.fn=module:function` -> the callable fn(completion: str, fields: dict) -> float (the current
    directory is importable, so a local my_rewards.py works). Refused with one message naming the key."""
    import importlib
    import os
    import sys

    from megaseek.config.schema import ConfigError
    if not spec or ":" not in str(spec):
        raise ConfigError(f"reward.fn={spec!r}: expected module:function, e.g. reward.fn=megaseek.tasks.rollout:"
                          f"exact_match (called as fn(completion_text, line_fields) -> float)")
    mod, _, name = str(spec).partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward.fn={spec}: cannot import it ({e})") from None
    if not callable(fn):
        raise ConfigError(f"reward.fn={spec}: not callable")
    return fn


def score(fn, spec: str, texts: Sequence[str], fields: Sequence[dict]) -> torch.Tensor:
    """(n,) float64 rewards fn(text, fields); a reward that raises or is not a finite number is named."""
    import math
    out = []
    for t, f in zip(texts, fields):
        try:
            v = float(fn(t, f))
        except Exception as e:  # the user's function: name it and the sample
            raise ValueError(f"reward.fn={spec} raised on completion {t!r}: {e!r}") from e
        if not math.isfinite(v):
            raise ValueError(f"reward.fn={spec} returned {v} on completion {t!r}: rewards must be finite")
        out.append(v)
    return torch.tensor(out, dtype=torch.float64)


def stop_ids(tok) -> list:
    """The stop tokens of a chat response: <|end|> and EOS (those the tokenizer has)."""
    from megaseek.data.chat import END_TOKEN, EOS_TOKEN
    return [i for i in (tok.token_to_id(END_TOKEN), tok.token_to_id(EOS_TOKEN)) if i is not None]
