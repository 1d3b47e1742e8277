"""launch/evaluate.py: the mean token loss of a text under a checkpoint equals a hand computation with our
model and transformers' loss on the exported model (1e-5); perplexity = exp(loss); every token counted once."""
import json
import math
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from tests.test_export import trained_runs

TEXT = ("import os\n\n\ndef walk(root):\n    \"\"\"Yield every file under root.\"\"\"\n"
        "    for d, _, files in os.walk(root):\n        for f in files:\n            yield os.path.join(d, f)\n")


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    return trained_runs(data_root, tmp_path_factory.getbasetemp() / "export_runs")["tp2"][0]


def _evaluate(run, text_file, *extra) -> dict:
    p = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), f"checkpoint={run}",
                        f"text_file={text_file}", *extra], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout  # ONE JSON line
    return json.loads(lines[0])


def _ids(run):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(run / "checkpoints" / "global_step3" / "tokenizer.json"))
    return [tok.token_to_id("<|endoftext|>")] + tok.encode(TEXT).ids  # the text follows an EOS, as in training


@torch.no_grad()
def _hand_loss(run, L: int) -> float:
    """Token by token: -log p(ids[t+1] | window prefix), float64, windows of L inputs starting at 0, L, 2L..."""
    from megaseek.ckpt.hf import load_model
    model, cfg = load_model(run)
    ids = _ids(run)
    nll = []
    for a in range(0, len(ids) - 1, L):
        x = torch.tensor([ids[a:a + L]])[:, :len(ids) - 1 - a]  # (1, l)
        logp = torch.log_softmax(model(x)[0, :, :cfg.vocab_size].double(), dim=-1)  # (l, V)
        nll += [-float(logp[t, ids[a + t + 1]]) for t in range(x.shape[1])]
    assert len(nll) == len(ids) - 1
    return sum(nll) / len(nll)


@torch.no_grad()
def _hf_loss(run, out, L: int) -> float:
    """transformers' own shifted cross-entropy (labels=) on the exported model, window by window."""
    from transformers import AutoModelForCausalLM
    from megaseek.ckpt.hf import export_hf
    model = AutoModelForCausalLM.from_pretrained(export_hf(run, out), dtype=torch.float32).eval()
    ids, total = _ids(run), 0.0
    for a in range(0, len(ids) - 1, L):
        w = torch.tensor([ids[a:a + L + 1]])  # L inputs and their L targets
        total += float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
    return total / (len(ids) - 1)


@pytest.mark.slow
def test_evaluate_loss_equals_hand_computation(run, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT)
    n = len(_ids(run)) - 1
    assert 64 < n < 128  # two windows at the default seq_len (64), the second partial
    for extra, L in (((), 64), (("seq_len=16",), 16)):
        res = _evaluate(run, f, *extra)
        hand, ref = _hand_loss(run, L), _hf_loss(run, tmp_path / f"hf{L}", L)
        print(f"[evaluate seq_len={L}] loss {res['loss']:.8f}, by hand {hand:.8f}, transformers {ref:.8f}, "
              f"ppl {res['perplexity']:.4f}, {res['tokens']} tokens")
        assert set(res) == {"checkpoint", "text_file", "tokens", "loss", "perplexity"}
        assert res["checkpoint"] == str(run / "checkpoints" / "global_step3") and res["text_file"] == str(f)
        assert res["tokens"] == n
        assert math.isfinite(res["loss"]) and 0 < res["loss"] < math.log(1001) + 1
        assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-12)
        assert abs(res["loss"] - hand) < 1e-5
        assert abs(res["loss"] - ref) < 1e-5
    assert abs(_hand_loss(run, 64) - _hand_loss(run, 16)) > 1e-3  # the window length really changed the context
