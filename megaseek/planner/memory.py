"""Memory per GPU (or per CPU rank) of one training step: what this codebase and DeepSpeed allocate.

Notation: N = parameters held by this rank (after tensor, pipeline and expert sharding), D = data-parallel size,
w = bytes of a model value (4 fp32, 2 bf16/fp16), T = b s tokens of a micro-batch, t = tensor degree.

Model states (resident), DeepSpeed with torch AdamW (fp32 exp_avg + exp_avg_sq):

    stage   parameters   gradients   optimizer (fp32 master + m + v)
    0       w N          w N         (4 if w < 4 else 0) N + 8 N
    1       w N          w N         12 N / D        (DeepSpeed keeps an fp32 partition even for fp32 models)
    2       w N          w N / D     12 N / D
    3       w N / D      w N / D     12 N / D
    offload_optimizer moves the optimizer column (and fp32 gradient partition) to host memory;
    offload_param (stage 3) moves the parameter partition too.
    MoE (parallel.ep = e): a rank holds E/e routed experts per MoE layer (N_e of its N); ZeRO partitions them
    over the expert-data-parallel group of D/e ranks, the other N - N_e over D: every "/ D" above reads
    (N - N_e) / D + N_e / (D/e).

Transient on top (the peak is the largest phase, not the sum):
  backward   activations of the micro-batches in flight + the gradient reduce bucket; ZeRO-3 also the
             gathered parameters (DeepSpeed keeps up to stage3_max_live_parameters of them from the forward
             to the backward) and the full gradient of the largest parameter before its reduce-scatter
  boundary   stage 0: DeepSpeed all-reduces the flattened gradients (a copy of min(N, bucket) values)
  step       stages 1-2: the flattening of the gradient partition holds own-partition grads, the averaged
             partition and its flat copy (3 w N/D, + 4 N/D fp32 when w < 4); then the fp32 gradient and
             AdamW's foreach temporary (8 N/D). Stage 0: AdamW's foreach temporary 4 N (+ fp32 grads).

Activations per layer and micro-batch (bytes), read off the saved tensors of megaseek/model (a = w):

    RMSNorm x2     (4 + 2a) T h         fp32 input copy, x/rms, scaled output the linears save
                   with SP: (4 + a) T h / t + a T h (the all-gathered output the column-parallel layers save)
    attention      a T (2 h/t + 2 h_kv/t) + 4 b (n_h/t) s    q, k, v, output, logsumexp (flash kernel)
    SwiGLU         4 a T i / t          gate, silu(gate), up, product
    selective      a T h (block input) + norm + SwiGLU; the attention is recomputed
    full           a T h per layer (+ one layer recomputed during backward)
  LM head and loss (last stage): final norm + logits workspace (12 + a) T V_pad / t (see head_activation_bytes).
  With 1F1B pipelining stage k holds min(pp - k, m) micro-batches.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, field
from typing import Optional

from megaseek.model.config import ModelConfig
from megaseek.planner.hardware import Hardware
from megaseek.planner.setup import Setup


def padded_vocab(m: ModelConfig, tp: int) -> int:
    """As megaseek.tensor_parallel.layers.padded_vocab_size: a multiple of tp * pad_vocab_multiple."""
    mult = tp * max(1, m.pad_vocab_multiple)
    return ((m.vocab_size + mult - 1) // mult) * mult


def kv_heads_local(m: ModelConfig, tp: int) -> int:
    """kv heads a tensor rank computes: nkv/t when it divides, else one (replicated KVProjection)."""
    return m.num_kv_heads // tp if m.num_kv_heads >= tp else 1


def is_moe_layer(m: ModelConfig, layer: Optional[int]) -> bool:
    return m.mlp == "moe" and layer is not None and layer >= m.first_k_dense_replace


def attention_params(m: ModelConfig, tp: int) -> int:
    """Attention weights of one block on one tensor rank. GQA: q, o and (nkv >= t) k, v column/row-parallel.
    MLA: q_proj (or q_b_proj), kv_b_proj column-parallel and o_proj row-parallel (/t); the down-projections
    q_a_proj, kv_a_proj_with_mqa and their norms replicated (megaseek/model/mla.py)."""
    h, d = m.hidden_size, m.head_dim
    if m.attention == "mla":
        nh, dn, dr, dv, r = m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
        q = h * nh * (dn + dr) // tp if m.q_lora_rank is None else \
            h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * nh * (dn + dr) // tp
        return q + h * (r + dr) + r + r * nh * (dn + dv) // tp + nh * dv * h // tp
    q_o = 2 * h * m.num_heads * d // tp
    kv = 2 * h * m.num_kv_heads * d // tp if m.num_kv_heads >= tp else 2 * h * m.num_kv_heads * d  # replicated
    return q_o + kv


def expert_params(m: ModelConfig, tp: int, ep: int = 1, layer: Optional[int] = None) -> int:
    """Routed-expert weights of layer `layer` on one rank: E / ep experts, each (gate, up, down) sharded over tp."""
    if not is_moe_layer(m, layer):
        return 0
    return m.n_routed_experts // ep * 3 * m.hidden_size * m.moe_intermediate_size // tp


def layer_params(m: ModelConfig, tp: int, layer: Optional[int] = None, ep: int = 1) -> int:
    """Parameters of one decoder block on one tensor (and, for routed experts, expert-parallel) rank. An MoE
    layer (layer >= first_k_dense_replace): the replicated router (E h), the shared experts (3 h n_s i_moe / t)
    and E / ep routed experts (expert_params); otherwise the dense SwiGLU (3 h i / t)."""
    h = m.hidden_size
    if is_moe_layer(m, layer):
        mlp = m.n_routed_experts * h + 3 * h * m.n_shared_experts * m.moe_intermediate_size // tp \
            + expert_params(m, tp, ep, layer)
    else:
        mlp = 3 * h * m.intermediate_size // tp
    return attention_params(m, tp) + mlp + 2 * h


def stage_ranges(m: ModelConfig, pp: int, method: str = "parameters") -> list[tuple[int, int]]:
    """The trainer's own stage partition (megaseek.pipeline.partition), so plan and run agree."""
    if pp == 1:
        return [(0, m.num_layers)]
    from megaseek.pipeline.partition import partition
    return partition(m, pp, method)


