"""An ordered, bounded parallel map over worker processes (streaming: memory does not grow with input).

At most `window` tasks are in flight; results come back in input order, so the output of a stage
does not depend on the number of workers. workers <= 1 runs inline (no processes). Workers are
spawned, not forked (the caller may hold threads: process groups, tokenizers), unless the main module
cannot be re-imported (a script read from stdin); a worker that dies raises, it never hangs the stage.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator


def pool_context():
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.isfile(main_file):
        return mp.get_context("fork")   # spawn would re-import a main module that is not a file
    return mp.get_context("spawn")


def ordered_map(fn: Callable, items: Iterable, workers: int, initializer: Callable, initargs: tuple = (),
                window: int = 0) -> Iterator:
    if workers <= 1:
        initializer(*initargs)
        for it in items:
            yield fn(it)
        return
    window = window or 2 * workers + 2
    with ProcessPoolExecutor(workers, mp_context=pool_context(), initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        try:
            for it in items:
                pending.append(pool.submit(fn, it))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


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
