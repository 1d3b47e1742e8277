"""DPO (launch/dpo.py) on "more 7s is better", run at tp = 2 on 2 ranks: the step-0 loss is ln 2 within 1e-6
(policy = reference; the reference log-probs come from a tp = 1 copy of the init checkpoint), held-out
implicit-reward accuracy >= 0.85 after training, the reference untouched (checkpoint checksums, log-probs
recomputed bitwise equal); prompt tokens excluded (bitwise); sigmoid and IPO losses equal TRL's DPOTrainer on
our HF export within 1e-5."""
import math

import pytest
import torch

from megaseek.data.chat import ChatIds, stack
from megaseek.tasks.dpo import DPOObjective, reference_logps, sequence_logps
from megaseek.tasks.preference import encode_pair, pair_row
from tests.posttrain_support import SEQ, count_pairs, init_checkpoint, launch, metrics, write_jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    init_checkpoint(d / "pre")
    train = write_jsonl(d / "train.jsonl", count_pairs(800, 1))
    valid = write_jsonl(d / "valid.jsonl", count_pairs(128, 2), bad=1)
    launch("dpo", [f"train.init_from={d / 'pre'}", f"data.train={train}", f"data.valid={valid}",
                   f"run_dir={d / 'dpo'}", "train.steps=24", "train.eval_interval=24", "train.eval_batches=8",
                   "dpo.beta=0.5", "parallel.tp=2"], nproc=2)
    return d


def test_dpo_tp2_ln2_at_step0_learns_and_leaves_the_reference(trained):
    from safetensors.torch import load_file

    from megaseek.ckpt import checkpoint as C
    from megaseek.ckpt.hf import load_model, model_config
    from megaseek.data.tokenizer import load_tokenizer
    from megaseek.tasks.preference import read_pairs
    d = trained
    recs = metrics(d / "dpo")
    first, final = recs[0], recs[-1]
    print(f"[dpo] step1 loss - ln2 = {first['loss'] - math.log(2):.2e}; val_accuracy={final['val_accuracy']:.3f} "
          f"val_margin={final['val_margin']:.3f}")
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert final["val_accuracy"] >= 0.85 and final["loss"] < first["loss"]
    # the reference: the init checkpoint is intact, and its log-probs recomputed now equal the cached ones bitwise
    ckpt = d / "pre" / "checkpoints" / "global_step0"
    assert C.verify(ckpt) is None
    out = d / "dpo" / "checkpoints" / "global_step24"
    tok = load_tokenizer(out / "tokenizer.json")
    cfg = model_config(out)
    rows = read_pairs(d / "valid.jsonl", tok, SEQ)
    cache = load_file(str(d / "dpo" / "reference_logps.safetensors"))
    key = next(k for k in cache if k.startswith("valid-"))
    again = reference_logps(ckpt, cfg, rows)
    assert torch.equal(again, cache[key])
    # teeth: the trained policy's log-probs moved away from the reference
    policy, _ = load_model(d / "dpo")
    b = stack(rows[:16])
    with torch.no_grad():
        z = policy(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
        lp, _ = sequence_logps(policy, z, b)
    assert (lp - cache[key][:16]).abs().max() > 0.1


def _setup(tmp_path):
    """A policy (init weights perturbed) and its reference (the init), as our models, checkpoints and HF exports."""
    from megaseek.ckpt.hf import export_hf, load_model
    from megaseek.ckpt.init_from import grow_rows
    from megaseek.data.chat import add_chat_tokens
    from megaseek.data.tokenizer import load_tokenizer
    from megaseek.model.decoder import Decoder
    from megaseek.tasks.sft import write_checkpoint
    from tests.posttrain_support import model_cfg
    ckpt = init_checkpoint(tmp_path / "pre", seed=13)
    tok = load_tokenizer(ckpt / "tokenizer.json")
    add_chat_tokens(tok)
    cfg = model_cfg(tok.get_vocab_size())
    src, _ = load_model(ckpt)
    ref = Decoder(cfg, seed=0)
    ref.load_state_dict(grow_rows(src.state_dict(), src.cfg.vocab_size, cfg.vocab_size))
    pol = Decoder(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    pol.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in ref.state_dict().items()})
    write_checkpoint(tmp_path / "ref", 0, cfg, ref.state_dict(), tok)
    write_checkpoint(tmp_path / "pol", 0, cfg, pol.state_dict(), tok)
    return tok, cfg, ref.eval(), pol.eval(), export_hf(tmp_path / "ref", tmp_path / "hf_ref"), \
        export_hf(tmp_path / "pol", tmp_path / "hf_pol")


