"""Per-model state adapters: checkpoint (canonical) names and the Hugging Face name map.

Canonical names are the parameter names of the whole model at tp = 1, pp = 1: a pipeline stage's `layers.0`
is global layer `first_layer`; no name depends on the layout (tensor-sharded and replicated parameters have
the same name, see KVProjection). Which rows of a parameter are vocabulary padding is recorded on the
parameter (`vocab_rows`), not in its name. The checkpoint layer (megaseek/ckpt) asks the adapter; it matches
no name suffixes itself.

Adapters: DenseAdapter (gqa + swiglu <-> LlamaForCausalLM) and DeepseekV3Adapter (mla + swiglu | moe <->
DeepseekV3ForCausalLM, below). Each also converts whole state dicts (`to_hf_state`, `from_hf_state`) and
config.json (`hf_config`, `config_from_hf`).

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

import torch

from megaseek.model import rope

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")


def mtp_shapes(cfg) -> dict:
    """Canonical names -> shapes of the multi-token prediction modules (megaseek/model/mtp.py), depth d = 0..D-1:
    mtp.{d}.{hnorm,enorm,norm}.weight (h,), mtp.{d}.eh_proj (h, 2h) and mtp.{d}.block.<a layer's names> (an MoE
    layer's with model.mlp=moe, a dense one's otherwise)."""
    if not getattr(cfg, "mtp_depth", 0):
        return {}
    import dataclasses
    one = adapter_for(dataclasses.replace(cfg, num_layers=1, mtp_depth=0, first_k_dense_replace=0)).expected_shapes()
    block = {n[len("layers.0."):]: s for n, s in one.items() if n.startswith("layers.0.")}
    h, out = cfg.hidden_size, {}
    for d in range(cfg.mtp_depth):
        out.update({f"mtp.{d}.{k}.weight": (h,) for k in ("hnorm", "enorm", "norm")})
        out[f"mtp.{d}.eh_proj"] = (h, 2 * h)
        out.update({f"mtp.{d}.block.{k}": v for k, v in block.items()})
    return out


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
        shapes.update(mtp_shapes(cfg))
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
                "rope_parameters": rope.to_hf(cfg),
                "tie_word_embeddings": bool(cfg.tie_embeddings), "attention_bias": False, "mlp_bias": False,
                "attention_dropout": 0.0, "initializer_range": cfg.init_std, "pretraining_tp": 1,
                "use_cache": True, "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
                "torch_dtype": "float32", "dtype": "float32"}


    def to_hf_state(self, weights: dict) -> dict:
        """Canonical full tensors -> Hugging Face state dict (names only: no tensor changes). LlamaForCausalLM
        has no multi-token prediction modules: `mtp.*` tensors are not exported."""
        return {self.to_hf(n): t for n, t in weights.items() if not _MTP.match(n)}

    def unfused_state(self, weights: dict) -> dict:
        """Full tensors under module names -> canonical names: a fused projection's full tensor (as DeepSpeed's
        zero_to_fp32 reconstructs it; the grouped layout of FusedColumnParallelLinear, the same at every tp)
        split into its parts: qkv_proj -> q_proj, k_proj, v_proj (groups = kv heads), gate_up_proj ->
        gate_proj, up_proj (groups = columns)."""
        from megaseek.tensor_parallel.layers import split_full
        cfg, d = self.cfg, self.cfg.head_dim
        fused = {"attn.qkv_proj.weight": (("q_proj", "k_proj", "v_proj"), cfg.num_kv_heads,
                                          [cfg.num_heads // cfg.num_kv_heads * d, d, d]),
                 "mlp.gate_up_proj.weight": (("gate_proj", "up_proj"), cfg.intermediate_size, [1, 1])}
        out = {}
        for n, t in weights.items():
            hit = next((k for k in fused if n.endswith(k)), None)
            if hit is None:
                out[n] = t
                continue
            names, groups, per_group = fused[hit]
            base = n[: -len(hit)] + hit.split(".")[0]  # layers.{i}.attn | layers.{i}.mlp
            out.update({f"{base}.{m}.weight": part for m, part in zip(names, split_full(t, groups, per_group))})
        return out

    def from_hf_state(self, hf: dict, hf_cfg: dict) -> dict:
        """Hugging Face state dict -> canonical full tensors (tensors we do not hold, e.g. rotary buffers, dropped)."""
        out = {}
        for k, t in hf.items():
            n = self.from_hf(k)
            if n is not None:
                out[n] = t
        if self.cfg.tie_embeddings:
            out.pop("lm_head.weight", None)
        return out

    @staticmethod
    def config_from_hf(hf: dict) -> dict:
        """LlamaForCausalLM config.json -> our model keys; one ValueError naming the key we cannot represent."""
        theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
        _refuse_hf(hf, {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu"})
        scaling = rope.from_hf(hf)  # {} for plain RoPE; YaRN keys; other types refused
        heads = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
            raise ValueError(f"config.json: head_dim={hf['head_dim']} != hidden_size / num_attention_heads "
                             f"({hf['hidden_size'] // heads}); megaseek's gqa attention derives the head dim")
        return {"vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"], "num_layers": hf["num_hidden_layers"],
                "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads,
                "intermediate_size": hf["intermediate_size"], "max_seq_len": hf.get("max_position_embeddings", 2048),
                "rope_theta": float(theta), "norm_eps": hf.get("rms_norm_eps", 1e-6),
                "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
                "init_std": hf.get("initializer_range", 0.02), "attention": "gqa", "mlp": "swiglu", **scaling}


def _refuse_hf(hf: dict, want: dict) -> None:
    for k, v in want.items():
        if k in hf and hf[k] != v:
            raise ValueError(f"config.json: {k}={hf[k]!r} is not supported (megaseek needs {k}={v!r})")




class DeepseekV3Adapter(DenseAdapter):
    """MLA model (dense SwiGLU or DeepSeekMoE MLPs) <-> transformers DeepseekV3ForCausalLM.

        layers.{i}.attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}.weight   model.layers.{i}.self_attn.<same>
        layers.{i}.attn.{kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}.weight   self_attn.<same>
        layers.{i}.mlp.<rest> (gate_proj, up_proj, down_proj; MoE: gate.weight, gate.e_score_correction_bias,
                               experts.{e}.{gate,up,down}_proj.weight, shared_experts.{gate,up,down}_proj.weight)
                                                                             model.layers.{i}.mlp.<rest>
        attn_norm / mlp_norm / embed / norm / lm_head                        as DenseAdapter

    RoPE layout: ours is rotate-half (the rope dims of a head are [x_0..x_{d/2-1} | x_{d/2}..x_{d-1}], pair j =
    (x_j, x_{d/2+j})). The export writes `rope_interleave: true` (DeepSeek's own layout, transformers' default:
    pair j = (x'_{2j}, x'_{2j+1})), so the rope rows of q_b_proj (q_proj) per head and of kv_a_proj_with_mqa
    are interleaved: x'_{2j} = x_j, x'_{2j+1} = x_{d/2+j}. transformers' interleaved rotation returns
    [x'_even | x'_odd] rotated by rotate-half, i.e. exactly our rotated vector, so the logits are equal. Import
    undoes it (x = [x'_even | x'_odd]) when `rope_interleave` is true or absent, and keeps the rows otherwise.
    """
    kind = "deepseek_v3"
    hf_architecture = "DeepseekV3ForCausalLM"
    ATTN = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj",
            "o_proj")
    NORMS = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight"}

    def _moe_layer(self, L: int) -> bool:
        return self.cfg.mlp == "moe" and L >= self.cfg.first_k_dense_replace

    def expected_shapes(self) -> dict:
        cfg = self.cfg
        h, n, v = cfg.hidden_size, cfg.num_heads, cfg.vocab_size
        dqk, r, dr = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        shapes = {"embed.weight": (v, h), "norm.weight": (h,)}
        if not cfg.tie_embeddings:
            shapes["lm_head.weight"] = (v, h)
        attn = {"kv_a_proj_with_mqa": (r + dr, h), "kv_a_layernorm": (r,),
                "kv_b_proj": (n * (cfg.qk_nope_head_dim + cfg.v_head_dim), r), "o_proj": (h, n * cfg.v_head_dim)}
        if cfg.q_lora_rank is None:
            attn["q_proj"] = (n * dqk, h)
        else:
            attn.update(q_a_proj=(cfg.q_lora_rank, h), q_a_layernorm=(cfg.q_lora_rank,), q_b_proj=(n * dqk, cfg.q_lora_rank))
        for L in range(cfg.num_layers):
            p = f"layers.{L}."
            shapes.update({p + "attn_norm.weight": (h,), p + "mlp_norm.weight": (h,)})
            shapes.update({f"{p}attn.{k}.weight": s for k, s in attn.items()})
            shapes.update({f"{p}mlp.{k}": s for k, s in self._mlp_shapes(L).items()})
        shapes.update(mtp_shapes(cfg))
        return shapes

    def _mlp_shapes(self, L: int) -> dict:
        cfg, h = self.cfg, self.cfg.hidden_size
        swiglu = lambda i: {"gate_proj.weight": (i, h), "up_proj.weight": (i, h), "down_proj.weight": (h, i)}
        if not self._moe_layer(L):
            return swiglu(cfg.intermediate_size)
        i, E = cfg.moe_intermediate_size, cfg.n_routed_experts
        out = {"gate.weight": (E, h), "gate.e_score_correction_bias": (E,)}
        for e in range(E):
            out.update({f"experts.{e}.{k}": s for k, s in swiglu(i).items()})
        if cfg.n_shared_experts:
            out.update({f"shared_experts.{k}": s for k, s in swiglu(i * cfg.n_shared_experts).items()})
        return out

    def to_hf(self, name: str) -> str:
        if mt := _MTP.match(name):  # DeepSeek's layout: depth d is model.layers.{num_layers + d}
            j, rest = self.cfg.num_layers + int(mt.group(1)), mt.group(2)
            if rest.startswith("block."):
                return self.to_hf(f"layers.{j}.{rest[len('block.'):]}")
            hf = {"norm.weight": "shared_head.norm.weight", "eh_proj": "eh_proj.weight"}.get(rest, rest)
            return f"model.layers.{j}.{hf}"
        m = _LAYER.match(name)
        if not m:
            return self.TOP[name]
        rest = m.group(2)
        if rest in self.NORMS:
            return f"model.layers.{m.group(1)}.{self.NORMS[rest]}"
        if rest.startswith("attn.") and rest.split(".")[1] in self.ATTN:
            return f"model.layers.{m.group(1)}.self_attn.{rest[5:]}"
        if rest.startswith("mlp."):
            return f"model.layers.{m.group(1)}.{rest}"
        raise KeyError(name)

    def from_hf(self, hf: str) -> Optional[str]:
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf)
        if not m:
            return {v: k for k, v in self.TOP.items()}.get(hf)
        L, rest = int(m.group(1)), m.group(2)
        if L >= self.cfg.num_layers:  # MTP depth L - num_layers (None when this model holds no such depth)
            return self._mtp_from_hf(L - self.cfg.num_layers, rest)
        sub = self._block_from_hf(rest)
        return f"layers.{L}.{sub}" if sub else None

    def _block_from_hf(self, rest: str) -> Optional[str]:
        """A decoder layer's HF name after `model.layers.{i}.` -> ours after `layers.{i}.`."""
        inv = {v: k for k, v in self.NORMS.items()}
        if rest in inv:
            return inv[rest]
        if rest.startswith("self_attn.") and rest.split(".")[1] in self.ATTN:
            return f"attn.{rest[10:]}"
        if rest.startswith("mlp."):
            return rest
        return None

    def _mtp_from_hf(self, d: int, rest: str) -> Optional[str]:
        """DeepSeek's MTP layer `model.layers.{num_layers + d}.<rest>` -> mtp.{d}.*; its copies of the embedding
        and head (embed_tokens, shared_head.head) are the main model's, shared, so not held twice."""
        if d >= getattr(self.cfg, "mtp_depth", 0) or rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None
        own = {"eh_proj.weight": "eh_proj", "enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
               "shared_head.norm.weight": "norm.weight"}
        if rest in own:
            return f"mtp.{d}.{own[rest]}"
        sub = self._block_from_hf(rest)
        return f"mtp.{d}.block.{sub}" if sub else None

    # --- the RoPE row layout ---
    def _rope_rows(self, name: str):
        """(view shape, slice of the rope rows) of a weight with rope rows, else None."""
        cfg = self.cfg
        dn, dr, h = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.hidden_size
        if name.endswith(("attn.q_proj.weight", "attn.q_b_proj.weight")):
            return (cfg.num_heads, dn + dr, -1), slice(dn, dn + dr)  # per head: [nope | rope]
        if name.endswith("attn.kv_a_proj_with_mqa.weight"):
            return (1, cfg.kv_lora_rank + dr, h), slice(cfg.kv_lora_rank, cfg.kv_lora_rank + dr)  # [latent | rope]
        return None

    def _permute(self, name: str, t, to_interleaved: bool):
        spec = self._rope_rows(name)
        if spec is None:
            return t
        shape, sl = spec
        w = t.reshape(shape).clone()  # (heads, rows per head, in)
        rope = w[:, sl]  # (heads, d_r, in)
        half = rope.shape[1] // 2
        if to_interleaved:  # [a | b] -> a_0 b_0 a_1 b_1 ...
            new = torch.stack([rope[:, :half], rope[:, half:]], dim=2).reshape(rope.shape)
        else:  # a_0 b_0 a_1 b_1 ... -> [a | b]
            new = torch.cat([rope[:, 0::2], rope[:, 1::2]], dim=1)
        w[:, sl] = new
        return w.reshape(t.shape)

    def to_hf_state(self, weights: dict, rope_interleave: bool = True) -> dict:
        """Canonical tensors -> DeepseekV3 state dict, rope rows interleaved when `rope_interleave`."""
        out = {self.to_hf(n): (self._permute(n, t, True) if rope_interleave else t) for n, t in weights.items()}
        head = weights["embed.weight" if self.cfg.tie_embeddings else "lm_head.weight"]
        for d in range(getattr(self.cfg, "mtp_depth", 0)):  # DeepSeek's MTP layers carry their shared tensors too
            j = self.cfg.num_layers + d
            out[f"model.layers.{j}.embed_tokens.weight"] = weights["embed.weight"].clone()  # safetensors: no aliases
            out[f"model.layers.{j}.shared_head.head.weight"] = head.clone()
        return out

    def from_hf_state(self, hf: dict, hf_cfg: dict) -> dict:
        out = {}
        interleaved = hf_cfg.get("rope_interleave", True)
        for k, t in hf.items():
            n = self.from_hf(k)
            if n is not None:
                out[n] = self._permute(n, t, False) if interleaved else t
        if self.cfg.tie_embeddings:
            out.pop("lm_head.weight", None)
        return out

    def hf_config(self, eos_id: Optional[int], pad_id: Optional[int], rope_interleave: bool = True) -> dict:
        """config.json of DeepseekV3ForCausalLM. Without MoE every layer is dense (first_k_dense_replace =
        num_layers); num_key_value_heads = num_attention_heads (transformers requires it); no MTP modules."""
        cfg = self.cfg
        moe = cfg.mlp == "moe"
        if moe and (cfg.scoring_func != "sigmoid" or cfg.group_score != "top2_sum"):
            raise ValueError(f"model.scoring_func={cfg.scoring_func}, model.group_score={cfg.group_score}: "
                             f"DeepseekV3ForCausalLM routes with sigmoid scores and top2_sum group scores only")
        if moe and cfg.capacity_factor is not None:
            raise ValueError("model.capacity_factor is set: DeepseekV3ForCausalLM is dropless; export a dropless model")
        d = {"architectures": [self.hf_architecture], "model_type": "deepseek_v3", "vocab_size": cfg.vocab_size,
             "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
             "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
             "num_key_value_heads": cfg.num_heads, "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
             "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
             "v_head_dim": cfg.v_head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
             "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
             "rope_parameters": rope.to_hf(cfg),
             "rope_interleave": bool(rope_interleave), "tie_word_embeddings": bool(cfg.tie_embeddings),
             "attention_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
             "num_nextn_predict_layers": int(getattr(cfg, "mtp_depth", 0)), "use_cache": True,
             "bos_token_id": eos_id, "eos_token_id": eos_id,
             "pad_token_id": pad_id, "torch_dtype": "float32", "dtype": "float32",
             "first_k_dense_replace": cfg.first_k_dense_replace if moe else cfg.num_layers,
             "moe_intermediate_size": cfg.moe_intermediate_size if moe else cfg.intermediate_size,
             "n_routed_experts": cfg.n_routed_experts if moe else 1, "n_shared_experts": cfg.n_shared_experts if moe else 1,
             "num_experts_per_tok": cfg.num_experts_per_tok if moe else 1, "n_group": cfg.n_group if moe else 1,
             "topk_group": cfg.topk_group if moe else 1, "norm_topk_prob": bool(cfg.norm_topk_prob) if moe else True,
             "routed_scaling_factor": cfg.routed_scaling_factor if moe else 1.0}
        return d

    @staticmethod
    def config_from_hf(hf: dict) -> dict:
        """DeepseekV3ForCausalLM config.json -> our model keys (MoE layers need model.mlp=moe)."""
        theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
        _refuse_hf(hf, {"attention_bias": False, "hidden_act": "silu"})
        scaling = rope.from_hf(hf)  # {} for plain RoPE; YaRN keys; other types refused
        heads, L = hf["num_attention_heads"], hf["num_hidden_layers"]
        out = {"vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"], "num_layers": L, "num_heads": heads,
               "num_kv_heads": heads, "intermediate_size": hf["intermediate_size"],
               "max_seq_len": hf.get("max_position_embeddings", 4096), "rope_theta": float(theta),
               "norm_eps": hf.get("rms_norm_eps", 1e-6), "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
               "init_std": hf.get("initializer_range", 0.02), "attention": "mla", "mlp": "swiglu",
               "q_lora_rank": hf.get("q_lora_rank"), "kv_lora_rank": hf["kv_lora_rank"],
               "qk_nope_head_dim": hf["qk_nope_head_dim"], "qk_rope_head_dim": hf["qk_rope_head_dim"],
               "v_head_dim": hf["v_head_dim"], "mtp_depth": int(hf.get("num_nextn_predict_layers") or 0), **scaling}
        if hf.get("first_k_dense_replace", 0) < L:
            out.update(mlp="moe", first_k_dense_replace=hf.get("first_k_dense_replace", 0),
                       n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts", 0) or 0,
                       num_experts_per_tok=hf["num_experts_per_tok"], moe_intermediate_size=hf["moe_intermediate_size"],
                       n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
                       norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                       routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                       scoring_func="sigmoid", group_score="top2_sum")
        return out


