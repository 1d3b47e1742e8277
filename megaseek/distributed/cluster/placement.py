"""Which node holds which rank, and whether a layout keeps every tensor-parallel group inside one node.

Both launchers number ranks node by node (torchrun: group_rank * nproc_per_node + local_rank; deepspeed:
the slots of the hostfile lines above this node, then local_rank), so with n ranks per node

    node(rank) = rank // n

Tensor ranks are innermost in the topology (rank = pp * dp * tp + d * tp + t), so a tp group is a run of tp
consecutive ranks starting at a multiple of tp: it stays inside a node exactly when tp divides n.
"""
from __future__ import annotations

from megaseek.distributed.topology import Topology


def node_of(rank: int, ranks_per_node: int) -> int:
    return rank // ranks_per_node


def groups_across_nodes(groups: list[list[int]], node_of_rank) -> list[list[int]]:
    """The groups whose ranks sit on more than one node (`node_of_rank`: rank -> node id)."""
    return [g for g in groups if len({node_of_rank(r) for r in g}) > 1]


def tp_groups_across_nodes(topo: Topology, ranks_per_node: int) -> list[list[int]]:
    """The tensor-parallel groups of `topo` that would span two nodes of `ranks_per_node` ranks each."""
    return groups_across_nodes(topo.tp_groups(), lambda r: node_of(r, ranks_per_node))
