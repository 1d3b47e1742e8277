"""Two nodes on one machine (network namespaces joined by a veth pair, 198.18.0.0/15): torchrun (c10d
rendezvous) and the deepspeed launcher (--no_ssh --node_rank) train 2 nodes x 2 ranks at (tp=2 inside each
node, dp=2 across) equal to one process; no tensor-parallel group spans two nodes; nothing is left behind."""
import json
import os
import subprocess
import sys

import pytest

from megaseek.distributed.cluster import NetnsCluster, check_address, run_nodes, socket_env
from megaseek.distributed.cluster.netns import namespaces, pids_in
from megaseek.distributed.cluster.placement import groups_across_nodes, tp_groups_across_nodes
from megaseek.distributed.topology import Topology
from tests.helpers import REPO
from tests.netns_support import BASE, losses_by_step, need_netns, reference_losses

PROBE = str(REPO / "megaseek" / "distributed" / "cluster" / "probe.py")


def test_only_the_benchmarking_range():
    for ok in ("198.18.0.1", "198.19.255.254", "198.18.4.0/24"):
        assert check_address(ok) == ok
    for bad in ("10.0.0.1", "172.16.0.1", "192.168.1.1", "8.8.8.8", "198.20.0.1", "198.16.0.0/14"):
        with pytest.raises(ValueError, match="outside the benchmarking range 198.18.0.0/15"):
            check_address(bad)
    with pytest.raises(ValueError, match="10.1.0.0/24 is outside"):
        NetnsCluster(subnet="10.1.0.0/24")
    c = NetnsCluster(subnet="198.19.7.0/30")
    assert [n.addr for n in c.nodes] == ["198.19.7.1", "198.19.7.2"]


def test_socket_interface_precedence():
    preset = {"NCCL_SOCKET_IFNAME": "^lo,docker0", "GLOO_SOCKET_IFNAME": "eth9"}
    # the environment wins, then the preset, then the cluster's interface; gloo never takes an exclusion list
    assert socket_env("msnet0", preset, {"NCCL_SOCKET_IFNAME": "ib0"}) == {"GLOO_SOCKET_IFNAME": "eth9",
                                                                         "NCCL_SOCKET_IFNAME": "ib0"}
    assert socket_env("msnet0", preset, {}) == {"GLOO_SOCKET_IFNAME": "eth9", "NCCL_SOCKET_IFNAME": "^lo,docker0"}
    assert socket_env("msnet0", {"GLOO_SOCKET_IFNAME": "^lo"}, {}) == {"GLOO_SOCKET_IFNAME": "msnet0",
                                                                       "NCCL_SOCKET_IFNAME": "msnet0"}
    from tests.helpers import compose
    cfg = compose(["+cluster=netns_2x2"])
    assert socket_env("x", cfg.cluster.nccl, {}) == {"GLOO_SOCKET_IFNAME": "msnet0", "NCCL_SOCKET_IFNAME": "msnet0"}


