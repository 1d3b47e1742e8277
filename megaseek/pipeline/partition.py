"""Cut the decoder's layers into pipeline stages.

`uniform`: layer counts differ by at most one (earlier stages take the extra layers).
`parameters` (memory): minimise the largest stage's parameter count. Each layer weighs its own count (with
mlp=moe the first `first_k_dense_replace` layers are dense, the rest hold every routed expert); stage 0 also
holds the embedding, the last stage the final norm and LM head (a tied head is a second copy of the
embedding there) and the multi-token-prediction modules (D x (block + W_k (h, 2h) + 3 norms), plus the
embedding copy they read when pp > 1).
`cost` (time): minimise the largest stage's training FLOPs per token. A layer weighs 6 x its ACTIVE matmul
weights (an MoE layer: router, k routed and the shared experts, not all E) + 3 x its attention score FLOPs
at s = model.max_seq_len; the embedding lookup costs nothing; the last stage adds the LM head (6 V h) and,
per MTP depth, its block, W_k and one more head. With MoE layers this keeps a stage of many experts from
being starved of layers by their parameter count when they compute little.
Every stage gets at least one layer. Exact by dynamic programming over the prefix sums.
Counts are global (not per tensor or expert rank), so the partition does not depend on the layout.
"""
from __future__ import annotations

from megaseek.model.config import ModelConfig


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


METHODS = ("parameters", "cost", "uniform")


def layer_weights(cfg: ModelConfig, method: str) -> tuple[list[float], float, float]:
    """(weight of each layer, first stage's extra, last stage's extra) for `parameters` or `cost`."""
    from megaseek.model.flops import mtp_depth_params
    from megaseek.model.spec import attention_cls, layer_params
    h, V, D = cfg.hidden_size, cfg.vocab_size, cfg.mtp_depth
    mtp = mtp_depth_params(cfg) if D else None
    if method == "parameters":
        weights = [float(layer_params(cfg, i)["total"]) for i in range(cfg.num_layers)]
        last = V * h + h  # LM head (or the tied copy) + final norm
        if D:
            last += D * mtp["total"]
            last += 0 if cfg.tie_embeddings else V * h  # the embedding copy MTP reads (tied: the head's copy)
        return weights, float(V * h), float(last)
    score = 3 * attention_cls(cfg).score_flops(cfg, cfg.max_seq_len)
    weights = [float(6 * layer_params(cfg, i)["active_matmul"] + score) for i in range(cfg.num_layers)]
    last = 6 * V * h
    if D:
        last += D * (6 * mtp["active_matmul"] + score + 6 * V * h)
    return weights, 0.0, float(last)


def partition(cfg: ModelConfig, stages: int, method: str = "parameters") -> list[tuple[int, int]]:
    if method == "uniform":
        return uniform(cfg.num_layers, stages)
    if method not in METHODS:
        raise ValueError(f"parallel.partition={method!r}: choose one of {', '.join(METHODS)}")
    weights, first, last = layer_weights(cfg, method)
    return balanced(weights, stages, first, last)
