"""The model spec: a block is an attention and an MLP chosen by the model config, each from a registry.

    ATTENTION[cfg.attention](cfg, ctx, seed, out_std, rng)   -> (b, s|s/p, h) -> (b, s|s/p, h)
    MLP[cfg.mlp](cfg, ctx, seed, out_std)                     -> (b, s|s/p, h) -> (b, s|s/p, h)

Each sub-layer class also states its own counts from the config alone (no weights built), so parameter and
FLOP counts (megaseek/model/flops.py), the planner and the pipeline partition follow whatever the spec holds:
`num_params(cfg)` (matmul weights), and for attention `score_flops(cfg, s)` and `recompute_params(cfg)`; a
sub-layer with norms of its own (MLA's latent norms) states them in `norm_params(cfg)`.
"""
from __future__ import annotations

from megaseek.model.attention import GQAAttention
from megaseek.model.layers import SwiGLU
from megaseek.model.mla import MLAttention
from megaseek.model.moe.layer import MoELayer

ATTENTION = {"gqa": GQAAttention, "mla": MLAttention}
MLP = {"swiglu": SwiGLU, "moe": MoELayer}


def check(cfg) -> None:
    """One ValueError naming the field when the config names a sub-layer the spec does not have."""
    if cfg.attention not in ATTENTION:
        raise ValueError(f"model config '{cfg.name}': model.attention={cfg.attention!r}: choose one of {sorted(ATTENTION)}")
    if cfg.mlp not in MLP:
        raise ValueError(f"model config '{cfg.name}': model.mlp={cfg.mlp!r}: choose one of {sorted(MLP)}")


def attention_cls(cfg):
    return ATTENTION[cfg.attention]


def mlp_cls(cfg, layer=None):
    """The MLP of layer `layer`: with mlp=moe the first `first_k_dense_replace` layers stay dense SwiGLU."""
    if cfg.mlp == "moe" and layer is not None and layer < cfg.first_k_dense_replace:
        return SwiGLU
    return MLP[cfg.mlp]


def build_mlp(cfg, ctx, layer: int, seed: int, out_std: float, ep=None):
    """The MLP module of layer `layer`; MoE layers get their index and the expert-parallel context."""
    cls = mlp_cls(cfg, layer)
    if getattr(cls, "is_moe", False):
        return cls(cfg, ctx, seed, out_std, layer=layer, ep=ep)
    return cls(cfg, ctx, seed, out_std)


def layer_params(cfg, layer=None) -> dict:
    """Parameters of one block (of layer `layer`: with mlp=moe the first layers are dense): matmul weights
    (attention + MLP), the two norms and the sub-layers' own norms."""
    mlp_c = mlp_cls(cfg, layer)
    attn, mlp = attention_cls(cfg).num_params(cfg), mlp_c.num_params(cfg)
    # a token uses every weight of a dense block; of an MoE block the router, its k experts and the shared ones
    mlp_active = getattr(mlp_c, "active_params", mlp_c.num_params)(cfg)
    norms = 2 * cfg.hidden_size + sum(getattr(c, "norm_params", lambda _: 0)(cfg)
                                      for c in (attention_cls(cfg), mlp_c))
    return {"attention": attn, "mlp": mlp, "norms": norms, "matmul": attn + mlp, "total": attn + mlp + norms,
            "active_matmul": attn + mlp_active, "active": attn + mlp_active + norms}
