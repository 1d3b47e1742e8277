"""Shared by the post-training tests: a pretraining-like init checkpoint (a tiny model whose tokenizer has no
chat tokens yet), the computable-reward task "more 7s is better", and the stage launcher."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, free_port

BIN = Path(sys.executable).parent
SEQ = 32
# a short run of a launch script: tiny batch, log every step, no sample, no sinks but metrics.jsonl
STAGE_ARGS = [f"train.seq_len={SEQ}", "train.micro_batch_size=8", "train.global_batch_size=16",
              "optimizer.lr=3e-3", "optimizer.weight_decay=0.0", "optimizer.warmup_steps=5",
              "train.log_interval=1", "train.sample_tokens=0", "logging.progress=false",
              "logging.wandb.mode=disabled", "logging.tensorboard.enabled=false", "logging.prometheus.port=0"]


def base_tokenizer():
    from megaseek.data.tokenizer import train_bpe
    return train_bpe(["hello world, the quick brown fox 0123456789 count"] * 4, vocab_size=300)


def model_cfg(vocab: int, max_seq_len: int = 64):
    from megaseek.model.config import ModelConfig
    return ModelConfig(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, max_seq_len=max_seq_len, init_std=0.05)


def init_checkpoint(run_dir: Path, seed: int = 5) -> Path:
    """A run directory holding one checkpoint of a random tiny model (tokenizer without the chat tokens)."""
    from megaseek.model.decoder import Decoder
    from megaseek.tasks.sft import write_checkpoint
    tok = base_tokenizer()
    cfg = model_cfg(tok.get_vocab_size())
    return write_checkpoint(run_dir, 0, cfg, Decoder(cfg, seed=seed).state_dict(), tok)


def sevens(rng: random.Random) -> str:
    """8 digits, about half of them 7 in some strings and a tenth in others."""
    pool = "0123456789" if rng.random() < 0.5 else "77770123"
    return "".join(rng.choice(pool) for _ in range(8))


def count_pairs(n: int, seed: int) -> list[dict]:
    """Preference lines: the response with more 7s is chosen (ties skipped)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        a, b = sevens(rng), sevens(rng)
        if a.count("7") == b.count("7"):
            continue
        c, r = (a, b) if a.count("7") > b.count("7") else (b, a)
        out.append({"prompt": "count", "chosen": c, "rejected": r})
    return out


def write_jsonl(path: Path, lines: list, bad: int = 0) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{not json\n" * bad)
    return path


def launch(script: str, args: list, nproc: int = 1, timeout: int = 600) -> str:
    """Run launch/<script>.py (torchrun when nproc > 1); returns its output, asserting exit 0."""
    cmd = [sys.executable, f"launch/{script}.py"] if nproc == 1 else [
        str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
        f"launch/{script}.py"]
    p = subprocess.run(cmd + STAGE_ARGS + list(args), cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
