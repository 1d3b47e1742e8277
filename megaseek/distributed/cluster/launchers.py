"""One launcher per node: the command lines of torchrun (c10d rendezvous) and of the deepspeed launcher
(`--no_ssh --node_rank`), the socket-interface environment, and a bounded run of all nodes.

torchrun, c10d rendezvous. The rendezvous store lives on the node started with `--rdzv_conf is_host=1`; the
others pass `is_host=0`. Inside namespaces every node has the machine's hostname, so torchrun cannot tell
which one hosts the store by name, and `--local_addr <the node's address>` is what the workers of the store's
node advertise as MASTER_ADDR. Ranks are handed out node by node: node g gets ranks g*nproc .. g*nproc+nproc-1
(the rendezvous decides g). `--nnodes=MIN:MAX` makes the job elastic.

deepspeed launcher, no ssh. `deepspeed --hostfile H --no_ssh --node_rank i --master_addr A --master_port P
script ...` runs on every node: the hostfile lists every node and its slots (the names are labels only, no
ssh is made), `--node_rank` picks this node's line, and node i gets the ranks after the slots of the lines
above it (deepspeed/launcher/launch.py, DeepSpeed 0.19.8).

Socket interfaces: gloo and NCCL bind to the interface named by GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME. An
explicit environment variable wins, then the cluster preset's `cluster.nccl` entry, then the namespace
cluster's interface. (NCCL accepts `^lo,docker0` exclusion lists; gloo needs a plain name, so gloo never
takes an exclusion list from the preset.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Mapping, Optional, Sequence

from megaseek.distributed.cluster.netns import NetnsCluster

BIN = Path(sys.executable).parent
PORT = 29500  # every node has its own port space: nothing else listens there
# torch 2.13's c10d rendezvous shares one TCPStore across rounds and caches the node-0 address; when a node
# (re)joins an elastic job, the node that stayed rank 0 does not publish MASTER_ADDR for the new round and
# the newcomer waits for it until the store times out. Building the store info every round avoids that.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def socket_env(ifname: str, preset: Optional[Mapping] = None, environ: Optional[Mapping] = None) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME: environment, else the preset's `cluster.nccl`, else `ifname`."""
    environ = os.environ if environ is None else environ
    preset = dict(preset or {})
    out = {}
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        val = environ.get(key) or preset.get(key)
        if key == "GLOO_SOCKET_IFNAME" and val and str(val).startswith("^"):
            val = None  # an exclusion list is NCCL syntax
        out[key] = str(val) if val else ifname
    return out


def torchrun_cmd(cluster: NetnsCluster, node: int, nproc: int, script: Sequence[str], *, nnodes: str = "2",
                 rdzv_id: str = "megaseek", max_restarts: int = 0, rdzv_conf: Optional[Mapping] = None,
                 monitor_interval: float = 0.5) -> list[str]:
    """torchrun on node `node` (node 0 hosts the c10d store). `script` = [path, args...]."""
    host = cluster.nodes[0]
    conf = {"is_host": 1 if node == 0 else 0, **dict(rdzv_conf or {})}
    return [str(BIN / "torchrun"), f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={host.addr}:{PORT}", f"--rdzv_id={rdzv_id}",
            "--rdzv_conf=" + ",".join(f"{k}={v}" for k, v in conf.items()),
            f"--local_addr={cluster.nodes[node].addr}", f"--max_restarts={max_restarts}",
            f"--monitor_interval={monitor_interval}", *script]


def write_hostfile(path: Path, slots: Sequence[int]) -> Path:
    """`node<i> slots=<n>` per node: labels for the deepspeed launcher, never resolved or ssh'd to."""
    path.write_text("".join(f"node{i} slots={n}\n" for i, n in enumerate(slots)))
    return path


def deepspeed_cmd(cluster: NetnsCluster, node: int, hostfile: Path, script: Sequence[str]) -> list[str]:
    """The deepspeed launcher on node `node` without ssh; rank 0 (node 0) hosts the store."""
    return [str(BIN / "deepspeed"), f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={node}",
            f"--master_addr={cluster.nodes[0].addr}", f"--master_port={PORT}", *script]


def node_env(cluster: NetnsCluster, preset: Optional[Mapping] = None, base: Optional[Mapping] = None) -> dict:
    """The launchers' environment: socket interfaces, unbuffered output, no inherited rank variables, and
    torchrun's per-round store bootstrap (see `ELASTIC_ENV`)."""
    env = dict(os.environ if base is None else base)
    env.update(socket_env(cluster.ifname, preset, env))
    env.setdefault("PYTHONUNBUFFERED", "1")
    for k, v in ELASTIC_ENV.items():
        env.setdefault(k, v)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # the launcher sets these
        env.pop(k, None)
    return env


def wait_all(procs: Sequence[subprocess.Popen], timeout_s: float) -> list[int]:
    """Wait for every process; on the first failure or at the deadline kill the rest (their process groups).
    Returns the exit codes (a killed process: -9; past the deadline: 124)."""
    deadline = time.monotonic() + timeout_s
    codes: list[Optional[int]] = [None] * len(procs)
    while any(c is None for c in codes):
        for i, p in enumerate(procs):
            if codes[i] is None and p.poll() is not None:
                codes[i] = p.returncode
        failed = any(c not in (None, 0) for c in codes)
        late = time.monotonic() > deadline
        if failed or late:
            for i, p in enumerate(procs):
                if codes[i] is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait(timeout=10)
                    codes[i] = 124 if late else p.returncode
            break
        time.sleep(0.1)
    return [int(c) for c in codes]


def run_nodes(cluster: NetnsCluster, launcher: str, nproc: int, script: Sequence[str], *, workdir: Path,
              timeout_s: float = 600.0, preset: Optional[Mapping] = None, cwd: Optional[Path] = None,
              logs: Optional[Sequence[IO]] = None) -> list[int]:
    """Run `script` on both nodes with `nproc` ranks each under `launcher` ('torchrun' or 'deepspeed');
    returns the launchers' exit codes (all 0 on success). Output of node i goes to logs[i] (default: inherited)."""
    env = node_env(cluster, preset)
    n = len(cluster.nodes)
    if launcher == "torchrun":
        cmds = [torchrun_cmd(cluster, i, nproc, script, nnodes=str(n), rdzv_id=f"megaseek-{os.getpid()}")
                for i in range(n)]
    elif launcher == "deepspeed":
        hostfile = write_hostfile(Path(workdir) / "hostfile", [nproc] * n)
        cmds = [deepspeed_cmd(cluster, i, hostfile, script) for i in range(n)]
    else:
        raise ValueError(f"launcher must be 'torchrun' or 'deepspeed', got {launcher!r}")
    procs = []
    for i, cmd in enumerate(cmds):  # the store's node first: the others connect to it
        out = logs[i] if logs else None
        procs.append(cluster.popen(i, cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT if out else None))
    return wait_all(procs, timeout_s)
