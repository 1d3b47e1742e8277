"""PowerSGD compression of the data-parallel gradient reduction (Vogels, Karimireddy & Jaggi, NeurIPS 2019).

Each gradient of a weight matrix, viewed as M (n, m) = (shape[0], prod(shape[1:])), is replaced on every
rank by a rank-r approximation of the mean over the group, built from one power iteration that is warm-
started from the previous step's right factor Q (m, r):

    M_i  <- M_i + e_i                    error feedback: what earlier compressions dropped (rank i's memory)
    P    =  sum_i M_i Q                  all-reduce of (n, r)
    P^   =  orthonormal columns of P     (QR; the same on every rank)
    Q    =  (1/w) sum_i M_i^T P^         all-reduce of (m, r), kept for the next step
    M^   =  P^ Q^T                       = P^ P^^T mean_i(M_i): the mean projected on P^'s column span
    e_i  <- M_i - M^                     (error feedback on; e_i = 0 when off)

so a step moves (n + m) r numbers per matrix instead of n m. When the mean gradient has rank <= r the result
is exact (P^ spans its columns). Vectors (norms, biases) and matrices that would not shrink ((n + m) r >=
n m) are all-reduced whole, in one flat buffer. The first `warmup_steps` calls all-reduce everything (the
paper's "start the compression after a few epochs" practice: early gradients change fast) and leave the
error memory at zero. The bytes of every collective are counted by the tensor-parallel CommCounter when
one is active (ops `powersgd_p`, `powersgd_q`, `powersgd_dense`), and, as all torch.distributed calls, by
the metrics hub's collective counter (megaseek/monitor/comm.py: `comm_bytes` per step in metrics.jsonl).

In the training job (`parallel.powersgd.rank` > 0, zero.stage=0) the step runner turns DeepSpeed's backward
all-reduce off and calls `reduce(dp_gradients(module))` over the data-parallel group after the last
backward, before the gradient norm and clipping. The reducer's state (step, Q, error memory) is not
checkpointed: a resumed run starts its warm-up again.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def _error(msg: str) -> Exception:
    try:  # the config package's error when it is there (the launchers exit 2 on it)
        from megaseek.config.schema import ConfigError
        return ConfigError(msg)
    except ImportError:
        return ValueError(msg)


def check_powersgd(rank: int, warmup_steps: int, zero_stage: int, ep: int = 1) -> None:
    """`parallel.powersgd.*` against the run. PowerSGD replaces the data-parallel all-reduce, so it needs a
    reduction we own: ZeRO stage 0, where DeepSpeed's backward all-reduce can be turned off and the reducer
    runs on the module's gradients before the gradient norm. ZeRO 1-3 partition and reduce the gradients
    inside DeepSpeed's ZeRO optimizer (reduce-scatter into its flat partitions), where a low-rank reduction
    cannot be inserted. Tensor and pipeline parallelism are fine: every (tp, pp) rank compresses its own
    shard over its own data-parallel group (an exact reduction stays exact; at low rank each shard is
    approximated on its own)."""
    rank, warmup_steps, zero_stage = int(rank), int(warmup_steps), int(zero_stage)
    if rank == 0:
        return
    if rank < 0:
        raise _error(f"parallel.powersgd.rank={rank} must be >= 1 (or 0: compression off)")
    if warmup_steps < 0:
        raise _error(f"parallel.powersgd.warmup_steps={warmup_steps} must be >= 0")
    if zero_stage != 0:
        raise _error(f"parallel.powersgd.rank={rank} needs zero.stage=0 (we own the data-parallel reduction "
                     f"there); zero.stage={zero_stage} reduces gradients inside DeepSpeed's ZeRO optimizer. "
                     f"Use zero.stage=0, or parallel.powersgd.rank=0 to turn the compression off")
    if int(ep) > 1:
        raise _error(f"parallel.powersgd.rank={rank} with parallel.ep={ep}: expert gradients are reduced over the "
                     f"expert-data-parallel group, which the reducer does not handle; use parallel.ep=1")


def dp_gradients(module: torch.nn.Module) -> list[torch.Tensor]:
    """The gradients the data-parallel reduction averages, in parameter order (the same list on every
    data-parallel rank of a stage). A trainable parameter without a gradient gets zeros, as DeepSpeed's own
    reduction does, so every rank reduces tensors of the same shapes."""
    out = []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        out.append(p.grad)
    return out


def _counter():
    try:
        from megaseek.tensor_parallel.mappings import CommCounter
    except ImportError:
        return None
    return CommCounter.active


def _orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning p (n, r): the Q of a reduced QR, in fp32."""
    q, _ = torch.linalg.qr(p.float(), mode="reduced")
    return q.to(p.dtype)


