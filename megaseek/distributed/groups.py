"""Process groups built from a Topology. No module globals: the `ParallelGroups` object travels.

Every rank must create every group in the same order (torch.distributed.new_group is collective),
so we walk all groups of each axis and keep the one that contains this rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from megaseek.distributed.topology import Coord, Topology


@dataclass
class AxisGroup:
    """One process group along one axis, as seen from this rank."""

    group: Any  # torch.distributed.ProcessGroup or None when the axis has size 1 and no dist
    ranks: list[int]
    rank: int  # this process's index inside `ranks`

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass
class ParallelGroups:
    topo: Topology
    global_rank: int
    coord: Coord
    tp: AxisGroup
    dp: AxisGroup
    pp: AxisGroup
    mp: AxisGroup
    embed: AxisGroup  # first + last pipeline stage at the same (dp, tp): tied embedding gradients
    ep: AxisGroup = None   # expert-parallel group (a slice of dp); this rank alone at ep = 1
    edp: AxisGroup = None  # expert-data-parallel group (same experts); = dp at ep = 1

    @classmethod
    def build(cls, topo: Topology) -> "ParallelGroups":
        if dist.is_initialized():
            rank = dist.get_rank()
            if dist.get_world_size() != topo.world_size:
                raise ValueError(f"topology {topo} needs {topo.world_size} ranks, world has {dist.get_world_size()}")
        else:
            if topo.world_size != 1:
                raise ValueError("torch.distributed is not initialized but the topology needs several ranks")
            rank = 0
        axes = {}
        embed_lists = [sorted({g[0], g[-1]}) for g in topo.pp_groups()] if topo.pp > 1 else []
        for axis, lists in (("tp", topo.tp_groups()), ("dp", topo.dp_groups()),
                            ("pp", topo.pp_groups()), ("mp", topo.mp_groups()), ("embed", embed_lists)):
            mine = None
            for ranks in lists:
                g = dist.new_group(ranks) if dist.is_initialized() else None
                if rank in ranks:
                    mine = AxisGroup(group=g, ranks=ranks, rank=ranks.index(rank))
            axes[axis] = mine if mine is not None else AxisGroup(group=None, ranks=[rank], rank=0)
        if topo.ep > 1:  # created after the others, in the same order on every rank
            for axis, lists in (("ep", topo.ep_groups()), ("edp", topo.edp_groups())):
                for ranks in lists:
                    g = dist.new_group(ranks)
                    if rank in ranks:
                        axes[axis] = AxisGroup(group=g, ranks=ranks, rank=ranks.index(rank))
        else:
            axes["ep"], axes["edp"] = AxisGroup(group=None, ranks=[rank], rank=0), axes["dp"]
        return cls(topo=topo, global_rank=rank, coord=topo.coord(rank), **axes)

    def mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """The `mpu` interface DeepSpeed queries, so that ZeRO partitions and reduces over the data-parallel
    group only, and gradient norms sum sharded parameters across the model-parallel group once."""

    def __init__(self, groups: ParallelGroups):
        self.g = groups

    # data parallel
    def get_data_parallel_group(self):
        return self.g.dp.group

    def get_data_parallel_rank(self):
        return self.g.dp.rank

    def get_data_parallel_world_size(self):
        return self.g.dp.size

    def get_data_parallel_group_ranks(self):
        return list(self.g.dp.ranks)

    # model parallel = tensor x pipeline (DeepSpeed sums norms of `tensor_model_parallel` params over it)
    def get_model_parallel_group(self):
        return self.g.mp.group

    def get_model_parallel_rank(self):
        return self.g.mp.rank

    def get_model_parallel_world_size(self):
        return self.g.mp.size

    # tensor parallel
    def get_tensor_model_parallel_group(self):
        return self.g.tp.group

    def get_tensor_model_parallel_rank(self):
        return self.g.tp.rank

    def get_tensor_model_parallel_world_size(self):
        return self.g.tp.size

    def get_tensor_model_parallel_src_rank(self):
        return self.g.tp.ranks[0]

    # pipeline parallel
    def get_pipeline_model_parallel_group(self):
        return self.g.pp.group

    def get_pipeline_model_parallel_rank(self):
        return self.g.pp.rank

    def get_pipeline_model_parallel_world_size(self):
        return self.g.pp.size
