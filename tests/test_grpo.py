"""GRPO / RLOO pieces (megaseek/tasks/grpo.py): group-normalised and leave-one-out advantages equal a plain
reference loop (1e-6); an all-equal group gives advantage 0 and no NaN; the clipped objective at ratio 1 has
the policy gradient -sum A grad log pi (1e-6), clipped tokens give no gradient, and k3 is 0 at pi = ref."""
import math

import pytest
import torch

from megaseek.tasks.grpo import GRPOObjective, group_advantages


def _loop_reference(rewards, mode, eps=1e-6):
    out = []
    for row in rewards.tolist():
        g, mean = len(row), sum(row) / len(row)
        if mode == "loo":
            out.append([r - (sum(row) - r) / (g - 1) for r in row])
        else:
            std = math.sqrt(sum((r - mean) ** 2 for r in row) / g)
            out.append([(r - mean) / (std + eps) for r in row])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["group_norm", "loo"])
def test_advantages_equal_a_reference_and_equal_groups_give_zero(mode):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(6, 4, generator=g)
    rewards[1] = 0.7  # all equal
    rewards[2] = 0.0  # all zero
    rewards[3] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, mode)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[1], torch.zeros(4)) and torch.equal(adv[2], torch.zeros(4))
    assert (adv.double() - _loop_reference(rewards, mode)).abs().max() < 1e-6
    assert adv.sum(dim=1).abs().max() < 1e-6  # both are centred within the group
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(rewards[:, :1], mode)


def _tiny():
    from megaseek.model.config import ModelConfig
    from megaseek.model.decoder import Decoder
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=16, init_std=0.05)
    return Decoder(cfg, seed=1)


def _batch(m):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (4, 12), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], 1)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:, 5:11] = True  # the response
    with torch.no_grad():
        logp = -m.token_losses(m(ids), labels.clamp(min=0))
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])[:, None].expand(4, 12).clone()
    return {"input_ids": ids, "labels": labels, "loss_mask": mask, "old_logps": logp, "ref_logps": logp,
            "advantages": adv}


def _grads(m, fn):
    m.zero_grad()
    fn().backward()
    return [p.grad.clone() for p in m.parameters()]


def test_clipped_objective_is_the_policy_gradient_at_ratio_one():
    m = _tiny()
    b = _batch(m)
    obj = GRPOObjective(clip=0.2, kl_coef=0.1)
    parts = obj(m, m(b["input_ids"]), b)
    assert float(parts.metrics["kl"]) == 0.0 and float(parts.metrics["clip_fraction"]) == 0.0
    valid = b["loss_mask"]
    assert abs(float(parts.loss_sum) + float((b["advantages"] * valid).sum())) < 1e-5  # ratio 1, k3 0: -sum A

    def reference():
        logp = -m.token_losses(m(b["input_ids"]), b["labels"].clamp(min=0))
        return -(b["advantages"] * logp * valid).sum()
    ours = _grads(m, lambda: obj(m, m(b["input_ids"]), b).loss_sum)
    ref = _grads(m, reference)
    assert max(float((a - c).abs().max()) for a, c in zip(ours, ref)) < 1e-6
    # clipped: old log-probs far below (ratio >> 1 + clip) with A > 0 -> no gradient from those samples
    far = dict(b, old_logps=b["old_logps"] - 1.0, advantages=b["advantages"].clamp(min=0))
    parts = obj(m, m(b["input_ids"]), far)
    assert float(parts.metrics["clip_fraction"]) == float(valid.sum())  # ratio e > 1.2 on every response token
    g = _grads(m, lambda: GRPOObjective(0.2, 0.0)(m, m(b["input_ids"]), far).loss_sum)
    assert max(float(x.abs().max()) for x in g) == 0.0


# --- the stage: python launch/grpo.py train.init_from=DIR data.train=FILE data.valid=FILE reward.fn=... ----------
PAIRS = [(a, b) for a in range(5) for b in range(5)]
HELD_OUT = PAIRS[1::5] + PAIRS[3::5]  # 10 sums never prompted during GRPO; the other 15 are its prompts
GRPO_ARGS = ["train.global_batch_size=32", "train.micro_batch_size=16", "optimizer.lr=1e-3",
             "optimizer.warmup_steps=2", "reward.fn=megaseek.tasks.rollout:exact_match", "grpo.group_size=8",
             "grpo.max_new_tokens=4", "grpo.kl_coef=0.05"]


