"""A megaseek model for lm-evaluation-harness: `lm_eval --model megaseek --model_args checkpoint=DIR`, or built
around a live model with `MegaseekLM(logits_fn=..., tokenizer=...)`.

The class only needs `logits_fn(ids (b, s) long) -> full-vocabulary logits (b, s, V)`: at tp = 1 that is
`model(ids)[..., :V]`; for a tensor-parallel model it is the vocab-sharded logits gathered over the tensor group
(`gather_from_region(z, ctx.group)`), and every tensor rank runs the same evaluation in lockstep: lm-eval sees
rank 0 of a world of 1 on each of them, batches are formed in the same deterministic order, and the gathered
logits (hence every greedy choice and stop) are identical across the group.

Scoring follows lm-eval's HFLM exactly, so scores equal `lm_eval --model hf` on our HF export example by example:
- loglikelihood(context, continuation): tokens come from TemplateLM._encode_pair (trailing context whitespace
  moved to the continuation; the pair encoded whole and split); input = (ctx + cont)[-(L + 1):][:-1] with
  L = max_length; log p(cont) = sum_t log_softmax(z_t)[cont_t] over the continuation's positions; is_greedy =
  every continuation token is the argmax.
- loglikelihood_rolling(text): lm-eval's disjoint rolling windows of L tokens after the prefix (EOS) token.
- generate_until(context, {until, max_gen_toks}): greedy; context left-truncated to L - max_gen_toks tokens;
  decoding stops at EOS, at max_gen_toks, or when a stop string appears; the text is cut at the first stop string.
  With `generate_fn` (a checkpoint, or a live model: megaseek/eval/live.py) decoding is the KV-cached generator
  (megaseek.model.generate) over the batch, left-padded; without it, the whole prefix is recomputed each step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids (b, s) -> logits (b, s, V)
GenerateFn = Callable[[list, int, tuple], list]  # (prompts, max_new, stop_tokens) -> new tokens per prompt
EOS_TOKEN = "<|endoftext|>"


def checkpoint_model(ckpt_dir: str | Path):
    """(LiveModel, tokenizer) of a checkpoint (or run dir) loaded at tp = 1: logits_fn and the KV-cached
    generate_fn (megaseek/eval/live.py)."""
    from megaseek.ckpt.hf import load_model, resolve_checkpoint
    from megaseek.data.tokenizer import load_tokenizer
    from megaseek.eval.live import LiveModel
    ckpt = resolve_checkpoint(ckpt_dir)
    model, _ = load_model(ckpt)
    return LiveModel(model.eval()), load_tokenizer(ckpt / "tokenizer.json")


@register_model("megaseek")
class MegaseekLM(TemplateLM):
    """lm-eval model over `logits_fn`; `checkpoint=DIR` builds one from a checkpoint at tp = 1."""

    def __init__(self, checkpoint: Optional[str] = None, logits_fn: Optional[LogitsFn] = None, tokenizer=None,
                 max_length: Optional[int] = None, batch_size: int | str = 8, max_gen_toks: int = 256,
                 generate_fn: Optional[GenerateFn] = None, **_):
        super().__init__()
        if checkpoint is not None:
            if logits_fn is not None:
                raise ValueError("MegaseekLM: pass checkpoint= or logits_fn=, not both")
            live, tokenizer = checkpoint_model(checkpoint)
            logits_fn, generate_fn = live.logits_fn, live.generate_fn
            max_length = int(max_length or live.max_length)
        if logits_fn is None or tokenizer is None or not max_length:
            raise ValueError("MegaseekLM needs checkpoint=DIR, or logits_fn, tokenizer and max_length")
        self.logits_fn, self.tokenizer, self._max_length = logits_fn, tokenizer, int(max_length)
        self.generate_fn = generate_fn
        self._eot = tokenizer.token_to_id(EOS_TOKEN)
        if self._eot is None:
            raise ValueError(f"MegaseekLM: the tokenizer has no {EOS_TOKEN} token")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8
        self._max_gen_toks = int(max_gen_toks)

    # --- tokenizer ---
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return "megaseek"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- scoring ---
    def _rows_logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """log_softmax(logits) of each row (right-padded into one batch; causal, so padding changes nothing
        before it): list of (len_i, V) float32."""
        n = max(len(r) for r in rows)
        x = torch.zeros(len(rows), n, dtype=torch.long)  # (b, n)
        for i, r in enumerate(rows):
            x[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        logp = F.log_softmax(self.logits_fn(x).float(), dim=-1)  # (b, n, V)
        return [logp[i, :len(r)] for i, r in enumerate(rows)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (log p, is_greedy)."""
        L = self.max_length
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][1] + requests[i][2]),
                                                            tuple(requests[i][1] + requests[i][2])))
        out: list = [None] * len(requests)
        for k in range(0, len(order), self.batch_size):
            idx = order[k:k + self.batch_size]
            inps, conts = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                if not ctx or not cont or len(cont) > L:
                    raise ValueError(f"loglikelihood request {i}: context {len(ctx)} / continuation {len(cont)} "
                                     f"tokens (both >= 1, continuation <= max_length {L})")
                inps.append((ctx + cont)[-(L + 1):][:-1])
                conts.append(cont)
            for i, inp, cont, logp in zip(idx, inps, conts, self._rows_logprobs(inps)):
                lp = logp[len(inp) - len(cont):]  # (c, V): the positions predicting the continuation
                tgt = torch.tensor(cont, dtype=torch.long)
                greedy = bool((lp.argmax(dim=-1) == tgt).all())
                out[i] = (float(lp.gather(1, tgt[:, None]).sum()), greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows)
        total = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            total[r] += lp
        return total

    # --- generation ---
    @torch.no_grad()
    def greedy(self, contexts: list[list[int]], max_new: int, until: list[str]) -> list[list[int]]:
        """Greedy continuations of a batch of token lists. A row stops at EOS, at a stop string in its decoded
        continuation, or after max_new tokens.

        With generate_fn: the KV-cached generator decodes the batch (EOS stops a row), then each row is cut
        after the first token whose decoded prefix holds a stop string (what stopping there would have
        given). Without: the whole prefix is recomputed each step."""
        if self.generate_fn is not None:
            return [self._cut(toks, until) for toks in self.generate_fn(contexts, max_new, (self.eot_token_id,))]
        rows = [list(c) for c in contexts]
        new: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max_new):
            live = [i for i, d in enumerate(done) if not d]
            if not live:
                break
            n = max(len(rows[i]) for i in live)
            x = torch.zeros(len(live), n, dtype=torch.long)  # (b_live, n), right-padded
            for j, i in enumerate(live):
                x[j, :len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
            z = self.logits_fn(x)  # (b_live, n, V)
            for j, i in enumerate(live):
                t = int(z[j, len(rows[i]) - 1].argmax())
                rows[i].append(t)
                new[i].append(t)
                if t == self.eot_token_id or any(s and s in self.tok_decode(new[i]) for s in until):
                    done[i] = True
        return new

    def _cut(self, toks: list[int], until: list[str]) -> list[int]:
        for k in range(1, len(toks) + 1):
            if toks[k - 1] == self.eot_token_id or any(s and s in self.tok_decode(toks[:k]) for s in until):
                return toks[:k]
        return toks

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        args = [req.args for req in requests]
        order = sorted(range(len(args)), key=lambda i: (-len(self.tok_encode(args[i][0])), args[i][0]))
        out: list = [None] * len(args)
        for k in range(0, len(order), self.batch_size):
            idx = order[k:k + self.batch_size]
            for gk in {repr(sorted(args[i][1].items())) for i in idx}:  # same generation kwargs together
                group = [i for i in idx if repr(sorted(args[i][1].items())) == gk]
                kw = normalize_gen_kwargs(args[group[0]][1], self._max_gen_toks)
                if kw.get("do_sample") or kw.get("temperature", 0.0) > 0.0:
                    raise ValueError("MegaseekLM.generate_until: only greedy decoding (do_sample: false)")
                until = handle_stop_sequences(kw.pop("until", None), eos=eos)
                max_new = int(kw.pop("max_gen_toks"))
                max_ctx = self.max_length - max_new
                if max_ctx <= 0:
                    raise ValueError(f"max_gen_toks={max_new} must be below max_length={self.max_length}")
                ctxs = [self.tok_encode(args[i][0])[-max_ctx:] for i in group]
                for i, toks in zip(group, self.greedy(ctxs, max_new, until)):
                    out[i] = postprocess_generated_text(self.tok_decode(toks), until, None)
        return out
