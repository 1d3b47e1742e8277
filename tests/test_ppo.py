"""PPO end to end (launch/ppo.py): on a computable reward (the fraction of 7s in the completion, about 0.1 after
a short SFT on uniform digit strings) the reward reaches >= 0.4, while the exact KL to the reference of the
beta = 0.2 run stays <= half of the beta = 0 run's; under a length-rewarding variant the missing-EOS penalty keeps
the EOS rate >= 0.9 while without it the rate falls below 0.5; metrics.jsonl holds every logged quantity; bad
input is refused by name. Layout equality of the same runs: tests/test_ppo_layouts.py."""
import random
import subprocess
import sys

import pytest
import torch

from tests.posttrain_support import REPO, STAGE_ARGS, base_tokenizer, launch, metrics, model_cfg, write_jsonl

# KL-regularised optimum of "fraction of 7s" over n independent digits (reference P(7) = 0.1, per-token KL
# summed, beta): p* solves ln(9 p / (1 - p)) = 1 / (n beta); beta = 0.2 gives p* = 0.58 for n = 2 but 0.37 for
# n = 3 and 0.17 for n = 8, so the answers have 2 digits (the reward >= 0.4 is reachable with beta = 0.2).
DIGITS = 2
MAX_NEW = 6
PPO_ARGS = ["train.micro_batch_size=16", "train.global_batch_size=32", "optimizer.lr=2e-3",
            "optimizer.warmup_steps=2", f"ppo.max_new_tokens={MAX_NEW}", "ppo.epochs=2", "ppo.minibatches=1",
            "reward.fn=tests.test_ppo:sevens_fraction", "train.save_interval=1000"]


def sevens_fraction(completion: str, fields: dict) -> float:
    """The verifiable reward: the fraction of the completion's (non-space) characters that are '7'."""
    text = completion.replace(" ", "")
    return text.count("7") / max(len(text), 1)


def length_reward(completion: str, fields: dict) -> float:
    """The length-rewarding variant: min(non-space characters of the completion, MAX_NEW) / MAX_NEW."""
    return min(len(completion.replace(" ", "")), MAX_NEW) / MAX_NEW


