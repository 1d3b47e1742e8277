"""A multi-node cluster on one machine (network namespaces + veth) and the per-node launcher commands."""
from megaseek.distributed.cluster.launchers import (deepspeed_cmd, run_nodes, socket_env, torchrun_cmd,  # noqa: F401
                                                    wait_all, write_hostfile)
from megaseek.distributed.cluster.netns import (BENCHMARK_NET, NetnsCluster, NetnsError, available,  # noqa: F401
                                                check_address, remove_stale)