class GqaMoEAdapter(DenseAdapter):
    """Grouped-query attention with DeepSeekMoE MLPs: checkpoint names and shapes only (DenseAdapter's attention
    and norms, DeepseekV3Adapter's MLP names: layers.{i}.mlp.gate.weight, .gate.e_score_correction_bias,
    .experts.{e}.{gate,up,down}_proj.weight, .shared_experts.*; the first `first_k_dense_replace` layers dense).
    No transformers class holds this pair, so Hugging Face export is refused with one message."""
    kind = "gqa_moe"
    hf_architecture = None

    def expected_shapes(self) -> dict:
        shapes = super().expected_shapes()
        moe = DeepseekV3Adapter(self.cfg)
        for L in range(self.cfg.num_layers):
            if moe._moe_layer(L):
                for k in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
                    del shapes[f"layers.{L}.mlp.{k}"]
                shapes.update({f"layers.{L}.mlp.{k}": v for k, v in moe._mlp_shapes(L).items()})
        return shapes

    def _no_hf(self, *_a, **_k):
        raise ValueError("model.attention=gqa with model.mlp=moe has no Hugging Face model class: export an MLA "
                         "model (model.attention=mla -> DeepseekV3ForCausalLM) or a dense one (model.mlp=swiglu "
                         "-> LlamaForCausalLM)")

    to_hf = from_hf = hf_config = to_hf_state = from_hf_state = _no_hf


ADAPTERS = {("gqa", "swiglu"): DenseAdapter, ("gqa", "moe"): GqaMoEAdapter, ("mla", "swiglu"): DeepseekV3Adapter,
            ("mla", "moe"): DeepseekV3Adapter}
HF_ADAPTERS = {"LlamaForCausalLM": DenseAdapter, "DeepseekV3ForCausalLM": DeepseekV3Adapter}


def adapter_for(cfg):
    """The state adapter of a model config (by its spec)."""
    key = (cfg.attention, cfg.mlp)
    if key not in ADAPTERS:
        raise ValueError(f"no checkpoint/HF adapter for model.attention={cfg.attention}, model.mlp={cfg.mlp}")
    return ADAPTERS[key](cfg)
