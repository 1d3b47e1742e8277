"""Compression during training: quantization-aware training (`train.qat`) and 2:4 sparsity (`train.sparsity`).

    train.qat = none | int<b>w | int8a_int<b>w      (b in 2..8; `train.qat_group_size` columns per weight group)

`prepare_qat(model, spec)` runs BEFORE the DeepSpeed engine is built: every target linear of the blocks
(megaseek/quant/modules.py) becomes torchao's FakeQuantizedLinear, which trains with
    y = fq_a(x) fq_w(W)^T,   fq(t) = (clamp(round(t / s) + z, qmin, qmax) - z) s,   d fq / dt = 1 (straight through)
weights int-b symmetric per group of `qat_group_size` input columns, activations (int8a_ only) int8 asymmetric per
token, scales dynamic. Parameter names and tensors are unchanged, so checkpoints, `train.init_from` and resuming
work as without QAT. After training (`on_train_end`, rank 0) the trained weights go through torchao's convert:
prepared and converted logits are compared on a fixed batch (`qat_convert_diff` in the summary), and the b-bit
integers are written as a quantized checkpoint directory `run_dir/qat` (megaseek/quant/store.py: integer codes,
scales and zero points, plus their dequantized fp32 values), which launch/evaluate.py, launch/generate.py and
launch/export_onnx.py read as any checkpoint.

    train.sparsity = none | 2:4

`Sparsity` (a loop callback) prunes at `on_fit_start`, after `Resume` / `train.init_from` set the weights: magnitude
2:4 masks M (in every 4 consecutive input weights of a row the 2 largest |W| stay) of every target linear. The
pruned weights are zeroed in the module AND in the optimizer's fp32 master copy (ZeRO-1/2, bf16), a gradient hook
applies g <- g * M (so Adam's moments and the master of pruned weights stay exactly 0), and after every optimizer
step (`on_step_end`) W <- W * M is applied again and the pattern checked. Summary: `sparsity_density` (0.5).
Both need tp = 1 and ZeRO stage <= 2 (full weights on every rank), QAT also pp = 1; `check_compress` refuses other
layouts and bad values before any work.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from megaseek.config.schema import ConfigError
from megaseek.train.callbacks import Callback

_QAT = re.compile(r"^(int8a_)?int([2-8])w$")
SPARSITY = ("none", "2:4")


@dataclass(frozen=True)
class QATSpec:
    weight_bits: int
    group_size: int
    activation_bits: Optional[int]  # 8, or None (weights only)

    def kwargs(self) -> dict:
        return dict(weight_bits=self.weight_bits, group_size=self.group_size, activation_bits=self.activation_bits)


def qat_spec(train) -> Optional[QATSpec]:
    """The parsed `train.qat` (None for "none"); ConfigError naming the key and the accepted forms."""
    v = str(train.qat or "none")
    if v == "none":
        return None
    m = _QAT.match(v)
    if m is None:
        raise ConfigError(f"train.qat={v!r}: expected none, int<b>w or int8a_int<b>w with b in 2..8 "
                         f"(e.g. int8a_int4w: int8 activations per token, int4 weights in groups)")
    if int(train.qat_group_size) < 1:
        raise ConfigError(f"train.qat_group_size={train.qat_group_size} must be >= 1")
    return QATSpec(int(m.group(2)), int(train.qat_group_size), 8 if m.group(1) else None)


def check_compress(train, model_cfg, layout, zero_stage: int) -> None:
    """Refuse bad `train.qat` / `train.sparsity` values and layouts they cannot run at, before any work."""
    spec = qat_spec(train)
    if str(train.sparsity) not in SPARSITY:
        raise ConfigError(f"train.sparsity={train.sparsity!r}: expected one of {', '.join(SPARSITY)}")
    if spec is None and train.sparsity == "none":
        return
    used = "train.qat" if spec is not None else "train.sparsity"
    if layout.tp != 1:
        raise ConfigError(f"{used} needs parallel.tp=1 (got {layout.tp}): the quantizers see whole weights")
    if int(zero_stage) > 2:
        raise ConfigError(f"{used} needs zero.stage <= 2 (got {zero_stage}): ZeRO-3 partitions the weights")
    if model_cfg.mlp == "moe" or model_cfg.attention != "gqa":
        raise ConfigError(f"{used} supports the dense GQA decoder (model.attention=gqa, model.mlp not moe; got "
                          f"{model_cfg.attention}, {model_cfg.mlp})")
    if spec is not None and layout.pp != 1:
        raise ConfigError(f"train.qat needs parallel.pp=1 (got {layout.pp}): the converted model is written whole")
    if spec is not None:
        for name, cols in (("hidden_size", model_cfg.hidden_size), ("intermediate_size", model_cfg.intermediate_size),
                           ("num_heads * head_dim", model_cfg.num_heads * model_cfg.head_dim)):
            if cols % spec.group_size:
                raise ConfigError(f"train.qat_group_size={spec.group_size} does not divide model.{name}={cols}")
    if train.sparsity == "2:4":
        for name, cols in (("hidden_size", model_cfg.hidden_size), ("intermediate_size", model_cfg.intermediate_size)):
            if cols % 4:
                raise ConfigError(f"train.sparsity=2:4 needs model.{name} ({cols}) divisible by 4")


def prepare_qat(model: nn.Module, spec: Optional[QATSpec]) -> nn.Module:
    """Fake-quantized linears in place (before the engine is built); the model's Parameters are kept."""
    if spec is None:
        return model
    from megaseek.quant.torchao_cpu import qat_prepare
    return qat_prepare(model, **spec.kwargs())


