"""Process topology: pure rank <-> (pp, dp, tp) coordinate arithmetic. No process groups here.

Axis order, outermost first: pipeline, data, tensor.

    rank = pp * (dp_size * tp_size) + dp * tp_size + tp

Tensor ranks are innermost so that one tensor-parallel group sits on consecutive ranks (one node,
the fastest links); pipeline stages are outermost so that stage boundaries cross nodes, where only
point-to-point activations travel.

Expert parallelism (`ep`) is carved out of the data-parallel ranks of each (pp, tp) slice: data-parallel index
d = k * ep + j. The expert-parallel group (k fixed, j = 0..ep-1: consecutive data-parallel ranks) shares the
routed experts, E/ep each, and exchanges tokens by all-to-all; the expert-data-parallel group (j fixed, k =
0..dp/ep-1) holds the same experts and reduces their gradients. Non-expert parameters stay replicated over the
whole data-parallel group.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Coord:
    pp: int
    dp: int
    tp: int


@dataclass(frozen=True)
class Topology:
    """A (pp, dp, tp) grid of `world_size = pp * dp * tp` ranks."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1  # expert-parallel degree, a divisor of dp

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp % self.ep:
            raise ValueError(f"parallel.ep={self.ep} must divide the data-parallel degree {self.dp} "
                             f"(experts are sharded over data-parallel ranks)")

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, pp: int = 1, ep: int = 1) -> "Topology":
        """dp = world_size / (tp * pp); refuses a layout that does not divide the world."""
        if tp < 1 or pp < 1:
            raise ValueError(f"parallel.tp={tp} and parallel.pp={pp} must be >= 1")
        if world_size % (tp * pp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {tp} * {pp} = {tp * pp}; "
                f"choose tp and pp whose product divides the number of ranks")
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp), ep=ep)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        tp = rank % self.tp
        dp = (rank // self.tp) % self.dp
        pp = rank // (self.tp * self.dp)
        return Coord(pp=pp, dp=dp, tp=tp)

    def rank(self, pp: int = 0, dp: int = 0, tp: int = 0) -> int:
        if not (0 <= pp < self.pp and 0 <= dp < self.dp and 0 <= tp < self.tp):
            raise ValueError(f"coordinate (pp={pp}, dp={dp}, tp={tp}) outside {self}")
        return pp * (self.dp * self.tp) + dp * self.tp + tp

    # --- the rank lists of every group along one axis (each list is one process group) ---
    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def mp_groups(self) -> list[list[int]]:
        """Model-parallel groups (tp x pp): the ranks that together hold one model replica."""
        return [[self.rank(p, d, t) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)]

    def ep_groups(self) -> list[list[int]]:
        """Expert-parallel groups: ep consecutive data-parallel ranks of one (pp, tp) slice."""
        return [[self.rank(p, k * self.ep + j, t) for j in range(self.ep)]
                for p in range(self.pp) for t in range(self.tp) for k in range(self.dp // self.ep)]

    def edp_groups(self) -> list[list[int]]:
        """Expert-data-parallel groups: the ranks holding the same experts (same j = dp index mod ep)."""
        return [[self.rank(p, k * self.ep + j, t) for k in range(self.dp // self.ep)]
                for p in range(self.pp) for t in range(self.tp) for j in range(self.ep)]

    def group_of(self, rank: int, axis: str) -> list[int]:
        groups = {"tp": self.tp_groups, "dp": self.dp_groups, "pp": self.pp_groups, "mp": self.mp_groups,
                  "ep": self.ep_groups, "edp": self.edp_groups}[axis]()
        return next(g for g in groups if rank in g)
