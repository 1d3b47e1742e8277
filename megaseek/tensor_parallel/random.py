"""Per-tensor-rank RNG streams (dropout inside tensor-parallel regions)."""
from __future__ import annotations

import contextlib

import torch


class RNGTracker:
    """Per-tensor-rank RNG streams for dropout inside tensor-parallel regions.

    Dropout on sharded activations (attention probabilities of this rank's heads) must differ across
    tensor ranks; dropout on replicated activations must be identical. `fork()` swaps in a stream seeded
    by (seed, tensor rank) and restores the default stream afterwards.
    """

    def __init__(self, seed: int, tp_rank: int):
        self._gen = torch.Generator().manual_seed(seed + 2718 + 1000 * tp_rank)
        self._cuda_state = None
        if torch.cuda.is_available():
            with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
                torch.cuda.manual_seed(seed + 2718 + 1000 * tp_rank)
                self._cuda_state = torch.cuda.get_rng_state()

    @contextlib.contextmanager
    def fork(self):
        cpu = torch.get_rng_state()
        torch.set_rng_state(self._gen.get_state())
        cuda = None
        if self._cuda_state is not None:
            cuda = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(self._cuda_state)
        try:
            yield
        finally:
            self._gen.set_state(torch.get_rng_state())
            torch.set_rng_state(cpu)
            if cuda is not None:
                self._cuda_state = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(cuda)

    def state_dict(self):
        return {"cpu": self._gen.get_state(), "cuda": self._cuda_state}

    def load_state_dict(self, sd):
        self._gen.set_state(sd["cpu"])
        self._cuda_state = sd.get("cuda")