def _weak_sft(run_dir, steps: int = 100, noise: float = 0.9):
    """A weak SFT of "a+b=" (digits 0-4, all 25 sums) from a random tiny model: its data ends 90% of the answers
    with a stray " ok" (an imperfect SFT set), so the model knows the sums but its greedy answers are not exact."""
    import random

    from megaseek.data.chat import ChatIds, Example, add_chat_tokens, encode_chat, pack, stack
    from megaseek.model.decoder import Decoder
    from megaseek.tasks.sft import SFTObjective, write_checkpoint
    from tests.posttrain_support import SEQ, base_tokenizer, model_cfg
    tok = base_tokenizer()
    add_chat_tokens(tok)
    cfg = model_cfg(tok.get_vocab_size())
    rng = random.Random(0)
    exs = [Example(*encode_chat(tok, [{"role": "user", "content": f"{a}+{b}="},
                                      {"role": "assistant", "content": str(a + b) + (" ok" if rng.random() < noise
                                                                                     else "")}]), "sum")
           for a, b in PAIRS * 4]
    rows = pack(exs, SEQ, ChatIds.of(tok).pad)
    torch.manual_seed(0)
    m = Decoder(cfg, seed=5)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    g, obj = torch.Generator().manual_seed(0), SFTObjective()
    for _ in range(steps):
        b = stack([rows[int(i)] for i in torch.randint(0, len(rows), (8,), generator=g)])
        parts = obj(m, m(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"]), b)
        opt.zero_grad()
        (parts.loss_sum / parts.count).backward()
        opt.step()
    write_checkpoint(run_dir, steps, cfg, m.state_dict(), tok)
    return m.eval(), tok


def _greedy_accuracy(m, tok, pairs) -> float:
    from megaseek.data.chat import ChatIds, encode_chat
    from megaseek.model.generate import SamplingConfig, generate
    end = ChatIds.of(tok).end
    prompts = [encode_chat(tok, [{"role": "user", "content": f"{a}+{b}="}], add_generation_prompt=True)[0]
               for a, b in pairs]
    outs = generate(m, prompts, SamplingConfig(max_new_tokens=4, stop_tokens=(end,)))
    return sum(o[-1:] == [end] and tok.decode(o[:-1]) == str(a + b) for (a, b), o in zip(pairs, outs)) / len(pairs)


def _sum_lines(pairs):
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]


@pytest.mark.slow
def test_grpo_after_a_weak_sft_gains_held_out_accuracy(tmp_path):
    """GRPO on "a+b=" with the exact-match reward: the held-out greedy accuracy (sums never prompted in GRPO)
    gains >= 30 points over the weak SFT's; metrics.jsonl carries the rollout statistics; the checkpoint is what
    launch/generate.py reads. Bad input (no reward.fn; group_size 1) is refused naming the key."""
    from megaseek.ckpt.hf import load_model
    from tests.posttrain_support import launch, metrics, write_jsonl
    sft, tok = _weak_sft(tmp_path / "sft")
    before = _greedy_accuracy(sft, tok, HELD_OUT)
    train = write_jsonl(tmp_path / "train.jsonl", _sum_lines([p for p in PAIRS if p not in HELD_OUT]), bad=1)
    valid = write_jsonl(tmp_path / "valid.jsonl", _sum_lines(HELD_OUT))
    run = tmp_path / "grpo"
    out = launch("grpo", [f"train.init_from={tmp_path / 'sft'}", f"data.train={train}", f"data.valid={valid}",
                          f"run_dir={run}", "train.steps=20", "train.eval_interval=10", "train.eval_batches=1"]
                 + GRPO_ARGS)
    assert "1 bad line(s) skipped" in out
    recs = metrics(run)
    assert [r["step"] for r in recs] == list(range(1, 21))
    for k in ("reward_mean", "kl_ref", "grpo/kl", "response_length", "eos_rate", "grpo/clip_fraction"):
        assert all(math.isfinite(r[k]) for r in recs), k
    policy, _ = load_model(run)
    after = _greedy_accuracy(policy.eval(), tok, HELD_OUT)
    print(f"[grpo a+b] held-out greedy accuracy {before:.2f} -> {after:.2f} (val_reward {recs[-1]['val_reward']:.2f}); "
          f"rollout reward {recs[0]['reward_mean']:.3f} -> {recs[-1]['reward_mean']:.3f}, "
          f"eos rate {recs[0]['eos_rate']:.2f} -> {recs[-1]['eos_rate']:.2f}, kl_ref {recs[-1]['kl_ref']:.3f}")
    assert abs(recs[-1]["val_reward"] - after) < 1e-9  # the stage's held-out metric is this accuracy
    assert after - before >= 0.30
    assert recs[-1]["reward_mean"] > recs[0]["reward_mean"]


def test_grpo_bad_input_names_the_key(tmp_path):
    """No reward.fn, a group of 1, rollout rows that do not fill whole batches, a prompt with no room for the
    response: one message naming the key, exit 2, before any engine."""
    import subprocess
    import sys

    from tests.helpers import REPO
    from tests.posttrain_support import init_checkpoint, write_jsonl
    init_checkpoint(tmp_path / "pre")
    train = write_jsonl(tmp_path / "train.jsonl", _sum_lines(PAIRS))
    fn = "reward.fn=megaseek.tasks.rollout:exact_match"
    for extra, msg in (([], "reward.fn"), ([fn, "reward.fn=nosuchmodule:f"], "reward.fn=nosuchmodule:f"),
                       ([fn, "grpo.group_size=1"], "grpo.group_size"),
                       ([fn, "grpo.group_size=3", "grpo.prompts=5"], "grpo.prompts"),
                       ([fn, "grpo.max_new_tokens=30"], "grpo.max_new_tokens")):
        p = subprocess.run([sys.executable, "launch/grpo.py", f"train.init_from={tmp_path / 'pre'}",
                            f"data.train={train}", "train.seq_len=32", "train.global_batch_size=16",
                            "train.micro_batch_size=8", f"run_dir={tmp_path / 'run'}"] + extra,
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and msg in p.stderr, (extra, p.stderr[-2000:])


@pytest.mark.slow
def test_grpo_zero3_dp2_resumed_and_tp2_equal_one_process(tmp_path):
    """The same GRPO run (2 rollouts x 2 epochs = 4 steps) on 1 process at ZeRO-0, on 2 data-parallel ranks at
    ZeRO-3 stopped after step 3 (mid-rollout) and resumed, and at tp = 2: identical rollout tokens and rewards,
    log-probs within 1e-5, losses within 1e-5 (ZeRO-3 dp2; the resumed step 4 trains on the saved rollout) and
    1e-4 (tp2) on every step."""
    from safetensors.torch import load_file

    from tests.posttrain_support import launch, metrics, write_jsonl
    _weak_sft(tmp_path / "sft", steps=30, noise=0.5)
    train = write_jsonl(tmp_path / "train.jsonl", _sum_lines(PAIRS))
    args = [f"train.init_from={tmp_path / 'sft'}", f"data.train={train}", "reward.fn=megaseek.tasks.rollout:exact_match",
            "grpo.group_size=8", "grpo.prompts=2", "grpo.epochs=2", "grpo.max_new_tokens=4", "grpo.kl_coef=0.1",
            "grpo.temperature=0.9", "optimizer.lr=1e-3"]
    launch("grpo", args + [f"run_dir={tmp_path / 'one'}", "train.steps=4", "zero.stage=0"])
    two = tmp_path / "two"
    launch("grpo", args + [f"run_dir={two}", "train.steps=3", "zero.stage=3"], nproc=2)
    out = launch("grpo", args + [f"run_dir={two}", "train.steps=4", "zero.stage=3"], nproc=2)
    assert "resum" in out.lower()
    a, b = metrics(tmp_path / "one"), metrics(two)
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in b] == [1, 2, 3, 4]
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    print(f"[grpo layouts] losses 1 process {[round(r['loss'], 6) for r in a]}, |ZeRO-3 dp2 (resumed at 3) - 1 "
          f"process| max {max(diffs):.2e}")
    assert max(diffs) < 1e-5 and len({round(r["loss"], 6) for r in a}) > 1
    assert all(x["reward_mean"] == y["reward_mean"] and x["eos_rate"] == y["eos_rate"] for x, y in zip(a, b))
    tp = tmp_path / "tp2"  # tensor parallel: vocab-sharded logits gathered for sampling, sharded reference
    launch("grpo", args + [f"run_dir={tp}", "train.steps=4", "zero.stage=1", "parallel.tp=2"], nproc=2)
    c = metrics(tp)
    tp_diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, c))
    print(f"[grpo layouts] |tp2 - 1 process| loss max {tp_diff:.2e}")
    assert [r["step"] for r in c] == [1, 2, 3, 4] and tp_diff < 1e-4
    for k in (0, 1):
        ra = load_file(str(tmp_path / "one" / "rollouts" / f"rollout-{k:06d}.safetensors"))
        for other in (two, tp):
            rb = load_file(str(other / "rollouts" / f"rollout-{k:06d}.safetensors"))
            assert torch.equal(ra["batch.input_ids"], rb["batch.input_ids"]), other
            assert torch.equal(ra["samples.rewards"], rb["samples.rewards"])
            for key in ("batch.old_logps", "batch.ref_logps", "samples.advantages"):
                assert (ra[key] - rb[key]).abs().max() < 1e-5, (other, key)
