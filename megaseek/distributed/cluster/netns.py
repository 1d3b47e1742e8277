"""A cluster of "nodes" on one machine: Linux network namespaces joined by a veth pair (needs root and iproute2).

    namespace msc<pid>x<k>n0          namespace msc<pid>x<k>n1
      lo 127.0.0.1                      lo 127.0.0.1
      msnet0 198.18.0.1/24  <-- veth --> msnet0 198.18.0.2/24

Each node sees only its loopback and its end of the pair, so processes started inside it talk to the other
node over a real (virtual) link, with its own port space, exactly as two hosts would. Addresses come from the
benchmarking range 198.18.0.0/15 (RFC 2544) and nothing else: never a private or a public range. Both ends of
the pair carry the same interface name, so one `GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME` fits every node,
as on a real cluster.

`NetnsCluster` is a context manager: everything it made (namespaces, hence the veth ends inside them) and every
process still running inside them is removed on exit, also when the body raises, and every `ip` call is bounded
in time. Namespaces left behind by a process that died before its exit handler ran are named after its pid;
`remove_stale()` deletes those whose creator is gone.
"""
from __future__ import annotations

import ipaddress
import itertools
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

BENCHMARK_NET = ipaddress.ip_network("198.18.0.0/15")
PREFIX = "msc"
IFNAME = "msnet0"
_counter = itertools.count()


class NetnsError(RuntimeError):
    """Creating or driving the namespaces failed (not root, no iproute2, a command timed out)."""


def check_address(addr: str) -> str:
    """An address (or network) from 198.18.0.0/15, or ValueError naming it."""
    net = ipaddress.ip_network(addr, strict=False)
    if not net.subnet_of(BENCHMARK_NET):
        raise ValueError(f"address {addr} is outside the benchmarking range {BENCHMARK_NET}; "
                         f"the namespace cluster uses that range only")
    return addr


def _ip(*args: str, timeout: float = 10.0, check: bool = True) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise NetnsError("the `ip` command (iproute2) is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"`ip {' '.join(args)}` did not finish within {timeout:.0f} s") from e
    if check and p.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p


def available() -> Optional[str]:
    """None when namespaces can be made here, else why not (for pytest.skip)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        _ip("netns", "list", timeout=5)
    except NetnsError as e:
        return str(e)
    return None


def namespaces() -> list[str]:
    out = _ip("netns", "list", timeout=5).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pids_in(ns: str) -> list[int]:
    p = _ip("netns", "pids", ns, timeout=5, check=False)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def kill_namespace_processes(ns: str, sig: int = signal.SIGKILL, wait_s: float = 10.0) -> list[int]:
    """Send `sig` to every process inside `ns` (a node failing: agent and workers alike); with SIGKILL wait
    until none is left. Returns the pids signalled."""
    pids = pids_in(ns)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while sig == signal.SIGKILL and pids_in(ns) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces of this module whose creating process no longer exists. Returns their names."""
    removed = []
    for ns in namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)x\d+n\d+", ns)
        if m and not _pid_alive(int(m.group(1))):
            kill_namespace_processes(ns)
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    return removed


@dataclass
class Node:
    index: int
    netns: str
    addr: str       # this node's address on the pair (no prefix length)
    ifname: str


@dataclass
class NetnsCluster:
    """Two nodes joined by a veth pair, addresses `subnet`.1 and `subnet`.2 (inside 198.18.0.0/15)."""

    subnet: str = "198.18.0.0/24"
    ifname: str = IFNAME
    nodes: list[Node] = field(default_factory=list, init=False)
    _procs: list[subprocess.Popen] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        check_address(self.subnet)
        net = ipaddress.ip_network(self.subnet)
        if net.num_addresses < 4:
            raise ValueError(f"subnet {self.subnet} has no room for two hosts")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", self.ifname):
            raise ValueError(f"interface name {self.ifname!r} must be 1-15 characters [A-Za-z0-9_.-]")
        self.prefixlen = net.prefixlen
        self._tag = f"{PREFIX}{os.getpid()}x{next(_counter)}"
        hosts = itertools.islice(net.hosts(), 2)
        self.nodes = [Node(i, f"{self._tag}n{i}", str(a), self.ifname) for i, a in enumerate(hosts)]

    # --- life cycle ---
    def up(self) -> "NetnsCluster":
        remove_stale()
        try:
            for n in self.nodes:
                _ip("netns", "add", n.netns)
            a, b = self.nodes
            _ip("link", "add", self.ifname, "netns", a.netns, "type", "veth", "peer", "name", self.ifname,
                "netns", b.netns)
            for n in self.nodes:
                _ip("-n", n.netns, "addr", "add", f"{check_address(n.addr)}/{self.prefixlen}", "dev", self.ifname)
                _ip("-n", n.netns, "link", "set", "lo", "up")
                _ip("-n", n.netns, "link", "set", self.ifname, "up")
        except BaseException:
            self.down()
            raise
        return self

    def down(self, timeout_s: float = 20.0) -> None:
        """Kill every process left inside the nodes, then delete the namespaces (the veth ends go with them)."""
        deadline = time.monotonic() + timeout_s
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    p.kill()
        mine = set(namespaces())
        for n in self.nodes:
            if n.netns in mine:
                kill_namespace_processes(n.netns, wait_s=max(0.5, deadline - time.monotonic()))
                _ip("netns", "del", n.netns, check=False, timeout=max(1.0, deadline - time.monotonic()))
        for p in self._procs:
            try:
                p.wait(timeout=max(0.5, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> "NetnsCluster":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def exists(self) -> list[str]:
        """The namespaces of this cluster that still exist (empty after `down`)."""
        present = set(namespaces())
        return [n.netns for n in self.nodes if n.netns in present]

    # --- processes ---
    def popen(self, node: int, argv: Sequence[str], env: Optional[dict] = None, **kw) -> subprocess.Popen:
        """Start `argv` inside node `node` (its own process group, so it can be killed with its children)."""
        p = subprocess.Popen(["ip", "netns", "exec", self.nodes[node].netns, *argv], env=env,
                             start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def kill_node(self, node: int) -> list[int]:
        """kill -9 every process on the node (launcher agent and workers): a node failing."""
        return kill_namespace_processes(self.nodes[node].netns)
