"""Deduplication math shared by every engine: content hashes, MinHash signatures, LSH bands, candidate
pairs, their verification, and the in-memory reference (`dedup_in_memory`) of the local engine.

Definitions (the same whichever engine runs them, so the kept set never depends on it or on the worker count):
  ordinal       a document's place in the source: unit index << 32 | row within the unit (stream order)
  exact         documents with the same content hash (blake2b-128 of the cleaned text) form a group;
                the smallest ordinal survives, the others are `exact_duplicate`
  signature     MinHash over the set S(d) of word n-gram shingles (`shingle_ngram`, each CJK character a
                word; a document shorter than n: one shingle of all its words), `num_perm` 32-bit affine
                permutations (datasketch): P[sig_a[i] == sig_b[i]] = J(a, b) = |S(a) & S(b)| / |S(a) | S(b)|
  bands         the signature cut into `bands` bands of `rows` values; band j of a document hashes to one
                64-bit bucket key (j is part of the key). Two documents are candidates when any bucket is
                shared: P = 1 - (1 - J^rows)^bands
  pairs         per bucket, sorted by ordinal, each member with its `max_pairs_per_member` predecessors
                (all pairs of a bucket up to that size; bounded work for huge buckets)
  verified      a candidate pair is an edge when the estimated Jaccard mean(sig_a == sig_b) >= `near_threshold`
  clusters      connected components of the edges among the exact survivors; the smallest ordinal of each
                component survives, the others are `near_duplicate`
"""
from __future__ import annotations

import hashlib
import zlib

import numpy as np
from datasketch import MinHash

from megaseek.data.clean import Words, ngram_keys

_SEED = 1
_CHUNK = 8192  # shingles per MinHash update: bounds the (shingles x num_perm) temporary
UNIT_SHIFT = 32
_MULT = np.uint64(0x9E3779B97F4A7C15)


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def hash_halves(digests: list) -> tuple[np.ndarray, np.ndarray]:
    """16-byte hashes -> two int64 columns (what the engines shuffle on)."""
    a = np.frombuffer(b"".join(digests), dtype=np.int64).reshape(-1, 2) if digests else np.zeros((0, 2), np.int64)
    return a[:, 0].copy(), a[:, 1].copy()


def _identity(x):
    return x


class Signer:
    """MinHash signatures of word n-gram shingles (datasketch, 32-bit affine permutations)."""

    def __init__(self, num_perm: int, ngram: int):
        self.num_perm, self.ngram = num_perm, ngram
        self.proto = MinHash(num_perm=num_perm, seed=_SEED, hashfunc=_identity, scheme="affine32")

    def shingles(self, words: Words) -> np.ndarray:
        """uint32 hashes of the distinct word n-grams (a shorter document: one shingle of all its words)."""
        word_hash = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words.uniq), dtype=np.int64,
                                count=len(words.uniq))
        stable = word_hash[words.ids] if len(words.ids) else word_hash
        n = min(self.ngram, max(1, len(stable)))
        keys = ngram_keys(stable, n)
        keys = np.unique(keys ^ (keys >> np.uint64(32)))
        return keys.astype(np.uint32)

    def signature(self, words: Words) -> np.ndarray:
        m = self.proto.copy()
        sh = self.shingles(words)
        for i in range(0, len(sh), _CHUNK):
            m.update_batch(sh[i:i + _CHUNK])
        return np.asarray(m.hashvalues, dtype=np.uint32)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def candidate_probability(j: float, bands: int, rows: int) -> float:
    """P[two documents of Jaccard similarity j share at least one bucket] = 1 - (1 - j^rows)^bands."""
    return 1.0 - (1.0 - j ** rows) ** bands


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, num_perm) uint32 signatures -> (n, bands) bucket keys as int64 (band index mixed in)."""
    n = sigs.shape[0]
    out = np.empty((n, bands), dtype=np.uint64)
    s = sigs.astype(np.uint64)
    with np.errstate(over="ignore"):
        for j in range(bands):
            h = np.full(n, j + 1, dtype=np.uint64)
            for c in range(j * rows, (j + 1) * rows):
                h = h * _MULT + s[:, c] + np.uint64(1)
            h ^= h >> np.uint64(31)                        # splitmix-style finish: well spread keys
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(29)
            out[:, j] = h
    return out.view(np.int64)


def bucket_pairs(keys: np.ndarray, ords: np.ndarray, max_pairs_per_member: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (u < v) from (bucket key, ordinal) rows holding whole buckets: within each bucket,
    sorted by ordinal, every member is paired with its `max_pairs_per_member` predecessors."""
    if len(keys) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((ords, keys))
    k, o = keys[order], ords[order]
    us, vs = [], []
    for d in range(1, max_pairs_per_member + 1):
        same = k[d:] == k[:-d]
        if not same.any():
            break
        us.append(o[:-d][same])
        vs.append(o[d:][same])
    if not us:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    u, v = np.concatenate(us), np.concatenate(vs)
    keep = u != v
    return u[keep], v[keep]


