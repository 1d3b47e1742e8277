"""Downstream tasks built from held-out text of the embedded corpus (the running Python's standard library).

Held out = the .py files of the stdlib that the default data config never reads: `list_files` walks the stdlib in
a fixed sorted order and stops at `data.max_bytes` (16,000,000 in conf/data/default.yaml; the test config reads
1,500,000), so every file past the default cutoff (`test/test_d*`... `zoneinfo/`) is unseen by any run with
`data.max_bytes <= 16e6`. The validation split is tokens, not files, so it cannot give whole functions; files can.

Four tasks, every draw from one `random.Random(seed)` (seed 1234) over a sorted pool, so a rebuild on the same Python
gives byte-identical files (the manifest records the Python version, the files and their sha256):

    stdlib_next_line        multiple_choice  context: up to 200 chars of the lines before line i of a file;
                                             choices: line i and 3 other held-out lines of the same length
                                             (+- 2 chars), so an untrained model (equal log-probs per token) is at chance
    stdlib_docstring_match  multiple_choice  context: a function's `def` line + an opening triple quote; choices: its
                                             docstring's first line and 3 of other functions (length +- 3 chars)
    stdlib_return_line      generate_until   context: a function up to `return` on its return line; target: the rest
                                             of that line (exact match, generation stops at a newline)
    stdlib_held_out_ppl     loglikelihood_rolling  whole short held-out functions (bits per byte, perplexities)
"""
from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sys
from pathlib import Path
from typing import Optional

SEED = 1234
DEFAULT_MAX_BYTES = 16_000_000
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
COUNTS = {"next_line": 200, "docstring_match": 200, "return_line": 120, "held_out_ppl": 60}
_RETURN = re.compile(r"^(\s*return)( .+)$")


def held_out_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[Path, str]]:
    """(path, relative path) of the stdlib .py files past the first `max_bytes` that training reads."""
    from megaseek.data.corpus import stdlib_root
    from megaseek.data.readers import list_files
    from megaseek.data.spec import SourceSpec
    every = list_files(SourceSpec(name="stdlib", path=stdlib_root(), embedded=True, max_bytes=0))
    used = list_files(SourceSpec(name="stdlib", path=stdlib_root(), embedded=True, max_bytes=max_bytes))
    if [r for _, r in every[:len(used)]] != [r for _, r in used]:
        raise RuntimeError("the stdlib listing is not a stable prefix order")
    return every[len(used):]


