"""Reward model (launch/reward.py): on a computable score (the count of 7s in the response) the held-out pair
accuracy reaches 0.9 and the scores' Spearman correlation with the count 0.8; a score does not depend on the pad
side, the pad amount or the batch-mates (1e-5); the Bradley-Terry loss with margins equals TRL's RewardTrainer
on our HF export (LlamaForSequenceClassification, score = the <|reward|> row) within 1e-5; the reward and DPO
objectives at tp = 2 equal tp = 1 (loss and every gradient, 1e-5) with the reward row on either tensor rank."""
import random

import pytest
import torch

from megaseek.data.chat import ChatIds, stack
from megaseek.tasks.preference import encode_pair, pair_row
from megaseek.tasks.reward import REWARD_TOKEN, RewardObjective, hf_reward_model, score_sequences
from tests.posttrain_support import SEQ, count_pairs, init_checkpoint, launch, metrics, sevens, write_jsonl


def _scored(tok, n, seed):
    """(token sequences prompt + response, counts of 7) of n held-out single responses."""
    rng, seqs, counts = random.Random(seed), [], []
    for _ in range(n):
        s = sevens(rng)
        p, c, _ = encode_pair(tok, {"prompt": "count", "chosen": s, "rejected": s})
        seqs.append(p + c)
        counts.append(s.count("7"))
    return seqs, counts


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).statistic)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("reward")
    init_checkpoint(d / "pre")
    train = write_jsonl(d / "train.jsonl", count_pairs(1200, 1), bad=2)
    valid = write_jsonl(d / "valid.jsonl", count_pairs(128, 2))
    out = launch("reward", [f"train.init_from={d / 'pre'}", f"data.train={train}", f"data.valid={valid}",
                            f"run_dir={d / 'rm'}", "train.steps=24", "train.eval_interval=24", "train.eval_batches=8",
                            "reward.margin=0.5"])
    return d, out


def test_reward_model_learns_the_count(trained):
    from megaseek.ckpt.hf import load_model
    from megaseek.data.tokenizer import load_tokenizer
    d, out = trained
    assert "2 bad line(s) skipped" in out
    recs = metrics(d / "rm")
    assert [r["step"] for r in recs] == list(range(1, 25))
    final = recs[-1]
    print(f"[reward] val_accuracy={final['val_accuracy']:.3f} val_loss={final['val_loss']:.4f} "
          f"first loss={recs[0]['loss']:.4f}")
    assert final["val_accuracy"] >= 0.9 and "reward/accuracy" in final
    assert final["val_loss"] < recs[0]["loss"]
    model, _ = load_model(d / "rm")  # the stage's checkpoint: the grown tokenizer + weights, tp = 1
    tok = load_tokenizer(d / "rm" / "checkpoints" / "global_step24" / "tokenizer.json")
    rid, pad = tok.token_to_id(REWARD_TOKEN), ChatIds.of(tok).pad
    seqs, counts = _scored(tok, 200, seed=5)
    rho = _spearman(score_sequences(model, seqs, rid, pad).tolist(), counts)
    print(f"[reward] spearman={rho:.3f}")
    assert rho >= 0.8

    # invariance: alone, right / left padded, more padding, other batch-mates
    alone = torch.stack([score_sequences(model, [s], rid, pad)[0] for s in seqs[:8]])
    variants = {"right": score_sequences(model, seqs[:8], rid, pad, "right"),
                "left": score_sequences(model, seqs[:8], rid, pad, "left"),
                "left+pad": score_sequences(model, seqs[:8], rid, pad, "left", length=SEQ + 9),
                "mates": score_sequences(model, seqs[:8] + seqs[100:120], rid, pad, "right", length=SEQ)[:8]}
    worst = {k: float((v - alone).abs().max()) for k, v in variants.items()}
    print(f"[reward] invariance max |diff| {worst}")
    assert max(worst.values()) < 1e-5
    # teeth: without the document mask, padding leaks into the score
    ids = torch.full((1, SEQ), pad)
    ids[0, -len(seqs[0]):] = torch.tensor(seqs[0])
    with torch.no_grad():
        leaky = model(ids)[0, -1, rid]  # left padding attended, positions shifted
    assert abs(float(leaky) - float(alone[0])) > 1e-3


