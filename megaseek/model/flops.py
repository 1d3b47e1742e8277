"""Parameter and FLOP counts, and model FLOPs utilization (MFU).

Training FLOPs per token (Kaplan / PaLM convention, as Megatron and nanoGPT report them):

    F_token = 6 * N_matmul + 12 * L * s * h_attn        (h_attn = n_heads * head_dim)

6 N: forward 2 N plus backward 4 N for every weight in a matmul that the token uses (the embedding lookup is
not a matmul; the LM head is; of an MoE layer only the router, the k routed and the shared experts count). The attention term is QK^T and AV: forward 2 * 2 * s * h_attn per token per layer,
times 3 with the backward -> 12 L s h_attn (not halved for the causal mask, as PaLM and nanoGPT count,
so MFU figures compare with theirs). With full activation recomputation the hardware runs one extra
forward: hardware FLOPs = F_token + 2 N_matmul + 4 L s h_attn; selective recomputation re-runs the
attention sub-layer only.
"""
from __future__ import annotations


from megaseek.model.config import ModelConfig
from megaseek.model.spec import attention_cls, layer_params


def mtp_depth_params(cfg: ModelConfig) -> dict:
    """One multi-token-prediction depth (megaseek/model/mtp.py): the block of layer num_layers + k - 1 (MoE with
    mlp=moe: a token uses its k routed experts), W_k (h, 2h) and 3 norms; "matmul" / "active_matmul" count
    W_k and the block's matmuls, not the shared head (which runs once more per depth)."""
    h, blk = cfg.hidden_size, layer_params(cfg, cfg.num_layers)
    return {"total": blk["total"] + 2 * h * h + 3 * h, "active": blk["active"] + 2 * h * h + 3 * h,
            "matmul": blk["matmul"] + 2 * h * h, "active_matmul": blk["active_matmul"] + 2 * h * h}


def param_counts(cfg: ModelConfig) -> dict:
    """Parameter counts from the model spec's sub-layers (no weights built: works for any size)."""
    h = cfg.hidden_size
    per_layer = layer_params(cfg)["total"]
    layers = [layer_params(cfg, i) for i in range(cfg.num_layers)]  # MoE models: dense first layers differ
    embed = cfg.vocab_size * h
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * h
    total = embed + sum(lp["total"] for lp in layers) + h + head
    matmul = sum(lp["matmul"] for lp in layers) + cfg.vocab_size * h  # the head is a matmul, tied or not
    active = embed + sum(lp["active"] for lp in layers) + h + head
    active_matmul = sum(lp["active_matmul"] for lp in layers) + cfg.vocab_size * h
    if cfg.mtp_depth:  # D depths; the shared head runs once more per depth
        D, mtp = cfg.mtp_depth, mtp_depth_params(cfg)
        total += D * mtp["total"]
        active += D * mtp["active"]
        matmul += D * (mtp["matmul"] + cfg.vocab_size * h)
        active_matmul += D * (mtp["active_matmul"] + cfg.vocab_size * h)
    return {"total": total, "embedding": embed, "per_layer": per_layer, "matmul": matmul,
            "non_embedding": total - embed, "active": active, "active_matmul": active_matmul}


def flops_per_token(cfg: ModelConfig, seq_len: int, recompute: str = "none") -> dict:
    """Model and hardware FLOPs per trained token. N is the ACTIVE matmul count: with mlp=moe a token runs the
    router, `num_experts_per_tok` routed experts and the shared experts, not all `n_routed_experts`, so MFU of an
    MoE model is computed from what each token computes (as DeepSeek reports 37B active of 671B)."""
    n = param_counts(cfg)["active_matmul"]
    attn_cls = attention_cls(cfg)
    attn = 3 * (cfg.num_layers + cfg.mtp_depth) * attn_cls.score_flops(cfg, seq_len)  # forward + backward (x3)
    model = 6 * n + attn
    hw = model
    if recompute == "full":
        hw += 2 * n + attn // 3
    elif recompute == "selective":
        hw += 2 * cfg.num_layers * attn_cls.recompute_params(cfg) + attn // 3
    return {"model": model, "hardware": hw}


# Dense peak TFLOP/s per GPU (vendor datasheets, without sparsity). `fp32` is the plain FP32 rate (what
# PyTorch uses unless TF32 is allowed); SXM boards unless named. Matched in order against the upper-cased
# device name, so the more specific names come first ("H100 PCIE" before "H100").
PEAK_TFLOPS = {
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "H100 PCIE": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "H800": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "V100": {"fp32": 15.7, "tf32": 15.7, "bf16": 0.0, "fp16": 125.0},
}


def gpu_peak_tflops(device_name: str, dtype: str) -> float | None:
    for key, table in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return table.get(dtype)
    return None


def measure_matmul_peak(dtype=None, n: int = 1024, seconds: float = 0.5) -> float:
    """Measured matmul FLOP/s of this process (its threads, its device): the practical peak. On CPU the
    faster of torch.mm (MKL) and oneDNN (`megaseek/tensor_parallel/gemm.py`, what the model's projections
    run), each timed for `seconds`, so an MFU against it is not flattered by the slower library."""
    import time

    import torch
    dtype = dtype or torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    fns = [lambda: a @ b]
    if dev == "cpu" and dtype == torch.float32:
        from megaseek.tensor_parallel.gemm import onednn_available, onednn_mm_nt
        if onednn_available():
            fns.append(lambda: onednn_mm_nt(a, b))
    best = 0.0
    for fn in fns:
        for _ in range(2):
            fn()
        iters, t0 = 0, time.perf_counter()
        while True:
            fn()
            iters += 1
            if dev == "cuda":
                torch.cuda.synchronize()
            el = time.perf_counter() - t0
            if el > seconds:
                break
        best = max(best, 2 * n ** 3 * iters / el)
    return best
