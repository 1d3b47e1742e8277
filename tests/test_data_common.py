"""Crafted inputs shared by the data tests (no tests here): seeded prose, CJK text and source files."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river mountain garden window letter music market story "
         "paper light table summer winter morning evening kitchen station bridge forest island engine harbor "
         "silver copper animal bottle pocket teacher doctor library village meadow thunder candle mirror ladder "
         "basket feather pepper onion button carpet rocket planet signal answer").split()
VERBS = "runs sees takes makes finds gives tells asks seems feels leaves calls keeps holds brings writes".split()
HAN = [chr(c) for c in range(0x4E00, 0x4E00 + 400)]


def prose(seed: int, n_words: int = 150) -> str:
    """Sentences of random words: passes every default filter, unlike any other seed's text."""
    rng = random.Random(seed)
    out, sentence = [], []
    for i in range(n_words):
        sentence.append(rng.choice(VERBS) if i % 5 == 2 else rng.choice(WORDS))
        if len(sentence) >= rng.randint(7, 12):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return "\n".join(" ".join(out[i:i + 3]) for i in range(0, len(out), 3))


def chinese(seed: int, n_chars: int = 300) -> str:
    rng = random.Random(seed)
    s = []
    for i in range(n_chars):
        s.append(rng.choice(HAN))
        if i % 17 == 16:
            s.append("，" if i % 3 else "。")
    return "".join(s) + "。"


def change_words(text: str, positions: list, seed: int = 0) -> str:
    """`text` with the words at `positions` replaced by other words (a near duplicate)."""
    rng = random.Random(seed)
    words = text.split(" ")
    for p in positions:
        words[p] = rng.choice([w for w in WORDS if w != words[p]])
    return " ".join(words)


def write_jsonl(path: Path, records: list, compress: str = "") -> Path:
    lines = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records)
    data = lines.encode("utf-8")
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        import zstandard
        data = zstandard.ZstdCompressor().compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_parquet(path: Path, texts: list, column: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path)
    return path


def data_config(root: Path, sources: dict, **over) -> dict:
    """conf/data/default.yaml with `sources`, a small vocabulary and one worker (fast)."""
    from megaseek.data.prepare import apply_overrides, default_data_config
    d = default_data_config(root=str(root), tokenizer_sample_bytes=200_000, workers=1, valid_fraction=0.0)
    d["tokenizer"]["vocab_size"] = 400
    d["sources"] = sources
    return apply_overrides(d, over)
