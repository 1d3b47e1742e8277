"""Exact and near-duplicate removal on crafted documents (near duplicates differ by a few words/characters)."""
from pathlib import Path

import numpy as np

from megaseek.data.clean import Words
from megaseek.data.dedup import Deduper, Signer, content_hash, estimated_jaccard
from tests.test_data_common import change_words, chinese, prose


def run(docs, threshold=0.8, exact=True, near=True):
    signer, d = Signer(128, 5), Deduper(exact, near, threshold, 128)
    return [d.check(content_hash(t), signer.signature(Words.of(t))) for t in docs]


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
