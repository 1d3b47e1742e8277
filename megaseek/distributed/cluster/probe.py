"""Run under a launcher on every node: each rank reports its network namespace (the "node" it runs on: ranks
of one node share it) and the tensor-parallel group the training code would give it; rank 0 writes them all.

    probe.py OUT.json TP [PP]      (a trailing --local_rank=N from the deepspeed launcher is ignored)
"""
import json
import os
import sys
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))


def main(argv):
    args = [a for a in argv if not a.startswith("--local_rank") and "=" not in a]  # launcher / Hydra args
    out, tp, pp = args[0], int(args[1]), int(args[2]) if len(args) > 2 else 1
    import torch.distributed as dist
    from megaseek.distributed.groups import ParallelGroups
    from megaseek.distributed.topology import Topology
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = ParallelGroups.build(Topology.from_world(world, tp=tp, pp=pp))
    me = {"rank": rank, "netns": os.readlink("/proc/self/ns/net"), "tp_group": groups.tp.ranks,
          "dp_group": groups.dp.ranks, "local_rank": int(os.environ.get("LOCAL_RANK", "-1")),
          "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "master_addr": os.environ.get("MASTER_ADDR")}
    every = [None] * world
    dist.all_gather_object(every, me)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(every, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
