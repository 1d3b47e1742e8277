"""KV-cached vs uncached decoding with the one generator (megaseek/model/generate.py), same run, same model.

    python bench/decode.py [--model tiny] [--new 128] [--batch 1] [--prompt 16] [--repeats 3]

Prints tokens/s of both and their ratio (target >= 1.5 at 128 new tokens), ABAB-interleaved, median of the
repeats. The tokens of both are asserted equal (greedy), so the speed-up is not bought with a wrong answer.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megaseek.model.config import ModelConfig
from megaseek.model.decoder import Decoder
from megaseek.model.generate import SamplingConfig, generate

PRESETS = {"tiny": ModelConfig(), "small-ish": ModelConfig(name="small-ish", vocab_size=8192, hidden_size=512,
                                                         num_layers=8, num_heads=8, num_kv_heads=4,
                                                         intermediate_size=1408, max_seq_len=512)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = PRESETS[a.model]
    m = Decoder(cfg, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (a.batch, a.prompt), generator=g).tolist()
    times = {True: [], False: []}
    outs = {}
    for _ in range(a.repeats):
        for cached in (True, False):  # ABAB
            t0 = time.perf_counter()
            outs[cached] = generate(m, prompts, SamplingConfig(max_new_tokens=a.new, use_cache=cached))
            times[cached].append(time.perf_counter() - t0)
    assert outs[True] == outs[False], "cached and uncached greedy tokens differ"
    tps = {k: a.batch * a.new / statistics.median(v) for k, v in times.items()}
    print(f"model {cfg.name} batch {a.batch} prompt {a.prompt} new {a.new}: cached {tps[True]:.1f} tok/s, "
          f"uncached {tps[False]:.1f} tok/s, ratio {tps[True] / tps[False]:.2f}x (median of {a.repeats})")


if __name__ == "__main__":
    main()
