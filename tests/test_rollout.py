"""Rollouts (megaseek/tasks/rollout.py): rows (labels / loss mask on the response, truncation after the stop
token), log-probs at the sampling temperature equal a token-by-token reference (1e-5), sampling keyed on
(seed, step, global sample index) and independent of batch composition; two ZeRO-3 ranks, one whose responses
all stop at the first token and one whose responses run to the limit, finish and equal one process token for
token (log-probs within 1e-5) under a 60 s bound."""
import time

import torch

from megaseek.model.config import ModelConfig
from megaseek.model.decoder import Decoder
from megaseek.model.generate import SamplingConfig
from megaseek.tasks.rollout import gather_rollout, rollout
from tests.helpers import init_gloo, run_world

CFG = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
           max_seq_len=32, init_std=0.3)
SEQ, N, T = 24, 10, 0.8
PROMPTS = [[5, 17, 33, 2], [44, 3], [50, 51, 52], [8, 9, 10, 11, 12]]
PAD = 0


def _models():
    return Decoder(ModelConfig(**CFG), seed=3).eval(), Decoder(ModelConfig(**CFG), seed=4).eval()


def _sampling(stop=()):
    return SamplingConfig(max_new_tokens=N, temperature=T, top_k=40, top_p=0.95, seed=7, stop_tokens=tuple(stop))


def _naive_logps(m, prompt, resp):
    out = []
    with torch.no_grad():
        for t in range(len(resp)):
            z = m(torch.tensor([list(prompt) + resp[:t]]))[0, -1, :m.cfg.vocab_size].float()
            out.append(float(torch.log_softmax(z / T, -1)[resp[t]]))
    return out


def test_rows_logps_and_sampling_keys():
    pol, ref = _models()
    ids = [10, 11, 12, 13]
    free = rollout(pol, PROMPTS, ids, _sampling(), step=3, seq_len=SEQ, pad_id=PAD, ref=ref)
    y1 = free.response(1)
    k = next(k for k in range(1, N) if y1[k] not in y1[:k])  # sample 1 now stops at its (k+1)-th token
    stop = y1[k]
    r = rollout(pol, PROMPTS, ids, _sampling([stop]), step=3, seq_len=SEQ, pad_id=PAD, ref=ref)
    assert r.response(1) == y1[:k + 1] and bool(r.samples["eos"][1]) and r.completion(1) == y1[:k]
    b = r.batch
    for i, p in enumerate(PROMPTS):
        y = r.response(i)
        P, R = len(p), len(y)
        assert int(r.samples["lengths"][i]) == R and bool(r.samples["eos"][i]) == (y[-1] == stop)
        assert b["input_ids"][i, :P].tolist() == p and (b["input_ids"][i, P + R:] == PAD).all()
        assert b["labels"][i, P - 1:P + R - 1].tolist() == y and (b["labels"][i, P + R - 1:] == -100).all()
        assert b["loss_mask"][i].nonzero().flatten().tolist() == list(range(P - 1, P + R - 1))
        assert b["position_ids"][i, :P + R].tolist() == list(range(P + R))
        assert (b["document_ids"][i, :P + R] == 0).all() and (b["document_ids"][i, P + R:] == -1).all()
        for key, m in (("old_logps", pol), ("ref_logps", ref)):
            got = b[key][i, P - 1:P + R - 1].tolist()
            assert max(abs(x - y_) for x, y_ in zip(got, _naive_logps(m, p, y))) < 1e-5, key
            assert (b[key][i][~b["loss_mask"][i]] == 0).all()  # 0 outside the response
    # keyed on (seed, step, global sample index): batch-mates and splits change nothing; another step does
    parts = [rollout(pol, PROMPTS[k:k + 1], ids[k:k + 1], _sampling([stop]), step=3, seq_len=SEQ, pad_id=PAD)
             for k in range(4)]
    assert [p.response(0) for p in parts] == [r.response(i) for i in range(4)]
    other = rollout(pol, PROMPTS, ids, _sampling([stop]), step=4, seq_len=SEQ, pad_id=PAD)
    assert [other.response(i) for i in range(4)] != [r.response(i) for i in range(4)]


