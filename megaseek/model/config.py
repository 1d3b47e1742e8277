"""Model hyper-parameters: the `model` slice of the Hydra config as a dataclass (the one place of its defaults).

`attention` and `mlp` choose the block's sub-layers from the model spec (megaseek/model/spec.py).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional


def unknown_key_message(section: str, unknown: list[str], known: list[str]) -> str:
    """'unknown key model.hiden_size (did you mean model.hidden_size?)' for each unknown key."""
    parts = []
    for k in sorted(unknown):
        close = difflib.get_close_matches(k, known, n=1, cutoff=0.5)
        hint = f" (did you mean {section}.{close[0]}?)" if close else f" (valid keys: {', '.join(sorted(known))})"
        parts.append(f"unknown key {section}.{k}{hint}")
    return "; ".join(parts)


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 704
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    # RoPE context extension (megaseek/model/rope.py): none | yarn (DeepSeek-V2/V3's YaRN)
    rope_scaling: str = "none"
    rope_factor: float = 1.0               # yarn: positions interpolated by this factor in the low frequencies
    rope_original_max_seq_len: int = 4096  # yarn: the context length the frequencies were trained for
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0               # yarn attention factor mscale(f, m) / mscale(f, m_all) on cos and sin
    rope_mscale_all_dim: float = 0.0       # and MLA's softmax scale times mscale(f, m_all)^2 (0: off)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dropout: float = 0.0
    pad_vocab_multiple: int = 1
    attention: str = "gqa"   # the block's attention (megaseek/model/spec.py ATTENTION)
    mlp: str = "swiglu"      # the block's MLP (megaseek/model/spec.py MLP)
    fused: bool = True       # one GEMM for q,k,v (gqa) and one for gate,up (swiglu); checkpoints stay unfused
    # DeepSeekMoE (mlp: moe; megaseek/model/moe/); unused by swiglu
    n_routed_experts: int = 8
    n_shared_experts: int = 1          # one SwiGLU of moe_intermediate_size * n_shared_experts
    num_experts_per_tok: int = 2       # top-k
    moe_intermediate_size: int = 128   # each expert's SwiGLU width
    n_group: int = 1                   # group-limited routing: experts in n_group groups, tokens pick topk_group
    topk_group: int = 1
    group_score: str = "top2_sum"      # a group's score: top2_sum (DeepSeek-V3) | max (V2)
    norm_topk_prob: bool = True        # renormalise the k gate weights to sum 1
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"      # sigmoid (V3) | softmax (V2)
    first_k_dense_replace: int = 0     # layers [0, k) keep the dense SwiGLU of intermediate_size
    balance: str = "aux_free"          # aux_free (bias) | seq_aux (sequence-wise loss) | aux (batch loss) | none
    bias_update_rate: float = 1.0e-3   # aux_free: b += rate * sign(mean load - load) once per global batch
    aux_loss_coef: float = 1.0e-3      # alpha of the seq_aux / aux balance loss
    capacity_factor: Optional[float] = None  # null: dropless; else each expert takes ceil(cf * T k / E) per batch
    # Multi-token prediction (megaseek/model/mtp.py): D extra depths on the last stage, loss weight lambda
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    # Multi-head latent attention (attention: mla; megaseek/model/mla.py); unused by gqa
    q_lora_rank: Optional[int] = None  # null: a plain q_proj
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        known = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(unknown_key_message("model", unknown, known))
        return cls(**dict(d))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_dim(self) -> int:
        """Width of the rotary embedding: qk_rope_head_dim under MLA, the head dim otherwise."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def validate(self, tp: int = 1) -> None:
        """Raise one ValueError naming the field when the shape cannot work at tensor degree `tp` (the sub-layer
        names are checked against the registries by megaseek.model.spec.check)."""
        def bad(msg):
            raise ValueError(f"model config '{self.name}': {msg}")
        for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                  "max_seq_len"):
            if getattr(self, k) < 1:
                bad(f"model.{k} must be >= 1, got {getattr(self, k)}")
        if not (isinstance(self.mtp_depth, int) and 0 <= self.mtp_depth < self.max_seq_len - 1) or \
                not self.mtp_loss_weight >= 0:  # (NaN fails too)
            bad(f"model.mtp_depth={self.mtp_depth} must be in [0, model.max_seq_len - 2] and "
                f"model.mtp_loss_weight={self.mtp_loss_weight} >= 0")
        from megaseek.model import rope
        rope.validate(self, bad)
        if self.attention == "mla":
            self._validate_mla(bad)
        elif self.hidden_size % self.num_heads:
            bad(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        elif self.head_dim % 2:
            bad(f"head dim {self.head_dim} must be even for rotary embeddings")
        if self.num_heads % self.num_kv_heads:
            bad(f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
        if self.num_heads % tp:
            bad(f"model.num_heads={self.num_heads} is not divisible by parallel.tp={tp}")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            bad(f"model.num_kv_heads={self.num_kv_heads} and parallel.tp={tp}: one must divide the other")
        if self.intermediate_size % tp:
            bad(f"model.intermediate_size={self.intermediate_size} is not divisible by parallel.tp={tp}")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.mlp == "moe":
            self._validate_moe(bad, tp)

    def _validate_mla(self, bad) -> None:
        for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, k) < 1:
                bad(f"model.{k} must be >= 1 with model.attention=mla, got {getattr(self, k)}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            bad(f"model.q_lora_rank={self.q_lora_rank} must be >= 1, or null for a plain q_proj")
        if self.qk_rope_head_dim % 2:
            bad(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even for rotary embeddings")
        if self.num_kv_heads != self.num_heads:
            bad(f"model.num_kv_heads={self.num_kv_heads} must equal model.num_heads={self.num_heads} with "
                f"model.attention=mla (every head has its own key; set model.num_kv_heads={self.num_heads})")

    def _validate_moe(self, bad, tp: int) -> None:
        for k in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
            if getattr(self, k) < 1:
                bad(f"model.{k} must be >= 1 with model.mlp=moe, got {getattr(self, k)}")
        e, g, k = self.n_routed_experts, self.n_group, self.num_experts_per_tok
        if k > e:
            bad(f"model.num_experts_per_tok={k} exceeds model.n_routed_experts={e}")
        if e % g:
            bad(f"model.n_routed_experts={e} is not divisible by model.n_group={g}")
        if self.topk_group > g:
            bad(f"model.topk_group={self.topk_group} exceeds model.n_group={g}")
        if g > 1 and self.group_score == "top2_sum" and e // g < 2:
            bad(f"model.group_score=top2_sum needs >= 2 experts per group (n_routed_experts / n_group = {e // g})")
        if g > 1 and k > self.topk_group * (e // g):
            bad(f"model.num_experts_per_tok={k} exceeds the experts of model.topk_group={self.topk_group} groups "
                f"({self.topk_group * (e // g)})")
        choices = {"scoring_func": ("sigmoid", "softmax"), "group_score": ("top2_sum", "max"),
                   "balance": ("aux_free", "seq_aux", "aux", "none")}
        for key, ok in choices.items():
            if getattr(self, key) not in ok:
                bad(f"model.{key}={getattr(self, key)!r}: choose one of {ok}")
        if not 0 <= self.first_k_dense_replace <= self.num_layers:
            bad(f"model.first_k_dense_replace={self.first_k_dense_replace} must be in [0, model.num_layers]")
        if self.n_shared_experts < 0:
            bad(f"model.n_shared_experts={self.n_shared_experts} must be >= 0")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            bad(f"model.capacity_factor={self.capacity_factor} must be > 0, or null for dropless routing")
        if self.bias_update_rate < 0 or self.aux_loss_coef < 0:
            bad("model.bias_update_rate and model.aux_loss_coef must be >= 0")
        shared = self.moe_intermediate_size * max(self.n_shared_experts, 1)
        if self.moe_intermediate_size % tp or shared % tp:
            bad(f"model.moe_intermediate_size={self.moe_intermediate_size} is not divisible by parallel.tp={tp}")