def converted_weights(model: nn.Module, spec: QATSpec) -> dict:
    """name -> QuantizedWeight of the target linears of a converted model (torchao IntxUnpackedToInt8Tensor:
    int8 qdata in [qmin, qmax], per-group scale and zero point) as unsigned codes: codes = qdata - qmin,
    zeros = zero_point - qmin, so (codes - zeros) * scale is torchao's dequantized weight."""
    from megaseek.quant.groupwise import QuantizedWeight
    from megaseek.quant.modules import target_linears
    qmin = -(2 ** (spec.weight_bits - 1))
    out = {}
    for name, mod in target_linears(model).items():
        w = mod.weight
        cols = w.shape[1]
        out[name] = QuantizedWeight(codes=(w.qdata.to(torch.int16) - qmin).to(torch.uint8),
                                    scales=w.scale.float().reshape(w.shape[0], -1),
                                    zeros=(w.zero_point.to(torch.int16) - qmin).to(torch.uint8).reshape(w.shape[0], -1),
                                    g_idx=(torch.arange(cols) // spec.group_size).to(torch.int32),
                                    bits=spec.weight_bits)
    return out


class QATConvert(Callback):
    """After training: convert the trained fake-quantized model (rank 0, a tp = 1 copy) and write `run_dir/qat`."""

    def __init__(self, module: nn.Module, model_cfg, spec: QATSpec, run_dir: Path, tokenizer_path, rank: int,
                 log=print):
        self.module, self.mcfg, self.spec, self.out = module, model_cfg, spec, Path(run_dir) / "qat"
        self.tokenizer, self.rank, self.log = tokenizer_path, rank, log

    def on_train_end(self, t) -> None:
        if self.rank != 0:
            return
        from megaseek.model.decoder import Decoder
        from megaseek.quant.modules import set_weight, target_linears
        from megaseek.quant.store import write_checkpoint
        from megaseek.quant.torchao_cpu import qat_convert
        sd = {n: v.detach().float().cpu() for n, v in self.module.state_dict().items()}
        m = prepare_qat(Decoder(self.mcfg, seed=0), self.spec)
        m.load_state_dict(sd, strict=True)
        m.eval()
        ids = torch.randint(0, self.mcfg.vocab_size, (2, min(32, self.mcfg.max_seq_len)),
                            generator=torch.Generator().manual_seed(0))  # (2, s)
        with torch.no_grad():
            zp = m(ids)
            qat_convert(m, **self.spec.kwargs())
            zc = m(ids)
        diff = float((zp - zc).abs().max())
        quant = converted_weights(m, self.spec)
        plain = Decoder(self.mcfg, seed=0).eval()
        plain.load_state_dict({n: v for n, v in sd.items()}, strict=True)
        for name, mod in target_linears(plain).items():
            set_weight(mod, quant[name].dequantize())
        meta = dict(method="qat", bits_default=self.spec.weight_bits, group_size=self.spec.group_size,
                    activation_bits=self.spec.activation_bits, prepared_vs_converted=diff, step=t.step)
        write_checkpoint(self.out, plain, quant=quant, meta=meta, step=t.step, tokenizer=self.tokenizer,
                         overwrite=True)
        t.summary["qat_convert_diff"] = diff
        t.summary["qat_checkpoint"] = str(self.out)
        self.log(f"[qat] converted int{self.spec.weight_bits} g{self.spec.group_size}"
                 f"{' + int8 activations' if self.spec.activation_bits else ''}: prepared vs converted logits "
                 f"{diff:.2e}; wrote {self.out}")


class Sparsity(Callback):
    """2:4 masks chosen at fit start (after resume / init_from), kept through every optimizer step."""

    def __init__(self, engine, log=print):
        self.engine, self.log = engine, log
        self.masks: dict = {}
        self.hooks: list = []

    def _params(self) -> dict:
        from megaseek.quant.modules import target_linears
        return {n: mod.weight for n, mod in target_linears(self.engine.module).items()}

    def _set_masked(self, p: torch.nn.Parameter, mask: torch.Tensor) -> None:
        """W <- W * M in the module and, where the optimizer keeps one, in its fp32 master copy."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
        with torch.no_grad():
            if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 or bf16: a separate fp32 master (collective: every dp rank
                # calls, also one whose partition holds none of p, where _hp_mapping is None)
                full = safe_get_full_fp32_param(p)
                safe_set_full_fp32_param(p, full * mask.to(full.device, full.dtype))
            p.mul_(mask.to(p.device, p.dtype))

    def on_fit_start(self, t) -> None:
        from megaseek.quant.sparsity import mask_2of4
        for name, p in self._params().items():
            m = mask_2of4(p.detach().float().abs())  # (out, in) True = kept
            self.masks[name] = m
            self._set_masked(p, m)
            self.hooks.append(p.register_hook(lambda g, m=m: g * m.to(g.device, g.dtype)))
        self.log(f"[sparsity] 2:4 magnitude masks on {len(self.masks)} linears; density {self.density():.3f}")

    def density(self) -> float:
        ps = self._params()
        nz = sum(int((ps[n] != 0).sum()) for n in self.masks)
        return nz / max(1, sum(ps[n].numel() for n in self.masks))

    def on_step_end(self, t, out: dict) -> None:
        from megaseek.quant.sparsity import check_2of4
        ps = self._params()
        for name, m in self.masks.items():
            with torch.no_grad():
                ps[name].mul_(m.to(ps[name].device, ps[name].dtype))
            bad = check_2of4(ps[name].detach())
            if bad:
                raise RuntimeError(f"[sparsity] {name}: {bad} groups of 4 break the 2:4 pattern after step {t.step}")

    def on_fit_end(self, t) -> None:
        t.summary["sparsity_density"] = self.density() if self.masks else None
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
