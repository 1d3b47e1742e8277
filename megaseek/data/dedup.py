"""Deduplication: exact (content hash) and near-duplicate (MinHash + LSH, datasketch).

Signatures are computed where the document is cleaned (worker processes): shingles are word n-grams
(`shingle_ngram`, each CJK character a word) hashed with a stable hash, fed to datasketch's MinHash.
The `Deduper` (one per source, in the main process) keeps the first document of every duplicate
group in stream order: a document is an exact duplicate when its content hash was seen, a near
duplicate when an LSH candidate's estimated Jaccard similarity is >= `near_threshold`.

Memory: per kept document a 16-byte hash and one signature (4 x num_perm bytes) plus the LSH band
keys, never the text.
"""
from __future__ import annotations

import hashlib
import zlib
from typing import Optional

import numpy as np
from datasketch import MinHash, MinHashLSH

from megaseek.data.clean import Words, ngram_keys

_SEED = 1
_CHUNK = 8192  # shingles per MinHash update: bounds the (shingles x num_perm) temporary


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


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


class Deduper:
    """Exact and near-duplicate removal over one stream of documents; keeps the first of each group."""

    def __init__(self, exact: bool, near: bool, threshold: float, num_perm: int):
        self.exact, self.near, self.threshold, self.num_perm = exact, near, threshold, num_perm
        self.seen: set = set()
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm) if near else None
        self.sigs: list = []
        self._proto = MinHash(num_perm=num_perm, seed=_SEED, hashfunc=_identity, scheme="affine32")

    def check(self, digest: bytes, sig: Optional[np.ndarray]) -> Optional[str]:
        """'exact_duplicate', 'near_duplicate', or None (then the document is kept and remembered)."""
        if self.exact:
            if digest in self.seen:
                return "exact_duplicate"
        if self.near and sig is not None:
            mh = self._proto.copy()
            mh.hashvalues = sig.astype(mh.hashvalues.dtype)
            for key in self.lsh.query(mh):
                if float(np.mean(self.sigs[key] == sig)) >= self.threshold:
                    return "near_duplicate"
            self.lsh.insert(len(self.sigs), mh, check_duplication=False)
            self.sigs.append(sig)
        if self.exact:
            self.seen.add(digest)
        return None


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))
