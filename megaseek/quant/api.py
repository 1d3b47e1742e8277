"""quantize_checkpoint: load, calibrate, quantize, measure held-out perplexity before and after, write."""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable, Optional


from megaseek.quant.calib import mean_loss, run_windows, text_windows
from megaseek.quant.ptq import METHODS, quantize_model
from megaseek.quant.store import write_checkpoint
from megaseek.quant.torchao_cpu import INT8_MODES, quantize_int8


def _windows(ckpt: Path, seq_len: int, split: str, n: Optional[int], seed: int, text_file: Optional[str]):
    return text_windows(ckpt, text_file, seq_len) if text_file else run_windows(ckpt, seq_len, split, n, seed)


def quantize_checkpoint(checkpoint: str | Path, out: Optional[str | Path], method: str = "gptq", bits: int = 4,
                        group_size: int = 128, calib_windows: int = 64, seq_len: Optional[int] = None,
                        calib_file: Optional[str] = None, eval_file: Optional[str] = None, act_order: bool = True,
                        damp: float = 0.01, seed: int = 0, overwrite: bool = False,
                        log: Callable[[str], None] = print) -> dict:
    """Quantize a checkpoint and return the report {method, bits, group_size, ppl_before, ppl_after,
    ppl_delta, layers, out}. method rtn|gptq writes `out` (see store.py); int8_weight_only|int8_dynamic (torchao,
    applied at load time) only measure. Calibration: `calib_windows` random train windows of the run's data (or
    calib_file); perplexity: the run's held-out split (or eval_file)."""
    from megaseek.ckpt.hf import model_at, resolve_checkpoint
    if method not in METHODS + INT8_MODES:
        raise ValueError(f"method={method!r}; choose one of {METHODS + INT8_MODES}")
    if method in METHODS and not out:
        raise ValueError(f"method={method} writes a checkpoint: pass out=DIR")
    ckpt = resolve_checkpoint(checkpoint)
    model, cfg = model_at(ckpt)
    if cfg.mlp == "moe":  # before calibration: the quantizers take linear modules run by the forward
        raise ValueError(f"{ckpt}: model.mlp=moe: quantization of MoE models is not supported: the routed experts "
                         f"are grouped (E, out, in) tensors and the experts' down projections run as partial sums, "
                         f"not as linear modules; quantize a dense model (model.mlp=swiglu)")
    L = int(seq_len or cfg.max_seq_len)
    if not 1 <= L <= cfg.max_seq_len:
        raise ValueError(f"seq_len={L} must be in [1, model.max_seq_len={cfg.max_seq_len}]")
    evalw = _windows(ckpt, L, "valid", None, seed, eval_file)
    before = mean_loss(model, evalw)
    t0 = time.time()
    q = copy.deepcopy(model)
    layers, stored = [], None
    if method in INT8_MODES:
        quantize_int8(q, method)
    else:
        calib = _windows(ckpt, L, "train", calib_windows, seed, calib_file)
        res = quantize_model(q, method, bits, group_size, calib=calib, act_order=act_order, damp=damp, log=log)
        layers, stored = res.layers, res.weights
    after = mean_loss(q, evalw)
    report = {"checkpoint": str(ckpt), "method": method, "bits": 8 if method in INT8_MODES else int(bits),
              "group_size": None if method in INT8_MODES else int(group_size),
              "act_order": bool(act_order and method == "gptq"), "eval_tokens": int(evalw[:, 1:].numel()),
              "ppl_before": math.exp(before), "ppl_after": math.exp(after),
              "ppl_delta": math.exp(after) / math.exp(before) - 1, "quantize_s": time.time() - t0, "layers": layers}
    if stored is not None:
        report["out"] = str(write_checkpoint(out, q, src=ckpt, quant=stored, meta=report, overwrite=overwrite))
    return report
