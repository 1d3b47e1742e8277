"""Shortcuts to the pipeline for the embedded default corpus (used by tests and tools without Hydra).

`ensure_default_dataset(root, vocab, max_bytes, sample_bytes)` runs `conf/data/default.yaml` with those
values, exactly as `build_data` does for the same config, so both share one cached dataset.
"""
from __future__ import annotations

import json
from pathlib import Path

from megaseek.data.pipeline import prepare
from megaseek.data.spec import DataSpec

DEFAULT_YAML = Path(__file__).resolve().parents[2] / "conf" / "data" / "default.yaml"


def default_data_config(**overrides) -> dict:
    """conf/data/default.yaml as a plain dict (the ${model.vocab_size} interpolation left to the caller)."""
    import yaml
    d = yaml.safe_load(DEFAULT_YAML.read_text())
    d["tokenizer"]["vocab_size"] = None
    return apply_overrides(d, overrides)


def apply_overrides(d: dict, overrides: dict) -> dict:
    """Set `key` or `group.key` entries of a data config dict in place; returns it."""
    for k, v in overrides.items():
        node, *rest = k.split(".")
        if rest:
            d[node][rest[0]] = v
        else:
            d[k] = v
    return d


def ensure_default_dataset(root: Path, vocab_size: int, max_bytes: int, tokenizer_sample_bytes: int,
                           log=print) -> Path:
    d = default_data_config(root=str(root), max_bytes=int(max_bytes),
                            tokenizer_sample_bytes=int(tokenizer_sample_bytes))
    d["tokenizer"]["vocab_size"] = int(vocab_size)
    return prepare(DataSpec.from_config(d), log=log)


def dataset_meta(dataset_dir: Path) -> dict:
    return json.loads((Path(dataset_dir) / "index.json").read_text())
