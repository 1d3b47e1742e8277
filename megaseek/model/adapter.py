"""Per-model state adapters: checkpoint (canonical) names and the Hugging Face name map.

Canonical names are the parameter names of the whole model at tp = 1, pp = 1: a pipeline stage's `layers.0`
is global layer `first_layer`; no name depends on the layout (tensor-sharded and replicated parameters have
the same name, see KVProjection). Which rows of a parameter are vocabulary padding is recorded on the
parameter (`vocab_rows`), not in its name. The checkpoint layer (megaseek/ckpt) asks the adapter; it matches
no name suffixes itself.

Dense Llama-shaped model (attention gqa, mlp swiglu) <-> transformers LlamaForCausalLM:

    embed.weight                          model.embed_tokens.weight
    layers.{i}.attn_norm.weight           model.layers.{i}.input_layernorm.weight
    layers.{i}.attn.{q,k,v,o}_proj.weight model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.mlp_norm.weight            model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.mlp.{gate,up,down}_proj.weight  model.layers.{i}.mlp.{gate,up,down}_proj.weight
    norm.weight                           model.norm.weight
    lm_head.weight (untied only)          lm_head.weight (absent with tie_word_embeddings)

No weight is permuted: our RoPE uses the rotate-half layout of HF's `apply_rotary_pos_emb`, and q/k heads
are laid out head-major in both.
"""
from __future__ import annotations

import re
from typing import Optional

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


class DenseAdapter:
    kind = "llama"
    hf_architecture = "LlamaForCausalLM"
    LAYER = {"attn_norm.weight": "input_layernorm.weight", "attn.q_proj.weight": "self_attn.q_proj.weight",
             "attn.k_proj.weight": "self_attn.k_proj.weight", "attn.v_proj.weight": "self_attn.v_proj.weight",
             "attn.o_proj.weight": "self_attn.o_proj.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
             "mlp.gate_proj.weight": "mlp.gate_proj.weight", "mlp.up_proj.weight": "mlp.up_proj.weight",
             "mlp.down_proj.weight": "mlp.down_proj.weight"}
    TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}

    def __init__(self, cfg):
        self.cfg = cfg

    # --- checkpoint names ---
    @staticmethod
    def canonical(name: str, first_layer: int = 0) -> str:
        """A (stage-local) module parameter name -> its canonical name (global layer index)."""
        if first_layer and (m := _LAYER.match(name)):
            return f"layers.{int(m.group(1)) + first_layer}.{m.group(2)}"
        return name

    def expected_shapes(self) -> dict:
        """Canonical name -> full shape (no vocabulary padding)."""
        cfg = self.cfg
        h, d, i, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
        shapes = {"embed.weight": (v, h), "norm.weight": (h,)}
        if not cfg.tie_embeddings:
            shapes["lm_head.weight"] = (v, h)
        layer = {"attn_norm.weight": (h,), "attn.q_proj.weight": (cfg.num_heads * d, h),
                 "attn.k_proj.weight": (cfg.num_kv_heads * d, h), "attn.v_proj.weight": (cfg.num_kv_heads * d, h),
                 "attn.o_proj.weight": (h, cfg.num_heads * d), "mlp_norm.weight": (h,),
                 "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)}
        for L in range(cfg.num_layers):
            shapes.update({f"layers.{L}.{k}": s for k, s in layer.items()})
        return shapes

    # --- Hugging Face ---
    def to_hf(self, name: str) -> str:
        m = _LAYER.match(name)
        if m:
            return f"model.layers.{m.group(1)}.{self.LAYER[m.group(2)]}"
        return self.TOP[name]

    def from_hf(self, hf: str) -> Optional[str]:
        """A Hugging Face tensor name -> canonical name (None for tensors we do not hold, e.g. rotary buffers)."""
        inv_layer = {v: k for k, v in self.LAYER.items()}
        inv_top = {v: k for k, v in self.TOP.items()}
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf)
        if m:
            k = inv_layer.get(m.group(2))
            return f"layers.{m.group(1)}.{k}" if k else None
        return inv_top.get(hf)

    def hf_config(self, eos_id: Optional[int], pad_id: Optional[int]) -> dict:
        """config.json of LlamaForCausalLM (transformers 4.x keys rope_theta / torch_dtype and 5.x keys
        rope_parameters / dtype both present)."""
        cfg = self.cfg
        return {"architectures": [self.hf_architecture], "model_type": "llama", "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
                "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
                "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "tie_word_embeddings": bool(cfg.tie_embeddings), "attention_bias": False, "mlp_bias": False,
                "attention_dropout": 0.0, "initializer_range": cfg.init_std, "pretraining_tp": 1,
                "use_cache": True, "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
                "torch_dtype": "float32", "dtype": "float32"}


ADAPTERS = {("gqa", "swiglu"): DenseAdapter}


def adapter_for(cfg):
    """The state adapter of a model config (by its spec)."""
    key = (cfg.attention, cfg.mlp)
    if key not in ADAPTERS:
        raise ValueError(f"no checkpoint/HF adapter for model.attention={cfg.attention}, model.mlp={cfg.mlp}")
    return ADAPTERS[key](cfg)
