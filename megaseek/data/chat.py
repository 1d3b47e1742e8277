"""Supervised fine-tuning data: the chat tokens, the chat template, the JSONL reader and packing.

A conversation is rendered as, per message,

    <|system|>content<|end|>   <|user|>content<|end|>   <|assistant|>content<|end|>

and a prompt for generation ends with `<|assistant|>` (`add_generation_prompt`). The role markers and
`<|end|>` (end of turn) are special tokens added to the checkpoint's tokenizer; PAD is `<|pad|>`, never EOS.
`CHAT_TEMPLATE` is the same rendering as Jinja, for tokenizer_config.json, so that transformers'
`apply_chat_template(messages)` gives exactly the ids of `encode_chat` (the special tokens split the text
first, so tokenizing the whole string = concatenating the tokenized pieces).

Supervision: labels are the next token; `loss_mask[t]` is true where the token being PREDICTED (ids[t+1])
is part of an assistant turn's content or its `<|end|>`, so the model learns the answers and to stop, never
the user's or system's text nor the role markers.

Packing: whole examples (never split) are placed greedily into rows of seq_len tokens; each keeps its own
position ids 0.. and a document id (padding: -1, no labels), so examples do not attend to each other.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {r: f"<|{r}|>" for r in ROLES}
END_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
CHAT_SPECIAL_TOKENS = [ROLE_TOKENS[r] for r in ROLES] + [END_TOKEN, PAD_TOKEN]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class ChatDataError(ValueError):
    """Unusable SFT data; the message names the file (and line)."""


def add_chat_tokens(tok) -> list[str]:
    """Add the role / end-of-turn / PAD special tokens a `tokenizers.Tokenizer` lacks (in place).
    Returns the tokens added; the new ids follow the old vocabulary (get_vocab_size() grows by that many)."""
    missing = [t for t in CHAT_SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        from tokenizers import AddedToken
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    if tok.token_to_id(EOS_TOKEN) is not None and tok.token_to_id(EOS_TOKEN) == tok.token_to_id(PAD_TOKEN):
        raise ChatDataError("tokenizer: PAD and EOS are the same token")
    return missing


@dataclass
class ChatIds:
    end: int
    pad: int
    roles: dict

    @classmethod
    def of(cls, tok) -> "ChatIds":
        ids = {t: tok.token_to_id(t) for t in CHAT_SPECIAL_TOKENS}
        lacking = [t for t, i in ids.items() if i is None]
        if lacking:
            raise ChatDataError(f"tokenizer lacks the chat tokens {lacking}: call add_chat_tokens first")
        return cls(end=ids[END_TOKEN], pad=ids[PAD_TOKEN], roles={r: ids[ROLE_TOKENS[r]] for r in ROLES})


def encode_chat(tok, messages: Sequence[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, supervised): the template's token ids and, per token, whether it is assistant content / its end."""
    c = ChatIds.of(tok)
    ids: list[int] = []
    sup: list[bool] = []
    for m in messages:
        body = tok.encode(m["content"], add_special_tokens=False).ids if m["content"] else []
        is_a = m["role"] == "assistant"
        ids += [c.roles[m["role"]]] + body + [c.end]
        sup += [False] + [is_a] * (len(body) + 1)
    if add_generation_prompt:
        ids.append(c.roles["assistant"])
        sup.append(False)
    return ids, sup


def check_messages(obj) -> list[dict]:
    """The messages of one JSONL record, or ValueError saying what is wrong."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise ValueError('expected {"messages": [{"role": ..., "content": ...}, ...]}')
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] needs role in {list(ROLES)} and a string content")
    return obj["messages"]


@dataclass
class Example:
    ids: list           # (n,) token ids
    supervised: list    # (n,) bool: the token is a target
    where: str          # file:line


@dataclass
class ReadReport:
    examples: int = 0
    bad_lines: int = 0
    truncated: int = 0
    first_bad: Optional[str] = None


def read_jsonl(path: str | Path, parse: Callable[[dict, str], object], *, kind: str, tag: str,
               report: Optional[ReadReport] = None, log=print) -> tuple[list, ReadReport]:
    """Rows `parse(obj, "file:line")` of a JSON Lines file of `kind` (named in errors). A line that is not JSON,
    or that `parse` rejects with a ValueError, is counted (the first one reported once, prefixed `[tag]`) and
    skipped, never fatal. A ChatDataError from `parse` is an example refused by name and is raised; so are a
    missing file and a file with no usable row."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: no such {kind} data file")
    rows, rep = [], report if report is not None else ReadReport()
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = parse(json.loads(line), where)
            except ChatDataError:
                raise
            except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
                rep.bad_lines += 1
                rep.first_bad = rep.first_bad or f"{where}: {e}"
                continue
            rows.append(row)
    rep.examples = len(rows)
    if rep.bad_lines:
        log(f"[{tag}] {path}: {rep.bad_lines} bad line(s) skipped, first: {rep.first_bad}")
    if not rows:
        raise ChatDataError(f"{path}: no usable {kind} example ({rep.bad_lines} bad lines)")
    return rows, rep