def test_reward_loss_equals_trl(tmp_path):
    """TRL's RewardTrainer.compute_loss (margins included) on our HF export = our objective on our model."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import RewardConfig, RewardTrainer

    from megaseek.ckpt.hf import export_hf, load_model
    from megaseek.ckpt.init_from import grow_rows
    from megaseek.data.chat import add_chat_tokens
    from megaseek.data.tokenizer import load_tokenizer
    from megaseek.model.decoder import Decoder
    from megaseek.tasks.sft import write_checkpoint
    from tests.posttrain_support import model_cfg
    ckpt = init_checkpoint(tmp_path / "pre", seed=11)
    tok = load_tokenizer(ckpt / "tokenizer.json")
    add_chat_tokens(tok)
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(REWARD_TOKEN, special=True, normalized=False)])
    cfg = model_cfg(tok.get_vocab_size())
    src, _ = load_model(ckpt)
    m = Decoder(cfg, seed=0)
    m.load_state_dict(grow_rows(src.state_dict(), src.cfg.vocab_size, cfg.vocab_size))
    with torch.no_grad():  # a reward row that is not the mean of the others: scores differ per sequence
        m.head_weight()[tok.token_to_id(REWARD_TOKEN)].normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    write_checkpoint(tmp_path / "rm", 1, cfg, m.state_dict(), tok)
    hf_dir = export_hf(tmp_path / "rm", tmp_path / "hf")
    rid, pad = tok.token_to_id(REWARD_TOKEN), ChatIds.of(tok).pad
    lines = count_pairs(6, seed=3)
    margins = [0.0, 0.3, -0.2, 1.0, 0.5, 0.1]
    for x, mg in zip(lines, margins):
        x["margin"] = mg

    # ours: the packed pair rows through the objective
    rows = [pair_row(*encode_pair(tok, x), SEQ, pad, "t") for x in lines]
    b = stack(rows)
    b["margin"] = torch.tensor(margins)
    obj = RewardObjective(rid, margin=0.0)
    with torch.no_grad():
        parts = obj(m.eval(), m(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"]), b)
    ours = float(parts.loss_sum / parts.count)

    # TRL: its own tokenization of the same lines (conversational: our chat template), collator and loss
    hf_tok = PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    assert hf_tok.chat_template  # the export carries the template
    conv = [{"prompt": [{"role": "user", "content": x["prompt"]}],
             "chosen": [{"role": "assistant", "content": x["chosen"]}],
             "rejected": [{"role": "assistant", "content": x["rejected"]}], "margin": x["margin"]} for x in lines]
    seq_model = hf_reward_model(hf_dir, rid)
    trainer = RewardTrainer(model=seq_model, args=RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[],
                                                               per_device_train_batch_size=6, use_cpu=True, bf16=False),
                            train_dataset=Dataset.from_list(conv), processing_class=hf_tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(conv))])
    trainer.model.eval()
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, batch))
    # the same token ids: TRL's chosen rows = our document 0
    ours_ids = [r["input_ids"][r["document_ids"] == 0].tolist() for r in rows]
    trl_ids = [row[am.bool()].tolist() for row, am in zip(batch["input_ids"][:6], batch["attention_mask"][:6])]
    assert trl_ids == ours_ids
    print(f"[reward] ours={ours:.8f} trl={theirs:.8f}")
    assert abs(ours - theirs) < 1e-5
    # teeth: without margins TRL's loss differs
    with torch.no_grad():
        plain = float(trainer.compute_loss(trainer.model, {k: v for k, v in batch.items() if k != "margin"}))
    assert abs(plain - theirs) > 1e-3


def _full_grad(p, ctx, vocab: int) -> torch.Tensor:
    from megaseek.tensor_parallel.layers import gather_full
    dim = getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None
    g = gather_full(p.grad, ctx, dim)
    return g[:vocab] if dim == 0 else g  # vocabulary padding stripped (a no-op for other dim-0 shards)


def _tp_case(rank, world):
    """Reward and DPO objectives at tp = 2 vs tp = 1 on the same rows: loss and every gradient."""
    import torch.distributed as dist

    from megaseek.data.chat import add_chat_tokens
    from megaseek.distributed.groups import ParallelGroups
    from megaseek.distributed.topology import Topology
    from megaseek.model.decoder import Decoder
    from megaseek.tasks.dpo import DPOObjective
    from megaseek.tensor_parallel.layers import TPContext
    from tests.helpers import init_gloo
    from tests.posttrain_support import base_tokenizer, model_cfg
    init_gloo(rank, world)
    groups = ParallelGroups.build(Topology(tp=world))
    tok = base_tokenizer()
    add_chat_tokens(tok)
    cfg = model_cfg(tok.get_vocab_size())
    pad = ChatIds.of(tok).pad
    b = stack([pair_row(*encode_pair(tok, x), SEQ, pad, "t") for x in count_pairs(4, 9)])
    b["margin"] = torch.tensor([0.0, 0.5, 1.0, -0.5])
    b["ref_logps"] = torch.tensor([[-40.0, -41.0], [-42.0, -39.0], [-45.0, -44.0], [-41.0, -41.5]])
    out = {}
    objectives = {"reward-last-row": RewardObjective(cfg.vocab_size - 1),  # the row on tensor rank 1
                  "reward-first-row": RewardObjective(3), "dpo": DPOObjective(beta=0.5)}
    for name, obj in objectives.items():
        res = []
        for ctx in (TPContext(), TPContext.from_axis(groups.tp)):
            m = Decoder(cfg, ctx, seed=3)
            parts = obj(m, m(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"]), b)
            (parts.loss_sum / parts.count).backward()
            grads = {n: _full_grad(p, ctx, cfg.vocab_size) for n, p in m.named_parameters()}
            res.append((float(parts.loss_sum / parts.count), grads))
        (l1, g1), (l2, g2) = res
        out[name] = {"loss": abs(l1 - l2), "grad": max(float((g1[n] - g2[n]).abs().max()) for n in g1),
                     "grad_scale": max(float(g1[n].abs().max()) for n in g1)}
    dist.barrier()
    return out


def test_reward_and_dpo_objectives_tp2_equal_tp1():
    from tests.helpers import run_world
    res = run_world(2, _tp_case)
    print(f"[reward/dpo tp2] {res[0]}")
    for r in res:
        for name, d in r.items():
            assert d["loss"] < 1e-5 and d["grad"] < 1e-5 and d["grad_scale"] > 1e-4, (name, d)