def compressed_shape(t: torch.Tensor, rank: int) -> Optional[tuple[int, int]]:
    """(n, m) when `t` is compressed at `rank`, None when it is reduced whole."""
    if t.dim() < 2:
        return None
    n, m = t.shape[0], t.numel() // t.shape[0]
    r = min(rank, n, m)
    return (n, m) if (n + m) * r < n * m else None


def theoretical_ratio(shapes: Sequence[Sequence[int]], rank: int) -> float:
    """Numbers moved per compressed step / numbers of a plain all-reduce of the same tensors."""
    full = comp = 0
    for s in shapes:
        numel = math.prod(s)
        full += numel
        t = torch.empty(s, device="meta")
        nm = compressed_shape(t, rank)
        comp += (nm[0] + nm[1]) * min(rank, *nm) if nm else numel
    return comp / full


class PowerSGD:
    """reduce(grads): in place, every tensor becomes the (approximate, rank-r) mean over `group`."""

    def __init__(self, group=None, rank: int = 4, warmup_steps: int = 10, error_feedback: bool = True,
                 seed: int = 0):
        """`group`: the data-parallel process group (None: the default group). A resumed run builds a new
        reducer: warm-up, the right factors Q and the error memory start again from scratch."""
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be >= 1, got {rank}")
        if warmup_steps < 0:
            raise ValueError(f"PowerSGD warmup_steps must be >= 0, got {warmup_steps}")
        self.group, self.rank, self.warmup_steps = group, int(rank), int(warmup_steps)
        self.error_feedback, self.seed = bool(error_feedback), int(seed)
        self.step = 0
        self.q: dict[int, torch.Tensor] = {}      # tensor index -> (m, r) right factor, the same on every rank
        self.error: dict[int, torch.Tensor] = {}  # tensor index -> (n, m) error memory of this rank

    def _world(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    def _all_reduce(self, flat: torch.Tensor, op: str) -> None:
        c = _counter()
        if c is not None:
            c.add(op, flat)
        if self._world() > 1:
            dist.all_reduce(flat, group=self.group)

    def _dense(self, grads: list[torch.Tensor]) -> None:
        """All-reduce whole (one flat buffer), then divide by the world: the exact mean."""
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._all_reduce(flat, "powersgd_dense")
        flat /= self._world()
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()

    def _init_q(self, i: int, m: int, r: int, like: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)  # identical on every rank
        return torch.randn(m, r, generator=gen, dtype=torch.float32).to(device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def reduce(self, grads: Sequence[torch.Tensor]) -> None:
        grads = list(grads)
        self.step += 1
        if self.step <= self.warmup_steps:
            self._dense(grads)
            return
        world = self._world()
        dense, mats = [], []  # mats: (index, grad, M (n, m) incl. error)
        for i, g in enumerate(grads):
            nm = compressed_shape(g, self.rank)
            if nm is None:
                dense.append(g)
                continue
            m = g.reshape(nm)
            if self.error_feedback and i in self.error:
                m = m + self.error[i]
            mats.append((i, g, m))
        self._dense(dense)
        if not mats:
            return
        qs = []
        for i, g, m in mats:
            r = min(self.rank, *m.shape)
            if i not in self.q:
                self.q[i] = self._init_q(i, m.shape[1], r, m)
            qs.append(self.q[i])
        ps = [m @ q for (_, _, m), q in zip(mats, qs)]                  # (n, r) each
        flat_p = torch.cat([p.reshape(-1) for p in ps])
        self._all_reduce(flat_p, "powersgd_p")                            # sum_i M_i Q
        off, phat = 0, []
        for p in ps:
            phat.append(_orthonormalize(flat_p[off:off + p.numel()].view_as(p)))
            off += p.numel()
        qn = [m.t() @ ph for (_, _, m), ph in zip(mats, phat)]            # (m, r) each
        flat_q = torch.cat([q.reshape(-1) for q in qn])
        self._all_reduce(flat_q, "powersgd_q")
        flat_q /= world                                                   # (1/w) sum_i M_i^T P^
        off = 0
        for (i, g, m), ph, q in zip(mats, phat, qn):
            q = flat_q[off:off + q.numel()].view_as(q)
            off += q.numel()
            approx = ph @ q.t()                                           # (n, m)
            if self.error_feedback:
                self.error[i] = m - approx
            self.q[i] = q.clone()
            g.copy_(approx.view_as(g))
