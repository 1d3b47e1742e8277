"""Direct preference optimisation on packed pair rows (megaseek/tasks/preference.py).

Per pair, with log pi(y|x) = sum over the response tokens of log p(y_t | x, y_<t) (prompt tokens excluded by
the loss mask) and the frozen reference's log-probs precomputed:

    h = [log pi(y_c) - log pi(y_r)] - [log ref(y_c) - log ref(y_r)]
    sigmoid (DPO):      loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing)
    ipo:                loss = (h' - 1 / (2 beta))^2,  h' = h with every log-prob divided by its response length

count = pairs; metrics: accuracy = mean [h > 0] (the implicit reward beta (log pi - log ref) ranks the pair
right), margin = mean beta h. With policy = reference, h = 0 and the sigmoid loss is ln 2 exactly.

The reference is the init checkpoint (train.init_from): its log-probs for every train / valid row are
computed once, before training, by a tp = 1 copy on rank 0 (`reference_logps`) and stored in
run_dir/reference_logps.safetensors, so a resumed run reads the same numbers and the reference weights are
never touched by the optimizer.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from megaseek.tasks.objective import LossParts, valid_tokens
from megaseek.tasks.preference import per_document_sum

LOSSES = ("sigmoid", "ipo")


def check_dpo(beta: float, loss: str, label_smoothing: float) -> None:
    from megaseek.config.schema import ConfigError
    if loss not in LOSSES:
        raise ConfigError(f"dpo.loss={loss!r}: choose one of {list(LOSSES)}")
    if not beta > 0:
        raise ConfigError(f"dpo.beta={beta} must be > 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing={label_smoothing} must be in [0, 0.5)")
    if loss == "ipo" and label_smoothing:
        raise ConfigError("dpo.label_smoothing applies to dpo.loss=sigmoid only; set it to 0 with ipo")


def sequence_logps(model, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """((b, 2) summed response log-probs of (chosen, rejected), (b, 2) response lengths) from vocab-sharded
    logits; labels outside the response are replaced by 0 and masked, so they change nothing."""
    valid = valid_tokens(batch).to(logits.device)  # (b, s)
    labels = batch["labels"].to(logits.device).masked_fill(~valid, 0)
    logp = -model.token_losses(logits, labels) * valid  # (b, s) fp32
    doc = batch["document_ids"].to(logits.device)
    return per_document_sum(logp, doc), per_document_sum(valid.float(), doc)


class DPOObjective:
    name = "dpo"

    def __init__(self, beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0):
        check_dpo(beta, loss, label_smoothing)
        self.beta, self.loss, self.eps = float(beta), loss, float(label_smoothing)

    def count(self, batch: dict) -> torch.Tensor:
        return torch.tensor(float(batch["document_ids"].shape[0]))

    def pair_losses(self, policy: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor):
        """(loss (b,), h (b,)) from (b, 2) policy / reference log-probs and response lengths."""
        if self.loss == "ipo":
            policy, ref = policy / lengths.clamp(min=1), ref / lengths.clamp(min=1)
        h = (policy[:, 0] - policy[:, 1]) - (ref[:, 0] - ref[:, 1])  # (b,)
        if self.loss == "ipo":
            return (h - 1.0 / (2.0 * self.beta)) ** 2, h
        z = self.beta * h
        return -(1.0 - self.eps) * F.logsigmoid(z) - self.eps * F.logsigmoid(-z), h

    def __call__(self, model, logits: torch.Tensor, batch: dict) -> LossParts:
        policy, lengths = sequence_logps(model, logits, batch)  # (b, 2)
        ref = batch["ref_logps"].to(policy)  # (b, 2), no gradient
        loss, h = self.pair_losses(policy, ref, lengths)
        return LossParts(loss_sum=loss.sum(), count=torch.tensor(float(h.shape[0])),
                         metrics={"accuracy": (h > 0).float().sum().detach(),
                                  "margin": (self.beta * h).sum().detach()})


@torch.no_grad()
def reference_logps(ckpt: Path, model_cfg, rows: list, batch: int = 16) -> torch.Tensor:
    """(n, 2) summed response log-probs of every row under the init checkpoint (a tp = 1 copy)."""
    from megaseek.ckpt.init_from import init_weights
    from megaseek.data.chat import stack
    from megaseek.model.decoder import Decoder
    ref = Decoder(model_cfg, seed=0)
    sd = init_weights(ckpt, model_cfg)
    own = ref.state_dict()
    ref.load_state_dict({k: (sd[k] if sd[k].shape == own[k].shape else torch.cat(
        [sd[k], sd[k].new_zeros((own[k].shape[0] - sd[k].shape[0],) + tuple(sd[k].shape[1:]))])) for k in own})
    ref.eval()
    out = []
    for k in range(0, len(rows), batch):
        b = stack(rows[k:k + batch])
        z = ref(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
        out.append(sequence_logps(ref, z, b)[0])
    return torch.cat(out).double().float()


def attach_reference(rows: list, ckpt: Path, model_cfg, cache: Path, key: str) -> None:
    """rows[i]["ref_logps"] = the reference's (2,) log-probs; rank 0 computes them once into `cache`
    (a safetensors file keyed by split), the other ranks wait and read the same numbers."""
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        have = load_file(str(cache)) if cache.is_file() else {}
        if key not in have or have[key].shape[0] != len(rows):
            have[key] = reference_logps(ckpt, model_cfg, rows)
            tmp = cache.with_name(cache.name + ".tmp")
            save_file(have, str(tmp))
            tmp.replace(cache)
    if dist.is_initialized():
        dist.barrier()
    ref = load_file(str(cache))[key]
    for r, v in zip(rows, ref):
        r["ref_logps"] = v.clone()


def run(cfg) -> dict:
    """`python launch/dpo.py train.init_from=DIR data.train=FILE [data.valid=FILE]` (every rank calls this)."""
    from megaseek.model.config import ModelConfig
    from megaseek.tasks.posttrain import prepare_stage, run_stage
    from megaseek.tasks.preference import read_pairs
    obj = DPOObjective(float(cfg.dpo.beta), str(cfg.dpo.loss), float(cfg.dpo.label_smoothing))
    stage = prepare_stage(cfg, "dpo", pp_ok=False)
    mcfg = ModelConfig.from_dict(dict(stage.cfg.model))

    def make_rows(path, seq_len: int, log=print, run_dir=None, split="train") -> list:
        rows = read_pairs(path, stage.tok, seq_len, log=log)
        from megaseek.ckpt.checkpoint import sha256
        key = f"{split}-{sha256(Path(path))[:16]}-{seq_len}"  # the data file and seq_len: a stale cache is not read
        attach_reference(rows, stage.ckpt, mcfg, Path(run_dir) / "reference_logps.safetensors", key)
        return rows

    return run_stage(stage, obj, make_rows)
