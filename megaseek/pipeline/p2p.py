"""Point-to-point activation / gradient exchange between neighbouring pipeline stages.

Sends and receives of one schedule step are posted together (isend + irecv, then wait on both), so
two neighbours that send to each other at the same moment (1F1B steady state) never deadlock.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class StageComm:
    def __init__(self, pp_ranks: list[int], stage: int, shape: tuple, dtype: torch.dtype, device):
        self.stage, self.stages = stage, len(pp_ranks)
        self.prev = pp_ranks[stage - 1] if stage > 0 else None
        self.next = pp_ranks[stage + 1] if stage < self.stages - 1 else None
        self.shape, self.dtype, self.device = tuple(shape), dtype, device

    def _exchange(self, send: Optional[torch.Tensor], to: Optional[int], recv_from: Optional[int]) -> Optional[torch.Tensor]:
        works, buf = [], None
        if send is not None and to is not None:
            works.append(dist.isend(send.detach().contiguous(), to))
        if recv_from is not None:
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            works.append(dist.irecv(buf, recv_from))
        for w in works:
            w.wait()
        return buf

    # forward direction: activations flow stage s -> s+1; gradients s+1 -> s
    def recv_forward(self):
        return self._exchange(None, None, self.prev)

    def send_forward(self, y):
        self._exchange(y, self.next, None)

    def recv_backward(self):
        return self._exchange(None, None, self.next)

    def send_backward(self, dx):
        self._exchange(dx, self.prev, None)

    def send_forward_recv_backward(self, y):
        return self._exchange(y, self.next, self.next)

    def send_backward_recv_forward(self, dx):
        return self._exchange(dx, self.prev, self.prev)