def read_sft_jsonl(path: str | Path, tok, max_len: int, log=print) -> tuple[list[Example], ReadReport]:
    """Examples of an SFT JSONL file, truncated to max_len tokens. Malformed lines are counted (and the first
    one reported), never fatal; an example left with no supervised target after truncation is refused by
    name (ChatDataError 'file:line')."""
    rep = ReadReport()

    def parse(obj, where: str) -> Example:
        ids, sup = encode_chat(tok, check_messages(obj))
        if len(ids) > max_len:
            ids, sup = ids[:max_len], sup[:max_len]
            rep.truncated += 1
        if not any(sup[1:]):  # targets are tokens 1.. (token 0 is never predicted)
            raise ChatDataError(f"{where}: no assistant token left to learn after truncation to {max_len} "
                                f"tokens; shorten the example, raise the sequence length or drop it")
        return Example(ids, sup, where)

    return read_jsonl(path, parse, kind="SFT", tag="sft", report=rep, log=log)


def example_row(ex: Example, seq_len: int, pad_id: int, doc: int = 0) -> dict:
    """One example alone in a row (the unpacked layout): see `pack`."""
    return pack([ex], seq_len, pad_id)[0]


def pack(examples: Sequence[Example], seq_len: int, pad_id: int) -> list[dict]:
    """Rows (dicts of (seq_len,) tensors) holding whole examples, first-fit in order.

    For an example of n tokens at offset o of its row: input_ids[o:o+n] = ids, position_ids = 0..n-1,
    document_ids = its index in the row, labels[o+t] = ids[t+1] for t < n-1 (the last token predicts
    nothing), loss_mask[o+t] = supervised[t+1]. Padding: pad_id, document -1, label -100, mask false."""
    rows, cur, used = [], [], 0
    for ex in examples:
        if len(ex.ids) > seq_len:
            raise ChatDataError(f"{ex.where}: {len(ex.ids)} tokens exceed seq_len {seq_len}")
        if used + len(ex.ids) > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(ex)
        used += len(ex.ids)
    if cur:
        rows.append(cur)
    out = []
    for row in rows:
        ids = np.full(seq_len, pad_id, np.int64)
        pos = np.zeros(seq_len, np.int64)
        doc = np.full(seq_len, -1, np.int64)
        lab = np.full(seq_len, -100, np.int64)
        mask = np.zeros(seq_len, bool)
        o = 0
        for d, ex in enumerate(row):
            n = len(ex.ids)
            ids[o:o + n] = ex.ids
            pos[o:o + n] = np.arange(n)
            doc[o:o + n] = d
            lab[o:o + n - 1] = ex.ids[1:]
            mask[o:o + n - 1] = ex.supervised[1:]
            o += n
        out.append({"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(lab),
                    "loss_mask": torch.from_numpy(mask), "position_ids": torch.from_numpy(pos),
                    "document_ids": torch.from_numpy(doc)})
    return out


def stack(rows: Sequence[dict]) -> dict:
    """A batch dict of (b, s) tensors from rows of (s,) tensors."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class SFTLoader:
    """The training loader of packed SFT rows, with the interface of the pretraining loader
    (`batches()`, `state_dict()`, `load_state_dict()`): global batch i holds rows [i*G, (i+1)*G) of an epoch
    order that is a permutation seeded by (seed, epoch); this rank takes its contiguous share, split into
    micro-batches. Pipeline stages get only what they read (inputs on the first, labels on the last)."""

    def __init__(self, rows: list[dict], plan, seed: int):
        if len(rows) < plan.global_batch:
            raise ChatDataError(f"{len(rows)} packed SFT rows cannot fill one global batch of {plan.global_batch}: "
                                f"use more data or a smaller train.global_batch_size")
        self.rows, self.plan, self.seed, self.consumed = rows, plan, int(seed), 0
        self.seq_len = int(rows[0]["input_ids"].shape[0])

    def _row(self, k: int) -> dict:
        epoch, i = divmod(k, len(self.rows))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        return self.rows[int(order[i])]

    def batches(self) -> list[dict]:
        p, start = self.plan, self.consumed
        self.consumed += p.global_batch
        out = []
        for m in range(p.grad_accum):
            first = start + p.dp_rank * p.per_rank + m * p.micro_batch
            b = stack([self._row(k) for k in range(first, first + p.micro_batch)])
            keep = {"position_ids", "document_ids"}
            keep |= {"input_ids"} if p.reads_inputs else set()
            keep |= {"labels", "loss_mask"} if p.reads_labels else set()
            out.append({k: v for k, v in b.items() if k in keep})
        return out

    @property
    def next_batch(self) -> int:
        return self.consumed // self.plan.global_batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed, "seed": self.seed, "rows": len(self.rows)}

    def load_state_dict(self, sd: dict) -> None:
        if int(sd.get("seed", self.seed)) != self.seed or int(sd.get("rows", len(self.rows))) != len(self.rows):
            raise ChatDataError(f"cannot resume the SFT loader: saved seed {sd.get('seed')} / {sd.get('rows')} rows, "
                                f"this run seed {self.seed} / {len(self.rows)} rows; resume with the same data and seed")
        self.consumed = int(sd["consumed_samples"])


class SFTValid:
    """Held-out packed rows with the interface the evaluation callback reads (`len`, `batch(ids)`)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, ids) -> dict:
        return stack([self.rows[int(i)] for i in ids])
