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
is exact (P^ spans its columns). Vectors (norms, biases) and matrices that would not shrink at least
`min_compression_rate` times (2, the default of torch's powerSGD_hook and of the authors' package: compressed
iff (n + m) r * 2 < n m) are all-reduced whole, in one flat buffer. The first `warmup_steps` calls all-reduce
everything (the paper's "start the compression after a few epochs" practice: early gradients change fast) and
leave the error memory at zero. The bytes of every collective are counted by the tensor-parallel CommCounter
when one is active (ops `powersgd_p`, `powersgd_q`, `powersgd_dense`), and, as all torch.distributed calls, by
the metrics hub's collective counter (megaseek/monitor/comm.py: `comm_bytes` per step in metrics.jsonl).

Checked against torch's powerSGD_hook (the reference): warm-started Q (the previous step's, kept for the
next), P orthonormalized by QR after its all-reduce, error feedback on the compressed matrices only (torch
keeps a memory for the whole bucket, but for tensors reduced whole it sums to zero over the ranks, so the
mean is the same), vectors and matrices below `min_compression_rate` reduced whole in one flat buffer,
clipping after the reduction (the step runner). torch also orthonormalizes the reused Q before P = M Q;
that changes P's basis, not its span, so P^ P^^T and the result are the same.

Measured (bench/powersgd_job.py: the default tiny model, 7.15M parameters, dp=2, seq 128, global batch 16,
AdamW, clip 1.0, 300 steps on the default corpus, rank 4): loss (mean of the last 20 steps) against the
uncompressed run 1.060 with 20 warm-up steps, 1.041 with 60, 1.027 with 100 (error feedback off: 1.100 with
60, 1.068 with 100); bytes per compressed step 0.0185 of the plain run's (theory 0.0185). The gap is the
compression itself, not one tensor or a bug of the reduction: at the plain run's final weights the best rank-4
approximation keeps 24-81% of a matrix's mean-gradient energy (the embedding 30%), and reducing the embedding
whole only moves 1.060 to 1.053. Error feedback delivers the rest later, in bursts, and Adam's per-coordinate
1/sqrt(v) damps bursts, consistent with momentum SGD (the paper's optimizer) losing less: bench/powersgd.py's
small model, 20 warm-up steps, 1.021 with error feedback under SGD vs 1.034 under AdamW (1.051 vs 1.110
without). The gap opens over the first ~80 compressed steps and then holds, and it is smaller the later
compression starts, so the warm-up (torch's advice: >= 10% of the run and >= the learning-rate warm-up, more
until the accuracy is there) is the knob: on this 300-step run 100 steps (1/3) reach the 3% target.

In the training job (`parallel.powersgd.rank` > 0, zero.stage=0) the step runner turns DeepSpeed's backward
all-reduce off and calls `reduce(dp_gradients(module))` over the data-parallel group after the last
backward, before the gradient norm and clipping.

Checkpoints: the reducer's state is rank-local (the error memory e_i is this rank's; Q is the same on the
ranks of a data-parallel group but belongs to this rank's tensor / pipeline shard), so every rank writes
its own `powersgd-rank<r>.safetensors` (step, q.<i>, error.<i>) into the checkpoint directory
(megaseek/ckpt/manager.py `rank_state`). A resume at the same layout (dp, tp, pp, world size) loads it and
continues exactly where the saved run was; at another layout, or from a checkpoint without the file, the
reducer starts from scratch (warm-up again, fresh Q, zero error memory), logs a warning and puts a
`powersgd_restart` record into the first metrics.jsonl line after the resume.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

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


MIN_COMPRESSION_RATE = 2.0  # compress a matrix only when n m >= this x (n + m) r (torch's default)


def compressed_shape(t: torch.Tensor, rank: int,
                     min_compression_rate: float = MIN_COMPRESSION_RATE) -> Optional[tuple[int, int]]:
    """(n, m) when `t` is compressed at `rank`, None when it is reduced whole: a vector, or a matrix whose
    (n + m) r numbers would not be `min_compression_rate` times fewer than its n m."""
    if t.dim() < 2:
        return None
    n, m = t.shape[0], t.numel() // t.shape[0]
    r = min(rank, n, m)
    return (n, m) if (n + m) * r * min_compression_rate < n * m else None


def theoretical_ratio(shapes: Sequence[Sequence[int]], rank: int,
                      min_compression_rate: float = MIN_COMPRESSION_RATE) -> float:
    """Numbers moved per compressed step / numbers of a plain all-reduce of the same tensors."""
    full = comp = 0
    for s in shapes:
        numel = math.prod(s)
        full += numel
        t = torch.empty(s, device="meta")
        nm = compressed_shape(t, rank, min_compression_rate)
        comp += (nm[0] + nm[1]) * min(rank, *nm) if nm else numel
    return comp / full


class PowerSGD:
    """reduce(grads): in place, every tensor becomes the (approximate, rank-r) mean over `group`."""

    def __init__(self, group=None, rank: int = 4, warmup_steps: int = 10, error_feedback: bool = True,
                 seed: int = 0, log: Callable[[str], None] = print,
                 min_compression_rate: float = MIN_COMPRESSION_RATE):
        """`group`: the data-parallel process group (None: the default group). A resumed run restores the
        state with `load_rank_state` (see the module docstring)."""
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be >= 1, got {rank}")
        if warmup_steps < 0:
            raise ValueError(f"PowerSGD warmup_steps must be >= 0, got {warmup_steps}")
        self.group, self.rank, self.warmup_steps = group, int(rank), int(warmup_steps)
        self.error_feedback, self.seed = bool(error_feedback), int(seed)
        self.min_compression_rate = float(min_compression_rate)
        self.step = 0
        self.q: dict[int, torch.Tensor] = {}      # tensor index -> (m, r) right factor, the same on every rank
        self.error: dict[int, torch.Tensor] = {}  # tensor index -> (n, m) error memory of this rank
        self.log = log
        self.notice: Optional[dict] = None        # a warm-up restart at resume, for the next metrics record

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
            nm = compressed_shape(g, self.rank, self.min_compression_rate)
            if nm is None:
                dense.append(g)
                continue
            m = g.reshape(nm)
            if self.error_feedback and i in self.error:
                m = m + self.error[i].to(m)  # (a restored memory may sit on the CPU)
            mats.append((i, g, m))
        self._dense(dense)
        if not mats:
            return
        qs = []
        for i, g, m in mats:
            r = min(self.rank, *m.shape)
            if i not in self.q:
                self.q[i] = self._init_q(i, m.shape[1], r, m)
            qs.append(self.q[i].to(m))
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

    # --- checkpointed state (megaseek/ckpt/manager.py calls these on every rank) ---
    def rank_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """This rank's state as named tensors (step (), q.<i> (m, r), error.<i> (n, m)) and string metadata."""
        tensors = {"step": torch.tensor(self.step, dtype=torch.int64)}
        tensors.update({f"q.{i}": q.detach().contiguous() for i, q in self.q.items()})
        tensors.update({f"error.{i}": e.detach().contiguous() for i, e in self.error.items()})
        meta = {"rank": str(self.rank), "warmup_steps": str(self.warmup_steps),
                "error_feedback": str(int(self.error_feedback)), "dp": str(self._world())}
        return tensors, meta

    def reset(self) -> None:
        """Back to a fresh reducer: the next `warmup_steps` calls all-reduce whole, then a new random Q."""
        self.step, self.q, self.error = 0, {}, {}

    def load_rank_state(self, path: Optional[Path], saved_layout: Mapping, layout: Mapping) -> None:
        """Restore this rank's state from `path` (its file in a checkpoint; None when the checkpoint has none)
        when the checkpoint was written at `layout` (dp, tp, pp, world_size); otherwise start again from
        scratch, with a warning and a `powersgd_restart` record for metrics.jsonl."""
        from safetensors import safe_open
        axes = ("dp", "tp", "pp", "world_size")
        saved = {k: int(saved_layout.get(k, 1)) for k in axes}
        cur = {k: int(layout.get(k, 1)) for k in axes}
        reason = None
        if saved != cur:
            reason = (f"the checkpoint was written at dp={saved['dp']} tp={saved['tp']} pp={saved['pp']}, this run "
                      f"is dp={cur['dp']} tp={cur['tp']} pp={cur['pp']}: the saved error memories and Q factors "
                      f"belong to other data-parallel ranks / shards")
        elif path is None:
            reason = ("the checkpoint holds no PowerSGD state (written without parallel.powersgd, or by an older "
                      "version)")
        else:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if int(meta.get("rank", self.rank)) != self.rank:
                    reason = (f"the checkpoint's reducer ran at parallel.powersgd.rank={meta['rank']}, this run "
                              f"at {self.rank}")
                else:
                    t = {k: f.get_tensor(k) for k in f.keys()}
        if reason is None:
            self.step = int(t.pop("step"))
            self.q = {int(k[2:]): v for k, v in t.items() if k.startswith("q.")}
            self.error = {int(k[6:]): v for k, v in t.items() if k.startswith("error.")} if self.error_feedback else {}
            self.notice = None
            return
        self.reset()
        msg = (f"[powersgd] WARNING: reducer state not restored, warm-up starts again ({self.warmup_steps} steps "
               f"with the full all-reduce, then a fresh Q and zero error memory): {reason}")
        self.log(msg)
        self.notice = {"event": "powersgd_restart", "reason": reason, "warmup_steps": self.warmup_steps,
                       "message": msg}

    def metrics_record(self, t) -> dict:
        """A `Metrics` extra hook: the warm-up restart (once, in the first record after the resume)."""
        notice, self.notice = self.notice, None
        return {"powersgd_restart": dict(notice, step=int(t.step))} if notice else {}
