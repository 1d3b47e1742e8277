"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), saved as tokenizer.json, which
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)` loads. The first special token is EOS."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|pad|>"]


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens=SPECIAL_TOKENS) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist; prepare the data first")
    return Tokenizer.from_file(str(path))


def eos_id(tok: Tokenizer, eos: Optional[str] = None) -> int:
    """Id of the end-of-document token: `eos`, else EOS, else the first special token."""
    for name in ([eos] if eos else []) + [EOS]:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    special = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    if special:
        return tok.token_to_id(special[0])
    raise ValueError(f"tokenizer has no {eos or EOS} token")
