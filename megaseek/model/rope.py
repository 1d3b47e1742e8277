"""Rotary tables of a model config, with YaRN context extension (Peng et al. 2023; DeepSeek-V2/V3).

`model.rope_scaling=none`: the plain tables of megaseek/model/layers.py (rope_tables).
`model.rope_scaling=yarn` (factor f = model.rope_factor, original length L0 = model.rope_original_max_seq_len,
beta_fast, beta_slow; d = the rotary width, theta = model.rope_theta), per frequency pair j in [0, d/2):

    inv_extra_j = theta^(-2j/d)                    (the frequencies the model was trained with)
    inv_inter_j = inv_extra_j / f                  (position interpolation)
    corr(b)     = d ln(L0 / (2 pi b)) / (2 ln theta)          dimension whose wavelength fits b turns in L0
    lo, hi      = max(floor(corr(beta_fast)), 0), min(ceil(corr(beta_slow)), d - 1)
    ramp_j      = clamp((j - lo) / (hi - lo), 0, 1)            (hi += 0.001 when lo == hi)
    inv_j       = inv_inter_j ramp_j + inv_extra_j (1 - ramp_j)

so high frequencies (j < lo, many turns within L0) stay, low ones (j > hi) are interpolated by f.
cos and sin are multiplied by the attention factor

    mscale(f, m) = 0.1 m ln f + 1  (1 when f <= 1)
    a = mscale(f, model.rope_mscale) / mscale(f, model.rope_mscale_all_dim)   when both are non-zero
      = mscale(f, 1)                                                          otherwise

and under MLA the softmax scale 1/sqrt(d_qk) is multiplied by mscale(f, rope_mscale_all_dim)^2 when
rope_mscale_all_dim is non-zero (DeepSeek's `yarn_get_mscale`; megaseek/model/mla.py softmax_scale). These are
transformers' `_compute_yarn_parameters` and DeepseekV3Attention's scaling, so an exported model gives the
same logits (tests/test_yarn.py). The frequencies are computed in float64, the tables stored in float32.
"""
from __future__ import annotations

import math

import torch

from megaseek.model.layers import rope_tables

SCALINGS = ("none", "yarn")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, theta: float, factor: float, original: int, beta_fast: float,
                  beta_slow: float) -> torch.Tensor:
    """(dim/2,) float64 YaRN inverse frequencies (see the module docstring)."""
    def corr(rot: float) -> float:
        return dim * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(theta))
    lo, hi = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
    if lo == hi:
        hi += 0.001
    extra = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (d/2,)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    return extra / factor * ramp + extra * (1 - ramp)


def attention_factor(cfg) -> float:
    """The factor YaRN puts on cos and sin (1 without scaling)."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    f = cfg.rope_factor
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return yarn_mscale(f, cfg.rope_mscale) / yarn_mscale(f, cfg.rope_mscale_all_dim)
    return yarn_mscale(f)


def softmax_mscale(cfg) -> float:
    """Multiplier of MLA's softmax scale: mscale(f, rope_mscale_all_dim)^2 under YaRN, else 1."""
    if cfg.rope_scaling != "yarn" or not cfg.rope_mscale_all_dim:
        return 1.0
    return yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2


def model_rope_tables(cfg, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (s, d) of the model's rotary width for positions 0..s-1 (s = model.max_seq_len), in the layout
    of layers.rope_tables (frequencies repeated over both halves)."""
    s, d = seq_len or cfg.max_seq_len, cfg.rope_dim
    if cfg.rope_scaling != "yarn":
        return rope_tables(s, d, cfg.rope_theta)
    inv = yarn_inv_freq(d, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_seq_len, cfg.rope_beta_fast,
                        cfg.rope_beta_slow)
    return rope_tables(s, d, cfg.rope_theta, inv_freq=inv, scale=attention_factor(cfg))


def validate(cfg, bad) -> None:
    """One message naming the key when the rope scaling settings cannot work."""
    if cfg.rope_scaling not in SCALINGS:
        bad(f"model.rope_scaling={cfg.rope_scaling!r}: choose one of {SCALINGS}")
    if cfg.rope_scaling == "yarn":
        if not cfg.rope_factor >= 1:
            bad(f"model.rope_factor={cfg.rope_factor} must be >= 1 with model.rope_scaling=yarn")
        if cfg.rope_original_max_seq_len < 1:
            bad(f"model.rope_original_max_seq_len={cfg.rope_original_max_seq_len} must be >= 1")
        if not cfg.rope_beta_fast > cfg.rope_beta_slow > 0:
            bad(f"model.rope_beta_fast={cfg.rope_beta_fast} and model.rope_beta_slow={cfg.rope_beta_slow} "
                f"need beta_fast > beta_slow > 0")


def to_hf(cfg) -> dict:
    """transformers' rope_parameters of this config."""
    if cfg.rope_scaling != "yarn":
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len, "beta_fast": cfg.rope_beta_fast,
            "beta_slow": cfg.rope_beta_slow, "mscale": cfg.rope_mscale, "mscale_all_dim": cfg.rope_mscale_all_dim}


def from_hf(hf: dict) -> dict:
    """Our model keys from a config.json's rope_parameters (or the older rope_scaling); one ValueError for a
    scaling type we do not model."""
    rp = dict(hf.get("rope_scaling") or {})
    rp.update(hf.get("rope_parameters") or {})
    t = rp.get("rope_type", rp.get("type", "default")) or "default"
    if t == "default":
        return {}
    if t != "yarn":
        raise ValueError(f"config.json: rope scaling {t!r} is not supported (megaseek models plain RoPE and "
                         f"YaRN); import a model with rope_parameters.rope_type default or yarn")
    if rp.get("attention_factor") is not None or rp.get("truncate", True) is not True:
        raise ValueError("config.json: YaRN with rope_parameters.attention_factor or truncate=false is not "
                         "supported (megaseek derives the factor from mscale / mscale_all_dim)")
    factor = rp.get("factor")
    if factor is None:  # transformers' rule: the ratio of the context lengths
        factor = hf["max_position_embeddings"] / rp["original_max_position_embeddings"]
    return {"rope_scaling": "yarn", "rope_factor": float(factor),
            "rope_original_max_seq_len": int(rp["original_max_position_embeddings"]),
            "rope_beta_fast": float(rp.get("beta_fast") or 32.0), "rope_beta_slow": float(rp.get("beta_slow") or 1.0),
            "rope_mscale": float(rp.get("mscale") or 0.0), "rope_mscale_all_dim": float(rp.get("mscale_all_dim") or 0.0)}