def unique_pairs(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(u) == 0:
        return u, v
    pairs = np.unique(np.stack([u, v], axis=1), axis=0)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def similar(sig_u: np.ndarray, sig_v: np.ndarray, threshold: float) -> np.ndarray:
    """(m, num_perm) x 2 -> (m,) bool: estimated Jaccard >= threshold."""
    if len(sig_u) == 0:
        return np.zeros(0, dtype=bool)
    return (sig_u == sig_v).mean(axis=1) >= threshold - 1e-12


def sigs_of(column) -> np.ndarray:
    """A column of signature bytes (num_perm x uint32 each) -> (n, num_perm) uint32."""
    col = list(column)
    if not col:
        return np.zeros((0, 0), dtype=np.uint32)
    return np.frombuffer(b"".join(col), dtype=np.uint32).reshape(len(col), -1)


def components(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over edges: (nodes, smallest node of each one's component), both int64, nodes sorted."""
    nodes = np.unique(np.concatenate([u, v])) if len(u) else np.zeros(0, np.int64)
    idx = {int(x): i for i, x in enumerate(nodes)}
    parent = list(range(len(nodes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(u.tolist(), v.tolist()):
        ra, rb = find(idx[a]), find(idx[b])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)    # nodes are sorted: the root is the component's smallest
    roots = np.fromiter((nodes[find(i)] for i in range(len(nodes))), dtype=np.int64, count=len(nodes))
    return nodes, roots


def exact_duplicates(ords: np.ndarray, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    """Ordinals that repeat an earlier (smaller-ordinal) document's content hash."""
    if len(ords) == 0:
        return ords
    order = np.lexsort((ords, h2, h1))
    a, b, o = h1[order], h2[order], ords[order]
    dup = np.zeros(len(o), dtype=bool)
    dup[1:] = (a[1:] == a[:-1]) & (b[1:] == b[:-1])
    return o[dup]


def dedup_in_memory(ords: np.ndarray, h1: np.ndarray, h2: np.ndarray, sigs, p) -> dict:
    """The local engine's dedup of one source, in one process: {ordinal: reason} of every removed document.

    ords (n,) int64, h1/h2 (n,) int64 content-hash halves, sigs (n, num_perm) uint32 or None, p: DedupParams.
    """
    removed: dict = {}
    alive = np.ones(len(ords), dtype=bool)
    if p.exact:
        ex = exact_duplicates(ords, h1, h2)
        removed.update((int(o), "exact_duplicate") for o in ex)
        alive &= ~np.isin(ords, ex)
    if p.near and sigs is not None and len(ords):
        o, s = ords[alive], sigs[alive]
        keys = band_keys(s, p.bands, p.rows)                                   # (n, bands)
        u, v = bucket_pairs(keys.reshape(-1), np.repeat(o, p.bands), p.max_pairs_per_member)
        u, v = unique_pairs(u, v)
        pos = {int(x): i for i, x in enumerate(o)}
        iu = np.fromiter((pos[int(x)] for x in u), dtype=np.int64, count=len(u))
        iv = np.fromiter((pos[int(x)] for x in v), dtype=np.int64, count=len(v))
        ok = similar(s[iu], s[iv], p.threshold)
        nodes, roots = components(u[ok], v[ok])
        removed.update((int(n), "near_duplicate") for n, r in zip(nodes, roots) if n != r)
    return removed


def lsh_params(threshold: float, num_perm: int, fn_weight: float = 0.8) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimizing the weighted area of false negatives
    (J >= threshold, not a candidate) and false positives (J < threshold, a candidate; verification drops
    them, they only cost work): fn_weight * int_t^1 (1 - P) dJ + (1 - fn_weight) * int_0^t P dJ."""
    best, best_cost = (1, num_perm), float("inf")
    lo, hi = np.linspace(0.0, threshold, 201), np.linspace(threshold, 1.0, 201)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1.0 - (1.0 - lo ** r) ** b, lo)
            fn = np.trapezoid((1.0 - hi ** r) ** b, hi)
            cost = fn_weight * fn + (1.0 - fn_weight) * fp
            if cost < best_cost - 1e-12:
                best, best_cost = (b, r), cost
    return best


class DedupParams:
    """The dedup settings of one source (from its CleanConfig); bands/rows chosen when not given."""

    def __init__(self, cfg):
        self.exact, self.near = bool(cfg.exact_dedup), bool(cfg.near_dedup)
        self.threshold, self.num_perm, self.ngram = float(cfg.near_threshold), int(cfg.num_perm), int(cfg.shingle_ngram)
        if cfg.lsh_bands and cfg.lsh_rows:
            self.bands, self.rows = int(cfg.lsh_bands), int(cfg.lsh_rows)
        else:
            self.bands, self.rows = lsh_params(self.threshold, self.num_perm)
        self.max_pairs_per_member = int(cfg.max_pairs_per_member)

    def as_dict(self) -> dict:
        return dict(vars(self))