def test_tensor_groups_stay_inside_a_node():
    # every layout whose tp divides the ranks per node keeps each tp group on one node ...
    for per_node in (1, 2, 4, 8):
        for nodes in (1, 2, 4):
            world = per_node * nodes
            for tp in (1, 2, 4, 8):
                for pp in (1, 2, 4):
                    if world % (tp * pp) or per_node % tp:
                        continue
                    assert tp_groups_across_nodes(Topology.from_world(world, tp=tp, pp=pp), per_node) == []
    # ... and one whose tp exceeds a node is caught: tp=4 on 2-rank nodes spans both
    assert tp_groups_across_nodes(Topology(tp=4, dp=1), 2) == [[0, 1, 2, 3]]
    # the data-parallel groups of (tp=2, dp=2) on 2 x 2 do cross the nodes (that is the point)
    assert groups_across_nodes(Topology(tp=2, dp=2).dp_groups(), lambda r: r // 2) == [[0, 2], [1, 3]]


def test_cluster_removed_also_on_failure():
    need_netns()
    with pytest.raises(RuntimeError, match="boom"):
        with NetnsCluster(subnet="198.18.9.0/24") as c:
            names = [n.netns for n in c.nodes]
            assert set(names) <= set(namespaces())
            # the two nodes reach each other over the pair, and only over it
            probe = ("import socket; s=socket.create_server(('198.18.9.1', 29511)); c,_=s.accept(); "
                     "c.sendall(c.recv(4)); c.close()")
            server = c.popen(0, ["python3", "-c", probe])
            client = ("import socket,time\nfor i in range(100):\n  try: s=socket.create_connection(('198.18.9.1',"
                      " 29511), 1); break\n  except OSError: time.sleep(0.05)\ns.sendall(b'ping'); print(s.recv(4))")
            out = subprocess.run(["ip", "netns", "exec", c.nodes[1].netns, "python3", "-c", client],
                                 capture_output=True, text=True, timeout=20)
            assert out.stdout.strip() == "b'ping'", out.stderr
            assert server.wait(timeout=10) == 0
            sleeper = c.popen(1, ["sleep", "600"])
            assert pids_in(c.nodes[1].netns) == [sleeper.pid]
            raise RuntimeError("boom")
    assert not set(names) & set(namespaces())
    assert sleeper.poll() is not None  # killed with its node
    assert "msnet0" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_placement_under_launcher(tmp_path, launcher):
    """The real launchers put ranks 0,1 on one node and 2,3 on the other; each tp group shares a node."""
    need_netns()
    out = tmp_path / "probe.json"
    with NetnsCluster() as c:
        rc = run_nodes(c, launcher, 2, [PROBE, str(out), "2"], workdir=tmp_path, timeout_s=240, cwd=REPO,
                       logs=[open(tmp_path / f"node{i}.log", "w") for i in range(2)])
        left = c.exists
    assert rc == [0, 0], [(tmp_path / f"node{i}.log").read_text()[-3000:] for i in range(2)]
    assert left() == []
    ranks = json.loads(out.read_text())
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    netns = [r["netns"] for r in ranks]
    assert netns[0] == netns[1] != netns[2] == netns[3]  # two ranks on each node
    for r in ranks:
        assert len({netns[m] for m in r["tp_group"]}) == 1, r  # tp group inside one node
        assert len({netns[m] for m in r["dp_group"]}) == 2, r  # dp group across the nodes
        assert r["gloo_ifname"] == "msnet0" and r["master_addr"] == "198.18.0.1"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_equal_one_process(tmp_path, data_root, launcher):
    need_netns()
    ref = reference_losses(data_root)
    run = tmp_path / "run"
    logs = [open(tmp_path / f"node{i}.log", "w") for i in range(2)]
    with NetnsCluster() as c:
        rc = run_nodes(c, launcher, 2, ["launch/pretrain.py", *BASE, f"data.root={data_root}", f"run_dir={run}",
                                        "train.steps=10", "parallel.tp=2", "+cluster=netns_2x2"],
                       workdir=tmp_path, timeout_s=420, cwd=REPO, logs=logs)
        names = [n.netns for n in c.nodes]
    text = [(tmp_path / f"node{i}.log").read_text() for i in range(2)]
    assert rc == [0, 0], [t[-4000:] for t in text]
    assert not set(names) & set(namespaces())
    assert "world=4 (dp=2 tp=2 pp=1)" in "".join(text)
    got = losses_by_step(run)
    assert sorted(got) == list(range(1, 11))
    diffs = [abs(got[s] - ref[s]) for s in got]
    print(f"{launcher}: 2 nodes x 2 ranks (tp2 dp2) vs one process, max |dloss| over 10 steps = {max(diffs):.2e}")
    assert max(diffs) < 1e-4, list(zip(sorted(got), diffs))
    assert got[10] < got[1] - 0.3  # it trained
    assert os.path.isdir(run / "checkpoints" / "global_step10")


def test_netns_cluster_script(tmp_path):
    """launch/netns_cluster.py end to end: both nodes' output prefixed, exit 0, nothing left behind."""
    need_netns()
    out = tmp_path / "probe.json"
    p = subprocess.run([sys.executable, "launch/netns_cluster.py", "--launcher", "torchrun", "--timeout", "200", "--",
                        PROBE, str(out), "2", "+cluster=netns_2x2"], cwd=REPO, capture_output=True, text=True,
                       timeout=260)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[node0] " in p.stdout and "[node1] " in p.stdout and "namespaces left: none" in p.stdout
    assert [r["tp_group"] for r in json.loads(out.read_text())] == [[0, 1], [0, 1], [2, 3], [2, 3]]
