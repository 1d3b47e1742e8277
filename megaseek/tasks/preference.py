"""Preference pairs for the reward model and DPO: the JSONL contract, the pair row, per-document reads.

A line is {"prompt": str | messages, "chosen": str, "rejected": str} (+ optional "margin": float). A string
prompt is one user turn. Each side is rendered with the chat template as

    prompt_ids = encode_chat(prompt messages, add_generation_prompt=True)   (... <|assistant|>)
    side_ids   = prompt_ids + tokens(response) + [<|end|>]

and both sides are packed into ONE row of seq_len tokens as two documents (chosen = document 0, rejected =
document 1, each with its own position ids 0.., no attention between them; padding = document -1):

    input_ids     [ chosen side | rejected side | pad ... ]
    labels[t]     the next token of the same document (-100 at a document's last token and on padding)
    loss_mask[t]  the predicted token is a response token (its content or <|end|>): prompt tokens excluded

Malformed lines are counted and reported, never fatal; a side longer than seq_len // 2 is cut at its end,
and a pair left with no response token is refused naming file:line.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megaseek.data.chat import ChatDataError, ChatIds, check_messages, encode_chat, read_jsonl


def prompt_messages(prompt) -> list:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return check_messages({"messages": prompt})


def encode_pair(tok, obj: dict) -> tuple[list, list, list]:
    """(prompt ids, chosen response ids, rejected response ids), responses ending with <|end|>."""
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("chosen", "rejected")) \
            or not isinstance(obj.get("prompt"), (str, list)):
        raise ValueError('expected {"prompt": str | messages, "chosen": str, "rejected": str}')
    if "margin" in obj and not isinstance(obj["margin"], (int, float)):
        raise ValueError('"margin" must be a number')
    c = ChatIds.of(tok)
    prompt, _ = encode_chat(tok, prompt_messages(obj["prompt"]), add_generation_prompt=True)
    sides = [tok.encode(obj[k], add_special_tokens=False).ids + [c.end] for k in ("chosen", "rejected")]
    return prompt, sides[0], sides[1]


def pair_row(prompt: list, chosen: list, rejected: list, seq_len: int, pad_id: int, where: str) -> dict:
    """The packed row of one pair (see the module docstring); (seq_len,) tensors."""
    half = seq_len // 2
    ids = torch.full((seq_len,), pad_id, dtype=torch.long)
    lab = torch.full((seq_len,), -100, dtype=torch.long)
    mask = torch.zeros(seq_len, dtype=torch.bool)
    pos = torch.zeros(seq_len, dtype=torch.long)
    doc = torch.full((seq_len,), -1, dtype=torch.long)
    o = 0
    for d, resp in enumerate((chosen, rejected)):
        seq = (prompt + resp)[:half]
        n = len(seq)
        if n <= len(prompt):
            raise ChatDataError(f"{where}: no response token left after cutting each side to {half} tokens "
                                f"(train.seq_len // 2); raise train.seq_len or shorten the prompt")
        ids[o:o + n] = torch.tensor(seq)
        lab[o:o + n - 1] = torch.tensor(seq[1:])
        mask[o + len(prompt) - 1:o + n - 1] = True  # targets seq[len(prompt):]: the response
        pos[o:o + n] = torch.arange(n)
        doc[o:o + n] = d
        o += n
    return {"input_ids": ids, "labels": lab, "loss_mask": mask, "position_ids": pos, "document_ids": doc}


def read_pairs(path: str | Path, tok, seq_len: int, log=print) -> list[dict]:
    """Rows of a preference JSONL file (bad lines counted and reported once); each row also holds `margin` (())."""
    pad = ChatIds.of(tok).pad

    def parse(obj: dict, where: str) -> dict:
        p, c, r = encode_pair(tok, obj)
        row = pair_row(p, c, r, seq_len, pad, where)
        row["margin"] = torch.tensor(float(obj.get("margin", 0.0)))
        return row

    return read_jsonl(path, parse, kind="preference", tag="pairs", log=log)[0]


def last_index(document_ids: torch.Tensor, docs: int = 2) -> torch.Tensor:
    """(b, docs) position of each document's last token in rows of packed documents (b, s)."""
    s = document_ids.shape[-1]
    pos = torch.arange(s, device=document_ids.device).expand_as(document_ids)  # (b, s)
    return torch.stack([torch.where(document_ids == d, pos, -1).amax(-1) for d in range(docs)], -1)  # (b, docs)


def per_document_sum(values: torch.Tensor, document_ids: torch.Tensor, docs: int = 2) -> torch.Tensor:
    """(b, docs): sum_t values[b, t] over the positions of document d (values (b, s), already masked)."""
    return torch.stack([(values * (document_ids == d)).sum(-1) for d in range(docs)], -1)
