"""Supervised fine-tuning: next-token cross-entropy on assistant tokens only.

    loss_sum = sum_t m_t * CE(z_t, y_t),   count = sum_t m_t,   m_t = loss_mask_t and y_t >= 0

where loss_mask (megaseek/data/chat.py) marks the positions whose target is assistant content or its
end-of-turn. Labels outside the mask are replaced by 0 before the cross-entropy (NextTokenObjective), so
user / system labels change neither the loss nor any gradient, bit for bit. The step divides by the global
count, so every supervised token of the global batch weighs the same whatever the packing.

`grow_vocab` extends a checkpoint's weights to a tokenizer with added special tokens: each new embedding
(and untied head) row is the mean of the old rows, E_new[v] = (1/V_old) sum_u E_old[u].
"""
from __future__ import annotations

from pathlib import Path

import torch

from megaseek.tasks.pretrain import NextTokenObjective

VOCAB_TENSORS = ("embed.weight", "lm_head.weight")  # canonical (tp = 1) names with a vocabulary dimension 0


class SFTObjective(NextTokenObjective):
    name = "sft"

    def count(self, batch: dict) -> torch.Tensor:
        if "loss_mask" not in batch and "labels" in batch:
            raise ValueError("SFT batch without loss_mask: every token would be supervised")
        return super().count(batch)


def grow_vocab(weights: dict, old_vocab: int, new_vocab: int) -> dict:
    """Canonical full weights with the vocabulary rows grown from old_vocab to new_vocab (mean of old rows);
    the one implementation is megaseek/ckpt/init_from.py (train.init_from uses it)."""
    from megaseek.ckpt.init_from import grow_rows
    return grow_rows(weights, old_vocab, new_vocab)


def sft_rows(tok):
    """`make_rows` of the SFT stage: the JSONL file read (bad lines counted), then packed into seq_len rows."""
    from megaseek.data.chat import ChatIds, pack, read_sft_jsonl

    def make_rows(path, seq_len: int, log=print, **_) -> list:
        examples, _ = read_sft_jsonl(path, tok, seq_len, log=log)
        return pack(examples, seq_len, ChatIds.of(tok).pad)
    return make_rows


def run(cfg) -> dict:
    """`python launch/sft.py train.init_from=DIR data.train=FILE [data.valid=FILE]` (every rank calls this)."""
    from megaseek.tasks.posttrain import prepare_stage, run_stage
    stage = prepare_stage(cfg, "sft")
    return run_stage(stage, SFTObjective(), sft_rows(stage.tok))


def write_checkpoint(run_dir, step: int, cfg, weights: dict, tokenizer) -> Path:
    """A single-stage megaseek checkpoint (weights at tp = 1 + tokenizer.json + manifest) that
    launch/generate.py, launch/evaluate.py and launch/export_hf.py read; no optimizer state (an init point)."""
    from pathlib import Path

    from safetensors.torch import save_file

    from megaseek.ckpt import checkpoint as C
    run_dir = Path(run_dir)
    tmp = C.tmp_dir(run_dir, step)
    tmp.mkdir(parents=True, exist_ok=True)
    full = {k: v.detach().float().contiguous().cpu() for k, v in weights.items()}
    save_file(full, str(tmp / "weights-stage0.safetensors"), metadata={"format": C.FORMAT})
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "state.json").write_text("{}")
    return C.finalize(run_dir, step, {"layout": {"tp": 1, "pp": 1, "dp": 1, "world_size": 1},
                                      "model": cfg.to_dict(),
                                      "tensors": {k: "weights-stage0.safetensors" for k in full}}, keep=3)
