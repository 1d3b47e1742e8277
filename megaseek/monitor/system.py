"""System metrics of one rank: its process (psutil), its host, and its GPU (torch.cuda, NVML) when present.

`sample()` is called at log steps only. psutil's CPU percentages are measured since the previous call,
so each sample covers one log interval. GPU utilization, power and temperature need NVML (the
`nvidia-ml-py` package); without it those keys are left out, the torch.cuda memory figures stay.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import psutil

GB = 1e9


class SystemStats:
    def __init__(self, device: Optional[str] = None):
        self.proc = psutil.Process(os.getpid())
        self.proc.cpu_percent(None)  # prime: the next call reports the time since now
        psutil.cpu_percent(None)
        self.cuda = self._cuda_device(device)
        self.nvml_ok = self.cuda is not None

    @staticmethod
    def _cuda_device(device: Optional[str]) -> Optional[int]:
        try:
            import torch
            if not torch.cuda.is_available():
                return None
            if device and str(device).startswith("cuda:"):
                return int(str(device).split(":", 1)[1])
            return torch.cuda.current_device()
        except Exception:
            return None

    def sample(self) -> dict:
        p = self.proc
        with p.oneshot():
            out = {"cpu_percent": p.cpu_percent(None), "rss_gb": p.memory_info().rss / GB,
                   "num_threads": p.num_threads()}
        vm = psutil.virtual_memory()
        out.update(host_cpu_percent=psutil.cpu_percent(None), host_mem_percent=vm.percent,
                   host_mem_available_gb=vm.available / GB)
        if self.cuda is not None:
            out.update(self._gpu())
        return out

    def _gpu(self) -> dict:
        import torch
        d = self.cuda
        out = {"gpu_mem_allocated_gb": torch.cuda.memory_allocated(d) / GB,
               "gpu_mem_max_allocated_gb": torch.cuda.max_memory_allocated(d) / GB,
               "gpu_mem_reserved_gb": torch.cuda.memory_reserved(d) / GB}
        try:
            free, total = torch.cuda.mem_get_info(d)
            out.update(gpu_mem_used_gb=(total - free) / GB, gpu_mem_total_gb=total / GB)
        except Exception:
            pass
        if self.nvml_ok:  # torch maps the CUDA index to NVML's (CUDA_VISIBLE_DEVICES aware)
            try:
                out["gpu_util_percent"] = float(torch.cuda.utilization(d))
                out["gpu_power_w"] = torch.cuda.power_draw(d) / 1000.0  # milliwatts
                out["gpu_temp_c"] = float(torch.cuda.temperature(d))
            except Exception as e:  # no pynvml / no NVML: say it once, keep the torch figures
                self.nvml_ok = False
                warnings.warn(f"[monitor] GPU utilization unavailable (install nvidia-ml-py): {e}")
        return out
