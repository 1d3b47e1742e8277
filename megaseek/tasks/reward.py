"""Reward model: a scalar head on the decoder, read at the last real token, trained with Bradley-Terry.

The scalar head is the output row of a dedicated special token `<|reward|>` (index k): with the final norm
output x_t (h,), the score is

    r(x) = w_k . x_T,        w_k = row k of the output projection (h,),  T = the sequence's last real token,

i.e. a linear h -> 1 head that needs no new parameter kind: it is sharded with the vocabulary at any tensor
degree (the row lives on one tensor rank; the score is all-reduced over the tensor group, backward the
identity), saved, resumed and grown (a new row = mean of the old ones) like the embedding. The HF export of a
reward model is LlamaForSequenceClassification with score.weight = that row (`hf_reward_model`).

Loss over pairs (chosen c, rejected r) with margin m = reward.margin + the pair's "margin":

    loss_sum = sum_pairs -log sigmoid(r_c - r_r - m),    count = pairs,    accuracy = mean [r_c > r_r]

Scores are read per document from the packed pair rows (megaseek/tasks/preference.py), so a score depends
only on its own sequence: not on the padding, its side, or the rows beside it (`score_sequences`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megaseek.tasks.objective import LossParts
from megaseek.tasks.preference import last_index

REWARD_TOKEN = "<|reward|>"


def reward_logits(model, logits: torch.Tensor, reward_id: int) -> torch.Tensor:
    """(b, s) the reward-row logit at every position, on every tensor rank, from vocab-sharded logits."""
    from megaseek.tensor_parallel.mappings import reduce_from_region
    local = reward_id - model.vocab_start
    if 0 <= local < logits.shape[-1]:
        z = logits[..., local].float()  # (b, s)
    else:
        z = logits[..., 0].float() * 0.0  # (b, s): another rank holds the row; zeros in the graph, so the
        # backward of the all-reduce runs on every tensor rank alike
    return reduce_from_region(z, model.ctx.group) if model.ctx.size > 1 else z


class RewardObjective:
    name = "reward"

    def __init__(self, reward_id: int, margin: float = 0.0):
        self.reward_id, self.margin = int(reward_id), float(margin)

    def count(self, batch: dict) -> torch.Tensor:
        return torch.tensor(float(batch["document_ids"].shape[0]))

    def scores(self, model, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """(b, 2) scores of (chosen, rejected) at each document's last token."""
        z = reward_logits(model, logits, self.reward_id)  # (b, s)
        idx = last_index(batch["document_ids"].to(z.device))  # (b, 2)
        return z.gather(1, idx)  # (b, 2)

    def __call__(self, model, logits: torch.Tensor, batch: dict) -> LossParts:
        r = self.scores(model, logits, batch)  # (b, 2)
        diff = r[:, 0] - r[:, 1]  # (b,)
        m = self.margin + batch["margin"].to(diff) if "margin" in batch else torch.full_like(diff, self.margin)
        loss = -F.logsigmoid(diff - m)  # (b,)
        return LossParts(loss_sum=loss.sum(), count=torch.tensor(float(diff.shape[0])),
                         metrics={"accuracy": (diff > 0).float().sum().detach(),
                                  "margin": diff.sum().detach(), "chosen": r[:, 0].sum().detach()})


@torch.no_grad()
def score_sequences(model, seqs: Sequence[Sequence[int]], reward_id: int, pad_id: int, pad_side: str = "right",
                    length: Optional[int] = None) -> torch.Tensor:
    """(n,) scores of token sequences batched with padding on `pad_side` to `length` (default the longest):
    each sequence keeps position ids 0..n-1 and its own document id, padding is document -1."""
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side={pad_side!r}: left or right")
    L = length or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    pos = torch.zeros((len(seqs), L), dtype=torch.long)
    doc = torch.full((len(seqs), L), -1, dtype=torch.long)
    last = []
    for i, s in enumerate(seqs):
        o = 0 if pad_side == "right" else L - len(s)
        ids[i, o:o + len(s)] = torch.tensor(list(s))
        pos[i, o:o + len(s)] = torch.arange(len(s))
        doc[i, o:o + len(s)] = 0
        last.append(o + len(s) - 1)
    z = reward_logits(model, model(ids, position_ids=pos, document_ids=doc), reward_id)  # (n, L)
    return z[torch.arange(len(seqs)), torch.tensor(last)]


def hf_reward_model(hf_dir, reward_id: int):
    """A transformers LlamaForSequenceClassification (num_labels 1) from our HF export of a reward model:
    the decoder weights as they are, score.weight = the `<|reward|>` row of lm_head (tied: of the embedding)."""
    from transformers import AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification
    causal = LlamaForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(str(hf_dir))
    cfg.num_labels = 1
    seq = LlamaForSequenceClassification(cfg).float()
    seq.model.load_state_dict(causal.model.state_dict())
    with torch.no_grad():
        seq.score.weight.copy_(causal.lm_head.weight[reward_id:reward_id + 1])
    return seq.eval()


def reward_rows(tok):
    """`make_rows` of the reward stage: preference pairs packed as two documents per row."""
    from megaseek.tasks.preference import read_pairs

    def make_rows(path, seq_len: int, log=print, **_) -> list:
        return read_pairs(path, tok, seq_len, log=log)
    return make_rows


def run(cfg) -> dict:
    """`python launch/reward.py train.init_from=DIR data.train=FILE [data.valid=FILE]` (every rank calls this)."""
    from megaseek.tasks.posttrain import prepare_stage, run_stage
    stage = prepare_stage(cfg, "reward", extra_tokens=(REWARD_TOKEN,), pp_ok=False)
    obj = RewardObjective(stage.tok.token_to_id(REWARD_TOKEN), margin=float(cfg.reward.margin))
    return run_stage(stage, obj, reward_rows(stage.tok))
