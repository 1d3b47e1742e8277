"""SFT: the chat template against transformers' apply_chat_template, the JSONL contract (bad lines counted,
unlearnable examples refused by name), assistant-only masking (bitwise), packing (= unpacked per example),
vocabulary growth, and a tiny model trained on "reverse the user's digit string" (user strings start with 7):
with masking it learns the answers but not the user's text; a full-loss control learns the 7."""
import json
import random

import pytest
import torch

from megaseek.data.chat import (CHAT_TEMPLATE, ChatDataError, ChatIds, Example, add_chat_tokens, encode_chat,
                                example_row, pack, read_sft_jsonl, stack)
from megaseek.data.tokenizer import train_bpe
from megaseek.model.config import ModelConfig
from megaseek.model.decoder import Decoder
from megaseek.model.generate import SamplingConfig, generate
from megaseek.tasks.sft import SFTObjective, grow_vocab, write_checkpoint

SEQ = 64


@pytest.fixture(scope="module")
def tok():
    t = train_bpe(["hello world, the quick brown fox 0123456789"] * 4, vocab_size=300)
    add_chat_tokens(t)
    return t


def _cfg(vocab):
    return ModelConfig(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, max_seq_len=SEQ, init_std=0.05)


CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the fox"}, {"role": "user", "content": "quick?"},
        {"role": "assistant", "content": "brown 42"}]


