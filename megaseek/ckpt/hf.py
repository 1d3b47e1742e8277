"""Checkpoint consumers: the full model at tp = 1, a Hugging Face export, and text evaluation.

Reads only safetensors and JSON (no pickle). A checkpoint's weights are full fp32 tensors under canonical
(tp = 1) names, one file per pipeline stage (see checkpoint.py); the model's state adapter
(megaseek/model/adapter.py) owns the expected shapes and the Hugging Face name map. Vocabulary padding is
not in the checkpoint (HF vocab_size = ours).
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Optional

from megaseek.ckpt import checkpoint as C

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_STAGE = re.compile(r"^weights-stage(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A path that is not a usable megaseek checkpoint; the message names the path."""


# --- finding and reading a checkpoint ---
def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (verified), or a run directory / its checkpoints/ folder -> its newest valid one."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such directory")
    run = p if (p / "checkpoints").is_dir() else p.parent if p.name == "checkpoints" else None
    if run is None:
        why = C.verify(p)
        if why is not None:
            raise CheckpointError(f"{p}: not a valid megaseek checkpoint: {why}")
        return p
    skipped: list[str] = []
    found = C.newest_valid(run, warn=skipped.append)
    if found is None:
        detail = "; ".join(skipped) or "no global_step* checkpoint"
        raise CheckpointError(f"{p}: run directory without a valid checkpoint ({detail})")
    return found


