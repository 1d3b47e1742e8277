"""The loader: determinism, disjoint data-parallel slices, layout independence, exact blend proportions,
exact resume, pipeline stages, the validation split, and build_data on a blended config."""
import numpy as np
import pytest
import torch

from megaseek.data.blend import BlendSchedule, window_counts
from megaseek.data.loader import BatchPlan, BlendedWindows, InterleavedWindows, ResumableLoader, TokenWindows

SEQ = 8


def source(n_windows: int, tag: int):
    """Token ids that say which source (tag * 10000) and which position they come from."""
    return TokenWindows(np.arange(n_windows * SEQ + 1, dtype=np.int64) + tag * 10_000, SEQ)


def blend(seed=7, weights=(0.7, 0.2, 0.1), sizes=(50, 40, 3), window=10):
    names = ["web", "code", "domain"][:len(weights)]
    return BlendedWindows({n: source(s, i + 1) for i, (n, s) in enumerate(zip(names, sizes))},
                          dict(zip(names, weights)), window, seed)


def global_batches(data, gb, n, dp=1, mb=None, seed=7, start=None):
    """The first n global batches seen by all dp ranks together, as (gb, SEQ) input tensors."""
    loaders = [ResumableLoader(data, BatchPlan(gb, mb or gb // dp, dp, r), seed) for r in range(dp)]
    if start:
        for ld in loaders:
            ld.load_state_dict(start)
    out = []
    for _ in range(n):
        parts = [torch.cat([ids for ids, _ in ld.micro_batches()]) for ld in loaders]
        out.append(torch.cat(parts))
    return out


def test_window_counts_are_exact_and_sum_to_the_window():
    assert window_counts([0.7, 0.2, 0.1], 10).tolist() == [7, 2, 1]
    assert window_counts([0.5, 0.3, 0.2], 1000).tolist() == [500, 300, 200]
    assert window_counts([1, 1, 1], 100).tolist() == [34, 33, 33]
    with pytest.raises(ValueError, match="too small"):
        window_counts([0.99, 0.01], 10)


def test_blend_follows_weights_exactly_in_every_window():
    for weights, window in (((0.7, 0.2, 0.1), 10), ((0.5, 0.3, 0.2), 1000)):
        b = blend(weights=weights, window=window, sizes=(500, 400, 30))
        src, _ = b.windows(np.arange(5 * window))
        per_window = np.stack([np.bincount(src[w * window:(w + 1) * window], minlength=3) for w in range(5)])
        expect = window_counts(list(weights), window)
        assert (per_window == expect).all()
        # and the order inside windows differs (seeded per window), not a fixed pattern
        assert len({tuple(src[w * window:(w + 1) * window]) for w in range(5)}) > 1


def test_each_source_visits_every_window_once_per_epoch():
    b = blend(sizes=(50, 40, 3))
    src, idx = b.windows(np.arange(1000))
    for s, n in enumerate((50, 40, 3)):
        mine = idx[src == s]
        assert sorted(mine[:n].tolist()) == list(range(n))               # one epoch: a permutation
        assert sorted(mine[n:2 * n].tolist()) == list(range(n))          # the next epoch: another one
        assert mine[:n].tolist() != mine[n:2 * n].tolist() or n < 3


def test_deterministic_from_the_seed():
    a = global_batches(blend(seed=7), 10, 5)
    b = global_batches(blend(seed=7), 10, 5)
    c = global_batches(blend(seed=8), 10, 5, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_ranks_get_disjoint_slices_and_layout_does_not_matter():
    data = blend()
    plan = [BatchPlan(12, 3, 4, r) for r in range(4)]
    loaders = [ResumableLoader(data, p, 7) for p in plan]
    positions = [np.concatenate([ld.sampler.micro_batch(0, m) for m in range(p.grad_accum)])
                 for ld, p in zip(loaders, plan)]
    assert sorted(np.concatenate(positions).tolist()) == list(range(12))   # disjoint, and all of the batch
    one = global_batches(data, 12, 4, dp=1)
    for dp, mb in ((2, 2), (4, 3), (4, 1), (3, 4)):
        other = global_batches(data, 12, 4, dp=dp, mb=mb)
        assert all(torch.equal(x, y) for x, y in zip(one, other)), (dp, mb)
    # tensor-parallel ranks of one group share the dp rank: identical batches
    tp0, tp1 = (ResumableLoader(data, BatchPlan(12, 3, 2, 1), 7) for _ in range(2))
    for (a, la), (b, lb) in zip(tp0.micro_batches(), tp1.micro_batches()):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_labels_are_inputs_shifted_by_one():
    ids, labels = ResumableLoader(blend(), BatchPlan(4, 4, 1, 0), 7).micro_batches()[0]
    assert ids.shape == labels.shape == (4, SEQ) and ids.dtype == torch.long
    assert torch.equal(ids[:, 1:], labels[:, :-1])


def test_resume_sees_exactly_the_samples_it_would_have_seen():
    data = blend()
    straight = global_batches(data, 12, 10)
    ld = ResumableLoader(data, BatchPlan(12, 4, 1, 0), 7)
    for _ in range(6):
        ld.micro_batches()
    state = ld.state_dict()
    assert state["consumed_samples"] == 72 and state["next_batch"] == 6
    resumed = global_batches(data, 12, 4, start=state)
    assert all(torch.equal(x, y) for x, y in zip(straight[6:], resumed))
    # at another layout (dp=3, micro 2) the union of the ranks is the same global batches
    resumed = global_batches(data, 12, 4, dp=3, mb=2, start=state)
    assert all(torch.equal(x, y) for x, y in zip(straight[6:], resumed))
    # with another global batch size, the next samples continue exactly after the 72 consumed
    flat = torch.cat(straight)
    resumed = torch.cat(global_batches(data, 8, 3, start=state))
    assert torch.equal(resumed, flat[72:96])
    # the first format (next batch index) still loads
    old = ResumableLoader(data, BatchPlan(12, 4, 1, 0), 7)
    old.load_state_dict({"next_batch": 6, "seed": 7, "global_batch": 12})
    assert old.consumed == 72


def test_resume_refuses_other_seed_data_or_blend():
    a = ResumableLoader(blend(), BatchPlan(4, 4, 1, 0), 7, data_id="abc")
    sd = a.state_dict()
    with pytest.raises(ValueError, match="seed=8"):
        ResumableLoader(blend(seed=8), BatchPlan(4, 4, 1, 0), 8, data_id="abc").load_state_dict(sd)
    with pytest.raises(ValueError, match="dataset abc"):
        ResumableLoader(blend(), BatchPlan(4, 4, 1, 0), 7, data_id="xyz").load_state_dict(sd)
    with pytest.raises(ValueError, match="blended"):
        ResumableLoader(blend(weights=(0.5, 0.3, 0.2)), BatchPlan(4, 4, 1, 0), 7,
                        data_id="abc").load_state_dict(sd)


class CountingTokens:
    """A token array that counts reads (to show which pipeline stages touch the data)."""

    def __init__(self, n):
        self.a, self.reads = np.arange(n, dtype=np.int64), 0

    def __len__(self):
        return len(self.a)

    def __getitem__(self, s):
        self.reads += 1
        return self.a[s]


def test_only_first_and_last_pipeline_stages_read_data():
    out = {}
    for stage in range(3):
        tokens = CountingTokens(40 * SEQ + 1)
        ld = ResumableLoader(TokenWindows(tokens, SEQ), BatchPlan(8, 2, 1, 0, pp=3, pp_rank=stage), 7)
        out[stage] = (ld.micro_batches(), tokens.reads, ld.state_dict()["consumed_samples"])
    first, middle, last = out[0], out[1], out[2]
    assert all(ids is not None and labels is None for ids, labels in first[0])
    assert all(ids is None and labels is None for ids, labels in middle[0]) and middle[1] == 0
    assert all(ids is None and labels is not None for ids, labels in last[0])
    assert first[2] == middle[2] == last[2] == 8          # every stage keeps the same position
    for (ids, _), (_, labels) in zip(first[0], last[0]):
        assert torch.equal(ids[:, 1:], labels[:, :-1])     # the same samples at both ends


def test_validation_split_is_held_out_and_interleaved():
    tokens = np.arange(100 * SEQ + 1, dtype=np.int64)
    train, valid = TokenWindows(tokens, SEQ, 0.1, "train"), TokenWindows(tokens, SEQ, 0.1, "valid")
    assert (len(train), len(valid)) == (90, 10)
    last_train = train.window(len(train) - 1)
    assert valid.window(0)[0] == last_train[-1] and valid.window(0)[0] >= 90 * SEQ   # no train window past it
    a = TokenWindows(np.arange(40 * SEQ + 1) + 10_000, SEQ, 0.25, "valid")
    b = TokenWindows(np.arange(40 * SEQ + 1) + 20_000, SEQ, 0.25, "valid")
    mix = InterleavedWindows({"a": a, "b": b}, {"a": 0.75, "b": 0.25})
    assert len(mix) == 20
    ids, _ = mix.batch(range(8))
    tags = (ids[:, 0] // 10_000).tolist()
    assert tags.count(1) == 6 and tags.count(2) == 2      # any prefix follows the weights


def test_schedule_depends_only_on_seed_weights_window_and_sizes():
    a = BlendSchedule(["x", "y"], [0.6, 0.4], [30, 20], 10, seed=3)
    b = BlendSchedule(["x", "y"], [0.6, 0.4], [30, 20], 10, seed=3)
    pos = np.array([5, 999, 0, 123, 42])
    assert all(np.array_equal(u, v) for u, v in zip(a.locate(pos), b.locate(pos)))
    # position lookups are random access: one at a time equals all at once
    one = [a.locate([p]) for p in pos]
    assert [int(s[0]) for s, _ in one] == a.locate(pos)[0].tolist()
