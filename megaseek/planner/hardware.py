"""The machine a plan is made for: the `cluster` slice of the config (a preset from conf/cluster/) as a
small frozen object. Without a preset the run is local (CPU ranks, no device-memory limit).

Bandwidths are NCCL *bus* bandwidths (what nccl-tests reports as busbw) in GB/s per GPU, so a ring
collective over n ranks of S bytes takes   all-reduce 2 (n-1)/n S / busbw,   all-gather and
reduce-scatter (n-1)/n S / busbw   (S = the full, gathered size).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from megaseek.model.flops import PEAK_TFLOPS

GB = 1e9
GiB = 2 ** 30


def _get(node: Any, key: str, default: Any = None) -> Any:
    if node is None:
        return default
    try:
        v = node[key] if key in node else default
    except TypeError:
        v = getattr(node, key, default)
    return default if v is None else v


@dataclass(frozen=True)
class Hardware:
    name: str = "local"
    nodes: int = 1
    gpus_per_node: int = 0           # 0: CPU ranks
    gpu: str = "none"
    memory_gb: Optional[float] = None  # device memory per GPU (GB = 1e9 bytes); None: no limit checked
    peak_tflops: Mapping[str, float] = field(default_factory=dict)  # per GPU, dense, by precision
    intra_node_busbw: float = 0.0    # GB/s per GPU inside a node (NVLink)
    inter_node_busbw: float = 0.0    # GB/s of one network rail (the NIC of one GPU) across nodes
    hbm_bandwidth: float = 0.0       # GB/s per GPU (optimizer step is memory-bound)
    compute_efficiency: float = 0.6  # fraction of peak FLOP/s the model's kernels reach
    runtime_gb: float = 0.0          # CUDA context, NCCL/cuBLAS workspaces, allocator slack per GPU
    host_memory_gb: Optional[float] = None  # per node, for offloaded states
    interconnect: str = "none"
    nccl: Mapping[str, Any] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nodes * max(1, self.gpus_per_node)

    @property
    def is_gpu(self) -> bool:
        return self.gpus_per_node > 0

    @property
    def capacity_bytes(self) -> Optional[float]:
        return None if self.memory_gb is None else self.memory_gb * GB

    def peak_flops(self, precision: str) -> Optional[float]:
        """Peak FLOP/s of one GPU at `precision` (the trainer's MFU uses the same table; torch runs fp32
        matmuls without TF32 by default, so fp32 means the fp32 peak)."""
        table = {**_datasheet(self.gpu), **dict(self.peak_tflops)}
        tf = table.get(precision)
        return float(tf) * 1e12 if tf else None

    def busbw(self, size: int, stride: int = 1) -> float:
        """Bus bandwidth (bytes/s) of a collective over `size` ranks `stride` ranks apart (tensor groups:
        stride 1; data-parallel groups: stride tp). Inside one node: NVLink. Across nodes every node
        sends through one network rail (NIC) per group member it holds, so the group gets
        members-per-node x the per-rail bandwidth, at most the NVLink figure."""
        gpn = max(1, self.gpus_per_node)
        if size * stride <= gpn or not self.inter_node_busbw:
            return self.intra_node_busbw * GB
        per_node = max(1, gpn // stride) if stride < gpn else 1
        return min(self.intra_node_busbw or float("inf"), per_node * self.inter_node_busbw) * GB

    @classmethod
    def from_config(cls, cfg: Mapping) -> "Hardware":
        c = _get(cfg, "cluster")
        if c is None:
            return cls()
        return cls(name=str(_get(c, "name", "cluster")), nodes=int(_get(c, "nodes", 1)),
                   gpus_per_node=int(_get(c, "gpus_per_node", 0)), gpu=str(_get(c, "gpu", "none")),
                   memory_gb=_float(_get(c, "gpu_memory_gb")),
                   peak_tflops={k: float(v) for k, v in dict(_get(c, "peak_tflops", {})).items() if v},
                   intra_node_busbw=float(_get(c, "intra_node_busbw_gbps", 0.0)),
                   inter_node_busbw=float(_get(c, "inter_node_busbw_gbps", 0.0)),
                   hbm_bandwidth=float(_get(c, "hbm_bandwidth_gbps", 0.0)),
                   compute_efficiency=float(_get(c, "compute_efficiency", 0.6)),
                   runtime_gb=float(_get(c, "runtime_gb", 0.0)),
                   host_memory_gb=_float(_get(c, "host_memory_gb")),
                   interconnect=str(_get(c, "interconnect", "none")),
                   nccl={k: v for k, v in dict(_get(c, "nccl", {})).items() if v is not None})


def _float(v) -> Optional[float]:
    return None if v in (None, "", "null") else float(v)


def _datasheet(gpu: str) -> dict:
    name = gpu.upper()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIE" before "H100"
        if key in name:
            return PEAK_TFLOPS[key]
    return {}