def model_config(ckpt: Path):
    from megaseek.model.config import ModelConfig
    try:
        return ModelConfig.from_dict(C.read_manifest(ckpt)["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: manifest.json has no usable model config ({e})") from e


def load_weights(ckpt: Path) -> dict:
    """Every full tensor of the checkpoint by canonical name, read from the stage files in stage order.

    Stage files written with stage-local layer numbers (each pipeline stage naming its first layer
    `layers.0`) are renumbered by the layers of the stages before them, so both global and stage-local
    naming give the global names."""
    from safetensors import safe_open
    man = C.read_manifest(ckpt)
    stages = sorted((int(m.group(1)), rel) for rel in man["files"] if (m := _STAGE.match(rel)))
    if not stages:
        raise CheckpointError(f"{ckpt}: no weights-stage*.safetensors in the manifest")
    out, seen_layers = {}, 0
    for _, rel in stages:
        with safe_open(str(ckpt / rel), framework="pt") as f:
            names = list(f.keys())
            idx = sorted({int(m.group(1)) for n in names if (m := _LAYER.match(n))})
            offset = seen_layers if idx and idx[0] < seen_layers else 0  # stage-local numbering
            for n in names:
                m = _LAYER.match(n)
                key = f"layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else n
                if key in out:
                    raise CheckpointError(f"{ckpt}: tensor {key} appears in two stage files")
                out[key] = f.get_tensor(n).float()
            seen_layers = max([seen_layers] + [i + offset + 1 for i in idx])
    return out


def expected_shapes(cfg) -> dict:
    """Canonical name -> full shape (no vocabulary padding) of a model config."""
    from megaseek.model.adapter import adapter_for
    return adapter_for(cfg).expected_shapes()


def checked_weights(ckpt: Path, cfg) -> dict:
    w, want = load_weights(ckpt), expected_shapes(cfg)
    missing, extra = sorted(set(want) - set(w)), sorted(set(w) - set(want))
    bad = [f"{n}: {tuple(w[n].shape)} != {s}" for n, s in want.items() if n in w and tuple(w[n].shape) != s]
    if missing or extra or bad:
        raise CheckpointError(f"{ckpt}: weights do not match the model config: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, wrong shapes {bad[:5]}")
    return w


def load_model(ckpt_dir: str | Path):
    """(Decoder at tp = 1 in eval mode holding the checkpoint's weights, ModelConfig). Accepts a run dir too."""
    return model_at(resolve_checkpoint(ckpt_dir))


def model_at(ckpt: Path):
    """load_model for a checkpoint directory already resolved and verified."""
    import torch
    from megaseek.model.decoder import Decoder
    import dataclasses
    cfg = dataclasses.replace(model_config(ckpt), fused=False)  # tools (quantization, ONNX) name q, k, v, gate, up
    w = checked_weights(ckpt, cfg)
    model = Decoder(cfg, seed=0)
    sd = {}
    for name, t in model.state_dict().items():
        src = w[name]
        if src.shape != t.shape:  # pad_vocab_multiple > 1: zero rows past the vocabulary
            src = torch.cat([src, src.new_zeros((t.shape[0] - src.shape[0],) + tuple(src.shape[1:]))])
        sd[name] = src
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg


# --- Hugging Face export ---
def hf_name(name: str, cfg=None) -> str:
    from megaseek.model.adapter import DenseAdapter, adapter_for
    return (adapter_for(cfg) if cfg is not None else DenseAdapter(None)).to_hf(name)


def hf_config(cfg, eos_id: Optional[int], pad_id: Optional[int]) -> dict:
    from megaseek.model.adapter import adapter_for
    return adapter_for(cfg).hf_config(eos_id, pad_id)


def _write_tokenizer(ckpt: Path, out: Path, max_len: int) -> tuple[Optional[int], Optional[int]]:
    """tokenizer.json (copied) + tokenizer_config.json for AutoTokenizer / PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer
    src = ckpt / "tokenizer.json"
    if not src.is_file():
        raise CheckpointError(f"{ckpt}: no tokenizer.json")
    tok = Tokenizer.from_file(str(src))
    shutil.copy(src, out / "tokenizer.json")
    special = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    extra = {}
    from megaseek.data.chat import CHAT_SPECIAL_TOKENS, CHAT_TEMPLATE
    if all(tok.token_to_id(t) is not None for t in CHAT_SPECIAL_TOKENS):  # a chat model: its template travels
        extra["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        special, tokenizer_class="PreTrainedTokenizerFast", model_max_length=max_len, clean_up_tokenization_spaces=False,
        **extra), indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    return tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)


def export_hf(ckpt_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a LlamaForCausalLM (gqa) or DeepseekV3ForCausalLM (mla) directory (config.json, model.safetensors,
    tokenizer) for a checkpoint or run; the model's adapter renames (and for MLA re-lays the RoPE rows).
    Everything is written into a temporary sibling and renamed into place, so a failure leaves `out` untouched."""
    ckpt = resolve_checkpoint(ckpt_dir)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out}: output exists and is not an empty directory (pass overwrite=true)")
    cfg = model_config(ckpt)
    w = checked_weights(ckpt, cfg)
    from safetensors.torch import save_file

    from megaseek.model.adapter import adapter_for
    ad = adapter_for(cfg)
    hf_config(cfg, None, None)  # a model HF cannot represent is refused before anything is written
    with C.staged_dir(out) as tmp:
        eos, pad = _write_tokenizer(ckpt, tmp, cfg.max_seq_len)
        save_file({n: t.contiguous() for n, t in ad.to_hf_state(w).items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, eos, pad), indent=1))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad}, indent=1))
    return out


# --- Hugging Face import ---
def read_hf_weights(hf_dir: Path) -> dict:
    """Every tensor of a Hugging Face directory's safetensors (one file or an index of shards), fp32."""
    from safetensors import safe_open
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        bins = sorted(p.name for p in hf_dir.glob("*.bin"))
        raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json"
                              + (f" (found {bins[:3]}: pickle files are not read; re-save with "
                                 f"save_pretrained(safe_serialization=True))" if bins else ""))
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k).float()
    return out


