"""The global sample stream: which source, and which of its samples, sits at every position.

Positions 0, 1, 2, ... form windows of `window` samples. Every window holds exactly `counts[s]` samples
of source s (the weights, normalized, times the window, rounded by largest remainder so they add up
to the window), in a seeded order drawn anew for each window. The n-th sample taken from source s is
`perm_e[n mod N_s]` with e = n // N_s: a seeded permutation of that source's N_s samples, new each
epoch (a small source is repeated, a large one is partly used).

Everything is a pure function of (seed, weights, window, sizes): not of dp, tp, pp or the micro batch.
"""
from __future__ import annotations

import zlib
from collections import OrderedDict

import numpy as np


def window_counts(weights: list, window: int) -> np.ndarray:
    """Samples per source in each window: proportional to the weights, summing exactly to `window`."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w <= 0).any():
        raise ValueError(f"blend weights must be > 0, got {list(weights)}")
    exact = w / w.sum() * window
    counts = np.floor(exact).astype(np.int64)
    short = window - int(counts.sum())
    order = np.lexsort((np.arange(len(w)), -(exact - counts)))  # largest remainder, ties by source order
    counts[order[:short]] += 1
    if (counts == 0).any():
        raise ValueError(f"data.blend_window={window} is too small for weights {list(weights)}: a source would get "
                         f"no sample in a window; use a larger window")
    return counts


class _Cache(OrderedDict):
    def __init__(self, size: int, make):
        super().__init__()
        self.size, self.make = size, make

    def get_(self, key):
        if key in self:
            self.move_to_end(key)
            return self[key]
        v = self[key] = self.make(key)
        if len(self) > self.size:
            self.popitem(last=False)
        return v


class BlendSchedule:
    """position -> (source index, sample index within that source's train split)."""

    def __init__(self, names: list, weights: list, sizes: list, window: int, seed: int):
        self.names, self.sizes, self.seed = list(names), [int(n) for n in sizes], int(seed)
        self.window = int(window) if len(names) > 1 else 1
        self.counts = window_counts(weights, self.window)
        self.keys = [zlib.crc32(n.encode()) for n in self.names]
        self._windows = _Cache(4, self._make_window)
        self._perms = _Cache(2 * len(names) + 2, self._make_perm)

    def _make_window(self, w: int):
        labels = np.repeat(np.arange(len(self.counts)), self.counts)
        if len(self.counts) > 1:
            labels = np.random.default_rng([self.seed, 0xB1E4D, w]).permutation(labels)
        rank = np.zeros(len(labels), dtype=np.int64)
        for s in range(len(self.counts)):
            at = labels == s
            rank[at] = np.arange(int(at.sum()))
        return labels, rank

    def _make_perm(self, key):
        s, epoch = key
        return np.random.default_rng([self.seed, self.keys[s], epoch]).permutation(self.sizes[s])

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(source index, sample index) of each global position."""
        pos = np.asarray(positions, dtype=np.int64)
        if len(self.sizes) == 1:  # one source: the n-th sample is the n-th of its epochs
            epoch, j = np.divmod(pos, self.sizes[0])
            return np.zeros(len(pos), dtype=np.int64), np.array(
                [self._perms.get_((0, int(e)))[int(i)] for e, i in zip(epoch, j)], dtype=np.int64)
        src = np.empty(len(pos), dtype=np.int64)
        idx = np.empty(len(pos), dtype=np.int64)
        for i, p in enumerate(pos):
            w, off = divmod(int(p), self.window)
            labels, rank = self._windows.get_(w)
            s = int(labels[off])
            nth = w * int(self.counts[s]) + int(rank[off])
            epoch, j = divmod(nth, self.sizes[s])
            src[i], idx[i] = s, self._perms.get_((s, epoch))[j]
        return src, idx

    def epochs_per_sample(self) -> dict:
        """How many global samples one epoch of each source lasts."""
        return {n: self.sizes[s] * self.window / int(self.counts[s]) for s, n in enumerate(self.names)}
