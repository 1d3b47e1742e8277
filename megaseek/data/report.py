"""The cleaning report of one run: per source, documents and bytes in and out of every step, duplicates
removed, the top reasons, and each skipped bad input with its file and line."""
from __future__ import annotations

from collections import Counter

BAD_INPUT = ("empty_file", "binary_file", "file_too_large", "corrupt_file", "invalid_utf8", "malformed_json",
             "not_an_object", "missing_field", "field_not_text", "null_text")
FILTERS = ("empty", "too_short", "too_long", "alnum_fraction", "symbol_ratio", "repeated_lines", "language")
DEDUP = ("exact_duplicate", "near_duplicate")
MAX_EXAMPLES = 1000


def step_of(reason: str) -> str:
    base = reason.split(" ")[0]
    if base in BAD_INPUT:
        return "input"
    if base.startswith("regex:"):
        return "rules"
    if base in DEDUP:
        return base.split("_")[0] + "_dedup"
    return "filter:" + base if base in FILTERS else "filter:" + base  # top_Ngram, dup_Ngram


STEP_ORDER = ["input", "rules"] + [f"filter:{f}" for f in FILTERS] + ["filter:ngrams", "exact_dedup", "near_dedup"]


class SourceReport:
    def __init__(self, source: str):
        self.source = source
        self.docs_in = self.bytes_in = self.docs_out = self.bytes_out = 0
        self.removed: Counter = Counter()
        self.removed_bytes: Counter = Counter()
        self.bad_examples: list = []
        self.repaired = {"docs": 0, "bytes_removed": 0, "examples": []}

    def record_in(self, nbytes: int) -> None:
        self.docs_in += 1
        self.bytes_in += nbytes

    def drop(self, reason: str, origin: str, nbytes: int) -> None:
        base = reason.split(" ")[0]
        self.removed[base] += 1
        self.removed_bytes[base] += nbytes
        if base in BAD_INPUT and len(self.bad_examples) < MAX_EXAMPLES:
            self.bad_examples.append({"origin": origin, "reason": reason})

    def repair(self, origin: str, nbytes: int) -> None:
        self.repaired["docs"] += 1
        self.repaired["bytes_removed"] += nbytes
        if len(self.repaired["examples"]) < MAX_EXAMPLES:
            self.repaired["examples"].append(origin)

    def keep(self, nbytes_out: int) -> None:
        self.docs_out += 1
        self.bytes_out += nbytes_out

    def state(self) -> dict:
        """A JSON-able snapshot (one unit's share), merged back with `absorb`."""
        return {"docs_in": self.docs_in, "bytes_in": self.bytes_in, "docs_out": self.docs_out,
                "bytes_out": self.bytes_out, "removed": dict(self.removed), "removed_bytes": dict(self.removed_bytes),
                "bad_examples": self.bad_examples, "repaired": self.repaired}

    def absorb(self, st: dict) -> None:
        """Add a later unit's share (units merged in order give the report of one pass over the source)."""
        self.docs_in += st["docs_in"]
        self.bytes_in += st["bytes_in"]
        self.docs_out += st["docs_out"]
        self.bytes_out += st["bytes_out"]
        self.removed.update(st["removed"])
        self.removed_bytes.update(st["removed_bytes"])
        self.bad_examples.extend(st["bad_examples"][:MAX_EXAMPLES - len(self.bad_examples)])
        r = st["repaired"]
        self.repaired["docs"] += r["docs"]
        self.repaired["bytes_removed"] += r["bytes_removed"]
        self.repaired["examples"].extend(r["examples"][:MAX_EXAMPLES - len(self.repaired["examples"])])

    def steps(self) -> list:
        """A funnel: documents into and out of each step, in pipeline order."""
        groups: dict = {}
        for reason, n in self.removed.items():
            s = step_of(reason)
            if s.startswith("filter:") and s[7:] not in FILTERS:
                s = "filter:ngrams"
            groups.setdefault(s, Counter())[reason] += n
        out, docs = [], self.docs_in
        for s in STEP_ORDER:
            gone = sum(groups.get(s, Counter()).values())
            out.append({"step": s, "docs_in": docs, "docs_out": docs - gone, "removed": dict(groups.get(s, {}))})
            docs -= gone
        return out

    def to_dict(self) -> dict:
        return {"source": self.source, "docs_in": self.docs_in, "bytes_in": self.bytes_in,
                "docs_out": self.docs_out, "bytes_out": self.bytes_out, "steps": self.steps(),
                "removed": {r: {"docs": n, "bytes": self.removed_bytes[r]} for r, n in self.removed.most_common()},
                "duplicates": {"exact": self.removed["exact_duplicate"], "near": self.removed["near_duplicate"]},
                "top_reasons": self.removed.most_common(10),
                "bad_input": {"counts": {r: n for r, n in self.removed.items() if r in BAD_INPUT},
                              "examples": self.bad_examples},
                "repaired_utf8": self.repaired}


def format_report(rep: dict) -> str:
    """A few lines for the log."""
    lines = []
    for s in rep["sources"]:
        lines.append(f"  {s['source']}: {s['docs_in']} docs / {s['bytes_in'] / 1e6:.2f} MB in -> {s['docs_out']} docs "
                     f"/ {s['bytes_out'] / 1e6:.2f} MB out; duplicates exact {s['duplicates']['exact']}, "
                     f"near {s['duplicates']['near']}; bad input {sum(s['bad_input']['counts'].values())}")
        if s["top_reasons"]:
            lines.append("    top reasons: " + ", ".join(f"{r} {n}" for r, n in s["top_reasons"][:6]))
    return "\n".join(lines)