def hf_model_config(hf_dir: Path):
    """(ModelConfig, adapter, config.json) of a Hugging Face Llama or DeepseekV3 directory."""
    from megaseek.model.adapter import HF_ADAPTERS
    from megaseek.model.config import ModelConfig
    f = hf_dir / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    hf = json.loads(f.read_text())
    arch = (hf.get("architectures") or [None])[0]
    if arch not in HF_ADAPTERS:
        raise CheckpointError(f"{f}: architectures={hf.get('architectures')}; import_hf reads {sorted(HF_ADAPTERS)}")
    try:
        keys = HF_ADAPTERS[arch].config_from_hf(hf)
        cfg = ModelConfig.from_dict(dict(keys, name=f"hf:{hf_dir.name}"))
        from megaseek.model.spec import check
        check(cfg)
        cfg.validate()
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot be imported: {e}") from e
    from megaseek.model.adapter import adapter_for
    return cfg, adapter_for(cfg), hf


def write_checkpoint(out: Path, cfg, weights: dict, tokenizer: Optional[Path], state: dict) -> Path:
    """A megaseek checkpoint directory (one stage file, manifest last) holding `weights` (canonical names), that
    load_model, evaluate.py and train.init_from read. Written into a temporary sibling and renamed into place."""
    from safetensors.torch import save_file
    want = expected_shapes(cfg)
    missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    bad = [f"{n}: {tuple(weights[n].shape)} != {s}" for n, s in want.items() if n in weights
           and tuple(weights[n].shape) != s]
    if missing or extra or bad:
        raise CheckpointError(f"weights do not fit the model config: missing {missing[:5]}, unexpected {extra[:5]}, "
                              f"wrong shapes {bad[:5]}")
    with C.staged_dir(out) as tmp:
        save_file({n: weights[n].float().contiguous() for n in sorted(weights)}, str(tmp / "weights-stage0.safetensors"),
                  metadata={"format": C.FORMAT})
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if tokenizer is not None:
            shutil.copy(tokenizer, tmp / "tokenizer.json")
        files = {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": C.sha256(f)}
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        C.write_json_atomic(tmp / "manifest.json", {
            "layout": {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}, "model": cfg.to_dict(),
            "tensors": {n: "weights-stage0.safetensors" for n in sorted(weights)}, "format": C.FORMAT,
            "step": int(state.get("step", 0)), "files": files})
    return out


def import_hf(hf_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Turn a Hugging Face LlamaForCausalLM or DeepseekV3ForCausalLM directory into a megaseek checkpoint directory
    (weights only, step 0; tokenizer.json copied when present). DeepseekV3's interleaved RoPE rows are re-laid
    to rotate-half. MTP modules (`num_nextn_predict_layers` at model.layers.{num_hidden_layers + d}, as DeepSeek
    and our export write them) become model.mtp_depth and mtp.{d}.* (an MoE block for MoE models, as DeepSeek-V3's);
    they are left out, with a note printed and kept in the checkpoint's state (`mtp_dropped`), when the weights
    hold none (transformers does not save them) or when an MTP layer's MLP is not the kind the model builds
    there (experts in a dense model's MTP layer, or none in an MoE model's)."""
    import dataclasses
    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise CheckpointError(f"hf_dir={hf_dir}: no such directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out}: output exists and is not an empty directory (pass overwrite=true)")
    cfg, ad, hf = hf_model_config(hf_dir)
    raw = read_hf_weights(hf_dir)
    dropped = _mtp_to_drop(cfg, raw)
    if dropped:
        print(f"[megaseek] import_hf: {hf_dir}: {dropped}; imported without multi-token prediction (mtp_depth=0)")
        cfg = dataclasses.replace(cfg, mtp_depth=0)
        from megaseek.model.adapter import adapter_for
        ad = adapter_for(cfg)
    w = ad.from_hf_state(raw, hf)
    if cfg.tie_embeddings:
        w.pop("lm_head.weight", None)
    tok = hf_dir / "tokenizer.json"
    state = {"step": 0, "imported_from": str(hf_dir.resolve()), "architecture": hf["architectures"][0]}
    if dropped:
        state["mtp_dropped"] = dropped
    return write_checkpoint(out, cfg, w, tok if tok.is_file() else None, state)


def _mtp_to_drop(cfg, hf_weights: dict) -> Optional[str]:
    """Why the config's MTP depths cannot be imported from these weights, or None (also when it has none)."""
    depth = getattr(cfg, "mtp_depth", 0)
    if not depth:
        return None
    layers = [f"model.layers.{cfg.num_layers + d}." for d in range(depth)]
    held = [p for p in layers if any(k.startswith(p) for k in hf_weights)]
    if len(held) < depth:
        return (f"num_nextn_predict_layers={depth} but the weights hold {len(held)} MTP layer(s) "
                f"(transformers' DeepseekV3ForCausalLM does not save them)")
    has_experts = any(k.startswith(tuple(layers)) and ".mlp.experts." in k for k in hf_weights)
    if has_experts != (cfg.mlp == "moe"):
        return (f"the MTP layers' MLPs are {'MoE' if has_experts else 'dense'} but this model builds "
                f"{'MoE' if cfg.mlp == 'moe' else 'dense'} ones there (model.mlp={cfg.mlp})")
    return None


# --- evaluation ---
def text_ids(ckpt: Path, text: str) -> list[int]:
    """The text's token ids under the checkpoint's tokenizer, after one EOS: in training every document
    follows an EOS, so the first token of the text is predicted too."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    if tok.token_to_id(EOS_TOKEN) is None:
        raise CheckpointError(f"{ckpt}: tokenizer.json has no {EOS_TOKEN} token")
    return [tok.token_to_id(EOS_TOKEN)] + tok.encode(text, add_special_tokens=False).ids


def windowed_loss(model, ids: list[int], seq_len: int, batch: int = 4) -> tuple[float, int]:
    """(mean token loss, tokens scored): ids[1:] each predicted once, in independent windows of `seq_len`
    inputs (window k: inputs ids[k L : (k+1) L], targets shifted by one)."""
    import torch
    import torch.nn.functional as F
    t = torch.tensor(ids, dtype=torch.long)
    n = t.numel() - 1
    if n < 1:
        raise ValueError("the text has no token to predict")
    wins = [(a, min(a + seq_len, n)) for a in range(0, n, seq_len)]
    total = 0.0
    with torch.no_grad():
        for k in range(0, len(wins), batch):
            group = wins[k:k + batch]
            for L in sorted({b - a for a, b in group}):  # batch windows of equal length
                same = [(a, b) for a, b in group if b - a == L]
                x = torch.stack([t[a:b] for a, b in same])  # (w, L)
                y = torch.stack([t[a + 1:b + 1] for a, b in same])  # (w, L)
                z = model(x)[..., :model.cfg.vocab_size]  # (w, L, V)
                total += float(F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="sum"))
    return total / n, n


def evaluate_text(ckpt_dir: str | Path, text: str, seq_len: Optional[int] = None) -> dict:
    """{checkpoint, tokens, loss, perplexity} of `text` (see windowed_loss; seq_len defaults to max_seq_len)."""
    ckpt = resolve_checkpoint(ckpt_dir)
    cfg = model_config(ckpt)
    L = int(seq_len or cfg.max_seq_len)
    if not 1 <= L <= cfg.max_seq_len:
        raise ValueError(f"seq_len={L} must be in [1, model.max_seq_len={cfg.max_seq_len}]")
    model, _ = model_at(ckpt)
    loss, n = windowed_loss(model, text_ids(ckpt, text), L)
    return {"checkpoint": str(ckpt), "tokens": n, "loss": loss, "perplexity": math.exp(loss)}


# --- entry-script arguments ---
def parse_cli(argv: list[str], required: tuple, optional: tuple = ()) -> dict:
    """Hydra-style `key=value` arguments (a leading `+` allowed); ValueError names what is wrong."""
    out = {}
    for a in argv:
        k, eq, v = a.lstrip("+").partition("=")
        if not eq or k not in required + optional:
            raise ValueError(f"unexpected argument {a!r}; usage: " + " ".join(
                [f"{r}=..." for r in required] + [f"[{o}=...]" for o in optional]))
        out[k] = v
    missing = [k for k in required if not out.get(k)]
    if missing:
        raise ValueError(f"missing {', '.join(f'{k}=...' for k in missing)}")
    return out
