"""One generator: cached = uncached greedy at tp=1, tp=2 and through pp=2 stages; greedy equal to transformers'
`generate` on the Hugging Face model holding our weights; seeded sampling reproducible, independent of
batch-mates and equal at tp=1 and tp=2; two ZeRO-3 ranks whose rows stop at different lengths finish (no hang)
and match one process."""
import torch

from megaseek.model.config import ModelConfig
from megaseek.model.decoder import Decoder
from megaseek.model.generate import SamplingConfig, generate
from tests.helpers import init_gloo, run_world

CFG = dict(vocab_size=211, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=96,
           max_seq_len=64, init_std=0.25)
PROMPTS = [[5, 17, 33, 2, 9], [44, 3], [100, 101, 102, 7]]
N = 16
SAMPLE = dict(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=11)


def _model(ctx=None, **kw):
    return Decoder(ModelConfig(**CFG), ctx, seed=5, **kw).eval()


def test_cached_equals_uncached_and_batching_and_sampling_at_tp1():
    m = _model()
    cached = generate(m, PROMPTS, SamplingConfig(max_new_tokens=N))
    assert cached == generate(m, PROMPTS, SamplingConfig(max_new_tokens=N, use_cache=False))
    assert cached == [generate(m, [p], SamplingConfig(max_new_tokens=N))[0] for p in PROMPTS]  # batch-mates: none
    assert len({tuple(r) for r in cached}) == 3 and all(len(r) == N for r in cached)
    s1 = generate(m, PROMPTS, SamplingConfig(max_new_tokens=N, **SAMPLE))
    assert s1 == generate(m, PROMPTS, SamplingConfig(max_new_tokens=N, **SAMPLE))  # reproducible
    rev = generate(m, PROMPTS[::-1], SamplingConfig(max_new_tokens=N, **SAMPLE), row_ids=[2, 1, 0])
    assert rev[::-1] == s1  # keyed on row ids, not batch positions
    assert s1 != generate(m, PROMPTS, SamplingConfig(max_new_tokens=N, **dict(SAMPLE, seed=12)))
    assert s1 != cached
    # stop tokens end a row (included) and the others go on
    stop = cached[0][3]
    out = generate(m, PROMPTS, SamplingConfig(max_new_tokens=N, stop_tokens=[stop]))
    for got, full in zip(out, cached):
        want = full[:full.index(stop) + 1] if stop in full else full
        assert got == want


def test_greedy_equals_transformers_generate():
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaseek.model.adapter import adapter_for
    m = _model()
    ad = adapter_for(m.cfg)
    hf_cfg = ad.hf_config(None, None)
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf_cfg.items() if k not in ("architectures",)})).eval()
    sd = {ad.to_hf(n): p.detach() for n, p in m.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    ours = generate(m, PROMPTS, SamplingConfig(max_new_tokens=N))
    for p, o in zip(PROMPTS, ours):
        ids = torch.tensor([p])
        g = hf.generate(ids, max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0,
                        attention_mask=torch.ones_like(ids))
        assert g[0, len(p):].tolist() == o


def _tp_pp(rank, world, ref):
    from megaseek.distributed.groups import ParallelGroups
    from megaseek.distributed.topology import Topology
    from megaseek.model.generate import PipelinePeers
    from megaseek.tensor_parallel.layers import TPContext
    init_gloo(rank, world)
    out = {}
    g = ParallelGroups.build(Topology(tp=2))
    m = _model(TPContext.from_axis(g.tp, sequence_parallel=True))  # SP is switched off while decoding
    out["tp_cached"] = generate(m, PROMPTS, SamplingConfig(max_new_tokens=N))
    out["tp_uncached"] = generate(m, PROMPTS, SamplingConfig(max_new_tokens=N, use_cache=False))
    out["tp_sample"] = generate(m, PROMPTS, SamplingConfig(max_new_tokens=N, **SAMPLE))
    g = ParallelGroups.build(Topology(pp=2))
    first = g.pp.rank == 0
    stage = _model(first_layer=0 if first else 2, last_layer=2 if first else 4, pre=first, post=not first)
    pipe = PipelinePeers(g.pp.ranks, g.pp.rank, g.pp.group)
    out["pp_cached"] = generate(stage, PROMPTS, SamplingConfig(max_new_tokens=N), pipeline=pipe)
    out["pp_uncached"] = generate(stage, PROMPTS, SamplingConfig(max_new_tokens=N, use_cache=False), pipeline=pipe)
    return out


def test_tensor_and_pipeline_parallel_generation():
    m = _model()
    ref = generate(m, PROMPTS, SamplingConfig(max_new_tokens=N))
    ref_sample = generate(m, PROMPTS, SamplingConfig(max_new_tokens=N, **SAMPLE))
    for r in run_world(2, _tp_pp, ref, timeout=300):
        assert r["tp_cached"] == r["tp_uncached"] == ref
        assert r["tp_sample"] == ref_sample
        assert r["pp_cached"] == r["pp_uncached"] == ref


def _zero3(rank, world, prompts, stop):
    import deepspeed
    import torch.distributed as dist
    init_gloo(rank, world)
    m = _model()
    engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 9,
        "zero_allow_untested_optimizer": True})
    mine = prompts[rank::world]
    t0 = __import__("time").time()
    out = generate(engine.module, mine, SamplingConfig(max_new_tokens=N, stop_tokens=[stop]),
                   sync_group=dist.group.WORLD)
    return out, __import__("time").time() - t0


def test_zero3_ranks_with_rows_ending_at_different_lengths_finish_and_match():
    m = _model()
    full = generate(m, PROMPTS[:2], SamplingConfig(max_new_tokens=N))
    stop = full[0][0]  # rank 0's only row stops at its first token; rank 1's runs on
    want = [generate(m, [p], SamplingConfig(max_new_tokens=N, stop_tokens=[stop]))[0] for p in PROMPTS[:2]]
    assert len(want[0]) == 1 and len(want[1]) > 4
    res = run_world(2, _zero3, PROMPTS[:2], stop, timeout=180)
    assert [res[0][0][0], res[1][0][0]] == want
    assert max(r[1] for r in res) < 60