def mtp_params(m: ModelConfig, tp: int, pp: int, ep: int = 1) -> int:
    """Multi-token prediction on the last stage, per tensor rank (megaseek/model/mtp.py): per depth the block
    of layer num_layers + k - 1 (MoE with mlp=moe: E/ep routed experts; else the dense SwiGLU), W_k (h, 2h)
    replicated, 3 norms; with pp > 1 (and no tied copy already there) the stage also keeps a copy of the
    vocab-parallel embedding for the depths' input tokens."""
    if not m.mtp_depth:
        return 0
    h = m.hidden_size
    block = layer_params(m, tp, m.num_layers, ep)
    emb = padded_vocab(m, tp) * h // tp if pp > 1 and not m.tie_embeddings else 0
    return m.mtp_depth * (block + 2 * h * h + 3 * h) + emb


def largest_param(m: ModelConfig, tp: int) -> int:
    h = m.hidden_size
    return max(padded_vocab(m, tp) * h // tp, h * m.intermediate_size // tp, h * m.num_heads * m.head_dim // tp)


@dataclass
class StageParams:
    stage: int
    layers: int
    params: int          # on one tensor rank of this stage
    embed: bool
    head: bool
    experts: int = 0     # of `params`: routed-expert weights (ZeRO shards them over dp / ep, not dp)
    moe_layers: int = 0
    mtp_moe: int = 0     # MoE MTP blocks on this (the last) stage: their own all-to-alls, never recomputed


_STAGE_CACHE: dict = {}


def stage_params(m: ModelConfig, tp: int, pp: int, method: str = "parameters", ep: int = 1) -> list[StageParams]:
    key = (astuple(m), tp, pp, method, ep)
    if key not in _STAGE_CACHE:
        _STAGE_CACHE[key] = _stage_params(m, tp, pp, method, ep)
    return _STAGE_CACHE[key]


def _stage_params(m: ModelConfig, tp: int, pp: int, method: str, ep: int = 1) -> list[StageParams]:
    vp, h = padded_vocab(m, tp), m.hidden_size
    out = []
    for s, (lo, hi) in enumerate(stage_ranges(m, pp, method)):
        first, last = s == 0, s == pp - 1
        n = sum(layer_params(m, tp, i, ep) for i in range(lo, hi))
        experts = sum(expert_params(m, tp, ep, i) for i in range(lo, hi))
        moe = sum(is_moe_layer(m, i) for i in range(lo, hi))
        if first or (last and m.tie_embeddings):
            n += vp * h // tp                      # embedding (or the tied copy on the last stage)
        if last:
            n += h + (0 if m.tie_embeddings else vp * h // tp)  # final norm + LM head
            n += mtp_params(m, tp, pp, ep)
            experts += m.mtp_depth * expert_params(m, tp, ep, m.num_layers)
        mtp_moe = m.mtp_depth if last and is_moe_layer(m, m.num_layers) else 0
        out.append(StageParams(s, hi - lo, n, first, last, experts, moe, mtp_moe))
    return out


def layer_activation_bytes(m: ModelConfig, b: int, s: int, tp: int, sp: bool, a: int, moe: bool = False) -> dict:
    """Saved-for-backward bytes of one decoder block for one micro-batch, by part (`moe`: an MoE block's MLP;
    an estimate from the layer's saved tensors, not yet checked against a measured run)."""
    T, h, i, d = b * s, m.hidden_size, m.intermediate_size, m.head_dim
    nh_l = m.num_heads // tp
    kv_l = kv_heads_local(m, tp)
    if sp:   # sharded input (fp32 copy) and x/rms (a) saved; the all-gathered output saved by the linears
        norm = (4 + a) * T * h // tp + 4 * T // tp + a * T * h
    else:    # fp32 input copy, x/rms, and the scaled output the linears save
        norm = (4 + 2 * a) * T * h + 4 * T
    # q, k, v (after RoPE), the attention output (its (b, s, h/t) reshape for o_proj is a view of the
    # flash kernel's output), the fp32 logsumexp
    attn = a * T * (2 * nh_l * d + 2 * kv_l * d) + 4 * b * nh_l * s
    if m.attention == "gqa" and getattr(m, "fused", False) and m.num_kv_heads >= tp:
        # model.fused: v is a view of the one qkv GEMM output, so its whole (nh + 2 kv) d storage stays saved
        attn += a * T * (nh_l + kv_l) * d
    # gate and up outputs, silu(gate), the product (saved by down_proj); model.fused (dense gqa + swiglu) keeps
    # the one gate/up GEMM output (2 i), a contiguous copy of its gate half and silu(gate) (layers.py
    # _SwiGLUInterleaved), plus the product
    from megaseek.model.layers import fused_dense
    mlp = (5 if fused_dense(m) else 4) * a * T * i // tp
    if moe:  # gate, silu, up, product of the T k routed rows and the T shared rows (i_moe / t wide), plus the
        # sorted assignment rows, the expert outputs and their weighted copy for the combine (3 a T k h)
        k, im = m.num_experts_per_tok, m.moe_intermediate_size
        mlp = 4 * a * T * (k + m.n_shared_experts) * im // tp + 3 * a * T * k * h
    block_in = a * T * h // (tp if sp else 1)
    return {"norm": norm, "attn": attn, "mlp": mlp, "block_in": block_in,
            "none": 2 * norm + attn + mlp,
            "selective": block_in + norm + mlp,
            "full": block_in,
            "attn_sublayer": norm + attn}


def head_activation_bytes(m: ModelConfig, b: int, s: int, tp: int, sp: bool, a: int, cpu: bool = False) -> dict:
    """Final norm and loss of the last stage (megaseek/tensor_parallel/cross_entropy.py, every tp): the saved
    fp32 exp(z - max), and the workspace at the loss's peak, in bytes per local logit: the logits (a) and one
    fp32 tensor (the shifted copy, exponentiated in place, turned into the gradient in place by backward;
    in fp32 the logits are read, not copied) = 4 + a; the gradient's cast back to a 16-bit dtype (a) comes
    once the logits are freed. (`cpu` is kept for callers; the loss allocates the same on every device.)"""
    T = b * s
    norm = layer_activation_bytes(m, b, s, tp, sp, a)["norm"]
    v_local = padded_vocab(m, tp) // tp
    per_logit = 4 + a
    # the cross-entropy saves exp(z - max) (fp32, T V/p) and per token its sum (4), the local target (8) and two
    # masks (1 + 1) (tensor_parallel/cross_entropy.py)
    return {"norm": norm, "logits_saved": 4 * T * v_local + 14 * T, "logits": per_logit * T * v_local}


def activation_bytes(st: Setup, stage: StageParams, cpu: bool = False) -> dict:
    """Peak activation memory of one pipeline stage during backward, with its parts."""
    m, a = st.model, st.bytes_per_value
    per = layer_activation_bytes(m, st.micro_batch, st.seq_len, st.tp, st.sp, a)
    per_moe = layer_activation_bytes(m, st.micro_batch, st.seq_len, st.tp, st.sp, a, moe=True)
    in_flight = min(st.pp - stage.stage, st.grad_accum) if st.pp > 1 else 1
    dense = stage.layers - stage.moe_layers
    kept = (per[st.checkpointing] * dense + per_moe[st.checkpointing] * stage.moe_layers) * in_flight
    big = per_moe if stage.moe_layers else per
    recompute = {"none": 0, "selective": big["attn_sublayer"], "full": big["none"]}[st.checkpointing]
    head = head_activation_bytes(m, st.micro_batch, st.seq_len, st.tp, st.sp, a, cpu) if stage.head else \
        {"norm": 0, "logits": 0, "logits_saved": 0}
    if stage.head and m.mtp_depth:  # per depth, kept until backward: its dense block (never recomputed), the
        # normed hidden and embedded inputs and their (T, 2h) concatenation, its loss's fp32 log-softmax
        T, h = st.micro_batch * st.seq_len, m.hidden_size
        blk = per_moe if is_moe_layer(m, m.num_layers) else per
        kept += m.mtp_depth * (blk["none"] + 4 * a * T * h + head["logits_saved"]) * in_flight
    # the loss workspace exists only at the end of the forward / start of the backward; recompute later
    total = kept + max(head["norm"] + head["logits"], recompute)
    return {"per_layer": per[st.checkpointing], "layers": stage.layers, "in_flight": in_flight,
            "layers_total": kept, "recompute": recompute, "head": head["norm"] + head["logits"],
            "saved_after_forward": kept + head["norm"] + head["logits_saved"], "total": total}


@dataclass
class Memory:
    """Bytes per rank at the peak. parameters + gradients + optimizer + activations + buffers + runtime = peak."""
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    runtime: float
    peak: float
    host: float                       # offloaded states per rank (host memory)
    checkpoint_host: float            # host memory a rank needs while saving (see _stage_memory)
    capacity: Optional[float]
    stage: int                        # the pipeline stage with the largest peak
    params_on_rank: int
    phase: str                        # which phase sets the peak: backward | boundary | step
    detail: dict = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.peak <= self.capacity

    @property
    def headroom(self) -> Optional[float]:
        return None if self.capacity is None else self.capacity - self.peak


def model_states(N: float, D: int, w: int, z: int, offload_optimizer: bool = False,
                 offload_param: bool = False) -> dict:
    """Resident bytes per rank of parameters, gradients and optimizer states (the table above); `host` is
    what offloading moves to host memory. With w = 2 these are the ZeRO paper's (2 + 2 + K) Psi, ..., K = 12."""
    params = w * N / D if z == 3 else w * N
    grads = w * N if z <= 1 else w * N / D
    opt = (12 * N / D) if z >= 1 else (8 * N + (4 * N if w < 4 else 0))
    host = 0.0
    if offload_optimizer and z >= 1:
        host += opt + 4 * N / D                 # fp32 master + moments + fp32 gradient partition
        opt = 0.0
        grads = 0.0 if z >= 2 else grads
    if offload_param and z == 3:
        host += params
        params = 0.0
    return {"parameters": params, "gradients": grads, "optimizer": opt, "host": host}


def _stage_memory(st: Setup, hw: Hardware, sp_: StageParams, runtime: float) -> Memory:
    N, D, w, z = sp_.params, st.dp, st.bytes_per_value, st.zero_stage
    De = max(1, D // st.ep)  # the expert-data-parallel group
    Nd, Ne = N - sp_.experts, sp_.experts
    touched = not hw.is_gpu  # on CPU an empty bucket costs only the pages written (RSS); on GPU all of it
    bucket = lambda elems: min(elems, N) * w if touched else elems * w  # noqa: E731

    # routed experts: ZeRO partitions them over the expert-data-parallel group (dp / ep ranks holding the same
    # experts), the rest over dp
    ms = model_states(Nd, D, w, z, st.offload_optimizer, st.offload_param)
    if Ne:
        me = model_states(Ne, De, w, z, st.offload_optimizer, st.offload_param)
        ms = {k: ms[k] + me[k] for k in ms}
    part = Nd / D + Ne / De  # this rank's ZeRO partition (elements)
    params, grads, opt, host = ms["parameters"], ms["gradients"], ms["optimizer"], ms["host"]

    act = activation_bytes(st, sp_, cpu=touched)
    # backward: gradient reduce bucket (stages 1-3), ZeRO-3 gather working set (prefetch bucket)
    bwd_buf = 0.0
    if z >= 1:
        bwd_buf += bucket(st.reduce_bucket_size)
    if z == 3:  # gathered parameters stay live from forward to backward (stage3_max_live_parameters),
        # plus the full gradient of the largest parameter before its reduce-scatter
        bwd_buf += w * min(N, st.max_live_parameters) + w * largest_param(st.model, st.tp)
    # boundary (stage 0): the flattened copy of all gradients for the data-parallel all-reduce
    boundary = bucket(st.allreduce_bucket_size) if z == 0 else 0.0
    # step: relative to the resident gradients, which the step frees
    if st.offload_optimizer and z >= 1:
        step_ws = 0.0                            # the CPU optimizer steps in host memory
    elif z == 0:
        step_ws = (4 * N if w < 4 else 0) + 4 * N - (grads if w < 4 else 0)  # fp32 grads + foreach temp
    else:
        flat = 3 * w * part + (4 * part if w < 4 else 0)     # own grads + averaged partition + flat copy
        step_ws = max(flat, 8 * part) - grads                # then fp32 grad + AdamW foreach temporary
        if z == 3:
            step_ws += bucket(st.reduce_bucket_size)          # ZeRO-3 keeps its reduce bucket allocated
    # megaseek.ckpt (state.iter_full_state) gathers the full fp32 weights and both Adam moments of the
    # pipeline stage, unsharded over tensor and data ranks, on every rank of the stage: 12 bytes per parameter
    full_stage = stage_params(st.model, 1, st.pp, st.partition)[sp_.stage].params
    checkpoint_host = 12.0 * full_stage
    states = params + grads + opt
    phases = {"backward": act["total"] + bwd_buf, "boundary": boundary, "step": step_ws}
    phase = max(phases, key=phases.get)
    peak = runtime + states + phases[phase]
    buffers = peak - runtime - states - act["total"]
    return Memory(parameters=params, gradients=grads, optimizer=opt, activations=act["total"],
                  buffers=max(0.0, buffers), runtime=runtime, peak=max(peak, runtime + states + act["total"]),
                  host=host, checkpoint_host=checkpoint_host, capacity=hw.capacity_bytes, stage=sp_.stage, params_on_rank=N, phase=phase,
                  detail={"activation": act, "phases": phases, "backward_buffers": bwd_buf})


def estimate_memory(st: Setup, hw: Hardware, runtime_bytes: Optional[float] = None) -> Memory:
    """The peak over pipeline stages (every tensor/data rank of a stage holds the same amount)."""
    runtime = hw.runtime_gb * 1e9 if runtime_bytes is None else float(runtime_bytes)
    stages = stage_params(st.model, st.tp, st.pp, st.partition, st.ep)
    return max((_stage_memory(st, hw, s, runtime) for s in stages), key=lambda mem: mem.peak)