def _zero3(rank, world, stop):
    import deepspeed
    import torch.distributed as dist
    init_gloo(rank, world)
    pol, ref = _models()
    engine, *_ = deepspeed.initialize(model=pol, optimizer=torch.optim.SGD(pol.parameters(), lr=0.1), config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 9,
        "zero_allow_untested_optimizer": True})
    lo = rank * 2  # contiguous shares: rank 0 samples 0, 1 and rank 1 samples 2, 3 (global indices)
    t0 = time.time()
    mine = rollout(engine.module, PROMPTS[lo:lo + 2], [lo, lo + 1], _sampling(stop), step=1, seq_len=SEQ,
                   pad_id=PAD, ref=ref, sync_group=dist.group.WORLD, chunk=1)
    full = gather_rollout(mine, dist.group.WORLD)
    secs = time.time() - t0  # numpy across the process boundary (torch tensors would travel as shared memory)
    return {k: v.numpy() for k, v in full.batch.items()}, {k: v.numpy() for k, v in full.samples.items()}, secs


def test_zero3_two_ranks_one_stopping_at_the_first_token_equal_one_process():
    pol, ref = _models()
    free = rollout(pol, PROMPTS, [0, 1, 2, 3], _sampling(), step=1, seq_len=SEQ, pad_id=PAD)
    stop = sorted({free.response(0)[0], free.response(1)[0]})  # rank 0's samples stop at their first token
    want = rollout(pol, PROMPTS, [0, 1, 2, 3], _sampling(stop), step=1, seq_len=SEQ, pad_id=PAD, ref=ref)
    assert want.samples["lengths"].tolist()[:2] == [1, 1]
    assert min(want.samples["lengths"].tolist()[2:]) == N  # rank 1's run to the limit
    res = run_world(2, _zero3, stop, timeout=180)
    for batch, samples, secs in res:
        assert secs < 60
        batch = {k: torch.from_numpy(v) for k, v in batch.items()}
        samples = {k: torch.from_numpy(v) for k, v in samples.items()}
        for k in ("input_ids", "labels", "loss_mask", "position_ids", "document_ids"):
            assert torch.equal(batch[k], want.batch[k]), k
        for k in ("sample_ids", "lengths", "eos", "prompt_lengths"):
            assert torch.equal(samples[k], want.samples[k]), k
        for k in ("old_logps", "ref_logps"):
            diff = float((batch[k] - want.batch[k]).abs().max())
            print(f"[rollout zero3] {k} max |2 ranks - 1 process| = {diff:.2e}")
            assert diff < 1e-5


def _tp2(rank, world, ckpt, stop):
    from megaseek.distributed.groups import ParallelGroups
    from megaseek.distributed.topology import Topology
    from megaseek.tasks.rollout import reference_model
    init_gloo(rank, world)
    groups = ParallelGroups.build(Topology(tp=2))
    cfg = ModelConfig(**CFG)
    pol, ref = reference_model(cfg, groups, ckpt, seed=9), reference_model(cfg, groups, ckpt, seed=10)
    r = rollout(pol, PROMPTS, [0, 1, 2, 3], _sampling(stop), step=2, seq_len=SEQ, pad_id=PAD, ref=ref)
    return {k: v.numpy() for k, v in r.batch.items()}


def test_tp2_rollout_and_reference_equal_tp1(tmp_path):
    """The frozen reference built from a checkpoint at tp = 2 (vocabulary 97: padded shards) samples the same tokens
    and gives the same log-probs (1e-5) as the tp = 1 model."""
    from megaseek.data.tokenizer import train_bpe
    from megaseek.tasks.sft import write_checkpoint
    pol, _ = _models()
    ckpt = write_checkpoint(tmp_path / "ck", 0, pol.cfg, pol.state_dict(), train_bpe(["a b"], vocab_size=260))
    free = rollout(pol, PROMPTS, [0, 1, 2, 3], _sampling(), step=2, seq_len=SEQ, pad_id=PAD)
    stop = [free.response(0)[1]]
    want = rollout(pol, PROMPTS, [0, 1, 2, 3], _sampling(stop), step=2, seq_len=SEQ, pad_id=PAD, ref=pol)
    for got in run_world(2, _tp2, ckpt, stop, timeout=180):
        assert torch.equal(torch.from_numpy(got["input_ids"]), want.batch["input_ids"])
        for k in ("old_logps", "ref_logps"):
            diff = float((torch.from_numpy(got[k]) - want.batch[k]).abs().max())
            print(f"[rollout tp2] {k} max |tp2 - tp1| = {diff:.2e}")
            assert diff < 1e-5