def test_prompt_tokens_excluded_bitwise(tmp_path):
    tok, cfg, ref, pol, _, _ = _setup(tmp_path)
    pad = ChatIds.of(tok).pad
    b = stack([pair_row(*encode_pair(tok, x), SEQ, pad, "t") for x in count_pairs(8, 4)])
    obj = DPOObjective(beta=0.5)
    with torch.no_grad():
        zr = ref(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
        b["ref_logps"] = sequence_logps(ref, zr, b)[0]

    def loss_and_grads(batch):
        pol.zero_grad()
        parts = obj(pol, pol(batch["input_ids"], position_ids=batch["position_ids"],
                             document_ids=batch["document_ids"]), batch)
        parts.loss_sum.backward()
        return parts.loss_sum.detach(), [p.grad.clone() for p in pol.parameters()]

    l1, g1 = loss_and_grads(b)
    prompt = (b["labels"] >= 0) & ~b["loss_mask"]
    assert prompt.sum() >= 8 * 2 * 3  # every side has prompt targets
    l2, g2 = loss_and_grads(dict(b, labels=b["labels"].masked_fill(prompt, 7)))
    assert torch.equal(l1, l2) and all(torch.equal(a, c) for a, c in zip(g1, g2))
    # teeth: counted, the prompt moves each sequence's log-prob (in the loss it cancels: both sides share it)
    with torch.no_grad():
        z = pol(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
        resp, _ = sequence_logps(pol, z, b)
        full, _ = sequence_logps(pol, z, dict(b, loss_mask=b["labels"] >= 0))
    assert (resp - full).abs().min() > 1e-3


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_equals_trl(tmp_path, loss_type):
    """TRL's DPOTrainer.compute_loss (its tokenization of the same lines with our chat template, its reference
    forward) on our HF exports = our objective on our models."""
    from datasets import Dataset
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    tok, cfg, ref, pol, hf_ref, hf_pol = _setup(tmp_path)
    pad = ChatIds.of(tok).pad
    lines = count_pairs(6, 7)
    rows = [pair_row(*encode_pair(tok, x), SEQ, pad, "t") for x in lines]
    b = stack(rows)
    b["ref_logps"] = reference_logps(tmp_path / "ref" / "checkpoints" / "global_step0", cfg, rows)
    obj = DPOObjective(beta=0.3, loss=loss_type)
    with torch.no_grad():
        parts = obj(pol, pol(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"]), b)
    ours = float(parts.loss_sum / parts.count)

    hf_tok = PreTrainedTokenizerFast.from_pretrained(str(hf_pol))
    conv = [{"prompt": [{"role": "user", "content": x["prompt"]}],
             "chosen": [{"role": "assistant", "content": x["chosen"]}],
             "rejected": [{"role": "assistant", "content": x["rejected"]}]} for x in lines]
    trainer = DPOTrainer(model=LlamaForCausalLM.from_pretrained(str(hf_pol), torch_dtype=torch.float32),
                         ref_model=LlamaForCausalLM.from_pretrained(str(hf_ref), torch_dtype=torch.float32),
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=0.3,
                                        loss_type=[loss_type], per_device_train_batch_size=6, use_cpu=True,
                                        bf16=False),  # TRL defaults to bf16 autocast; we compare fp32
                         train_dataset=Dataset.from_list(conv), processing_class=hf_tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(conv))])
    trl_ids = [row[am.bool()].tolist() for row, am in zip(batch["input_ids"][:6], batch["attention_mask"][:6])]
    assert trl_ids == [r["input_ids"][r["document_ids"] == 0].tolist() for r in rows]  # the same sequences
    trainer.model.eval()
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, batch))
    print(f"[dpo] {loss_type}: ours={ours:.8f} trl={theirs:.8f}")
    assert abs(ours - theirs) < 1e-5 and abs(ours - math.log(2)) > 1e-3


def test_label_smoothing_equals_the_closed_form():
    """dpo.label_smoothing=e on a hand-built batch (two random tiny decoders as policy and reference) equals
    -(1-e) log s(beta h) - e log s(-beta h), h = (pi_c - pi_r) - (ref_c - ref_r) from per-token log-probs summed
    over each response by hand in float64; e = 0 is the plain sigmoid loss -log s(beta h)."""
    from megaseek.data.chat import add_chat_tokens
    from megaseek.model.decoder import Decoder
    from tests.posttrain_support import base_tokenizer, model_cfg
    tok = base_tokenizer()
    add_chat_tokens(tok)
    cfg = model_cfg(tok.get_vocab_size())
    pol, ref = Decoder(cfg, seed=1).eval(), Decoder(cfg, seed=2).eval()
    b = stack([pair_row(*encode_pair(tok, x), SEQ, ChatIds.of(tok).pad, "t") for x in count_pairs(6, 3)])

    def by_hand(model):  # (b, 2) float64 summed response log-probs of (chosen, rejected)
        with torch.no_grad():
            z = model(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
        lp = torch.log_softmax(z.double(), -1).gather(-1, b["labels"].clamp(min=0)[..., None])[..., 0]
        keep = b["loss_mask"] & (b["labels"] >= 0)
        return torch.stack([(lp * (keep & (b["document_ids"] == d))).sum(1) for d in (0, 1)], 1)

    p, r = by_hand(pol), by_hand(ref)
    h = (p[:, 0] - p[:, 1]) - (r[:, 0] - r[:, 1])  # (b,)
    assert h.abs().min() > 1e-2  # the two models disagree on every pair: the smoothing term matters
    b["ref_logps"] = r.float()
    beta, ls = 0.5, torch.nn.functional.logsigmoid
    with torch.no_grad():
        logits = pol(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
    got = {}
    for e in (0.0, 0.1, 0.3):
        parts = DPOObjective(beta=beta, label_smoothing=e)(pol, logits, b)
        got[e] = parts.loss_sum.double() / parts.count  # the step's loss: mean over the pairs
        want = (-(1 - e) * ls(beta * h) - e * ls(-beta * h)).mean()
        print(f"[dpo label_smoothing] e={e}: |ours - closed form| {abs(got[e] - want).item():.1e}")
        assert abs(got[e] - want) < 1e-6, (e, got[e], want)
    assert abs(got[0.0] - (-ls(beta * h)).mean()) < 1e-6
    assert abs(got[0.1] - got[0.0]) > 1e-3  # teeth: the smoothing changes the loss
