"""Exact and near-duplicate removal on crafted documents (near duplicates differ by a few words/characters),
the LSH/components math against brute force, and the near-duplicate benchmark's thresholds."""
from pathlib import Path

import numpy as np

from megaseek.data.clean import CleanConfig, Words
from megaseek.data.dedup import (DedupParams, Signer, bucket_pairs, candidate_probability, components, content_hash,
                                 dedup_in_memory, estimated_jaccard, hash_halves, lsh_params)
from tests.test_data_common import change_words, chinese, prose


def run(docs, threshold=0.8, exact=True, near=True, ngram=5):
    """The dedup verdict of each document (None: kept), through the local engine's in-memory dedup."""
    cfg = CleanConfig(exact_dedup=exact, near_dedup=near, near_threshold=threshold, shingle_ngram=ngram).checked()
    signer = Signer(cfg.num_perm, cfg.shingle_ngram)
    h1, h2 = hash_halves([content_hash(t) for t in docs])
    sigs = np.stack([signer.signature(Words.of(t)) for t in docs])
    removed = dedup_in_memory(np.arange(len(docs), dtype=np.int64), h1, h2, sigs, DedupParams(cfg))
    return [removed.get(i) for i in range(len(docs))]


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(t):
        w = Words.of(t)
        words = [w.uniq[i] for i in w.ids]
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
    A, B = grams(a), grams(b)
    return len(A & B) / len(A | B)


def test_exact_duplicates_removed_first_kept():
    a, b = prose(1), prose(2)
    assert run([a, b, a, a, b], near=False) == [None, None, "exact_duplicate", "exact_duplicate", "exact_duplicate"]


def test_near_duplicates_differing_by_a_few_words():
    base = prose(3, 300)
    near = change_words(base, [10, 120, 250])          # 3 of 300 words changed
    other = prose(4, 300)
    true_j = shingle_jaccard(base, near)
    assert 0.85 < true_j < 0.95
    s = Signer(128, 5)
    est = estimated_jaccard(s.signature(Words.of(base)), s.signature(Words.of(near)))
    assert abs(est - true_j) < 0.1                      # MinHash estimates the shingle Jaccard
    assert run([base, near, other]) == [None, "near_duplicate", None]
    # the threshold comes from config: above the pair's similarity both are kept
    assert run([base, near, other], threshold=0.97) == [None, None, None]
    # unrelated documents on the same vocabulary are far apart
    assert shingle_jaccard(base, other) < 0.05


def test_near_duplicates_in_chinese():
    base = chinese(5, 400)
    chars = list(base)
    for p in (30, 200, 350):
        chars[p] = "龍"
    near = "".join(chars)
    assert 0.8 < shingle_jaccard(base, near) < 0.97
    assert run([base, near, chinese(6, 400)]) == [None, "near_duplicate", None]


def test_signatures_are_stable_across_processes():
    """Shingle hashes must not depend on Python's per-process hash seed (workers are separate processes)."""
    import subprocess
    import sys
    repo = str(Path(__file__).resolve().parents[1])
    code = (f"import sys; sys.path.insert(0, {repo!r});from megaseek.data.dedup import Signer;"
            "from megaseek.data.clean import Words;"
            "print(Signer(128, 5).signature(Words.of('the quick brown fox jumps over the lazy dog again'))[:8].tolist())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    assert len(outs) == 1
    sig = Signer(128, 5).signature(Words.of("the quick brown fox jumps over the lazy dog again"))
    assert eval(outs.pop()) == sig[:8].tolist() and sig.dtype == np.uint32


def test_clusters_resolve_by_connected_components_smallest_ordinal_survives():
    """A ~ B and B ~ C with A !~ C: one cluster, only A survives (not A and C, as a streaming check would)."""
    base = prose(30, 300).split(" ")
    a = " ".join(base)
    b = " ".join(base[:100] + prose(31, 40).split(" ") + base[140:])        # A, words 100..140 replaced
    c = " ".join(b.split(" ")[:200] + prose(32, 40).split(" ") + base[240:])  # B, words 200..240 replaced
    s = Signer(128, 3)
    j = lambda x, y: estimated_jaccard(s.signature(Words.of(x)), s.signature(Words.of(y)))  # noqa: E731
    assert j(a, b) >= 0.65 and j(b, c) >= 0.65 and j(a, c) < 0.65, (j(a, b), j(b, c), j(a, c))
    assert run([a, b, c], threshold=0.65, ngram=3) == [None, "near_duplicate", "near_duplicate"]
    assert run([c, b, a], threshold=0.65, ngram=3) == [None, "near_duplicate", "near_duplicate"]


def test_components_and_bucket_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    u, v = rng.integers(0, 300, 200), rng.integers(0, 300, 200)
    nodes, roots = components(u.astype(np.int64), v.astype(np.int64))
    adj = {}
    for a, b in zip(u.tolist(), v.tolist()):
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    for n, r in zip(nodes.tolist(), roots.tolist()):                 # BFS: the component's smallest node
        seen, todo = {n}, [n]
        while todo:
            for m in adj[todo.pop()] - seen:
                seen.add(m)
                todo.append(m)
        assert r == min(seen)
    keys, ords = rng.integers(0, 40, 500), rng.permutation(500).astype(np.int64)
    pu, pv = bucket_pairs(keys, ords, max_pairs_per_member=1000)
    want = {(min(a, b), max(a, b)) for k in set(keys.tolist()) for a in ords[keys == k].tolist()
            for b in ords[keys == k].tolist() if a < b}
    assert set(zip(pu.tolist(), pv.tolist())) == want and (pu < pv).all()


def test_lsh_bands_catch_the_threshold():
    b, r = lsh_params(0.6, 128)
    assert b * r <= 128 and candidate_probability(0.75, b, r) > 0.99 and candidate_probability(0.25, b, r) < 0.05
    assert (b, r) == (DedupParams(CleanConfig()).bands, DedupParams(CleanConfig()).rows)


def test_near_dup_benchmark_recall_and_precision_of_the_defaults():
    """Defaults (conf/data/default.yaml): recall >= 0.95 for k <= 3 substituted words in 75-word documents;
    precision >= 0.99 with distinct documents sharing a 30-word header in the same run."""
    from megaseek.data.neardup_bench import evaluate
    from megaseek.data.prepare import default_data_config
    cfg = CleanConfig(**default_data_config()["clean"]).checked()
    r = evaluate(cfg, lengths=(75,), ks=(1, 2, 3, 5), pairs=100, distinct=200)
    assert all(r["recall"]["75w"][f"k={k}"] >= 0.95 for k in (1, 2, 3)), r["recall"]
    assert r["precision"] >= 0.99 and r["distinct_kept"] >= 0.99, r
    old = CleanConfig(shingle_ngram=5, near_threshold=0.8).checked()     # the previous defaults miss k = 3
    assert evaluate(old, lengths=(75,), ks=(3,), pairs=100, distinct=0)["recall"]["75w"]["k=3"] < 0.5
