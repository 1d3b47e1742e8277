"""Time spent in communication: every torch.distributed collective of this process, timed.

`CommTimer.install()` wraps the collectives of `torch.distributed` (DeepSpeed's `deepspeed.comm` calls
them through that module, and its cached all-gather / reduce-scatter functions are wrapped too); `take()`
returns the seconds spent in them since the previous `take()` and `uninstall()` puts the originals back.
Nothing is added to the collectives themselves: no barrier, no device synchronization.

- CPU (gloo): a synchronous collective blocks the caller, so host wall time is its time.
- CUDA (NCCL): the call returns once the kernel is queued, so each call is bracketed by two CUDA events
  on the current stream, read at `take()` (a log step), never in the hot path; a call counts the larger of
  its event time and its host time (a gloo collective on CPU tensors blocks the host instead).
- Asynchronous calls (`async_op=True`) count until they are issued; the wait happens elsewhere.
Nested calls (all_gather_object -> all_gather) count once. The wrapping is process-wide and reference
counted, so several hubs in one process share it.

Bytes: each call also counts the bytes of the tensors it is given (an all-reduce: the reduced tensor; an
all-gather: the output list and the input), read with `take_bytes()`: the logical volume this rank hands to
collectives, e.g. to compare a compressed gradient reduction (PowerSGD) with DeepSpeed's plain all-reduce.
"""
from __future__ import annotations

import functools
import sys
import threading
import time

import torch

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_single",
               "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce",
               "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", "send", "recv", "isend",
               "irecv", "batch_isend_irecv", "gather", "scatter", "all_gather_object", "gather_object",
               "broadcast_object_list", "scatter_object_list", "all_reduce_coalesced")
_DS_CACHED = ("all_gather_function", "reduce_scatter_function")  # deepspeed.comm's TorchBackend caches these


class _State:
    lock = threading.Lock()
    users = 0
    saved: list = []          # (owner, attribute, original)
    seconds = 0.0             # host-timed seconds since the last take
    calls = 0
    nbytes = 0                # tensor bytes handed to collectives since the last take_bytes
    events: list = []         # (start, end) CUDA events not yet read
    local = threading.local()
    use_cuda = False


def _tensor_bytes(args, kwargs) -> int:
    n = 0
    for a in list(args) + list(kwargs.values()):
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor):
                n += t.numel() * t.element_size()
    return n


def _wrap(fn):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        st = _State
        if getattr(st.local, "depth", 0):  # nested: the outer call counts
            return fn(*args, **kwargs)
        st.local.depth = 1
        st.nbytes += _tensor_bytes(args, kwargs)
        try:
            if st.use_cuda and not torch.cuda.is_current_stream_capturing():
                start = torch.cuda.Event(enable_timing=True)
                start.record()
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    host = time.perf_counter() - t0  # a CPU (gloo) collective in a CUDA job blocks the host
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    st.events.append((start, end, host))
                    st.calls += 1
                    if len(st.events) >= 4096:  # a long interval: read the finished ones now
                        _fold_finished()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                st.seconds += time.perf_counter() - t0
                st.calls += 1
        finally:
            st.local.depth = 0
    timed._megaseek_comm = fn
    return timed


def _fold_finished() -> None:
    st, keep = _State, []
    for start, end, host in st.events:
        if end.query():
            st.seconds += max(host, start.elapsed_time(end) / 1000.0)
        else:
            keep.append((start, end, host))
    st.events = keep


def _owners():
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    return [dist, c10d]


class CommTimer:
    """Process-wide collective timer. Create one per hub; `take()` reads and resets the shared total."""

    def __init__(self):
        self.installed = False

    def install(self) -> "CommTimer":
        st = _State
        with st.lock:
            if st.users == 0:
                st.use_cuda = torch.cuda.is_available()
                st.seconds, st.calls, st.events, st.nbytes = 0.0, 0, [], 0
                for owner in _owners():
                    for name in COLLECTIVES:
                        fn = getattr(owner, name, None)
                        if fn is not None and not hasattr(fn, "_megaseek_comm"):
                            st.saved.append((owner, name, fn))
                            setattr(owner, name, _wrap(fn))
                ds = sys.modules.get("deepspeed.comm.comm")
                cdb = getattr(ds, "cdb", None) if ds else None
                for name in _DS_CACHED:
                    fn = getattr(cdb, name, None) if cdb is not None else None
                    if fn is not None and not hasattr(fn, "_megaseek_comm"):
                        st.saved.append((cdb, name, fn))
                        setattr(cdb, name, _wrap(fn))
            st.users += 1
        self.installed = True
        return self

    def take(self) -> tuple[float, int]:
        """(seconds, calls) in collectives since the last take, all threads of this process."""
        st = _State
        with st.lock:
            secs, calls, events = st.seconds, st.calls, st.events
            st.seconds, st.calls, st.events = 0.0, 0, []
        for start, end, host in events:
            try:
                end.synchronize()
                secs += max(host, start.elapsed_time(end) / 1000.0)
            except Exception:  # an event that never ran: count the host time
                secs += host
        return secs, calls

    def take_bytes(self) -> int:
        """Tensor bytes handed to collectives since the last take_bytes, all threads of this process."""
        st = _State
        with st.lock:
            n, st.nbytes = st.nbytes, 0
        return n

    def uninstall(self) -> None:
        if not self.installed:
            return
        self.installed = False
        st = _State
        with st.lock:
            st.users -= 1
            if st.users == 0:
                for owner, name, fn in reversed(st.saved):
                    if hasattr(getattr(owner, name, None), "_megaseek_comm"):
                        setattr(owner, name, fn)
                st.saved = []
