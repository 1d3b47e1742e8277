"""The built-in near-duplicate benchmark: synthetic copies with k substituted words, and distinct documents
that share a boilerplate header; precision and recall of the dedup settings on them.

Documents are drawn word by word from the unigram distribution of real English (the running Python's
`pydoc_data/topics.py`, the language reference's text: Zipf-like, so common words collide as in real text).
  near copies   for each length L and k: `pairs` originals of L words, each with one copy in which k
                distinct positions hold another word of the vocabulary
  boilerplate   `distinct` documents of `doc_words` words whose first `header_words` are one shared header
A removed copy (its original survives, the copy does not) is a true positive; a removed original, or any
removed boilerplate document, is a false positive. recall(L, k) = removed copies / pairs;
precision = true positives / all removed; distinct_kept = boilerplate documents kept / distinct.

    python bench/data_neardup.py      (a grid of settings, and the defaults)
"""
from __future__ import annotations

import re
import sysconfig
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

from megaseek.data.clean import CleanConfig, Words
from megaseek.data.dedup import DedupParams, Signer, content_hash, dedup_in_memory, hash_halves


@lru_cache(maxsize=1)
def vocabulary() -> tuple[list, np.ndarray]:
    """(words, probabilities) of the English in the standard library's pydoc topics."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py").read_text(errors="ignore")
    counts = Counter(w.lower() for w in re.findall(r"[A-Za-z]{2,}", text))
    words = sorted(counts)
    p = np.array([counts[w] for w in words], dtype=np.float64)
    return words, p / p.sum()


def draw(rng: np.random.Generator, n: int) -> list:
    words, p = vocabulary()
    return [words[i] for i in rng.choice(len(words), size=n, p=p)]


def substitute(words: list, k: int, rng: np.random.Generator) -> list:
    vocab, p = vocabulary()
    out = list(words)
    for pos in rng.choice(len(words), size=min(k, len(words)), replace=False):
        while True:
            w = vocab[int(rng.choice(len(vocab), p=p))]
            if w != out[pos]:
                out[pos] = w
                break
    return out


def text_of(words: list) -> str:
    return " ".join(words).capitalize() + "."


def near_copies(lengths=(50, 75, 150, 300), ks=(1, 2, 3, 4, 5), pairs: int = 200, seed: int = 0) -> list:
    """[(length, k, original text, copy text)]."""
    rng = np.random.default_rng(seed)
    out = []
    for L in lengths:
        for k in ks:
            for _ in range(pairs):
                w = draw(rng, L)
                out.append((L, k, text_of(w), text_of(substitute(w, k, rng))))
    return out


def boilerplate_docs(distinct: int = 400, doc_words: int = 75, header_words: int = 30, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    header = draw(rng, header_words)
    return [text_of(header + draw(rng, doc_words - header_words)) for _ in range(distinct)]


def run_dedup(texts: list, cfg: CleanConfig) -> dict:
    """{index: reason} of the removed texts (one unit, ordinals = indices)."""
    p = DedupParams(cfg)
    signer = Signer(p.num_perm, p.ngram)
    h1, h2 = hash_halves([content_hash(t) for t in texts])
    sigs = np.stack([signer.signature(Words.of(t)) for t in texts])
    return dedup_in_memory(np.arange(len(texts), dtype=np.int64), h1, h2, sigs, p)


def evaluate(cfg: CleanConfig, lengths=(50, 75, 150, 300), ks=(1, 2, 3, 4, 5), pairs: int = 200,
             distinct: int = 400, header_words: int = 30, doc_words: int = 75, seed: int = 0) -> dict:
    """Precision, recall per (length, k) and the kept fraction of boilerplate documents, in one dedup run
    over all of them (so pairs and boilerplate documents can also collide with each other)."""
    copies = near_copies(lengths, ks, pairs, seed)
    boiler = boilerplate_docs(distinct, doc_words, header_words, seed + 1)
    texts = [t for _, _, a, b in copies for t in (a, b)] + boiler
    removed = run_dedup(texts, cfg)
    tp = fp = 0
    recall: dict = {}
    for i, (L, k, _, _) in enumerate(copies):
        orig, copy = 2 * i, 2 * i + 1
        hit = copy in removed and orig not in removed
        tp += hit
        fp += orig in removed
        recall.setdefault(f"{L}w", {}).setdefault(f"k={k}", []).append(hit)
    base = 2 * len(copies)
    lost = sum(1 for j in range(len(boiler)) if base + j in removed)
    fp += lost
    return {"precision": tp / max(1, tp + fp), "distinct_kept": 1.0 - lost / max(1, len(boiler)),
            "recall": {L: {k: float(np.mean(v)) for k, v in d.items()} for L, d in recall.items()},
            "removed": len(removed), "documents": len(texts)}

