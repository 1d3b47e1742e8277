"""The `data` config, read and checked into plain dataclasses before any work starts.

`DataSpec.from_config(cfg.data)` resolves paths (relative to the launch directory), fills the embedded
default corpus when `data.sources` is empty, merges per-source cleaning overrides over `data.clean`,
and refuses a bad value with one ConfigError that names the field and the fix.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from megaseek.config.schema import ConfigError
from megaseek.data.clean import CleanConfig
from megaseek.data.corpus import stdlib_root

STDLIB = "@stdlib"
ENGINES = ("local", "dask")
TEXT_EXTS = (".txt", ".md", ".py")
DATA_EXTS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
TIERS = ("raw", "cleaned", "tokenized")
SOURCE_KEYS = {"path", "text_field", "weight", "extensions", "max_bytes", "clean"}


@dataclass(frozen=True)
class SourceSpec:
    """One named source. `path`: a directory, one file, or the embedded corpus (`embedded=True`)."""
    name: str
    path: Path
    text_field: str = "text"
    weight: float = 1.0
    extensions: tuple = TEXT_EXTS + DATA_EXTS
    max_bytes: int = 0                      # 0: everything
    clean: CleanConfig = field(default_factory=CleanConfig)
    embedded: bool = False

    def identity(self) -> dict:
        """What the raw tier depends on (not the weight, field or cleaning)."""
        return {"name": self.name, "path": str(self.path), "extensions": list(self.extensions),
                "max_bytes": self.max_bytes, "embedded": self.embedded}


@dataclass(frozen=True)
class TokenizerSpec:
    path: Optional[Path]
    vocab_size: int
    special_tokens: tuple

    @property
    def eos(self) -> str:
        return self.special_tokens[0]


@dataclass(frozen=True)
class DataSpec:
    name: str
    root: Path
    sources: tuple                          # SourceSpec, in config order
    tokenizer: TokenizerSpec
    tokenizer_sample_bytes: int
    valid_fraction: float
    blend_window: int
    workers: int
    part_bytes: int
    verify: bool = False
    rebuild: tuple = ()
    engine: str = "local"
    unit_bytes: int = 4_000_000
    dask_address: Optional[str] = None
    dask_scheduler_file: Optional[str] = None

    @staticmethod
    def from_config(data: Mapping[str, Any], vocab_size: Optional[int] = None) -> "DataSpec":
        """`data`: the resolved `cfg.data` (a DictConfig or a plain dict)."""
        d = _plain(data)
        name = str(d.get("name") or "default")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"data.name={name!r}: use letters, digits, '-', '_' or '.' (it names directories)")
        base_clean = d.get("clean") or {}
        raw_sources = d.get("sources") or {}
        if not isinstance(raw_sources, Mapping):
            raise ConfigError(f"data.sources must be a mapping name -> {{path, text_field, weight}}, "
                              f"got {type(raw_sources).__name__}")
        if raw_sources:
            sources = tuple(_source(str(k), v, base_clean) for k, v in raw_sources.items())
        else:
            sources = (SourceSpec(name="stdlib", path=stdlib_root(), extensions=(".py",),
                                  max_bytes=int(d.get("max_bytes") or 0), clean=_clean(base_clean, {}, "data.clean"),
                                  embedded=True),)
        tok = d.get("tokenizer") or {}
        vs = tok.get("vocab_size", vocab_size)
        if vs is None:
            raise ConfigError("data.tokenizer.vocab_size is not set (it defaults to ${model.vocab_size})")
        special = tuple(str(s) for s in (tok.get("special_tokens") or ["<|endoftext|>", "<|pad|>"]))
        tpath = tok.get("path")
        vf = float(d.get("valid_fraction", 0.0) or 0.0)
        if not 0.0 <= vf < 1.0:
            raise ConfigError(f"data.valid_fraction={vf} must be in [0, 1)")
        rebuild = tuple(str(t) for t in (d.get("rebuild") or ()))
        bad = [t for t in rebuild if t not in TIERS]
        if bad:
            raise ConfigError(f"data.rebuild={list(rebuild)}: unknown tier(s) {bad}; choose from {list(TIERS)}")
        engine = str(d.get("engine") or "local")
        if engine not in ENGINES:
            raise ConfigError(f"data.engine={engine!r}: choose one of {list(ENGINES)}")
        dask_cfg = d.get("dask") or {}
        unknown = sorted(set(dask_cfg) - {"address", "scheduler_file"})
        if unknown:
            raise ConfigError(f"data.dask: unknown key(s) {unknown}; known keys: ['address', 'scheduler_file']")
        spec = DataSpec(
            name=name, root=Path(str(d.get("root") or "data")).expanduser().resolve(), sources=sources,
            tokenizer=TokenizerSpec(path=Path(str(tpath)).expanduser().resolve() if tpath else None,
                                    vocab_size=int(vs), special_tokens=special),
            tokenizer_sample_bytes=int(d.get("tokenizer_sample_bytes") or 8_000_000), valid_fraction=vf,
            blend_window=int(d.get("blend_window") or 1000), workers=int(d.get("workers") or 0),
            part_bytes=int(d.get("part_bytes") or 64_000_000), verify=bool(d.get("verify", False)),
            rebuild=rebuild, engine=engine, unit_bytes=int(d.get("unit_bytes") or 4_000_000),
            dask_address=dask_cfg.get("address") or None, dask_scheduler_file=dask_cfg.get("scheduler_file") or None)
        spec._check()
        return spec

    def _check(self) -> None:
        if self.tokenizer.vocab_size < 300 and self.tokenizer.path is None:
            raise ConfigError(f"data.tokenizer.vocab_size={self.tokenizer.vocab_size}: a byte-level BPE needs at "
                              f"least 256 byte tokens plus the special tokens; use >= 300")
        if not self.tokenizer.special_tokens:
            raise ConfigError("data.tokenizer.special_tokens is empty: the first one is the end-of-document token")
        if self.blend_window < len(self.sources):
            raise ConfigError(f"data.blend_window={self.blend_window} is smaller than the number of sources "
                              f"({len(self.sources)}); use a window of at least that many samples")
        if self.part_bytes < 1:
            raise ConfigError(f"data.part_bytes={self.part_bytes} must be >= 1")
        if self.unit_bytes < 1:
            raise ConfigError(f"data.unit_bytes={self.unit_bytes} must be >= 1")

    @property
    def workers_resolved(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    def weights(self) -> dict:
        return {s.name: s.weight for s in self.sources}

    def tier_dir(self, tier: str) -> Path:
        return self.root / tier / self.name


def _plain(node: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(node)


def _clean(base: Mapping, override: Mapping, where: str) -> CleanConfig:
    merged = dict(base or {})
    merged.update(override or {})
    known = {f.name for f in fields(CleanConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    try:
        return CleanConfig(**merged).checked()
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _source(name: str, v: Any, base_clean: Mapping) -> SourceSpec:
    where = f"data.sources.{name}"
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"{where}: a source name may use letters, digits, '-' and '_' (it names directories)")
    if isinstance(v, str):
        v = {"path": v}
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where} must be a mapping {{path, text_field, weight}}, got {v!r}")
    unknown = sorted(set(v) - SOURCE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(SOURCE_KEYS)}")
    if not v.get("path"):
        raise ConfigError(f"{where}.path is missing: give a directory, a .jsonl[.gz|.zst] or .parquet file, "
                          f"or {STDLIB}")
    weight = float(v.get("weight", 1.0))
    if not weight > 0:
        raise ConfigError(f"{where}.weight={weight} must be > 0 (remove the source to leave it out)")
    embedded = str(v["path"]) == STDLIB
    path = stdlib_root() if embedded else Path(str(v["path"])).expanduser().resolve()
    exts = v.get("extensions") or ((".py",) if embedded else TEXT_EXTS + DATA_EXTS)
    exts = tuple(e if e.startswith(".") else "." + e for e in exts)
    return SourceSpec(name=name, path=path, text_field=str(v.get("text_field") or "text"), weight=weight,
                      extensions=exts, max_bytes=int(v.get("max_bytes") or 0),
                      clean=_clean(base_clean, v.get("clean") or {}, f"data.clean + {where}.clean"),
                      embedded=embedded)


def describe(spec: DataSpec) -> dict:
    """A JSON-able view (for manifests)."""
    out = asdict(spec)
    return _jsonable(out)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x
