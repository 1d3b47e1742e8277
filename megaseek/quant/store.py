"""Quantized checkpoints: a valid megaseek checkpoint PLUS the integer weights.

    OUT/
      manifest.json              megaseek-ckpt-1 manifest (sha256 of every file; the model config; layout tp=pp=dp=1)
      weights-stage0.safetensors every tensor in fp32; quantized linears hold their dequantized values
      quant.safetensors          per quantized linear `<name>`: `<name>.qweight` uint8 codes (two 4-bit codes per
                                 byte for bits <= 4), `<name>.scales` fp32 (out, groups), `<name>.zeros` uint8
                                 (out, groups), `<name>.g_idx` int32 (in,)
      quant.json                 method, bits, group size, act-order, the per-layer report, perplexities
      tokenizer.json, state.json copied from the source checkpoint

Because the fp32 file is there, every consumer of checkpoints (`launch/evaluate.py`, `load_model`, the HF export)
reads a quantized directory as it reads any checkpoint; `load_quantized` rebuilds the weights from the integers.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from megaseek.quant.groupwise import QuantizedWeight, pack, unpack

QUANT_FILE, QUANT_META = "quant.safetensors", "quant.json"


def canonical_state(model: nn.Module) -> dict:
    """Full fp32 tensors under canonical names, vocabulary padding removed (what checkpoints hold)."""
    V = model.cfg.vocab_size
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().float()
        if name in ("embed.weight", "lm_head.weight") and t.shape[0] > V:
            t = t[:V]
        out[name] = t.contiguous()
    return out


def write_checkpoint(out: str | Path, model: nn.Module, src: Optional[Path] = None, quant: Optional[dict] = None,
                     meta: Optional[dict] = None, step: int = 0, state: Optional[dict] = None,
                     tokenizer: Optional[Path] = None, overwrite: bool = False) -> Path:
    """Write `model` (tp = 1) as a megaseek checkpoint directory at `out`, atomically (tmp dir + rename).

    src: a checkpoint to copy tokenizer.json / state.json and the step from; quant: name -> QuantizedWeight."""
    from safetensors.torch import save_file
    from megaseek.ckpt import checkpoint as C
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: output exists and is not an empty directory (pass overwrite=true)")
    with C.staged_dir(out) as tmp:
        weights = canonical_state(model)
        save_file(weights, str(tmp / "weights-stage0.safetensors"), metadata={"format": C.FORMAT})
        if src is not None:
            step = int(C.read_manifest(src).get("step", step))
            for f in ("tokenizer.json", "state.json"):
                if (src / f).is_file():
                    shutil.copy(src / f, tmp / f)
        if tokenizer is not None:
            shutil.copy(tokenizer, tmp / "tokenizer.json")
        if state is not None:
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if quant:
            tensors = {}
            for name, q in quant.items():
                tensors[f"{name}.qweight"] = pack(q.codes, q.bits)
                tensors[f"{name}.scales"] = q.scales.float().contiguous()
                tensors[f"{name}.zeros"] = q.zeros.to(torch.uint8).contiguous()
                tensors[f"{name}.g_idx"] = q.g_idx.to(torch.int32).contiguous()
            save_file(tensors, str(tmp / QUANT_FILE), metadata={"format": "megaseek-quant-1"})
            shapes = {n: list(q.codes.shape) for n, q in quant.items()}
            bits = {n: q.bits for n, q in quant.items()}
            (tmp / QUANT_META).write_text(json.dumps(dict(meta or {}, shapes=shapes, bits=bits), indent=1))
        files = {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": C.sha256(f)}
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        C.write_json_atomic(tmp / "manifest.json", {
            "layout": {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}, "model": model.cfg.to_dict(),
            "tensors": {n: "weights-stage0.safetensors" for n in weights}, "format": C.FORMAT, "step": step,
            "files": files})
    return out


def read_quantized(ckpt: Path) -> tuple[dict, dict]:
    """(name -> QuantizedWeight, quant.json) of a quantized checkpoint directory."""
    from safetensors import safe_open
    ckpt = Path(ckpt)
    if not (ckpt / QUANT_FILE).is_file() or not (ckpt / QUANT_META).is_file():
        raise FileNotFoundError(f"{ckpt}: not a quantized checkpoint (no {QUANT_FILE} / {QUANT_META}); "
                                f"write one with launch/quantize.py")
    meta = json.loads((ckpt / QUANT_META).read_text())
    out = {}
    with safe_open(str(ckpt / QUANT_FILE), framework="pt") as f:
        for name, shape in meta["shapes"].items():
            b = int(meta["bits"][name])
            out[name] = QuantizedWeight(codes=unpack(f.get_tensor(f"{name}.qweight"), b, shape[1]),
                                        scales=f.get_tensor(f"{name}.scales"), zeros=f.get_tensor(f"{name}.zeros"),
                                        g_idx=f.get_tensor(f"{name}.g_idx"), bits=b)
    return out, meta


def load_quantized(ckpt_dir: str | Path):
    """(Decoder at tp = 1, eval mode, ModelConfig) whose quantized linears are rebuilt from the integer codes.

    The checkpoint is verified (sha256) like any other; the rest of the weights come from its fp32 file."""
    from megaseek.ckpt.hf import model_at, resolve_checkpoint
    from megaseek.quant.ptq import apply_quantized
    ckpt = resolve_checkpoint(ckpt_dir)
    weights, _ = read_quantized(ckpt)
    model, cfg = model_at(ckpt)
    return apply_quantized(model, weights).eval(), cfg