def _sft_checkpoint(run_dir, steps: int = 250, n_digits=DIGITS):
    """A policy that answers "count" with `n_digits` uniform random digits then <|end|> (7s about 10%), trained
    in-process (plain AdamW on the assistant tokens), written as a megaseek checkpoint. `n_digits`: an int, or
    fn(rng) -> int drawing each answer's length."""
    from megaseek.data.chat import ChatIds, Example, add_chat_tokens, encode_chat, pack, stack
    from megaseek.model.decoder import Decoder
    from megaseek.tasks.sft import write_checkpoint
    tok = base_tokenizer()
    add_chat_tokens(tok)
    cfg = model_cfg(tok.get_vocab_size())
    rng = random.Random(0)
    exs = []
    for i in range(512):
        n = n_digits(rng) if callable(n_digits) else n_digits
        digits = "".join(rng.choice("0123456789") for _ in range(n))
        ids, sup = encode_chat(tok, [{"role": "user", "content": "count"}, {"role": "assistant", "content": digits}])
        exs.append(Example(ids, sup, f"sft:{i}"))
    rows = [pack([e], 32, ChatIds.of(tok).pad)[0] for e in exs]
    torch.manual_seed(0)
    m = Decoder(cfg, seed=5)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        b = stack([rows[(step * 32 + j) % len(rows)] for j in range(32)])
        z = m(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
        tl = m.token_losses(z, b["labels"].clamp(min=0))
        loss = (tl * b["loss_mask"]).sum() / b["loss_mask"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    write_checkpoint(run_dir, steps, cfg, m.state_dict(), tok)
    return float(loss)


def _prompts(path, n):
    return write_jsonl(path, [{"prompt": "count"}] * n, bad=1)


@torch.no_grad()
def _exact_kl(run_dir, ref_dir, n: int = 64) -> tuple[float, float]:
    """(mean summed exact KL(pi || ref) over sampled responses, mean reward of them) for the final policy:
    sum over response positions of sum_v pi(v) (log pi(v) - log ref(v)), full vocabulary, temperature 1."""
    from megaseek.ckpt.hf import load_model
    from megaseek.ckpt.init_from import grow_rows
    from megaseek.data.chat import ChatIds, encode_chat
    from megaseek.data.tokenizer import load_tokenizer
    from megaseek.model.decoder import Decoder
    from megaseek.model.generate import SamplingConfig, generate
    from megaseek.tasks.rollout import response_rows, stop_ids
    pol, _ = load_model(run_dir)
    src, _ = load_model(ref_dir)
    ref = Decoder(pol.cfg, seed=0)
    ref.load_state_dict(grow_rows(src.state_dict(), src.cfg.vocab_size, pol.cfg.vocab_size))
    ref.eval()
    tok = load_tokenizer(sorted((run_dir / "checkpoints").glob("global_step*"))[-1] / "tokenizer.json")
    prompt, _ = encode_chat(tok, [{"role": "user", "content": "count"}], add_generation_prompt=True)
    outs = generate(pol, [prompt] * n, SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, seed=7,
                                                      stop_tokens=tuple(stop_ids(tok))))
    b = response_rows([prompt] * n, outs, 32, ChatIds.of(tok).pad)
    lp = [torch.log_softmax(mm(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
                            [..., :pol.cfg.vocab_size].float(), -1) for mm in (pol.eval(), ref)]
    kl = (lp[0].exp() * (lp[0] - lp[1])).sum(-1)  # (n, s)
    kl = (kl * b["loss_mask"]).sum(-1).mean()
    stops = set(stop_ids(tok))
    texts = [tok.decode(o[:-1] if o and o[-1] in stops else o) for o in outs]
    return float(kl), sum(sevens_fraction(t, {}) for t in texts) / n


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo")
    _sft_checkpoint(d / "sft")
    return d


@pytest.mark.slow
def test_ppo_raises_the_reward_and_the_kl_penalty_holds_kl(sft):
    d = sft
    train = _prompts(d / "prompts.jsonl", 64)
    runs = {}
    for name, beta in (("beta0.2", 0.2), ("beta0", 0.0)):
        out = launch("ppo", [f"train.init_from={d / 'sft'}", f"data.train={train}", f"run_dir={d / name}",
                             "train.steps=24", f"ppo.kl_coef={beta}"] + PPO_ARGS)
        runs[name] = metrics(d / name)
    assert "1 bad line(s) skipped" in out
    recs = runs["beta0.2"]
    assert [r["step"] for r in recs] == list(range(1, 25))
    for key in ("reward", "score", "kl", "kl_coef", "response_length", "eos_rate", "ppo/entropy", "ppo/approx_kl",
                "ppo/clip_fraction", "value_loss", "value/value_clip_fraction", "loss", "grad_norm"):
        assert key in recs[-1], key
    first = {n: r[0]["reward"] for n, r in runs.items()}
    last = {n: max(x["reward"] for x in r[-4:]) for n, r in runs.items()}
    kls = {n: _exact_kl(d / n, d / "sft") for n in runs}
    print(f"[ppo] reward first {first} last {last}; exact KL / sampled reward of the final policy {kls}; "
          f"rollout KL {[round(x['kl'], 3) for x in recs[::2]]}")
    assert all(0.03 < v < 0.2 for v in first.values())  # the SFT policy: about 0.1
    assert last["beta0.2"] >= 0.4 and last["beta0"] >= 0.4
    assert kls["beta0.2"][0] <= 0.5 * kls["beta0"][0]
    # the first epoch of every rollout: log-probs recomputed at the sampling temperature give ratio 1 exactly
    assert all(r["ppo/clip_fraction"] == 0.0 and abs(r["ppo/ratio"] - 1.0) < 1e-6 for r in recs[::2])
    assert all(r["eos_rate"] >= 0.9 for r in recs)


def _mixed_length(rng: random.Random) -> int:
    """SFT answer lengths for the EOS test: 1-5 digits (90%) or 6-8 (10%), so with ppo.max_new_tokens = 6 about
    12% of the start policy's responses hit the limit without EOS (a start that can still learn either way)."""
    return rng.randint(1, 5) if rng.random() < 0.9 else rng.randint(6, 8)


@pytest.mark.slow
def test_missing_eos_penalty_keeps_eos_under_a_length_reward(tmp_path):
    """reward = min(characters, 6) / 6 favours running to the limit (6 tokens, no EOS: 1.0) over 5 digits + EOS
    (0.83). Without the penalty the EOS rate falls from 0.88 to 0 (measured) and responses hit the limit;
    with ppo.missing_eos_penalty=1 the no-EOS reward is 0: the responses still grow (3.8 -> 5.8 tokens) but the
    EOS rate of the last 5 rollouts is >= 0.9 (measured 0.98-0.99; it dips to 0.7-0.8 in rollouts 3-6 before the
    penalty takes hold). 2 x 40 steps (20 rollouts each)."""
    _sft_checkpoint(tmp_path / "sft", n_digits=_mixed_length)
    train = _prompts(tmp_path / "p.jsonl", 64)
    args = [f"train.init_from={tmp_path / 'sft'}", f"data.train={train}", "train.steps=40", "ppo.kl_coef=0.0",
            "optimizer.lr=3e-3", "optimizer.min_lr=3e-3", "reward.fn=tests.test_ppo:length_reward"] + \
        [a for a in PPO_ARGS if not a.startswith(("optimizer.lr", "reward.fn"))]
    runs = {}
    for name, pen in (("free", 0.0), ("penalised", 1.0)):
        launch("ppo", args + [f"ppo.missing_eos_penalty={pen}", f"run_dir={tmp_path / name}"])
        recs = metrics(tmp_path / name)[::2]  # one record per rollout (2 epochs)
        runs[name] = ([r["eos_rate"] for r in recs], [r["response_length"] for r in recs])
    print(f"[ppo eos] eos rate per rollout {({n: [round(x, 2) for x in e] for n, (e, _) in runs.items()})}; "
          f"response length {({n: [round(x, 1) for x in L] for n, (_, L) in runs.items()})}")
    (free, free_len), (pen, pen_len) = runs["free"], runs["penalised"]
    assert free[0] == pen[0] and 0.75 <= free[0] <= 0.95  # the same first rollout: EOS about 0.88
    tail = lambda xs: sum(xs[-5:]) / 5  # noqa: E731
    assert tail(free) < 0.5 and tail(free_len) > 5.5  # the length reward wins: no EOS, responses at the limit
    assert tail(pen) >= 0.9  # the penalty keeps EOS ...
    assert tail(pen_len) > pen_len[0] + 1.0  # ... while the responses still grow


@pytest.mark.slow
def test_ppo_refuses_bad_input(sft, tmp_path):
    d = sft
    train = _prompts(tmp_path / "p.jsonl", 8)
    base = [sys.executable, "launch/ppo.py", f"train.init_from={d / 'sft'}", f"data.train={train}",
            f"run_dir={tmp_path / 'r'}"] + STAGE_ARGS
    cases = {"ppo.kl_estimator=k2": "ppo.kl_estimator", "ppo.clip=1.5": "ppo.clip",
             "reward.fn=nope": "reward.fn", "ppo.max_new_tokens=40": "ppo.max_new_tokens"}
    for arg, key in cases.items():
        extra = [arg] + ([] if arg.startswith("reward") else ["reward.fn=tests.test_ppo:sevens_fraction"])
        p = subprocess.run(base + extra, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and key in p.stderr, (arg, p.stderr[-2000:])
    p = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=300)  # neither reward.fn nor model
    assert p.returncode == 2 and "reward.fn=module:function" in p.stderr and "reward.model" in p.stderr, p.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def _reward_model(sft_dir, out_dir):
    """A reward-model checkpoint of the policy's architecture: the SFT weights + a random `<|reward|>` row."""
    from tokenizers import AddedToken

    from megaseek.ckpt.hf import load_model
    from megaseek.ckpt.init_from import grow_rows
    from megaseek.data.tokenizer import load_tokenizer
    from megaseek.model.decoder import Decoder
    from megaseek.tasks.reward import REWARD_TOKEN
    from megaseek.tasks.sft import write_checkpoint
    src, _ = load_model(sft_dir)
    tok = load_tokenizer(sorted((sft_dir / "checkpoints").glob("global_step*"))[-1] / "tokenizer.json")
    tok.add_special_tokens([AddedToken(REWARD_TOKEN, special=True, normalized=False)])
    cfg = model_cfg(tok.get_vocab_size())
    m = Decoder(cfg, seed=0)
    m.load_state_dict(grow_rows(src.state_dict(), src.cfg.vocab_size, cfg.vocab_size))
    with torch.no_grad():
        m.head_weight()[tok.token_to_id(REWARD_TOKEN)].normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return write_checkpoint(out_dir, 1, cfg, m.state_dict(), tok)


@pytest.mark.slow
def test_ppo_with_a_reward_model_resumes_mid_rollout_exactly(sft, tmp_path):
    """reward.model scoring + critic from it, adaptive k3 KL, missing-EOS penalty: a run resumed from its step-3
    checkpoint (the second epoch of rollout 1, replayed from run_dir/rollouts; policy and critic with their Adam
    steps and lr schedules, the saved beta) to step 6 (a new rollout) equals the uninterrupted run."""
    import shutil
    d = sft
    _reward_model(d / "sft", tmp_path / "rm")
    train = _prompts(tmp_path / "p.jsonl", 64)
    args = [f"train.init_from={d / 'sft'}", f"data.train={train}", f"reward.model={tmp_path / 'rm'}",
            "ppo.kl_target=1.0", "ppo.kl_horizon=100", "ppo.kl_estimator=k3", "ppo.missing_eos_penalty=1.0",
            "reward.fn=null", "train.steps=6"] + \
        [a for a in PPO_ARGS if not a.startswith(("reward.fn", "train.save_interval"))] + ["train.save_interval=3"]
    full = tmp_path / "full"
    launch("ppo", args + [f"run_dir={full}"])
    res = tmp_path / "res"  # what a run killed after its step-3 checkpoint leaves behind
    for sub in ("checkpoints/global_step3", "critic/checkpoints/global_step3", "rollouts/rollout-000001.pt"):
        src, dst = full / sub, res / sub
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    out = launch("ppo", args + [f"run_dir={res}"])
    assert "resumed from global_step3" in out and "critic restored" in out
    recs, again = metrics(full), {r["step"]: r for r in metrics(res)}
    assert sorted(again) == [4, 5, 6]
    keys = ("loss", "value_loss", "kl", "kl_coef", "score", "ppo/approx_kl", "lr")
    worst = {k: max(abs(r[k] - again[r["step"]][k]) for r in recs[3:]) for k in keys}
    print(f"[ppo resume] max |full - resumed| over steps 4-6 {worst}; kl_coef {[r['kl_coef'] for r in recs]}")
    assert worst["loss"] < 1e-5 and worst["value_loss"] < 1e-5 and worst["kl"] < 1e-5 and worst["lr"] == 0.0
    assert worst["kl_coef"] < 1e-12 and worst["score"] < 1e-5
    assert recs[-1]["kl_coef"] < recs[0]["kl_coef"]  # KL below the target: the adaptive beta went down
    assert (res / "critic" / "checkpoints" / "global_step6").is_dir()
