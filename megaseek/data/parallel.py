"""An ordered, bounded parallel map over worker processes (streaming: memory does not grow with input).

At most `window` tasks are in flight; results come back in input order, so the output of a stage
does not depend on the number of workers. workers <= 1 runs inline (no processes). Workers are
spawned (not forked): the caller may hold threads (process groups, tokenizers).
"""
from __future__ import annotations

import multiprocessing as mp
from collections import deque
from typing import Callable, Iterable, Iterator


def ordered_map(fn: Callable, items: Iterable, workers: int, initializer: Callable, initargs: tuple = (),
                window: int = 0) -> Iterator:
    if workers <= 1:
        initializer(*initargs)
        for it in items:
            yield fn(it)
        return
    window = window or 2 * workers + 2
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers, initializer=initializer, initargs=initargs)
    try:
        pending: deque = deque()
        for it in items:
            pending.append(pool.apply_async(fn, (it,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def batched(records: Iterable, max_items: int, max_bytes: int) -> Iterator[list]:
    """Lists of records whose payloads add up to about `max_bytes` (at most `max_items` each)."""
    batch, size = [], 0
    for r in records:
        batch.append(r)
        p = r.payload
        size += len(p) if isinstance(p, (bytes, str)) else 16
        if len(batch) >= max_items or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
