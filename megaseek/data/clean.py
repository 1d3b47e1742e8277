"""Cleaning one document: decode -> normalize -> regex rules -> quality filters.

Pure functions of (config, document), so they run unchanged in worker processes. Scripts without
spaces between words (Chinese, Japanese) are handled by treating each CJK character as a word; nothing
here strips non-Latin text.

Steps, in order (each filter names the reason a document is dropped):
  decode        invalid UTF-8: `repair` drops the undecodable bytes (a document with more than
                `max_invalid_fraction` of them is dropped), `drop` drops the document
  normalize     line endings -> \\n, Unicode `normalize` (NFKC), control/zero-width characters removed,
                Unicode spaces -> ' ', trailing spaces removed, at most `max_blank_lines` blank lines
  rules         regex rules: replace, or drop the document when the pattern matches
  filters       length, letters+digits fraction, symbol ratio, repeated lines, repeated word n-grams
                (most common n-gram, duplicated n-grams; as in Gopher), language by script
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_KANA = "\u3040-\u30ff\u31f0-\u31ff"
_CJK = _HAN + _KANA + "\u3100-\u312f"        # + bopomofo: scripts written without spaces
WORD_RE = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")  # a CJK character, or a run of other letters/digits/_
_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x85\x0b\x0c]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u200b\u2060\ufeff\ufffe\ufffd]")
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")
_ALNUM = re.compile(r"[^\W_]+")     # runs of letters or digits of any script
_WS = re.compile(r"\s+")

# Language filter by Unicode script: languages that share a script are not told apart.
SCRIPTS = {
    "latin": "A-Za-z\u00c0-\u024f\u1e00-\u1eff", "han": _HAN, "kana": _KANA,
    "hangul": "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f", "cyrillic": "\u0400-\u04ff", "greek": "\u0370-\u03ff",
    "arabic": "\u0600-\u06ff\u0750-\u077f", "hebrew": "\u0590-\u05ff", "devanagari": "\u0900-\u097f",
    "thai": "\u0e00-\u0e7f",
}
LANGUAGE_SCRIPTS = {
    **{k: ("latin",) for k in ("en", "fr", "de", "es", "it", "pt", "nl", "sv", "pl", "tr", "vi", "id", "code")},
    "zh": ("han",), "ja": ("han", "kana"), "ko": ("hangul", "han"), "ru": ("cyrillic",), "uk": ("cyrillic",),
    "el": ("greek",), "ar": ("arabic",), "fa": ("arabic",), "he": ("hebrew",), "hi": ("devanagari",),
    "th": ("thai",),
}


@dataclass
class CleanConfig:
    normalize: Optional[str] = "NFKC"
    invalid_utf8: str = "repair"
    max_invalid_fraction: float = 0.01
    max_file_bytes: int = 64_000_000
    strip_control: bool = True
    collapse_spaces: bool = False
    max_blank_lines: int = 2
    rules: list = field(default_factory=list)
    min_chars: Optional[int] = 64
    max_chars: Optional[int] = 2_000_000
    min_alnum_fraction: Optional[float] = 0.25
    max_symbol_ratio: Optional[float] = 1.5
    max_dup_line_fraction: Optional[float] = 0.6
    max_top_ngram_fraction: dict = field(default_factory=lambda: {2: 0.4, 3: 0.35, 4: 0.3})
    max_dup_ngram_fraction: dict = field(default_factory=lambda: {5: 0.85})
    languages: list = field(default_factory=list)
    min_language_fraction: float = 0.5
    exact_dedup: bool = True
    near_dedup: bool = True
    near_threshold: float = 0.6
    num_perm: int = 128
    shingle_ngram: int = 3
    lsh_bands: Optional[int] = None          # bands x rows <= num_perm; null: chosen from the threshold
    lsh_rows: Optional[int] = None
    max_pairs_per_member: int = 16           # candidate pairs per bucket member (its predecessors by ordinal)

    def checked(self) -> "CleanConfig":
        if self.normalize not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"normalize={self.normalize!r}: choose NFKC, NFC, NFKD, NFD or null")
        if self.invalid_utf8 not in ("repair", "drop"):
            raise ValueError(f"invalid_utf8={self.invalid_utf8!r}: choose repair or drop")
        if not 0.0 < self.near_threshold <= 1.0:
            raise ValueError(f"near_threshold={self.near_threshold} must be in (0, 1]")
        if self.num_perm < 16 or self.shingle_ngram < 1:
            raise ValueError(f"num_perm={self.num_perm} (>= 16) and shingle_ngram={self.shingle_ngram} (>= 1)")
        if (self.lsh_bands is None) != (self.lsh_rows is None):
            raise ValueError(f"lsh_bands={self.lsh_bands}, lsh_rows={self.lsh_rows}: give both or neither")
        if self.lsh_bands is not None and (self.lsh_bands < 1 or self.lsh_rows < 1
                                           or self.lsh_bands * self.lsh_rows > self.num_perm):
            raise ValueError(f"lsh_bands={self.lsh_bands} x lsh_rows={self.lsh_rows} must be >= 1 each and at "
                             f"most num_perm={self.num_perm}")
        if self.max_pairs_per_member < 1:
            raise ValueError(f"max_pairs_per_member={self.max_pairs_per_member} must be >= 1")
        self.max_top_ngram_fraction = {int(k): float(v) for k, v in (self.max_top_ngram_fraction or {}).items()}
        self.max_dup_ngram_fraction = {int(k): float(v) for k, v in (self.max_dup_ngram_fraction or {}).items()}
        bad = [x for x in self.languages if x not in LANGUAGE_SCRIPTS and x not in SCRIPTS]
        if bad:
            raise ValueError(f"languages={list(self.languages)}: unknown {bad}; use codes "
                             f"{sorted(LANGUAGE_SCRIPTS)} or scripts {sorted(SCRIPTS)}")
        for i, r in enumerate(self.rules):
            if not isinstance(r, dict) or "pattern" not in r:
                raise ValueError(f"rules[{i}] must be {{name, pattern, replace}} or {{name, pattern, action: drop}}")
            if r.get("action", "replace") not in ("replace", "drop"):
                raise ValueError(f"rules[{i}].action={r.get('action')!r}: choose replace or drop")
            try:
                re.compile(r["pattern"])
            except re.error as e:
                raise ValueError(f"rules[{i}].pattern={r['pattern']!r} is not a valid regex: {e}") from None
        return self


def decode(payload: bytes, cfg: CleanConfig) -> tuple[Optional[str], Optional[str], int]:
    """UTF-8 text of `payload` -> (text or None, drop reason or None, undecodable bytes removed)."""
    try:
        return payload.decode("utf-8"), None, 0
    except UnicodeDecodeError:
        pass
    if cfg.invalid_utf8 == "drop":
        return None, "invalid_utf8", 0
    text = payload.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - payload.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > cfg.max_invalid_fraction * max(1, len(payload)):
        return None, "invalid_utf8", bad
    return text.replace("\ufffd", ""), None, bad


@dataclass
class Words:
    """A document's words (lower case): per-document ids, the unique words, and each word's length."""
    ids: np.ndarray        # (n,) int64, index into `uniq`
    uniq: list
    lens: np.ndarray       # (n,) int64 characters per word

    @staticmethod
    def of(text: str) -> "Words":
        table: dict = {}
        words = WORD_RE.findall(text.lower())
        ids = np.fromiter((table.setdefault(w, len(table)) for w in words), dtype=np.int64, count=len(words))
        uniq = list(table)
        ulen = np.fromiter((len(w) for w in uniq), dtype=np.int64, count=len(uniq))
        return Words(ids, uniq, ulen[ids] if len(ids) else ulen)


def ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """One uint64 key per word n-gram (position i covers words i..i+n-1); collisions are negligible."""
    m = len(ids) - n + 1
    key = np.zeros(max(m, 0), dtype=np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for k in range(n):
            key = key * mult + ids[k:k + m].astype(np.uint64) + np.uint64(1)
    return key


def top_ngram_fraction(w: Words, n: int) -> float:
    """Characters in the most common word n-gram (all its occurrences) / characters in all words."""
    keys = ngram_keys(w.ids, n)
    if len(keys) < 2:
        return 0.0
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0.0
    start = first[top]
    return float(counts[top] * w.lens[start:start + n].sum()) / max(1, int(w.lens.sum()))


def dup_ngram_fraction(w: Words, n: int) -> float:
    """Characters of words covered by a word n-gram that occurs more than once / characters in all words."""
    keys = ngram_keys(w.ids, n)
    if len(keys) < 2:
        return 0.0
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    dup_start = (counts[inverse] > 1).astype(np.int64)
    covered = np.convolve(dup_start, np.ones(n, dtype=np.int64))[:len(w.ids)] > 0
    return float(w.lens[covered].sum()) / max(1, int(w.lens.sum()))


def _count(pattern: re.Pattern, text: str) -> int:
    return len(text) - len(pattern.sub("", text))


class Cleaner:
    """Compiled cleaning for one CleanConfig: `normalize(text)` then `check(text)`."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.rules = [(r.get("name") or f"rule{i}", re.compile(r["pattern"]), r.get("action", "replace"),
                       r.get("replace", "")) for i, r in enumerate(cfg.rules)]
        self.scripts = None
        if cfg.languages:
            names = sorted({s for x in cfg.languages for s in LANGUAGE_SCRIPTS.get(x, (x,))})
            self.scripts = re.compile("[" + "".join(SCRIPTS[s] for s in names) + "]+")
        self.blank = re.compile("\n{%d,}" % (cfg.max_blank_lines + 2)) if cfg.max_blank_lines >= 0 else None

    def normalize(self, text: str) -> tuple[str, Optional[str]]:
        """Normalized text, and the name of a `drop` rule that matched (else None)."""
        c = self.cfg
        text = _NEWLINES.sub("\n", text)
        if c.normalize and not unicodedata.is_normalized(c.normalize, text):
            text = unicodedata.normalize(c.normalize, text)
        if c.strip_control:
            text = _CONTROL.sub("", text)
        text = _SPACES.sub(" ", text)
        if c.collapse_spaces:
            text = _INNER_SPACES.sub(" ", text)
        text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
        if self.blank is not None:
            text = self.blank.sub("\n" * (c.max_blank_lines + 1), text)
        for name, pat, action, repl in self.rules:
            if action == "drop":
                if pat.search(text):
                    return text, f"regex:{name}"
            else:
                text = pat.sub(repl, text)
        return text.strip("\n"), None

    def check(self, text: str) -> tuple[Optional[str], Optional[Words]]:
        """(drop reason or None, the document's words when they were needed)."""
        c = self.cfg
        n = len(text)
        if n == 0:
            return "empty", None
        if c.min_chars is not None and n < c.min_chars:
            return "too_short", None
        if c.max_chars is not None and n > c.max_chars:
            return "too_long", None
        non_space = n - _count(_WS, text)
        alnum = _count(_ALNUM, text)
        if c.min_alnum_fraction is not None and alnum < c.min_alnum_fraction * max(1, non_space):
            return "alnum_fraction", None
        if c.max_symbol_ratio is not None and (non_space - alnum) > c.max_symbol_ratio * max(1, alnum):
            return "symbol_ratio", None
        if c.max_dup_line_fraction is not None:
            lines = [ln for ln in text.split("\n") if ln.strip()]
            if lines and 1.0 - len(set(lines)) / len(lines) > c.max_dup_line_fraction:
                return "repeated_lines", None
        if self.scripts is not None and alnum:
            if _count(self.scripts, text) < c.min_language_fraction * alnum:
                return "language", None
        words = Words.of(text)
        for k, limit in c.max_top_ngram_fraction.items():
            if top_ngram_fraction(words, k) > limit:
                return f"top_{k}gram", words
        for k, limit in c.max_dup_ngram_fraction.items():
            if dup_ngram_fraction(words, k) > limit:
                return f"dup_{k}gram", words
        return None, words