def _read(path: Path) -> Optional[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if "\t" not in text and "\r" not in text else None  # keep to plain space-indented files


def _ok_line(line: str, lo: int = 8, hi: int = 60) -> bool:
    s = line.strip()
    return lo <= len(s) and len(line) <= hi and line == line.rstrip() and s.isascii()


def _context(lines: list[str], i: int, max_chars: int = 200) -> str:
    """The lines before i, newest last, as many as fit in max_chars (at least one), ending in a newline."""
    out, n = [], 0
    for j in range(i - 1, -1, -1):
        if out and n + len(lines[j]) + 1 > max_chars:
            break
        out.append(lines[j])
        n += len(lines[j]) + 1
    return "\n".join(reversed(out)) + "\n"


def _distractors(rng: random.Random, by_len: dict, true: str, tol: int, k: int = 3) -> Optional[list[str]]:
    pool = sorted({c for d in range(-tol, tol + 1) for c in by_len.get(len(true) + d, ())
                   if c.strip() != true.strip()})
    return rng.sample(pool, k) if len(pool) >= k else None


def _mc_doc(rng: random.Random, context: str, true: str, others: list[str]) -> dict:
    label = rng.randrange(4)
    choices = list(others)
    choices.insert(label, true)
    return {"context": context, "choices": choices, "label": label}


def next_line_docs(files: list[tuple[str, str]], rng: random.Random, n: int) -> list[dict]:
    by_len: dict[int, set] = {}
    sites = []
    for rel, text in files:
        lines = text.split("\n")
        counts: dict[str, int] = {}
        for ln in lines:
            counts[ln.strip()] = counts.get(ln.strip(), 0) + 1
        for i, ln in enumerate(lines):
            if _ok_line(ln) and not ln.strip().startswith("#"):
                by_len.setdefault(len(ln), set()).add(ln)
                if i >= 3 and counts[ln.strip()] == 1 and any(x.strip() for x in lines[i - 3:i]):
                    sites.append((rel, i))
    docs = []
    texts = dict(files)
    for rel, i in rng.sample(sites, len(sites)):
        lines = texts[rel].split("\n")
        others = _distractors(rng, by_len, lines[i], 2)
        if others is None:
            continue
        docs.append(dict(_mc_doc(rng, _context(lines, i), lines[i], others), source=f"{rel}:{i + 1}"))
        if len(docs) == n:
            break
    return docs


def _functions(rel: str, text: str):
    """(node, source lines) of every function defined in the file."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _summary(node) -> Optional[str]:
    doc = ast.get_docstring(node, clean=True)
    if not doc:
        return None
    first = doc.strip().split("\n")[0].strip()
    return first if 10 <= len(first) <= 70 and first.isascii() and '"' not in first and "\\" not in first else None


def docstring_docs(files: list[tuple[str, str]], rng: random.Random, n: int) -> list[dict]:
    items = []  # (header, summary, source)
    for rel, text in files:
        lines = text.split("\n")
        for node in _functions(rel, text):
            s = _summary(node)
            first = lines[node.lineno - 1]
            body0 = node.body[0]
            if s is None or body0.lineno != node.lineno + 1 or not first.rstrip().endswith(":"):
                continue  # one-line signatures only, docstring right below
            items.append((first.strip(), s, f"{rel}:{node.lineno}"))
    by_len: dict[int, set] = {}
    for _, s, _ in items:
        by_len.setdefault(len(s), set()).add(s)
    docs, seen = [], set()
    for header, s, src in rng.sample(items, len(items)):
        if header in seen:
            continue
        others = _distractors(rng, by_len, s, 3)
        if others is None:
            continue
        seen.add(header)
        doc = _mc_doc(rng, header + '\n    """', s, others)
        docs.append(dict(doc, source=src))
        if len(docs) == n:
            break
    return docs


def return_line_docs(files: list[tuple[str, str]], rng: random.Random, n: int) -> list[dict]:
    sites = []
    for rel, text in files:
        lines = text.split("\n")
        for node in _functions(rel, text):
            for st in ast.walk(node):
                if not isinstance(st, ast.Return) or st.value is None or st.lineno != st.end_lineno:
                    continue
                ln = lines[st.lineno - 1]
                m = _RETURN.match(ln)
                if not m or "#" in ln or not 2 <= len(m.group(2)) <= 24 or not ln.isascii() or ln != ln.rstrip():
                    continue
                start = max(node.lineno - 1, st.lineno - 10)  # the def line, or the last 9 lines before
                ctx = "\n".join(lines[start:st.lineno - 1] + [m.group(1)])
                sites.append({"context": ctx, "target": m.group(2), "source": f"{rel}:{st.lineno}"})
    uniq = {d["context"]: d for d in sites}  # one site per distinct context
    docs = [uniq[k] for k in sorted(uniq)]
    return rng.sample(docs, min(n, len(docs)))


def ppl_docs(files: list[tuple[str, str]], rng: random.Random, n: int) -> list[dict]:
    items = []
    for rel, text in files:
        lines = text.split("\n")
        for node in _functions(rel, text):
            src = "\n".join(lines[node.lineno - 1:node.end_lineno]) + "\n"
            if 200 <= len(src) <= 600 and src.isascii() and not src.startswith(" "):
                items.append({"text": src, "source": f"{rel}:{node.lineno}"})
    items.sort(key=lambda d: d["source"])
    return rng.sample(items, min(n, len(items)))


YAMLS = {
    "next_line": """task: stdlib_next_line
dataset_path: json
dataset_kwargs:
  data_files: {test: next_line.jsonl}
custom_dataset: !function local.load_json
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
  - {metric: acc_mutual_info, aggregation: mean, higher_is_better: true}
metadata: {version: 1.0}
""",
    "docstring_match": """task: stdlib_docstring_match
dataset_path: json
dataset_kwargs:
  data_files: {test: docstring_match.jsonl}
custom_dataset: !function local.load_json
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
  - {metric: acc_mutual_info, aggregation: mean, higher_is_better: true}
metadata: {version: 1.0}
""",
    "return_line": """task: stdlib_return_line
dataset_path: json
dataset_kwargs:
  data_files: {test: return_line.jsonl}
custom_dataset: !function local.load_json
test_split: test
output_type: generate_until
doc_to_text: context
doc_to_target: target
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
metadata: {version: 1.0}
""",
    "held_out_ppl": """task: stdlib_held_out_ppl
dataset_path: json
dataset_kwargs:
  data_files: {test: held_out_ppl.jsonl}
custom_dataset: !function local.load_json
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
metadata: {version: 1.0}
""",
}

LOCAL_PY = '''"""Local JSON Lines data for the task YAMLs beside this file: `data_files` are resolved against this
directory (not the working directory), so `lm_eval --include_path <this dir>` works from anywhere, offline."""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_json(data_files, **_):
    import datasets
    files = {split: str(HERE / f) for split, f in dict(data_files).items()}
    return datasets.load_dataset("json", data_files=files)
'''


def build(out: Path = TASKS_DIR, seed: int = SEED, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Write the four tasks' JSONL + YAML files and manifest.json into `out`; returns the manifest."""
    held = held_out_files(max_bytes)
    files = [(rel, t) for p, rel in held if (t := _read(p)) is not None]
    rng = random.Random(seed)
    built = {"next_line": next_line_docs(files, rng, COUNTS["next_line"]),
             "docstring_match": docstring_docs(files, rng, COUNTS["docstring_match"]),
             "return_line": return_line_docs(files, rng, COUNTS["return_line"]),
             "held_out_ppl": ppl_docs(files, rng, COUNTS["held_out_ppl"])}
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in built.items():
        if len(docs) < COUNTS[name]:
            raise RuntimeError(f"{name}: only {len(docs)} examples in the held-out files (want {COUNTS[name]})")
        (out / f"{name}.jsonl").write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in docs))
        (out / f"{name}.yaml").write_text(YAMLS[name])
    (out / "local.py").write_text(LOCAL_PY)
    man = {"seed": seed, "python": sys.version.split()[0], "held_out_after_bytes": max_bytes,
           "counts": {k: len(v) for k, v in built.items()},
           "held_out_files": {rel: hashlib.sha256(t.encode()).hexdigest()[:16] for rel, t in files}}
    (out / "manifest.json").write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    return man