def test_chat_template_matches_transformers(tok):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE, pad_token="<|pad|>",
                                 eos_token="<|endoftext|>")
    ids, sup = encode_chat(tok, CONV)
    got = hf.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    assert list(got) == ids
    gen_ids, _ = encode_chat(tok, CONV[:2], add_generation_prompt=True)
    got = hf.apply_chat_template(CONV[:2], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(got) == gen_ids
    c = ChatIds.of(tok)
    assert c.pad != tok.token_to_id("<|endoftext|>") and gen_ids[-1] == c.roles["assistant"]
    # supervised = exactly the assistant contents and their <|end|> (multi-turn: both answers)
    text = [tok.decode(ids[i:i + 1], skip_special_tokens=False) for i in range(len(ids)) if sup[i]]
    assert "".join(text) == "the fox<|end|>brown 42<|end|>"


def test_jsonl_bad_lines_counted_and_unlearnable_refused_by_name(tok, tmp_path):
    p = tmp_path / "sft.jsonl"
    good = json.dumps({"messages": CONV[1:3]})
    p.write_text("\n".join([good, "{not json", json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
                            json.dumps({"prompt": "x"}), good]) + "\n")
    logs = []
    ex, rep = read_sft_jsonl(p, tok, 64, log=logs.append)
    assert rep.examples == 2 and rep.bad_lines == 3 and f"{p}:2" in rep.first_bad and logs
    assert [e.where for e in ex] == [f"{p}:1", f"{p}:5"]
    # truncation that leaves no assistant token: refused naming file:line
    user_only = len(encode_chat(tok, CONV[1:2])[0])
    with pytest.raises(ChatDataError, match=f"{p}:1: no assistant token"):
        read_sft_jsonl(p, tok, user_only + 1)
    q = tmp_path / "user_only.jsonl"
    q.write_text(json.dumps({"messages": CONV[1:2]}) + "\n")
    with pytest.raises(ChatDataError, match=f"{q}:1"):
        read_sft_jsonl(q, tok, 64)


def test_rl_prompt_jsonl_bad_lines_counted_and_too_long_refused_by_name(tok, tmp_path):
    """RL prompt files (megaseek/tasks/rollout.py::read_prompt_lines) share the JSONL reader: extra fields reach
    the reward, bad lines are counted, a prompt with no room for the response is refused naming file:line."""
    from megaseek.tasks.rollout import read_prompt_lines
    p = tmp_path / "rl.jsonl"
    p.write_text("\n".join([json.dumps({"prompt": "hello world", "answer": "42"}), "[1, 2]",
                            json.dumps({"prompt": 3}), json.dumps({"prompt": CONV[1:2]})]) + "\n")
    logs = []
    lines = read_prompt_lines(p, tok, 64, 8, log=logs.append)
    assert [x.where for x in lines] == [f"{p}:1", f"{p}:4"] and lines[0].fields == {"answer": "42"}
    assert lines[1].ids == encode_chat(tok, CONV[1:2], add_generation_prompt=True)[0]
    assert len(logs) == 1 and logs[0].startswith(f"[prompts] {p}: 2 bad line(s) skipped, first: {p}:2")
    with pytest.raises(ChatDataError, match=f"{p}:1: prompt .* exceeds train.seq_len"):
        read_prompt_lines(p, tok, 12, 8)


def test_generate_prompt_leaves_out_a_trailing_assistant_turn(tok):
    """launch/generate.py on SFT lines: the reference answer is not shown to the model."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_cli", "launch/generate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    want = encode_chat(tok, CONV[1:2], add_generation_prompt=True)[0]
    assert cli.encode_prompt(tok, {"messages": CONV[1:3]}, "f:1") == want
    assert cli.encode_prompt(tok, {"messages": CONV[1:2]}, "f:2") == want
    assert len(cli.encode_prompt(tok, {"messages": CONV[:4]}, "f:3")) > len(want)  # earlier turns stay
    with pytest.raises(ValueError, match="f:4: only an assistant turn"):
        cli.encode_prompt(tok, {"messages": CONV[2:3]}, "f:4")


def test_preference_jsonl_bad_lines_counted_and_unusable_refused_by_name(tok, tmp_path):
    """The same JSONL contract for preference pairs (one reader, megaseek/data/chat.py::read_jsonl)."""
    from megaseek.tasks.preference import read_pairs
    p = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "hello world", "chosen": "the fox", "rejected": "brown", "margin": 1.5})
    p.write_text("\n".join([good, "{not json", json.dumps({"prompt": "x", "chosen": "y"}),
                            json.dumps({"prompt": "x", "chosen": "y", "rejected": "z", "margin": "big"}),
                            "", good]) + "\n")
    logs = []
    rows = read_pairs(p, tok, 32, log=logs.append)
    assert len(rows) == 2 and float(rows[0]["margin"]) == 1.5
    assert logs == [f"[pairs] {p}: 3 bad line(s) skipped, first: {p}:2: " + logs[0].split(f"{p}:2: ", 1)[1]]
    with pytest.raises(ChatDataError, match="no such preference data file"):
        read_pairs(tmp_path / "missing.jsonl", tok, 32)
    long_prompt = json.dumps({"prompt": "hello world " * 40, "chosen": "the fox", "rejected": "brown"})
    (tmp_path / "long.jsonl").write_text(long_prompt + "\n")
    with pytest.raises(ChatDataError, match=f"{tmp_path / 'long.jsonl'}:1: no response token"):
        read_pairs(tmp_path / "long.jsonl", tok, 32)


def _grads(model, batch):
    model.zero_grad()
    obj = SFTObjective()
    out = model(batch["input_ids"], position_ids=batch.get("position_ids"), document_ids=batch.get("document_ids"))
    parts = obj(model, out, batch)
    (parts.loss_sum / parts.count).backward()
    return parts, {n: p.grad.clone() for n, p in model.named_parameters()}


def _examples(tok, n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 2)):
            u = "".join(rng.choice("0123456789 hello") for _ in range(rng.randint(2, 8)))
            a = "".join(rng.choice("0123456789 fox") for _ in range(rng.randint(1, 6)))
            turns += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        ids, sup = encode_chat(tok, turns)
        out.append(Example(ids, sup, f"mem:{i}"))
    return out


def test_user_labels_change_nothing_bitwise(tok):
    torch.manual_seed(0)
    m = Decoder(_cfg(tok.get_vocab_size()), seed=1)
    b = stack(pack(_examples(tok, 8), SEQ, ChatIds.of(tok).pad))
    p1, g1 = _grads(m, b)
    user = (b["labels"] >= 0) & ~b["loss_mask"]
    assert user.sum() > 10
    changed = dict(b, labels=b["labels"].masked_fill(user, 7))
    p2, g2 = _grads(m, changed)
    assert torch.equal(p1.loss_sum, p2.loss_sum) and int(p1.count) == int(p2.count)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    # teeth: the same change counted (a full-loss mask) moves the loss
    p3, _ = _grads(m, dict(changed, loss_mask=changed["labels"] >= 0))
    assert abs(float(p3.loss_sum.detach() / p3.count) - float(p1.loss_sum.detach() / p1.count)) > 1e-3


def test_packed_rows_equal_unpacked_per_example(tok):
    torch.manual_seed(0)
    m = Decoder(_cfg(tok.get_vocab_size()), seed=2)
    exs = _examples(tok, 10, seed=3)
    pad = ChatIds.of(tok).pad
    packed = pack(exs, SEQ, pad)
    assert len(packed) < len(exs) / 2  # several examples per row
    obj = SFTObjective()
    with torch.no_grad():
        b = stack(packed)
        z = m(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
        valid = b["loss_mask"] & (b["labels"] >= 0)
        ce = m.token_losses(z, b["labels"].masked_fill(~valid, 0)) * valid  # (b, s)
        per_packed = []
        for r in range(ce.shape[0]):
            for d in range(int(b["document_ids"][r].max()) + 1):
                sel = b["document_ids"][r] == d
                per_packed.append(float(ce[r][sel].sum() / valid[r][sel].sum()))
        per_alone = []
        for ex in exs:
            row = stack([example_row(ex, SEQ, pad)])
            parts = obj(m, m(row["input_ids"]), row)  # no document ids: a plain causal row
            per_alone.append(float(parts.loss_sum / parts.count))
    assert len(per_packed) == len(per_alone)
    assert max(abs(a - c) for a, c in zip(per_packed, per_alone)) < 1e-5
    # teeth: packing without document ids leaks across examples
    with torch.no_grad():
        zn = m(b["input_ids"], position_ids=b["position_ids"])
        cen = m.token_losses(zn, b["labels"].masked_fill(~valid, 0)) * valid
    assert (cen - ce).abs().max() > 1e-3


def test_grow_vocab_mean_rows():
    w = {"embed.weight": torch.randn(10, 4), "lm_head.weight": torch.randn(10, 4), "norm.weight": torch.ones(4)}
    g = grow_vocab(w, 10, 13)
    for n in ("embed.weight", "lm_head.weight"):
        assert g[n].shape == (13, 4) and torch.equal(g[n][:10], w[n])
        assert torch.allclose(g[n][10:], w[n].mean(0).expand(3, 4))
    assert g["norm.weight"] is w["norm.weight"]
    with pytest.raises(ValueError, match="shrink"):
        grow_vocab(w, 10, 9)


# --- the digit-reversal task -------------------------------------------------------------------------
def _digit_examples(tok, n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        u = "7" + "".join(rng.choice("0123456789") for _ in range(4))
        ids, sup = encode_chat(tok, [{"role": "user", "content": u}, {"role": "assistant", "content": u[::-1]}])
        out.append((u, Example(ids, sup, f"digits:{i}")))
    return out


def _train(tok, full_loss: bool, steps: int):
    torch.manual_seed(0)
    m = Decoder(_cfg(tok.get_vocab_size()), seed=5)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    pad, obj = ChatIds.of(tok).pad, SFTObjective()
    train = [e for _, e in _digit_examples(tok, 4000, seed=1)]
    rows = pack(train, SEQ, pad)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(rows), (16,), generator=g)
        b = stack([rows[int(i)] for i in idx])
        if full_loss:
            b["loss_mask"] = b["labels"] >= 0
        for q in opt.param_groups:
            q["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (1 - step / steps) + 1e-4
        z = m(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
        parts = obj(m, z, b)
        opt.zero_grad()
        (parts.loss_sum / parts.count).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    return m.eval()


def _p7_after_user(m, tok):
    c = ChatIds.of(tok)
    with torch.no_grad():
        z = m(torch.tensor([[c.roles["user"]]]))[0, -1, :m.cfg.vocab_size]
    return float(torch.softmax(z.float(), -1)[tok.token_to_id("7")])


@pytest.fixture(scope="module")
def trained(tok):
    return {"masked": _train(tok, False, 200), "full": _train(tok, True, 200)}


def test_digit_reversal_masked_learns_answers_not_user_text(tok, trained):
    m = trained["masked"]
    c = ChatIds.of(tok)
    held = _digit_examples(tok, 200, seed=99)
    prompts = [encode_chat(tok, [{"role": "user", "content": u}], add_generation_prompt=True)[0] for u, _ in held]
    outs = generate(m, prompts, SamplingConfig(max_new_tokens=8, stop_tokens=(c.end,)))
    ends = sum(o[-1:] == [c.end] for o in outs) / len(outs)
    exact = sum(o[-1:] == [c.end] and tok.decode(o[:-1]) == u[::-1] for (u, _), o in zip(held, outs)) / len(outs)
    p7 = _p7_after_user(m, tok)
    print(f"[sft digits] exact={exact:.3f} eos={ends:.3f} p7_masked={p7:.3f}")
    assert exact >= 0.95 and ends >= 0.98
    assert p7 < 0.3


def test_digit_reversal_full_loss_control_learns_the_7(tok, trained):
    p7 = _p7_after_user(trained["full"], tok)
    print(f"[sft digits] p7_full={p7:.3f}")
    assert p7 > 0.9


def test_generate_cli_on_the_sft_checkpoint(tok, trained, tmp_path):
    """launch/generate.py: chat lines get the template, plain prompts are tokenized as is; greedy = the model."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_cli", "launch/generate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    m = trained["masked"]
    ckpt = write_checkpoint(tmp_path / "run", 200, m.cfg, m.state_dict(), tok)
    held = [u for u, _ in _digit_examples(tok, 20, seed=7)]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps({"id": i, "messages": [{"role": "user", "content": u}]})
                             for i, u in enumerate(held)) + "\n" + json.dumps({"prompt": "hello"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli.main([f"checkpoint={tmp_path / 'run'}", f"prompts={src}", f"out={out}", "max_new_tokens=8",
                     "batch_size=7"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 21 and [r.get("id") for r in rows[:20]] == list(range(20))
    right = sum(r["completion"] == u[::-1] and r["finish_reason"] == "stop" for r, u in zip(rows, held))
    assert right >= 19, rows
    assert rows[20]["prompt"] == "hello" and "completion" in rows[20]
    # seeded sampling: the same seed gives the same lines at another batch size
    outs = []
    for bs in (3, 20):
        o = tmp_path / f"s{bs}.jsonl"
        assert cli.main([f"checkpoint={ckpt}", f"prompts={src}", f"out={o}", "max_new_tokens=8", "temperature=1.5",
                         "top_k=5", "top_p=0.9", "seed=3", f"batch_size={bs}"]) == 0
        outs.append(o.read_text())
    assert outs[0] == outs[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
    assert cli.main([f"checkpoint={ckpt}", f"prompts={bad}", f"out={out}"]) == 2


# --- the launch script: python launch/sft.py train.init_from=DIR data.train=FILE data.valid=FILE ----------
def test_sft_launch_from_a_checkpoint_end_to_end(tmp_path):
    """From a checkpoint whose tokenizer lacks the chat tokens: the stage grows the vocabulary (mean rows), its
    first-step loss equals the init model's loss on the first global batch computed here (1e-5), it writes
    metrics.jsonl (+ val_loss) and checkpoints that generate.py, evaluate.py and export_hf.py accept, and the HF
    export's apply_chat_template gives our ids. Bad input: one message naming the key, exit 2."""
    from megaseek.ckpt.hf import export_hf, load_weights, model_config
    from megaseek.data.loader import BatchPlan
    from megaseek.data.tokenizer import load_tokenizer
    from megaseek.tasks.posttrain import row_loader
    from megaseek.tasks.sft import sft_rows
    from tests.posttrain_support import SEQ as S, init_checkpoint, launch, metrics
    pre = init_checkpoint(tmp_path / "pre")
    tok_base = load_tokenizer(pre / "tokenizer.json")
    rng = random.Random(1)
    users = ["7" + "".join(rng.choice("0123456789") for _ in range(4)) for _ in range(300)]
    lines = [json.dumps({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": u[::-1]}]})
             for u in users]
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:260]) + "\n{broken\n")
    (tmp_path / "valid.jsonl").write_text("\n".join(lines[260:]) + "\n")
    run = tmp_path / "sft"
    out = launch("sft", [f"train.init_from={tmp_path / 'pre'}", f"data.train={tmp_path / 'train.jsonl'}",
                         f"data.valid={tmp_path / 'valid.jsonl'}", f"run_dir={run}", "train.steps=12",
                         "train.eval_interval=12", "train.eval_batches=2", "zero.stage=2"])
    assert "1 bad line(s) skipped" in out and "[init_from]" in out
    recs = metrics(run)
    assert [r["step"] for r in recs] == list(range(1, 13)) and "val_loss" in recs[-1]
    assert recs[-1]["loss"] < recs[0]["loss"]
    ckpt = run / "checkpoints" / "global_step12"
    tok = load_tokenizer(ckpt / "tokenizer.json")
    cfg = model_config(ckpt)
    assert tok_base.token_to_id("<|user|>") is None and tok_base.token_to_id("<|pad|>") is not None
    assert cfg.vocab_size == tok.get_vocab_size() == tok_base.get_vocab_size() + 4  # the 3 roles and <|end|>

    # the first step's loss = the init model (vocabulary grown with mean rows) on the first global batch
    w = load_weights(pre)
    for name in ("embed.weight", "lm_head.weight"):  # grown by hand: the new rows are the mean of the old ones
        w[name] = torch.cat([w[name], w[name].mean(0, keepdim=True).expand(4, -1)])
    m = Decoder(cfg, seed=0)
    m.load_state_dict(w)
    loader = row_loader(sft_rows(tok)(tmp_path / "train.jsonl", S, log=lambda *_: None), BatchPlan(16, 8, 1, 0),
                        seed=1234)
    obj, total, count = SFTObjective(), 0.0, 0.0
    with torch.no_grad():
        for b in loader.batches():
            parts = obj(m, m(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"]), b)
            total, count = total + float(parts.loss_sum), count + float(parts.count)
    print(f"[sft launch] step-1 loss {recs[0]['loss']:.7f}, init model here {total / count:.7f}")
    assert abs(recs[0]["loss"] - total / count) < 1e-5

    # the stage's checkpoint is what the tools read: generate (chat prompts), evaluate, export (with the template)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "71234"}]}) + "\n")
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_cli", "launch/generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main([f"checkpoint={run}", f"prompts={prompts}", f"out={tmp_path / 'o.jsonl'}",
                     "max_new_tokens=4"]) == 0
    assert "completion" in json.loads((tmp_path / "o.jsonl").read_text())
    from megaseek.ckpt.hf import evaluate_text
    assert evaluate_text(run, "71234 43217")["tokens"] > 0
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(export_hf(run, tmp_path / "hf")))
    msgs = [{"role": "user", "content": "71234"}, {"role": "assistant", "content": "43217"}]
    assert list(hf.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]) == encode_chat(tok, msgs)[0]

    # bad input: no data.train -> one message naming it, before any process group or engine
    from megaseek.config.schema import ConfigError
    from megaseek.tasks.posttrain import prepare_stage
    from tests.helpers import compose
    with pytest.raises(ConfigError, match="data.train=FILE"):
        prepare_stage(compose([f"train.init_from={tmp_path / 'pre'}"]), "sft")
    with pytest.raises(ConfigError, match="train.init_from"):
        prepare_stage(compose([f"data.train={tmp_path / 'train.jsonl'}"]), "sft")
