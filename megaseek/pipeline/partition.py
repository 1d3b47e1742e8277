"""Cut the decoder's layers into pipeline stages.

`uniform`: layer counts differ by at most one (earlier stages take the extra layers).
`parameters`: minimise the largest stage's parameter count, where stage 0 also holds the embedding and
the last stage the final norm and LM head (a tied head is a second copy of the embedding on the last
stage). Every stage gets at least one layer. Exact by dynamic programming over the prefix sums.
"""
from __future__ import annotations

from megaseek.model.config import ModelConfig
from megaseek.model.flops import param_counts


def uniform(num_layers: int, stages: int) -> list[tuple[int, int]]:
    if stages > num_layers:
        raise ValueError(f"{stages} pipeline stages need at least {stages} layers, the model has {num_layers}")
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append((start, start + n))
        start += n
    return out


def balanced(layer_weights: list[float], stages: int, first_extra: float, last_extra: float) -> list[tuple[int, int]]:
    """Contiguous ranges minimising max stage weight; the first / last stage carry an extra weight."""
    L = len(layer_weights)
    if stages > L:
        raise ValueError(f"{stages} pipeline stages need at least {stages} layers, the model has {L}")
    if stages == 1:
        return [(0, L)]
    pre = [0.0]
    for w in layer_weights:
        pre.append(pre[-1] + w)

    def cost(s, a, b):
        c = pre[b] - pre[a]
        return c + (first_extra if s == 0 else 0.0) + (last_extra if s == stages - 1 else 0.0)

    INF = float("inf")
    # best[s][b]: minimal max-cost placing layers [0, b) on stages [0, s]
    best = [[INF] * (L + 1) for _ in range(stages)]
    cut = [[0] * (L + 1) for _ in range(stages)]
    for b in range(1, L + 1):
        best[0][b] = cost(0, 0, b)
    for s in range(1, stages):
        for b in range(s + 1, L + 1):
            for a in range(s, b):
                v = max(best[s - 1][a], cost(s, a, b))
                if v < best[s][b] - 1e-9:
                    best[s][b], cut[s][b] = v, a
    out, b = [], L
    for s in range(stages - 1, 0, -1):
        a = cut[s][b]
        out.append((a, b))
        b = a
    out.append((0, b))
    return out[::-1]


def partition(cfg: ModelConfig, stages: int, method: str = "parameters") -> list[tuple[int, int]]:
    if method == "uniform":
        return uniform(cfg.num_layers, stages)
    if method != "parameters":
        raise ValueError(f"parallel.partition={method!r}: choose 'parameters' or 'uniform'")
    pc = param_counts(cfg)
    embed = cfg.vocab_size * cfg.hidden_size
    head = embed + cfg.hidden_size  # LM head (or tied copy) + final norm
    return balanced([float(pc["per_layer"])] * cfg.num_layers, stages, float(embed), float(head))
