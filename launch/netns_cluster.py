"""Try the multi-node path on one machine: two network namespaces joined by a veth pair (198.18.0.0/15),
one launcher per "node", everything removed afterwards (also on failure or Ctrl-C). Needs root and iproute2.

    python launch/netns_cluster.py [--launcher torchrun|deepspeed] [--nproc-per-node 2] [--timeout 1800] \
        -- launch/pretrain.py parallel.tp=2 +cluster=netns_2x2 [overrides]

torchrun uses the c10d rendezvous (node 0 hosts the store: --rdzv_conf is_host=1, --local_addr); the deepspeed
launcher runs with --no_ssh --node_rank and a hostfile of both nodes. GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
come from the environment, else from the `+cluster=NAME` preset's `cluster.nccl`, else the veth interface.
Each node's output is printed with a `[nodeN]` prefix; the exit code is the first non-zero launcher code.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from megaseek.distributed.cluster import NetnsCluster, available, run_nodes

REPO = Path(__file__).resolve().parents[1]


def preset_of(script_args: list[str]) -> dict:
    """The `cluster:` section of a `+cluster=NAME` override in the script's arguments ({} without one)."""
    import yaml
    for a in script_args:
        if a.startswith("+cluster="):
            path = REPO / "conf" / "cluster" / f"{a.split('=', 1)[1]}.yaml"
            if not path.is_file():
                raise SystemExit(f"{a}: no preset {path}")
            return dict(yaml.safe_load(path.read_text()).get("cluster") or {})
    return {}


def _pump(src, prefix: str) -> None:
    for line in iter(src.readline, b""):
        sys.stdout.buffer.write(prefix.encode() + line)
        sys.stdout.buffer.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    p.add_argument("--nproc-per-node", type=int, default=0, help="ranks per node (default: the preset's "
                   "cluster.ranks_per_node, else 2)")
    p.add_argument("--subnet", default=None, help="inside 198.18.0.0/15 (default: the preset's, else 198.18.0.0/24)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before every node is killed")
    p.add_argument("script", nargs=argparse.REMAINDER, help="-- script.py [args]")
    args = p.parse_args(argv)
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        p.error("give the script to run after --, e.g. -- launch/pretrain.py parallel.tp=2")
    why = available()
    if why:
        print(f"netns_cluster: {why}", file=sys.stderr)
        return 2
    preset = preset_of(script)
    net = dict(preset.get("netns") or {})
    nproc = args.nproc_per_node or int(preset.get("ranks_per_node") or 2)
    cluster = NetnsCluster(subnet=args.subnet or net.get("subnet", "198.18.0.0/24"),
                           ifname=net.get("ifname", "msnet0"))

    def stop(signum, frame):  # Ctrl-C / SIGTERM: unwind through the with-block, which removes everything
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory(prefix="netns-cluster-") as work, cluster:
        print(f"netns_cluster: nodes {[(n.netns, n.addr) for n in cluster.nodes]} on {cluster.ifname}, "
              f"{args.launcher} x {nproc} ranks each", flush=True)
        pipes = [os.pipe() for _ in cluster.nodes]
        logs = [os.fdopen(w, "wb") for _, w in pipes]
        pumps = [threading.Thread(target=_pump, args=(os.fdopen(r, "rb"), f"[node{i}] "), daemon=True)
                 for i, (r, _) in enumerate(pipes)]
        for t in pumps:
            t.start()
        try:
            codes = run_nodes(cluster, args.launcher, nproc, script, workdir=Path(work), timeout_s=args.timeout,
                              preset=preset.get("nccl"), cwd=Path.cwd(), logs=logs)
        except KeyboardInterrupt:
            codes = [130]
        finally:
            for f in logs:
                f.close()
            for t in pumps:
                t.join(timeout=5)
    left = cluster.exists()
    print(f"netns_cluster: launchers exited {codes}; namespaces left: {left or 'none'}", flush=True)
    return next((c for c in codes if c != 0), 0) if not left else 1


if __name__ == "__main__":
    sys.exit(main())
